"""Teacher emulation: how well a student's adaptors stand in for each of its teachers on held-out images.

The adaptor export of a UNIC student ([`~hf_distill.models.adaptors.export_adaptors`]) outputs, per teacher, an
estimate of that teacher's summary token and patch tokens in the teacher's own feature space. Each teacher is run on
the same views, exactly as in training (the student's view re-normalized for the teacher, resized or its tokens
interpolated to the student's grid), and per teacher and token type:

- `cosine`: the mean cosine similarity between the adaptor's and the teacher's vectors (per image for the summary,
  per image and token for the patch tokens);
- `r2`: the coefficient of determination of the teacher's features by the adaptor's, pooled over dimensions,
  `1 - sum ||adaptor - teacher||^2 / sum ||teacher - mean teacher||^2` (the mean over the evaluated images; scikit-
  learn's `variance_weighted` multi-output R^2); 1 is perfect, 0 is as good as predicting the mean;
- `top1_agreement` (teachers given a `head`, e.g. an ImageNet classifier or CLIP's visual projection followed by
  zero-shot text embeddings): the percentage of images where the head's top-1 class on the adaptor's summary equals
  its top-1 class on the teacher's own summary.

Sums are accumulated in float64 over batches, so patch tokens of a whole split are never held in memory.
"""

import importlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel

from ..data.image_datasets import ImageCollator
from ..models.teacher_loading import load_teacher, teacher_outputs
from .features import _processor_settings


class EmulationScore:
    """Streaming float64 sums of one (teacher, token type): mean cosine similarity and pooled R^2 of `prediction`
    `[M, D]` against `target` `[M, D]`."""

    def __init__(self):
        self.count = 0
        self.cosine_sum = 0.0
        self.squared_error = 0.0
        self.shift = None  # the first batch's mean: sums of squares around it keep float64 precise at any offset
        self.target_sum = None
        self.target_squares = None

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        prediction, target = prediction.reshape(-1, target.shape[-1]).double(), target.reshape(-1, target.shape[-1])
        target = target.double()
        if self.shift is None:
            self.shift = target.mean(0)
            self.target_sum = torch.zeros_like(self.shift)
            self.target_squares = torch.zeros_like(self.shift)
        centred = target - self.shift
        self.count += target.shape[0]
        self.cosine_sum += F.cosine_similarity(prediction, target, dim=-1).sum().item()
        self.squared_error += (prediction - target).square().sum().item()
        self.target_sum += centred.sum(0)
        self.target_squares += centred.square().sum(0)

    def result(self) -> dict[str, float]:
        """`{"cosine": mean cosine similarity, "r2": pooled R^2}`."""
        if self.count == 0:
            raise ValueError("No rows were scored: the evaluation set is empty.")
        total = (self.target_squares - self.target_sum.square() / self.count).sum().item()
        return {"cosine": self.cosine_sum / self.count, "r2": 1.0 - self.squared_error / max(total, 1e-300)}


def load_head(spec: "str | nn.Module") -> nn.Module:
    """A teacher's head from a `py:package.module:function` spec (the function returns the module; importing it runs
    that code) or a module, frozen in `eval()`."""
    if isinstance(spec, str):
        module_name, _, function_name = spec.removeprefix("py:").partition(":")
        if not spec.startswith("py:") or not module_name or not function_name:
            raise ValueError(f"A head is given as py:package.module:function, got {spec!r}.")
        spec = getattr(importlib.import_module(module_name), function_name)()
    if not isinstance(spec, nn.Module):
        raise TypeError(f"A head is an nn.Module reading the teacher's summary, got {type(spec).__name__}.")
    return spec.eval().requires_grad_(False)


def load_adaptor_model(model, trust_remote_code: bool = False) -> tuple[nn.Module, int | None]:
    """The adaptor model (a folder / Hub id of an adaptor export, loaded with its own code, or a model object) and
    the image size of its processor."""
    if isinstance(model, str):
        if not trust_remote_code:
            raise ValueError(
                f"{model!r} is an adaptor export, a model with its own Python code: loading it runs that code. If you "
                "trust its source, pass --trust_remote_code (`trust_remote_code=True` in Python)."
            )
        size = _processor_settings(model).get("image_size")
        return AutoModel.from_pretrained(model, trust_remote_code=True).eval(), size
    return model.eval(), None


@torch.inference_mode()
def evaluate_emulation(
    adaptor_model,
    teachers: dict,
    dataset,
    image_column: str = "image",
    heads: dict | None = None,
    image_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    description: str | None = None,
) -> dict[str, float]:
    """Score every adaptor of `adaptor_model` against its real teacher on the images of `dataset`.

    Args:
        adaptor_model (`str` or `nn.Module`): an adaptor export (folder or Hub id; needs `trust_remote_code=True`) or
            the loaded model: called as `model(pixel_values, adaptors=[...])`, returning `.adaptors[name].summary` /
            `.patch_tokens`, with the student's `image_mean` / `image_std` in its config.
        teachers (`dict[str, str | nn.Module]`): adaptor name -> its teacher (Hub id, folder, `py:` factory or a
            loaded teacher module), run with its own settings (grid alignment, resolution) on the student's views.
        dataset: a `datasets.Dataset` with images in `image_column`.
        heads (`dict[str, str | nn.Module]`, *optional*): adaptor name -> a head reading the teacher's summary (an
            `nn.Module` or a `py:` spec): adds the top-1 agreement.
        image_size (`int`, *optional*): side of the (resized, center-cropped) views; default: the export's
            processor size, else its backbone's image size.

    Returns:
        `dict[str, float]`: `{"<teacher>/summary_cosine", "<teacher>/summary_r2", "<teacher>/patch_cosine",
        "<teacher>/patch_r2"}` and, with a head, `"<teacher>/top1_agreement"` (percent).
    """
    model, default_size = load_adaptor_model(adaptor_model, trust_remote_code)
    config = model.config
    known = [teacher["name"] for teacher in config.teachers]
    unknown = [name for name in [*teachers, *(heads or {})] if name not in known]
    if unknown or not teachers:
        raise ValueError(f"Teachers / heads given for {unknown or 'no adaptor'}; the adaptors are {known}.")
    if image_column not in dataset.column_names:
        raise ValueError(f"Dataset has no column {image_column!r}; its columns are {dataset.column_names}.")
    image_size = image_size or default_size or getattr(config.backbone_config, "image_size", None)
    if image_size is None:
        raise ValueError(
            "The adaptor model records no image size (no image processor, no backbone image size): pass image_size "
            "(--image_size)."
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = list(teachers)
    loaded = [teacher if isinstance(teacher, nn.Module) else load_teacher(teacher) for teacher in teachers.values()]
    loaded = [teacher.to(device).eval() for teacher in loaded]
    heads = {name: load_head(head).to(device) for name, head in (heads or {}).items()}
    model.to(device)
    mean = torch.tensor(config.image_mean, device=device)
    std = torch.tensor(config.image_std, device=device)
    # pixels per student token: the export's patch_size (a ViT's patch, a feature-map student's last-stage stride);
    # exports that predate feature-map students record only their ViT backbone's patch size
    patch = getattr(config, "patch_size", None) or config.backbone_config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    grid = (image_size // patch, image_size // patch)

    scores = {(name, kind): EmulationScore() for name in names for kind in ("summary", "patch")}
    agreements = {name: [0, 0] for name in heads}
    loader = DataLoader(
        dataset.select_columns([image_column]),
        batch_size=batch_size,
        collate_fn=ImageCollator(image_size, image_column),
    )
    for batch in tqdm(loader, desc=description or "Teacher emulation", unit="batch"):
        pixels = (batch["pixel_values"].to(device).float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        outputs = model(pixels, adaptors=names).adaptors
        targets = teacher_outputs(loaded, pixels, mean, std, grid)
        for name, (summary, patch_tokens) in zip(names, targets):
            adaptor = outputs[name]
            scores[name, "summary"].update(adaptor.summary.float(), summary.float())
            scores[name, "patch"].update(adaptor.patch_tokens.float(), patch_tokens.float())
            if name in heads:
                head = heads[name]
                dtype = next(head.parameters()).dtype
                own = head(summary.to(dtype)).argmax(-1)
                emulated = head(adaptor.summary.to(dtype)).argmax(-1)
                agreements[name][0] += (own == emulated).sum().item()
                agreements[name][1] += own.numel()
    results = {}
    for name in names:
        for kind in ("summary", "patch"):
            for metric, value in scores[name, kind].result().items():
                results[f"{name}/{kind}_{metric}"] = value
        if name in agreements:
            results[f"{name}/top1_agreement"] = 100.0 * agreements[name][0] / max(agreements[name][1], 1)
    return results


__all__ = ["EmulationScore", "evaluate_emulation", "load_adaptor_model", "load_head"]
