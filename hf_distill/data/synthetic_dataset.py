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


def load_synthetic_dataset(source: str, allow_incomplete: bool = False) -> Dataset:
    """The synthetic images of a synthesis folder (or of a Hub dataset pushed from one) as one `Dataset`.

    Columns: `image`, `index`, `source_indices`, `source_labels`, `weights`, `seed`, `num_inference_steps`,
    `guidance_scale`, `pipeline`, `source_dataset`. A folder whose set is not complete (an interrupted run) raises,
    saying how to complete it, unless `allow_incomplete`.
    """
    if not os.path.isdir(source):
        return load_dataset(source, split="train")
    if not is_synthesis_folder(source):
        raise ValueError(
            f"{source} is not a synthesis folder (no {CONFIG_FILE}): write one with recipes/synthesize.py."
        )
    missing = missing_shards(source)
    if missing and not allow_incomplete:
        raise ValueError(
            f"{source} is incomplete: {len(missing)} shard(s) missing, e.g. indices {missing[0][0]}-{missing[0][1] - 1}. "
            "Run the same recipes/synthesize.py command again to complete it."
        )
    files = sorted(
        os.path.join(source, DATA_DIR, name)
        for name in os.listdir(os.path.join(source, DATA_DIR))
        if name.startswith("shard-") and name.endswith(".parquet")
    )
    if not files:
        raise ValueError(f"{source} holds no synthetic image yet.")
    return load_dataset("parquet", data_files=files, split="train")
