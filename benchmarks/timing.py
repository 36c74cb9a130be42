"""Timing a step on a shared machine: wall-clock laps that synchronize the device, peak memory of a block, and calls
of several functions alternated so that load from other work slows each of them alike (`make bench`)."""

import ctypes
import threading
import time

import psutil
import torch


class Clock:
    """Wall time of consecutive parts of a step; synchronizes the device at each lap only when `enabled`."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.parts = device, enabled, {}
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        if not self.enabled:
            return
        synchronize(self.device)
        now = time.perf_counter()
        self.parts[part] = self.parts.get(part, 0.0) + now - self.last
        self.last = now


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_freed_memory() -> None:
    """Give memory that the allocator keeps after `free` back to the OS (glibc `malloc_trim`; no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """Peak memory (MiB) inside the block, above the level at its start: CUDA allocator stats or sampled CPU RSS."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.process = psutil.Process()
            release_freed_memory()  # otherwise memory freed by earlier steps is reused invisibly to RSS
            self.base = self.peak = self.process.memory_info().rss
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            peak = self.peak
        self.peak_mib = (peak - self.base) / 2**20


def timed_alternating(functions: dict, repeats: int, device) -> dict[str, list[float]]:
    """Seconds per call of each function, calling them in turn `repeats` times after one warm-up call each."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times
