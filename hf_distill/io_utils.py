"""Atomic writes: a file or folder is either absent, the old one, or the complete new one, never half-written.

[`atomic_path`] stages one file, [`atomic_folder`] one folder; both write next to the destination and rename into
place. Every "write to a staging place, then rename" of hf_distill goes through them.
"""

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from safetensors.torch import save_file


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in the folder of `path` (created if missing); on success it replaces `path` (keeping
    the permissions of a file already there), on error it is removed."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


@contextmanager
def atomic_folder(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[str]:
    """Yield a new, empty staging folder next to `path` (a hidden sibling `.NAME.XXXX.tmp`, with the permissions of
    any new folder: `0o777` less the umask). On success it takes the place of `path` in one rename; on error it is
    removed and `path` is left as it was.

    A folder already at `path` is first renamed to a hidden sibling `.NAME.XXXX.old` (renamed back if the swap
    fails). Its entries that the new folder lacks and for which `keep(entry_name)` is true are then moved into the new
    folder; the rest of it is deleted.

    Args:
        path (`str` or `os.PathLike`): the destination folder (its parent is created if missing).
        keep (`Callable[[str], bool]`, *optional*):
            which entries of an existing folder to carry over (none by default).
    """
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
    os.mkdir(staging)  # not mkdtemp: its folders are 0o700
    try:
        yield staging
        previous = _swap_in(staging, path)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    if previous is not None:
        written = set(os.listdir(path))
        for entry in os.listdir(previous):
            if entry not in written and keep is not None and keep(entry):
                os.replace(os.path.join(previous, entry), os.path.join(path, entry))
        shutil.rmtree(previous)


def _sibling_folders(path: str | os.PathLike, suffix: str) -> list[str]:
    path = os.path.abspath(os.fspath(path))
    parent, base = os.path.split(path)
    pattern = re.compile(rf"\.{re.escape(base)}\.[0-9a-f]{{12}}\.{suffix}")
    if not os.path.isdir(parent):
        return []
    return [
        os.path.join(parent, name)
        for name in sorted(os.listdir(parent))
        if pattern.fullmatch(name) and os.path.isdir(os.path.join(parent, name))
    ]


def stale_staging_folders(path: str | os.PathLike) -> list[str]:
    """The staging folders that an interrupted [`atomic_folder`] for `path` left next to it (`.NAME.XXXX.tmp`)."""
    return _sibling_folders(path, "tmp")


def recover_swapped_folder(path: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> list[str]:
    """Finish what an [`atomic_folder`] killed during its swap left undone, from the previous folder it had renamed
    to a hidden sibling (`.NAME.XXXX.old`): each entry of it that `path` lacks and for which `keep(entry_name)` is
    true is moved into `path` (created if the kill came between the two renames), then the sibling is deleted.
    Returns the siblings recovered."""
    previous_folders = _sibling_folders(path, "old")
    for previous in previous_folders:
        os.makedirs(path, exist_ok=True)
        present = set(os.listdir(path))
        for entry in os.listdir(previous):
            if entry not in present and keep is not None and keep(entry):
                os.replace(os.path.join(previous, entry), os.path.join(path, entry))
        shutil.rmtree(previous)
    return previous_folders


def is_weight_file(name: str) -> bool:
    """Whether `name` is a weight file of a transformers save (`model*.safetensors`, `pytorch_model*.bin`, their
    `.index.json`): a new export replaces those of an earlier one (an earlier sharded save must not linger)."""
    return name.startswith(("model", "pytorch_model")) and name.endswith((".safetensors", ".bin", ".index.json"))


def _swap_in(staging: str, target: str) -> str | None:
    """Rename the folder `staging` to `target`. An existing `target` is first renamed to a hidden sibling, returned
    (restored on failure); `None` when there was none."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        return None
    parent, base = os.path.split(target)
    previous = os.path.join(parent, f".{base}.{uuid.uuid4().hex[:12]}.old")
    os.replace(target, previous)
    try:
        os.replace(staging, target)
    except OSError:
        os.replace(previous, target)
        raise
    return previous


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())


def write_json_atomically(path: str | os.PathLike, payload) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2))


def save_safetensors_atomically(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    with atomic_path(path) as temporary:
        save_file({key: value.contiguous() for key, value in tensors.items()}, temporary, metadata=metadata)
