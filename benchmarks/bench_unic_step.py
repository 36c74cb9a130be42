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

The pieces: `unic_arms.py` (the arms, how they are built, one step), `unic_step_measurements.py` (the alternated
timings and the extra tables), `timing.py` (clocks, peak memory), `flops.py` (FLOP counting, matmul peak),
`unic_step_tables.py` (the markdown tables) and `report.py` (the files written).
"""

import argparse
import os
import platform
import tempfile

import torch

from hf_distill.precision import native_bf16, resolve_dtype

from .flops import matmul_peak
from .report import command_line, write_report
from .unic_arms import DROP_PROB, PARTS, SIZES, build, make_arms
from .unic_step_measurements import heads_comparison, measure, optimizer_comparison, teacher_forward_comparison
from .unic_step_tables import format_tables

__all__ = ["PARTS", "main"]


def cpu_capability(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()


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
        "command": command_line("bench_unic_step", argv),
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
    write_report(stem, report, table)
    return report


if __name__ == "__main__":
    main()
