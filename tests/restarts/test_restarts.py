"""Restarts and failures (README section of that name): a run killed while writing a checkpoint resumes from the
previous complete one, a finished run rerun redoes only its export, a resume with another configuration is refused,
two runs never share an output folder, and a stopped run (or launcher) leaves a resumable folder."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback, ViTConfig, ViTModel

from hf_distill.restarts import (
    LOCK_FILE,
    MANIFEST_FILE,
    OutputFolderLocked,
    TrainingStopped,
    checkpoint_problem,
    newest_complete_checkpoint,
)
from hf_distill.restarts.checkpoints import COMPLETE_MARKER

from ..conftest import TINY, KillAt, save_with_processor, tiny_vit_config
from ..recipes import test_task_distill, test_udon
from ..recipes.test_task_distill import task  # noqa: F401 (fixture)
from ..recipes.test_udon import two_domains  # noqa: F401 (fixture)
from ..recipes.test_unic import ROOT
from ..recipes.test_unic import recipe as unic
from ..recipes.test_unic import recipe_args as unic_args

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def assert_same_weights(path_a, path_b):
    a, b = load_file(path_a), load_file(path_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.fixture(scope="module")
def unic_reference(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path_factory):
    """A finished uninterrupted UNIC run (6 steps, checkpoints every 2)."""
    output_dir = tmp_path_factory.mktemp("unic-reference")
    unic.main(unic_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, "--save_steps", "2"))
    return output_dir


# ---------------------------------------------------------------------------------------- 1. complete checkpoints


def fake_checkpoint(folder, step, marker=False):
    folder.mkdir(parents=True)
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, folder / "model.safetensors")
    torch.save({"state": torch.arange(1000)}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 10}))
    if marker:
        files = {p.name: p.stat().st_size for p in folder.iterdir()}
        (folder / COMPLETE_MARKER).write_text(json.dumps({"files": files}))
    return folder


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_checkpoint_validation_finds_every_half_written_file(tmp_path):
    assert checkpoint_problem(str(fake_checkpoint(tmp_path / "legacy", 2))) is None  # no marker, complete
    assert checkpoint_problem(str(fake_checkpoint(tmp_path / "marked", 2, marker=True))) is None
    for name, message in [
        ("model.safetensors", "model.safetensors is truncated"),
        ("optimizer.pt", "optimizer.pt is truncated"),
        ("scheduler.pt", "scheduler.pt is truncated"),
        ("trainer_state.json", "trainer_state.json is unreadable"),
    ]:
        truncate(fake_checkpoint(tmp_path / f"half-{name}", 2) / name)
        assert message in checkpoint_problem(str(tmp_path / f"half-{name}"))
    (fake_checkpoint(tmp_path / "no-state", 2) / "trainer_state.json").unlink()
    assert "trainer_state.json is missing" in checkpoint_problem(str(tmp_path / "no-state"))
    (fake_checkpoint(tmp_path / "no-scheduler", 2) / "scheduler.pt").unlink()
    assert "scheduler.pt is missing" in checkpoint_problem(str(tmp_path / "no-scheduler"))
    assert checkpoint_problem(str(tmp_path / "no-scheduler"), save_only_model=True) is None
    marked = fake_checkpoint(tmp_path / "marked-then-rewritten", 2, marker=True)
    torch.save({"state": torch.arange(10)}, marked / "optimizer.pt")  # a well-formed file of another size
    assert "optimizer.pt has" in checkpoint_problem(str(marked))

    out = tmp_path / "out"
    fake_checkpoint(out / "checkpoint-2", 2, marker=True)
    truncate(fake_checkpoint(out / "checkpoint-4", 4) / "optimizer.pt")
    fake_checkpoint(out / "checkpoint-6", 6).joinpath("trainer_state.json").unlink()
    chosen, skipped = newest_complete_checkpoint(str(out))
    assert chosen == str(out / "checkpoint-2")
    assert [os.path.basename(folder) for folder, _ in skipped] == ["checkpoint-6", "checkpoint-4"]


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_complete_checkpoint(
    tiny_teachers, image_dataset_dir, student_config_dir, unic_reference, tmp_path, monkeypatch, caplog
):
    """Killed while writing optimizer.pt of checkpoint-4: the same command resumes from checkpoint-2, says so, and
    ends with the weights of the uninterrupted run."""
    save = Trainer._save_optimizer_and_scheduler

    def killed_while_writing(self, output_dir):
        save(self, output_dir)
        if self.state.global_step == 4:
            truncate(Path(output_dir) / "optimizer.pt")
            raise KeyboardInterrupt("killed while writing optimizer.pt")

    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, "--save_steps", "2")
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        unic.main(args)
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", save)
    caplog.set_level("INFO", logger="hf_distill")
    trainer = unic.main(args)
    assert "Removing the incomplete checkpoint" in caplog.text and "trainer_state.json is missing" in caplog.text
    assert f"Resuming from {tmp_path / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == 6
    assert_same_weights(
        unic_reference / "checkpoint-6" / "model.safetensors", tmp_path / "checkpoint-6" / "model.safetensors"
    )
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))  # save_total_limit 2
    assert kept == ["checkpoint-4", "checkpoint-6"] and all((tmp_path / n / COMPLETE_MARKER).is_file() for n in kept)


@pytest.mark.parametrize("recipe_name", ["udon", "task_distill"])
def test_other_recipes_skip_a_half_written_checkpoint(recipe_name, two_domains, task, tmp_path, caplog):  # noqa: F811
    """The model file of the newest checkpoint is half written (a kill during `save_model`): UDON and
    task_distill resume from the previous complete checkpoint."""
    if recipe_name == "udon":
        recipe, args = test_udon.recipe, test_udon.recipe_args(two_domains, tmp_path, "--save_steps", "2")
        steps = 8
    else:
        recipe, args = test_task_distill.recipe, test_task_distill.args(task, tmp_path, "--save_steps", "2")
        steps = 6
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args, callbacks=[KillAt(5)])
    truncate(tmp_path / "checkpoint-4" / "model.safetensors")
    (tmp_path / "checkpoint-4" / COMPLETE_MARKER).unlink()  # the marker comes last: no marker yet
    caplog.set_level("INFO", logger="hf_distill")
    trainer, _ = recipe.main(args)
    assert "checkpoint-4: model.safetensors is truncated" in caplog.text
    assert f"Resuming from {tmp_path / 'checkpoint-2'}" in caplog.text
    assert trainer.state.global_step == steps and checkpoint_problem(str(tmp_path / "checkpoint-4")) is None


# ---------------------------------------------------------------------------------------- 2. finished runs


def test_rerunning_a_finished_run_trains_nothing_and_redoes_a_killed_export(
    tiny_teachers, image_dataset_dir, student_config_dir, unic_reference, tmp_path, caplog
):
    output_dir = tmp_path / "out"
    shutil.copytree(unic_reference, output_dir)
    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, "--save_steps", "2")
    exported = (unic_reference / "model.safetensors").read_bytes()
    caplog.set_level("INFO", logger="hf_distill")
    counter = CountSteps()
    trainer = unic.main(args, callbacks=[counter])
    assert counter.steps == 0 and trainer.state.global_step == 6 and "is finished" in caplog.text
    assert not (output_dir / "checkpoint-7").exists()
    assert (output_dir / "model.safetensors").read_bytes() == exported
    assert json.loads((output_dir / "trainer_state.json").read_text())["global_step"] == 6

    # killed during the export: its staging folder is left next to the output folder, the weights and card are missing
    staging = tmp_path / ".out.0123456789ab.tmp"
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(exported[:100])
    (output_dir / ".README.md.x1y2.tmp").write_text("half a card")
    for name in ("model.safetensors", "README.md"):
        (output_dir / name).unlink()
    trainer = unic.main(args, callbacks=[counter])
    assert counter.steps == 0 and trainer.state.global_step == 6
    assert (output_dir / "model.safetensors").read_bytes() == exported
    assert type(ViTModel.from_pretrained(output_dir)) is ViTModel and (output_dir / "README.md").is_file()
    assert not list(tmp_path.glob(".out.*")) and not list(output_dir.glob(".*.tmp"))

    # killed between the two renames of the export's swap: the whole previous folder (checkpoints, manifest, weights)
    # sits in a hidden sibling and no output folder exists; the rerun brings all of it back and trains nothing
    os.replace(output_dir, tmp_path / ".out.0123456789ab.old")
    trainer = unic.main(args, callbacks=[counter])
    assert counter.steps == 0 and trainer.state.global_step == 6 and "Recovered the files of" in caplog.text
    assert (output_dir / "model.safetensors").read_bytes() == exported
    assert (output_dir / "checkpoint-6").is_dir() and not list(tmp_path.glob(".out.*"))


def test_rerunning_a_finished_task_distill_run_keeps_its_results_and_refuses_a_new_teacher(task, tmp_path):  # noqa: F811
    args = test_task_distill.args(task, tmp_path)
    test_task_distill.recipe.main(args)
    weights, results = (tmp_path / "model.safetensors").read_bytes(), (tmp_path / "eval_results.json").read_text()
    counter = CountSteps()
    trainer, _ = test_task_distill.recipe.main(args, callbacks=[counter])
    assert counter.steps == 0 and trainer.state.global_step == 6 and not (tmp_path / "checkpoint-7").exists()
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "eval_results.json").read_text() == results

    # another teacher: refused before the probe is fitted again for it
    probe = (tmp_path / "probe" / "probe_results.json").read_text()
    torch.manual_seed(5)
    save_with_processor(ViTModel(tiny_vit_config()), tmp_path / "teacher", [0.5] * 3, [0.5] * 3, 32)
    args[args.index("--teacher") + 1] = str(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"teachers\.teacher\.fingerprint"):
        test_task_distill.recipe.main(args)
    assert (tmp_path / "probe" / "probe_results.json").read_text() == probe


# ---------------------------------------------------------------------------------------- 3. run manifest


def test_resuming_with_another_configuration_is_refused(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, caplog
):
    teachers = {name: str(tmp_path / "teachers" / os.path.basename(path)) for name, path in tiny_teachers.items()}
    for name in teachers:
        shutil.copytree(tiny_teachers[name], teachers[name])
    output_dir = tmp_path / "out"

    def args(*extra, teachers=teachers, data=image_dataset_dir):
        return unic_args(teachers, data, student_config_dir, output_dir, *extra)

    with pytest.raises(KeyboardInterrupt):
        unic.main(args(), callbacks=[KillAt(4)])  # checkpoint-3
    manifest = json.loads((output_dir / MANIFEST_FILE).read_text())
    assert set(manifest["teachers"]) == {"vit-p4", "dinov2-p7"} and manifest["data"]["train"]

    with pytest.raises(
        ValueError, match=r"(?s)settings\.learning_rate.*\n.*settings\.seed.*--allow_config_change learning_rate seed"
    ):
        unic.main(args("--learning_rate", "2e-3", "--seed", "1"))

    other_data = tmp_path / "other-data"
    load_from_disk(image_dataset_dir).select(range(16)).save_to_disk(str(other_data))
    with pytest.raises(ValueError, match=r"data\.train"):
        unic.main(args(data=str(other_data)))

    # another teacher in a folder of the same name
    torch.manual_seed(1)
    shutil.rmtree(teachers["vit"])
    save_with_processor(
        ViTModel(ViTConfig(**TINY, image_size=16, patch_size=4)), teachers["vit"], [0.5] * 3, [0.5] * 3, 16
    )
    with pytest.raises(ValueError, match=r"(?s)teachers\.vit-p4\.fingerprint.*--allow_config_change teachers"):
        unic.main(args())

    # a renamed teacher: new heads, refused whatever is allowed
    renamed = {**teachers, "vit": str(tmp_path / "teachers" / "vit-renamed")}
    os.rename(teachers["vit"], renamed["vit"])
    with pytest.raises(ValueError, match=r"(?s)student_config\.teachers.*cannot be allowed"):
        unic.main(args("--allow_config_change", "teachers", "student_config", teachers=renamed))
    os.rename(renamed["vit"], teachers["vit"])
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-3"]  # nothing was trained

    # allowed changes (and harmless ones, never refused) resume
    caplog.set_level("INFO", logger="hf_distill")
    trainer = unic.main(
        args("--learning_rate", "2e-3", "--logging_steps", "2", "--allow_config_change", "learning_rate", "teachers")
    )
    assert trainer.state.global_step == 6 and "changes allowed by --allow_config_change" in caplog.text
    assert json.loads((output_dir / MANIFEST_FILE).read_text())["settings"]["learning_rate"] == 2e-3


# ---------------------------------------------------------------------------------------- 4. output-folder lock


def test_a_second_run_on_the_same_output_folder_fails_fast(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    output_dir = tmp_path / "out"
    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, "--max_steps", "100000")
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "unic.py"), *args, "--save_steps", "100000", "--use_cpu", "true"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (output_dir / LOCK_FILE).exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended early"
        start = time.time()
        with pytest.raises(OutputFolderLocked, match=rf"in use by another run \(host .*, pid {first.pid},"):
            unic.main(args + ["--max_steps", "2"])
        assert time.time() - start < 30
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_is_taken_over(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    tmp_path.joinpath(LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start_time": "1", "token": "old", "command": "x"})
    )
    caplog.set_level("INFO", logger="hf_distill")
    trainer = unic.main(unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, "--max_steps", "2"))
    assert trainer.state.global_step == 2 and "Taking over the stale lock" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


# ---------------------------------------------------------------------------------------- 7. stopping a run


class SendSignal(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)  # arrives in the middle of step `self.step`


def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_exports_nothing(
    tiny_teachers, image_dataset_dir, student_config_dir, unic_reference, tmp_path
):
    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, tmp_path, "--save_steps", "2")
    handler = signal.getsignal(signal.SIGINT)
    try:
        unic.main(args, callbacks=[SendSignal(3, signal.SIGINT)])
    except TrainingStopped as stopped:
        assert stopped.code == 128 + signal.SIGINT
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C aborted the step instead of stopping at its end with a checkpoint")
    else:
        pytest.fail("Ctrl-C did not stop the run")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert checkpoint_problem(str(tmp_path / "checkpoint-3")) is None
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    trainer = unic.main(args)
    assert trainer.state.global_step == 6
    assert_same_weights(
        unic_reference / "checkpoint-6" / "model.safetensors", tmp_path / "checkpoint-6" / "model.safetensors"
    )


def _pids_running(marker: str, exclude: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                command = handle.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in command and "slow_steps.py" in command and state != "Z":
            pids.append(int(entry))
    return pids


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_killing_the_launcher_stops_its_workers_and_leaves_a_resumable_folder(
    tiny_teachers, image_dataset_dir, student_config_dir, tmp_path
):
    output_dir = tmp_path / "out"
    args = unic_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, "--use_cpu", "true",
                     "--per_device_train_batch_size", "4", "--max_steps", "16", "--save_steps", "2")  # fmt: skip
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "29547",
        str(ROOT / "tests" / "scripts" / "slow_steps.py"), "unic", "2", *args,
    ]  # fmt: skip
    with open(tmp_path / "log.txt", "w") as log:
        process = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (output_dir / "checkpoint-2" / COMPLETE_MARKER).exists():
            assert process.poll() is None and time.time() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.1)
        workers = _pids_running(str(output_dir), exclude=process.pid)
        assert len(workers) == 2, workers
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's process group: not the workers' own groups
        process.wait()
        deadline = time.time() + 20  # the 12+ steps left would take 24 s and more
        while _pids_running(str(output_dir), exclude=process.pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not _pids_running(str(output_dir), exclude=process.pid), (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        for pid in _pids_running(str(output_dir), exclude=process.pid):
            os.kill(pid, signal.SIGKILL)
    log_text = (tmp_path / "log.txt").read_text()
    assert "Received SIGTERM" in log_text and "nothing was exported" in log_text, log_text[-3000:]
    checkpoint, skipped = newest_complete_checkpoint(str(output_dir), world_size=2)
    step = int(checkpoint.rsplit("-", 1)[1])
    assert 2 < step < 16 and not skipped
    assert not (output_dir / "model.safetensors").exists() and not (output_dir / LOCK_FILE).exists()
    trainer = unic.main(args + ["--allow_config_change", "world_size", "--save_steps", "10"])  # one process here
    assert trainer.state.global_step == 16 and (output_dir / "model.safetensors").exists()
