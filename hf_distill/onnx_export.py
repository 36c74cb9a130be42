"""ONNX export of the students hf_distill exports, checked against PyTorch with onnxruntime.

Every export folder of hf_distill converts: the UNIC encoder (a stock `AutoModel`, ViT-family or ConvNeXt / ResNet /
Swin), the task-distilled classifier (`AutoModelForImageClassification`) and the UDON embedding model (its own code,
loaded with `trust_remote_code=True`). The graph takes `pixel_values` `[batch, 3, S, S]` (dynamic batch, the export's
image size `S`) and returns the model's output tensors under their transformers names (`last_hidden_state`,
`pooler_output`; `logits`; `image_embeds`, `backbone_features`).

Hugging Face Optimum is not used: its ONNX exporter (`optimum-onnx` 0.1.0, the newest release) requires
transformers < 4.58 and fails on import under transformers 5 (it imports `get_parameter_dtype` from
`transformers.modeling_utils`, `OutputRecorder` and `CLIPSdpaAttention`, all removed in 5.x). The export goes through
`torch.onnx.export` with the TorchScript tracer (`dynamo=False`: the dynamo exporter needs the extra package
`onnxscript`), which handles the three kinds above the same way.
"""

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, PreTrainedModel
from transformers.image_processing_utils import ImageProcessingMixin

from .io_utils import atomic_folder

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
# Output fields exported, in this order, when the model returns them (hidden states and attentions are left out).
OUTPUT_NAMES = ("image_embeds", "backbone_features", "logits", "last_hidden_state", "pooler_output")


@dataclass
class OnnxExport:
    """
    Args:
        path (`str`): the written `model.onnx`.
        output_names (`list[str]`): the graph's outputs.
        image_size (`int`): side of the square input the graph takes.
        export_seconds (`float`): time of `torch.onnx.export`.
        max_abs_diff (`dict[str, float]`): per output, the largest absolute difference between onnxruntime and
            PyTorch on the check batch.
    """

    path: str
    output_names: list[str]
    image_size: int
    export_seconds: float
    max_abs_diff: dict[str, float]


class _NamedOutputs(nn.Module):
    """`pixel_values -> tuple` of the named output fields: what the tracer needs."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values=pixel_values)
        return tuple(outputs[name] for name in self.names)


def load_exported_model(model_dir: str, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of an hf_distill export folder: an image classifier when its config names one, a model with its own
    code (`auto_map`, e.g. UDON) only with `trust_remote_code`, else the stock `AutoModel` (UNIC encoder)."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{model_dir!r} is not a model folder (no config.json): give the output folder of a recipe.")
    with open(config_path, encoding="utf-8") as stream:
        config = json.load(stream)
    if config.get("auto_map"):
        if not trust_remote_code:
            raise ValueError(
                f"{model_dir!r} ships its own code ({config['auto_map'].get('AutoModel')}, e.g. the UDON embedding "
                "model): loading it runs that code. Pass --trust_remote_code if you trust this folder."
            )
        return AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    if any(name.endswith("ForImageClassification") for name in config.get("architectures") or []):
        return AutoModelForImageClassification.from_pretrained(model_dir)
    return AutoModel.from_pretrained(model_dir)


def export_image_size(model_dir: str, model: PreTrainedModel) -> int:
    """The square input size of the export: its image processor's crop / resize size, else its config's."""
    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(model_dir)
    except OSError:
        processor = {}
    for key in ("crop_size", "size"):
        size = processor.get(key)
        if isinstance(size, dict):
            size = size.get("height") or size.get("shortest_edge")
        if isinstance(size, int):
            return size
    config = getattr(model.config, "backbone_config", None) or model.config
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not isinstance(size, int):
        raise ValueError(f"{model_dir!r} has no image processor and no image_size in its config: pass --image_size.")
    return size


def export_onnx(
    model_dir: str,
    output_dir: str | None = None,
    image_size: int | None = None,
    opset: int = 17,
    trust_remote_code: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    check_batch_size: int = 3,
    seed: int = 0,
) -> OnnxExport:
    """Export the model of `model_dir` to `output_dir/model.onnx` (default `model_dir/onnx`) and check it.

    The check runs a random batch of `check_batch_size` images (another batch size than the traced one, which tests
    the dynamic batch axis) through PyTorch and onnxruntime; an output that differs anywhere by more than
    `atol + rtol * max|PyTorch output|` is an error and nothing is written. The folder is written atomically.

    Args:
        model_dir (`str`): an export folder of hf_distill (or any transformers vision model folder).
        output_dir (`str`, *optional*): folder of the ONNX model; defaults to `model_dir/onnx`.
        image_size (`int`, *optional*): input side; defaults to the export's image processor size.
        opset (`int`, defaults to 17): ONNX opset.
        trust_remote_code (`bool`, defaults to `False`): needed for models with their own code (UDON).
        atol (`float`, defaults to 1e-4), rtol (`float`, defaults to 1e-4): accepted difference to PyTorch. The
            relative part, on the output's scale, matters for outputs of large magnitude: a randomly initialized
            ResNet-50 outputs values up to ~600, where float32 rounding alone differs by ~4e-4.
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'hf_distill[onnx]'.") from error
    model = load_exported_model(model_dir, trust_remote_code).eval()
    image_size = image_size or export_image_size(model_dir, model)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(1, 3, image_size, image_size, generator=generator)
    with torch.no_grad():
        probe = model(pixel_values=example)
    names = [name for name in OUTPUT_NAMES if isinstance(probe.get(name), torch.Tensor)]
    if not names:
        raise ValueError(f"{type(model).__name__} returns none of {OUTPUT_NAMES}: nothing to export.")
    wrapper = _NamedOutputs(model, names).eval()
    output_dir = output_dir or os.path.join(model_dir, "onnx")
    check = torch.randn(check_batch_size, 3, image_size, image_size, generator=generator)
    with atomic_folder(output_dir) as staging:
        path = os.path.join(staging, ONNX_FILE)
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings on shape checks it records as constants
            torch.onnx.export(
                wrapper,
                (example,),
                path,
                dynamo=False,
                input_names=["pixel_values"],
                output_names=names,
                dynamic_axes={name: {0: "batch_size"} for name in ["pixel_values", *names]},
                opset_version=opset,
            )
        seconds = time.perf_counter() - start
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        onnx_outputs = session.run(names, {"pixel_values": check.numpy()})
        with torch.no_grad():
            torch_outputs = wrapper(check)
        diffs, bad = {}, []
        for name, ours, reference in zip(names, onnx_outputs, torch_outputs):
            reference = reference.float().numpy()
            if ours.shape != reference.shape:
                raise ValueError(f"ONNX output {name} has shape {ours.shape}, PyTorch {reference.shape}.")
            difference = np.abs(ours.astype(np.float32) - reference)
            diffs[name] = float(difference.max())
            if diffs[name] > atol + rtol * float(np.abs(reference).max()):
                bad.append(name)
        if bad:
            raise ValueError(
                f"The ONNX model differs from PyTorch by more than atol {atol} + rtol {rtol} x max|output| in {bad} (max "
                f"absolute differences {diffs}); nothing was written."
            )
    path = os.path.join(output_dir, ONNX_FILE)
    logger.info("Exported %s to %s in %.2f s; max |ONNX - PyTorch|: %s", model_dir, path, seconds, diffs)
    return OnnxExport(path, names, image_size, seconds, diffs)


__all__ = ["OnnxExport", "export_onnx", "load_exported_model"]
