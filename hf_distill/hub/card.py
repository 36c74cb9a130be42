"""Model cards of distilled students: `README.md` rendered from the packaged `templates/model_card.md`, with a
`model-index` in which every evaluation protocol is its own task and every result is tied to the weights it was
measured on."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import logging
import math
import numbers
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard

from ..io_utils import write_text_atomically
from .model_index import ProtocolCardData, merge_eval_results, yaml_value
from .papers import PAPERS
from .provenance import is_hub_id, publishable_name, scrub_local_paths, weight_files_sha256

logger = logging.getLogger(__name__)

CARD_START_MARKER = "<!-- hf_distill:card:start -->"
CARD_END_MARKER = "<!-- hf_distill:card:end -->"
_CARD_BLOCK = re.compile(re.escape(CARD_START_MARKER) + r".*?" + re.escape(CARD_END_MARKER), re.DOTALL)

FRAMEWORKS = ("hf_distill", "transformers", "torch", "accelerate", "datasets")

# The methods a card describes: its Hub tag and the card's opening paragraph when none is given ({teachers}: how many
# teachers, and their names). The template picks the usage snippet by method.
METHODS = {
    "unic": (
        "unic",
        "A student image encoder distilled with hf_distill's implementation of UNIC (multi-teacher distillation, "
        "Sariyildiz et al., ECCV 2024) from {teachers}. It is trained to reproduce the summary token and the patch "
        "tokens of every teacher at once, and ships as a stock transformers model for image feature extraction.",
    ),
    "udon": (
        "udon",
        "A universal image embedding model distilled with hf_distill's implementation of UDON (Ypsilantis et al., "
        "NeurIPS 2024) from {teachers}. It ships with its code: load it with `trust_remote_code=True`.",
    ),
    "task": (
        "task-specific-distillation",
        "An image classifier distilled with hf_distill's implementation of task-specific distillation (Marrie et "
        "al., TMLR 2024) from {teachers}. It ships as a stock transformers image classifier.",
    ),
}

# ----------------------------------------------------------------------------------------------------- model card


def _template_text() -> str:
    """Text of the packaged Jinja template `hf_distill/hub/templates/model_card.md`."""
    return (
        importlib.resources.files("hf_distill")
        .joinpath("hub", "templates", "model_card.md")
        .read_text(encoding="utf-8")
    )


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
        if is_hub_id(source):
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
        entries.append({"file": path.as_posix(), "path": path.as_posix().replace(" ", "%20"), "alt": alt})
    return entries


def _architecture(output_dir: Path) -> str | None:
    """The transformers class of the exported student, from its `config.json` (`None` when unknown)."""
    try:
        architectures = json.loads((output_dir / "config.json").read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return architectures[0] if isinstance(architectures, list) and architectures else None


def _training_data_text(training_data: str) -> str:
    if is_hub_id(training_data):
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
    method: str | None = None,
    method_tag: str | None = None,
    measured_on: str | None = None,
    paper: dict | None = None,
) -> ModelCard:
    """Write (or update) `output_dir/README.md`, the model card of a distilled student.

    The card is rendered from the packaged template `hf_distill/hub/templates/model_card.md` with
    [`huggingface_hub.ModelCard.from_template`]. Its metadata holds `library_name: transformers`, `pipeline_tag`, the
    tags `hf_distill`, the method's tag (see [`METHODS`]) and `distillation` (plus `tags`), the training dataset when
    it is a Hub id, `base_model` when given, and a `model-index` built from `eval_results` in which every protocol
    (task name: e.g. "k-NN classification (k=10)", "Linear probe") is its own entry ([`model_index`]); it loads back
    unchanged with `ModelCard.load(path).data.eval_results`.

    Results belong to the weights they were measured on: the card records the fingerprint of the weights in
    `output_dir` ([`weight_files_sha256`], metadata key `hf_distill.weights`). When a later update finds other weights
    there (a resumed or new training run exported over the folder), the results, comparison rows and evaluation plots
    of the earlier weights are dropped (with a warning) instead of being shown beside the new weights.

    When `README.md` already exists it is updated, not overwritten: evaluation results are merged (a result with the
    same task, dataset, config, split, revision and metric replaces the old one, the others are kept), tags and
    datasets are united, the other metadata keys are kept, and only the text between `<!-- hf_distill:card:start -->`
    and `<!-- hf_distill:card:end -->` is regenerated (appended when the card has no such block), so that text written
    by a person outside the markers survives. The file is written atomically.

    No local path is written: teacher sources, training data, settings, comparison rows and the datasets of the
    results are published through [`publishable_name`] (Hub ids as they are, local paths as their folder name).

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
            Plots given together with `eval_results` belong to those results (dropped with them).
        base_model: Hub id(s) the student derives from, if any.
        tags: extra tags.
        repo_id: Hub repo id used in the usage snippet (defaults to the folder's name).
        datasets: Hub dataset id(s) of the training data (defaults to `training_data` when it is a Hub id).
        summary: the card's opening paragraph (default: the existing card's, else the method's own from [`METHODS`]).
        pipeline_tag: `image-feature-extraction` (encoders) or `image-classification` (task-specific students).
        method: a key of [`METHODS`]: `unic` (stock transformers encoder), `udon` (embedding model with remote code:
            `trust_remote_code` usage) or `task` (classifier); it picks the tag, the default summary, the usage snippet
            and the default paper. Default: the existing card's method; for a new card, `task` for an
            `image-classification` pipeline, else `unic`.
        method_tag: the Hub tag of the method, in place of its own from [`METHODS`].
        measured_on: fingerprint of the weights `eval_results` were measured on (e.g. `weight_files_sha256` of the
            evaluated folder); a `ValueError` when it is not the weights in `output_dir`. Default: those weights.
        paper: the paper of the training method, `{"title", "authors", "venue", "citation"}` (BibTeX): a trainer's
            `_paper`. The card names it and cites it. Default: the existing card's, else the method's from [`PAPERS`].

    `method`, `summary`, `paper`, `teachers`, `training_data`, `settings`, `comparison` and `plots` are also recorded
    in the card's metadata (key `hf_distill`), so a later update (e.g. by `recipes/evaluate.py`, which only knows the
    evaluation) may leave them to `None` and keeps the recorded ones; plots accumulate.

    Returns:
        The [`huggingface_hub.ModelCard`] written to `output_dir/README.md`.
    """
    if method is not None and method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    readme = output_dir / "README.md"
    existing = ModelCard.load(readme) if readme.is_file() else None
    recorded = dict(getattr(existing.data, "hf_distill", None) or {}) if existing is not None else {}
    method = method or recorded.get("method") or ("task" if pipeline_tag == "image-classification" else "unic")
    summary = summary if summary is not None else recorded.get("summary")
    paper = paper or recorded.get("paper") or PAPERS[method]
    model_name = (
        model_name or (existing.data.model_name if existing is not None else None) or output_dir.resolve().name
    )

    # Results of other weights than the ones in the folder are dropped, with what was shown beside them.
    weights = weight_files_sha256(output_dir)
    old_results = list(existing.data.eval_results or []) if existing is not None else []
    result_plots = list(recorded.get("result_plots", []))
    if measured_on is not None and weights is not None and measured_on != weights:
        raise ValueError(
            f"The results were measured on weights {measured_on} but {output_dir} holds {weights}: evaluate the "
            "model of this folder, or write the card of the folder that was evaluated."
        )
    if weights is not None and recorded.get("weights") != weights and (old_results or recorded.get("comparison")):
        logger.warning(
            "The weights in %s changed since its card's %d evaluation result(s) were measured: dropping them (and "
            "their comparison rows and plots %s); evaluate the new weights again.",
            output_dir, len(old_results), result_plots or "-",
        )  # fmt: skip
        old_results = []
        recorded["comparison"] = None
        recorded["plots"] = [plot for plot in recorded.get("plots", []) if plot not in result_plots]
        result_plots = []

    teachers = scrub_local_paths(teachers if teachers is not None else recorded.get("teachers", []))
    training_data = scrub_local_paths(
        training_data if training_data is not None else recorded.get("training_data", "-")
    )
    settings = scrub_local_paths(settings if settings is not None else recorded.get("settings", {}))
    comparison = scrub_local_paths(comparison if comparison is not None else recorded.get("comparison"))
    plot_paths = [entry["file"] for entry in _plot_entries(output_dir, plots)]
    if eval_results:
        result_plots = _unique([*result_plots, *plot_paths])
    plots = _unique([*recorded.get("plots", []), *plot_paths])
    record = yaml_value(
        {
            "method": method,
            "summary": summary,
            "paper": paper,
            "teachers": teachers,
            "training_data": training_data,
            "settings": settings,
            "comparison": comparison,
            "plots": plots,
            "result_plots": result_plots,
            "weights": weights,
        }
    )

    merged_results = merge_eval_results(old_results, eval_results)
    dataset_ids = _as_list(datasets) or ([training_data] if is_hub_id(training_data) else [])
    card_data = ProtocolCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=_unique(["hf_distill", method_tag or METHODS[method][0], "distillation", *(tags or [])]),
        datasets=dataset_ids or None,
        base_model=base_model,
        eval_results=merged_results or None,
        hf_distill=record,
    )

    teacher_rows = _teacher_rows(teachers)
    names = [row["name"] for row in teacher_rows]
    teachers_text = f"{len(names)} teacher{'s' if len(names) != 1 else ''}: {', '.join(names) or '-'}"
    summary = summary or METHODS[method][1].format(teachers=teachers_text)
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
        model_ref=repo_id or publishable_name(output_dir.resolve()),
        framework_versions=_framework_versions(),
        pipeline_tag=pipeline_tag,
        method=method,
        paper=paper,
    )

    if existing is None:
        card = rendered
        card.data = card_data  # the rendered card parsed its YAML back into a plain ModelCardData
    else:
        kept = {key: value for key, value in existing.data.to_dict().items() if key != "model-index"}
        kept.update(
            model_name=model_name,
            eval_results=merged_results or None,
            library_name="transformers",
            pipeline_tag=pipeline_tag,
            tags=_unique([*_as_list(kept.get("tags")), *card_data.tags]),
            hf_distill=record,
        )
        if dataset_ids:
            kept["datasets"] = _unique([*_as_list(kept.get("datasets")), *dataset_ids])
        if base_model is not None:
            kept["base_model"] = base_model
        card = ModelCard(existing.content)
        card.data = ProtocolCardData(**kept)
        card.text = _splice_block(existing.text, _generated_block(rendered.text))

    if not card.text.endswith("\n"):
        card.text += "\n"
    write_text_atomically(readme, str(card))
    return card
