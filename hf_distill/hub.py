"""Share a distilled student on the Hugging Face Hub: model card, training and evaluation plots, and a clean upload.

The UNIC recipe leaves its export folder with the student (`config.json`, `model.safetensors`,
`preprocessor_config.json`) next to training leftovers (`checkpoint-*/`, `trainer_state.json`, `training_args.bin`,
...). This module writes the model card (`README.md`, rendered from the packaged `templates/model_card.md`), draws
the training / evaluation figures under `plots/`, and pushes exactly the files of the model, never the leftovers:

```python
from huggingface_hub import EvalResult
from hf_distill.hub import create_or_update_model_card, plot_training_curves, push_to_hub

plot = plot_training_curves(trainer.state.log_history, "outputs/unic/plots/teacher_losses.png")
create_or_update_model_card(
    "outputs/unic",
    model_name="unic-vitb16-in1k",
    teachers=[{"name": "dino-vitb16", "source": "facebook/dino-vitb16", "summary": "cls", "grid_alignment": "resize"}],
    training_data="ILSVRC/imagenet-1k",
    settings={"student": "ViT-B/16", "image size": 224, "teacher dropping p": 0.5},
    eval_results=[EvalResult(task_type="image-classification", dataset_type="imagenet-1k", dataset_name="ImageNet-1K",
                             metric_type="accuracy", metric_value=0.78)],
    plots=[plot],
    repo_id="me/unic-vitb16-in1k",
)
push_to_hub("outputs/unic", "me/unic-vitb16-in1k")
```
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.resources
import json
import math
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from .io_utils import write_text_atomically

__all__ = [
    "CARD_END_MARKER",
    "CARD_START_MARKER",
    "UPLOAD_PATTERNS",
    "EvalResult",
    "create_or_update_model_card",
    "plot_eval_comparison",
    "plot_training_curves",
    "push_to_hub",
    "upload_file_list",
]

CARD_START_MARKER = "<!-- hf_distill:card:start -->"
CARD_END_MARKER = "<!-- hf_distill:card:end -->"
_CARD_BLOCK = re.compile(re.escape(CARD_START_MARKER) + r".*?" + re.escape(CARD_END_MARKER), re.DOTALL)

DEFAULT_TAGS = ("hf_distill", "unic", "distillation")
FRAMEWORKS = ("hf_distill", "transformers", "torch", "accelerate", "datasets")

# What a push uploads, as globs relative to the output folder (`*` never crosses a `/`). Sharded weights
# (`model-*.safetensors`) are uploaded only with their index, and only the shards that the index names.
UPLOAD_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "preprocessor_config.json",
    "README.md",
    "eval_results.json",
    "plots/*.png",
)
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


# ----------------------------------------------------------------------------------------------------- model card


def _template_text() -> str:
    """Text of the packaged Jinja template `hf_distill/templates/model_card.md`."""
    return importlib.resources.files("hf_distill").joinpath("templates", "model_card.md").read_text(encoding="utf-8")


def _framework_versions() -> dict[str, str]:
    """Installed versions of the libraries a student is trained with, looked up now (at render time)."""
    versions = {}
    for package in FRAMEWORKS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            if package == "hf_distill":  # running from a source checkout that is not installed
                from hf_distill import __version__

                versions[package] = __version__
            else:
                versions[package] = "not installed"
    return versions


def _is_hub_id(value: str | None) -> bool:
    """Whether `value` looks like a Hub repo id (`owner/name`) rather than a local path or free text."""
    return bool(value) and _HUB_ID.match(value) is not None and not os.path.exists(value)


def _cell(value: Any) -> str:
    """One markdown table cell: numbers compactly formatted, lists joined, `|` and line breaks escaped."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "-"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, numbers.Integral):
        text = str(int(value))
    elif isinstance(value, numbers.Real):
        text = _format_number(float(value))
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    elif isinstance(value, dict):
        text = ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _format_number(value: float) -> str:
    if math.isnan(value):
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3g}"
    return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1 else f"{value:.2f}"


def _plain_number(value: Any) -> Any:
    """Numpy / torch scalars as Python numbers, so that the YAML metadata stays loadable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item"):
        return value.item()
    return value


def _yaml_value(value: Any) -> Any:
    """A value that YAML metadata can hold: containers recursively, numbers as Python numbers, others as text."""
    if isinstance(value, dict):
        return {str(key): _yaml_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_value(item) for item in value]
    value = _plain_number(value)
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _result_key(result: EvalResult) -> tuple:
    """What makes two results "the same measurement": task, dataset (config, split, revision) and metric."""
    return (
        result.task_type,
        result.dataset_type,
        result.dataset_config,
        result.dataset_split,
        result.dataset_revision,
        result.metric_type,
        result.metric_name,
        result.metric_config,
    )


def _merge_eval_results(old: Iterable[EvalResult] | None, new: Iterable[EvalResult] | None) -> list[EvalResult]:
    """`old` updated with `new`: a result measuring the same thing replaces the old one in place, others are kept."""
    merged: dict[tuple, EvalResult] = {}
    for result in [*(old or []), *(new or [])]:
        if not isinstance(result, EvalResult):
            raise TypeError(f"eval_results must hold huggingface_hub.EvalResult objects, got {type(result)}.")
        merged[_result_key(result)] = dataclasses.replace(result, metric_value=_plain_number(result.metric_value))
    return list(merged.values())


def _eval_table(eval_results: list[EvalResult], comparison: list[dict] | None) -> dict[str, list]:
    """Columns and rows of the evaluation table: the student's results plus the teachers' values of `comparison`.

    A `comparison` row is `{"task", "dataset", "metric", "student" (optional), "teachers": {name: value}}`; it fills
    the teacher columns of the student result it names (task name or type; dataset name, `name (split)` or type;
    metric name or type), or adds a row of its own.
    """
    rows: dict[tuple, dict] = {}
    aliases: dict[tuple, tuple] = {}  # other labels of a result (task type, dataset name without split, ...)
    for result in eval_results:
        dataset = result.dataset_name or result.dataset_type
        if result.dataset_split:
            dataset = f"{dataset} ({result.dataset_split})"
        key = (result.task_name or result.task_type, dataset, result.metric_name or result.metric_type)
        rows[key] = {"student": result.metric_value, "teachers": {}}
        for task in (result.task_name, result.task_type):
            for dataset_label in (dataset, result.dataset_name, result.dataset_type):
                for metric in (result.metric_name, result.metric_type):
                    aliases.setdefault((task, dataset_label, metric), key)
    teacher_names: list[str] = []
    for entry in comparison or []:
        missing = {"task", "dataset", "metric"} - set(entry)
        if missing:
            raise ValueError(
                f"comparison rows need the keys task, dataset and metric; {entry} lacks {sorted(missing)}."
            )
        key = (entry["task"], entry["dataset"], entry["metric"])
        key = key if key in rows else aliases.get(key, key)
        row = rows.setdefault(key, {"student": None, "teachers": {}})
        if entry.get("student") is not None:
            row["student"] = entry["student"]
        for name, value in (entry.get("teachers") or {}).items():
            row["teachers"][name] = value
            if name not in teacher_names:
                teacher_names.append(name)
    columns = ["Task", "Dataset", "Metric", "Student", *(_cell(name) for name in teacher_names)]
    table_rows = [
        [_cell(task), _cell(dataset), _cell(metric), _cell(row["student"])]
        + [_cell(row["teachers"].get(name)) for name in teacher_names]
        for (task, dataset, metric), row in rows.items()
    ]
    return {"columns": columns, "rows": table_rows}


def _teacher_rows(teachers: list[dict]) -> list[dict[str, str]]:
    """Teacher descriptions as table cells. Keys: `name`, `source` (or `model_id` / `path`), `revision`,
    `summary` (or `summary_token`), `grid_alignment`."""
    rows = []
    for index, teacher in enumerate(teachers):
        if isinstance(teacher, str):
            teacher = {"source": teacher}
        source = teacher.get("source") or teacher.get("model_id") or teacher.get("path") or teacher.get("id")
        name = teacher.get("name") or (Path(str(source)).name if source else f"teacher {index}")
        source_cell = _cell(source)
        if _is_hub_id(source):
            source_cell = f"[{source_cell}](https://huggingface.co/{source})"
        rows.append(
            {
                "name": _cell(name),
                "source": source_cell,
                "revision": _cell(teacher.get("revision")),
                "summary": _cell(teacher.get("summary") or teacher.get("summary_token")),
                "grid_alignment": _cell(teacher.get("grid_alignment")),
            }
        )
    return rows


def _plot_entries(output_dir: Path, plots: list[str] | None) -> list[dict[str, str]]:
    """Plot links relative to the card (`plots/x.png`), with an alt text made from the file name."""
    entries = []
    for plot in plots or []:
        path = Path(plot)
        if path.is_absolute():
            try:
                path = path.resolve().relative_to(output_dir.resolve())
            except ValueError as err:
                raise ValueError(
                    f"Plot {plot} is outside {output_dir}: the card can only link files it ships."
                ) from err
        alt = re.sub(r"[_-]+", " ", path.stem).strip() or "plot"
        entries.append({"path": path.as_posix().replace(" ", "%20"), "alt": alt})
    return entries


def _architecture(output_dir: Path) -> str | None:
    """The transformers class of the exported student, from its `config.json` (`None` when unknown)."""
    try:
        architectures = json.loads((output_dir / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return architectures[0] if isinstance(architectures, list) and architectures else None


def _training_data_text(training_data: str) -> str:
    if _is_hub_id(training_data):
        return f"[`{training_data}`](https://huggingface.co/datasets/{training_data})"
    if training_data and not re.search(r"\s", training_data):
        return f"`{training_data}`"
    return training_data or "Not specified."


def _unique(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _generated_block(text: str) -> str:
    match = _CARD_BLOCK.search(text)
    if match is None:  # the packaged template always has both markers
        raise RuntimeError("The model card template lost its hf_distill markers.")
    return match.group(0)


def _splice_block(text: str, block: str) -> str:
    """`text` with its first generated block replaced by `block` (later stale blocks removed), or `block` appended."""
    matches = list(_CARD_BLOCK.finditer(text))
    if not matches:
        return f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"\n{block}\n"
    first = matches[0]
    out = [text[: first.start()], block]
    previous_end = first.end()
    for match in matches[1:]:
        out.append(text[previous_end : match.start()])
        previous_end = match.end()
    out.append(text[previous_end:])
    return "".join(out)


def create_or_update_model_card(
    output_dir: str | os.PathLike,
    *,
    model_name: str | None = None,
    teachers: list[dict] | None = None,
    training_data: str | None = None,
    settings: dict | None = None,
    eval_results: list[EvalResult] | None = None,
    comparison: list[dict] | None = None,
    plots: list[str] | None = None,
    base_model: str | list[str] | None = None,
    tags: list[str] | None = None,
    repo_id: str | None = None,
    datasets: str | list[str] | None = None,
    summary: str | None = None,
    pipeline_tag: str = "image-feature-extraction",
    method_tag: str = "unic",
) -> ModelCard:
    """Write (or update) `output_dir/README.md`, the model card of a UNIC student.

    The card is rendered from the packaged template `hf_distill/templates/model_card.md` with
    [`huggingface_hub.ModelCard.from_template`]. Its metadata holds `library_name: transformers`,
    `pipeline_tag: image-feature-extraction`, the tags `hf_distill`, `unic`, `distillation` (plus `tags`), the
    training dataset when it is a Hub id, `base_model` when given, and a `model-index` built from `eval_results`.

    When `README.md` already exists it is updated, not overwritten: evaluation results are merged (a result with the
    same task, dataset, config, split, revision and metric replaces the old one, the others are kept), tags and
    datasets are united, the other metadata keys are kept, and only the text between `<!-- hf_distill:card:start -->`
    and `<!-- hf_distill:card:end -->` is regenerated (appended when the card has no such block), so that text written
    by a person outside the markers survives. The file is written atomically.

    Args:
        output_dir: folder of the exported student (created if missing).
        model_name: name of the model, used as title and as the `model-index` name (default: the existing card's name,
            else the folder name).
        teachers: one dict per teacher with `name`, `source` (Hub id or path; `model_id` / `path` also accepted),
            `revision`, `summary` (summary token: `cls`, `pooler`, `mean_patch`) and `grid_alignment`; missing
            values show as `-`.
        training_data: Hub dataset id, local path or a short description of the training images.
        settings: distillation settings shown as a key/value table (student architecture, image size, steps, ...).
        eval_results: results of the student, as [`huggingface_hub.EvalResult`].
        comparison: rows `{"task", "dataset", "metric", "student" (optional), "teachers": {name: value}}` that add
            the teachers' values to the evaluation table (matched to results by their task, dataset and metric
            labels). Only shown in the generated text, not in the metadata; pass it again on each update.
        plots: image paths relative to `output_dir` (or absolute paths inside it), e.g. `plots/teacher_losses.png`.
        base_model: Hub id(s) the student derives from, if any.
        tags: extra tags.
        repo_id: Hub repo id used in the usage snippet (defaults to the local folder path).
        datasets: Hub dataset id(s) of the training data (defaults to `training_data` when it is a Hub id).
        summary: the card's opening paragraph (default: the UNIC description).
        pipeline_tag: `image-feature-extraction` (UNIC encoders) or `image-classification` (task-specific students:
            a classification usage snippet and citation).
        method_tag: the method's tag, in place of `unic`.

    `teachers`, `training_data`, `settings`, `comparison` and `plots` are also recorded in the card's metadata (key
    `hf_distill`), so a later update (e.g. by `recipes/evaluate.py`, which only knows the evaluation) may leave them
    to `None` and keeps the recorded ones; plots accumulate.

    Returns:
        The [`huggingface_hub.ModelCard`] written to `output_dir/README.md`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    readme = output_dir / "README.md"
    existing = ModelCard.load(readme) if readme.is_file() else None
    recorded = dict(getattr(existing.data, "hf_distill", None) or {}) if existing is not None else {}
    model_name = (
        model_name or (existing.data.model_name if existing is not None else None) or output_dir.resolve().name
    )
    teachers = teachers if teachers is not None else recorded.get("teachers", [])
    training_data = training_data if training_data is not None else recorded.get("training_data", "-")
    settings = settings if settings is not None else recorded.get("settings", {})
    comparison = comparison if comparison is not None else recorded.get("comparison")
    plots = _unique([*recorded.get("plots", []), *(plots or [])])
    record = _yaml_value(
        {
            "teachers": teachers,
            "training_data": training_data,
            "settings": settings,
            "comparison": comparison,
            "plots": plots,
        }
    )

    old_results = existing.data.eval_results if existing is not None else None
    merged_results = _merge_eval_results(old_results, eval_results)
    dataset_ids = _as_list(datasets) or ([training_data] if _is_hub_id(training_data) else [])
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=_unique([*(method_tag if tag == "unic" else tag for tag in DEFAULT_TAGS), *(tags or [])]),
        datasets=dataset_ids or None,
        base_model=base_model,
        eval_results=merged_results or None,
        hf_distill=record,
    )

    teacher_rows = _teacher_rows(teachers)
    names = [row["name"] for row in teacher_rows]
    summary = summary or (
        f"A student image encoder distilled with hf_distill's implementation of UNIC (multi-teacher distillation, "
        f"Sariyildiz et al., ECCV 2024) from {len(names)} teacher{'s' if len(names) != 1 else ''}: "
        f"{', '.join(names) or '-'}. It is trained to reproduce the summary token and the patch tokens of every "
        "teacher at once, and ships as a stock transformers model for image feature extraction."
    )
    rendered = ModelCard.from_template(
        card_data,
        template_str=_template_text(),
        title=model_name,
        summary=summary,
        teachers=teacher_rows,
        training_data=_training_data_text(training_data),
        settings={_cell(key): _cell(value) for key, value in settings.items()},
        eval_table=_eval_table(merged_results, comparison),
        plots=_plot_entries(output_dir, plots),
        architecture=_architecture(output_dir),
        model_ref=repo_id or output_dir.as_posix(),
        framework_versions=_framework_versions(),
        pipeline_tag=pipeline_tag,
    )

    if existing is None:
        card = rendered
    else:
        card = existing
        data = card.data
        data.model_name = model_name
        data.eval_results = merged_results or None
        data.library_name = "transformers"
        data.pipeline_tag = pipeline_tag
        data.tags = _unique([*_as_list(data.tags), *card_data.tags])
        if dataset_ids:
            data.datasets = _unique([*_as_list(data.datasets), *dataset_ids])
        if base_model is not None:
            data.base_model = base_model
        data.hf_distill = record
        card.text = _splice_block(card.text, _generated_block(rendered.text))

    if not card.text.endswith("\n"):
        card.text += "\n"
    write_text_atomically(readme, str(card))
    return card


# ---------------------------------------------------------------------------------------------------------- plots


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


# ---------------------------------------------------------------------------------------------------------- upload


def _weight_files(output_dir: Path) -> list[str]:
    """The safetensors weight files of the student: `model.safetensors`, or the index and the shards it names."""
    index = output_dir / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        return [_SAFETENSORS_INDEX, *(shard for shard in shards if (output_dir / shard).is_file())]
    return ["model.safetensors"] if (output_dir / "model.safetensors").is_file() else []


def upload_file_list(output_dir: str | os.PathLike) -> list[str]:
    """Exactly the files a push of `output_dir` uploads, as sorted POSIX paths relative to `output_dir`.

    These are `config.json`, the weights (`model.safetensors`, or `model.safetensors.index.json` and the
    `model-*.safetensors` shards it names), `preprocessor_config.json`, `README.md`, `eval_results.json` and
    `plots/*.png`, when present (see `UPLOAD_PATTERNS`). Training leftovers (`checkpoint-*/`, `trainer_state.json`,
    `training_args.bin`, optimizer / scheduler states, logs, ...) are never part of it.
    """
    output_dir = Path(output_dir)
    files = set(_weight_files(output_dir))
    for name in ("config.json", "preprocessor_config.json", "README.md", "eval_results.json"):
        if (output_dir / name).is_file():
            files.add(name)
    plots_dir = output_dir / "plots"
    if plots_dir.is_dir():
        files.update(f"plots/{p.name}" for p in plots_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    return sorted(files)


def _check_pushable(output_dir: Path, files: list[str]) -> None:
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} is not a folder.")
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    index = output_dir / _SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += sorted(shard for shard in shards if shard not in files)
        if not shards:
            missing.append("model-*.safetensors (the index names no shard)")
    elif "model.safetensors" not in files:
        missing.append("model.safetensors")
    if "README.md" not in files:
        missing.append("README.md (write it with hf_distill.hub.create_or_update_model_card)")
    if missing:
        raise ValueError(f"Cannot push {output_dir}: it lacks {', '.join(missing)}.")


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload distilled student with hf_distill",
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the student of `output_dir` to the Hub repo `repo_id` (created if needed), leftovers excluded.

    Only the files of [`upload_file_list`] are uploaded (passed as `allow_patterns` to `HfApi.upload_folder`), in one
    commit. Fails with a `ValueError`, before any network call, when `output_dir` lacks `config.json`, the weights
    or `README.md`.

    Args:
        output_dir: folder of the exported student.
        repo_id: target model repo (`owner/name`).
        token: Hub token (defaults to the logged-in one).
        private: visibility of the repo if it is created (`None`: the account's default).
        commit_message: message of the commit.
        revision: branch to push to (created from the default branch if missing; `refs/pr/N` must exist).
        endpoint: Hub endpoint (defaults to `HF_ENDPOINT` / huggingface.co).

    Returns:
        The URL of the commit.
    """
    output_dir = Path(output_dir)
    files = upload_file_list(output_dir) if output_dir.is_dir() else []
    _check_pushable(output_dir, files)

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True, private=private, token=token, repo_type="model")
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    commit = api.upload_folder(
        folder_path=output_dir,
        repo_id=repo_id,
        repo_type="model",
        allow_patterns=[glob.escape(path) for path in files],  # exact paths: a name's `[` is no glob class
        commit_message=commit_message,
        revision=revision,
        token=token,
    )
    return commit.commit_url
