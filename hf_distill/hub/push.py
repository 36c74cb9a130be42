"""Upload an export folder to the Hub: exactly the files of the model, never training leftovers, links or secrets.

Every recipe pushes the same way: transformers' `Trainer` never pushes anything itself (no "Training in progress"
checkpoint, no `training_args.bin`); the recipe takes the Hub settings out of its training arguments before training
([`take_hub_options`]) and uploads the final export once, at the end ([`push_to_hub`]).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token, metadata_load

from .provenance import SAFETENSORS_INDEX, weight_files, weight_files_sha256

logger = logging.getLogger(__name__)

# What a push uploads, relative to the export folder (`*` never crosses a `/`). Sharded weights
# (`model-*.safetensors`) are uploaded only with their index, and only the shards that the index names; code files
# only when `config.json`'s `auto_map` names them (remote-code models such as UDON's embedding model); plots only
# those the card links when the card was written by hf_distill; `eval_results.json` only when it was measured on the
# weights in the folder.
UPLOAD_PATTERNS = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "preprocessor_config.json",
    "*.py",
    "README.md",
    "eval_results.json",
    "plots/*.png",
)
_FIXED_FILES = ("config.json", "preprocessor_config.json", "README.md")
# the adaptor export of a UNIC student (`recipes/unic.py --export_adaptors true`, hf_distill.models.adaptors), published
# beside the encoder: `AutoModel.from_pretrained(repo, subfolder="adaptors", trust_remote_code=True)`
ADAPTORS_SUBFOLDER = "adaptors"


def _is_regular_file_inside(folder: Path, relative: str) -> bool:
    """Whether `folder/relative` is a regular file reached without any symbolic link, inside `folder`."""
    root = folder.resolve()
    path = folder
    for part in Path(relative).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        if stat.S_ISLNK(mode):
            logger.warning("Not uploading %s: it is a symbolic link (only regular files are published).", path)
            return False
    if not stat.S_ISREG(mode):
        return False
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def code_files(output_dir: str | os.PathLike) -> list[str]:
    """The Python files a remote-code export needs: the modules named in `config.json`'s `auto_map`."""
    try:
        config = json.loads((Path(output_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    references = []
    for value in (config.get("auto_map") or {}).values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    modules = {ref.split("--")[-1].rsplit(".", 1)[0] for ref in references if isinstance(ref, str) and "." in ref}
    return sorted(f"{module.replace('.', '/')}.py" for module in modules)


def _card_plots(output_dir: Path) -> list[str]:
    """The plots a push uploads: those linked by an hf_distill card (its `hf_distill.plots` record), else every
    `plots/*.png`."""
    record = None
    if (output_dir / "README.md").is_file():
        try:
            record = (metadata_load(output_dir / "README.md") or {}).get("hf_distill")
        except (ValueError, OSError):
            record = None
    if isinstance(record, dict) and isinstance(record.get("plots"), list):
        return [plot for plot in record["plots"] if isinstance(plot, str) and (output_dir / plot).is_file()]
    plots_dir = output_dir / "plots"
    if not plots_dir.is_dir():
        return []
    return [f"plots/{p.name}" for p in plots_dir.iterdir() if p.suffix.lower() == ".png"]


def _eval_results_is_current(output_dir: Path) -> bool:
    """`eval_results.json` is published when it records no weights or the weights in the folder."""
    path = output_dir / "eval_results.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError):
        return path.is_file()
    if recorded is None or recorded == weight_files_sha256(output_dir):
        return True
    logger.warning("Not uploading %s: it was measured on other weights (%s).", path, recorded)
    return False


def upload_file_list(output_dir: str | os.PathLike) -> list[str]:
    """Exactly the files a push of `output_dir` uploads, as sorted POSIX paths relative to `output_dir`.

    These are `config.json`, the weights (`model.safetensors`, or `model.safetensors.index.json` and the
    `model-*.safetensors` shards it names), `preprocessor_config.json`, the code files named by `config.json`'s
    `auto_map` (remote-code exports), `README.md`, `eval_results.json` (unless it records other weights than the ones
    in the folder) and the card's plots (`plots/*.png`), when present (see `UPLOAD_PATTERNS`). Only regular files
    inside `output_dir` qualify: a symbolic link (to a file or a folder, inside or outside) is never followed. Training
    leftovers (`checkpoint-*/`, `trainer_state.json`, `training_args.bin`, optimizer / scheduler states, logs, probe
    features, ...) are never part of it. A UNIC adaptor export in `adaptors/` (`config.json`, weights, processor and
    its code files) is uploaded with it.
    """
    output_dir = Path(output_dir)
    candidates = [*weight_files(output_dir), *_FIXED_FILES, *code_files(output_dir), *_card_plots(output_dir)]
    adaptors = output_dir / ADAPTORS_SUBFOLDER
    if (adaptors / "config.json").is_file():
        names = (*weight_files(adaptors), "config.json", "preprocessor_config.json", *code_files(adaptors))
        candidates += [f"{ADAPTORS_SUBFOLDER}/{name}" for name in names]
    if _eval_results_is_current(output_dir):
        candidates.append("eval_results.json")
    return sorted({name for name in candidates if _is_regular_file_inside(output_dir, name)})


def _check_pushable(output_dir: Path, files: list[str]) -> None:
    if not output_dir.is_dir():
        raise ValueError(f"{output_dir} is not a folder.")
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    index = output_dir / SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing += sorted(shard for shard in shards if shard not in files)
        if not shards:
            missing.append("model-*.safetensors (the index names no shard)")
    elif "model.safetensors" not in files:
        missing.append("model.safetensors")
    missing += [name for name in code_files(output_dir) if name not in files]
    if "README.md" not in files:
        missing.append("README.md (write it with hf_distill.hub.create_or_update_model_card)")
    if missing:
        raise ValueError(f"Cannot push {output_dir}: it lacks {', '.join(missing)} (symbolic links are not uploaded).")


def check_no_secret(output_dir: Path, files: list[str], token: str | None) -> None:
    """Refuse to upload a file that holds the Hub token."""
    token = token or get_token()
    if not token:
        return
    needle = token.encode()
    for name in files:
        with open(output_dir / name, "rb") as handle:
            tail = b""
            for block in iter(lambda: handle.read(1 << 20), b""):
                if needle in tail + block:
                    raise ValueError(f"Cannot push {output_dir}: {name} contains the Hub token.")
                tail = block[-len(needle) :]


def push_to_hub(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload distilled student with hf_distill",
    revision: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the export of `output_dir` to the Hub repo `repo_id` (created if needed), leftovers excluded.

    Exactly the files of [`upload_file_list`] are uploaded, in one commit (`HfApi.create_commit` with one explicit
    operation per file; large files go through LFS like any Hub upload). Fails with a `ValueError`, before any
    network call, when `output_dir` lacks `config.json`, the weights, a code file its `auto_map` names or `README.md`,
    or when a file to upload contains the Hub token.

    Args:
        output_dir: folder of the exported student.
        repo_id: target model repo (`owner/name`).
        token: Hub token (defaults to the logged-in one).
        private: visibility of the repo if it is created (`None`: the account's default).
        commit_message: message of the commit.
        revision: branch to push to (created from the default branch if missing; `refs/pr/N` must exist).
        endpoint: Hub endpoint (defaults to `HF_ENDPOINT` / huggingface.co).

    Returns:
        The URL of the commit.
    """
    output_dir = Path(output_dir)
    files = upload_file_list(output_dir) if output_dir.is_dir() else []
    _check_pushable(output_dir, files)
    check_no_secret(output_dir, files, token)

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True, private=private, token=token, repo_type="model")
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(output_dir / name)) for name in files]
    commit = api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=operations,
        commit_message=commit_message,
        revision=revision,
        token=token,
    )
    logger.info("Pushed %d files of %s to %s: %s", len(files), output_dir, repo_id, ", ".join(files))
    return commit.commit_url


@dataclass
class HubOptions:
    """Where and how a recipe pushes its export: `--hub_model_id`, `--hub_token`, `--hub_private_repo`,
    `--hub_revision`."""

    repo_id: str
    token: str | None = None
    private: bool | None = None
    revision: str | None = None

    def push(self, output_dir: str | os.PathLike, commit_message: str) -> str:
        return push_to_hub(
            output_dir,
            self.repo_id,
            token=self.token,
            private=self.private,
            revision=self.revision,
            commit_message=commit_message,
        )


def take_hub_options(args) -> HubOptions | None:
    """Take the Hub settings out of `args` (a `TrainingArguments`) before a Trainer is built; `None` without
    `--push_to_hub`.

    `args.push_to_hub` is turned off, so that transformers' Trainer never pushes anything itself (no checkpoint, no
    `training_args.bin`, no "Training in progress" commit), and `args.hub_token` is cleared, so that it is never
    pickled into a `training_args.bin`. The recipe then pushes the final export with the returned options. A push
    without `--hub_model_id` is an error here, before any training.
    """
    options = None
    if args.push_to_hub:
        if not args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id (the target repo, `owner/name`).")
        options = HubOptions(args.hub_model_id, args.hub_token, args.hub_private_repo, args.hub_revision)
    args.push_to_hub = False
    args.hub_token = None
    return options


class HubTokenNotPickled:
    """Mixin for `TrainingArguments` subclasses: a pickled copy (`training_args.bin` in every checkpoint, written with
    `torch.save`) never holds `hub_token`; the object in memory keeps it."""

    def __getstate__(self):
        state = dict(self.__dict__)
        if "hub_token" in state:
            state["hub_token"] = None
        return state


class PushExportMixin:
    """Mixin for hf_distill's `Trainer` subclasses: checkpoints are never uploaded, and `push_to_hub` uploads the
    export of `output_dir` (as [`push_to_hub`], exactly its files) instead of transformers' save-and-push."""

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Checkpoints (heads, optimizer, training arguments) are never uploaded: only the export is."""

    def push_to_hub(
        self, commit_message: str | None = None, blocking: bool = True, token=None, revision=None, **kwargs
    ):
        """Upload the export in `output_dir` (weights, processor, code files, card, plots, eval results, and only
        those) to `--hub_model_id`."""
        if not self.is_world_process_zero():
            return None
        return push_to_hub(
            self.args.output_dir,
            self.hub_model_id or self.args.hub_model_id,
            token=token or self.args.hub_token,
            private=self.args.hub_private_repo,
            commit_message=commit_message or "Upload distilled student with hf_distill",
            revision=revision or self.args.hub_revision,
        )
