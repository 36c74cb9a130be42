"""Training throughput from teacher-output WebDataset shards against the map-style teacher-output cache, same images.

    python -m benchmarks.bench_teacher_shards                         # 512 JPEG images, 2 data-loader workers
    python -m benchmarks.bench_teacher_shards --num_images 1024 --workers 0 2 --teacher_dim 768

The same JPEG images as `benchmarks/bench_streaming.py` (500 x 375, quality 90) are cached twice with the same teacher
and the same 2 fixed views: as a map-style [`TeacherOutputCache`] (the `save_to_disk` dataset, `--teacher_cache`) and
as [`TeacherOutputShards`] (tar shards holding each image with its outputs, `--streaming --teacher_cache`). A tiny UNIC
student (hidden 32, 2 blocks, /16 at 224 px) is then trained by [`UnicTrainer`] from each, and the images/s of its
training steps are timed after `--warmup` steps (data-loader start-up left out). The teacher is a strided convolution
with `--teacher_dim` channels (ViT-B's 768 by default: 196 patch tokens of 768 float16 per view, the size of real
outputs; its cost only matters for the build, which is not timed). Both paths decode and resize the JPEGs the same
way; the shards also carry the outputs through the stream (`datasets`' WebDataset reader parses the `.npy` files),
the map-style path looks them up in memory. Prints a table and writes `{output_dir}/teacher_shards_{machine}.json`.
"""

import argparse
import os
import platform
import tempfile
import time

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from torch import nn
from transformers import TrainerCallback, ViTConfig

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.streaming import StreamingImageDataset, load_streaming_dataset
from hf_distill.io_utils import write_json_atomically
from hf_distill.models import ModuleTeacher, teacher_spec
from hf_distill.trainers import UnicConfig, UnicTrainer
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.teacher_cache_shards import TeacherOutputShards

from .bench_streaming import make_jpegs

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class StepTimer(TrainerCallback):
    """Wall time from the end of step `warmup` to the end of training."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def images_per_second(cache, dataset, image_column, student, args, output_dir) -> float:
    config = UnicConfig(
        output_dir=output_dir, teacher_cache=cache, image_size=224, load_size=256,
        per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps, save_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=args.workers_now, logging_steps=10_000,
        disable_tqdm=True, teacher_drop_prob=0.0,
    )  # fmt: skip
    timer = StepTimer(args.warmup)
    trainer = UnicTrainer(
        model=student, args=config, train_dataset=dataset, image_column=image_column,
        callbacks=[timer],
    )  # fmt: skip
    trainer.train()
    return args.steps * args.batch_size / (timer.end - timer.start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=512)
    parser.add_argument("--samples_per_shard", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--teacher_dim", type=int, default=768)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    teacher = ModuleTeacher(nn.Conv2d(3, args.teacher_dim, 16, stride=16), MEAN, STD, patch_size=16, name="conv")
    backbone = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=16
    )
    student = UnicStudentModel(UnicStudentConfig(backbone_config=backbone, teachers=[teacher_spec("conv", teacher)]))
    options = dict(image_size=224, load_size=256, student_mean=MEAN, student_std=STD, grid_size=(14, 14))

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "num_images": args.num_images,
        "batch_size": args.batch_size,
        "teacher_dim": args.teacher_dim,
        "timed_steps": args.steps,
        "images_per_second": {},
    }
    with tempfile.TemporaryDirectory() as root:
        column = [{"bytes": data, "path": None} for data in make_jpegs(args.num_images)]
        saved = os.path.join(root, "images")
        Dataset.from_dict({"image": column}).cast_column("image", ImageFeature()).save_to_disk(saved)
        dataset = load_image_dataset(saved)
        start = time.perf_counter()
        TeacherOutputCache.build(os.path.join(root, "map"), [("conv", teacher)], dataset, "image", **options)
        results["map_build_s"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        TeacherOutputShards.build(
            os.path.join(root, "shards"), [("conv", teacher)], dataset, "image",
            samples_per_shard=args.samples_per_shard, **options,
        )  # fmt: skip
        results["shards_build_s"] = round(time.perf_counter() - start, 1)
        results["shards_mb"] = round(
            sum(os.path.getsize(p) for p in TeacherOutputShards(os.path.join(root, "shards")).files) / 2**20, 1
        )
        for workers in args.workers:
            args.workers_now = workers
            for kind in ("map", "shards"):
                data, column = dataset, "image"
                if kind == "shards":
                    column = TeacherOutputShards(os.path.join(root, "shards")).image_column
                    stream = load_streaming_dataset(os.path.join(root, "shards"), image_column=column)
                    data = StreamingImageDataset(stream, 0, 1000, 0, 1)
                rate = images_per_second(
                    os.path.join(root, kind), data, column, UnicStudentModel(student.config), args,
                    os.path.join(root, f"out-{kind}-{workers}"),
                )  # fmt: skip
                results["images_per_second"][f"{kind}, {workers} workers"] = round(rate, 1)
                print(f"{kind:7s} {workers} workers: {rate:7.1f} images/s", flush=True)
    print(results)
    os.makedirs(args.output_dir, exist_ok=True)
    write_json_atomically(os.path.join(args.output_dir, f"teacher_shards_cpu{os.cpu_count()}.json"), results)
    return results


if __name__ == "__main__":
    main()
