"""One run in its output folder, from start to end: what every recipe calls so that a killed, stopped, finished or
concurrent run is handled the same way.

[`start_run`] (before any expensive work): takes the folder's lock, removes what a killed export left behind, picks
the newest complete checkpoint (saying which and why newer ones were skipped), tells a finished run from an
unfinished one, and checks the run manifest. [`Run.train`] trains from that checkpoint, or, for a finished run,
trains nothing and reloads the final weights so that the export, the card and the push are redone; a SIGTERM /
SIGINT stops training with a checkpoint saved and raises [`TrainingStopped`] before anything is exported.
[`Run.close`] releases the lock.
"""

import atexit
import json
import logging
import os
import shutil
import signal

import torch.distributed as dist
from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput

from ..io_utils import is_weight_file, recover_swapped_folder, stale_staging_folders, write_json_atomically
from .checkpoints import (
    TRAINER_STATE,
    CheckpointCompletion,
    checkpoint_problem,
    newest_complete_checkpoint,
    remove_incomplete_checkpoints,
)
from .manifest import MANIFEST_FILE, build_manifest, is_allowed, manifest_differences, mismatch_message
from .output_lock import OutputFolderLocked, OutputLock
from .stopping import GracefulStop, TrainingStopped, die_with_launcher

logger = logging.getLogger(__name__)


def remove_export_leftovers(output_dir: str) -> None:
    """Delete the staging folders next to `output_dir` (`.NAME.XXXX.tmp`) and the temporary files in it (`.*.tmp`)
    of an export or a write that was killed, and bring back what an export killed during its swap left in the previous
    folder (`.NAME.XXXX.old`). Called with the folder's lock held: no other run is writing them."""
    for path in stale_staging_folders(output_dir):
        logger.info("Removing %s, left by an export that was stopped.", path)
        shutil.rmtree(path, ignore_errors=True)
    # an export killed between its renames: the checkpoints, logs and manifest of the previous folder come back; its
    # weights too unless the new export's are in place (they are written again by the export the rerun finishes with)
    new_weights = os.path.isdir(output_dir) and any(is_weight_file(name) for name in os.listdir(output_dir))
    for path in recover_swapped_folder(output_dir, keep=lambda name: not (new_weights and is_weight_file(name))):
        logger.warning("Recovered the files of %s, the previous folder of an export that was stopped.", path)
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
            logger.info("Removing %s, left by a write that was stopped.", path)
            os.remove(path)


class Run:
    """A run holding the lock of its output folder (made by [`start_run`])."""

    _active = None  # the run of this process: a new one closes it (a previous `main()` that raised)

    def __init__(self, training_args: TrainingArguments):
        self.args = training_args
        self.lock = OutputLock(training_args.output_dir)
        self.stopper = GracefulStop()
        self.checkpoint = None  # the checkpoint to resume from
        self.finished = False  # that checkpoint is the last one: nothing to train

    # ------------------------------------------------------------------ start (main process)

    def _choose_checkpoint(self) -> None:
        args = self.args
        if args.resume_from_checkpoint:
            problem = checkpoint_problem(args.resume_from_checkpoint, args.world_size, args.save_only_model)
            if problem is not None:
                raise ValueError(
                    f"--resume_from_checkpoint {args.resume_from_checkpoint} cannot be resumed: {problem}."
                )
            self.checkpoint = args.resume_from_checkpoint
            return
        self.checkpoint, skipped = newest_complete_checkpoint(args.output_dir, args.world_size, args.save_only_model)
        remove_incomplete_checkpoints(skipped)
        if self.checkpoint is None:
            return
        with open(os.path.join(self.checkpoint, TRAINER_STATE), encoding="utf-8") as handle:
            state = json.load(handle)
        target = args.max_steps if args.max_steps > 0 else state.get("max_steps", 0)
        self.finished = target > 0 and state["global_step"] >= target
        if self.finished:
            logger.info(
                "The run in %s is finished (%s, step %d of %d): nothing is trained, its weights are reloaded to redo "
                "the export.", args.output_dir, os.path.basename(self.checkpoint), state["global_step"], target
            )  # fmt: skip
        else:
            logger.info("Resuming from %s, the newest complete checkpoint.", self.checkpoint)

    def _check_manifest(self, manifest: dict) -> None:
        path = os.path.join(self.args.output_dir, MANIFEST_FILE)
        recorded = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                recorded = json.load(handle)
        if self.checkpoint is not None and recorded is None:
            logger.warning("%s has no %s (an older hf_distill wrote it): its configuration cannot be checked.",
                           self.args.output_dir, MANIFEST_FILE)  # fmt: skip
        elif self.checkpoint is not None:
            differences = manifest_differences(recorded, manifest)
            allowed = getattr(self.args, "allow_config_change", None) or ()
            refused = [d for d in differences if not is_allowed(d[0], allowed)]
            if refused:
                raise ValueError(mismatch_message(self.args.output_dir, refused))
            if differences:
                logger.warning("Resuming with changes allowed by --allow_config_change: %s",
                               ", ".join(field for field, _, _ in differences))  # fmt: skip
        write_json_atomically(path, manifest)

    def _start_on_main_process(self, manifest_fn) -> None:
        self.lock.acquire()
        remove_export_leftovers(self.args.output_dir)
        self._choose_checkpoint()
        self._check_manifest(manifest_fn())

    # ------------------------------------------------------------------ train and close

    def train(self, trainer) -> TrainOutput:
        """Train `trainer` from the chosen checkpoint; for a finished run, reload its final weights and state and
        train nothing. Raises [`TrainingStopped`] when a signal stopped training (a checkpoint is saved)."""
        trainer.add_callback(self.stopper)
        trainer.add_callback(CheckpointCompletion())  # last: after every callback that writes into checkpoints
        if self.finished:
            return self._reload(trainer)
        result = trainer.train(resume_from_checkpoint=self.checkpoint)
        if self.stopper.stopped_at is not None:
            name = signal.Signals(self.stopper.signal).name
            log = logger.warning if self.args.process_index == 0 else logger.debug
            log(
                "Stopped by %s at step %d: checkpoint-%d is saved in %s and nothing was exported. Run the same "
                "command again to resume.", name, self.stopper.stopped_at, self.stopper.stopped_at,
                self.args.output_dir,
            )  # fmt: skip
            self.close()
            raise TrainingStopped(128 + self.stopper.signal)
        return result

    def _reload(self, trainer) -> TrainOutput:
        if trainer.is_deepspeed_enabled:
            raise ValueError(
                f"The run in {self.args.output_dir} is finished; under DeepSpeed its weights cannot be reloaded "
                "without training: export them with `zero_to_fp32.py` from the last checkpoint instead."
            )
        trainer._load_from_checkpoint(self.checkpoint)
        state = TrainerState.load_from_json(os.path.join(self.checkpoint, TRAINER_STATE))
        final_state = os.path.join(self.args.output_dir, TRAINER_STATE)  # with the final log entry, if it was saved
        if os.path.isfile(final_state):
            saved = TrainerState.load_from_json(final_state)
            if saved.global_step == state.global_step:
                state = saved
        trainer.state = state
        metrics = {}
        results = os.path.join(self.args.output_dir, "train_results.json")
        if os.path.isfile(results):
            with open(results, encoding="utf-8") as handle:
                metrics = json.load(handle)
        return TrainOutput(state.global_step, metrics.get("train_loss", 0.0), metrics)

    def close(self) -> None:
        """Restore the signal handlers and release the lock (idempotent)."""
        self.stopper.uninstall()
        self.lock.release()
        if Run._active is self:
            Run._active = None


def start_run(training_args: TrainingArguments, recipe: str, **description) -> Run:
    """Start a run in `training_args.output_dir` (see the module docstring); `recipe` and the keyword arguments
    (`teachers`, `initial_weights`, `student_config`, `data`, `options`) describe it for the run manifest: they are
    those of [`build_manifest`]. Call it after the inputs are checked and before any expensive work.

    Raises:
        [`OutputFolderLocked`]: another run uses the output folder.
        `ValueError`: the run to resume was started with another configuration, or `--resume_from_checkpoint` names
            an incomplete checkpoint.
    """
    if Run._active is not None:
        Run._active.close()
    run = Run(training_args)
    Run._active = run
    die_with_launcher()
    run.stopper.install()
    error = None
    if training_args.process_index == 0:
        try:
            run._start_on_main_process(
                lambda: build_manifest(recipe, world_size=training_args.world_size, **description)
            )
        except Exception as caught:  # the other processes must learn of it rather than wait in the broadcast
            error = caught
    decision = [type(error).__name__ if error else None, str(error) if error else None, run.checkpoint, run.finished]
    if training_args.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)  # the other processes learn the outcome without waiting
    error_type, message, run.checkpoint, run.finished = decision
    if error_type is not None:
        run.close()
        if error is not None:
            raise error
        raise {"OutputFolderLocked": OutputFolderLocked, "ValueError": ValueError}.get(error_type, RuntimeError)(
            f"The main process could not start the run: {message}"
        )
    return run


@atexit.register
def _close_active_run() -> None:
    if Run._active is not None:
        Run._active.close()
