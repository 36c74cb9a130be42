import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import metadata_load
from safetensors.torch import load_file
from transformers import AutoModel, ViTModel

from hf_distill.trainers import UnicTrainer

from ..conftest import KillAt, load_recipe
from ..hub.test_hub import cites, new_paper

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("unic")


def recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, *extra):
    return [
        "--config", str(ROOT / "recipes" / "configs" / "unic_tiny.yaml"),
        "--teachers", tiny_teachers["vit"], tiny_teachers["dinov2"],
        "--teacher_grid_alignment", "resize", "interpolate",
        "--student_config", student_config_dir,
        "--train_data", image_dataset_dir,
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--max_steps", "6",
        "--save_steps", "3",
        "--logging_steps", "1",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_recipe_trains_and_exports_a_stock_model(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(UnicTrainer, "_paper", new_paper("unic-variant"))  # the card cites the trainer's paper
    monkeypatch.setattr(UnicTrainer, "_tag_names", [*UnicTrainer._tag_names, "unic-variant"])  # and carries its tags
    trainer = recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path))
    assert set(UnicTrainer._tag_names) <= set(metadata_load(tmp_path / "README.md")["tags"])
    assert cites((tmp_path / "README.md").read_text(), new_paper("unic-variant"))
    assert trainer.args.max_steps == 6  # CLI overrides the YAML's 50
    assert trainer.args.learning_rate == 1e-3  # from the YAML
    assert type(AutoModel.from_pretrained(tmp_path)) is ViTModel
    assert (tmp_path / "checkpoint-6" / "model.safetensors").exists()
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert any("dinov2-p7/patch_loss" in entry for entry in history)


def test_killed_run_restarts_with_the_same_command_and_matches(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, reference_dir))
    args = recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, killed_dir)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args, callbacks=[KillAt(4)])  # dies after checkpoint-3 was written
    assert sorted(p.name for p in killed_dir.glob("checkpoint-*")) == ["checkpoint-3"]
    trainer = recipe.main(args)  # the same command resumes from checkpoint-3
    assert trainer.state.global_step == 6
    reference = load_file(reference_dir / "checkpoint-6" / "model.safetensors")
    resumed = load_file(killed_dir / "checkpoint-6" / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for key in reference:  # student, heads and standardization statistics
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--teachers", "no-such-org/no-such-teacher", "--teacher_grid_alignment", "resize"], "could not be found"),
        (["--image_column", "picture"], "no column 'picture'.*\\['image', 'label'\\].*--image_column"),
        (["--image_size", "30"], "--image_size 30 is not divisible by the student's patch size 8"),
    ],
)
def test_bad_input_fails_before_training(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, override, message
):
    with pytest.raises(ValueError, match=message):
        recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out") + override)
    assert not (tmp_path / "out").exists()


def test_unknown_yaml_key_is_rejected(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("teachers: [a]\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="Unknown options.*learning_rat"):
        recipe.parse_args(["--config", str(config)])
    config.write_text("teachers: [a]\nno_use_ladder: true\n")  # a command-line negation, not a YAML key
    with pytest.raises(ValueError, match=r"Unknown options.*\['no_use_ladder'\]"):
        recipe.parse_args(["--config", str(config)])
    config.write_text("teachers: [a]\nuse-ladder: false\nstudent_config: s\ntrain_data: d\n")  # option spelling
    assert recipe.parse_args(["--config", str(config)])[0].use_ladder is False


@pytest.mark.distributed
def test_two_processes_on_cpu_see_different_data_and_end_identical(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(ROOT / "tests" / "scripts" / "record_ranks.py"), "unic", str(record_dir),
        *recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out", "--use_cpu", "true",
                     "--per_device_train_batch_size", "4", "--max_steps", "4"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)
    fingerprints = [[f for batch in record["batches"] for f in batch["fingerprints"]] for record in records]
    assert len(fingerprints[0]) == 16 and not set(fingerprints[0]) & set(fingerprints[1])  # 4 steps x 4, disjoint
    weights = [load_file(record_dir / f"rank{rank}.st") for rank in (0, 1)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    initial = AutoModel.from_pretrained(tmp_path / "out")  # rank 0 exported the trained encoder
    assert type(initial) is ViTModel


@pytest.mark.timeout(120)
def test_push_to_hub_from_the_recipe_uploads_only_the_student(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, fake_hub
):
    """`--push_to_hub --hub_model_id` against a local fake Hub: the exported encoder, its image processor, the card
    and the plots arrive; no checkpoint, heads or optimizer state."""
    hub = fake_hub
    output_dir = tmp_path / "out"
    args = recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir)
    recipe.main(args + ["--push_to_hub", "true", "--hub_model_id", "me/unic-tiny", "--hub_token", "hf_dummy"])
    # every write went through the implemented endpoints (a client may also probe GET endpoints that 404 here)
    assert not [request for request in hub.unknown if request[0] != "GET"], hub.unknown
    assert hub.created and all((c["name"], c["organization"]) == ("unic-tiny", "me") for c in hub.created)
    uploaded = hub.files["me/unic-tiny"]
    assert sorted(uploaded) == [
        "README.md", "config.json", "model.safetensors", "plots/teacher_losses.png", "preprocessor_config.json"
    ]  # fmt: skip
    assert uploaded["model.safetensors"] == (output_dir / "model.safetensors").read_bytes()
    assert "me/unic-tiny" in uploaded["README.md"].decode()  # the usage snippet names the repo


@pytest.mark.parametrize(
    "config",
    sorted((ROOT / "recipes" / "configs").glob("unic*.yaml"))
    + [ROOT / "recipes" / "configs" / "demo_fashion_mnist.yaml"],
    ids=lambda p: p.name,
)
def test_shipped_configs_parse(config):
    """Every shipped YAML names only existing options with valid values (nothing is loaded; bf16 configs are meant
    for GPUs, so bf16 is turned off here)."""
    script_args, training_args = recipe.parse_args(
        [
            "--config",
            str(config),
            "--teachers",
            "a",
            "b",
            "--student_config",
            "s",
            "--train_data",
            "d",
            "--bf16",
            "false",
        ]
    )
    assert training_args.image_size % 8 == 0 and script_args.image_column == "image"


def test_profile_flag_writes_a_trace_of_training_steps(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path):
    recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, "--profile"))
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "ProfilerStep#3" in names and "ProfilerStep#4" in names  # steps 1-2: wait + warm-up
    assert "aten::addmm" in names  # operators of the step were recorded
    assert "Self CPU" in (tmp_path / "profile" / "summary_rank0.txt").read_text()
