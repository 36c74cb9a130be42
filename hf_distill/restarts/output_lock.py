"""An exclusive lock on an output folder, so that two runs never write into the same `--output_dir`.

The lock is the file `OUTPUT_DIR/run.lock`, created with `O_CREAT | O_EXCL` and naming its owner (host, pid, process
start time, command, start date). It is removed when the run ends. A lock left by a run that died (same host, and its
pid is gone or now belongs to another process) is stale and taken over with a warning; a lock of a live run, or of a
run on another host, makes the new run fail at once with a message naming the owner.
"""

import json
import logging
import os
import socket
import sys
import time
import uuid

logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"


class OutputFolderLocked(RuntimeError):
    """Another run holds the lock of the output folder."""


def _process_start_time(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, Linux), to tell it from a later process with the
    same pid; `None` where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _is_alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: dead, not yet reaped
                return False
    except (OSError, IndexError):
        pass
    current = _process_start_time(pid)
    return start_time is None or current is None or current == start_time


def describe_owner(owner: dict) -> str:
    return (
        f"host {owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}, "
        f"command: {owner.get('command')}"
    )


class OutputLock:
    """The lock of `output_dir` (see the module docstring). `acquire()` raises [`OutputFolderLocked`] when another
    run holds it; `release()` removes it (and `output_dir` itself if taking the lock created it and it is empty)."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.owner = None
        self._created_dir = False

    def _read(self, path: str) -> dict | None:
        try:
            with open(path, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def _is_stale(self, owner: dict) -> bool:
        return owner.get("host") == socket.gethostname() and not _is_alive(int(owner["pid"]), owner.get("start_time"))

    def _take_over(self, stale: dict) -> None:
        """Move the stale lock aside and delete it, unless another run replaced it meanwhile (then put it back)."""
        aside = f"{self.path}.stale-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if (self._read(aside) or {}).get("token") == stale.get("token"):
            logger.warning(
                "Taking over the stale lock of a run that is no longer running (%s).", describe_owner(stale)
            )
            os.remove(aside)
            return
        try:  # we moved a live lock: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass
        os.remove(aside)

    def acquire(self) -> None:
        if not os.path.isdir(self.output_dir):
            os.makedirs(self.output_dir, exist_ok=True)
            self._created_dir = True
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_time": _process_start_time(os.getpid()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
            "token": uuid.uuid4().hex,
        }
        for attempt in range(20):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                current = self._read(self.path)
                if current is None:  # being written by its owner this instant, or left empty by a crash
                    if attempt < 10 or time.time() - os.path.getmtime(self.path) < 10:
                        time.sleep(0.1)
                        continue
                    current = {"token": None, "host": socket.gethostname(), "pid": 0}
                if self._is_stale(current):
                    self._take_over(current)
                    continue
                raise OutputFolderLocked(
                    f"{self.output_dir} is in use by another run ({describe_owner(current)}). Wait for it to end or "
                    f"stop it, or pass another --output_dir. If that run no longer exists (e.g. it ran on another "
                    f"machine and was killed), delete {self.path}."
                ) from None
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(owner, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            self.owner = owner
            return
        raise OutputFolderLocked(f"Could not take the lock {self.path}: it keeps changing (several runs starting?).")

    def release(self) -> None:
        if self.owner is None:
            return
        if (self._read(self.path) or {}).get("token") == self.owner["token"]:
            os.remove(self.path)
        self.owner = None
        if self._created_dir:
            try:
                os.rmdir(self.output_dir)  # only if nothing else was written there
            except OSError:
                pass
