"""`--profile`: a PyTorch profiler trace of a few training steps, written next to the checkpoints."""

import logging
import os

import torch
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import TrainerCallback

from .io_utils import atomic_path, write_text_atomically

logger = logging.getLogger(__name__)


class ProfilerCallback(TrainerCallback):
    """Record `active` training steps (after `wait` skipped and `warmup` warm-up steps) with `torch.profiler`.

    Writes, per process, `{output_dir}/trace_rank{r}.json` (open it in https://ui.perfetto.dev or
    chrome://tracing) and `{output_dir}/summary_rank{r}.txt` (operators sorted by self time), and logs the top of the
    summary. Steps are counted by the Trainer's `on_step_end`, so one profiled step is one optimizer step.

    Args:
        output_dir (`str`): where the trace and the summary go (e.g. `{training output_dir}/profile`).
        wait, warmup, active (`int`): the profiler schedule, in training steps.
        row_limit (`int`): operators shown in the summary.
    """

    def __init__(self, output_dir: str, wait: int = 1, warmup: int = 1, active: int = 3, row_limit: int = 25):
        self.output_dir = output_dir
        self.schedule = schedule(wait=wait, warmup=warmup, active=active, repeat=1)
        self.row_limit = row_limit
        self.profiler = None
        self.rank = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.rank = args.process_index
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self.profiler = profile(
            activities=activities,
            schedule=self.schedule,
            on_trace_ready=self._write,
            record_shapes=True,
            profile_memory=True,
        )
        self.profiler.start()
        logger.info("Profiling training steps; the trace goes to %s", self.output_dir)

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, profiler) -> None:
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=self.row_limit)
        with atomic_path(os.path.join(self.output_dir, f"trace_rank{self.rank}.json")) as temporary:
            profiler.export_chrome_trace(temporary)
        write_text_atomically(os.path.join(self.output_dir, f"summary_rank{self.rank}.txt"), table + "\n")
        logger.info("Profiler summary (rank %d), trace in %s:\n%s", self.rank, self.output_dir, table)
