"""Teacher emulation: the streaming scores against float64 numpy, the protocol on a tiny adaptor export with two real
(tiny) teachers and a classifier head, and its limits (a perfect and a mean-only adaptor)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from torch import nn

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.evaluation.emulation import EmulationScore, evaluate_emulation
from hf_distill.models import load_teacher, load_teacher_config, teacher_spec, unique_teacher_names
from hf_distill.models.modeling_unic_adaptors import AdaptorOutput

from ..conftest import tiny_resnet_config, tiny_vit_config


def numpy_scores(prediction: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """Mean row cosine and pooled R^2 (1 - SS_res / SS_tot around the per-dimension mean), float64."""
    cosine = (prediction * target).sum(-1) / (np.linalg.norm(prediction, axis=-1) * np.linalg.norm(target, axis=-1))
    r2 = 1 - ((prediction - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    return cosine.mean(), r2


def test_streaming_scores_match_float64_numpy():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((300, 6)) * [1, 2, 0.1, 5, 1, 1] + 1000.0  # a large offset, uneven spreads
    prediction = target + rng.standard_normal((300, 6)) * 0.5
    prediction[:, :3] -= 1000.0  # cosines well below 1
    score = EmulationScore()
    for rows in (slice(0, 7), slice(7, 150), slice(150, 300)):  # batches of different sizes
        score.update(torch.from_numpy(prediction[rows]).float(), torch.from_numpy(target[rows]).float())
    cosine, r2 = numpy_scores(prediction.astype(np.float32).astype(np.float64), target.astype(np.float32))
    result = score.result()
    np.testing.assert_allclose(result["cosine"], cosine, rtol=1e-7)
    np.testing.assert_allclose(result["r2"], r2, rtol=1e-6)


@pytest.fixture(scope="module")
def teachers_and_specs(tiny_teachers):
    sources = [tiny_teachers["vit"], tiny_teachers["dinov2"]]
    names = unique_teacher_names(sources)
    specs = [teacher_spec(name, load_teacher_config(source)) for name, source in zip(names, sources)]
    return dict(zip(names, sources)), specs


@pytest.mark.parametrize("backbone, grid", [("vit", 4), ("resnet", 2)])  # a ViT /8, a ResNet of stride 16
def test_protocol_scores_adaptors_against_their_teachers(
    backbone, grid, teachers_and_specs, image_dataset_dir, tmp_path
):
    """The protocol's numbers are the float64 metrics of the adaptor outputs and of the teachers' outputs on the
    same center views (on the student's token grid); the head's agreement is the fraction of equal argmaxes."""
    teachers, specs = teachers_and_specs
    make_config = {"vit": tiny_vit_config, "resnet": tiny_resnet_config}[backbone]
    torch.manual_seed(0)
    student = UnicStudentModel(UnicStudentConfig(backbone_config=make_config(), teachers=specs)).eval()
    student.export_adaptors(tmp_path / "adaptors", image_size=32)
    dataset = load_from_disk(image_dataset_dir).select(range(10))
    torch.manual_seed(1)
    head = nn.Linear(48, 5)
    results = evaluate_emulation(
        str(tmp_path / "adaptors"), teachers, dataset, heads={"dinov2-p7": head}, batch_size=4, trust_remote_code=True
    )
    assert set(results) == {
        f"{name}/{metric}" for name in teachers for metric in ("summary_cosine", "summary_r2", "patch_cosine",
                                                               "patch_r2")} | {"dinov2-p7/top1_agreement"}  # fmt: skip

    from transformers import AutoModel

    model = AutoModel.from_pretrained(tmp_path / "adaptors", trust_remote_code=True).eval()
    images = np.stack([np.asarray(image.convert("RGB").resize((32, 32), 3)) for image in dataset["image"]])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(student.config.image_mean), torch.tensor(student.config.image_std)
    pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        outputs = model(pixels).adaptors
        for name, source in teachers.items():
            teacher = load_teacher(source)(pixels, mean, std, grid_size=(grid, grid))
            adaptor = outputs[name]
            cosine, r2 = numpy_scores(adaptor.summary.double().numpy(), teacher.summary.double().numpy())
            np.testing.assert_allclose(results[f"{name}/summary_cosine"], cosine, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(results[f"{name}/summary_r2"], r2, rtol=1e-4, atol=1e-4)
            flat = [tokens.reshape(-1, tokens.shape[-1]).double().numpy() for tokens in (adaptor.patch_tokens,
                                                                                          teacher.patch_tokens)]  # fmt: skip
            cosine, r2 = numpy_scores(*flat)
            np.testing.assert_allclose(results[f"{name}/patch_cosine"], cosine, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(results[f"{name}/patch_r2"], r2, rtol=1e-4, atol=1e-4)
            if name == "dinov2-p7":
                agree = (head(adaptor.summary).argmax(-1) == head(teacher.summary).argmax(-1)).double().mean()
                np.testing.assert_allclose(results[f"{name}/top1_agreement"], 100 * agree.item(), atol=1e-9)


class Oracle(nn.Module):
    """An "adaptor model" whose adaptor for a teacher returns that teacher's own outputs (or their mean)."""

    def __init__(self, teacher, name, mean_only=False, bias=None):
        super().__init__()
        self.teacher, self.name, self.mean_only, self.bias = teacher, name, mean_only, bias
        backbone = SimpleNamespace(image_size=32, patch_size=8)
        self.config = SimpleNamespace(
            teachers=[{"name": name}], image_mean=[0.5] * 3, image_std=[0.5] * 3, backbone_config=backbone
        )

    def forward(self, pixels, adaptors=None):
        out = self.teacher(pixels, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3), grid_size=(4, 4))
        summary, patch = out.summary, out.patch_tokens
        if self.mean_only:
            summary = self.bias.expand_as(summary)
        return SimpleNamespace(adaptors={self.name: AdaptorOutput(summary=summary, patch_tokens=patch)})


def test_a_perfect_adaptor_scores_one_and_a_constant_one_scores_no_r2(tiny_teachers, image_dataset_dir):
    dataset = load_from_disk(image_dataset_dir).select(range(8))
    teacher = load_teacher(tiny_teachers["vit"])
    torch.manual_seed(0)
    head = nn.Linear(32, 7)
    perfect = evaluate_emulation(Oracle(teacher, "t"), {"t": teacher}, dataset, heads={"t": head}, batch_size=3)
    assert perfect["t/summary_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["t/patch_r2"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["t/top1_agreement"] == 100.0
    # the mean of the teacher's summaries over the set: R^2 exactly 0
    summaries = evaluate_features_mean(teacher, dataset)
    constant = evaluate_emulation(Oracle(teacher, "t", True, summaries), {"t": teacher}, dataset, batch_size=3)
    assert constant["t/summary_r2"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"Teachers / heads given for \['x'\]; the adaptors are \['t'\]"):
        evaluate_emulation(Oracle(teacher, "t"), {"x": teacher}, dataset)
    with pytest.raises(ValueError, match="--trust_remote_code"):
        evaluate_emulation("some/adaptor-folder", {"t": teacher}, dataset)


def evaluate_features_mean(teacher, dataset) -> torch.Tensor:
    images = np.stack([np.asarray(image.convert("RGB").resize((32, 32), 3)) for image in dataset["image"]])
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        return teacher(pixels, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3), grid_size=(4, 4)).summary.mean(0)
