"""UNIC training-step benchmark: images/s of hf_distill's step against the authors' step, how close each is to the
machine's peak, and where the time goes.

    python -m benchmarks.bench_unic_step                  # CPU: ~6-10 min on 2 cores; GPU when one is present
    python -m benchmarks.bench_unic_step --quick          # one small configuration, ~1 min (also on CUDA)
    python -m benchmarks.bench_unic_step --compile        # adds torch.compile arms (and their compile time)
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.bench_unic_step
                                                          # what an AVX2-only CPU would do

For every model size and K teachers (same size as the student, random weights: speed does not depend on them) it
times, in the same process, on the same batches, ALTERNATING the arms step by step (medians over the timed rounds, so
that a machine shared with other work slows every arm alike):

- `reference`: the authors' step (`benchmarks/reference_unic.py`): their head widths (`--reference_heads authors`:
  hidden 768, 3072 for the last block, whatever the student width, as in their released code; or hf_distill's d and
  4d), teachers under `no_grad` and the student under the authors' mixed precision (fp16 autocast on GPU, run here in
  bf16; none on CPU, where their `torch.cuda.amp.autocast` is inactive), one MLP call per block per teacher,
  Python-loop teacher dropping with a host sync per decision, `torch.optim.AdamW` with its default (foreach) kernel;
- `hf_distill`: the library's step with its defaults: heads d / 4d, teachers in inference mode in bf16 and the student
  under bf16 autocast where the device runs bf16 natively (`--dtype auto`, `hf_distill.precision`; float32 elsewhere),
  vectorized dropping, fused AdamW (the default optimizer of the UNIC / UDON / KD configs);
- at the largest K only: `hf_distill fp32` (same, all float32: the precision of the reference on CPU),
  `int8 teachers` (`teacher_quantization="int8"`, CPU only), `cached teachers` (the student-only step reading a
  `TeacherOutputCache`, as `--teacher_cache` trains) and with `--compile` `torch.compile` of the student and teachers.

Reported for every arm: images/s, the FLOPs of one step (counted with `torch.utils.flop_counter`, attention
included, `benchmarks/flops.py`) and the fraction of the machine's measured matmul peak they reach (fp32, and bf16
where native); a second, synchronized pass splits a step into teacher forward, student forward + backward, heads,
loss and optimizer. Also: teacher forward alone (fp32 / bf16 / int8) on real ViT-S / ViT-B shapes, the optimizer
step (for-loop / foreach / fused AdamW) and the heads (grouped matmuls / per-teacher calls).

Writes `{output_dir}/unic_step_{device}.json` and `.md` (device: `cuda`, or `cpu-avx512` / `cpu-avx2` / ... after
`torch.backends.cpu.get_cpu_capability()`, `_quick` appended with `--quick`) and prints the tables.
"""

import argparse
import copy
import ctypes
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

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
from hf_distill.models.teacher_quantization import quantize_teacher
from hf_distill.precision import native_bf16, resolve_dtype
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.unic_trainer import standardize_targets

from .flops import count_flops, matmul_peak
from .reference_unic import reference_distillation_loss, reference_heads, reference_teacher_outputs

SIZES = {
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-micro": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),  # tests
}
# hidden widths of the authors' ladder heads (naver/unic `LP`: hidden_dim=768, last_hidden_dim=3072 by default)
AUTHORS_HEAD_WIDTHS = (768, 3072)
PARTS = ("teacher_forward", "student_forward_backward", "heads", "loss", "optimizer")
DROP_PROB = 0.5


@dataclass
class Arm:
    """One way of running the UNIC step. `teachers`: `"fp32"`, `"bf16"`, `"int8"` or `"cache"`."""

    name: str
    teachers: str
    autocast_dtype: torch.dtype | None
    heads: str  # "authors" or "hf_distill"
    optimizer: str  # "foreach" or "fused"
    reference_code: bool = False
    compile: bool = False
    # filled by build()
    teacher_modules: list = field(default_factory=list)
    student: UnicStudentModel | None = None
    optim: torch.optim.Optimizer | None = None
    cache: TeacherOutputCache | None = None
    compile_s: float | None = None

    def describe(self) -> str:
        widths = "768/3072" if self.heads == "authors" else "d/4d"
        precision = "student " + (str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32")
        teachers = "cached teacher outputs" if self.teachers == "cache" else f"{self.teachers} teachers"
        code = "authors' code" if self.reference_code else "hf_distill"
        extra = ", torch.compile" if self.compile else ""
        return f"{code}: {teachers}, {precision}, heads {widths}, {self.optimizer} AdamW{extra}"


class Clock:
    """Wall time of consecutive parts of a step; synchronizes the device at each lap only when `enabled`."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.parts = device, enabled, {}
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if not self.enabled:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def step(arm: Arm, pixels, mean, std, generator, step_index, total_steps, clock, rows=None):
    """One optimizer step. `rows`: dataset rows of the batch (the cached-teachers arm reads their stored outputs).
    With an enabled `clock`, the backbone and the heads are split by detached features so that each part's backward
    is timed separately (same numbers, one extra graph boundary)."""
    student, split = arm.student, clock.enabled
    grid = student.grid_size(*pixels.shape[-2:])
    weight = ema_weight(step_index, total_steps)
    autocast = torch.autocast(pixels.device.type, arm.autocast_dtype) if arm.autocast_dtype else nullcontext()
    targets = None
    if arm.cache is not None:  # stored float16 outputs, read outside autocast
        views = torch.zeros(len(rows), dtype=torch.long)
        targets = [arm.cache.lookup(name, rows, views, pixels.device) for name in arm.cache.teacher_names]
    with autocast:
        if targets is not None:
            pass
        elif arm.reference_code:  # the authors run their teachers under no_grad inside their autocast
            targets = reference_teacher_outputs(arm.teacher_modules, pixels, mean, std, grid)
        else:
            targets = teacher_outputs(arm.teacher_modules, pixels, mean, std, grid)
        targets = standardize_targets(student, targets, weight)
        clock.lap("teacher_forward")
        _, cls_features, patch_features = student.ladder_features(pixels)
        blocks = cls_features + patch_features
        if split:
            leaves = [feature.detach().requires_grad_() for feature in blocks]
            cls_features, patch_features = leaves[: len(cls_features)], leaves[len(cls_features) :]
        clock.lap("student_forward_backward")
        if arm.reference_code:
            cls_predictions, patch_predictions = reference_heads(student, cls_features, patch_features)
        else:
            cls_predictions = student.project(student.cls_heads, cls_features)
            patch_predictions = student.project(student.patch_heads, patch_features)
        clock.lap("heads")
        loss_fn = reference_distillation_loss if arm.reference_code else distillation_loss
        loss, _, _ = loss_fn(cls_predictions, patch_predictions, targets, DROP_PROB, "image", generator)
        clock.lap("loss")
    loss.backward()
    clock.lap("heads")
    if split:
        torch.autograd.backward(blocks, [leaf.grad for leaf in leaves])
        clock.lap("student_forward_backward")
    arm.optim.step()
    arm.optim.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return loss


def make_arms(num_teachers: int, largest: bool, bf16: bool, device: torch.device, args) -> list[Arm]:
    reference_autocast = torch.bfloat16 if device.type == "cuda" else None
    own = torch.bfloat16 if bf16 else None
    arms = [
        Arm("reference", "fp32", reference_autocast, args.reference_heads, "foreach", reference_code=True),
        Arm("hf_distill", "bf16" if bf16 else "fp32", own, "hf_distill", "fused"),
    ]
    if largest:
        if bf16:
            arms.append(Arm("hf_distill fp32", "fp32", None, "hf_distill", "fused"))
        if device.type == "cpu":
            arms.append(Arm("int8 teachers", "int8", own, "hf_distill", "fused"))
        if not args.no_cache:
            arms.append(Arm("cached teachers", "cache", own, "hf_distill", "fused"))
        if args.compile:
            arms.append(
                Arm("hf_distill compiled", "bf16" if bf16 else "fp32", own, "hf_distill", "fused", compile=True)
            )
    if args.arms is not None:  # the reference and hf_distill arms always run
        arms = arms[:2] + [arm for arm in arms[2:] if arm.name in args.arms]
    return arms


def student_config(backbone: ViTConfig, specs: list[dict], heads: str) -> UnicStudentConfig:
    options = {}
    if heads == "authors":
        hidden, last = AUTHORS_HEAD_WIDTHS
        options = dict(
            ladder_hidden_ratio=hidden / backbone.hidden_size, head_hidden_ratio=last / backbone.hidden_size
        )
    return UnicStudentConfig(backbone_config=backbone, teachers=specs, **options)


def build(size: str, num_teachers: int, arms: list[Arm], args, device: torch.device, cache_dir: str) -> None:
    backbone = ViTConfig(**SIZES[size], image_size=args.image_size, patch_size=16)
    torch.manual_seed(0)
    teacher = freeze_teacher(TeacherModel(TeacherConfig(backbone_config=backbone)))
    teachers = [copy.deepcopy(teacher) for _ in range(num_teachers)]
    specs = [
        {"name": f"t{i}", "summary_dim": backbone.hidden_size, "patch_dim": backbone.hidden_size}
        for i in range(num_teachers)
    ]
    forms = {}
    for arm in arms:
        torch.manual_seed(1)  # the same backbone and (for equal widths) heads in every arm
        arm.student = UnicStudentModel(student_config(backbone, specs, arm.heads)).to(device).train()
        parameters = list(arm.student.parameters())
        fused = {"fused": True} if arm.optimizer == "fused" else {}
        arm.optim = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.03, **fused)
        if arm.teachers not in forms and arm.teachers != "cache":
            if arm.teachers == "int8":
                forms["int8"] = [quantize_teacher(t) for t in teachers]
            else:
                dtype = torch.bfloat16 if arm.teachers == "bf16" else torch.float32
                forms[arm.teachers] = [copy.deepcopy(t).to(device, dtype) for t in teachers]
        if arm.teachers == "cache":
            arm.cache = build_cache(cache_dir, arm.student, forms.get("bf16") or forms["fp32"], args, device)
        else:
            arm.teacher_modules = forms[arm.teachers]
        if arm.compile:  # in place, like the recipe's --torch_compile (the teachers are this arm's own copies)
            arm.teacher_modules = [copy.deepcopy(t) for t in arm.teacher_modules]
            for module in [arm.student.backbone, *arm.student.cls_heads.values(), *arm.student.patch_heads.values()]:
                module.compile()
            for teacher in arm.teacher_modules:
                teacher.compile()


def build_cache(directory: str, student, teachers, args, device) -> TeacherOutputCache:
    """A teacher-output cache (one view per image) over `batch_size * rounds` random images."""
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for _ in range(args.batch_size * args.steps)
    ]
    return TeacherOutputCache.build(
        directory,
        list(zip(student.config.teacher_names, teachers)),
        Dataset.from_dict({"image": images}),
        image_column="image",
        image_size=size,
        load_size=size,
        student_mean=student.config.image_mean,
        student_std=student.config.image_std,
        grid_size=student.grid_size(size, size),
        num_views=1,
        batch_size=args.batch_size,
        device=device,
    )


def measure(arms: list[Arm], batches, mean, std, device, warmup: int, peaks: dict) -> dict:
    """Warm every arm up, then time one step of each arm per round (arms rotated each round); medians."""
    generators = {arm.name: torch.Generator(device=device).manual_seed(0) for arm in arms}
    rounds, total = len(batches), warmup + 2 * len(batches) + 1
    rows = [torch.arange(i * len(batches[0]), (i + 1) * len(batches[0])) for i in range(rounds)]
    for arm in arms:
        start = time.perf_counter()
        for index in range(warmup):
            step(
                arm,
                batches[index % rounds],
                mean,
                std,
                generators[arm.name],
                index,
                total,
                Clock(device, False),
                rows[0],
            )
        synchronize(device)
        if arm.compile:  # compile time: the warm-up minus as many compiled steps (timed below)
            arm.compile_s = time.perf_counter() - start
    times = {arm.name: [] for arm in arms}
    memory = {arm.name: 0.0 for arm in arms}
    for index in range(rounds):
        order = arms[index % len(arms) :] + arms[: index % len(arms)]
        for arm in order:
            with PeakMemory(device) as peak:
                synchronize(device)
                start = time.perf_counter()
                loss = step(
                    arm,
                    batches[index],
                    mean,
                    std,
                    generators[arm.name],
                    warmup + index,
                    total,
                    Clock(device, False),
                    rows[index],
                )
                loss.item()  # one sync per timed step
                times[arm.name].append(time.perf_counter() - start)
            memory[arm.name] = max(memory[arm.name], peak.peak_mib)
    results = {}
    for arm in arms:
        clock = Clock(device, True)
        step(arm, batches[0], mean, std, generators[arm.name], warmup + rounds, total, clock, rows[0])
        breakdown = {part: 1000 * clock.parts.get(part, 0.0) for part in PARTS}
        flops, per_op = (
            (None, {})
            if arm.compile
            else count_flops(
                step, arm, batches[0], mean, std, generators[arm.name], total - 1, total, Clock(device, False), rows[0]
            )
        )
        step_s = statistics.median(times[arm.name])
        images = len(batches[0])
        result = {
            "config": arm.describe(),
            "images_per_s": images / step_s,
            "step_ms": 1000 * step_s,
            "step_ms_range": [1000 * min(times[arm.name]), 1000 * max(times[arm.name])],
            "peak_memory_mib": memory[arm.name],
            "breakdown_ms": breakdown,
            "share": {part: value / sum(breakdown.values()) for part, value in breakdown.items()},
            "gflop_per_step": None if flops is None else flops / 1e9,
            "gflop_per_step_by_op": {op: count / 1e9 for op, count in sorted(per_op.items())},
        }
        if flops is not None:
            result["fraction_of_peak"] = {dtype: flops / step_s / peak["median"] for dtype, peak in peaks.items()}
        if arm.compile_s is not None:
            result["compile_s"] = arm.compile_s - warmup * step_s
        # speed-up over the reference: median of the per-round ratios (both timed in the same round)
        ratios = [ref / own for ref, own in zip(times["reference"], times[arm.name])]
        result["speedup_vs_reference"] = statistics.median(ratios)
        result["speedup_range"] = [min(ratios), max(ratios)]
        results[arm.name] = result
    return results


def timed_alternating(functions: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn `repeats` times after one warm-up call each."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def teacher_forward_comparison(sizes, image_size: int, batch_size: int, repeats: int, device, bf16_native: bool):
    """Forward of one teacher in fp32 / bf16 (where native) / int8 (CPU), alternated: median ms, and speed-ups over
    fp32 (medians of the per-repeat ratios)."""
    rows = []
    mean = torch.tensor([0.485, 0.456, 0.406], device=device)
    std = torch.tensor([0.229, 0.224, 0.225], device=device)
    pixels = torch.randn(batch_size, 3, image_size, image_size, device=device)
    grid = (image_size // 16, image_size // 16)
    for size in sizes:
        torch.manual_seed(0)
        backbone = ViTConfig(**SIZES[size], image_size=image_size, patch_size=16)
        fp32 = freeze_teacher(TeacherModel(TeacherConfig(backbone_config=backbone))).to(device)
        forms = {"fp32": fp32}
        if bf16_native:
            forms["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
        if device.type == "cpu":
            forms["int8"] = quantize_teacher(fp32)
        functions = {
            name: (lambda t=teacher: teacher_outputs([t], pixels, mean, std, grid)) for name, teacher in forms.items()
        }
        times = timed_alternating(functions, repeats, device)
        row = {"size": size, "image_size": image_size, "batch_size": batch_size}
        for name in forms:
            row[f"{name}_ms"] = 1000 * statistics.median(times[name])
            row[f"{name}_speedup"] = statistics.median([a / b for a, b in zip(times["fp32"], times[name])])
        rows.append(row)
        print(f"teacher forward {size}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_ms")))
    return rows


def optimizer_comparison(student: torch.nn.Module, repeats: int, device) -> dict:
    """AdamW step on the student's parameters (random gradients): for-loop, foreach (torch's default) and fused."""
    kinds = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    functions = {}
    for name, options in kinds.items():
        parameters = [torch.nn.Parameter(p.detach().clone()) for p in student.parameters()]
        for parameter in parameters:
            parameter.grad = torch.randn_like(parameter)
        optimizer = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.03, **options)
        functions[name] = optimizer.step
    timings = timed_alternating(functions, repeats, device)
    return {"parameters_m": sum(p.numel() for p in student.parameters()) / 1e6} | {
        f"{name}_ms": 1000 * statistics.median(values) for name, values in timings.items()
    }


def heads_comparison(student, pixels, repeats: int) -> dict:
    """Forward + backward of all heads (CLS and patch) on fixed features: grouped matmuls vs one call per block and
    teacher."""
    with torch.no_grad():
        _, cls_features, patch_features = student.ladder_features(pixels)
    cls_features = [feature.requires_grad_() for feature in cls_features]
    patch_features = [feature.requires_grad_() for feature in patch_features]

    def run(grouped):
        student.config.grouped_heads = grouped
        outputs = student.project(student.cls_heads, cls_features) + student.project(
            student.patch_heads, patch_features
        )
        sum(output.float().square().mean() for output in outputs).backward()

    timings = timed_alternating({"grouped": lambda: run(True), "plain": lambda: run(False)}, repeats, pixels.device)
    student.config.grouped_heads = None
    student.zero_grad(set_to_none=True)
    return {f"{name}_ms": 1000 * statistics.median(values) for name, values in timings.items()}


def cpu_capability(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()


def format_tables(report: dict) -> str:
    peaks = report["peak_gflops"]
    lines = [
        f"Device: {report['device']}, torch {report['torch']}, CPU capability {report['cpu_capability']}, "
        f"threads {report['threads']}; {report['command']}",
        "Measured matmul peak ("
        + ", ".join(f"{d} {p['median']:.0f} GFLOP/s (range {p['min']:.0f}-{p['max']:.0f})" for d, p in peaks.items())
        + f", {next(iter(peaks.values()))['size']}^3).",
    ]
    if report["results"]:
        lines[-1] += (
            f" Reference heads: {report['reference_heads']}. Batch {report['settings']['batch_size']}, "
            f"{report['settings']['image_size']} px, patch 16, p = {DROP_PROB}, {report['settings']['steps']} "
            "alternated rounds (medians)."
        )
        lines += [
            "",
            "| model | K | arm | configuration | img/s | speed-up vs reference (range) | GFLOP/step | "
            + " | ".join(f"% of {d} peak" for d in peaks)
            + " | peak MiB | teacher fwd | student fwd+bwd | heads | loss | optimizer |",
            "|---|---:|---|---|---:|---:|---:|" + "---:|" * len(peaks) + "---:|---:|---:|---:|---:|---:|",
        ]
    for row in report["results"]:
        for name, arm in row["arms"].items():
            share = arm["share"]
            gflop = "-" if arm["gflop_per_step"] is None else f"{arm['gflop_per_step']:.1f}"
            fractions = [
                f"{100 * arm['fraction_of_peak'][d]:.0f}%" if "fraction_of_peak" in arm else "-" for d in peaks
            ]
            low, high = arm["speedup_range"]
            lines.append(
                f"| {row['size']} | {row['num_teachers']} | {name} | {arm['config']} | {arm['images_per_s']:.1f} | "
                f"{arm['speedup_vs_reference']:.2f}x ({low:.2f}-{high:.2f}) | {gflop} | "
                + " | ".join(fractions)
                + f" | {arm['peak_memory_mib']:.0f} | "
                + " | ".join(f"{100 * share[part]:.0f}%" for part in PARTS)
                + " |"
            )
    compiled = [(row, arm) for row in report["results"] for name, arm in row["arms"].items() if "compile_s" in arm]
    if compiled:
        lines += ["", "| model | K | torch.compile: compile time s (warm-up minus steps) |", "|---|---:|---:|"]
        lines += [f"| {row['size']} | {row['num_teachers']} | {arm['compile_s']:.0f} |" for row, arm in compiled]
    if report["teacher_forward"]:
        forms = [name for name in ("fp32", "bf16", "int8") if f"{name}_ms" in report["teacher_forward"][0]]
        lines += [
            "",
            "| teacher | px | batch | "
            + " | ".join(f"{f} ms" for f in forms)
            + " | "
            + " | ".join(f"{f} speed-up" for f in forms[1:])
            + " |",
            "|---|---:|---:|" + "---:|" * (2 * len(forms) - 1),
        ]
        for row in report["teacher_forward"]:
            lines.append(
                f"| {row['size']} | {row['image_size']} | {row['batch_size']} | "
                + " | ".join(f"{row[f + '_ms']:.0f}" for f in forms)
                + " | "
                + " | ".join(f"{row[f + '_speedup']:.2f}x" for f in forms[1:])
                + " |"
            )
    if report["optimizer"]:
        lines += [
            "",
            "| model | K | student params (M) | AdamW for-loop ms | foreach (torch default) ms | fused ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in report["optimizer"]:
            lines.append(
                f"| {row['size']} | {row['num_teachers']} | {row['parameters_m']:.1f} | {row['for_loop_ms']:.0f} | "
                f"{row['foreach_ms']:.0f} | {row['fused_ms']:.0f} |"
            )
    if report["heads"]:
        lines += [
            "",
            "| model | K | heads fwd+bwd, grouped ms | heads fwd+bwd, per-teacher calls ms |",
            "|---|---:|---:|---:|",
        ]
        for row in report["heads"]:
            lines.append(
                f"| {row['size']} | {row['num_teachers']} | {row['grouped_ms']:.0f} | {row['plain_ms']:.0f} |"
            )
    return "\n".join(lines)


def parse_args(argv, cuda: bool):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One small configuration (K=4), fewer rounds: ~1 min.")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--teachers", nargs="+", type=int, default=None)
    parser.add_argument("--image_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Timed rounds (one step of every arm per round).")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument(
        "--reference_heads",
        default="authors",
        choices=["authors", "hf_distill"],
        help="Head widths of the reference arm: the authors' (hidden 768, 3072 for the last block) or hf_distill's "
        "(d, 4d).",
    )
    parser.add_argument("--no_cache", action="store_true", help="Skip the cached-teachers arm.")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        help="Extra arms to run at the largest K (default: all), e.g. 'int8 teachers'.",
    )
    parser.add_argument("--compile", action="store_true", help="Add a torch.compile arm (slow to compile on CPU).")
    parser.add_argument("--no_extras", action="store_true", help="Skip teacher-forward / optimizer / heads tables.")
    parser.add_argument(
        "--teacher_forward_only", action="store_true", help="Only the teacher-forward table (fp32 / bf16 / int8)."
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="hf_distill's teachers and student autocast: bfloat16, float32, or auto (bfloat16 where the device runs "
        "it natively).",
    )
    parser.add_argument("--peak_size", type=int, default=None, help="Side of the peak matmul (2048; 8192 on GPU).")
    parser.add_argument("--output_dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if cuda:
        defaults = dict(sizes=["vit-small", "vit-base"], teachers=[1, 2, 4], image_size=224, batch_size=128, steps=10)
        quick = dict(sizes=["vit-small"], teachers=[4], image_size=224, batch_size=64, steps=5)
        warmup = 3
    else:
        defaults = dict(sizes=["vit-tiny", "vit-small"], teachers=[2, 4], image_size=112, batch_size=32, steps=5)
        quick = dict(sizes=["vit-tiny"], teachers=[4], image_size=112, batch_size=16, steps=3)
        warmup = 1
    for key, value in (quick if args.quick else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.warmup = warmup if args.warmup is None else args.warmup
    return args


def main(argv: list[str] | None = None) -> dict:
    cuda = torch.cuda.is_available()
    args = parse_args(argv, cuda)
    device = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    device_name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    )
    bf16 = resolve_dtype(args.dtype, device, "benchmark (teachers and autocast)") == torch.bfloat16
    bf16_native = native_bf16(device)[0]
    capability = cpu_capability(device)
    print(f"UNIC step benchmark on {device_name}, torch {torch.__version__}, capability {capability}, bf16 {bf16}")
    peaks = {"fp32": matmul_peak(device, torch.float32, args.peak_size)}
    if bf16_native:
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, args.peak_size)
    peaks_gflops = {dtype: {k: (v / 1e9 if k != "size" else v) for k, v in p.items()} for dtype, p in peaks.items()}
    print("matmul peak GFLOP/s: " + ", ".join(f"{d} {p['median']:.0f}" for d, p in peaks_gflops.items()), flush=True)

    mean = torch.tensor([0.485, 0.456, 0.406], device=device)
    std = torch.tensor([0.229, 0.224, 0.225], device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator, device=device)
        for _ in range(args.steps)
    ]
    results, optimizers, heads = [], [], []
    for size in [] if args.teacher_forward_only else args.sizes:
        for num_teachers in args.teachers:
            largest = num_teachers == max(args.teachers)
            arms = make_arms(num_teachers, largest, bf16, device, args)
            with tempfile.TemporaryDirectory() as cache_dir:
                build(size, num_teachers, arms, args, device, cache_dir)
                measured = measure(arms, batches, mean, std, device, args.warmup, peaks)
            for name, arm in measured.items():
                print(
                    f"{size} K={num_teachers} {name}: {arm['images_per_s']:.1f} img/s, "
                    f"{arm['speedup_vs_reference']:.2f}x reference",
                    flush=True,
                )
            results.append({"size": size, "num_teachers": num_teachers, "arms": measured})
            if largest and not args.no_extras:
                student = arms[1].student
                optimizers.append(
                    {"size": size, "num_teachers": num_teachers} | optimizer_comparison(student, args.steps, device)
                )
                if not args.quick:
                    heads.append(
                        {"size": size, "num_teachers": num_teachers}
                        | heads_comparison(student, batches[0], args.steps)
                    )
            del arms
    teacher_forward = []
    if not args.no_extras:
        forward_sizes = ["vit-small"] if args.quick else ["vit-small", "vit-base"]
        forward_batch = 4 if args.quick and not cuda else (64 if cuda else 8)
        teacher_forward = teacher_forward_comparison(
            forward_sizes, 224, forward_batch, max(3, args.steps), device, bf16_native
        )
    report = {
        "device": device_name,
        "torch": torch.__version__,
        "cpu_capability": capability,
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks.bench_unic_step " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {
            key: os.environ[key]
            for key in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
            if key in os.environ
        },
        "bf16": bf16,
        "reference_heads": "authors (768, 3072 last)" if args.reference_heads == "authors" else "hf_distill (d, 4d)",
        "peak_gflops": peaks_gflops,
        "settings": {key: getattr(args, key) for key in ("image_size", "batch_size", "steps", "warmup", "quick")}
        | {"drop_prob": DROP_PROB},
        "results": results,
        "teacher_forward": teacher_forward,
        "optimizer": optimizers,
        "heads": heads,
    }
    table = format_tables(report)
    name = "cuda" if cuda else f"cpu-{capability.lower().replace(' ', '')}"
    suffix = ("_quick" if args.quick else "") + ("_teacher_forward" if args.teacher_forward_only else "")
    stem = os.path.join(args.output_dir, f"unic_step_{name}{suffix}")
    write_json_atomically(stem + ".json", report)
    write_text_atomically(stem + ".md", table + "\n")
    print(table)
    return report


if __name__ == "__main__":
    main()
