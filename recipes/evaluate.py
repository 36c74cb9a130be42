"""Evaluate one or more encoders (e.g. a distilled student and its teachers) and compare them.

    python recipes/evaluate.py --models outputs/unic-tiny facebook/dino-vits16 --model_names student dino \
        --config recipes/configs/eval_example.yaml --output_dir outputs/unic-tiny/eval

    # shorthand for k-NN + linear probe on a dataset with `train` / `test` splits and `image` / `label` columns
    python recipes/evaluate.py --models outputs/unic-tiny --dataset mnist=path/to/mnist --output_dir eval

    # every export of hf_distill: a UNIC encoder, a UDON embedding model (ships its own code: --trust_remote_code),
    # a task_distill image classifier
    python recipes/evaluate.py --models outputs/unic-tiny outputs/udon outputs/task-classifier --trust_remote_code \
        --dataset mnist=path/to/mnist --output_dir eval

What is evaluated: the CLS token of ViT-family encoders (a UNIC export, a teacher backbone; the backbone of a
task_distill classifier, without its head), and the `image_embeds` of a model with its own code (UDON: the 64-d
L2-normalized universal embedding; else its `pooler_output`). Models with their own code load only with
`--trust_remote_code`; every model is checked before any evaluation starts.

Teacher emulation (`--adaptors`, the adaptor export of recipes/unic.py `--export_adaptors true`): every adaptor is
scored against its real teacher on every dataset's test split (cosine similarity and R^2 of summary and patch
tokens; top-1 agreement through a teacher head given with `--emulation_heads`), reported with the first model:

    python recipes/evaluate.py --models outputs/unic-tiny --dataset mnist=path/to/mnist --trust_remote_code \
        --adaptors outputs/unic-tiny/adaptors --emulation_teachers dinov2-small=facebook/dinov2-small \
        --output_dir eval

Prints a comparison table, writes `eval_results.json` and `plots/eval_comparison.png` to `--output_dir`, caches
features under `--cache_dir` (a second evaluation of the same model on the same data reads them back), and with
`--model_card_dir` adds the first model's results to the model card (`model-index`) of that exported student.
"""

import logging
import os
from dataclasses import dataclass, field

from hf_distill import hub
from hf_distill.evaluation.emulation import evaluate_emulation
from hf_distill.evaluation.features import check_remote_code
from hf_distill.evaluation.suite import EvalDataset, card_results, evaluate_encoder
from hf_distill.hub.method_cards import add_evaluation_to_card
from hf_distill.io_utils import write_json_atomically
from hf_distill.recipe_utils import parse_with_yaml

logger = logging.getLogger("hf_distill.recipes.evaluate")


@dataclass
class EvaluateArguments:
    models: list[str] = field(
        default_factory=list, metadata={"help": "Encoders to evaluate: Hub ids or local folders.", "nargs": "+"}
    )
    model_names: list[str] | None = field(
        default=None, metadata={"help": "Names of the models in the table (default: folder / id).", "nargs": "+"}
    )
    dataset: list[str] | None = field(
        default=None,
        metadata={"help": "Shorthand NAME=PATH for k-NN + linear probe on train/test splits.", "nargs": "+"},
    )
    output_dir: str = field(default="eval_results", metadata={"help": "Where eval_results.json and plots go."})
    cache_dir: str | None = field(default=None, metadata={"help": "Feature cache folder (off by default)."})
    image_size: list[int] | None = field(
        default=None,
        metadata={
            "help": "Input side, one for all models or one per model (default: each model's own).",
            "nargs": "+",
        },
    )
    batch_size: int = field(default=64, metadata={"help": "Feature extraction batch size."})
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200], metadata={"help": "k values of k-NN."})
    knn_temperature: float = field(default=0.07, metadata={"help": "k-NN vote temperature."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda if available)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Load models that ship their own code (e.g. UDON embedding exports), which runs that code: only "
            "for sources you trust."
        },
    )
    adaptors: str | None = field(
        default=None,
        metadata={
            "help": "Adaptor export of the first model (recipes/unic.py --export_adaptors true): its teacher emulation "
            "is scored on each dataset's test split and reported with the first model. Needs --trust_remote_code."
        },
    )
    emulation_teachers: list[str] | None = field(
        default=None,
        metadata={
            "help": "NAME=SOURCE per adaptor to score: the adaptor's teacher (Hub id, folder or py: factory).",
            "nargs": "+",
        },
    )
    emulation_heads: list[str] | None = field(
        default=None,
        metadata={
            "help": "NAME=py:module:function returning a head (classifier / projection) that reads that teacher's "
            "summary: adds the top-1 agreement of teacher+head and adaptor+head.",
            "nargs": "+",
        },
    )
    emulation_max_samples: int | None = field(
        default=None,
        metadata={"help": "Teacher emulation on at most N test images per dataset (default: all that are evaluated)."},
    )
    model_card_dir: str | None = field(
        default=None, metadata={"help": "Exported student folder whose model card gets the first model's results."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[EvaluateArguments, list[EvalDataset]]:
    """CLI options with an optional `--config` YAML as defaults; the YAML's `datasets:` list defines the suite."""
    (args,), extra = parse_with_yaml((EvaluateArguments,), argv, list_keys=("datasets",))
    suite = [EvalDataset(**spec) for spec in extra.get("datasets", [])]
    for item in args.dataset or []:
        name, separator, path = item.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--dataset takes NAME=PATH, got {item!r}.")
        suite.append(EvalDataset(name=name, path=path))
    if not args.models:
        raise ValueError("Nothing to evaluate: pass --models ID_OR_PATH [ID_OR_PATH ...].")
    if not suite:
        raise ValueError("No datasets: pass --dataset NAME=PATH or a --config YAML with a `datasets:` list.")
    if args.image_size is not None and len(args.image_size) not in (1, len(args.models)):
        raise ValueError(f"--image_size takes one value or one per model ({len(args.models)}).")
    if args.model_names is not None and len(args.model_names) != len(args.models):
        raise ValueError(f"--model_names has {len(args.model_names)} names for {len(args.models)} models.")
    emulation_options(args)  # fails on a malformed NAME=SOURCE before any work
    return args, suite


def _named(items: list[str] | None, option: str) -> dict[str, str]:
    named = {}
    for item in items or []:
        name, separator, value = item.partition("=")
        if not separator or not name or not value:
            raise ValueError(f"{option} takes NAME=VALUE items (NAME: the adaptor / teacher name), got {item!r}.")
        named[name] = value
    return named


def emulation_options(args: EvaluateArguments) -> tuple[dict[str, str], dict[str, str]]:
    """`(teachers, heads)` of the teacher-emulation options, checked: `{name: source}`, `{name: py: spec}`."""
    teachers = _named(args.emulation_teachers, "--emulation_teachers")
    heads = _named(args.emulation_heads, "--emulation_heads")
    if args.adaptors is None:
        if teachers or heads:
            raise ValueError("--emulation_teachers / --emulation_heads score an adaptor export: pass --adaptors.")
        return teachers, heads
    if not teachers:
        raise ValueError("--adaptors needs --emulation_teachers NAME=SOURCE (the teacher of each adaptor to score).")
    headless = sorted(set(heads) - set(teachers))
    if headless:
        raise ValueError(f"--emulation_heads for {headless}, which have no --emulation_teachers entry.")
    return teachers, heads


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per metric, one column per model."""
    names = list(results)
    metrics = list(dict.fromkeys(metric for values in results.values() for metric in values))
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        digits = 3 if "/emulation/" in metric and not metric.endswith("agreement") else 2  # cosines and R^2 in [0, 1]
        cells = [f"{results[name][metric]:.{digits}f}" if metric in results[name] else "-" for name in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args, suite = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_distill").setLevel(logging.INFO)
    names = args.model_names or [model.rstrip("/").split("/")[-1] for model in args.models]
    sizes = (
        args.image_size if args.image_size and len(args.image_size) > 1 else (args.image_size or [None]) * len(names)
    )
    dense = any("segmentation" in spec.protocols for spec in suite)
    for model in args.models:  # config files only: a model that cannot be evaluated fails before any work
        check_remote_code(model, args.trust_remote_code, patch_tokens=dense)
    emulation_teachers, emulation_heads = emulation_options(args)
    if args.adaptors is not None and not check_remote_code(args.adaptors, args.trust_remote_code):
        raise ValueError(f"--adaptors {args.adaptors!r} is not an adaptor export (no auto_map in its config.json).")
    results = {}
    for name, model, image_size in zip(names, args.models, sizes):
        logger.info("Evaluating %s (%s) on %s", name, model, ", ".join(spec.name for spec in suite))
        results[name] = evaluate_encoder(
            model,
            suite,
            image_size=image_size,
            batch_size=args.batch_size,
            cache_dir=args.cache_dir,
            knn_k=tuple(args.knn_k),
            knn_temperature=args.knn_temperature,
            device=args.device,
            name=name,
            trust_remote_code=args.trust_remote_code,
        )
    if args.adaptors is not None:
        for spec in suite:
            logger.info("Teacher emulation of %s on %s", args.adaptors, spec.name)
            scores = evaluate_emulation(
                args.adaptors,
                emulation_teachers,
                spec.load(
                    spec.test_split,
                    min(filter(None, (spec.max_test_samples, args.emulation_max_samples)), default=None),
                ),
                image_column=spec.image_column,
                heads=emulation_heads,
                batch_size=args.batch_size,
                device=args.device,
                trust_remote_code=True,
                description=f"emulation | {spec.name}/{spec.test_split}",
            )
            results[names[0]].update({f"{spec.name}/emulation/{key}": value for key, value in scores.items()})
    print(format_table(results))
    payload = {
        "models": {name: {"source": model, "results": results[name]} for name, model in zip(names, args.models)},
        "datasets": [vars(spec) for spec in suite],
    }
    if args.adaptors is not None:
        payload["emulation"] = {"adaptors": args.adaptors, "teachers": emulation_teachers, "heads": emulation_heads}
    write_json_atomically(os.path.join(args.output_dir, "eval_results.json"), payload)
    logger.info("Wrote %s", os.path.join(args.output_dir, "eval_results.json"))
    headline = {
        name: {key: value for key, value in values.items() if key.count("/") == 1} for name, values in results.items()
    }  # per-domain retrieval scores stay out of the chart
    chart = hub.plot_eval_comparison(headline, os.path.join(args.output_dir, "plots", "eval_comparison.png"))
    logger.info("Wrote %s", chart)
    if args.model_card_dir is not None:
        update_model_card(args.model_card_dir, results, suite, names[0], chart, payload, model=args.models[0])
    return results


def update_model_card(
    card_dir: str, results, suite, student: str, chart: str, payload: dict, model: str | None = None
) -> None:
    """Add the student's results, the other models' values and the comparison chart to the card of the exported
    student in `card_dir` (see [`add_evaluation_to_card`])."""
    eval_results, comparison = card_results(results, suite, student)
    card = add_evaluation_to_card(card_dir, eval_results, comparison, chart, payload, model=model)
    logger.info("Updated the model card %s (%d results)", os.path.join(card_dir, "README.md"), len(eval_results))
    return card


if __name__ == "__main__":
    main()
