"""Publishing a synthetic set (see [`synthesize`]): its dataset card, which records the provenance, and the upload of
exactly the set's files to a Hub dataset repo."""

import importlib.resources
import json
import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, DatasetCard, DatasetCardData, HfApi

from ..data.synthetic_dataset import (
    CONFIG_FILE,
    DATA_DIR,
    expected_shards,
    is_synthesis_folder,
    missing_shards,
    read_synthesis_config,
    shard_name,
)
from ..hub.provenance import is_hub_id, is_local_path, publishable_name, scrub_local_paths
from ..hub.push import check_no_secret
from ..io_utils import write_text_atomically
from .pixel_mixup import GENERATOR_LABELS, PIXEL_MIXUP
from .synthesis import _OLDER_SETS, SynthesisSettings

__all__ = ["CARD_FILE", "dataset_file_list", "push_synthetic_dataset", "synthesis_card", "write_dataset_card"]

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"


def _size_category(n: int) -> str:
    """The Hub's `size_categories` value for `n` examples."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < bound:
            return name
    return "1M<n<10M" if n < 10_000_000 else "n>10M"


def _scheduler_name(pipeline: str) -> str | None:
    """The scheduler class of a local pipeline folder (its `model_index.json`), `None` when it cannot be read."""
    try:
        with open(os.path.join(pipeline, "model_index.json"), encoding="utf-8") as handle:
            entry = json.load(handle).get("scheduler")
    except (OSError, ValueError):
        return None
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def _published_config(output_dir: str) -> dict:
    """`synthesis_config.json` as it is published: local paths replaced by their folder names."""
    config = read_synthesis_config(output_dir)
    for key in ("source_dataset", "pipeline"):
        config[key] = publishable_name(config[key])
    return scrub_local_paths(config)


def synthesis_card(output_dir: str, repo_id: str | None = None) -> DatasetCard:
    """The dataset card of the synthetic set in `output_dir`, rendered from the packaged template
    `hf_distill/hub/templates/synthetic_dataset_card.md`: its provenance (source dataset, pipeline and scheduler,
    number of images, seed, weights distribution, denoising steps, guidance, size, dtype; also under `hf_distill:` in
    the metadata), how to load it and a license note. Local paths appear as their folder names only.

    Args:
        output_dir: a synthesis folder (`synthesis_config.json` + `data/`).
        repo_id: the Hub dataset id the set is (or will be) pushed to, for the loading example.
    """
    config = {**_OLDER_SETS, **_published_config(output_dir)}
    settings = SynthesisSettings(**{key: config[key] for key in SynthesisSettings.__dataclass_fields__})
    if settings.generator == PIXEL_MIXUP:
        return _pixel_mixup_card(
            settings, config, repo_id or f"<user>/{os.path.basename(os.path.abspath(output_dir))}"
        )
    low, high = settings.weights
    if settings.random_weights:
        weights = f"random per image: `w ~ U({low}, {high})` for the first source, `1 - w` for the second"
    else:
        weights = f"fixed: {low} for the first source, {high} for the second"
    size = (
        "the pipeline's default"
        if settings.height is None and settings.width is None
        else (f"{settings.height or 'default'} x {settings.width or 'default'} (height x width)")
    )
    source = settings.source_dataset
    title = f"ImageMixer mixes of {source}"
    scheduler = _scheduler_name(read_synthesis_config(output_dir)["pipeline"])
    synthesis = {**config, **({"scheduler": scheduler} if scheduler else {})}
    return _render_card(
        "synthetic_dataset_card.md",
        _card_data(settings, title, "image-mixer", synthesis),
        settings,
        config,
        pipeline=settings.pipeline,
        scheduler=scheduler,
        weights=weights,
        seed=settings.seed,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        size=size,
        torch_dtype=settings.torch_dtype,
        repo_id=repo_id or f"<user>/{os.path.basename(os.path.abspath(output_dir))}",
    )


def _render_card(
    template_name: str, card_data: DatasetCardData, settings: SynthesisSettings, config: dict, **values
) -> DatasetCard:
    """A synthetic set's card from `hub/templates/<template_name>`: its title and source, what every card says about
    the set ([`_set_values`]) and the generator's own `values`."""
    template = importlib.resources.files("hf_distill").joinpath("hub", "templates", template_name)
    return DatasetCard.from_template(
        card_data,
        template_str=template.read_text(encoding="utf-8"),
        pretty_name=card_data.pretty_name,
        source_dataset=settings.source_dataset,
        **_set_values(settings, config),
        **values,
    )


def _set_values(settings: SynthesisSettings, config: dict) -> dict:
    """What every synthetic set's card template says about the set itself: source split and column, sizes, shards."""
    return {
        "split": settings.split,
        "image_column": settings.image_column,
        "num_source_images": config.get("num_source_images", "?"),
        "num_images": settings.num_images,
        "num_shards": len(expected_shards(settings.num_images, settings.shard_size)),
        "shard_size": settings.shard_size,
    }


def _card_data(settings: SynthesisSettings, title: str, generator_tag: str, synthesis: dict) -> DatasetCardData:
    """The metadata every synthetic set's card carries: size, source, tags, the parquet data files and, under
    `hf_distill.synthesis`, the settings that made it."""
    source = settings.source_dataset
    return DatasetCardData(
        pretty_name=title,
        license="other",
        size_categories=[_size_category(settings.num_images)],
        source_datasets=[source] if is_hub_id(source) else None,
        tags=["synthetic", generator_tag, "knowledge-distillation", "hf_distill"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA_DIR}/*.parquet"}]}],
        hf_distill={"synthesis": synthesis},
    )


def _pixel_mixup_card(settings: SynthesisSettings, config: dict, repo_id: str) -> DatasetCard:
    """The card of a pixel mixup set: named for what it is, a stand-in for ImageMixer, never ImageMixer output."""
    label = GENERATOR_LABELS[PIXEL_MIXUP]
    source = settings.source_dataset
    title = f"{label[0].upper()}{label[1:]} of {source}"
    size = "the first source's size" if settings.height is None else f"{settings.height} x {settings.width}"
    return _render_card(
        "pixel_mixup_dataset_card.md",
        _card_data(settings, title, "mixup", {**config, "generator_label": label}),
        settings,
        config,
        label=label,
        mix_alpha=settings.mix_alpha,
        seed=settings.seed,
        size=size,
        repo_id=repo_id,
    )


def write_dataset_card(output_dir: str, repo_id: str | None = None) -> str:
    """Write [`synthesis_card`] to `output_dir/README.md` atomically; returns its path."""
    path = os.path.join(output_dir, CARD_FILE)
    write_text_atomically(path, str(synthesis_card(output_dir, repo_id)))
    return path


def dataset_file_list(output_dir: str) -> list[str]:
    """What a push of the synthesis folder uploads: `README.md`, `synthesis_config.json` (as published: see
    [`synthesis_card`]) and the data shards of the complete set, nothing else (no temporary or stray file). Raises a
    `ValueError` when the set is incomplete, has no card, or its rows record a local path."""
    if not is_synthesis_folder(output_dir):
        raise ValueError(f"{output_dir} is not a synthesis folder (no {CONFIG_FILE}): write one with synthesize.")
    missing = missing_shards(output_dir)
    if missing:
        raise ValueError(
            f"{output_dir} is incomplete ({len(missing)} shard(s) missing): run the same recipes/synthesize.py "
            "command again to complete it before pushing."
        )
    if not os.path.isfile(os.path.join(output_dir, CARD_FILE)):
        raise ValueError(f"{output_dir} has no {CARD_FILE}: write it with write_dataset_card first.")
    config = read_synthesis_config(output_dir)
    shards = [
        f"{DATA_DIR}/{shard_name(start, stop)}"
        for start, stop in expected_shards(config["num_images"], config["shard_size"])
    ]
    for shard in shards:  # sets made before the rows recorded published names
        table = pq.read_table(os.path.join(output_dir, shard), columns=["pipeline", "source_dataset"])
        local = sorted({value for column in table.columns for value in column.to_pylist() if is_local_path(value)})
        if local:
            raise ValueError(
                f"{shard} of {output_dir} records local paths ({', '.join(local)}): regenerate the set into a new "
                "folder (rows now record published names) before pushing it."
            )
    return [CARD_FILE, CONFIG_FILE, *shards]


def push_synthetic_dataset(
    output_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Push the complete synthetic set of `output_dir` to the Hub dataset repo `repo_id` (created if needed), in one
    commit of exactly [`dataset_file_list`]: the card, the published `synthesis_config.json` and the data shards.
    Everything is checked before any network call (complete set, card, no local path, no Hub token in a file).
    Returns the URL of the commit; the default message names the generator of the set."""
    files = dataset_file_list(output_dir)
    if commit_message is None:
        generator = {**_OLDER_SETS, **read_synthesis_config(output_dir)}["generator"]
        commit_message = f"Upload synthetic set ({GENERATOR_LABELS[generator]}) with hf_distill"
    config = (json.dumps(_published_config(output_dir), indent=2) + "\n").encode()
    check_no_secret(Path(output_dir), [name for name in files if name != CONFIG_FILE], token)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
    if revision is not None and not revision.startswith("refs/"):
        api.create_branch(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(
            path_in_repo=name, path_or_fileobj=config if name == CONFIG_FILE else os.path.join(output_dir, name)
        )
        for name in files
    ]
    commit = api.create_commit(
        repo_id, operations, commit_message=commit_message, repo_type="dataset", revision=revision
    )
    logger.info("Pushed %d files of %s to the dataset repo %s", len(files), output_dir, repo_id)
    return commit.commit_url
