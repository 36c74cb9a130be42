"""Non-finite teacher outputs, losses and gradients never reach the statistics or the weights (UNIC, UDON, KD)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerCallback

from hf_distill import ModuleTeacher
from hf_distill.models.probed_teacher import ProbedTeacher
from hf_distill.trainers.nonfinite import NonFiniteArguments, NonFiniteError, NonFiniteGuard, finite_rows

from ..conftest import load_recipe
from ..recipes.test_task_distill import args as kd_args
from ..recipes.test_task_distill import recipe as kd_recipe
from ..recipes.test_task_distill import task  # noqa: F401 (fixture)
from ..recipes.test_udon import recipe as udon_recipe
from ..recipes.test_udon import recipe_args as udon_args
from ..recipes.test_udon import two_domains  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]
unic_recipe = load_recipe("unic")

ONE_LOG = SimpleNamespace(num_processes=1)  # what `log_values` reads of an Accelerator in one process


def nan_rows(tensor: torch.Tensor, rows: str) -> torch.Tensor:
    """`tensor` with NaN in row 0 (`rows="first"`) or in every row (`"all"`)."""
    tensor = tensor.clone()
    if rows == "all":
        tensor[:] = math.nan
    else:
        tensor[0] = math.nan
    return tensor


def cnn_teacher(rows: str) -> ModuleTeacher:
    """A plain CNN teacher (40-d /8 tokens) whose features are NaN in the given rows of every batch."""
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(8, 40, 3, stride=4, padding=1))
    return ModuleTeacher(
        cnn,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        patch_size=8,
        feature_fn=lambda module, pixels: nan_rows(module(pixels), rows),
        name="cnn",
    )


def assert_all_finite(path: Path) -> None:
    weights = load_file(path)
    assert weights and all(torch.isfinite(value).all() for value in weights.values())


# ---------------------------------------------------------------------------------------------------- the guard alone


def test_finite_rows_flags_each_sample():
    summary = torch.ones(4, 3)
    patch = torch.ones(4, 2, 3)
    summary[1, 2] = math.inf
    patch[3, 1, 0] = math.nan
    assert finite_rows(summary, patch).tolist() == [True, False, True, False]


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_with_non_finite_gradients_leaves_the_weights_finite(fused):
    guard = NonFiniteGuard(["t"], NonFiniteArguments(), torch.device("cpu"))
    weight = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=fused)
    guard.attach(optimizer)
    weight.grad = torch.ones(3)
    optimizer.step()  # a finite step: Adam moves every weight by ~lr
    after_first = weight.detach().clone()
    assert torch.allclose(after_first, torch.full((3,), 1.0 - 0.1 - 0.1 * 0.01), atol=1e-4)
    weight.grad = torch.tensor([1.0, math.nan, math.inf])
    optimizer.step()
    assert torch.isfinite(weight).all()
    if fused:  # found_inf: nothing moves, not even the step count
        assert torch.equal(weight.detach(), after_first) and optimizer.state[weight]["step"].item() == 1
    logs = guard.log_values({}, ONE_LOG)
    assert logs["nonfinite/skipped_steps"] == 1 and logs["nonfinite/t_skipped_samples"] == 0


def test_limits_name_the_teacher_and_count_consecutive_steps():
    guard = NonFiniteGuard(["good", "bad"], NonFiniteArguments(max_nonfinite_fraction=0.25), torch.device("cpu"))
    guard.count_samples(0, torch.tensor([True, True, True, False]))  # 25%: at the limit, allowed
    guard.count_samples(1, torch.tensor([True, False, True, True]))
    logs = guard.log_values({"loss_term": [torch.tensor(1.0), torch.tensor(3.0)]}, ONE_LOG)
    assert logs == {
        "loss_term": 2.0,
        "nonfinite/skipped_steps": 0.0,
        "nonfinite/good_skipped_samples": 1.0,
        "nonfinite/bad_skipped_samples": 1.0,
    }
    guard.count_samples(1, torch.tensor([False, False, True, True]))
    with pytest.raises(NonFiniteError, match="Teacher 'bad' returned NaN or inf for 2 of its 4 samples"):
        guard.log_values({}, ONE_LOG)

    guard = NonFiniteGuard([], NonFiniteArguments(max_skipped_steps=2), torch.device("cpu"))
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([weight], fused=True)
    guard.attach(optimizer)
    for step in range(3):
        weight.grad = torch.full((2,), math.nan)
        guard.count_terms({"b/relational_distillation": torch.tensor(math.nan), "b/kl": torch.tensor(0.5)})
        optimizer.step()
        if step == 1:  # 2 in a row spread over two logging windows: still allowed
            assert guard.log_values({}, ONE_LOG)["nonfinite/b/relational_distillation"] == 2
    with pytest.raises(NonFiniteError, match=r"3 consecutive .* b/relational_distillation \(1x\)"):
        guard.log_values({}, ONE_LOG)


# ---------------------------------------------------------------------------------------------------- UNIC


def unic_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir):
    return [
        "--config", str(ROOT / "recipes" / "configs" / "unic_tiny.yaml"),
        "--teacher_grid_alignment", "resize", "interpolate",
        "--student_config", student_config_dir, "--train_data", image_dataset_dir, "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8", "--max_steps", "4", "--save_strategy", "no", "--logging_steps", "2",
        "--disable_tqdm", "true",
    ]  # fmt: skip


def test_unic_run_with_a_teacher_nan_on_one_sample_per_batch_ends_finite(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    teachers = [tiny_teachers["vit"], cnn_teacher("first")]
    trainer = unic_recipe.main(
        unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path), teachers=teachers
    )
    assert_all_finite(tmp_path / "model.safetensors")
    assert trainer.nonfinite._fused  # the default optimizer (fused AdamW) skips a step exactly
    student = trainer.accelerator.unwrap_model(trainer.model)
    for buffer in student.buffers():  # the EMA statistics never saw the NaN rows
        assert torch.isfinite(buffer).all()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["cnn/cls_loss"]) for entry in logs)
    assert [entry["nonfinite/cnn_skipped_samples"] for entry in logs] == [2.0, 4.0]  # one per batch, 2 batches a log
    assert all(entry["nonfinite/skipped_steps"] == 0 for entry in logs)
    assert logs[-1]["nonfinite/vit-p4_skipped_samples"] == 0


def test_unic_run_with_an_always_nan_teacher_stops_naming_it_and_exports_nothing(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    teachers = [tiny_teachers["vit"], cnn_teacher("all")]
    with pytest.raises(NonFiniteError, match="Teacher 'cnn' returned NaN or inf for 16 of its 16 samples"):
        unic_recipe.main(unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path), teachers=teachers)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "README.md").exists()


# ---------------------------------------------------------------------------------------------------- UDON


class NanBackboneAt(TrainerCallback):
    """NaN in the first image's patch embeddings of the UDON backbone at the given optimizer steps (0-based)."""

    def __init__(self, steps):
        self.steps = steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            return nan_rows(output, "first") if module.training and state.global_step in self.steps else output

        model.backbone.embeddings.register_forward_hook(hook)


def test_udon_run_skips_a_step_with_a_nan_image_and_ends_finite(two_domains, tmp_path):  # noqa: F811
    trainer, _ = udon_recipe.main(
        udon_args(two_domains, tmp_path, "--max_steps", "4", "--save_strategy", "no", "--logging_steps", "2"),
        callbacks=[NanBackboneAt({1})],
    )
    assert_all_finite(tmp_path / "model.safetensors")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["nonfinite/skipped_steps"] for entry in logs] == [1.0, 1.0]
    assert any(key.endswith("_distillation") and key.startswith("nonfinite/") for key in logs[0])
    assert all(math.isfinite(value) for value in trainer.domain_sampler.loss_sums.tolist())


def test_udon_run_with_nan_in_every_batch_stops_naming_the_domain(two_domains, tmp_path):  # noqa: F811
    args = udon_args(two_domains, tmp_path, "--max_steps", "4", "--save_strategy", "no", "--max_skipped_steps", "2")
    args += ["--sampling", "round_robin"]
    with pytest.raises(NonFiniteError, match=r"3 consecutive .*(digits|tinted)/teacher_classification"):
        udon_recipe.main(args, callbacks=[NanBackboneAt(set(range(4)))])
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------- task-specific


def nan_probed_teacher(monkeypatch, rows: str) -> None:
    """The probed teacher's logits are NaN in the given rows during training (not while its probe is fitted)."""
    forward = ProbedTeacher.forward
    monkeypatch.setattr(ProbedTeacher, "forward", lambda self, *a, **k: nan_rows(forward(self, *a, **k), rows))


def test_task_distill_run_with_a_teacher_nan_on_one_sample_per_batch_ends_finite(
    task,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    nan_probed_teacher(monkeypatch, "first")
    trainer, _ = kd_recipe.main(kd_args(task, tmp_path, "--save_strategy", "no", "--max_steps", "4"))
    assert_all_finite(tmp_path / "model.safetensors")
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["nonfinite/probed teacher_skipped_samples"] for entry in logs] == [1.0, 2.0, 3.0, 4.0]
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["kl"]) for entry in logs)


def test_task_distill_run_with_an_always_nan_teacher_stops_naming_it(task, tmp_path, monkeypatch):  # noqa: F811
    nan_probed_teacher(monkeypatch, "all")
    with pytest.raises(NonFiniteError, match="Teacher 'probed teacher' returned NaN or inf for 8 of its 8"):
        kd_recipe.main(kd_args(task, tmp_path, "--save_strategy", "no", "--max_steps", "4"))
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.distributed
def test_two_processes_skip_the_same_step_when_one_has_a_non_finite_loss(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    """An inf loss on rank 0 only, with finite gradients: the poisoned loss makes the all-reduced gradients NaN on
    both ranks, so both skip that step and the replicas stay identical."""
    import os
    import shutil
    import subprocess
    import sys

    record_dir = tmp_path / "records"
    record_dir.mkdir()
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29537",
        str(ROOT / "tests" / "scripts" / "inf_loss_on_rank0.py"), str(record_dir),
        *unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out"),
        "--teachers", tiny_teachers["vit"], tiny_teachers["dinov2"], "--use_cpu", "true",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    weights = [load_file(record_dir / f"rank{rank}.st") for rank in (0, 1)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert all(torch.isfinite(value).all() for value in weights[0].values())
    for rank in (0, 1):
        history = json.loads((record_dir / f"rank{rank}.json").read_text())
        logs = [entry for entry in history if "loss" in entry]
        assert [entry["nonfinite/skipped_steps"] for entry in logs] == [1.0, 1.0]
    assert_all_finite(tmp_path / "out" / "model.safetensors")


def test_unic_loss_leaves_invalid_teacher_pairs_out():
    """2 images x 2 teachers; teacher 1 is invalid on image 0 (target zeroed as the standardizer does), and in a second
    batch image 1 has no valid teacher at all. Expected values from the UNIC eq. 1 formula in float64 numpy."""
    import numpy as np

    from hf_distill.losses.unic import distillation_loss

    def token_loss(p, y):  # 0.5 * (1 - cos) + 0.5 * smooth L1 (beta 1, mean over dims), float64
        cos = (p * y).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(y, axis=-1), 1e-8)
        d = np.abs(p - y)
        return 0.5 * (1 - cos) + 0.5 * np.where(d < 1, 0.5 * d**2, d - 0.5).mean(-1)

    rng = np.random.default_rng(0)
    cls_p, cls_y = rng.normal(size=(2, 2, 3)), rng.normal(size=(2, 2, 3))  # [teacher, image, dim]
    patch_p, patch_y = rng.normal(size=(2, 2, 4, 3)), rng.normal(size=(2, 2, 4, 3))
    cls_y[1, 0], patch_y[1, 0] = 0.0, 0.0
    per_pair = 0.5 * (token_loss(cls_p, cls_y) + token_loss(patch_p, patch_y).mean(-1))  # [teacher, image]
    valid = torch.tensor([[True, False], [True, True]])  # [image, teacher]
    predictions = [torch.tensor(cls_p[t], requires_grad=True) for t in range(2)]

    def loss(valid, normalization):
        targets = [(torch.tensor(cls_y[t]), torch.tensor(patch_y[t])) for t in range(2)]
        patches = [torch.tensor(patch_p[t]) for t in range(2)]
        return distillation_loss(predictions, patches, targets, normalization=normalization, valid=valid)[0]

    image = (per_pair[0, 0] + (per_pair[0, 1] + per_pair[1, 1]) / 2) / 2
    assert loss(valid, "image").item() == pytest.approx(image, rel=1e-6)
    assert loss(valid, "batch").item() == pytest.approx((per_pair[0, 0] + per_pair[:, 1].sum()) / 3, rel=1e-6)
    no_teacher_for_image_1 = torch.tensor([[True, False], [False, False]])
    total = loss(no_teacher_for_image_1, "image")
    assert total.item() == pytest.approx(per_pair[0, 0], rel=1e-6)  # image 1 left out, not averaged in as 0
    total.backward()
    assert torch.isfinite(predictions[1].grad).all() and not predictions[1].grad.any()  # teacher 1 never counts
