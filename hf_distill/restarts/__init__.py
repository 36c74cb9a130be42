"""What keeps a run's output folder consistent when runs are killed, stopped, rerun or started twice: complete
checkpoints, the run manifest, the output-folder lock and clean stopping, tied together by [`start_run`]."""

from .checkpoints import CheckpointCompletion, checkpoint_problem, newest_complete_checkpoint
from .manifest import MANIFEST_FILE, build_manifest, manifest_differences
from .output_lock import LOCK_FILE, OutputFolderLocked, OutputLock
from .run_folder import Run, remove_export_leftovers, start_run
from .stopping import GracefulStop, TrainingStopped, die_with_launcher

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "CheckpointCompletion",
    "GracefulStop",
    "OutputFolderLocked",
    "OutputLock",
    "Run",
    "TrainingStopped",
    "build_manifest",
    "checkpoint_problem",
    "die_with_launcher",
    "manifest_differences",
    "newest_complete_checkpoint",
    "remove_export_leftovers",
    "start_run",
]
