"""Figures of a model card, drawn with matplotlib outside pyplot (Agg canvas, no global state): per-teacher training
curves (UNIC), loss terms, student-vs-teachers bars, UDON's per-domain retrieval and domain sampler weights."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

from .card import _format_number, _unique


def _new_figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg canvas, outside pyplot (no global state, nothing shown)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure, output_path: str | os.PathLike) -> str:
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(output_path, dpi=120, format="png")
    finally:
        figure.clear()  # figures outside pyplot are not tracked: clearing releases the artists
    return str(output_path)


def plot_training_curves(log_history: list[dict], output_path: str | os.PathLike) -> str | None:
    """Draw the per-teacher training curves of a UNIC run, like figures 3-4 of the UNIC paper.

    Left panel: each teacher's distillation loss against the step, summary-token (`{teacher}/cls_loss`, solid) and
    patch-token (`{teacher}/patch_loss`, dashed) losses in the teacher's color. Right panel: each teacher's mean
    `kept` coefficient (how often teacher dropping keeps it) against the step. Teachers are found from the
    `{teacher}/cls_loss` keys of the Trainer's `log_history` (`trainer.state.log_history`).

    Returns:
        The path of the PNG written, or `None` (nothing written) when no entry holds per-teacher losses.
    """
    entries = [entry for entry in log_history if any(str(key).endswith("/cls_loss") for key in entry)]
    if not entries:
        return None
    teachers = _unique(key[: -len("/cls_loss")] for entry in entries for key in entry if key.endswith("/cls_loss"))

    figure = _new_figure(12, 4.5)
    loss_ax, kept_ax = figure.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(len(teachers))]
    any_kept = False
    for teacher, color in zip(teachers, colors):
        for suffix, style, label in (("cls_loss", "-", "summary"), ("patch_loss", "--", "patch")):
            steps, values = _series(entries, f"{teacher}/{suffix}")
            if steps:
                loss_ax.plot(steps, values, style, color=color, label=f"{teacher} ({label})")
        steps, values = _series(entries, f"{teacher}/kept")
        if steps:
            any_kept = True
            kept_ax.plot(steps, values, "-", color=color, label=teacher)
    from matplotlib.ticker import MaxNLocator

    for ax in (loss_ax, kept_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_ax.set(title="Distillation loss per teacher", xlabel="step", ylabel="loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(fontsize="small")
    kept_ax.set(title="Teacher kept coefficient (teacher dropping)", xlabel="step", ylabel="mean kept")
    kept_ax.grid(alpha=0.3)
    if any_kept:
        kept_ax.set_ylim(-0.05, 1.05)
        kept_ax.legend(fontsize="small")
    else:
        kept_ax.text(0.5, 0.5, "no kept coefficients logged", ha="center", va="center", transform=kept_ax.transAxes)
    return _save_figure(figure, output_path)


def plot_loss_terms(
    log_history: list[dict], keys: list[str], output_path: str | os.PathLike, title: str = "Training loss"
) -> str | None:
    """One curve per logged loss term in `keys` (e.g. `loss`, `cross_entropy`, `kl`) against the step.

    Returns:
        The path of the PNG written, or `None` when none of the keys was logged.
    """
    series = {key: _series(log_history, key) for key in keys}
    series = {key: value for key, value in series.items() if value[0]}
    if not series:
        return None
    figure = _new_figure(6.5, 4.5)
    ax = figure.subplots()
    for key, (steps, values) in series.items():
        ax.plot(steps, values, "-", label=key)
    ax.set(title=title, xlabel="step", ylabel="value")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(figure, output_path)


def _series(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Steps and finite values of `key` in the log entries that hold it (the entry index when `step` is absent)."""
    steps, values = [], []
    for index, entry in enumerate(entries):
        value = entry.get(key)
        if isinstance(value, numbers.Real) and math.isfinite(value):
            steps.append(entry.get("step", index))
            values.append(float(value))
    return steps, values


def plot_eval_comparison(
    results: dict[str, dict[str, float]],
    output_path: str | os.PathLike,
    title: str | None = None,
    student: str | None = None,
) -> str:
    """Draw a grouped bar chart comparing the student with its teachers.

    Args:
        results: `{model name: {metric label: value}}`, e.g.
            `{"student": {"Fashion-MNIST k-NN@20": 0.81}, "dinov2-small": {"Fashion-MNIST k-NN@20": 0.84}}`.
            One group of bars per metric label (x axis), one bar per model; a model without a value for a metric
            has no bar there.
        output_path: where to write the PNG.
        title: title of the figure.
        student: which model is the student (drawn first, highlighted); defaults to the first key of `results`.

    Returns:
        The path of the PNG written.
    """
    if not results:
        raise ValueError("plot_eval_comparison needs at least one model in `results`.")
    student = student if student is not None else next(iter(results))
    if student not in results:
        raise ValueError(f"student {student!r} is not one of the models of `results`: {list(results)}.")
    models = [student, *(name for name in results if name != student)]
    metrics = _unique(metric for name in models for metric in results[name])
    if not metrics:
        raise ValueError("plot_eval_comparison needs at least one metric value in `results`.")

    figure = _new_figure(max(6.0, 1.2 + len(metrics) * (0.9 + 0.45 * len(models))), 4.5)
    ax = figure.subplots()
    width = 0.8 / len(models)
    teacher_colors = iter(f"C{i % 10}" for i in range(1, 100))
    for index, model in enumerate(models):
        values = [float(results[model].get(metric, math.nan)) for metric in metrics]
        positions = [i - 0.4 + width * (index + 0.5) for i in range(len(metrics))]
        highlight = model == student
        bars = ax.bar(
            positions,
            values,
            width,
            label=f"{model} (student)" if highlight else model,
            color="C0" if highlight else next(teacher_colors),
            alpha=1.0 if highlight else 0.55,
            edgecolor="black" if highlight else "none",
            linewidth=1.2 if highlight else 0,
        )
        ax.bar_label(bars, labels=[_format_number(v) if math.isfinite(v) else "" for v in values], fontsize="small")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save_figure(figure, output_path)


def plot_domain_retrieval(results: dict, output_path: str | os.PathLike, title: str | None = None) -> str:
    """Draw UDON's retrieval results: R@1 and mMP@5 (percent) for every domain and their mean, as grouped bars.

    Args:
        results: `{"per_domain": {domain: {"R@1": float, "mMP@5": float}}, "mean": {"R@1": ..., "mMP@5": ...}}`, as
            written to `eval_results.json` by `recipes/udon.py` ([`multi_domain_retrieval`]).
        output_path: where to write the PNG.
        title: title of the figure.

    Returns:
        The path of the PNG written.
    """
    per_domain = dict(results.get("per_domain") or {})
    if not per_domain:
        raise ValueError("plot_domain_retrieval needs per-domain results (`per_domain`).")
    groups = {**per_domain, **({"mean": results["mean"]} if results.get("mean") else {})}
    return plot_eval_comparison(
        {metric: {name: float(values[metric]) for name, values in groups.items()} for metric in ("R@1", "mMP@5")},
        output_path,
        title=title or "Retrieval per domain (one index merged over all domains)",
    )


def plot_sampler_weights(log_history: list[dict], output_path: str | os.PathLike) -> str | None:
    """Draw the domain sampler's weights against the step, one curve per domain (logged as `sampler/{domain}` by
    [`UdonTrainer`]; constant for a static strategy, adapted to the per-domain losses by UDON's dynamic sampler).

    Returns:
        The path of the PNG written, or `None` when no sampler weight was logged.
    """
    domains = _unique(key.split("/", 1)[1] for entry in log_history for key in entry if key.startswith("sampler/"))
    if not domains:
        return None
    figure = _new_figure(6.5, 4.5)
    ax = figure.subplots()
    for domain in domains:
        steps, values = _series(log_history, f"sampler/{domain}")
        ax.plot(steps, values, "-", marker="." if len(steps) < 30 else None, label=domain)
    ax.set(title="Domain sampler weights", xlabel="step", ylabel="sampling probability")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(figure, output_path)
