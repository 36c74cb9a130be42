"""recipes/unic.py with PHI-S and the adaptor export: trains, freezes the transform after its warm-up, resumes a killed
run with the frozen transform, and exports adaptors that load with trust_remote_code."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from ..conftest import KillAt
from .test_unic import recipe, recipe_args


def test_phi_s_trains_resumes_after_a_kill_and_exports_adaptors(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    extra = ("--standardization", "phi-s", "--standardization_warmup_steps", "2", "--export_adaptors", "true")
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, reference_dir, *extra))
    args = recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, killed_dir, *extra)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args, callbacks=[KillAt(4)])  # dies after checkpoint-3 was written, the transform frozen at 2
    at_kill = load_file(killed_dir / "checkpoint-3" / "model.safetensors")
    trainer = recipe.main(args)  # the same command resumes from checkpoint-3
    assert trainer.state.global_step == 6

    student = trainer.model
    for kind in ("cls_standardizers", "patch_standardizers"):
        for name in student.config.teacher_names:
            prefix = f"{kind}.{name}"
            assert getattr(student, kind)[name].is_frozen and at_kill[f"{prefix}.frozen"].item()
            assert at_kill[f"{prefix}.num_updates"].item() == 2
            # the transform frozen before the kill is the one used after the resume
            torch.testing.assert_close(getattr(student, kind)[name].transform.cpu(), at_kill[f"{prefix}.transform"])
    reference = load_file(reference_dir / "checkpoint-6" / "model.safetensors")
    resumed = load_file(killed_dir / "checkpoint-6" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:  # student, heads and PHI-S buffers
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)

    assert json.loads((killed_dir / "config.json").read_text())["model_type"] == "vit"  # the stock export stays
    adaptors = AutoModel.from_pretrained(killed_dir / "adaptors", trust_remote_code=True).eval()
    assert [teacher["standardization"] for teacher in adaptors.config.teachers] == ["phi-s", "phi-s"]
    with torch.no_grad():
        outputs = adaptors(torch.randn(2, 3, 32, 32))
    for teacher in student.config.teachers:
        assert outputs.adaptors[teacher["name"]].summary.shape == (2, teacher["summary_dim"])
        assert outputs.adaptors[teacher["name"]].patch_tokens.shape == (2, 16, teacher["patch_dim"])
    assert "adaptors" in (killed_dir / "README.md").read_text()
