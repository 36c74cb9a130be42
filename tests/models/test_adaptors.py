"""Adaptor export: the student with its heads, the standardization folded in, loads without hf_distill and outputs the
training-time head predictions de-standardized (every standardization mode), for all teachers or a chosen subset; for
ViT-family and feature-map (ResNet, ConvNeXt) students."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModel

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.hub import upload_file_list

from ..conftest import (
    tiny_convnext_config,
    tiny_dinov2_config,
    tiny_resnet_config,
    tiny_swin_config,
    tiny_vit_config,
)

TEACHERS = [{"name": "a", "summary_dim": 48, "patch_dim": 48}, {"name": "b", "summary_dim": 16, "patch_dim": 10}]
# student backbone -> (config, tokens of a 32 px image): ViT /8, feature-map students of stride 16 (Swin: 8)
STUDENTS = {
    "vit": (tiny_vit_config, 16),
    "resnet": (tiny_resnet_config, 4),
    "convnext": (tiny_convnext_config, 4),
    "swin": (tiny_swin_config, 16),
}


def trained_student(mode: str, backbone_config=None, **kwargs) -> UnicStudentModel:
    """A tiny 2-teacher student whose standardizers saw three training batches of offset, anisotropic features."""
    torch.manual_seed(0)
    config = UnicStudentConfig(
        backbone_config=backbone_config or tiny_vit_config(),
        teachers=TEACHERS,
        standardization=mode,
        standardization_warmup_steps=2,
        **kwargs,
    )
    student = UnicStudentModel(config)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for teacher in TEACHERS:
            name, scale = teacher["name"], torch.rand(teacher["summary_dim"], generator=generator) * 5
            summary = torch.randn(8, teacher["summary_dim"], generator=generator) * scale + 3.0
            patch = torch.randn(8, 16, teacher["patch_dim"], generator=generator) * 2.0 - 1.0
            student.cls_standardizers[name](summary, ema_weight=0.5)
            student.patch_standardizers[name](patch, ema_weight=0.5)
    return student.eval()


def destandardized(prediction: torch.Tensor, standardizer) -> np.ndarray:
    """The inverse of a standardizer applied to a head output, from its buffers, in float64 numpy (independent of
    the export's folding): `x' (std) + mean` per dimension, or the pseudo-inverse of the PHI-S transform."""
    prediction = prediction.double().numpy()
    mean = standardizer.mean.double().numpy()
    if standardizer.mode == "phi-s":
        return prediction @ np.linalg.pinv(standardizer.transform.double().numpy()).T + mean
    std = standardizer.std.double().numpy()
    scale = {"unic": std + 1e-6, "dune": np.maximum(std, 1e-3), "none": np.ones_like(std)}[standardizer.mode]
    return prediction * scale + (0 if standardizer.mode == "none" else mean)


@pytest.mark.parametrize(
    "backbone, mode, ladder_layers",
    [
        ("vit", "unic", None),
        ("vit", "dune", None),
        ("vit", "phi-s", None),
        ("resnet", "unic", None),
        ("resnet", "phi-s", [1]),  # stages 1 and 3: rungs of widths 8 and 32
        ("convnext", "unic", [2]),
        ("convnext", "phi-s", None),
        ("swin", "unic", None),
    ],
    ids=str,
)
def test_adaptors_output_the_destandardized_head_predictions(backbone, mode, ladder_layers, tmp_path):
    make_config, num_tokens = STUDENTS[backbone]
    student = trained_student(mode, make_config(), ladder_layers=ladder_layers)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        predictions = student(pixels)
    student.export_adaptors(tmp_path / "adaptors", image_size=32)
    model = AutoModel.from_pretrained(tmp_path / "adaptors", trust_remote_code=True).eval()
    with torch.no_grad():
        outputs = model(pixels)
    assert list(outputs.adaptors) == ["a", "b"]
    for index, name in enumerate(["a", "b"]):
        summary = destandardized(predictions.cls_predictions[index], student.cls_standardizers[name])
        patch = destandardized(predictions.patch_predictions[index], student.patch_standardizers[name])
        np.testing.assert_allclose(outputs.adaptors[name].summary.double().numpy(), summary, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(outputs.adaptors[name].patch_tokens.double().numpy(), patch, atol=1e-5, rtol=1e-5)
    assert outputs.adaptors["b"].patch_tokens.shape == (3, num_tokens, 10)  # the teacher's width (PHI-S pads inside)
    torch.testing.assert_close(outputs.last_hidden_state, predictions.last_hidden_state)


@pytest.mark.parametrize("backbone", ["dinov2", "resnet"])
def test_a_subset_of_teachers_at_export_and_at_load_time(backbone, tmp_path):
    make_config, size = {"dinov2": (tiny_dinov2_config, 28), "resnet": (tiny_resnet_config, 32)}[backbone]
    student = trained_student("unic", make_config())
    pixels = torch.randn(2, 3, size, size)
    if backbone == "resnet":  # a ResNet config has no image size: the export's image processor needs one
        with pytest.raises(ValueError, match="Pass image_size: the student's resnet config records no image size"):
            student.export_adaptors(tmp_path / "all")
    student.export_adaptors(tmp_path / "all", image_size=size)
    full = AutoModel.from_pretrained(tmp_path / "all", trust_remote_code=True).eval()
    only_b = AutoModel.from_pretrained(tmp_path / "all", trust_remote_code=True, adaptors=["b"]).eval()
    assert list(only_b.summary_heads) == ["b"] and not any(key.startswith(("summary_heads.a", "patch_heads.a"))
                                                              for key in only_b.state_dict())  # fmt: skip
    with torch.no_grad():
        expected = full(pixels).adaptors["b"]
        got = only_b(pixels)
    assert list(got.adaptors) == ["b"]
    torch.testing.assert_close(got.adaptors["b"].patch_tokens, expected.patch_tokens)
    with pytest.raises(ValueError, match=r"Adaptors \['a'\] are not loaded"):
        only_b(pixels, adaptors=["a"])
    with pytest.raises(ValueError, match=r"Unknown adaptors \['c'\]"):
        AutoModel.from_pretrained(tmp_path / "all", trust_remote_code=True, adaptors=["c"])

    student.export_adaptors(tmp_path / "a", teachers=["a"], image_size=size)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert [teacher["name"] for teacher in config["teachers"]] == ["a"]
    with pytest.raises(ValueError, match=r"Cannot export adaptors for \['x'\].*heads for \['a', 'b'\]"):
        student.export_adaptors(tmp_path / "x", teachers=["x"], image_size=size)


BLOCKED_RUN = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_distill" or name.startswith("hf_distill."):
            raise ImportError("hf_distill is blocked in this test")

sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModel

folder, expected = sys.argv[1], torch.load(sys.argv[2])
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
only_b = AutoModel.from_pretrained(folder, trust_remote_code=True, adaptors=["b"]).eval()
with torch.no_grad():
    out, out_b = model(expected["pixels"]), only_b(expected["pixels"])
for name in ("a", "b"):
    torch.testing.assert_close(out.adaptors[name].summary, expected[name + "/summary"])
    torch.testing.assert_close(out.adaptors[name].patch_tokens, expected[name + "/patch"])
torch.testing.assert_close(out_b.adaptors["b"].summary, expected["b/summary"])
assert list(out_b.adaptors) == ["b"] and "hf_distill" not in sys.modules
print("loaded without hf_distill")
"""


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_export_loads_without_hf_distill(backbone, tmp_path):
    student = trained_student("phi-s", STUDENTS[backbone][0]())
    folder = tmp_path / "adaptors"
    student.export_adaptors(folder, image_size=32)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "configuration_unic_adaptors.py",
            "modeling_unic_adaptors.py"} <= set(os.listdir(folder))  # fmt: skip
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_unic_adaptors.UnicAdaptorConfig",
        "AutoModel": "modeling_unic_adaptors.UnicAdaptorModel",
    }
    for name in ("configuration_unic_adaptors.py", "modeling_unic_adaptors.py"):
        imports = {
            line.split()[1]
            for line in (folder / name).read_text().splitlines()
            if line.startswith(("import ", "from "))
        }
        assert not any("hf_distill" in module for module in imports), imports
    published = {f"adaptors/{name}" for name in ("config.json", "model.safetensors", "preprocessor_config.json",
                                                  "configuration_unic_adaptors.py", "modeling_unic_adaptors.py")}  # fmt: skip
    assert published == set(upload_file_list(tmp_path))  # a push of the student's folder uploads the adaptors too
    pixels = torch.randn(2, 3, 32, 32)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        out = model(pixels)
    expected = {"pixels": pixels}
    for name in ("a", "b"):
        expected[f"{name}/summary"], expected[f"{name}/patch"] = out.adaptors[name].to_tuple()
    torch.save(expected, tmp_path / "expected.pt")
    # a Python where hf_distill cannot be imported (not on the path, and blocked should an install provide it)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_RUN, str(folder), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded without hf_distill" in result.stdout
