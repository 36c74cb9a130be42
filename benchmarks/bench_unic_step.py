"""UNIC training-step benchmark: throughput, peak memory and where the time goes, hf_distill vs a reference-style step.

    python -m benchmarks.bench_unic_step                      # CPU here; GPU when one is present
    python -m benchmarks.bench_unic_step --sizes vit-small vit-base --image_size 224 --batch_size 128

For every model size and K teachers (same size as the student, random weights: speed does not depend on them) it
times, in the same process and on the same batches:

- `hf_distill`: the library's step (teachers in inference mode, bf16 weights + autocast where the device runs bf16
  natively (`--dtype auto`, `hf_distill.precision`: CUDA with bf16, CPUs with AVX512-BF16 / AMX), grouped-matmul ladder
  heads, vectorized teacher dropping, no host sync);
- `reference`: the same math written like the authors' code (`benchmarks/reference_unic.py`: teachers under no_grad in
  fp32, one MLP call per block per teacher, Python-loop teacher dropping with a host sync per decision).

Full steps are timed without any synchronization inside the step. A second, instrumented pass splits a step into
teacher forward, student forward + backward, heads (forward + backward), loss and optimizer, synchronizing between
parts. Peak memory: on GPU `torch.cuda.max_memory_allocated`; on CPU the peak resident set size above the level before
the timed steps (freed heap memory handed back to the OS first), sampled every 2 ms. Finally, the step reading a teacher-output cache is timed against the
student-only step (fixed targets in memory, no teacher at all).

Writes `{output_dir}/unic_step_{device}.json` and `.md` (the table) and prints the table.
"""

import argparse
import copy
import ctypes
import os
import platform
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import psutil
import torch
from datasets import Dataset
from PIL import Image
from transformers import ViTConfig

from hf_distill.io_utils import write_json_atomically, write_text_atomically
from hf_distill.losses import distillation_loss
from hf_distill.models import TeacherConfig, TeacherModel, UnicStudentConfig, UnicStudentModel, freeze_teacher
from hf_distill.models.standardization import ema_weight
from hf_distill.models.teacher_loading import teacher_outputs
from hf_distill.precision import resolve_dtype
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.unic_trainer import standardize_targets

from .reference_unic import reference_distillation_loss, reference_heads, reference_teacher_outputs

SIZES = {
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
PARTS = ("teacher_forward", "student_forward_backward", "heads", "loss", "optimizer")
DROP_PROB = 0.5


@dataclass
class Implementation:
    name: str
    teachers: list
    student: UnicStudentModel
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None

    @property
    def is_reference(self) -> bool:
        return self.name == "reference"


class Clock:
    """Wall time of consecutive parts of a step; synchronizes the device at each lap only when `enabled`."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.parts = device, enabled, {}
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


def release_freed_memory() -> None:
    """Give memory that the allocator keeps after `free` back to the OS (glibc `malloc_trim`; no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory (MiB) inside the block, above the level at its start: CUDA allocator stats or sampled CPU RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            release_freed_memory()  # otherwise memory freed by earlier steps is reused invisibly to RSS
            self.base = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            peak = self.peak
        self.peak_mib = (peak - self.base) / 2**20


def step(impl: Implementation, pixels, mean, std, generator, step_index, total_steps, clock, targets=None):
    """One optimizer step. `targets`: precomputed `(summary, patch)` per teacher replacing the teachers (cache / no
    teachers). With an enabled `clock`, the backbone and the heads are split by detached features so that each part's
    backward is timed separately (same numbers, one extra graph boundary)."""
    student, split = impl.student, clock.enabled
    grid = student.grid_size(*pixels.shape[-2:])
    weight = ema_weight(step_index, total_steps)
    autocast = torch.autocast(pixels.device.type, impl.autocast_dtype) if impl.autocast_dtype else nullcontext()
    with autocast:
        if targets is None and impl.is_reference:  # fp32 teachers, outside autocast
            with torch.autocast(pixels.device.type, enabled=False):
                targets = reference_teacher_outputs(impl.teachers, pixels, mean, std, grid)
        elif targets is None:
            targets = teacher_outputs(impl.teachers, pixels, mean, std, grid)
        targets = standardize_targets(student, targets, weight)
        clock.lap("teacher_forward")
        _, cls_features, patch_features = student.ladder_features(pixels)
        blocks = cls_features + patch_features
        if split:
            leaves = [feature.detach().requires_grad_() for feature in blocks]
            cls_features, patch_features = leaves[: len(cls_features)], leaves[len(cls_features) :]
        clock.lap("student_forward_backward")
        if impl.is_reference:
            cls_predictions, patch_predictions = reference_heads(student, cls_features, patch_features)
        else:
            cls_predictions = student.project(student.cls_heads, cls_features)
            patch_predictions = student.project(student.patch_heads, patch_features)
        clock.lap("heads")
        loss_fn = reference_distillation_loss if impl.is_reference else distillation_loss
        loss, _, _ = loss_fn(cls_predictions, patch_predictions, targets, DROP_PROB, "image", generator)
        clock.lap("loss")
    loss.backward()
    clock.lap("heads")
    if split:
        torch.autograd.backward(blocks, [leaf.grad for leaf in leaves])
        clock.lap("student_forward_backward")
    impl.optimizer.step()
    impl.optimizer.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return loss


def build(size: str, num_teachers: int, image_size: int, device: torch.device, bf16: bool) -> list[Implementation]:
    backbone = ViTConfig(**SIZES[size], image_size=image_size, patch_size=16)
    torch.manual_seed(0)
    teachers = [freeze_teacher(TeacherModel(TeacherConfig(backbone_config=backbone))).to(device)]
    teachers += [copy.deepcopy(teachers[0]) for _ in range(num_teachers - 1)]
    specs = [
        {"name": f"t{i}", "summary_dim": backbone.hidden_size, "patch_dim": backbone.hidden_size}
        for i in range(num_teachers)
    ]
    student = UnicStudentModel(UnicStudentConfig(backbone_config=backbone, teachers=specs)).to(device)
    implementations = []
    for name in ("hf_distill", "reference"):
        own_student = copy.deepcopy(student)  # hf_distill: library default heads (grouped on GPU); reference: plain
        # with bf16 both students train under bf16 autocast; only hf_distill keeps its teachers in bf16
        own_teachers = (
            [copy.deepcopy(t).to(torch.bfloat16) for t in teachers] if bf16 and name == "hf_distill" else teachers
        )
        optimizer = torch.optim.AdamW(own_student.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.03)
        implementations.append(
            Implementation(name, own_teachers, own_student.train(), optimizer, torch.bfloat16 if bf16 else None)
        )
    return implementations


def measure(impl, batches, mean, std, device, warmup: int, generator_seed: int = 0) -> dict:
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    total = warmup + len(batches)
    for index in range(warmup):
        step(impl, batches[index % len(batches)], mean, std, generator, index, total, Clock(device, False))
    off = Clock(device, False)
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for index, pixels in enumerate(batches):
            loss = step(impl, pixels, mean, std, generator, warmup + index, total, off)
        loss.item()  # one sync at the end of the timed steps
        elapsed = time.perf_counter() - start
    clock = Clock(device, True)
    for index, pixels in enumerate(batches):
        step(impl, pixels, mean, std, generator, total + index, total, clock)
    breakdown = {part: 1000 * clock.parts.get(part, 0.0) / len(batches) for part in PARTS}
    images = sum(pixels.shape[0] for pixels in batches)
    return {
        "images_per_s": images / elapsed,
        "step_ms": 1000 * elapsed / len(batches),
        "peak_memory_mib": memory.peak_mib,
        "breakdown_ms": breakdown,
        "share": {part: value / sum(breakdown.values()) for part, value in breakdown.items()},
    }


def cache_comparison(impl, batch_size, image_size, num_steps, mean, std, device, warmup) -> dict:
    """Step time reading a teacher-output cache vs the student-only step (fixed targets, no teachers)."""
    rng = np.random.default_rng(0)
    num_images = batch_size * num_steps
    images = [
        Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(num_images)
    ]
    dataset = Dataset.from_dict({"image": images})
    student = impl.student
    grid = student.grid_size(image_size, image_size)
    with tempfile.TemporaryDirectory() as directory:
        cache = TeacherOutputCache.build(
            directory,
            list(zip(student.config.teacher_names, impl.teachers)),
            dataset,
            image_column="image",
            image_size=image_size,
            load_size=image_size,
            student_mean=student.config.image_mean,
            student_std=student.config.image_std,
            grid_size=grid,
            num_views=1,
            batch_size=batch_size,
            device=device,
        )
        pixels = torch.randn(batch_size, 3, image_size, image_size, device=device)
        views = torch.zeros(batch_size, dtype=torch.long)
        batches = [torch.arange(i * batch_size, (i + 1) * batch_size) for i in range(num_steps)]
        generator = torch.Generator(device=device).manual_seed(0)
        fixed = [
            (s.clone(), p.clone())
            for s, p in (cache.lookup(n, batches[0], views, device) for n in cache.teacher_names)
        ]

        def run(targets_for) -> float:
            for index in range(warmup):
                step(impl, pixels, mean, std, generator, index, 1, Clock(device, False), targets_for(batches[0]))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            for index, rows in enumerate(batches):
                loss = step(impl, pixels, mean, std, generator, index, 1, Clock(device, False), targets_for(rows))
            loss.item()
            return 1000 * (time.perf_counter() - start) / num_steps

        cached = run(lambda rows: [cache.lookup(name, rows, views, device) for name in cache.teacher_names])
        student_only = run(lambda rows: fixed)
    return {"cache_step_ms": cached, "student_only_step_ms": student_only}


def heads_comparison(student, pixels, steps: int, warmup: int) -> dict:
    """Forward + backward of all heads (CLS and patch) on fixed features: grouped matmuls vs one call per block and
    teacher."""
    device = pixels.device
    with torch.no_grad():
        _, cls_features, patch_features = student.ladder_features(pixels)
    cls_features = [feature.requires_grad_() for feature in cls_features]
    patch_features = [feature.requires_grad_() for feature in patch_features]
    timings = {}
    for grouped in (True, False):
        student.config.grouped_heads = grouped

        def run():
            outputs = student.project(student.cls_heads, cls_features) + student.project(
                student.patch_heads, patch_features
            )
            sum(output.float().square().mean() for output in outputs).backward()

        for _ in range(warmup):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings["grouped_ms" if grouped else "plain_ms"] = 1000 * (time.perf_counter() - start) / steps
    student.config.grouped_heads = None
    student.zero_grad(set_to_none=True)
    return timings


def format_table(results: list[dict], caches: list[dict], heads: list[dict]) -> str:
    lines = [
        "| model | K | hf_distill img/s | reference img/s | speed-up | hf_distill peak MiB | reference peak MiB "
        "| teacher fwd | student fwd+bwd | heads | loss | optimizer | teacher share (FLOPs K/(K+3)) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        fast, ref = row["hf_distill"], row["reference"]
        share = fast["share"]
        k = row["num_teachers"]
        lines.append(
            f"| {row['size']} | {k} | {fast['images_per_s']:.1f} | {ref['images_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {fast['peak_memory_mib']:.0f} | {ref['peak_memory_mib']:.0f} | "
            + " | ".join(f"{100 * share[part]:.0f}%" for part in PARTS)
            + f" | {100 * k / (k + 3):.0f}% |"
        )
    if caches:
        lines += [
            "",
            "| model | K | online step ms | cached-teacher step ms | student-only step ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in caches:
            lines.append(
                f"| {row['size']} | {row['num_teachers']} | {row['online_step_ms']:.0f} | {row['cache_step_ms']:.0f} | "
                f"{row['student_only_step_ms']:.0f} |"
            )
    if heads:
        lines += [
            "",
            "| model | K | heads fwd+bwd, grouped ms | heads fwd+bwd, per-teacher calls ms |",
            "|---|---:|---:|---:|",
        ]
        for row in heads:
            lines.append(
                f"| {row['size']} | {row['num_teachers']} | {row['grouped_ms']:.0f} | {row['plain_ms']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["vit-small", "vit-base"] if cuda else ["vit-tiny", "vit-small"],
        choices=list(SIZES),
    )
    parser.add_argument("--teachers", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--image_size", type=int, default=224 if cuda else 112)
    parser.add_argument("--batch_size", type=int, default=128 if cuda else 32)
    parser.add_argument("--steps", type=int, default=10 if cuda else 3, help="Timed steps per measurement.")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument("--no_cache", action="store_true", help="Skip the teacher-output cache comparison.")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="bfloat16: hf_distill's teachers in bf16 and both students under bf16 autocast; auto: bfloat16 where the "
        "device runs it natively, else float32.",
    )
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    device_name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    )
    bf16 = resolve_dtype(args.dtype, device, "benchmark (teachers and autocast)") == torch.bfloat16
    print(f"UNIC step benchmark on {device_name}, torch {torch.__version__}, bf16 {bf16}", flush=True)

    mean = torch.tensor([0.485, 0.456, 0.406], device=device)
    std = torch.tensor([0.229, 0.224, 0.225], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator, device=device)
        for _ in range(args.steps)
    ]
    results, caches, heads = [], [], []
    for size in args.sizes:
        for num_teachers in args.teachers:
            implementations = build(size, num_teachers, args.image_size, device, bf16=bf16)
            row = {"size": size, "num_teachers": num_teachers}
            for impl in implementations:
                row[impl.name] = measure(impl, batches, mean, std, device, args.warmup)
                print(f"{size} K={num_teachers} {impl.name}: {row[impl.name]['images_per_s']:.1f} img/s", flush=True)
            row["speedup"] = row["hf_distill"]["images_per_s"] / row["reference"]["images_per_s"]
            results.append(row)
            if num_teachers == max(args.teachers):
                timings = heads_comparison(implementations[0].student, batches[0], args.steps, args.warmup)
                heads.append({"size": size, "num_teachers": num_teachers, **timings})
            if not args.no_cache and num_teachers == max(args.teachers):
                cache = cache_comparison(
                    implementations[0], args.batch_size, args.image_size, args.steps, mean, std, device, args.warmup
                )
                caches.append(
                    {
                        "size": size,
                        "num_teachers": num_teachers,
                        "online_step_ms": row["hf_distill"]["step_ms"],
                        **cache,
                    }
                )
            del implementations
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "bf16": bf16,
        "settings": {key: getattr(args, key) for key in ("image_size", "batch_size", "steps", "warmup")}
        | {"drop_prob": DROP_PROB},
        "results": results,
        "cache": caches,
        "heads": heads,
    }
    table = format_table(results, caches, heads)
    stem = os.path.join(args.output_dir, f"unic_step_{device.type}")
    write_json_atomically(stem + ".json", report)
    write_text_atomically(stem + ".md", table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
