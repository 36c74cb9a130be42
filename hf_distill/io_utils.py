"""Atomic file writes: a file is either absent, the old one, or the complete new one, never half-written."""

import json
import os
import tempfile
from collections.abc import Iterator
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
