"""Data throughput of the streaming training path against the map-style one, on the same images.

    python -m benchmarks.bench_streaming                              # 1024 JPEG images, 0 and 2 workers
    python -m benchmarks.bench_streaming --num_images 4096 --workers 0 2 8

The same JPEG images (ImageNet-like 500 x 375, random smooth content, quality 90) are written three ways, and each is
read the way training reads it, with the same decode and resize (`ImageCollator`: decode, RGB, shorter side to
`load_size`, center crop; augmentations run later on the device and are not part of the data path):

- `map`: a `save_to_disk` dataset loaded with `load_image_dataset` and read by a `DataLoader` with a random sampler
  (the Trainer's map-style path);
- `stream-parquet` / `stream-tar`: parquet shards / WebDataset tar shards read by `load_streaming_dataset` and
  [`StreamingImageDataset`] (shuffle buffer 1000, positions tracked), the Trainer's `--streaming` path.

Each reader is timed within one pass over the images, from its first batch (worker start-up left out) to the last
full round of batches, in images/s: the steady state of a long epoch. Epoch ends are left out: a parquet stream
pauses 5 s per worker at the end of each epoch (`datasets` waits for its reader threads, apache/arrow#45214), nothing
at web scale, and a map-style loader restarts its workers. Writes `{output_dir}/streaming_{machine}.json` and `.md` and prints the table.
"""

import argparse
import io
import os
import platform
import tarfile
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from hf_distill.data.image_datasets import ImageCollator, load_image_dataset
from hf_distill.data.streaming import PositionCollator, StreamingImageDataset, load_streaming_dataset

from .report import write_report


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """`count` 500 x 375 JPEGs of smooth random content (upsampled noise: compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        small = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def write_sources(images: list[bytes], root: str, num_shards: int) -> dict[str, str]:
    """The images as a `save_to_disk` folder, parquet shards and tar shards under `root`."""
    column = [{"bytes": data, "path": None} for data in images]
    saved = os.path.join(root, "map")
    Dataset.from_dict({"image": column}).cast_column("image", ImageFeature()).save_to_disk(saved)
    parquet, tar_folder = os.path.join(root, "parquet"), os.path.join(root, "tar")
    os.makedirs(parquet)
    os.makedirs(tar_folder)
    for shard, rows in enumerate(np.array_split(np.arange(len(images)), num_shards)):
        part = Dataset.from_dict({"image": [column[i] for i in rows]}).cast_column("image", ImageFeature())
        part.to_parquet(os.path.join(parquet, f"train-{shard:05d}.parquet"))
        with tarfile.open(os.path.join(tar_folder, f"shard-{shard:05d}.tar"), "w") as tar:
            for i in rows:
                info = tarfile.TarInfo(f"{i:09d}.jpg")
                info.size = len(images[i])
                tar.addfile(info, io.BytesIO(images[i]))
    return {"map": saved, "stream-parquet": parquet, "stream-tar": tar_folder}


def loader(kind: str, path: str, batch_size: int, workers: int, load_size: int) -> DataLoader:
    if kind == "map":
        dataset = load_image_dataset(path)
        generator = torch.Generator().manual_seed(0)
        collate = ImageCollator(load_size)
        return DataLoader(
            dataset, batch_size, sampler=RandomSampler(dataset, generator=generator), collate_fn=collate,
            num_workers=workers,
        )  # fmt: skip
    column = "jpg" if kind == "stream-tar" else "image"
    stream = StreamingImageDataset(load_streaming_dataset(path, image_column=column), 0, 1000, 0, 1)
    stream.num_workers = workers
    collate = PositionCollator(ImageCollator(load_size, image_column=column))
    return DataLoader(stream, batch_size, collate_fn=collate, num_workers=workers)


def images_per_second(data: DataLoader, num_images: int) -> float:
    """Images per second over `num_images` images after the first batch."""
    batches = iter(data)
    next(batches)
    seen, start = 0, time.perf_counter()
    while seen < num_images:
        seen += next(batches)["pixel_values"].shape[0]
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--load_size", type=int, default=256, help="Decoded side (image_size 224 -> 256).")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--output_dir", default="benchmarks/results")
    parser.add_argument("--name", default=None, help="Suffix of the result files (default: cpu<cores>).")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # decoding is per image: one thread per loader process, as the Trainer's workers

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "num_images": args.num_images,
        "num_shards": args.num_shards,
        "batch_size": args.batch_size,
        "load_size": args.load_size,
        "source": "500 x 375 JPEG, quality 90",
        "images_per_second": {},
    }
    with tempfile.TemporaryDirectory() as root:
        sources = write_sources(make_jpegs(args.num_images), root, args.num_shards)
        for workers in args.workers:
            for kind, path in sources.items():
                data = loader(kind, path, args.batch_size, workers, args.load_size)
                timed = args.num_images - (max(workers, 1) + 1) * args.batch_size  # the last round left out
                rate = images_per_second(data, timed)
                results["images_per_second"][f"{kind}, {workers} workers"] = round(rate, 1)
                print(f"{kind:15s} {workers} workers: {rate:8.1f} images/s", flush=True)

    lines = [
        f"Data throughput ({results['machine']}; {args.num_images} {results['source']} images, decoded and "
        f"resized to {args.load_size} px, batch {args.batch_size})",
        "",
        "| reader | workers | images/s |",
        "|---|---|---|",
    ]
    for key, rate in results["images_per_second"].items():
        kind, workers = key.split(", ")
        lines.append(f"| {kind} | {workers.split()[0]} | {rate} |")
    name = args.name or f"cpu{os.cpu_count()}"
    write_report(os.path.join(args.output_dir, f"streaming_{name}"), results, "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
