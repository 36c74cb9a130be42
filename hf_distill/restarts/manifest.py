"""The run manifest: what a run was started with, so that resuming it with another configuration is refused.

`OUTPUT_DIR/run_manifest.json` records the teachers (name, source, revision, weights fingerprint), the pretrained
weights the student starts from, the student's config, the fingerprints of the datasets, and every option of the
recipe except the harmless ones (logging, saving, output and Hub options, dataloader workers, ...). A run that
resumes compares its manifest with the recorded one and refuses to go on when they differ, naming the fields;
`--allow_config_change FIELD [FIELD ...]` accepts the named differences (all but the student's config, which the
checkpoint's weights must fit).
"""

import dataclasses
import hashlib
import json
import os

from torch import nn

from ..models.fingerprint import module_weights_fingerprint

MANIFEST_FILE = "run_manifest.json"
HARMLESS = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "run_name", "project", "report_to",
        "disable_tqdm", "push_to_hub", "ddp_timeout", "local_rank", "skip_memory_metrics", "profile",
        "per_device_eval_batch_size", "eval_batch_size", "probe_batch_size", "teacher_cache", "allow_config_change",
        # sources whose content the manifest fingerprints (teachers, pretrained weights, data, student config)
        "teachers", "teacher", "student", "backbone", "student_config", "train_data", "dataset", "synthetic_dataset",
        "domains",
    }
)  # fmt: skip
HARMLESS_PREFIXES = ("logging_", "log_", "save_", "hub_", "eval_", "trackio", "include_")
HARMLESS_DATALOADER = ("dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                       "dataloader_prefetch_factor")  # fmt: skip
NOT_ALLOWED = ("student_config",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")


def _hash_folder(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not (os.path.isfile(path) and name.endswith(_WEIGHT_SUFFIXES)):
            continue
        digest.update(name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_entry(source, revision: str | None = None) -> dict:
    """`{"source", "revision", "fingerprint"}` of pretrained weights: a module (its state dict is hashed), a local
    folder (its weight and config files are hashed), or a Hub id (its resolved commit identifies the content)."""
    if isinstance(source, nn.Module):
        return {"source": type(source).__name__, "revision": None, "fingerprint": module_weights_fingerprint(source)}
    source = str(source)
    if os.path.isdir(source):
        return {"source": source, "revision": revision, "fingerprint": _hash_folder(source)}
    fingerprint = None
    try:
        from transformers.utils.hub import cached_file, extract_commit_hash

        path = cached_file(source, "config.json", revision=revision, _raise_exceptions_for_missing_entries=False)
        fingerprint = extract_commit_hash(path, None) if path else None
    except (OSError, ValueError):
        pass
    return {"source": source, "revision": revision, "fingerprint": fingerprint or f"unresolved:{source}@{revision}"}


def _plain(value):
    """JSON-comparable copy of `value` (tuples become lists, other objects their string)."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _config_dict(config) -> dict:
    """A model config without the keys that say where or with what it was saved, not what it is."""

    def strip(value):
        if isinstance(value, dict):
            return {
                k: strip(v) for k, v in value.items() if not k.startswith("_") and k not in ("transformers_version",)
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(_plain(config.to_dict() if hasattr(config, "to_dict") else config))


def is_harmless(name: str) -> bool:
    return (
        name in HARMLESS
        or name in HARMLESS_DATALOADER
        or name.startswith(HARMLESS_PREFIXES)
        or name.startswith("push_to_hub")
    )


def build_manifest(
    recipe: str,
    teachers: dict | None = None,
    initial_weights: dict | None = None,
    student_config=None,
    data: dict | None = None,
    options: tuple = (),
    world_size: int = 1,
) -> dict:
    """The manifest of a run.

    Args:
        recipe: `"unic"`, `"udon"`, `"task_distill"`.
        teachers: `{name: source or (source, revision) or module}`.
        initial_weights: pretrained weights the student starts from, same form as `teachers`.
        student_config: the student's config (a `PretrainedConfig` or a dict).
        data: `{name: datasets.Dataset}` (their `_fingerprint`s are recorded).
        options: the recipe's parsed dataclasses (script arguments, training arguments); harmless fields are left out.
        world_size: number of processes (with the batch size, it sets the data order).
    """

    def entries(sources):
        result = {}
        for name, source in (sources or {}).items():
            source, revision = source if isinstance(source, tuple) else (source, None)
            result[name] = weights_entry(source, revision)
        return result

    settings = {"world_size": world_size}
    for instance in options:
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        settings.update({key: value for key, value in values.items() if not is_harmless(key)})
    return _plain(
        {
            "recipe": recipe,
            "teachers": entries(teachers),
            "initial_weights": entries(initial_weights),
            "student_config": _config_dict(student_config) if student_config is not None else None,
            "data": {name: getattr(dataset, "_fingerprint", None) for name, dataset in (data or {}).items()},
            "settings": dict(sorted(settings.items())),
        }
    )


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def manifest_differences(recorded: dict, current: dict) -> list[tuple[str, object, object]]:
    """`(field, recorded value, current value)` for every field that differs (harmless settings never count)."""
    old, new = _flatten(recorded), _flatten(current)
    differences = []
    for key in sorted(set(old) | set(new)):
        if key.startswith("settings.") and is_harmless(key.split(".", 1)[1]):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differences.append((key, old.get(key, "<absent>"), new.get(key, "<absent>")))
    return differences


def is_allowed(field: str, allowed) -> bool:
    """Whether `--allow_config_change` names `field` (`learning_rate` for `settings.learning_rate`, a group such as
    `teachers` or `data` for every field under it)."""
    if field.split(".", 1)[0] in NOT_ALLOWED:
        return False
    for name in allowed:
        for candidate in (name, f"settings.{name}"):
            if field == candidate or field.startswith(candidate + "."):
                return True
    return False


def _short(value) -> str:
    if isinstance(value, str) and len(value) > 24:  # fingerprints: their start tells them apart
        return value[:12] + "..."
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def mismatch_message(output_dir: str, differences: list[tuple[str, object, object]]) -> str:
    lines = "\n".join(f"  - {field}: {_short(old)} (run) vs {_short(new)} (now)" for field, old, new in differences)
    names = sorted({field.split(".", 1)[1] if field.startswith("settings.") else field.split(".", 1)[0]
                    for field, _, _ in differences if field.split(".", 1)[0] not in NOT_ALLOWED})  # fmt: skip
    fixed = [field for field, _, _ in differences if field.split(".", 1)[0] in NOT_ALLOWED]
    message = (
        f"The run in {output_dir} was started with another configuration; resuming it would mix the two:\n{lines}\n"
        f"Rerun with the configuration of that run ({os.path.join(output_dir, MANIFEST_FILE)}), or pass another "
        "--output_dir for a new run"
    )
    if names:
        message += f", or resume anyway with --allow_config_change {' '.join(names)}"
    if fixed:
        message += " (a change of the student's config cannot be allowed: the checkpoint's weights would not fit it)"
    return message + "."
