"""What the UNIC step benchmark measures: the arms' steps alternated round by round (images/s, peak memory, FLOPs and
fraction of peak, the per-part breakdown), and the extra tables: teacher forward (fp32 / bf16 / int8), the AdamW
step (for-loop / foreach / fused) and the heads (grouped matmuls / per-teacher calls)."""

import copy
import statistics
import time

import torch
from transformers import ViTConfig

from hf_distill.models import TeacherConfig, TeacherModel, freeze_teacher
from hf_distill.models.teacher_loading import teacher_outputs
from hf_distill.models.teacher_quantization import quantize_teacher

from .flops import count_flops
from .timing import Clock, PeakMemory, synchronize, timed_alternating
from .unic_arms import PARTS, SIZES, Arm, step


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
