"""The arms of the UNIC step benchmark (`benchmarks/bench_unic_step.py`): the model sizes, one [`Arm`] per way of
running the step (the authors' reference, hf_distill in bf16 / fp32, int8 or cached teachers, torch.compile), how each
is built, and one optimizer step of an arm, optionally split into timed parts."""

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset
from PIL import Image
from transformers import ViTConfig

from hf_distill.losses import distillation_loss
from hf_distill.models import TeacherConfig, TeacherModel, UnicStudentConfig, UnicStudentModel, freeze_teacher
from hf_distill.models.standardization import ema_weight
from hf_distill.models.teacher_loading import teacher_outputs
from hf_distill.models.teacher_quantization import quantize_teacher
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.unic_trainer import standardize_targets

from .reference_unic import reference_distillation_loss, reference_heads, reference_teacher_outputs

SIZES = {
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit-micro": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),  # tests
}
# hidden widths of the authors' ladder heads (naver/unic `LP`: hidden_dim=768, last_hidden_dim=3072 by default)
AUTHORS_HEAD_WIDTHS = (768, 3072)
PARTS = ("teacher_forward", "student_forward_backward", "heads", "loss", "optimizer")
DROP_PROB = 0.5


@dataclass
class Arm:
    """One way of running the UNIC step. `teachers`: `"fp32"`, `"bf16"`, `"int8"` or `"cache"`."""

    name: str
    teachers: str
    autocast_dtype: torch.dtype | None
    heads: str  # "authors" or "hf_distill"
    optimizer: str  # "foreach" or "fused"
    reference_code: bool = False
    compile: bool = False
    # filled by build()
    teacher_modules: list = field(default_factory=list)
    student: UnicStudentModel | None = None
    optim: torch.optim.Optimizer | None = None
    cache: TeacherOutputCache | None = None
    compile_s: float | None = None

    def describe(self) -> str:
        widths = "768/3072" if self.heads == "authors" else "d/4d"
        precision = "student " + (str(self.autocast_dtype).removeprefix("torch.") if self.autocast_dtype else "fp32")
        teachers = "cached teacher outputs" if self.teachers == "cache" else f"{self.teachers} teachers"
        code = "authors' code" if self.reference_code else "hf_distill"
        extra = ", torch.compile" if self.compile else ""
        return f"{code}: {teachers}, {precision}, heads {widths}, {self.optimizer} AdamW{extra}"


def step(arm: Arm, pixels, mean, std, generator, step_index, total_steps, clock, rows=None):
    """One optimizer step. `rows`: dataset rows of the batch (the cached-teachers arm reads their stored outputs).
    With an enabled `clock`, the backbone and the heads are split by detached features so that each part's backward
    is timed separately (same numbers, one extra graph boundary)."""
    student, split = arm.student, clock.enabled
    grid = student.grid_size(*pixels.shape[-2:])
    weight = ema_weight(step_index, total_steps)
    autocast = torch.autocast(pixels.device.type, arm.autocast_dtype) if arm.autocast_dtype else nullcontext()
    targets = None
    if arm.cache is not None:  # stored float16 outputs, read outside autocast
        views = torch.zeros(len(rows), dtype=torch.long)
        targets = [arm.cache.lookup(name, rows, views, pixels.device) for name in arm.cache.teacher_names]
    with autocast:
        if targets is not None:
            pass
        elif arm.reference_code:  # the authors run their teachers under no_grad inside their autocast
            targets = reference_teacher_outputs(arm.teacher_modules, pixels, mean, std, grid)
        else:
            targets = teacher_outputs(arm.teacher_modules, pixels, mean, std, grid)
        targets = standardize_targets(student, targets, weight)
        clock.lap("teacher_forward")
        _, cls_features, patch_features = student.ladder_features(pixels)
        blocks = cls_features + patch_features
        if split:
            leaves = [feature.detach().requires_grad_() for feature in blocks]
            cls_features, patch_features = leaves[: len(cls_features)], leaves[len(cls_features) :]
        clock.lap("student_forward_backward")
        if arm.reference_code:
            cls_predictions, patch_predictions = reference_heads(student, cls_features, patch_features)
        else:
            cls_predictions = student.project(student.cls_heads, cls_features)
            patch_predictions = student.project(student.patch_heads, patch_features)
        clock.lap("heads")
        loss_fn = reference_distillation_loss if arm.reference_code else distillation_loss
        loss, _, _ = loss_fn(cls_predictions, patch_predictions, targets, DROP_PROB, "image", generator)
        clock.lap("loss")
    loss.backward()
    clock.lap("heads")
    if split:
        torch.autograd.backward(blocks, [leaf.grad for leaf in leaves])
        clock.lap("student_forward_backward")
    arm.optim.step()
    arm.optim.zero_grad(set_to_none=True)
    clock.lap("optimizer")
    return loss


def make_arms(num_teachers: int, largest: bool, bf16: bool, device: torch.device, args) -> list[Arm]:
    reference_autocast = torch.bfloat16 if device.type == "cuda" else None
    own = torch.bfloat16 if bf16 else None
    arms = [
        Arm("reference", "fp32", reference_autocast, args.reference_heads, "foreach", reference_code=True),
        Arm("hf_distill", "bf16" if bf16 else "fp32", own, "hf_distill", "fused"),
    ]
    if largest:
        if bf16:
            arms.append(Arm("hf_distill fp32", "fp32", None, "hf_distill", "fused"))
        if device.type == "cpu":
            arms.append(Arm("int8 teachers", "int8", own, "hf_distill", "fused"))
        if not args.no_cache:
            arms.append(Arm("cached teachers", "cache", own, "hf_distill", "fused"))
        if args.compile:
            arms.append(
                Arm("hf_distill compiled", "bf16" if bf16 else "fp32", own, "hf_distill", "fused", compile=True)
            )
    if args.arms is not None:  # the reference and hf_distill arms always run
        arms = arms[:2] + [arm for arm in arms[2:] if arm.name in args.arms]
    return arms


def student_config(backbone: ViTConfig, specs: list[dict], heads: str) -> UnicStudentConfig:
    options = {}
    if heads == "authors":
        hidden, last = AUTHORS_HEAD_WIDTHS
        options = dict(
            ladder_hidden_ratio=hidden / backbone.hidden_size, head_hidden_ratio=last / backbone.hidden_size
        )
    return UnicStudentConfig(backbone_config=backbone, teachers=specs, **options)


def build(size: str, num_teachers: int, arms: list[Arm], args, device: torch.device, cache_dir: str) -> None:
    backbone = ViTConfig(**SIZES[size], image_size=args.image_size, patch_size=16)
    torch.manual_seed(0)
    teacher = freeze_teacher(TeacherModel(TeacherConfig(backbone_config=backbone)))
    teachers = [copy.deepcopy(teacher) for _ in range(num_teachers)]
    specs = [
        {"name": f"t{i}", "summary_dim": backbone.hidden_size, "patch_dim": backbone.hidden_size}
        for i in range(num_teachers)
    ]
    forms = {}
    for arm in arms:
        torch.manual_seed(1)  # the same backbone and (for equal widths) heads in every arm
        arm.student = UnicStudentModel(student_config(backbone, specs, arm.heads)).to(device).train()
        parameters = list(arm.student.parameters())
        fused = {"fused": True} if arm.optimizer == "fused" else {}
        arm.optim = torch.optim.AdamW(parameters, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.03, **fused)
        if arm.teachers not in forms and arm.teachers != "cache":
            if arm.teachers == "int8":
                forms["int8"] = [quantize_teacher(t) for t in teachers]
            else:
                dtype = torch.bfloat16 if arm.teachers == "bf16" else torch.float32
                forms[arm.teachers] = [copy.deepcopy(t).to(device, dtype) for t in teachers]
        if arm.teachers == "cache":
            arm.cache = build_cache(cache_dir, arm.student, forms.get("bf16") or forms["fp32"], args, device)
        else:
            arm.teacher_modules = forms[arm.teachers]
        if arm.compile:  # in place, like the recipe's --torch_compile (the teachers are this arm's own copies)
            arm.teacher_modules = [copy.deepcopy(t) for t in arm.teacher_modules]
            for module in [arm.student.backbone, *arm.student.cls_heads.values(), *arm.student.patch_heads.values()]:
                module.compile()
            for teacher in arm.teacher_modules:
                teacher.compile()


def build_cache(directory: str, student, teachers, args, device) -> TeacherOutputCache:
    """A teacher-output cache (one view per image) over `batch_size * rounds` random images."""
    rng = np.random.default_rng(0)
    size = args.image_size
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        for _ in range(args.batch_size * args.steps)
    ]
    return TeacherOutputCache.build(
        directory,
        list(zip(student.config.teacher_names, teachers)),
        Dataset.from_dict({"image": images}),
        image_column="image",
        image_size=size,
        load_size=size,
        student_mean=student.config.image_mean,
        student_std=student.config.image_std,
        grid_size=student.grid_size(size, size),
        num_views=1,
        batch_size=args.batch_size,
        device=device,
    )
