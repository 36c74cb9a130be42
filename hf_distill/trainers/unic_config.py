"""Training configuration of UNIC multi-teacher distillation."""

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.image_verification import ImageCheckArguments
from ..hub.push import HubTokenNotPickled
from ..losses.unic import COEFFICIENT_NORMALIZATIONS
from ..models.configuration_teacher import GRID_ALIGNMENTS, SUMMARY_TYPES
from ..models.teacher_quantization import TEACHER_QUANTIZATIONS
from ..precision import resolve_dtype
from .nonfinite import NonFiniteArguments
from .view_config import AugmentationArguments

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class UnicConfig(
    HubTokenNotPickled, TrainingArguments, AugmentationArguments, ImageCheckArguments, NonFiniteArguments
):
    r"""
    Configuration of [`UnicTrainer`]: all [`~transformers.TrainingArguments`] plus the UNIC settings below. Defaults
    of the optimizer follow the UNIC code (AdamW betas (0.9, 0.99), weight decay 0.03 on >= 2-D weights only, cosine
    schedule).

    Parameters:
        teachers (`list[str]`):
            Hub ids or local paths of the teachers (plain vision backbones or prepared teacher folders). Teachers can
            also be given to the trainer as modules.
        teacher_revisions (`list[str]`, *optional*):
            One revision per teacher (or one for all).
        teacher_summary (`list[str]`, *optional*):
            Per teacher (or one for all): `cls`, `pooler` or `mean_patch`. Default: the teacher's own / `cls`.
        teacher_grid_alignment (`list[str]`, *optional*):
            Per teacher (or one for all): `resize` (resize the image so the teacher's grid equals the student's) or
            `interpolate` (interpolate the teacher's patch tokens to the student's grid).
        teacher_image_size (`list[int]`, *optional*):
            Per teacher (or one for all): input resolution in `interpolate` mode (default: the student's).
        teacher_dtype (`str`, defaults to `"auto"`):
            Dtype of the teachers' weights: `auto` (float16 with `--fp16`; else bfloat16 where the device runs it
            natively: CUDA with bfloat16, CPUs with AVX512-BF16 or AMX; float32 otherwise, see
            [`~hf_distill.precision.native_bf16`]), `float32`, `bfloat16` or `float16`. The choice is logged.
        teacher_quantization (`str`, defaults to `"none"`):
            `int8`: the teachers' `nn.Linear` layers run in int8 (dynamic quantization, CPU only; convolutions stay in
            float32), see [`~hf_distill.models.teacher_quantization.quantize_teacher`]. It quantizes float32 weights:
            `teacher_dtype` must be `auto` (which then means float32) or `float32`.
        teacher_fidelity_max_error (`float`, defaults to 0.15):
            A teacher in bfloat16 / float16 / int8 is first compared with its float32 self on a calibration batch
            (the first training images, center crops): cosine and relative error of its summary and patch tokens are
            logged, and training is refused when a relative error exceeds this value. Measured on the demo's DINOv2
            ViT-S/14 teacher: 0.011 in bfloat16, 0.10-0.11 in int8 (`python -m benchmarks.bench_teacher_fidelity`).
        teacher_fidelity_batch (`int`, defaults to 16):
            Images in the calibration batch; 0 skips the check.
        teacher_drop_prob (`float`, defaults to 0.5):
            Teacher dropping probability `p` (UNIC eq. 4; 0.5 for ViT-B, 0.25 for ViT-L). 0 disables dropping.
        loss_normalization (`str`, defaults to `"image"`):
            `image`: every image weighs the same (paper intent); `batch`: kept losses summed and divided by the number
            of kept (image, teacher) pairs in the batch (UNIC code).
        image_size (`int`, defaults to 224):
            Side of the (square) training views; must be divisible by the student's patch size.
        load_size (`int`, *optional*):
            Side of the decoded images the batched augmentations crop from (default: `image_size * 8 // 7`).
        crop_scale (`list[float]`, defaults to `[0.08, 1.0]`):
            Area range of RandomResizedCrop.
        flip_prob, color_jitter_prob, grayscale_prob, blur_prob, solarize_prob (`float`):
            Probabilities of the UNIC augmentations (0.5, 0.8, 0.2, 0.2, 0.2).
        augment (`bool`, defaults to `True`):
            Apply the training augmentations. When `False`, training views are resized and center-cropped.
        teacher_cache (`str`, *optional*):
            Folder of a [`TeacherOutputCache`]: teacher outputs of fixed views (center crop and its flip) computed
            once and read during training instead of running the teachers. With `--streaming` (recipe), a folder of
            WebDataset shards ([`~hf_distill.trainers.teacher_cache_shards.TeacherOutputShards`]) holding each image
            with its teachers' outputs (and crops), streamed during training; the format is read from the folder.
        teacher_cache_views (`int`, defaults to 2):
            Number of views per image in the cache: fixed views 1 (center) or 2 (center and flip); any number of
            random crops with `teacher_cache_crops`.
        teacher_cache_crops (`bool`, defaults to `False`):
            Cache random resized crops (+ flips) instead of the fixed views: `teacher_cache_views` crops per image,
            drawn once with `seed`, `crop_scale` and `flip_prob` and stored with the outputs; the student trains on
            the same crops ([`~hf_distill.trainers.cache_views.CropViews`]).
        teacher_cache_seed (`int`, *optional*):
            Seed of the crops of `teacher_cache_crops` (default: `seed`). Fix it to share one cache between runs of
            different training seeds (e.g. seeds of an ablation): only the crops drawn once are fixed, the student's
            initialization, teacher dropping and data order still follow `seed`.
        export_adaptors (`bool`, defaults to `False`):
            Also export the encoder WITH its per-teacher heads to `output_dir/adaptors`, the standardization folded
            into the heads so that each adaptor outputs its teacher's own features
            ([`~hf_distill.models.adaptors.export_adaptors`]; loads with `AutoModel.from_pretrained(...,
            trust_remote_code=True)`). The encoder export in `output_dir` is unchanged.
        Also the options of [`AugmentationArguments`], [`~hf_distill.data.image_verification.ImageCheckArguments`]
            (`verify_images`, `skip_bad_images`) and [`~hf_distill.trainers.nonfinite.NonFiniteArguments`]
            (`max_nonfinite_fraction`, `max_skipped_steps`).

    Speed: `--bf16` runs the student under bfloat16 autocast (a warning is logged where bfloat16 is emulated, e.g. an
    AVX2-only CPU); `teacher_dtype="auto"` keeps the teachers in bfloat16 where the hardware runs it natively;
    teachers always run in inference mode. `--torch_compile` (with `--torch_compile_backend` /
    `--torch_compile_mode`) compiles the student AND the teachers (those prepared by Accelerate; not DeepSpeed / FSDP
    teachers).
    """

    teachers: list[str] | None = field(
        default=None, metadata={"help": "Hub ids or local paths of the teachers.", "nargs": "+"}
    )
    teacher_revisions: list[str] | None = field(
        default=None, metadata={"help": "One revision per teacher, or one for all.", "nargs": "+"}
    )
    teacher_summary: list[str] | None = field(
        default=None,
        metadata={"help": f"Summary token per teacher (or one for all), one of {SUMMARY_TYPES}.", "nargs": "+"},
    )
    teacher_grid_alignment: list[str] | None = field(
        default=None,
        metadata={"help": f"Grid alignment per teacher (or one for all), one of {GRID_ALIGNMENTS}.", "nargs": "+"},
    )
    teacher_image_size: list[int] | None = field(
        default=None,
        metadata={"help": "Input resolution per teacher (or one for all) in 'interpolate' mode.", "nargs": "+"},
    )
    teacher_dtype: str = field(
        default="auto", metadata={"help": f"Dtype of the teachers' weights, one of {TEACHER_DTYPES}."}
    )
    teacher_quantization: str = field(
        default="none",
        metadata={"help": f"Quantize the teachers' linear layers, one of {TEACHER_QUANTIZATIONS} (int8: CPU only)."},
    )
    teacher_fidelity_max_error: float = field(
        default=0.15,
        metadata={
            "help": "Largest relative error of a bfloat16 / float16 / int8 teacher's outputs against float32 on the "
            "calibration batch; above it training is refused."
        },
    )
    teacher_fidelity_batch: int = field(
        default=16, metadata={"help": "Images in the teacher fidelity calibration batch (0: no check)."}
    )
    teacher_drop_prob: float = field(
        default=0.5, metadata={"help": "Teacher dropping probability p (UNIC eq. 4); 0 disables it."}
    )
    loss_normalization: str = field(
        default="image",
        metadata={"help": f"How kept teacher losses are averaged, one of {COEFFICIENT_NORMALIZATIONS}."},
    )
    augment: bool = field(default=True, metadata={"help": "Apply the UNIC training augmentations."})
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of a teacher-output cache of fixed views (center, flip) or stored random crops: built on "
            "first use, then the teachers are not run during training (no color augmentation in this mode). With "
            "--streaming: WebDataset shards of the images with their teachers' outputs, streamed (--train_data the "
            "source to build them from, or the same folder to train from shards built before)."
        },
    )
    teacher_cache_views: int = field(
        default=2, metadata={"help": "Views per image in the cache: 1 or 2 fixed views, or N random crops."}
    )
    teacher_cache_crops: bool = field(
        default=False,
        metadata={
            "help": "Cache --teacher_cache_views random resized crops (+ flips) per image, drawn once with --seed, "
            "instead of the fixed views; the student trains on the same crops."
        },
    )
    teacher_cache_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the crops drawn once by --teacher_cache_crops (default: --seed); fix it to share one "
            "cache between training seeds."
        },
    )
    export_adaptors: bool = field(
        default=False,
        metadata={
            "help": "Also export the encoder with its per-teacher adaptors (heads mapping into each teacher's own "
            "feature space) to OUTPUT_DIR/adaptors, loadable with trust_remote_code=True."
        },
    )

    # TrainingArguments defaults changed for UNIC (naver/unic code).
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate (UNIC: 3e-4 * batch / 256)."})
    weight_decay: float = field(default=0.03, metadata={"help": "Weight decay, applied to >= 2-D weights only."})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning rate schedule."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep the image column for the collator (leave False)."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "The student has no unused trainable parameters (leave False)."}
    )

    def __post_init__(self):
        super().__post_init__()
        num_teachers = len(self.teachers) if self.teachers else None
        for name in ("teacher_revisions", "teacher_summary", "teacher_grid_alignment", "teacher_image_size"):
            values = getattr(self, name)
            if values is not None and num_teachers is not None and len(values) not in (1, num_teachers):
                raise ValueError(
                    f"--{name} got {len(values)} values for {num_teachers} teachers: give one value per teacher, or "
                    "one value for all of them."
                )
        for value in self.teacher_summary or []:
            if value not in SUMMARY_TYPES:
                raise ValueError(f"--teacher_summary values must be in {SUMMARY_TYPES}, got {value!r}.")
        for value in self.teacher_grid_alignment or []:
            if value not in GRID_ALIGNMENTS:
                raise ValueError(f"--teacher_grid_alignment values must be in {GRID_ALIGNMENTS}, got {value!r}.")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"--teacher_dtype must be one of {TEACHER_DTYPES}, got {self.teacher_dtype!r}.")
        if self.teacher_quantization not in TEACHER_QUANTIZATIONS:
            raise ValueError(
                f"--teacher_quantization must be one of {TEACHER_QUANTIZATIONS}, got {self.teacher_quantization!r}."
            )
        if self.teacher_quantization != "none" and self.teacher_dtype in ("bfloat16", "float16"):
            raise ValueError(
                f"--teacher_quantization {self.teacher_quantization} quantizes float32 teachers: set --teacher_dtype "
                f"float32 or auto (got {self.teacher_dtype})."
            )
        if self.teacher_fidelity_batch < 0 or not self.teacher_fidelity_max_error > 0:
            raise ValueError(
                "--teacher_fidelity_batch must be >= 0 and --teacher_fidelity_max_error > 0, got "
                f"{self.teacher_fidelity_batch} and {self.teacher_fidelity_max_error}."
            )
        if not 0.0 <= self.teacher_drop_prob < 1.0:
            raise ValueError(f"--teacher_drop_prob must be in [0, 1), got {self.teacher_drop_prob}.")
        if self.loss_normalization not in COEFFICIENT_NORMALIZATIONS:
            raise ValueError(
                f"--loss_normalization must be one of {COEFFICIENT_NORMALIZATIONS}, got {self.loss_normalization!r}."
            )
        if self.teacher_cache_views < 1 or (not self.teacher_cache_crops and self.teacher_cache_views > 2):
            raise ValueError(
                f"--teacher_cache_views must be 1 or 2 for fixed views (any number >= 1 with --teacher_cache_crops), "
                f"got {self.teacher_cache_views}."
            )
        self.check_views()

    def teacher_torch_dtype(self):
        """The `torch.dtype` of the teachers' weights on `self.device` (`auto`: [`~hf_distill.precision.auto_dtype`],
        float16 with `--fp16`, float32 with int8 `teacher_quantization`), logged with the reason of the choice."""
        if self.teacher_quantization != "none":
            return resolve_dtype("float32", self.device, f"teachers (quantized to {self.teacher_quantization})")
        if self.teacher_dtype == "auto" and self.fp16:
            return resolve_dtype("float16", self.device, "teachers (auto with --fp16)")
        return resolve_dtype(self.teacher_dtype, self.device, "teachers")

    def teacher_options(self, index: int) -> dict:
        """Loading options of the `index`-th teacher, from the per-teacher lists (one value broadcasts)."""

        def pick(values):
            if not values:
                return None
            return values[0] if len(values) == 1 else values[index]

        return {
            "revision": pick(self.teacher_revisions),
            "summary": pick(self.teacher_summary),
            "grid_alignment": pick(self.teacher_grid_alignment),
            "image_size": pick(self.teacher_image_size),
        }
