"""What a published file may say about where things come from: public names, never local paths, and which weights a
result was measured on."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

SAFETENSORS_INDEX = "model.safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
_FACTORY_PREFIX = "py:"


def is_hub_id(value: str | None) -> bool:
    """Whether `value` looks like a Hub repo id (`owner/name`) rather than a local path or free text."""
    return bool(value) and isinstance(value, str) and _HUB_ID.match(value) is not None and not os.path.exists(value)


def is_local_path(value: Any) -> bool:
    """Whether `value` names something on this machine: an absolute, `~`, `./` or `../` path, or an existing one."""
    if isinstance(value, os.PathLike):
        return True
    if not isinstance(value, str) or not value or value.startswith(_FACTORY_PREFIX) or "\n" in value:
        return False
    if value.startswith(("/", "~", "./", "../", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    return not is_hub_id(value) and ("/" in value or os.sep in value) and os.path.exists(value)


def publishable_name(source: str | os.PathLike | None, name: str | None = None) -> str | None:
    """How a model or dataset `source` may appear in a published file (card, config, `eval_results.json`).

    A user-given `name` wins; a Hub id (`owner/name`), a `py:module:function` factory or any other text is kept as
    it is; a local path becomes its folder name (`/data/me/teachers/vit-p4` -> `vit-p4`; a file such as
    `.../vit-p4/config.json` -> `vit-p4`), so that no absolute path of this machine is ever uploaded.
    """
    if name:
        return name
    if source is None:
        return None
    if not is_local_path(source):
        return str(source)
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.suffix and (path.is_file() or not path.exists()) and path.parent.name:
        path = path.parent  # a file (config.json, an image folder's archive...): name its folder
    return path.name or path.resolve().name or "local"


def scrub_local_paths(value: Any) -> Any:
    """`value` (containers recursively) with every local path replaced by its [`publishable_name`]."""
    if isinstance(value, dict):
        return {key: scrub_local_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_local_paths(item) for item in value)
    if is_local_path(value):
        return publishable_name(value)
    return value


def weight_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors weight files of an exported model: `model.safetensors`, or the index and the shards it names
    (relative POSIX paths; only those present)."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        return [SAFETENSORS_INDEX, *(shard for shard in shards if (folder / shard).is_file())]
    return ["model.safetensors"] if (folder / "model.safetensors").is_file() else []


def weight_files_sha256(folder: str | os.PathLike) -> str | None:
    """`sha256:<hex>` of the weight files of `folder` (names and bytes, in order), or `None` without weights.

    Model cards and `eval_results.json` record it beside their results: a result belongs to the weights it was
    measured on, and is dropped when the weights it describes are no longer the ones in the folder."""
    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        return None
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
