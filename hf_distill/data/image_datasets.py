"""Loading image datasets (Hub id, image folder or `save_to_disk` folder) and batching them as uint8 tensors."""

import os

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

from .synthetic_dataset import has_parquet_data, is_synthesis_folder, load_synthetic_dataset

# row numbers of the dataset as loaded, added by `image_verification.verify_images` so errors can name them
DATASET_INDEX_COLUMN = "__dataset_index__"


def load_image_dataset(source: str, image_column: str = "image", split: str = "train") -> Dataset:
    """Load the `split` of an image dataset and check that it has `image_column`.

    `source` is a directory written by `datasets.save_to_disk` (a `Dataset` or a `DatasetDict`), a synthesis folder of
    `recipes/synthesize.py`, a folder of `data/*.parquet` files (splits from the file names), a local image folder
    (read with the `imagefolder` builder), or a Hub dataset id. Raises `ValueError` with the available columns or
    splits when the column or split does not exist, before any training work starts.
    """
    if os.path.isdir(source) and is_synthesis_folder(source):
        dataset = load_synthetic_dataset(source)  # recipes/synthesize.py output: raises while it is incomplete
    elif os.path.isdir(source) and has_parquet_data(source):
        dataset = load_dataset(source)  # e.g. a downloaded copy of a pushed set: splits from the file names
    elif os.path.isdir(source):
        is_saved = any(
            os.path.exists(os.path.join(source, marker))
            for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
        dataset = load_from_disk(source) if is_saved else load_dataset("imagefolder", data_dir=source)
    else:
        try:
            dataset = load_dataset(source)
        except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise ValueError(
                f"Could not load the dataset {source!r}: it is not a local folder and not a dataset available from the "
                f"Hugging Face Hub or its cache (offline mode needs a cached copy). Original error: {error}"
            ) from error
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise ValueError(
                f"Dataset {source!r} has no split {split!r}; available splits: {sorted(dataset)}. Pass --dataset_split."
            )
        dataset = dataset[split]
    if image_column not in dataset.column_names:
        raise ValueError(
            f"Dataset {source!r} has no column {image_column!r}; its columns are {dataset.column_names}. "
            "Pass the name of the image column with --image_column."
        )
    return dataset


def resize_center_crop(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> Image.Image:
    """Resize the shorter side to `size` and center-crop to `size x size` (use `Image.NEAREST` for label maps)."""
    width, height = image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), resample)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of `image`, for every place that decodes images (training, teacher caches, evaluation,
    synthesis).

    16-bit grayscale images (`I;16` modes: medical and scientific data, 16-bit PNG / TIFF) are scaled linearly to 8
    bits (`round(v * 255 / 65535)`); `image.convert("RGB")` would clip them (every value above 255 becomes 255). Other
    modes go through `convert("RGB")` (32-bit `I` and `F` images have no defined range and are clipped by PIL).
    """
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.uint32)
        image = Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8))  # mode "L"
    return image.convert("RGB")


def _to_square_uint8(image: Image.Image, size: int) -> np.ndarray:
    """RGB, shorter side resized to `size` (bicubic), center-cropped: `[3, size, size]` uint8."""
    return np.asarray(resize_center_crop(to_rgb(image), size), dtype=np.uint8).transpose(2, 0, 1)


class ImageCollator:
    """Decode a list of examples into `{"pixel_values": uint8 [B, 3, size, size]}`, plus `"sample_index"` [B] when
    `index_column` is given and one integer tensor [B] per entry of `int_columns` (`{batch key: column}`, e.g.
    `{"labels": "label"}`).

    Images are only resized and center-cropped here (on the data-loader workers); augmentation and normalization run
    batched on the training device in the trainer.
    """

    def __init__(
        self,
        size: int,
        image_column: str = "image",
        index_column: str | None = None,
        int_columns: dict[str, str] | None = None,
    ):
        self.size = size
        self.image_column = image_column
        self.int_columns = dict(int_columns or {})
        if index_column is not None:
            self.int_columns["sample_index"] = index_column

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        arrays = [self._pixels(example) for example in examples]
        batch = {"pixel_values": torch.from_numpy(np.stack(arrays))}
        for key, column in self.int_columns.items():
            batch[key] = torch.tensor([example[column] for example in examples], dtype=torch.long)
        return batch

    def _pixels(self, example: dict) -> np.ndarray:
        """The example's image as `[3, size, size]` uint8. An undecoded image (`datasets.Image(decode=False)`, as
        prepared by `verify_images`) is decoded here, so that one that cannot be read is reported with its dataset
        index and file instead of a bare Pillow error."""
        image = example[self.image_column]
        try:
            if isinstance(image, (dict, str)):
                image = ImageFeature().decode_example(image)
            return _to_square_uint8(image, self.size)
        except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, ...
            index = example.get(DATASET_INDEX_COLUMN, example.get(self.int_columns.get("sample_index")))
            if isinstance(image, dict):
                source = image.get("path") or "image bytes stored in the dataset"
            else:
                source = image if isinstance(image, str) else getattr(image, "filename", None) or "in-memory image"
            where = f"dataset index {index}" if index is not None else "an unknown dataset index"
            raise ValueError(
                f"Unreadable image at {where} ({source}): {type(error).__name__}: {error}. Fix or remove the file, or "
                "run with image verification (on by default: --verify_images) to list every unreadable image before "
                "training, and --skip_bad_images to train without them."
            ) from error
