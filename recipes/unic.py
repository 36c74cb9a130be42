"""UNIC: distil several frozen teachers into one universal student encoder.

One GPU or CPU:
    accelerate launch recipes/unic.py --config recipes/configs/unic_tiny.yaml

Several GPUs (DDP; FSDP and DeepSpeed configs sit beside it):
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/unic.py \
        --config recipes/configs/unic_vitb16_in1k_4teachers.yaml

Two processes on CPU (`accelerate launch --cpu` silently starts only one):
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        recipes/unic.py --config recipes/configs/unic_tiny.yaml --use_cpu

Held-out images (`--eval_data`, same formats as `--train_data`) give the evaluation loss: the distillation loss on
their center crops, without teacher dropping, logged as `eval_loss` and per teacher (`eval_<teacher>/cls_loss`,
`eval_<teacher>/patch_loss`) at every `--eval_strategy steps --eval_steps N` and once after training. An
`--eval_strategy` other than `no` without `--eval_data` is refused before anything is loaded.

Any option of the YAML file can be overridden on the command line (`--max_steps 10`). A killed run restarts from its
last checkpoint in `--output_dir` when launched again with the same command. The final `--output_dir` holds the
student encoder as a stock transformers model: `AutoModel.from_pretrained(output_dir)`; with `--export_adaptors true`,
`output_dir/adaptors` also holds the student with one adaptor per teacher (outputs in each teacher's own feature
space): `AutoModel.from_pretrained(output_dir + "/adaptors", trust_remote_code=True)`.
"""

import functools
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from hf_distill.data.image_datasets import ImageCollator, load_image_dataset
from hf_distill.data.image_verification import verify_images
from hf_distill.data.streaming import load_streaming_train_dataset
from hf_distill.distributed_checks import check_distributed_setup
from hf_distill.hub import take_hub_options
from hf_distill.models import UnicStudentConfig, UnicStudentModel, load_teacher, load_teacher_config
from hf_distill.models.builders import load_student_backbone_config
from hf_distill.models.configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from hf_distill.models.fingerprint import teacher_identity
from hf_distill.models.standardization import STANDARDIZATION_MODES
from hf_distill.models.student_backbones import describe_backbone, load_pretrained_backbone
from hf_distill.models.teacher_loading import is_factory_spec
from hf_distill.models.teacher_quantization import Calibration, calibration_views, load_checked_teacher
from hf_distill.recipe_utils import exit_cleanly, parse_with_yaml, profiler_callbacks, setup_logging
from hf_distill.restarts import start_run
from hf_distill.trainers import UnicConfig, UnicTrainer, teacher_spec, unique_teacher_names
from hf_distill.trainers.cache_options import CacheOptions
from hf_distill.trainers.cache_views import CropViews
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.teacher_cache_shards import TeacherOutputShards

logger = logging.getLogger("hf_distill.recipes.unic")  # under "hf_distill" so it follows the same level


@dataclass
class ScriptArguments:
    """Data and student options of the UNIC recipe (training options are in `UnicConfig`)."""

    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, folder or config.json of a transformers ViT-family (ViT, DINOv2, ...) or feature-map "
            "(ConvNeXt, ResNet, Swin) config; the student is built from it with random weights."
        },
    )
    student_model: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or folder of a pretrained student encoder (same families as --student_config) whose "
            "weights initialize the student; position embeddings are resized to --image_size. Recorded in the "
            "model card. Exclusive with --student_config."
        },
    )
    student_revision: str | None = field(default=None, metadata={"help": "Revision of --student_model."})
    train_data: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id, local image folder, or folder written by datasets.save_to_disk; with --streaming "
            "a Hub dataset id or a folder / glob pattern of parquet or WebDataset tar shards."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream --train_data shard by shard instead of loading it (web-scale data): split over processes "
            "and workers, shuffled with a buffer, resumed exactly; needs --max_steps."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000, metadata={"help": "Examples in the shuffle buffer of --streaming (0: shards read in order)."}
    )
    teacher_cache_shard_size: int = field(
        default=1000,
        metadata={"help": "Images per WebDataset shard when --streaming writes the --teacher_cache shards."},
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    dataset_split: str = field(default="train", metadata={"help": "Split of --train_data to train on."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "Held-out images for the evaluation loss (distillation loss on center crops, no teacher "
            "dropping), same formats as --train_data; needed by --eval_strategy steps / epoch."
        },
    )
    eval_split: str = field(default="validation", metadata={"help": "Split of --eval_data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval images."})
    use_ladder: bool = field(default=True, metadata={"help": "Ladder of projectors over the student's blocks."})
    ladder_layers: list[int] | None = field(
        default=None, metadata={"help": "1-based blocks feeding the ladder (default: all).", "nargs": "+"}
    )
    standardization: str = field(
        default="unic", metadata={"help": f"Teacher feature standardization, one of {STANDARDIZATION_MODES}."}
    )
    standardization_warmup_steps: int = field(
        default=100,
        metadata={"help": "phi-s only: training batches that estimate the transform before it is frozen."},
    )
    student_image_mean: list[float] = field(
        default_factory=lambda: list(IMAGENET_MEAN), metadata={"help": "Student pixel mean.", "nargs": 3}
    )
    student_image_std: list[float] = field(
        default_factory=lambda: list(IMAGENET_STD), metadata={"help": "Student pixel std.", "nargs": 3}
    )
    profile: bool = field(
        default=False,
        metadata={"help": "Record a PyTorch profiler trace of training steps 3-5 into OUTPUT_DIR/profile."},
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, UnicConfig]:
    """Parse `argv`, with the YAML file of `--config` (if any) as defaults that the command line overrides."""
    (script_args, training_args), _ = parse_with_yaml((ScriptArguments, UnicConfig), argv)
    if script_args.student_config and script_args.student_model:
        raise ValueError(
            f"Both --student_config ({script_args.student_config}: random weights) and --student_model "
            f"({script_args.student_model}: pretrained weights) were given: keep one (a YAML `student_config:` is "
            "overridden on the command line with --student_config '' )."
        )
    if script_args.student_revision and not script_args.student_model:
        raise ValueError("--student_revision selects a revision of --student_model: pass --student_model too.")
    if not (script_args.student_config or script_args.student_model) or not script_args.train_data:
        raise ValueError(
            "--student_config (random weights) or --student_model (pretrained weights), --train_data and --teachers "
            "are required (on the command line or YAML)."
        )
    strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if strategy != "no" and not script_args.eval_data:
        raise ValueError(
            f"--eval_strategy {strategy} needs held-out images: pass --eval_data (same formats as --train_data; the "
            "evaluation loss is the distillation loss on their center crops, without teacher dropping), or leave "
            "--eval_strategy no."
        )
    if script_args.eval_data and training_args.teacher_cache:
        raise ValueError(
            "--eval_data needs the teachers run on the held-out images, --teacher_cache replaces them by cached "
            "outputs of the training images: use one or the other."
        )
    return script_args, training_args


def load_eval_dataset(script_args: ScriptArguments):
    """The held-out images of `--eval_data` (`None` without it)."""
    if not script_args.eval_data:
        return None
    try:
        dataset = load_image_dataset(script_args.eval_data, script_args.image_column, script_args.eval_split)
    except ValueError as error:  # name the option that selects the split of --eval_data
        raise ValueError(f"--eval_data: {error}".replace("--dataset_split", "--eval_split")) from error
    if script_args.max_eval_samples is not None:
        dataset = dataset.select(range(min(script_args.max_eval_samples, len(dataset))))
    return dataset


def cache_options(training_args, script_args, student) -> dict:
    """The [`CacheOptions`] of this run (less the image column) for a teacher-output cache of either format."""
    crops = None
    if training_args.teacher_cache_crops:
        seed = training_args.seed if training_args.teacher_cache_seed is None else training_args.teacher_cache_seed
        crops = CropViews(seed, tuple(training_args.crop_scale), flip_prob=training_args.flip_prob)
    return {
        "image_size": training_args.image_size,
        "load_size": training_args.load_size,
        "student_mean": student.config.image_mean,
        "student_std": student.config.image_std,
        "grid_size": student.grid_size(training_args.image_size, training_args.image_size),
        "num_views": training_args.teacher_cache_views,
        "jpeg_draft": training_args.jpeg_draft,
        "crops": crops,
    }


def load_cache_teachers(
    training_args, teacher_sources, names, dataset, image_column, student
) -> list[tuple[str, object]]:
    """`(name, teacher)` pairs loaded as for training, on the training device, to build a cache: a cheaper (bf16 /
    fp16 / int8) teacher is checked against its float32 self on the first training images exactly as online
    training checks it (`load_checked_teacher`)."""
    dtype = training_args.teacher_torch_dtype()
    size = training_args.image_size

    @functools.cache
    def calibration() -> Calibration | None:
        collator = ImageCollator(
            training_args.load_size, image_column=image_column, jpeg_draft=training_args.jpeg_draft
        )
        mean, std = torch.tensor(student.config.image_mean), torch.tensor(student.config.image_std)
        pixels = calibration_views(
            dataset, collator, training_args.teacher_fidelity_batch, size, mean, std, training_args.device
        )
        return None if pixels is None else Calibration(pixels, mean, std, student.grid_size(size, size))

    teachers = []
    for index, (name, source) in enumerate(zip(names, teacher_sources)):
        teacher = load_checked_teacher(
            source, name, dtype, training_args.teacher_quantization, training_args.device, calibration,
            training_args.teacher_fidelity_max_error, **training_args.teacher_options(index),
        )  # fmt: skip
        teachers.append((name, teacher.to(training_args.device)))
    return teachers


def build_teacher_cache(training_args, teacher_sources, names, train_dataset, script_args, student) -> None:
    """Run the teachers once over the cached views (fixed, or random crops drawn once) of the training set. A cache
    already there is reused only where it was built for exactly these teachers (weights fingerprints), options, sizes,
    views and data, and its shards pass their checksums; the other shards are rebuilt. The other local processes wait
    for this one and read its result."""
    if training_args.local_process_index != 0:
        return
    teachers = load_cache_teachers(
        training_args, teacher_sources, names, train_dataset, script_args.image_column, student
    )
    logger.info(
        "Checking (and building what is missing of) the teacher-output cache in %s", training_args.teacher_cache
    )
    TeacherOutputCache.build(
        training_args.teacher_cache, teachers, train_dataset, script_args.image_column,
        batch_size=training_args.per_device_train_batch_size, device=training_args.device,
        **cache_options(training_args, script_args, student),
    )  # fmt: skip


def trains_from_shards(script_args, training_args) -> bool:
    """`--streaming --teacher_cache DIR --train_data DIR`: training reads teacher-output shards built before."""
    return bool(
        script_args.streaming
        and training_args.teacher_cache
        and os.path.realpath(script_args.train_data) == os.path.realpath(training_args.teacher_cache)
    )


def prepare_teacher_shards(training_args, teacher_sources, names, source, script_args, student) -> None:
    """`--streaming --teacher_cache DIR`: write the teachers' outputs of every image of the `source` stream with the
    images as WebDataset shards in DIR (intact shards of this configuration are kept), or, when `--train_data` is DIR,
    check that its shards were built for these teachers and options (their cache key). On the local main process;
    the others wait for it."""
    if training_args.local_process_index != 0:
        return
    from_shards = trains_from_shards(script_args, training_args)
    shards = TeacherOutputShards(training_args.teacher_cache) if from_shards else None
    image_column = shards.image_column if from_shards else script_args.image_column
    teachers = load_cache_teachers(training_args, teacher_sources, names, source.dataset, image_column, student)
    options = cache_options(training_args, script_args, student)
    if from_shards:
        identities = [{"name": name, **teacher_identity(teacher)} for name, teacher in teachers]
        shards.check_key(identities, CacheOptions(shards.options.image_column, **options))
        logger.info("Training from the teacher-output shards in %s (%s)", shards.directory, shards.describe_views())
        return
    logger.info(
        "Writing (what is missing of) the teacher-output shards of %s in %s",
        script_args.train_data,
        training_args.teacher_cache,
    )
    TeacherOutputShards.build(
        training_args.teacher_cache, teachers, source.dataset, script_args.image_column,
        batch_size=training_args.per_device_train_batch_size, samples_per_shard=script_args.teacher_cache_shard_size,
        device=training_args.device, **options,
    )  # fmt: skip


def main(argv: list[str] | None = None, teachers: list | None = None, callbacks: list | None = None) -> UnicTrainer:
    """Run UNIC distillation. `teachers` may replace `--teachers` with modules (e.g. `ModuleTeacher`); `callbacks`
    are extra `TrainerCallback`s."""
    script_args, training_args = parse_args(argv)
    hub_options = take_hub_options(training_args)  # the Trainer never pushes; the final export is pushed below
    setup_logging(training_args)
    # refuses a silent fallback (FSDP asked, DDP running...)
    check_distributed_setup(training_args, teachers="with_student")
    set_seed(training_args.seed)

    # Everything that can be wrong with the input is checked here, before weights are loaded or training starts.
    teacher_sources = teachers if teachers is not None else training_args.teachers
    if not teacher_sources:
        raise ValueError("No teachers: pass --teachers ID_OR_PATH [ID_OR_PATH ...] (or set `teachers:` in the YAML).")
    names = unique_teacher_names(teacher_sources)
    specs = []
    for index, (name, teacher) in enumerate(zip(names, teacher_sources)):
        if is_factory_spec(teacher):
            teacher = load_teacher(teacher)  # plain-module teachers are cheap to build; their sizes need a forward
        elif isinstance(teacher, str):
            teacher = load_teacher_config(teacher, **training_args.teacher_options(index))
        specs.append(teacher_spec(name, teacher))
    backbone_state = None
    if script_args.student_model:
        start = time.perf_counter()
        backbone_config, backbone_state = load_pretrained_backbone(
            script_args.student_model, training_args.image_size, revision=script_args.student_revision
        )
        logger.info(
            "Loaded the student weights of %s in %.1f s", script_args.student_model, time.perf_counter() - start
        )
    else:
        backbone_config = load_student_backbone_config(script_args.student_config, training_args.image_size)
    if script_args.streaming:  # read shard by shard, never materialized (images are not verified ahead)
        image_column = script_args.image_column
        if trains_from_shards(script_args, training_args):  # a missing shard is refused here
            image_column = TeacherOutputShards(training_args.teacher_cache).image_column
        train_dataset = load_streaming_train_dataset(
            script_args.train_data, image_column, script_args.dataset_split, training_args,
            script_args.shuffle_buffer_size, script_args.max_train_samples,
        )  # fmt: skip
    else:
        train_dataset = load_image_dataset(script_args.train_data, script_args.image_column, script_args.dataset_split)
        if script_args.max_train_samples is not None:
            train_dataset = train_dataset.select(range(min(script_args.max_train_samples, len(train_dataset))))
        train_dataset = verify_images(train_dataset, training_args, script_args.image_column)  # lists unreadable files
    eval_dataset = load_eval_dataset(script_args)

    student_config = UnicStudentConfig(
        backbone_config=backbone_config,
        teachers=specs,
        use_ladder=script_args.use_ladder,
        ladder_layers=script_args.ladder_layers,
        standardization=script_args.standardization,
        standardization_warmup_steps=script_args.standardization_warmup_steps,
        image_mean=script_args.student_image_mean,
        image_std=script_args.student_image_std,
        backbone_source=script_args.student_model,
        backbone_revision=script_args.student_revision,
    )
    student = UnicStudentModel(student_config)
    if backbone_state is not None:
        student.backbone.load_state_dict(backbone_state)
    encoder_parameters = student.backbone.num_parameters()
    logger.info(
        "Student %s, %s: %s encoder parameters + %s in expendable heads; teachers: %s; %s training images",
        describe_backbone(backbone_config),
        f"weights of {script_args.student_model}" if script_args.student_model else "random weights",
        f"{encoder_parameters:,}",
        f"{student.num_parameters() - encoder_parameters:,}",
        ", ".join(names),
        "streamed" if script_args.streaming else len(train_dataset),
    )

    revisions = [training_args.teacher_options(index)["revision"] for index in range(len(names))]
    run = start_run(  # lock, complete checkpoint, manifest: a rerun resumes only the same run
        training_args, "unic", teachers={n: (t, r) for n, t, r in zip(names, teacher_sources, revisions)},
        initial_weights={"student": (script_args.student_model, script_args.student_revision)}
        if script_args.student_model else {},
        student_config=student_config, data={"train": train_dataset}, options=(script_args, training_args),
    )  # fmt: skip
    image_column = script_args.image_column
    if training_args.teacher_cache is not None:
        with training_args.main_process_first(desc="teacher-output cache"):
            if script_args.streaming:
                prepare_teacher_shards(training_args, teacher_sources, names, train_dataset, script_args, student)
            else:
                build_teacher_cache(training_args, teacher_sources, names, train_dataset, script_args, student)
        if script_args.streaming:  # the training stream reads the shards: images with their teachers' outputs
            image_column = TeacherOutputShards(training_args.teacher_cache).image_column
            if not trains_from_shards(script_args, training_args):
                train_dataset = load_streaming_train_dataset(
                    training_args.teacher_cache, image_column, "train", training_args, script_args.shuffle_buffer_size
                )
    if script_args.streaming and run.checkpoint is not None:  # continue each worker's stream where it stopped
        train_dataset.load_state(run.checkpoint, training_args.dataloader_num_workers)

    trainer = UnicTrainer(
        model=student,
        args=training_args,
        teachers=teacher_sources,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        image_column=image_column,
        callbacks=(callbacks or []) + profiler_callbacks(script_args.profile, training_args),
    )
    result = run.train(trainer)  # a finished run trains nothing; a stopped one raises TrainingStopped
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    if eval_dataset is not None:  # logged (trainer_state.json), not saved as eval_results.json: evaluate.py writes it
        trainer.log_metrics("eval", trainer.evaluate())
    trainer.save_state()
    trainer.save_model()
    trainer.create_model_card(dataset_name=script_args.train_data)
    if hub_options is not None and trainer.is_world_process_zero():
        logger.info("Pushing the student to the Hub: %s", hub_options.repo_id)
        hub_options.push(training_args.output_dir, "Upload UNIC student encoder")
    run.close()
    return trainer


if __name__ == "__main__":
    main()
    exit_cleanly(0)
