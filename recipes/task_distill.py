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

import logging
import os
from dataclasses import dataclass, field

from datasets import concatenate_datasets
from transformers import CLIPImageProcessorPil, set_seed

from hf_distill.data.image_verification import verify_images
from hf_distill.data.labels import contiguous_labels, load_labelled_split, unlabelled_images
from hf_distill.distributed_checks import check_distributed_setup
from hf_distill.hub import take_hub_options
from hf_distill.hub.method_cards import write_task_distill_card
from hf_distill.models.student_classifier import build_student_classifier, student_normalization
from hf_distill.models.teacher_loading import load_teacher, teacher_name
from hf_distill.probing import probe_teacher
from hf_distill.recipe_utils import exit_cleanly, parse_with_yaml, setup_logging
from hf_distill.restarts import start_run
from hf_distill.trainers import KDConfig, KDTrainer, classification_accuracy

logger = logging.getLogger("hf_distill.recipes.task_distill")


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
    train, evaluation = (
        load_labelled_split(script_args.dataset, split, script_args.image_column, script_args.label_column, limit)
        for split, limit in ((script_args.train_split, script_args.max_train_samples),
                             (script_args.eval_split, script_args.max_eval_samples))
    )  # fmt: skip
    return contiguous_labels(train, evaluation)


def main(argv: list[str] | None = None, callbacks: list | None = None) -> tuple[KDTrainer, dict]:
    script_args, training_args = parse_args(argv)
    hub_options = take_hub_options(training_args)  # the Trainer never pushes; the final export is pushed in export()
    setup_logging(training_args)
    # refuses a silent fallback, before anything is loaded
    check_distributed_setup(training_args, teachers="replicated")
    set_seed(training_args.seed)
    train, evaluation, names = load_task_data(script_args)  # data problems surface here
    synthetic = None
    if script_args.synthetic_dataset and training_args.synthetic_ratio:  # no label: only in the distillation term
        synthetic = unlabelled_images(
            script_args.synthetic_dataset,
            script_args.synthetic_split,
            script_args.synthetic_image_column,
            script_args.max_synthetic_samples,
        )
    checked = verify_images({"train": train, "eval": evaluation, "synthetic": synthetic}, training_args)
    train, evaluation, synthetic = checked["train"], checked["eval"], checked["synthetic"]  # all images readable
    teacher_options = {"summary": script_args.teacher_summary, "image_size": script_args.teacher_image_size}
    teacher_options = {key: value for key, value in teacher_options.items() if value is not None}
    size = training_args.image_size
    # student problems surface before the probe
    student = build_student_classifier(script_args.student, names, size, script_args.student_random_init)
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
        probed, probe_results = probe_teacher(
            teacher, train, evaluation, os.path.join(training_args.output_dir, "probe"), teacher_size,
            seed=training_args.seed, batch_size=script_args.probe_batch_size, device=training_args.device,
            save=training_args.should_save,
        )  # fmt: skip

    mean, std = student_normalization(script_args.student, script_args.image_mean, script_args.image_std)
    logger.info("Student %s: %s parameters", student.config.model_type, f"{student.num_parameters():,}")
    train_data = concatenate_datasets([train, synthetic]) if synthetic is not None else train
    processor = CLIPImageProcessorPil(  # the evaluation transform: shorter side to `size`, center crop, normalize
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, image_mean=mean, image_std=std
    )  # saved with the student by the final (atomic) save_model
    trainer = KDTrainer(
        model=student,
        teacher=probed,
        args=training_args,
        train_dataset=train_data,
        num_synthetic=len(synthetic) if synthetic is not None else 0,
        image_mean=mean,
        image_std=std,
        processing_class=processor,
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
    # on every process (DeepSpeed ZeRO-3 / FSDP gather the weights); the student and its processor, atomically
    trainer.save_model(training_args.output_dir)
    if training_args.should_save:
        export(trainer, script_args, training_args, results, names, teacher_name(teacher), hub_options)
    run.close()
    return trainer, results


def export(trainer, script_args, training_args, results, names, teacher: str, hub_options=None) -> None:
    """eval_results.json + plots + model card beside the saved student and its image processor in `output_dir`;
    push when asked (`hub_options`). `teacher` is the name of the probed teacher in the card."""
    output_dir, size = training_args.output_dir, training_args.image_size
    settings = {
        "student": script_args.student,
        "classes": len(names),
        "image size": size,
        "alpha": training_args.alpha,
        "temperature": training_args.temperature,
        "synthetic images": results["num_synthetic"],
        "synthetic ratio": training_args.synthetic_ratio,
        "steps": trainer.state.global_step,
    }
    write_task_distill_card(
        output_dir, results, teacher=teacher, teacher_source=script_args.teacher, dataset=script_args.dataset,
        eval_split=script_args.eval_split, num_classes=len(names), settings=settings,
        log_history=trainer.state.log_history, repo_id=training_args.hub_model_id, paper=trainer._paper,
        tags=trainer._tag_names,
    )  # fmt: skip
    if hub_options is not None:
        hub_options.push(output_dir, "Upload task-distilled classifier")


if __name__ == "__main__":
    main()
    exit_cleanly(0)
