"""recipes/evaluate.py --adaptors: teacher emulation of a trained student's adaptors in the printed table,
eval_results.json and the model card's model-index."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from torch import nn

from hf_distill.hub.model_index import validate_card_metadata

from .test_evaluate import recipe
from .test_unic import recipe as unic_recipe
from .test_unic import recipe_args


def tiny_head() -> nn.Module:
    """A fixed "classifier" reading the 48-d summary of the tiny DINOv2 teacher (py:tests... spec of this test)."""
    torch.manual_seed(0)
    return nn.Linear(48, 6)


def test_emulation_metrics_reach_the_table_results_and_card(
    tiny_teachers, image_dataset_dir, student_config_dir, mnist_splits_dir, tmp_path, capsys
):
    student_dir = tmp_path / "student"
    unic_recipe.main(
        recipe_args(
            tiny_teachers,
            image_dataset_dir,
            student_config_dir,
            student_dir,
            "--export_adaptors",
            "true",
            "--max_steps",
            "2",
        )  # fmt: skip
    )
    adaptors = str(student_dir / "adaptors")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"datasets:\n  - {{name: mnist, path: {mnist_splits_dir}, protocols: [knn], max_train_samples: 20, "
        "max_test_samples: 12}\nbatch_size: 8\n"
    )
    common = ["--models", str(student_dir), "--model_names", "student", "--config", str(suite), "--knn_k", "5",
              "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    with pytest.raises(ValueError, match="--trust_remote_code"):
        recipe.main([*common, "--adaptors", adaptors, "--emulation_teachers", f"vit-p4={tiny_teachers['vit']}"])
    results = recipe.main(
        [
            *common, "--model_card_dir", str(student_dir), "--trust_remote_code", "--adaptors", adaptors,
            "--emulation_teachers", f"vit-p4={tiny_teachers['vit']}", f"dinov2-p7={tiny_teachers['dinov2']}",
            "--emulation_heads", "dinov2-p7=py:tests.recipes.test_evaluate_emulation:tiny_head",
        ]
    )  # fmt: skip
    table = capsys.readouterr().out
    values = results["student"]
    for name in ("vit-p4", "dinov2-p7"):
        for metric in ("summary_cosine", "summary_r2", "patch_cosine", "patch_r2"):
            key = f"mnist/emulation/{name}/{metric}"
            assert key in values and f"| {key} | {values[key]:.3f} |" in table
            assert -1.0 <= values[key] <= 1.0 or metric.endswith("r2")
    assert 0.0 <= values["mnist/emulation/dinov2-p7/top1_agreement"] <= 100.0
    assert "mnist/emulation/vit-p4/top1_agreement" not in values  # no head given for it

    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["models"]["student"]["results"] == values
    assert saved["emulation"]["heads"] == {"dinov2-p7": "py:tests.recipes.test_evaluate_emulation:tiny_head"}
    card = ModelCard.load(student_dir / "README.md")
    validate_card_metadata(card)
    index = {(r.task_name, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert index[("Teacher emulation (dinov2-p7)", "patch R^2")] == round(
        values["mnist/emulation/dinov2-p7/patch_r2"], 4
    )
    assert index[("Teacher emulation (dinov2-p7)", "top-1 agreement with the teacher's head (%)")] == round(
        values["mnist/emulation/dinov2-p7/top1_agreement"], 2
    )
    assert ("Teacher emulation (vit-p4)", "summary cosine similarity") in index


def test_bad_emulation_options_fail_before_any_work():
    base = ["--models", "x", "--dataset", "d=p"]
    with pytest.raises(ValueError, match="--adaptors needs --emulation_teachers"):
        recipe.parse_args([*base, "--adaptors", "a"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        recipe.parse_args([*base, "--adaptors", "a", "--emulation_teachers", "no-name"])
    with pytest.raises(ValueError, match="pass --adaptors"):
        recipe.parse_args([*base, "--emulation_teachers", "t=s"])
    with pytest.raises(ValueError, match=r"--emulation_heads for \['u'\]"):
        recipe.parse_args([*base, "--adaptors", "a", "--emulation_teachers", "t=s", "--emulation_heads", "u=py:m:f"])
