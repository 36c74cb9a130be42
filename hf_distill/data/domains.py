"""Multi-domain data for UDON: several labelled datasets, each one domain with its own label space.

Every domain is loaded with [`load_image_dataset`] (Hub id, image folder or `save_to_disk` folder), its labels are
remapped to `0..C-1`, and it gets a train and an eval split (its own eval split, or a seeded held-out fraction of the
training split). The training splits are concatenated into ONE dataset with the columns `image`, `label` (int, in the
domain's own label space) and `domain` (int); domain `d` occupies the contiguous global rows
`offsets[d] : offsets[d + 1]`, which is what the domain sampler draws batches from.
"""

import logging
from dataclasses import dataclass, field

from datasets import ClassLabel, Dataset, Value, concatenate_datasets

from .image_datasets import load_image_dataset

logger = logging.getLogger(__name__)


@dataclass
class DomainSpec:
    """One domain: where its data is and which columns hold images and labels.

    Args:
        name: domain name (used for its heads and in logs).
        path: Hub dataset id, local image folder, or `save_to_disk` folder.
        train_split: split to train on.
        eval_split: split to evaluate on; `None`: hold out `eval_fraction` of the training split (seeded).
        image_column, label_column: column names.
        eval_fraction: held-out fraction when there is no eval split.
        max_train_samples, max_eval_samples: keep only the first N examples (after the hold-out).
    """

    name: str
    path: str
    train_split: str = "train"
    eval_split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    eval_fraction: float = 0.2
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    @classmethod
    def parse(cls, value) -> "DomainSpec":
        """From a dict (YAML) or a `NAME=PATH` string (command line)."""
        if isinstance(value, DomainSpec):
            return value
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"Unknown keys {sorted(unknown)} in domain {value}; known: {sorted(cls.__dataclass_fields__)}."
                )
            return cls(**value)
        name, separator, path = str(value).partition("=")
        if not separator or not name or not path:
            raise ValueError(f"A domain is NAME=PATH or a dict with name/path, got {value!r}.")
        return cls(name=name, path=path)


@dataclass
class MultiDomainData:
    """Concatenated training data, per-domain eval sets and the domain layout."""

    train: Dataset
    eval: dict[str, Dataset]
    domains: list[dict] = field(default_factory=list)  # [{"name", "num_classes", "num_train", "num_eval"}]


def _standardize(dataset: Dataset, spec: DomainSpec, index: int, label_map: dict) -> Dataset:
    dataset = dataset.select_columns([spec.image_column, spec.label_column])
    if spec.image_column != "image":
        dataset = dataset.rename_column(spec.image_column, "image")
    if spec.label_column != "label":
        dataset = dataset.rename_column(spec.label_column, "label")
    if isinstance(dataset.features["label"], ClassLabel):
        dataset = dataset.cast_column("label", Value("int64"))
    dataset = dataset.map(lambda batch: {"label": [label_map[v] for v in batch["label"]]}, batched=True)
    dataset = dataset.cast_column("label", Value("int64"))
    return dataset.add_column("domain", [index] * len(dataset))


def load_domains(specs: list, seed: int = 0) -> MultiDomainData:
    """Load every domain, checking names, columns and labels before any training work.

    Raises:
        ValueError: duplicate domain names, a missing split/column, or a domain with fewer than 2 examples in a
            split.
    """
    specs = [DomainSpec.parse(spec) for spec in specs]
    if not specs:
        raise ValueError("No domains: give at least one (--domains NAME=PATH ... or a `domains:` list in the YAML).")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Domain names must be unique, got {names}.")
    trains, evals, domains = [], {}, []
    for index, spec in enumerate(specs):
        train = load_image_dataset(spec.path, spec.image_column, spec.train_split)
        if spec.label_column not in train.column_names:
            raise ValueError(
                f"Domain {spec.name!r} ({spec.path}) has no label column {spec.label_column!r}; its columns are "
                f"{train.column_names}. Set label_column for this domain."
            )
        if spec.eval_split is not None:
            evaluation = load_image_dataset(spec.path, spec.image_column, spec.eval_split)
        else:
            if not 0.0 < spec.eval_fraction < 1.0:
                raise ValueError(f"Domain {spec.name!r}: eval_fraction must be in (0, 1), got {spec.eval_fraction}.")
            parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
            train, evaluation = parts["train"], parts["test"]
        if spec.max_train_samples is not None:
            train = train.select(range(min(spec.max_train_samples, len(train))))
        if spec.max_eval_samples is not None:
            evaluation = evaluation.select(range(min(spec.max_eval_samples, len(evaluation))))
        if len(train) < 2 or len(evaluation) < 2:
            raise ValueError(
                f"Domain {spec.name!r} has {len(train)} train / {len(evaluation)} eval examples; need >= 2."
            )
        labels = sorted(set(train[spec.label_column]))
        label_map = {label: position for position, label in enumerate(labels)}
        unseen = sorted(set(evaluation[spec.label_column]) - set(labels), key=str)
        if unseen and spec.eval_split is not None:
            logger.info("Domain %s: %d eval classes are not in training (retrieval only)", spec.name, len(unseen))
        for label in unseen:
            label_map[label] = len(label_map)
        trains.append(_standardize(train, spec, index, label_map))
        evals[spec.name] = _standardize(evaluation, spec, index, label_map)
        domains.append(
            {"name": spec.name, "num_classes": len(labels), "num_train": len(train), "num_eval": len(evaluation)}
        )
        logger.info(
            "Domain %d %r from %s: %d classes, %d train / %d eval images",
            index, spec.name, spec.path, len(labels), len(train), len(evaluation),
        )  # fmt: skip
    return MultiDomainData(train=concatenate_datasets(trains), eval=evals, domains=domains)
