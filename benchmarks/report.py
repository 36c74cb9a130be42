"""Writing a benchmark's results: the same tail for every script in `benchmarks/`."""

import os
import sys
from collections.abc import Callable

from hf_distill.io_utils import write_json_atomically, write_text_atomically


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a run, for the report: `python -m benchmarks.<module> <arguments>`. `argv` is what
    the script's `main` received (`None`: the process's own arguments)."""
    return f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def write_report(
    stem: str,
    report: dict,
    table: str | None = None,
    plot: Callable[[str], None] | None = None,
) -> None:
    """Write a benchmark's results next to each other, each file atomically: `{stem}.json` (the report), `{stem}.md`
    (the markdown `table`, printed too) and `{stem}.png` (`plot(path)` writes the figure). The folder is created."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    write_json_atomically(stem + ".json", report)
    if table is not None:
        write_text_atomically(stem + ".md", table.rstrip("\n") + "\n")
        print(table)
    if plot is not None:
        plot(stem + ".png")


def seed_comparison(better: str, worse: str, mean_gap: float, spread: float, seeds: list, diffs: list) -> dict:
    """The verdict of `better` vs `worse` over paired seeds: a difference is real when the mean +- std intervals do
    not overlap (`|mean_gap| > spread`, the sum of both stds) and every seed's difference `diffs` has the same sign."""
    separated = abs(mean_gap) > spread
    consistent = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if separated and consistent:
        verdict = f"{better} {'>' if mean_gap > 0 else '<'} {worse} beyond the seed-to-seed spread"
    else:
        verdict = f"{better} vs {worse}: no difference beyond the seed-to-seed spread"
    return {
        "mean_difference": mean_gap,
        "per_seed_difference": {str(seed): diff for seed, diff in zip(seeds, diffs)},
        "intervals_separated": bool(separated),
        "same_sign_every_seed": bool(consistent),
        "verdict": verdict,
    }
