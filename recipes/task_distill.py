"""Task-specific distillation (docs/methods.md section 3): probe a frozen pretrained teacher on a labelled image task,
then distil it into a small image classifier on real images plus, optionally, synthetic ones (recipes/synthesize.py).

    accelerate launch recipes/task_distill.py --config recipes/configs/task_distill_fashion_mnist.yaml
    accelerate launch recipes/task_distill.py --config recipes/configs/task_distill_dinov2_base_deit_tiny_cifar10.yaml
    accelerate launch recipes/task_distill.py --teacher facebook/dinov2-base --student facebook/deit-tiny-patch16-224 \
        --dataset uoft-cs/cifar10 --image_column img --label_column label --eval_split test \
        --synthetic_dataset outputs/cifar10-mixes --synthetic_ratio 0.5 --output_dir outputs/deit-tiny-cifar10

1. Probe: the teacher's summary features of the train and eval splits are computed once (cached in
   `OUTPUT_DIR/probe/features`), a linear head is fitted on them (L-BFGS, L2 chosen on a held-out part), and the probed
   teacher's eval accuracy is reported (`OUTPUT_DIR/probe/probe_results.json`); a rerun reuses the fitted head.
2. Distil with [`KDTrainer`]: `(1 - alpha) CE + alpha T^2 KL` on real images, the KL term alone on synthetic ones,
   `synthetic_ratio` of every batch synthetic. A killed run restarts from its last checkpoint with the same command.
3. Export: `OUTPUT_DIR` holds a stock transformers image classification model (`AutoModelForImageClassification`,
   `pipeline("image-classification")`), its image processor, `eval_results.json` and a model card with the student's
   and the probed teacher's accuracies. `--push_to_hub true --hub_model_id you/deit-tiny-cifar10` uploads exactly
   that (never a checkpoint, the probe head, the cached teacher features or the training arguments).
"""

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from datasets import ClassLabel, Value, concatenate_datasets
from huggingface_hub import EvalResult
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    CLIPImageProcessorPil,
    set_seed,
)

from hf_distill.recipe_utils import exit_cleanly, parse_with_yaml, setup_logging
from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.image_verification import verify_images
from hf_distill.evaluation.features import encoder_fingerprint, extract_features
from hf_distill.evaluation.linear_probe import fit_linear_probe
from hf_distill.hub import (
    HubOptions,
    create_or_update_model_card,
    plot_loss_terms,
    publishable_name,
    take_hub_options,
    weights_fingerprint,
)
from hf_distill.io_utils import write_json_atomically
from hf_distill.models.configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from hf_distill.models.modeling_teacher import load_teacher, teacher_name
from hf_distill.models.probed_teacher import HEAD_FILE, ProbedTeacher
from hf_distill.restarts import start_run
from hf_distill.trainers import KDConfig, KDTrainer, classification_accuracy

logger = logging.getLogger("hf_distill.recipes.task_distill")
PROBE_RESULTS = "probe_results.json"


@dataclass
class ScriptArguments:
    """Data, teacher and student options of the task-distillation recipe (training options are in `KDConfig`)."""

    teacher: str | None = field(
        default=None,
        metadata={"help": "Teacher backbone: Hub id, folder, or `py:module:function` returning a ModuleTeacher."},
    )
    teacher_summary: str | None = field(default=None, metadata={"help": "Teacher feature: cls, pooler, mean_patch."})
    teacher_image_size: int | None = field(
        default=None, metadata={"help": "Side the teacher runs at (default: its own input size / the student crop)."}
    )
    student: str | None = field(
        default=None, metadata={"help": "Student: Hub id or folder of a transformers image classification model."}
    )
    student_random_init: bool = field(default=False, metadata={"help": "Build the student from its config only."})
    dataset: str | None = field(default=None, metadata={"help": "Task data: Hub id, image folder or save_to_disk."})
    train_split: str = field(default="train", metadata={"help": "Split to probe and distil on."})
    eval_split: str = field(default="test", metadata={"help": "Split the accuracies are reported on."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N eval images."})
    synthetic_dataset: str | None = field(
        default=None, metadata={"help": "Synthetic images (recipes/synthesize.py output, or any image dataset)."}
    )
    synthetic_split: str = field(default="train", metadata={"help": "Split of the synthetic dataset."})
    synthetic_image_column: str = field(default="image", metadata={"help": "Image column of the synthetic dataset."})
    max_synthetic_samples: int | None = field(default=None, metadata={"help": "Keep the first N synthetic images."})
    image_mean: list[float] | None = field(
        default=None,
        metadata={"help": "Student normalization (default: its image processor's, else ImageNet).", "nargs": 3},
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "See image_mean.", "nargs": 3})
    probe_batch_size: int = field(default=64, metadata={"help": "Batch size of the teacher feature extraction."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the accuracy evaluation."})


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, KDConfig]:
    (script_args, training_args), _ = parse_with_yaml((ScriptArguments, KDConfig), argv)
    for name in ("teacher", "student", "dataset"):
        if not getattr(script_args, name):
            raise ValueError(f"--{name} is required.")
    if training_args.synthetic_ratio > 0 and not script_args.synthetic_dataset:
        raise ValueError(
            f"--synthetic_ratio {training_args.synthetic_ratio} needs --synthetic_dataset (e.g. the output of "
            "recipes/synthesize.py); pass one or set --synthetic_ratio 0."
        )
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no":
        raise ValueError(
            f"--eval_strategy {strategy} is not supported by recipes/task_distill.py: its evaluation is the student's "
            "accuracy on --eval_split, measured once after training (eval_results.json). Leave --eval_strategy no."
        )
    if script_args.synthetic_dataset and training_args.synthetic_ratio == 0:
        logger.warning("--synthetic_dataset is given but --synthetic_ratio is 0: the synthetic images are not used.")
    return script_args, training_args


def load_task_data(script_args: ScriptArguments):
    """Train / eval splits with `image` and contiguous int `label` columns, and the class names."""
    splits = {}
    for split, limit in ((script_args.train_split, script_args.max_train_samples),
                         (script_args.eval_split, script_args.max_eval_samples)):  # fmt: skip
        dataset = load_image_dataset(script_args.dataset, script_args.image_column, split)
        if script_args.label_column not in dataset.column_names:
            raise ValueError(
                f"Dataset {script_args.dataset!r} ({split}) has no label column {script_args.label_column!r}; its "
                f"columns are {dataset.column_names}. Pass --label_column."
            )
        dataset = dataset.select_columns([script_args.image_column, script_args.label_column])
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        renames = {script_args.image_column: "image", script_args.label_column: "label"}
        splits[split] = dataset.rename_columns({old: new for old, new in renames.items() if old != new})
    train, evaluation = splits[script_args.train_split], splits[script_args.eval_split]
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        train, evaluation = (d.cast_column("label", Value("int64")) for d in (train, evaluation))
    else:
        values = sorted(set(train["label"]))
        unseen = sorted(set(evaluation["label"]) - set(values), key=str)
        if unseen:
            raise ValueError(f"The eval split has labels never seen in training: {unseen[:5]}.")
        mapping = {value: index for index, value in enumerate(values)}
        names = [str(value) for value in values]
        train, evaluation = (
            d.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True).cast_column(
                "label", Value("int64")
            )
            for d in (train, evaluation)
        )
    if len(names) < 2:
        raise ValueError(f"The task needs at least 2 classes, found {len(names)}.")
    return train, evaluation, names


def load_synthetic(script_args: ScriptArguments):
    """Synthetic images as `image` + `label` = -100 (no label: they only enter the distillation term)."""
    synthetic = load_image_dataset(
        script_args.synthetic_dataset, script_args.synthetic_image_column, script_args.synthetic_split
    ).select_columns([script_args.synthetic_image_column])
    if script_args.max_synthetic_samples is not None:
        synthetic = synthetic.select(range(min(script_args.max_synthetic_samples, len(synthetic))))
    if script_args.synthetic_image_column != "image":
        synthetic = synthetic.rename_column(script_args.synthetic_image_column, "image")
    return synthetic.add_column("label", [-100] * len(synthetic)).cast_column("label", Value("int64"))


def probe_teacher(
    teacher, train, evaluation, script_args, training_args, image_size: int
) -> tuple[ProbedTeacher, dict]:
    """Fit (or reuse) the linear head of the frozen teacher; returns the probed teacher and its results."""
    probe_dir = os.path.join(training_args.output_dir, "probe")
    fingerprint = encoder_fingerprint(teacher)
    key = {
        "teacher_fingerprint": fingerprint,
        "train": train._fingerprint,
        "eval": evaluation._fingerprint,
        "image_size": image_size,
        "seed": training_args.seed,
    }
    results_path = os.path.join(probe_dir, PROBE_RESULTS)
    if os.path.exists(results_path) and os.path.exists(os.path.join(probe_dir, HEAD_FILE)):
        with open(results_path) as handle:
            saved = json.load(handle)
        if saved.get("key") == key:
            logger.info("Reusing the probe in %s: teacher accuracy %.2f%%", probe_dir, saved["accuracy"])
            return ProbedTeacher.from_saved_head(teacher, probe_dir), saved
        logger.info("The probe in %s is for other data or another teacher: fitting a new one", probe_dir)
    cache = os.path.join(probe_dir, "features")
    options = dict(
        label_column="label",
        image_size=image_size,
        batch_size=script_args.probe_batch_size,
        cache_dir=cache,
        device=training_args.device,
    )
    train_set = extract_features(teacher, train, description="Teacher features (train)", **options)
    eval_set = extract_features(teacher, evaluation, description="Teacher features (eval)", **options)
    logger.info("Fitting the linear probe on %d x %d teacher features", *train_set.features.shape)
    fit = fit_linear_probe(
        train_set.features, train_set.labels, eval_set.features, eval_set.labels, seed=training_args.seed
    )
    probed = ProbedTeacher.from_fit(teacher, fit)
    results = {"key": key, "accuracy": fit.test_top1, "val_accuracy": fit.val_top1, "weight_decay": fit.weight_decay}
    if training_args.should_save:
        probed.save_head(probe_dir)
        write_json_atomically(results_path, results)
    logger.info("Probed teacher accuracy on the eval split: %.2f%%", fit.test_top1)
    return probed, results


def build_student(script_args: ScriptArguments, names: list[str], image_size: int):
    """The student classifier with the task's labels; one forward pass on an `image_size` input checks that it runs
    there (e.g. a pretrained ViT at another resolution does not), before any expensive work."""
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    if script_args.student_random_init:
        config = AutoConfig.from_pretrained(script_args.student, **labels)
        if hasattr(config, "image_size"):
            config.image_size = image_size
        student = AutoModelForImageClassification.from_config(config)
    else:
        student = AutoModelForImageClassification.from_pretrained(
            script_args.student, ignore_mismatched_sizes=True, **labels
        )
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            shape = tuple(student(pixel_values=torch.zeros(1, 3, image_size, image_size)).logits.shape)
    except Exception as error:  # each architecture raises its own error type for a wrong input size
        native = getattr(student.config, "image_size", None)
        hint = f" (its input size is {native}: pass --image_size {native})" if native else ""
        raise ValueError(
            f"The student {script_args.student!r} cannot classify {image_size} px images{hint}: {error}"
        ) from error
    student.train(was_training)
    if shape != (1, len(names)):
        raise ValueError(f"The student outputs logits of shape {shape}, expected (1, {len(names)}).")
    return student


def student_normalization(script_args: ScriptArguments) -> tuple[list[float], list[float]]:
    if script_args.image_mean and script_args.image_std:
        return list(script_args.image_mean), list(script_args.image_std)
    try:
        processor = AutoImageProcessor.from_pretrained(script_args.student)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> tuple[KDTrainer, dict]:
    script_args, training_args = parse_args(argv)
    hub_options = take_hub_options(training_args)  # the Trainer never pushes; the final export is pushed in export()
    setup_logging(training_args)
    set_seed(training_args.seed)
    train, evaluation, names = load_task_data(script_args)  # data problems surface here
    synthetic = (
        load_synthetic(script_args) if script_args.synthetic_dataset and training_args.synthetic_ratio else None
    )
    checked = verify_images({"train": train, "eval": evaluation, "synthetic": synthetic}, training_args)
    train, evaluation, synthetic = checked["train"], checked["eval"], checked["synthetic"]  # all images readable
    teacher_options = {"summary": script_args.teacher_summary, "image_size": script_args.teacher_image_size}
    teacher_options = {key: value for key, value in teacher_options.items() if value is not None}
    size = training_args.image_size
    student = build_student(script_args, names, size)  # student problems surface before the probe
    teacher = load_teacher(script_args.teacher, **teacher_options)
    teacher_size = teacher.teacher_input_size(size, size, None)[0]  # what it sees of a student crop in training
    logger.info(
        "Task: %d classes, %d train / %d eval images%s; teacher %s at %d px",
        len(names), len(train), len(evaluation),
        f", {len(synthetic)} synthetic" if synthetic is not None else "", teacher_name(teacher), teacher_size,
    )  # fmt: skip
    run = start_run(  # lock, complete checkpoint, manifest: a rerun resumes only the same run
        training_args, "task_distill", teachers={"teacher": teacher}, student_config=student.config,
        initial_weights={} if script_args.student_random_init else {"student": script_args.student},
        data={"train": train, "eval": evaluation, **({"synthetic": synthetic} if synthetic is not None else {})},
        options=(script_args, training_args),
    )  # fmt: skip
    with training_args.main_process_first(desc="teacher probe"):  # the other processes then reuse its head
        probed, probe_results = probe_teacher(teacher, train, evaluation, script_args, training_args, teacher_size)

    mean, std = student_normalization(script_args)
    logger.info("Student %s: %s parameters", student.config.model_type, f"{student.num_parameters():,}")
    train_data = concatenate_datasets([train, synthetic]) if synthetic is not None else train
    trainer = KDTrainer(
        model=student,
        teacher=probed,
        args=training_args,
        train_dataset=train_data,
        num_synthetic=len(synthetic) if synthetic is not None else 0,
        image_mean=mean,
        image_std=std,
        callbacks=callbacks,
    )
    run.train(trainer)  # a finished run trains nothing; a stopped one raises TrainingStopped

    accuracy = classification_accuracy(student, evaluation, size, mean, std, script_args.eval_batch_size)
    results = {
        "student_accuracy": accuracy,
        "teacher_probe_accuracy": probe_results["accuracy"],
        "eval_split": script_args.eval_split,
        "num_eval": len(evaluation),
        "alpha": training_args.alpha,
        "temperature": training_args.temperature,
        "synthetic_ratio": training_args.synthetic_ratio,
        "num_synthetic": len(synthetic) if synthetic is not None else 0,
    }
    logger.info("Student accuracy %.2f%% (probed teacher %.2f%%)", accuracy, probe_results["accuracy"])
    trainer.save_model(training_args.output_dir)  # on every process: DeepSpeed ZeRO-3 / FSDP gather the weights
    if training_args.should_save:
        export(trainer, script_args, training_args, results, mean, std, names, teacher_name(teacher), hub_options)
    run.close()
    return trainer, results


def export(
    trainer, script_args, training_args, results, mean, std, names, teacher: str, hub_options: HubOptions | None = None
) -> None:
    """Image processor + eval_results.json + plots + model card beside the saved student in `output_dir`; push when
    asked (`hub_options`). `teacher` is the name of the probed teacher in the card."""
    output_dir = training_args.output_dir
    size = training_args.image_size
    CLIPImageProcessorPil(  # the evaluation transform: shorter side to `size`, center crop, normalize
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std
    ).save_pretrained(output_dir)
    weights = weights_fingerprint(output_dir)
    dataset_name = publishable_name(script_args.dataset)
    write_json_atomically(
        os.path.join(output_dir, "eval_results.json"), {**results, "dataset": dataset_name, "weights": weights}
    )
    plots = []
    curve = plot_loss_terms(
        trainer.state.log_history,
        ["loss", "cross_entropy", "kl"],
        os.path.join(output_dir, "plots", "training_loss.png"),
    )
    if curve:
        plots.append(os.path.relpath(curve, output_dir))
    task_name = f"Image classification ({len(names)} classes)"
    create_or_update_model_card(
        output_dir,
        teachers=[{"name": teacher, "source": script_args.teacher}],
        training_data=script_args.dataset,
        settings={
            "student": script_args.student,
            "classes": len(names),
            "image size": size,
            "alpha": training_args.alpha,
            "temperature": training_args.temperature,
            "synthetic images": results["num_synthetic"],
            "synthetic ratio": training_args.synthetic_ratio,
            "steps": trainer.state.global_step,
        },
        eval_results=[
            EvalResult(
                task_type="image-classification",
                task_name=task_name,
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                dataset_split=script_args.eval_split,
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
        plots=plots,
        summary=(
            f"An image classifier ({len(names)} classes) distilled with hf_distill's task-specific distillation "
            f"(Marrie et al., TMLR 2024) from a linear probe on the frozen teacher {teacher}"
            f": (1 - alpha) CE + alpha T^2 KL on real images"
            + (", KL alone on synthetic ImageMixer images" if results["num_synthetic"] else "")
            + ". It ships as a stock transformers image classification model."
        ),
        pipeline_tag="image-classification",
        method_tag="task-specific-distillation",
        method="task",
        repo_id=training_args.hub_model_id,
    )
    if hub_options is not None:
        hub_options.push(output_dir, "Upload task-distilled classifier")


if __name__ == "__main__":
    main()
    exit_cleanly(0)
