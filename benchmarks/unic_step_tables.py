"""The markdown tables of the UNIC step benchmark's report (`benchmarks/bench_unic_step.py`)."""

from .unic_arms import DROP_PROB, PARTS


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
