"""The UNIC recipe with a pretrained student (`--student_model`) and with a convolutional student (and its adaptors)."""

import json
import math

import pytest
import torch
from transformers import AutoModel, ConvNextModel, ViTModel

from hf_distill.models.student_backbones import resize_position_embeddings

from ..conftest import load_recipe, tiny_convnext_config, tiny_vit_config
from .test_unic import recipe_args

recipe = load_recipe("unic")


def test_student_model_starts_from_the_pretrained_weights_and_the_card_says_so(
    tiny_teachers, image_dataset_dir, tmp_path
):
    torch.manual_seed(0)
    pretrained = ViTModel(tiny_vit_config(image_size=16, patch_size=8))  # a 2x2 grid; the recipe trains at 32 px
    pretrained.save_pretrained(tmp_path / "pretrained")
    args = recipe_args(tiny_teachers, image_dataset_dir, "", tmp_path / "out", "--max_steps", "2")
    args += ["--student_model", str(tmp_path / "pretrained"), "--learning_rate", "0", "--warmup_steps", "0"]
    recipe.main(args)

    exported = AutoModel.from_pretrained(tmp_path / "out")  # learning rate 0: the export is the loaded student
    assert type(exported) is ViTModel and exported.config.image_size == 32
    for key, value in pretrained.state_dict().items():
        if key != "embeddings.position_embeddings":
            torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(
        exported.embeddings.position_embeddings,
        resize_position_embeddings(pretrained.embeddings.position_embeddings, (2, 2), (4, 4)),
        rtol=0,
        atol=0,
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| student initialization | pretrained weights of {tmp_path / 'pretrained'} |" in card
    manifest = json.loads((tmp_path / "out" / "run_manifest.json").read_text())
    assert manifest["initial_weights"]["student"]["source"] == str(tmp_path / "pretrained")
    assert manifest["student_config"]["backbone_source"] == str(tmp_path / "pretrained")


def test_student_model_and_student_config_together_are_refused(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    args = recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="Both --student_config .* and --student_model .* were given: keep one"):
        recipe.main([*args, "--student_model", student_config_dir])
    with pytest.raises(ValueError, match="--student_revision selects a revision of --student_model"):
        recipe.main([*args, "--student_revision", "main"])
    assert not (tmp_path / "out").exists()


def test_convnext_student_trains_and_exports_a_stock_convnext_and_its_adaptors(
    tiny_teachers, image_dataset_dir, tmp_path
):
    tiny_convnext_config().save_pretrained(tmp_path / "convnext")
    args = recipe_args(tiny_teachers, image_dataset_dir, str(tmp_path / "convnext"), tmp_path / "out")
    trainer = recipe.main([*args, "--max_steps", "3", "--save_steps", "3", "--export_adaptors", "true"])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    encoder = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert type(encoder) is ConvNextModel
    # the adaptors: the same encoder (its last map flattened: a 2x2 grid at 32 px), one adaptor per teacher
    adaptors = AutoModel.from_pretrained(tmp_path / "out" / "adaptors", trust_remote_code=True).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs, last_map = adaptors(pixels), encoder(pixels).last_hidden_state
    torch.testing.assert_close(outputs.last_hidden_state, last_map.flatten(2).transpose(1, 2))
    widths = {teacher["name"]: teacher["patch_dim"] for teacher in trainer.model.config.teachers}
    assert {name: adaptor.patch_tokens.shape for name, adaptor in outputs.adaptors.items()} == {
        name: (2, 4, width) for name, width in widths.items()
    }
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| student | convnext (3 stages, widths 8, 16, 32, stride 16) |" in card
    assert "| student initialization | random weights |" in card
    manifest_config = json.loads((tmp_path / "out" / "checkpoint-3" / "config.json").read_text())
    assert manifest_config["backbone_config"]["model_type"] == "convnext"
