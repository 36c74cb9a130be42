"""Labelled image splits for classification: `image` + contiguous int64 `label` columns and the class names."""

from datasets import ClassLabel, Dataset, Value

from .image_datasets import load_image_dataset


def load_labelled_split(
    source: str, split: str, image_column: str = "image", label_column: str = "label", limit: int | None = None
) -> Dataset:
    """The `split` of `source` (Hub id, image folder or `save_to_disk` folder) with only its image and label columns,
    renamed `image` and `label`, cut to its first `limit` rows."""
    dataset = load_image_dataset(source, image_column, split)
    if label_column not in dataset.column_names:
        raise ValueError(
            f"Dataset {source!r} ({split}) has no label column {label_column!r}; its columns are "
            f"{dataset.column_names}. Pass --label_column."
        )
    dataset = dataset.select_columns([image_column, label_column])
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    renames = {image_column: "image", label_column: "label"}
    return dataset.rename_columns({old: new for old, new in renames.items() if old != new})


def contiguous_labels(train: Dataset, evaluation: Dataset) -> tuple[Dataset, Dataset, list[str]]:
    """Map the `label` column of both splits to `0..C-1` (int64) and name the classes.

    A `ClassLabel` column keeps its ids and names. Other labels (strings, sparse ints) are sorted and numbered in
    training order; an eval label never seen in training is an error. At least 2 classes are needed.

    Returns:
        `(train, evaluation, names)` with `names[i]` the name of class `i`.
    """
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        train, evaluation = (d.cast_column("label", Value("int64")) for d in (train, evaluation))
    else:
        values = sorted(set(train["label"]))
        unseen = sorted(set(evaluation["label"]) - set(values), key=str)
        if unseen:
            raise ValueError(f"The eval split has labels never seen in training: {unseen[:5]}.")
        mapping = {value: index for index, value in enumerate(values)}
        names = [str(value) for value in values]
        train, evaluation = (
            d.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True).cast_column(
                "label", Value("int64")
            )
            for d in (train, evaluation)
        )
    if len(names) < 2:
        raise ValueError(f"The task needs at least 2 classes, found {len(names)}.")
    return train, evaluation, names


def unlabelled_images(
    source: str, split: str = "train", image_column: str = "image", limit: int | None = None
) -> Dataset:
    """Images without labels as `image` + `label` = -100 (e.g. synthetic images, which only enter a distillation
    term)."""
    dataset = load_image_dataset(source, image_column, split).select_columns([image_column])
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    return dataset.add_column("label", [-100] * len(dataset)).cast_column("label", Value("int64"))
