"""Streaming training data (README 'Data at web scale'): local parquet and WebDataset tar shards read without
materializing them, split over processes and workers, shuffled per epoch, and a run killed mid-epoch resumed so that
every image is trained on exactly once per epoch.

The images carry their id in their pixels (a flat 32 px image of color `(id % 256, id // 256, 7)`), read back from
the uint8 batches the trainer receives, so the check does not rely on the code under test."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from hf_distill.data.streaming import StreamingImageDataset, load_streaming_dataset

from ..conftest import KillAt
from ..recipes.test_unic import ROOT
from ..recipes.test_unic import recipe as unic

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def id_image(sample_id: int) -> Image.Image:
    return Image.fromarray(np.full((32, 32, 3), (sample_id % 256, sample_id // 256, 7), dtype=np.uint8))


def write_shards(folder, kind: str, num_samples: int, num_shards: int) -> str:
    """`num_shards` parquet or tar shards of `num_samples` id images (column / extension `png`)."""
    os.makedirs(folder, exist_ok=True)
    per_shard = num_samples // num_shards
    for shard in range(num_shards):
        ids = range(shard * per_shard, (shard + 1) * per_shard)
        if kind == "parquet":
            dataset = Dataset.from_dict({"png": [id_image(i) for i in ids], "id": list(ids)})
            dataset.cast_column("png", ImageFeature()).to_parquet(os.path.join(folder, f"train-{shard:05d}.parquet"))
            continue
        with tarfile.open(os.path.join(folder, f"shard-{shard:05d}.tar"), "w") as tar:
            for sample_id in ids:
                buffer = io.BytesIO()
                id_image(sample_id).save(buffer, format="PNG")
                for name, data in ((f"{sample_id:06d}.png", buffer.getvalue()), (f"{sample_id:06d}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


def batch_ids(pixel_values) -> list[int]:
    """The ids of a uint8 `[B, 3, 32, 32]` batch of id images."""
    pixels = pixel_values[:, :, 0, 0].long().cpu()
    assert (pixel_values[:, 2] == 7).all()
    return (pixels[:, 0] + 256 * pixels[:, 1]).tolist()


def streaming_args(tiny_teachers, student_config_dir, data, output_dir, *extra):
    return [
        "--config", str(ROOT / "recipes" / "configs" / "unic_tiny.yaml"),
        "--teachers", tiny_teachers["vit"],
        "--student_config", student_config_dir,
        "--train_data", data, "--streaming", "true", "--image_column", "png", "--shuffle_buffer_size", "8",
        "--load_size", "32",
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "4",
        "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "10",
        "--logging_steps", "1", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def assert_each_epoch_once(steps: dict[int, list[int]], num_samples: int, steps_per_epoch: int):
    """`steps`: {optimizer step: ids trained on at that step, all processes}. Each epoch holds every id once."""
    epochs = []
    for start in range(1, max(steps) + 1, steps_per_epoch):
        ids = [i for step in range(start, start + steps_per_epoch) for i in steps[step]]
        assert sorted(ids) == list(range(num_samples)), f"epoch from step {start}: {sorted(ids)}"
        epochs.append(ids)
    assert len(epochs) >= 2 and epochs[0] != epochs[1]  # reshuffled each epoch
    return epochs


class RecordIds:
    """Patches `UnicTrainer.compute_loss` to record `{step: ids}` of the training batches (this process)."""

    def __init__(self, monkeypatch):
        self.steps = {}
        original = unic.UnicTrainer.compute_loss

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            if model.training:
                self.steps.setdefault(trainer.state.global_step + 1, []).extend(batch_ids(inputs["pixel_values"]))
            return original(trainer, model, inputs, *args, **kwargs)

        monkeypatch.setattr(unic.UnicTrainer, "compute_loss", compute_loss)


def test_streaming_sources_are_read_lazily_with_their_columns_checked(tmp_path):
    tar = write_shards(tmp_path / "tar", "tar", 8, 2)
    dataset = load_streaming_dataset(tar, image_column="png")
    assert dataset.num_shards == 2
    example = next(iter(dataset))
    assert set(example["png"]) == {"bytes", "path"}  # left for the collator to decode
    with pytest.raises(ValueError, match=r"no column 'image'.*png"):
        load_streaming_dataset(tar, image_column="image")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .parquet or .tar shards"):
        load_streaming_dataset(str(tmp_path / "empty"))


def test_streaming_needs_max_steps(tiny_teachers, student_config_dir, tmp_path):
    data = write_shards(tmp_path / "tar", "tar", 8, 2)
    args = streaming_args(tiny_teachers, student_config_dir, data, tmp_path / "out", "--max_steps", "-1")
    with pytest.raises(ValueError, match="--streaming: the stream has no length.*--max_steps"):
        unic.main(args)


def test_killed_tar_stream_resumes_exactly_where_it_stopped(tiny_teachers, student_config_dir, tmp_path, monkeypatch):
    """One process, 2 data-loader workers, 4 tar shards of 4 images (2 per worker): a run killed at step 4 (last
    checkpoint: step 3, mid-epoch, before the turn of worker 1) and rerun trains on the batches of an uninterrupted
    run, in the same order, each image once per epoch (4 steps of 4 images per epoch, 2 epochs)."""
    data = write_shards(tmp_path / "tar", "tar", 16, 4)
    extra = ("--dataloader_num_workers", "2", "--max_steps", "8", "--save_steps", "3")
    reference = RecordIds(monkeypatch)
    unic.main(streaming_args(tiny_teachers, student_config_dir, data, tmp_path / "reference", *extra))
    assert_each_epoch_once(reference.steps, 16, 4)

    monkeypatch.undo()
    killed = RecordIds(monkeypatch)
    args = streaming_args(tiny_teachers, student_config_dir, data, tmp_path / "run", *extra)
    with pytest.raises(KeyboardInterrupt):
        unic.main(args, callbacks=[KillAt(4)])
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "stream_state_0.json").read_text())
    # worker 0 gave steps 1 and 3 (its 8 images of epoch 0), worker 1 step 2 (4 images): worker 1 comes next
    assert state["positions"] == {"0": [0, 8], "1": [0, 4]} and state["next_worker"] == 1
    monkeypatch.undo()
    resumed = RecordIds(monkeypatch)
    trainer = unic.main(args)
    assert trainer.state.global_step == 8 and min(resumed.steps) == 4
    stitched = {step: ids for step, ids in killed.steps.items() if step <= 3} | resumed.steps
    assert stitched == reference.steps


@pytest.mark.distributed
def test_two_processes_killed_mid_epoch_see_every_parquet_image_once_per_epoch(
    tiny_teachers, student_config_dir, tmp_path
):
    """2 processes (gloo, CPU, `accelerate launch`), 2 data-loader workers each, 4 parquet shards of 4 images (one
    per worker): both processes are killed (SIGKILL) in step 4, the same command resumes from checkpoint-3, mid-epoch
    and before the turn of worker 1; over both processes each epoch (2 steps of 2 x 4 images) holds each of the 16
    images exactly once."""
    data = write_shards(tmp_path / "parquet", "parquet", 16, 4)
    output_dir, record = tmp_path / "out", tmp_path / "record"
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", "29561",
        str(ROOT / "tests" / "scripts" / "record_stream.py"), str(record),
        *streaming_args(tiny_teachers, student_config_dir, data, output_dir, "--use_cpu", "true",
                        "--dataloader_num_workers", "2", "--max_steps", "4", "--save_steps", "3"),
    ]  # fmt: skip

    def run(kill_at: int, name: str) -> subprocess.CompletedProcess:
        env = {**ENV, "RECORD_STREAM_KILL_AT": str(kill_at), "RECORD_STREAM_RUN": name}
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)

    killed = run(4, "killed")
    assert killed.returncode != 0, killed.stdout[-2000:] + killed.stderr[-3000:]
    assert (output_dir / "checkpoint-3").is_dir() and not (output_dir / "model.safetensors").exists()
    resumed = run(0, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (output_dir / "model.safetensors").exists()

    steps = {}
    for rank in (0, 1):
        for name, keep in (("killed", lambda step: step <= 3), ("resumed", lambda step: step > 3)):
            for line in (record / f"{name}-{rank}.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if keep(entry["step"]):
                    steps.setdefault(entry["step"], []).extend(entry["ids"])
    assert sorted(steps) == list(range(1, 5))
    assert_each_epoch_once(steps, 16, 2)


def test_resuming_with_other_stream_settings_is_refused(tmp_path):
    stream = load_streaming_dataset(write_shards(tmp_path / "tar", "tar", 8, 2), image_column="png")
    saved = StreamingImageDataset(stream, seed=0, shuffle_buffer_size=8, rank=0, world_size=1)
    saved.num_workers, saved.position, saved.next_worker = 2, {0: [1, 3]}, 1
    saved.save_state(str(tmp_path))
    with pytest.raises(ValueError, match="num_workers 2 -> 0.*same --dataloader_num_workers"):
        StreamingImageDataset(stream, 0, 8, 0, 1).load_state(str(tmp_path), num_workers=0)
    with pytest.raises(ValueError, match="shuffle_buffer_size 8 -> 16"):
        StreamingImageDataset(stream, 0, 16, 0, 1).load_state(str(tmp_path), num_workers=2)
    resumed = StreamingImageDataset(stream, 0, 8, 0, 1)
    resumed.load_state(str(tmp_path), num_workers=2)
    assert resumed.start == {0: (1, 3)} and resumed.next_worker == 1
    with pytest.raises(ValueError, match="stream_state_0.json: it was not written by a streaming run"):
        resumed.load_state(str(tmp_path / "tar"), num_workers=2)
