"""A probed teacher: a frozen pretrained backbone and a linear task head fitted on its cached features."""

import os

import torch
from safetensors.torch import load_file
from torch import nn

from ..io_utils import save_safetensors_atomically

HEAD_FILE = "linear_head.safetensors"


class ProbedTeacher(nn.Module):
    """`teacher` (a [`TeacherModel`] / [`ModuleTeacher`], frozen) + standardization + linear head -> class logits.

    Args:
        teacher: the wrapped backbone; its summary feature is what the head reads.
        weight (`torch.Tensor` of shape `(D, C)`), bias (`(C,)`), mean and std (`(D,)`): the probe, as returned by
            [`~hf_distill.evaluation.linear_probe.fit_linear_probe`]
            ([`~hf_distill.probing.probe_teacher`] fits and caches one).
    """

    def __init__(self, teacher: nn.Module, weight: torch.Tensor, bias: torch.Tensor, mean, std):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.head = nn.Linear(weight.shape[0], weight.shape[1])
        with torch.no_grad():
            self.head.weight.copy_(weight.T.float())
            self.head.bias.copy_(bias.float())
        self.head.requires_grad_(False)
        self.register_buffer("feature_mean", torch.as_tensor(mean).float().clone())
        self.register_buffer("feature_std", torch.as_tensor(std).float().clone())

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    def head_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of summary features (e.g. cached ones)."""
        return self.head((features.float() - self.feature_mean) / self.feature_std)

    def forward(self, pixel_values: torch.Tensor, input_mean=None, input_std=None) -> torch.Tensor:
        """Logits of images normalized with `(input_mean, input_std)` (re-normalized and resized for the teacher)."""
        return self.head_logits(self.teacher(pixel_values, input_mean, input_std).summary)

    def save_head(self, folder: str | os.PathLike) -> str:
        """Write the head and the standardization to `folder/linear_head.safetensors`, atomically."""
        path = os.path.join(folder, HEAD_FILE)
        tensors = {
            "weight": self.head.weight.T.contiguous(),
            "bias": self.head.bias,
            "mean": self.feature_mean,
            "std": self.feature_std,
        }
        save_safetensors_atomically({k: v.detach().cpu() for k, v in tensors.items()}, path)
        return path

    @classmethod
    def from_saved_head(cls, teacher: nn.Module, folder: str | os.PathLike) -> "ProbedTeacher":
        tensors = load_file(os.path.join(folder, HEAD_FILE))
        return cls(teacher, tensors["weight"], tensors["bias"], tensors["mean"], tensors["std"])
