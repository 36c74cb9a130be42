"""Reading the synthetic image sets written by `recipes/synthesize.py` (no diffusers needed).

A synthesis folder holds `synthesis_config.json` (the settings, among them `num_images` and `shard_size`) and
`data/shard-{start:08d}-{stop:08d}.parquet`, one file per block of consecutive indices, each written atomically.
"""

import json
import os

from datasets import Dataset, load_dataset

CONFIG_FILE = "synthesis_config.json"
DATA_DIR = "data"


def shard_name(start: int, stop: int) -> str:
    return f"shard-{start:08d}-{stop:08d}.parquet"


def expected_shards(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """`(start, stop)` of every shard of a set of `num_images` images."""
    return [(start, min(start + shard_size, num_images)) for start in range(0, num_images, shard_size)]


def is_synthesis_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_synthesis_config(path: str) -> dict:
    with open(os.path.join(path, CONFIG_FILE)) as handle:
        return json.load(handle)


def missing_shards(path: str) -> list[tuple[int, int]]:
    """The shards of the folder's set that are not written yet."""
    config = read_synthesis_config(path)
    return [
        (start, stop)
        for start, stop in expected_shards(config["num_images"], config["shard_size"])
        if not os.path.isfile(os.path.join(path, DATA_DIR, shard_name(start, stop)))
    ]


def has_parquet_data(path: str) -> bool:
    """Whether `path` is a folder with parquet files under `data/` (a synthesis folder or a local copy of a Hub set)."""
    data_dir = os.path.join(path, DATA_DIR)
    return os.path.isdir(data_dir) and any(name.endswith(".parquet") for name in os.listdir(data_dir))


def load_synthetic_dataset(source: str, allow_incomplete: bool = False) -> Dataset:
    """The synthetic images of a synthesis folder (or of a Hub dataset pushed from one) as one `Dataset`.

    Columns: `image`, `index`, `source_indices`, `source_labels`, `weights`, `seed`, `num_inference_steps`,
    `guidance_scale`, `pipeline`, `source_dataset`.

    Args:
        source: a folder written by `recipes/synthesize.py` (its `synthesis_config.json` says which shards make the
            complete set), a local folder of `data/*.parquet` files (e.g. a downloaded copy of a pushed set), or a Hub
            dataset id (its `train` split).
        allow_incomplete: read the shards written so far of an interrupted synthesis instead of raising.
    """
    if not os.path.isdir(source):
        try:
            return load_dataset(source, split="train")
        except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
            raise ValueError(
                f"Could not load the synthetic set {source!r}: it is not a local folder and not a dataset available "
                f"from the Hugging Face Hub or its cache (offline mode needs a cached copy). Original error: {error}"
            ) from error
    if not is_synthesis_folder(source):
        if has_parquet_data(source):
            return load_dataset(source, split="train")
        raise ValueError(
            f"{source} is not a synthesis folder (no {CONFIG_FILE} and no data/*.parquet): write one with "
            "recipes/synthesize.py."
        )
    config = read_synthesis_config(source)
    shards = expected_shards(config["num_images"], config["shard_size"])
    files = [os.path.join(source, DATA_DIR, shard_name(start, stop)) for start, stop in shards]
    missing = [shard for shard, path in zip(shards, files) if not os.path.isfile(path)]
    if missing and not allow_incomplete:
        raise ValueError(
            f"{source} is incomplete: {len(missing)} of {len(shards)} shard(s) missing, e.g. indices "
            f"{missing[0][0]}-{missing[0][1] - 1}. Run the same recipes/synthesize.py command again to complete it "
            "(or pass allow_incomplete=True to read what is there)."
        )
    files = [path for path in files if os.path.isfile(path)]
    if not files:
        raise ValueError(f"{source} holds no synthetic image yet.")
    return load_dataset("parquet", data_files=files, split="train")
