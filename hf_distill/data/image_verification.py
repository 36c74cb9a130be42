"""Finding unreadable images before training, instead of hours into it.

A truncated or empty image file otherwise surfaces only when its batch is drawn, as a bare "image file is truncated".
[`find_unreadable_images`] decodes every image once (the same decoding as training, in a thread pool: Pillow releases
the GIL while decoding), with a progress bar, and caches the result under the dataset's fingerprint (a small JSON file
in the `datasets` cache), so a second run on the same data is instant. [`verify_images`] is what the recipes call
before any weights are loaded: it stops with the list of every unreadable file (dataset index and path), or, with
`skip_bad_images`, drops them and logs each one. It also prepares the datasets so that an image that becomes
unreadable later is reported by the collator with its dataset index and source.

Every dataset the recipes read is verified by default, Hub datasets included: `load_image_dataset` never streams, so
their images are already on disk.
"""

import json
import logging
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import xxhash
from datasets import Dataset
from datasets import Image as ImageFeature
from datasets import config as datasets_config
from tqdm.auto import tqdm

from ..io_utils import write_json_atomically
from .domains import MultiDomainData
from .image_datasets import DATASET_INDEX_COLUMN

logger = logging.getLogger(__name__)


@dataclass
class ImageCheckArguments:
    r"""
    The image check before training, shared by the UNIC, UDON and task-specific configurations.

    Parameters:
        verify_images (`bool`, defaults to `True`):
            Decode every image once before training (in parallel, cached by dataset fingerprint) and stop with the
            list of unreadable files; `False` skips the check.
        skip_bad_images (`bool`, defaults to `False`):
            Train without the unreadable images found by the check (each one is logged) instead of stopping.
    """

    verify_images: bool = field(
        default=True,
        metadata={
            "help": "Decode every image once before training (parallel, cached by dataset fingerprint) and stop with "
            "the list of unreadable files. False skips the check."
        },
    )
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Train without the unreadable images found by --verify_images (each one logged)."},
    )


CHUNK_SIZE = 256
MAX_LISTED = 1000  # error messages list this many files; the cached JSON report lists all


@dataclass
class UnreadableImage:
    """An image that does not decode: its row in the verified dataset, its file (when stored as a path) and why."""

    index: int
    path: str | None
    error: str

    def __str__(self) -> str:
        return f"index {self.index}: {self.path or '(image bytes stored in the dataset)'}: {self.error}"


def default_cache_dir() -> str:
    return os.path.join(datasets_config.HF_DATASETS_CACHE, "hf_distill_image_checks")


def _decode_problem(value: dict) -> str | None:
    """`None` if the stored image (`{"bytes", "path"}`) decodes completely, else the error."""
    try:
        image = ImageFeature().decode_example(value)  # what the training collator does: open + load (+ EXIF)
        image.close()
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"
    return None


def _check_chunk(start: int, values: list[dict]) -> list[UnreadableImage]:
    found = []
    for offset, value in enumerate(values):
        problem = _decode_problem(value)
        if problem is not None:
            found.append(UnreadableImage(start + offset, (value or {}).get("path"), problem))
    return found


def find_unreadable_images(
    dataset: Dataset,
    image_column: str = "image",
    num_workers: int | None = None,
    cache_dir: str | None = None,
    description: str = "Verifying images",
    progress: bool = True,
) -> list[UnreadableImage]:
    """Decode every image of `dataset[image_column]` and return the ones that fail, by dataset index.

    Args:
        dataset (`datasets.Dataset`): a dataset whose `image_column` is a `datasets.Image` feature.
        num_workers (`int`, *optional*): decoding threads (default: the number of CPUs, at most 32).
        cache_dir (`str`, *optional*): where results are cached by dataset fingerprint (default: a folder in the
            `datasets` cache). A dataset changes fingerprint when its files change, so a fixed file is checked again.
        description (`str`): label of the progress bar.
        progress (`bool`): show the progress bar.
    """
    feature = dataset.features.get(image_column)
    if not isinstance(feature, ImageFeature):
        raise ValueError(
            f"Column {image_column!r} is a {type(feature).__name__}, not an image column: cannot verify its images."
        )
    fingerprint = getattr(dataset, "_fingerprint", None)
    cache_path = None
    if fingerprint is not None:
        name = xxhash.xxh3_128(f"{fingerprint}|{image_column}|{len(dataset)}".encode()).hexdigest()
        cache_path = os.path.join(cache_dir or default_cache_dir(), f"{name}.json")
        if os.path.exists(cache_path):
            try:
                with open(cache_path) as handle:
                    cached = json.load(handle)
                expected = {"fingerprint": fingerprint, "image_column": image_column, "num_images": len(dataset)}
                if all(cached[key] == value for key, value in expected.items()):
                    logger.info(
                        "%s: reusing the check of these %d images in %s", description, len(dataset), cache_path
                    )
                    return [UnreadableImage(**entry) for entry in cached["unreadable"]]
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable cache entry is simply recomputed

    raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
    workers = num_workers or min(32, os.cpu_count() or 1)
    found: list[UnreadableImage] = []
    bar = tqdm(total=len(dataset), desc=description, unit="img", disable=not progress)
    with ThreadPoolExecutor(workers) as executor:
        pending = deque()
        for start in range(0, len(raw), CHUNK_SIZE):
            values = raw[start : start + CHUNK_SIZE][image_column]
            pending.append((len(values), executor.submit(_check_chunk, start, values)))
            while len(pending) > 2 * workers:  # bounded: never more than a few chunks of bytes in memory
                size, future = pending.popleft()
                found += future.result()
                bar.update(size)
        while pending:
            size, future = pending.popleft()
            found += future.result()
            bar.update(size)
    bar.close()
    if cache_path is not None:
        report = {
            "fingerprint": fingerprint,
            "image_column": image_column,
            "num_images": len(dataset),
            "unreadable": [asdict(entry) for entry in found],
        }
        try:
            write_json_atomically(cache_path, report)
        except OSError as error:  # e.g. a read-only cache: the check is simply not remembered
            logger.warning("Could not save the image check in %s (%s): the next run checks again.", cache_path, error)
    return found


def with_dataset_index(dataset: Dataset, image_column: str = "image") -> Dataset:
    """`dataset` with its row numbers in `DATASET_INDEX_COLUMN` and its images left undecoded, so that the collator
    decodes them and names the index and file of one that fails."""
    if not isinstance(dataset.features.get(image_column), ImageFeature):
        return dataset  # not a datasets.Image column: the collator gets whatever it holds, as before
    if DATASET_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(DATASET_INDEX_COLUMN, list(range(len(dataset))))
    return dataset.cast_column(image_column, ImageFeature(decode=False))


def verify_images(datasets, args, image_column: str = "image"):
    """Check the images of `datasets` before training, as the recipes do; returns them ready for the trainer.

    Args:
        datasets (`Dataset` or `dict[str, Dataset | None]`): one dataset, or named ones (e.g. `{"train": ...,
            "eval": ...}`; `None` values are passed through). A dict is returned for a dict.
        args: the training arguments, read for `verify_images`, `skip_bad_images` and `main_process_first`.

    With `args.verify_images` (the default), every image is decoded once (the first local process checks, the others
    read its cached result). If any fails: a `ValueError` listing every unreadable file with its dataset index, or,
    with `args.skip_bad_images`, a warning listing them and the datasets without them. With `verify_images=False` the
    check is skipped (and logged). In all cases the datasets get a dataset-index column and undecoded images (see
    [`with_dataset_index`]), so an image that fails at run time is reported with its index and file.
    """
    named = dict(datasets) if isinstance(datasets, dict) else {"train": datasets}
    named = {name: with_dataset_index(d, image_column) if d is not None else None for name, d in named.items()}
    if not getattr(args, "verify_images", True):
        logger.warning(
            "Image verification skipped (--verify_images false): an unreadable image stops training when its batch is "
            "drawn."
        )
        return named if isinstance(datasets, dict) else named["train"]
    unreadable = {}
    for name, dataset in named.items():
        if dataset is None:
            continue
        if not isinstance(dataset.features.get(image_column), ImageFeature):
            logger.warning("Image verification skipped for %s: %r is not a datasets.Image column", name, image_column)
            continue
        with args.main_process_first(desc=f"image verification ({name})"):
            found = find_unreadable_images(
                dataset,
                image_column,
                description=f"Verifying {name} images",
                progress=args.local_process_index == 0 and not args.disable_tqdm,
            )
        if found:
            unreadable[name] = found
    total = sum(len(found) for found in unreadable.values())
    if total:
        lines = [f"  {name} {entry}" for name, found in unreadable.items() for entry in found]
        listed = "\n".join(lines[:MAX_LISTED]) + (
            f"\n  ... and {len(lines) - MAX_LISTED} more (all are in the JSON reports of {default_cache_dir()})"
            if len(lines) > MAX_LISTED
            else ""
        )
        if not args.skip_bad_images:
            raise ValueError(
                f"{total} unreadable image(s) found before training:\n{listed}\nFix or remove these files, or pass "
                "--skip_bad_images to train without them."
            )
        logger.warning("Skipping %d unreadable image(s) (--skip_bad_images):\n%s", total, listed)
        for name, found in unreadable.items():
            bad = {entry.index for entry in found}
            named[name] = named[name].select([i for i in range(len(named[name])) if i not in bad])
    else:
        sizes = ", ".join(f"{name}: {len(dataset)}" for name, dataset in named.items() if dataset is not None)
        logger.info("Image verification: every image decodes (%s)", sizes)
    return named if isinstance(datasets, dict) else named["train"]


def verify_domain_images(data: MultiDomainData, args) -> MultiDomainData:
    """[`verify_images`] for UDON's multi-domain data: the training set and every domain's eval set. Skipped images
    are taken out of their domain's counts (the rows of each domain stay contiguous)."""
    checked = verify_images({"train": data.train, **{f"{name} eval": d for name, d in data.eval.items()}}, args)
    train = checked.pop("train")
    counts = Counter(train["domain"]) if len(train) != len(data.train) else None
    domains = []
    for index, domain in enumerate(data.domains):
        domain = {**domain, "num_eval": len(checked[f"{domain['name']} eval"])}
        if counts is not None:
            domain["num_train"] = counts.get(index, 0)
        if domain["num_train"] < 2 or domain["num_eval"] < 2:
            raise ValueError(
                f"Domain {domain['name']!r} has {domain['num_train']} train / {domain['num_eval']} eval readable "
                "images left; need >= 2."
            )
        domains.append(domain)
    eval_sets = {domain["name"]: checked[f"{domain['name']} eval"] for domain in domains}
    return MultiDomainData(train=train, eval=eval_sets, domains=domains)


__all__ = [
    "UnreadableImage",
    "find_unreadable_images",
    "verify_domain_images",
    "verify_images",
    "with_dataset_index",
]
