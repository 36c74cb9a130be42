"""`--eval_data` of recipes/unic.py (evaluation loss on held-out images) and `--eval_strategy` in every recipe: it
works where the recipe has an evaluation set, and is refused before any work where it has none."""

import json
from pathlib import Path

import pytest

from ..conftest import load_recipe
from .test_unic import recipe, recipe_args

ROOT = Path(__file__).resolve().parents[2]


def test_eval_data_gives_the_distillation_loss_on_held_out_center_crops(
    tiny_teachers, image_dataset_dir, student_config_dir, mnist_splits_dir, tmp_path
):
    out = tmp_path / "out"
    eval_options = [
        "--eval_data", mnist_splits_dir, "--eval_split", "test", "--max_eval_samples", "8",
        "--eval_strategy", "steps", "--eval_steps", "3", "--per_device_eval_batch_size", "8",
    ]  # fmt: skip
    trainer = recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, out, *eval_options))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [3, 6, 6]  # --eval_steps 3, then once after training
    names = ("vit-p4", "dinov2-p7")
    for entry in evaluations:
        # no teacher dropping: every teacher kept for every image (the training run drops with p = 0.5) ...
        assert all(entry[f"eval_{name}/kept"] == 1.0 for name in names)
        # ... so the loss of the single eval batch is the mean over teachers of 0.5 * (cls + patch), UNIC eq. 2
        expected = sum(0.5 * (entry[f"eval_{n}/cls_loss"] + entry[f"eval_{n}/patch_loss"]) for n in names) / 2
        assert entry["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert any(entry.get(f"{names[0]}/kept", 1.0) < 1.0 for entry in history if "loss" in entry)
    assert trainer.eval_dataset.num_rows == 8
    # center crops and no random draw: evaluating again gives the same numbers, other images other numbers
    again = trainer.evaluate()
    assert again["eval_loss"] == pytest.approx(evaluations[-1]["eval_loss"], rel=1e-6)
    assert trainer.evaluate(trainer.train_dataset.select(range(8)))["eval_loss"] != pytest.approx(again["eval_loss"])
    assert not (out / "eval_results.json").exists()  # left to recipes/evaluate.py


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval_strategy", "steps"], "--eval_strategy steps needs held-out images: pass --eval_data"),
        (["--eval_strategy", "epoch"], "--eval_strategy epoch needs held-out images"),
        (["--eval_data", "x", "--teacher_cache", "c"], "--eval_data needs the teachers run.*--teacher_cache"),
    ],
)
def test_unic_refuses_an_evaluation_it_cannot_run_before_any_work(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, extra, message
):
    with pytest.raises(ValueError, match=message):
        recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out") + extra)
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()


def test_a_wrong_eval_split_names_the_option_to_fix(
    tiny_teachers, image_dataset_dir, student_config_dir, mnist_splits_dir, tmp_path
):
    extra = ["--eval_data", mnist_splits_dir]  # default --eval_split validation: not in this set
    with pytest.raises(ValueError, match=r"--eval_data: .*no split 'validation'.*\['test', 'train'\].*--eval_split"):
        recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path / "out") + extra)
    assert not (tmp_path / "out").exists()


def test_udon_and_task_distill_refuse_eval_strategy_before_any_work(tmp_path, monkeypatch):
    udon = load_recipe("udon")
    monkeypatch.setattr(udon, "load_domains", None)  # the refusal comes before any data is read
    with pytest.raises(ValueError, match="--eval_strategy steps is not supported by recipes/udon.py.*retrieval"):
        udon.main(["--backbone", "b", "--domains", "a=x", "--output_dir", str(tmp_path / "udon"),
                   "--eval_strategy", "steps", "--use_cpu", "--report_to", "none"])  # fmt: skip
    task = load_recipe("task_distill")
    monkeypatch.setattr(task, "load_task_data", None)
    with pytest.raises(
        ValueError, match="--eval_strategy epoch is not supported by recipes/task_distill.py.*accuracy"
    ):
        task.main(["--teacher", "t", "--student", "s", "--dataset", "d", "--output_dir", str(tmp_path / "task"),
                   "--eval_strategy", "epoch", "--use_cpu", "--report_to", "none"])  # fmt: skip
    assert not (tmp_path / "udon").exists() and not (tmp_path / "task").exists()
