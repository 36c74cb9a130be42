"""Complete checkpoints: a `checkpoint-N` folder counts only once every file the Trainer writes into it is there and
whole, so that a run killed while writing a checkpoint resumes from the previous one.

[`CheckpointCompletion`] writes `checkpoint-N/checkpoint_complete.json` (every file of the folder with its size,
written atomically) once all processes have finished writing the checkpoint. A folder with that marker is complete
when its files still have those sizes; a folder without it (written by an older hf_distill, or killed between the
Trainer's last write and the marker) is complete when `trainer_state.json`, the weights and, unless
`--save_only_model`, the optimizer and scheduler states are there and well-formed.
"""

import json
import logging
import os
import re
import shutil
import struct
import zipfile

import torch.distributed as dist
from transformers import TrainerCallback

from ..io_utils import write_json_atomically

logger = logging.getLogger(__name__)
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: str) -> int | None:
    """`N` for a folder named `checkpoint-N`, else `None`."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _file_problem(path: str) -> str | None:
    """Why the file at `path` is truncated or unreadable, judged by its format (cheap: headers only)."""
    name = os.path.basename(path)
    try:
        if name.endswith(".json"):
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        elif name.endswith(".safetensors"):
            size = os.path.getsize(path)
            with open(path, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                if header_size > size - 8:
                    return f"{name} is truncated"
                header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            if 8 + header_size + end != size:
                return f"{name} is truncated ({size} bytes, its header describes {8 + header_size + end})"
        elif name.endswith((".pt", ".pth", ".bin")):
            with open(path, "rb") as handle:
                is_zip = handle.read(2) == b"PK"
            if is_zip and not zipfile.is_zipfile(path):  # torch.save writes zip archives: the index is at the end
                return f"{name} is truncated"
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return f"{name} is unreadable or truncated"
    return None


def checkpoint_problem(folder: str, world_size: int = 1, save_only_model: bool = False) -> str | None:
    """`None` if the checkpoint `folder` is complete, else the reason it is not (for a log or an error message)."""
    if not os.path.isdir(folder):
        return "it does not exist"
    marker = os.path.join(folder, COMPLETE_MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as handle:
                files = json.load(handle)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {COMPLETE_MARKER} is unreadable"
        for name, size in files.items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return f"{name} is missing"
            if os.path.getsize(path) != size:
                return f"{name} has {os.path.getsize(path)} bytes where {size} were written"
        return None
    names = set(os.listdir(folder))
    if TRAINER_STATE not in names:
        return f"{TRAINER_STATE} is missing (the run was stopped while writing this checkpoint)"
    if not names & set(WEIGHT_FILES) and not any(
        name.startswith(("pytorch_model_fsdp", "global_step")) for name in names
    ):
        return "the model weights are missing"
    deepspeed_or_fsdp = any(name.startswith(("global_step", "optimizer_")) for name in names)
    if not save_only_model and not deepspeed_or_fsdp:
        for name in ("optimizer.pt", "scheduler.pt"):
            if name not in names:
                return f"{name} is missing (the run was stopped while writing this checkpoint)"
    if world_size > 1 and "rng_state_0.pth" in names:
        missing = [f"rng_state_{rank}.pth" for rank in range(world_size) if f"rng_state_{rank}.pth" not in names]
        if missing:
            return f"{missing[0]} is missing"
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            problem = _file_problem(os.path.join(root, name))
            if problem is not None:
                return problem
    return None


def newest_complete_checkpoint(
    output_dir: str, world_size: int = 1, save_only_model: bool = False
) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete `checkpoint-N` of `output_dir` (or `None`), and `(folder, reason)` for every newer folder
    skipped because it is incomplete."""
    if not os.path.isdir(output_dir):
        return None, []
    folders = sorted(
        (os.path.join(output_dir, name) for name in os.listdir(output_dir) if _CHECKPOINT.match(name)),
        key=checkpoint_step,
        reverse=True,
    )
    skipped = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        problem = checkpoint_problem(folder, world_size, save_only_model)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def remove_incomplete_checkpoints(skipped: list[tuple[str, str]]) -> None:
    """Delete incomplete checkpoints: they cannot be resumed from, the resumed run writes them again, and left in
    place they could be kept by `save_total_limit` rotation instead of a complete one."""
    for folder, reason in skipped:
        logger.warning("Removing the incomplete checkpoint %s: %s.", folder, reason)
        shutil.rmtree(folder, ignore_errors=True)


class CheckpointCompletion(TrainerCallback):
    """Marks every checkpoint complete once all processes wrote it (it must run after every callback that writes
    into the checkpoint, e.g. UDON's sampler state: add it last, with `trainer.add_callback`)."""

    def _folder(self, args, state) -> str:
        return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")

    def _invalidate(self, args, state, control) -> None:
        """A checkpoint about to be written over an existing one (resuming from an older one) loses its marker first."""
        if control.should_save and args.should_save:
            marker = os.path.join(self._folder(args, state), COMPLETE_MARKER)
            if os.path.exists(marker):
                os.remove(marker)

    def on_step_end(self, args, state, control, **kwargs):
        self._invalidate(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._invalidate(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized() and args.world_size > 1:
            dist.barrier()  # every process wrote its part (e.g. its rng_state_{rank}.pth)
        folder = self._folder(args, state)
        if not args.should_save or not os.path.isdir(folder):
            return
        files = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if name != COMPLETE_MARKER and not name.endswith(".tmp"):
                    files[os.path.relpath(path, folder)] = os.path.getsize(path)
        write_json_atomically(
            os.path.join(folder, COMPLETE_MARKER), {"global_step": state.global_step, "files": files}
        )
