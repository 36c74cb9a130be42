"""`make ablations`: the UNIC paper's ablations re-run with one evaluation, each a row of one table.

Rows (`ROWS`; `only-<teacher>` is made for every teacher of the setting):

- `default`: the setting as it is (the demo: both teachers, ladder, teacher dropping, `unic` standardization, `image`
  loss normalization, teacher-output cache);
- `only-<teacher>`: a student distilled from that teacher alone (its own teacher-output cache);
- `no-ladder`, `no-teacher-drop`, `no-standardization`, `batch-normalization` (the UNIC code's loss normalization);
- `standardization-dune`, `standardization-phi-s` (PHI-S with a short warm-up, `phi_s_warmup_steps`);
- `online-teachers-fp32`: the teachers run online in float32 on UNIC's full augmentations, no teacher-output cache
  (does the cache keep the student's quality?);
- `teachers-fp32`, `teachers-int8`: the teacher-output cache built by float32 / int8 teachers (`default` uses the
  `auto` dtype: bfloat16 where the CPU runs it natively, float32 elsewhere); not in the demo preset's rows:
  `python -m demo.ablations --rows teachers-fp32 teachers-int8 online-teachers-fp32 --results_dir
  benchmarks/results/teacher_precision` (the runs of `default` and the online row are shared with `make ablations`).

Each (row, seed) is one `recipes/unic.py` run with the recipe's own options for the row, then `recipes/evaluate.py`
on the student (k-NN and linear probe of the setting's suite). The teacher-output caches (one per teacher subset) are
drawn once with the setting's seed (`--teacher_cache_seed`) and shared by every training seed. A run's
`result.json` is written atomically when its evaluation is done: a killed run restarts with the same command, skips
the finished runs and resumes the unfinished one from its checkpoint.

Seeds: every row runs `seeds`; a row whose difference to `default` is unclear (between 1 and 2 times the larger
seed-to-seed std on some metric) gets more seeds, with `default`, up to `max_seeds`. Verdict of a difference:
`real` when |row mean - default mean| > 2 x max(std row, std default) (sample std over seeds, both rows with >= 2
seeds), `unclear` when it exceeds 1 x, `noise` otherwise.

Written to `--results_dir`: `ablations.json` (per row: options, per-seed values, mean, std, steps, wall time, the
differences and verdicts), `ablations.md` (the table), `ablation_bars.png` and `training_curves.png` (per-teacher
losses and kept fractions over the steps of the `plot_rows`).

    python -m demo.ablations [--preset recipes/configs/ablations_demo.yaml] [--seeds 0 1] [--rows default no-ladder]
        [--max_steps 94] [--output_dir outputs/ablations] [--results_dir benchmarks/results/ablations]
        [-- EXTRA RECIPE OPTIONS FOR EVERY RUN, e.g. --max_train_samples 640]

The preset (YAML) chooses the setting: `setting: demo` prepares the data, teachers, student config and evaluation
suite exactly as `demo/run_demo.py` does (read from it, so the ablations follow the demo); `setting: custom` takes
them from the preset (`recipes/configs/ablations_gpu_example.yaml`: real scale on GPUs).
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

import yaml

from benchmarks.recipes import load_recipe
from hf_distill.io_utils import atomic_path, write_json_atomically, write_text_atomically
from hf_distill.models.teacher_loading import unique_teacher_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRESET = os.path.join(ROOT, "recipes", "configs", "ablations_demo.yaml")
ONLY = "only-"
ONLINE = "online-teachers-fp32"
# name -> (what the row changes, recipe options); `only-<teacher>` and the online row are built in `row_plan`
ROWS = {
    "default": ("the setting as it is", []),
    "no-ladder": ("without the ladder of projectors", ["--use_ladder", "false"]),
    "no-teacher-drop": ("without teacher dropping", ["--teacher_drop_prob", "0"]),
    "no-standardization": ("without teacher feature standardization", ["--standardization", "none"]),
    "batch-normalization": ("'batch' loss normalization (UNIC code) instead of 'image'", ["--loss_normalization", "batch"]),
    "standardization-dune": ("DUNE standardization instead of UNIC's", ["--standardization", "dune"]),
    "standardization-phi-s": ("PHI-S standardization instead of UNIC's", ["--standardization", "phi-s"]),
    ONLINE: ("teachers online in float32 on full augmentations, no teacher-output cache", ["--teacher_dtype", "float32"]),
    "teachers-fp32": ("teachers in float32 (their own teacher-output cache)", ["--teacher_dtype", "float32"]),
    "teachers-int8": ("teachers in int8 (Linear layers, dynamic quantization; CPU; their own teacher-output cache)",
                      ["--teacher_quantization", "int8"]),
}  # fmt: skip
# rows whose teachers compute other outputs than `default`'s: each builds its own teacher-output cache
TEACHER_FORM_ROWS = ("teachers-fp32", "teachers-int8")
PER_TEACHER_OPTIONS = ("teacher_revisions", "teacher_summary", "teacher_grid_alignment", "teacher_image_size")
LAUNCHERS = {"accelerate": [sys.executable, "-m", "accelerate.commands.launch"], "python": [sys.executable]}


def verdict(diff: float, std_row: float | None, std_default: float | None) -> str:
    """`real` when |diff| > 2 x the larger std of the two rows, `unclear` when > 1 x, `noise` otherwise; `1 seed`
    when a row has no std (fewer than 2 seeds)."""
    if std_row is None or std_default is None:
        return "1 seed"
    spread = max(std_row, std_default)
    if abs(diff) > 2 * spread:
        return "real"
    return "unclear" if abs(diff) > spread else "noise"


def load_preset(path: str) -> dict:
    with open(path) as handle:
        preset = yaml.safe_load(handle) or {}
    known = {
        "setting", "base_config", "teachers", "student_options", "train_data", "eval_suite", "student_image_size",
        "teacher_cache", "launcher", "recipe_options", "max_steps", "seeds", "max_seeds", "rows", "plot_rows",
        "metrics", "phi_s_warmup_steps", "seconds_per_step", "seconds_per_run", "description",
    }  # fmt: skip
    unknown = sorted(set(preset) - known)
    if unknown:
        raise ValueError(f"{path}: unknown preset keys {unknown}; known keys: {sorted(known)}.")
    if preset.get("setting") not in ("demo", "custom"):
        raise ValueError(f"{path}: `setting` must be `demo` or `custom`, got {preset.get('setting')!r}.")
    if preset["setting"] == "custom":
        missing = [k for k in ("base_config", "student_options", "train_data", "eval_suite") if k not in preset]
        if missing:
            raise ValueError(
                f"{path}: a custom setting needs {missing} (see recipes/configs/ablations_gpu_example.yaml)."
            )
    return preset


def prepare_setting(preset: dict, out: str) -> dict:
    """The runs' common inputs: base recipe YAML, teacher sources, student options, training data, evaluation suite
    path and student image size. `demo`: prepared as demo/run_demo.py does (data, converted teachers, student config,
    suite), skipping what exists in `out`."""
    if preset["setting"] == "demo":
        from demo import run_demo
        from demo.data import prepare_datasets

        data = prepare_datasets(os.path.join(out, "data"))
        teachers = run_demo.prepare_teachers(out)
        config_dir = os.path.join(out, "student-config")
        run_demo.student_config().save_pretrained(config_dir)
        suite_path = os.path.join(out, "eval_suite.json")
        write_json_atomically(suite_path, run_demo.eval_suite(data))
        return {
            "base_config": os.path.join(ROOT, "recipes", "configs", "demo_fashion_mnist.yaml"),
            "teachers": teachers,
            "student_options": ["--student_config", config_dir],
            "train_data": data["fashion-mnist"],
            "eval_suite": suite_path,
            "student_image_size": run_demo.STUDENT_IMAGE_SIZE,
            "teacher_cache": True,
        }
    with open(preset["base_config"]) as handle:
        base = yaml.safe_load(handle) or {}
    teachers = preset.get("teachers") or base.get("teachers")
    if not teachers:
        raise ValueError("The preset gives no `teachers` and its base_config has none: list them in the preset.")
    return {
        "base_config": preset["base_config"],
        "teachers": list(teachers),
        "student_options": list(map(str, preset["student_options"])),
        "train_data": preset["train_data"],
        "eval_suite": preset["eval_suite"],
        "student_image_size": preset.get("student_image_size"),
        "teacher_cache": bool(preset.get("teacher_cache", False)),
    }


def _in_repository(value):
    """A setting's value as published in the results: paths relative to the repository root (teachers given as
    folders too), never this machine's absolute paths."""
    if isinstance(value, list):
        return [_in_repository(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        return os.path.relpath(value, ROOT)
    return value


def row_names(setting: dict, preset: dict) -> list[str]:
    """Every row the preset asks for (`only-*`: one per teacher of the setting), in the table's order."""
    names = unique_teacher_names(setting["teachers"])
    rows = []
    for row in preset.get("rows") or ["default", "only-*", *[r for r in ROWS if r != "default"]]:
        rows += [ONLY + name for name in names] if row == ONLY + "*" else [row]
    return rows


def row_plan(row: str, setting: dict, preset: dict) -> dict:
    """The teachers, recipe options and teacher-cache use of one row."""
    with open(setting["base_config"]) as handle:
        base = yaml.safe_load(handle) or {}
    names = unique_teacher_names(setting["teachers"])
    indices = list(range(len(names)))
    options = []
    if row.startswith(ONLY):
        if row[len(ONLY) :] not in names:
            raise ValueError(f"Row {row!r}: no teacher named {row[len(ONLY) :]!r}; the teachers are {names}.")
        indices = [names.index(row[len(ONLY) :])]
        description = f"distilled from {row[len(ONLY) :]} alone"
        for key in PER_TEACHER_OPTIONS:  # per-teacher lists of the base config: keep the kept teachers' values
            values = base.get(key)
            if isinstance(values, list) and len(values) == len(names) > 1:
                options += [f"--{key}", *[str(values[i]) for i in indices]]
    elif row in ROWS:
        description, options = ROWS[row][0], list(ROWS[row][1])
        if row == "standardization-phi-s":
            options += ["--standardization_warmup_steps", str(preset.get("phi_s_warmup_steps", 20))]
    else:
        raise ValueError(f"Unknown row {row!r}: choose from {list(ROWS)} or {ONLY}<teacher> ({names}).")
    return {
        "description": description,
        "teachers": [setting["teachers"][i] for i in indices],
        "teacher_names": [names[i] for i in indices],
        "options": options,
        "teacher_cache": setting["teacher_cache"] and row != ONLINE,
    }


def run_command(row: str, seed: int, setting: dict, preset: dict, out: str) -> tuple[list[str], str]:
    """The `recipes/unic.py` command of (row, seed) and its run folder."""
    plan = row_plan(row, setting, preset)
    run_dir = os.path.join(out, "runs", row, f"seed-{seed}")
    launcher = list(map(str, preset.get("launcher") or ["python"]))
    launcher = LAUNCHERS.get(launcher[0], [launcher[0]]) + launcher[1:]
    command = [
        *launcher, os.path.join(ROOT, "recipes", "unic.py"),
        "--config", setting["base_config"],
        "--teachers", *plan["teachers"],
        *setting["student_options"],
        "--train_data", setting["train_data"],
        "--output_dir", os.path.join(run_dir, "student"),
        "--seed", str(seed),
        "--disable_tqdm", "true",
    ]  # fmt: skip
    if plan["teacher_cache"]:  # one cache per teacher subset, its crops drawn once with the setting's seed
        with open(setting["base_config"]) as handle:
            cache_seed = (yaml.safe_load(handle) or {}).get("seed", 42)  # 42: TrainingArguments' default
        cache_name = "+".join(plan["teacher_names"]) + (f"-{row}" if row in TEACHER_FORM_ROWS else "")
        cache = os.path.join(out, "teacher-cache", cache_name)
        command += ["--teacher_cache", cache, "--teacher_cache_seed", str(cache_seed)]
    if preset.get("max_steps") is not None:
        command += ["--max_steps", str(preset["max_steps"])]
    command += [*map(str, preset.get("recipe_options") or []), *plan["options"]]
    return command, run_dir


def evaluate_command(student_dir: str, run_dir: str, setting: dict) -> list[str]:
    command = [
        sys.executable, os.path.join(ROOT, "recipes", "evaluate.py"),
        "--models", student_dir, "--model_names", "student",
        "--config", setting["eval_suite"],
        "--output_dir", os.path.join(run_dir, "eval"),
    ]  # fmt: skip
    if setting.get("student_image_size"):
        command += ["--image_size", str(setting["student_image_size"])]
    return command


def _load_module(path: str):
    """The recipe script at `path` (recipes/NAME.py) as a module."""
    return load_recipe(os.path.splitext(os.path.basename(path))[0])


def execute(command: list[str], log_path: str, in_process: bool = False) -> None:
    """Run a recipe command, its output into `log_path`. `in_process` (tests): `python SCRIPT ARGS` commands run as
    `SCRIPT.main(ARGS)` in this process."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if in_process:
        if command[0] != sys.executable or not command[1].endswith(".py"):
            raise ValueError(f"In-process runs need `python SCRIPT ...` commands, got {command[:2]}.")
        with open(log_path, "w") as log, contextlib.redirect_stdout(log):
            _load_module(command[1]).main(command[2:])
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        with open(log_path) as log:
            tail = "".join(log.readlines()[-20:])
        raise SystemExit(f"Failed (exit {code}): {' '.join(command)}\nlast lines of {log_path}:\n{tail}")


def run_one(row: str, seed: int, setting: dict, preset: dict, out: str, in_process: bool = False) -> dict:
    """Train and evaluate (row, seed) unless its `result.json` exists (then it is read back); a result written by
    another command is refused."""
    command, run_dir = run_command(row, seed, setting, preset, out)
    result_path = os.path.join(run_dir, "result.json")
    if os.path.exists(result_path):
        with open(result_path) as handle:
            result = json.load(handle)
        if result["command"][1:] != command[1:]:
            raise ValueError(
                f"{result_path} was written by another command (other options or setting): use another --output_dir, "
                f"or delete {run_dir} to run it again.\n  was: {' '.join(result['command'][1:])}\n  now: "
                f"{' '.join(command[1:])}"
            )
        print(f"[{row} seed {seed}] done before: {result_path}", flush=True)
        return result
    print(f"[{row} seed {seed}] $ {' '.join(command)}", flush=True)
    start = time.time()
    execute(command, os.path.join(run_dir, "distill.log"), in_process)
    distill_s = time.time() - start
    student_dir = os.path.join(run_dir, "student")
    step = time.time()
    execute(evaluate_command(student_dir, run_dir, setting), os.path.join(run_dir, "evaluate.log"), in_process)
    with open(os.path.join(run_dir, "eval", "eval_results.json")) as handle:
        metrics = json.load(handle)["models"]["student"]["results"]
    with open(os.path.join(student_dir, "trainer_state.json")) as handle:
        steps = json.load(handle)["global_step"]
    with open(os.path.join(student_dir, "train_results.json")) as handle:
        train_runtime = float(json.load(handle)["train_runtime"])
    result = {
        "row": row, "seed": seed, "command": command, "metrics": metrics, "steps": steps,
        "train_runtime_s": round(train_runtime, 1), "distill_wall_s": round(distill_s, 1),
        "eval_wall_s": round(time.time() - step, 1), "wall_s": round(time.time() - start, 1),
    }  # fmt: skip
    write_json_atomically(result_path, result)
    print(f"[{row} seed {seed}] {result['wall_s']:.0f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    return result


def choose_metrics(results: dict, preset: dict) -> list[str]:
    if preset.get("metrics"):
        return list(preset["metrics"])
    first = next(iter(next(iter(results.values())).values()))["metrics"]
    return [m for m in first if m.endswith("/knn_top1@20") or m.endswith("/linear_top1")]


def summarize(results: dict, metrics: list[str], plans: dict) -> dict:
    """Per row: per-seed values, mean, std (sample, over seeds), steps, wall time; and per metric the difference to
    `default` with its verdict."""
    rows = {}
    for row, by_seed in results.items():
        values = {m: [by_seed[s]["metrics"][m] for s in sorted(by_seed)] for m in metrics}
        rows[row] = {
            "description": plans[row]["description"],
            "teachers": plans[row]["teacher_names"],
            "options": plans[row]["options"] + ([] if plans[row]["teacher_cache"] else ["(no --teacher_cache)"]),
            "seeds": sorted(by_seed),
            "values": values,
            "mean": {m: statistics.fmean(v) for m, v in values.items()},
            "std": {m: statistics.stdev(v) if len(v) > 1 else None for m, v in values.items()},
            "steps": sorted({r["steps"] for r in by_seed.values()}),
            "train_runtime_s": statistics.fmean(r["train_runtime_s"] for r in by_seed.values()),
            "wall_s": statistics.fmean(r["wall_s"] for r in by_seed.values()),
        }
    default = rows.get("default")
    for row, entry in rows.items():
        if default is None or row == "default":
            continue
        entry["diff"] = {}
        for m in metrics:
            diff = entry["mean"][m] - default["mean"][m]
            entry["diff"][m] = {"value": diff, "verdict": verdict(diff, entry["std"][m], default["std"][m])}
    return rows


def markdown_table(rows: dict, metrics: list[str], header: str) -> str:
    def cell(entry, m):
        std = entry["std"][m]
        text = f"{entry['mean'][m]:.1f}" + (f" ± {std:.1f}" if std is not None else "")
        if "diff" in entry:
            d = entry["diff"][m]
            text += f" ({d['value']:+.1f}, {d['verdict']})"
        return text

    lines = [header, "", "| row | seeds | steps | train s | " + " | ".join(metrics) + " |"]
    lines.append("|---|---:|---:|---:|" + "---:|" * len(metrics))
    for row, entry in rows.items():
        lines.append(
            f"| {row} | {len(entry['seeds'])} | {'/'.join(map(str, entry['steps']))} | {entry['train_runtime_s']:.0f} | "
            + " | ".join(cell(entry, m) for m in metrics)
            + " |"
        )
    lines += ["", "Rows:", ""]
    lines += [f"- `{row}`: {e['description']} (options: `{' '.join(e['options']) or '-'}`)" for row, e in rows.items()]
    return "\n".join(lines) + "\n"


def plot_bars(rows: dict, metrics: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.35 * len(names) + 1.5), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means = [rows[n]["mean"][m] for n in names]
        stds = [rows[n]["std"][m] or 0.0 for n in names]
        colors = ["tab:green" if n == "default" else "tab:blue" for n in names]
        ax.barh(range(len(names)), means, xerr=stds, color=colors, capsize=2)
        if "default" in rows:
            ax.axvline(rows["default"]["mean"][m], color="tab:green", linestyle="--", linewidth=0.8)
        ax.set_yticks(range(len(names)), names if ax is axes[0][0] else [""] * len(names), fontsize=7)
        ax.invert_yaxis()
        low = min(x - s for x, s in zip(means, stds))
        ax.set_xlim(max(0.0, low - 5), min(100.0, max(x + s for x, s in zip(means, stds)) + 2))
        ax.set_title(m, fontsize=8)
        ax.set_xlabel("top-1 % (mean ± std over seeds)", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_training(run_dirs: dict[str, str], path: str) -> None:
    """Per-teacher cls / patch losses and kept fractions over the steps of each run (`trainer_state.json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(run_dirs), 2, figsize=(10, 2.8 * len(run_dirs)), squeeze=False)
    for (label, run_dir), (loss_ax, kept_ax) in zip(run_dirs.items(), axes):
        with open(os.path.join(run_dir, "student", "trainer_state.json")) as handle:
            history = [e for e in json.load(handle)["log_history"] if "loss" in e]
        teachers = sorted({key.split("/")[0] for e in history for key in e if key.endswith("/cls_loss")})
        for index, teacher in enumerate(teachers):
            color = f"C{index}"
            steps = [e["step"] for e in history]
            loss_ax.plot(steps, [e[f"{teacher}/cls_loss"] for e in history], color=color, label=f"{teacher} cls")
            loss_ax.plot(steps, [e[f"{teacher}/patch_loss"] for e in history], "--", color=color, label="patch")
            kept_ax.plot(steps, [e[f"{teacher}/kept"] for e in history], color=color, label=teacher)
        loss_ax.set_yscale("log")
        loss_ax.set_title(f"{label}: per-teacher losses", fontsize=9)
        kept_ax.set_title(f"{label}: kept fraction per teacher", fontsize=9)
        kept_ax.set_ylim(0, 1.05)
        loss_ax.legend(fontsize=6)
        kept_ax.legend(fontsize=6)
        for ax in (loss_ax, kept_ax):
            ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def estimate_seconds(runs: list[tuple[str, int]], preset: dict, out: str) -> tuple[float, str]:
    """Seconds the runs not done yet will take, `max_steps` x seconds per step + seconds per run outside training
    (start-up, cache check, evaluation) for each kind of run (cached / online teachers): measured on the finished
    runs of that kind where there are some, else the preset's `seconds_per_step` and `seconds_per_run`."""
    measured = {}
    for row, seed in runs:
        path = os.path.join(out, "runs", row, f"seed-{seed}", "result.json")
        if os.path.exists(path):
            with open(path) as handle:
                result = json.load(handle)
            per_step = result["train_runtime_s"] / max(result["steps"], 1)
            measured.setdefault(row == ONLINE, []).append((per_step, result["wall_s"] - result["train_runtime_s"]))
    steps = preset.get("max_steps")
    total, sources = 0.0, set()
    for row, seed in runs:
        if os.path.exists(os.path.join(out, "runs", row, f"seed-{seed}", "result.json")):
            continue
        kind = "online" if row == ONLINE else "cached"
        if measured.get(row == ONLINE):
            per_step = statistics.median(m[0] for m in measured[row == ONLINE])
            other = statistics.median(m[1] for m in measured[row == ONLINE])
            sources.add("finished runs")
        else:
            per_step = float((preset.get("seconds_per_step") or {}).get(kind, math.nan))
            other = float((preset.get("seconds_per_run") or {}).get(kind, math.nan))
            sources.add("the preset's seconds_per_step / seconds_per_run")
        total += (steps if steps is not None else math.nan) * per_step + other
    return total, " and ".join(sorted(sources)) or "nothing left to run"


def main(argv: list[str] | None = None, in_process: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="YAML: setting, rows, seeds, steps (see above).")
    parser.add_argument("--seeds", type=int, nargs="+", help="Seeds of every row (default: the preset's).")
    parser.add_argument("--max_seeds", type=int, help="Most seeds of a row whose difference is unclear.")
    parser.add_argument("--rows", nargs="+", help="Rows to run (default: the preset's); `default` is always run.")
    parser.add_argument("--max_steps", type=int, help="Training steps of every run (default: the preset's).")
    parser.add_argument("--output_dir", default=os.path.join(ROOT, "outputs", "ablations"), help="Runs and caches.")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results", "ablations"))
    parser.add_argument("recipe_options", nargs="*", help="Options after `--`: added to every recipes/unic.py run.")
    args = parser.parse_args(argv)
    preset = load_preset(args.preset)
    preset["recipe_options"] = [*map(str, preset.get("recipe_options") or []), *args.recipe_options]
    for key in ("seeds", "max_seeds", "rows", "max_steps"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    seeds = [int(s) for s in preset.get("seeds") or [0]]
    max_seeds = max(int(preset.get("max_seeds") or len(seeds)), len(seeds))
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)

    setting = prepare_setting(preset, out)
    rows = row_names(setting, preset)
    if "default" not in rows:
        rows.insert(0, "default")
    plans = {row: row_plan(row, setting, preset) for row in rows}  # unknown rows fail here, before any run
    planned = [(row, seed) for row in rows for seed in seeds]
    seconds, source = estimate_seconds(planned, preset, out)
    print(
        f"Ablations: {len(rows)} rows x seeds {seeds} (up to {max_seeds} where a difference is unclear), "
        f"{preset.get('max_steps', 'the base config`s')} steps per run; estimated {seconds / 60:.0f} min for the "
        f"{len(planned)} base runs ({source}; caches still to build not included), + "
        f"{len(rows) * (max_seeds - len(seeds))} runs at most for extra seeds",
        flush=True,
    )

    results = {row: {} for row in rows}
    for row, seed in planned:
        results[row][seed] = run_one(row, seed, setting, preset, out, in_process)
    metrics = choose_metrics(results, preset)
    summary = summarize(results, metrics, plans)
    for extra in seeds_beyond(seeds, max_seeds):  # more seeds only where a difference is unclear
        unclear = [r for r, e in summary.items() if any(d["verdict"] == "unclear" for d in e.get("diff", {}).values())]
        if not unclear:
            break
        for row in ["default", *unclear]:
            results[row][extra] = run_one(row, extra, setting, preset, out, in_process)
        summary = summarize(results, metrics, plans)

    steps = sorted({s for e in summary.values() for s in e["steps"]})
    header = (
        f"UNIC ablations ({preset.get('description') or preset['setting']} setting; {'/'.join(map(str, steps))} "
        f"training steps per run; teachers {', '.join(unique_teacher_names(setting['teachers']))}). Top-1 %, mean ± "
        "sample std over seeds; in brackets the difference to `default` and its verdict: real if |diff| > 2 x the "
        "larger std of the two rows, unclear if > 1 x, noise otherwise. Teacher-output caches drawn once (the base "
        "config's seed) and shared by all seeds."
    )
    if preset["recipe_options"]:
        header += f" Options added to every run: `{' '.join(preset['recipe_options'])}`."
    report = {
        "preset": os.path.relpath(os.path.abspath(args.preset), ROOT),
        "setting": {k: _in_repository(v) for k, v in setting.items() if k != "student_options"},
        "header": header,
        "metrics": metrics,
        "rows": summary,
    }
    results_dir = os.path.abspath(args.results_dir)
    write_json_atomically(os.path.join(results_dir, "ablations.json"), report)
    table = markdown_table(summary, metrics, header)
    write_text_atomically(os.path.join(results_dir, "ablations.md"), table)
    plot_bars(summary, metrics, os.path.join(results_dir, "ablation_bars.png"))
    plot_rows = [r for r in preset.get("plot_rows") or ["default"] if r in results]
    plot_training(
        {f"{r} (seed {min(results[r])})": run_command(r, min(results[r]), setting, preset, out)[1] for r in plot_rows},
        os.path.join(results_dir, "training_curves.png"),
    )
    print("\n" + table)
    print(f"Written to {results_dir}: ablations.json, ablations.md, ablation_bars.png, training_curves.png")
    return report


def seeds_beyond(seeds: list[int], max_seeds: int) -> list[int]:
    """The extra seeds after `seeds`, up to `max_seeds` in all."""
    return list(range(max(seeds) + 1, max(seeds) + 1 + max_seeds - len(seeds)))


if __name__ == "__main__":
    main()
