"""The export of each distillation method beside its saved model: `eval_results.json` tied to the exported weights,
plots, and the model card with the method's settings and results ([`create_or_update_model_card`]); and the results of
`recipes/evaluate.py` added to an exported student's card ([`add_evaluation_to_card`])."""

import os
import shutil

from huggingface_hub import EvalResult

from ..io_utils import write_json_atomically
from .card import create_or_update_model_card
from .plots import plot_domain_retrieval, plot_loss_terms, plot_sampler_weights
from .provenance import is_hub_id, publishable_name, scrub_local_paths, weight_files_sha256


def write_task_distill_card(
    output_dir: str,
    results: dict,
    *,
    teacher: str,
    teacher_source: str,
    dataset: str,
    eval_split: str,
    num_classes: int,
    settings: dict,
    log_history: list[dict],
    repo_id: str | None = None,
    paper: dict | None = None,
    tags: list[str] | None = None,
) -> None:
    """`eval_results.json`, the loss plot and the model card of a task-distilled classifier saved in `output_dir`.

    Args:
        results: `student_accuracy`, `teacher_probe_accuracy` (top-1 %) and `num_synthetic`, with any other values
            to record in `eval_results.json`.
        teacher: name of the probed teacher in the card; `teacher_source` its Hub id / folder / spec.
        dataset: the task data (a local path is published as its folder name).
        settings: the card's settings table.
        log_history: `trainer.state.log_history` (the loss terms `loss`, `cross_entropy`, `kl` are plotted).
        paper: the trainer's `_paper`, cited by the card (see [`create_or_update_model_card`]).
        tags: the card's extra tags (the trainer's `_tag_names`).
    """
    weights = weight_files_sha256(output_dir)
    dataset_name = publishable_name(dataset)
    write_json_atomically(
        os.path.join(output_dir, "eval_results.json"), {**results, "dataset": dataset_name, "weights": weights}
    )
    curve = plot_loss_terms(
        log_history, ["loss", "cross_entropy", "kl"], os.path.join(output_dir, "plots", "training_loss.png")
    )
    task_name = f"Image classification ({num_classes} classes)"
    create_or_update_model_card(
        output_dir,
        teachers=[{"name": teacher, "source": teacher_source}],
        training_data=dataset,
        settings=settings,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                task_name=task_name,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=eval_split,
                metric_type="accuracy",
                metric_name="top-1 accuracy (%)",
                metric_value=round(results["student_accuracy"], 2),
            )
        ],
        measured_on=weights,
        comparison=[
            {
                "task": task_name,
                "dataset": dataset_name,
                "metric": "top-1 accuracy (%)",
                "teachers": {f"{teacher} (probed)": round(results["teacher_probe_accuracy"], 2)},
            }
        ],
        plots=[os.path.relpath(curve, output_dir)] if curve else [],
        summary=(
            f"An image classifier ({num_classes} classes) distilled with hf_distill's task-specific distillation "
            f"(Marrie et al., TMLR 2024) from a linear probe on the frozen teacher {teacher}"
            f": (1 - alpha) CE + alpha T^2 KL on real images"
            + (", KL alone on synthetic ImageMixer images" if results["num_synthetic"] else "")
            + ". It ships as a stock transformers image classification model."
        ),
        pipeline_tag="image-classification",
        method_tag="task-specific-distillation",
        method="task",
        tags=tags,
        repo_id=repo_id,
        paper=paper,
    )


def retrieval_eval_results(results: dict, specs: list) -> list[EvalResult]:
    """R@1 and mMP@5 of every domain and of their mean, as `model-index` results: one retrieval task (one index merged
    over all domains) per domain dataset and one for the mean. `specs` are the domains' [`DomainSpec`]s."""
    task = {"task_type": "image-retrieval", "task_name": "Universal retrieval (merged index)"}
    datasets = {
        spec.name: {
            "dataset_type": publishable_name(spec.path),
            "dataset_name": spec.name,
            "dataset_split": spec.eval_split or f"{spec.train_split} (held-out {spec.eval_fraction:g})",
        }
        for spec in specs
    }
    datasets["mean"] = {
        "dataset_type": "+".join(datasets[name]["dataset_type"] for name in results["per_domain"]),
        "dataset_name": f"Mean over {len(results['per_domain'])} domains",
    }
    groups = {**results["per_domain"], "mean": results["mean"]}
    return [
        EvalResult(
            **task,
            **datasets[name],
            metric_type=metric.lower().replace("@", "_at_"),
            metric_name=metric,
            metric_value=round(float(values[metric]), 2),
        )
        for name, values in groups.items()
        for metric in ("R@1", "mMP@5")
    ]


def write_udon_card(
    output_dir: str,
    results: dict,
    specs: list,
    *,
    method: str,
    backbone: str,
    random_init: bool,
    settings: dict,
    log_history: list[dict],
    embedding_dim: int,
    repo_id: str | None = None,
    paper: dict | None = None,
    tags: list[str] | None = None,
) -> None:
    """`eval_results.json` (tied to the exported weights), plots (retrieval per domain, sampler weights) and the model
    card of a UDON / USCRR embedding model saved in `output_dir`. `specs` are the domains' [`DomainSpec`]s, `settings`
    the card's settings table, `paper` the trainer's `_paper`, `tags` extra tags (the trainer's `_tag_names`)."""
    weights = weight_files_sha256(output_dir)
    write_json_atomically(os.path.join(output_dir, "eval_results.json"), {**results, "weights": weights})
    plots = [plot_domain_retrieval(results, os.path.join(output_dir, "plots", "retrieval_per_domain.png"))]
    plots.append(plot_sampler_weights(log_history, os.path.join(output_dir, "plots", "sampler.png")))
    create_or_update_model_card(
        output_dir,
        teachers=[],
        training_data=", ".join(f"{spec.name} ({publishable_name(spec.path)})" for spec in specs),
        datasets=[spec.path for spec in specs if is_hub_id(spec.path)],
        settings=settings,
        eval_results=retrieval_eval_results(results, specs),
        measured_on=weights,
        plots=[os.path.relpath(plot, output_dir) for plot in plots if plot is not None],
        summary=(
            f"A universal image embedding ({embedding_dim}-d, L2-normalized) over {len(specs)} domains, "
            f"trained with hf_distill's implementation of {method.upper()}"
            + (
                " (Ypsilantis et al., NeurIPS 2024): one shared backbone with online per-domain teacher heads "
                "distilled into the universal head, and a dynamic domain sampler"
                if method == "udon"
                else ", the USCRR baseline (one shared backbone and head trained with per-domain classifiers)"
            )
            + ". Only the embedding model ships: backbone, universal head and L2 norm."
        ),
        base_model=backbone if is_hub_id(backbone) and not random_init else None,
        pipeline_tag="image-feature-extraction",
        method_tag="udon",
        method="udon",
        tags=[*(tags or []), "image-retrieval", "universal-embedding"],
        repo_id=repo_id,
        paper=paper,
    )


def add_evaluation_to_card(
    card_dir: str,
    eval_results: list[EvalResult],
    comparison: list[dict],
    chart: str,
    payload: dict,
    model: str | None = None,
):
    """Add evaluation results (`model-index`), the other models' values (`comparison`) and the comparison `chart` to
    the card of the exported student in `card_dir`; `payload` (all results) is also written there as
    `eval_results.json`, local paths as folder names, with the fingerprint of the weights. `model` is the evaluated
    student: when it is a folder, its weights must be the ones in `card_dir`.

    Returns:
        The updated `ModelCard`.
    """
    measured_on = weight_files_sha256(model) if model is not None and os.path.isdir(model) else None
    plot_path = os.path.join(card_dir, "plots", "eval_comparison.png")
    if os.path.abspath(chart) != os.path.abspath(plot_path):
        os.makedirs(os.path.dirname(plot_path), exist_ok=True)
        shutil.copyfile(chart, plot_path)
    card = create_or_update_model_card(
        card_dir,
        eval_results=eval_results,
        comparison=comparison,
        plots=["plots/eval_comparison.png"],
        measured_on=measured_on,
    )
    published = {**scrub_local_paths(payload), "weights": weight_files_sha256(card_dir)}
    write_json_atomically(os.path.join(card_dir, "eval_results.json"), published)
    return card
