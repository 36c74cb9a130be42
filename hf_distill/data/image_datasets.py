"""Loading image datasets (Hub id, image folder or `save_to_disk` folder) and batching them as uint8 tensors."""

import io
import os

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image, ImageOps

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


def resize_center_crop(
    image: Image.Image, size: int, resample: int = Image.BICUBIC, extent: tuple[float, float] | None = None
) -> Image.Image:
    """Resize the shorter side to `size` and center-crop to `size x size` (use `Image.NEAREST` for label maps).

    `extent`: the full image's `(width, height)` in this image's pixels when it was decoded at reduced scale
    ([`decode_image`]: e.g. `(320.0, 213.5)` for a 640 x 427 JPEG decoded at 1/2, 320 x 214 pixels), so that the
    output covers exactly the same region of the photo as from the full decode.
    """
    width, height = extent if extent is not None else image.size
    scale = size / min(width, height)
    new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_width, new_height), resample, box=(0, 0, width, height) if extent else None)
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


def decode_image(value: dict | str, draft_size: int | None = None) -> Image.Image:
    """Decode an undecoded `datasets` image (`{"path", "bytes"}` or a path) like `datasets.Image().decode_example`
    (EXIF orientation applied), a JPEG at reduced scale when `draft_size` is given.

    With `draft_size`, `Image.draft("RGB", (draft_size, draft_size))` lets libjpeg decode at 1/2, 1/4 or 1/8 scale (in
    the DCT domain) as long as both sides stay at least `draft_size`: for a later resize of the shorter side to
    `draft_size` it skips most of the decoding of large photos (`benchmarks/bench_decode.py` measures the speed and
    the PSNR against the full decode). Other formats decode in full. Remote paths go through `datasets`.
    """
    return _decode(value, draft_size)[0]


def _decode(value: dict | str, draft_size: int | None) -> tuple[Image.Image, tuple[float, float] | None]:
    """[`decode_image`] and, for a reduced-scale decode, the full image's size in the decoded image's pixels."""
    if isinstance(value, str):
        value = {"path": value, "bytes": None}
    data, path = value.get("bytes"), value.get("path")
    if data is None and not (path and os.path.exists(path)):
        return ImageFeature().decode_example(value), None  # remote files (and the error for a missing one)
    image = Image.open(io.BytesIO(data) if data is not None else path)
    extent = None
    if draft_size is not None and image.format == "JPEG":
        drafted = image.draft("RGB", (draft_size, draft_size))
        if drafted is not None and image.size != tuple(drafted[1][2:]):
            extent = drafted[1][2:]
    image.load()
    orientation = image.getexif().get(Image.ExifTags.Base.Orientation)
    if orientation is not None:
        image = ImageOps.exif_transpose(image)
        if extent is not None and orientation in (5, 6, 7, 8):  # transposed: width and height swap
            extent = extent[::-1]
    return image, extent


def _to_square_uint8(image: Image.Image, size: int, extent: tuple[float, float] | None = None) -> np.ndarray:
    """RGB, shorter side resized to `size` (bicubic), center-cropped: `[3, size, size]` uint8."""
    return np.asarray(resize_center_crop(to_rgb(image), size, extent=extent), dtype=np.uint8).transpose(2, 0, 1)


class ImageCollator:
    """Decode a list of examples into `{"pixel_values": uint8 [B, 3, size, size]}`, plus `"sample_index"` [B] when
    `index_column` is given and one integer tensor [B] per entry of `int_columns` (`{batch key: column}`, e.g.
    `{"labels": "label"}`).

    Images are only resized and center-cropped here (on the data-loader workers); augmentation and normalization run
    batched on the training device in the trainer. Undecoded JPEGs (`datasets.Image(decode=False)`, how the trainers
    prepare datasets) are decoded at reduced scale when that still gives at least `size` pixels on both sides
    (`jpeg_draft`, see [`decode_image`]); already decoded images are used as they are.
    """

    def __init__(
        self,
        size: int,
        image_column: str = "image",
        index_column: str | None = None,
        int_columns: dict[str, str] | None = None,
        jpeg_draft: bool = True,
    ):
        self.size = size
        self.jpeg_draft = jpeg_draft
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
            extent = None
            if isinstance(image, (dict, str)):
                image, extent = _decode(image, self.size if self.jpeg_draft else None)
            return _to_square_uint8(image, self.size, extent)
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
