"""The plumbing the three trainers share (hf_distill/trainers/base.py), checked on UDON and task-specific KD: one
random stream per micro-batch, and logged metrics averaged across processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_distill.trainers.base import DistillationTrainer

from ..recipes.test_task_distill import args as kd_args
from ..recipes.test_task_distill import recipe as kd_recipe
from ..recipes.test_task_distill import task  # noqa: F401 (fixture)
from ..recipes.test_udon import recipe as udon_recipe
from ..recipes.test_udon import recipe_args as udon_args
from ..recipes.test_udon import two_domains  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def run_recipe(name, data, output_dir, *extra):
    if name == "udon":
        argv = udon_args(data, output_dir, "--save_strategy", "no", *extra)
        return udon_recipe.main(argv)[0]
    return kd_recipe.main(kd_args(data, output_dir, "--save_strategy", "no", *extra))[0]


@pytest.fixture
def seeds(monkeypatch):
    """`(global step, seed)` of every random stream a training micro-batch draws from."""
    drawn = []
    step_generator = DistillationTrainer.step_generator

    def recording(self, device):
        generator = step_generator(self, device)
        drawn.append((self.state.global_step, generator.initial_seed()))
        return generator

    monkeypatch.setattr(DistillationTrainer, "step_generator", recording)
    return drawn


@pytest.mark.parametrize("method", ["udon", "task_distill"])
def test_micro_batches_of_one_step_draw_different_augmentations_and_a_restart_draws_the_same(
    method, seeds, request, tmp_path
):
    data = request.getfixturevalue("two_domains" if method == "udon" else "task")
    trainer = run_recipe(
        method, data, tmp_path, "--max_steps", "2", "--gradient_accumulation_steps", "2",
        "--per_device_train_batch_size", "4",
    )  # fmt: skip
    # in training: two micro-batches per step, each with its own stream
    assert [step for step, _ in seeds] == [0, 0, 1, 1]
    assert len({seed for _, seed in seeds}) == 4
    # the same images as two micro-batches of one step get different crops / flips
    pixels = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    device = trainer.args.device
    first = trainer.make_views(pixels, True, trainer.step_generator(device))
    second = trainer.make_views(pixels, True, trainer.step_generator(device))
    assert first.shape == (4, 3, 32, 32) and not torch.equal(first, second)
    # a trainer restarted at this step (fresh random state, same global step) draws the same views again
    trainer._generator, trainer._rng_position = None, (-1, 0)
    torch.testing.assert_close(trainer.make_views(pixels, True, trainer.step_generator(device)), first)
    torch.testing.assert_close(trainer.make_views(pixels, True, trainer.step_generator(device)), second)
    # evaluation views are the deterministic center crop
    torch.testing.assert_close(trainer.make_views(pixels, False), trainer.make_views(pixels, False))


@pytest.mark.distributed
@pytest.mark.parametrize(("method", "port"), [("udon", 29541), ("task_distill", 29542)])
def test_logged_metrics_are_the_mean_over_two_processes(method, port, request, tmp_path):
    """Every process logs, per metric, the mean over processes of its own mean over the micro-batches since the last
    log (recomputed here in float64 from the values each process recorded before any reduction)."""
    data = request.getfixturevalue("two_domains" if method == "udon" else "task")
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    common = ["--max_steps", "2", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4"]
    if method == "udon":
        recipe_argv = udon_args(data, tmp_path / "out", "--save_strategy", "no", *common)
    else:
        recipe_argv = kd_args(data, tmp_path / "out", "--save_strategy", "no", *common)
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        str(ROOT / "tests" / "scripts" / "metric_ranks.py"), method, str(record_dir), *recipe_argv, "--use_cpu", "true",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)

    differs = False
    for step in (1, 2):  # --logging_steps 1: the log of step s holds the two micro-batches drawn at global step s-1
        logs = [
            next(entry for entry in record["logs"] if entry.get("step") == step and "loss" in entry)
            for record in records
        ]
        per_rank = []
        for record in records:
            values = {}
            for call in record["calls"]:
                if call["step"] == step - 1:
                    for key, value in call["metrics"].items():
                        values.setdefault(key, []).append(value)
            per_rank.append({key: np.mean(np.asarray(v, dtype=np.float64)) for key, v in values.items()})
        assert per_rank[0].keys() == per_rank[1].keys() and per_rank[0]
        for key in per_rank[0]:
            expected = (per_rank[0][key] + per_rank[1][key]) / 2
            assert logs[0][key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
            assert logs[1][key] == pytest.approx(expected, rel=1e-5, abs=1e-7), key
            differs |= abs(per_rank[0][key] - per_rank[1][key]) > 1e-4 * max(1.0, abs(expected))
    assert differs  # at least one metric differs between the processes, so the mean is not trivial


@pytest.mark.parametrize("method", ["udon", "task_distill"])
def test_evaluation_metrics_stay_out_of_the_training_window_and_logs(method, request, tmp_path):
    """As the UNIC evaluation test checks (tests/trainers/test_unic_trainer.py): an evaluation in the middle of a
    logging window logs only `eval_` metrics, those of the evaluation batch; the training values waiting for the next
    log (and UDON's domain-sampler loss window) are left as they were, and that log holds exactly them."""
    data = request.getfixturevalue("two_domains" if method == "udon" else "task")
    trainer = run_recipe(method, data, tmp_path, "--max_steps", "1")
    model = trainer.model
    model.train()
    trainer.compute_loss(model, next(iter(trainer.get_train_dataloader())))  # one micro-batch, not logged yet
    pending = {key: torch.stack(values).double().cpu() for key, values in trainer._metrics["train"].items()}
    sampler = getattr(trainer, "domain_sampler", None)
    window = [state.clone() for state in (sampler.loss_sums, sampler.loss_counts)] if sampler is not None else []

    eval_rows = trainer.train_dataset.select(range(8))  # real labelled images of the first domain
    metrics = trainer.evaluate(eval_rows)
    logged = trainer.state.log_history[-1]
    assert {key for key in logged if not key.startswith("eval_")} <= {"epoch", "step"}, logged
    # the evaluation values are those of the evaluation batch: its loss recomputed on center crops
    batch = trainer._prepare_inputs(trainer.data_collator([eval_rows[i] for i in range(8)]))
    with torch.no_grad():
        views = trainer.make_views(batch["pixel_values"], False)
        if method == "udon":
            name = trainer.udon_model.config.domain_names[batch["domain"]]
            outputs = model(pixel_values=views, domain=batch["domain"], labels=batch["labels"])
            expected = {f"eval_{name}/loss": outputs.loss}
        else:
            logits = model(pixel_values=views).logits.double()
            expected = {"eval_cross_entropy": torch.nn.functional.cross_entropy(logits, batch["labels"])}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value.item(), rel=1e-4), key

    after = {key: torch.stack(values).double().cpu() for key, values in trainer._metrics["train"].items()}
    assert after.keys() == pending.keys() and all(torch.equal(after[key], pending[key]) for key in pending)
    if sampler is not None:
        assert all(torch.equal(now, before) for now, before in zip((sampler.loss_sums, sampler.loss_counts), window))
    model.train()
    logs = {"loss": 0.0}
    trainer.log(logs)
    assert not any(key.startswith("eval_") for key in logs)
    for key, values in pending.items():
        assert logs[key] == pytest.approx(values.mean().item(), rel=1e-6, abs=1e-9), key
