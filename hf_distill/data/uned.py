"""UnED (Ypsilantis et al., ICCV 2023), the 8-domain benchmark of UDON, as `datasets` folders or Hub datasets.

UnED is not on the Hugging Face Hub: it is 8 existing datasets with new splits, distributed as "info files"
(https://cmp.felk.cvut.cz/univ_emb/info_files.zip: `DOMAIN/SPLIT.json`, a list of `{"path": ..., "class_id": ...}`,
paths relative to the images folder) plus the images of each source dataset, downloaded from their own sites into
`images/DOMAIN/...` (layout in https://github.com/nikosips/Universal-Image-Embeddings). [`prepare_uned`] turns that
into one `DatasetDict` per domain (`image` with the encoded bytes embedded, `label`, `path`), written with
`save_to_disk` (atomically) and optionally pushed to the Hub, so that `recipes/udon.py` reads each domain by folder or
by Hub id.
"""

import json
import logging
import os
from collections.abc import Iterable, Iterator

from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature

from ..io_utils import atomic_folder

logger = logging.getLogger(__name__)

# Domain names and train-split sizes as in the UnED code (universal_embedding/info_utils.py).
UNED_TRAIN_SIZES = {
    "cars": 6346,
    "sop": 48942,
    "inshop": 20897,
    "inat": 273929,
    "met": 397121,
    "gldv2": 1422914,
    "food2k": 472349,
    "rp2k": 188724,
}
UNED_DOMAINS = tuple(UNED_TRAIN_SIZES)
FEATURES = Features({"image": ImageFeature(), "label": Value("int64"), "path": Value("string")})


def read_info_file(info_file: str) -> list[dict]:
    """The entries of one UnED info file, checked: every entry has a `path` and an integer `class_id` (a list of
    ids, as in some index splits, keeps its first id)."""
    with open(info_file) as handle:
        entries = json.load(handle)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{info_file}: expected a non-empty JSON list of {{'path', 'class_id'}} entries.")
    for entry in entries:
        if not isinstance(entry, dict) or "path" not in entry or "class_id" not in entry:
            raise ValueError(f"{info_file}: every entry needs 'path' and 'class_id', got {entry!r}.")
    return entries


def _image_file(images_dir: str, relative: str) -> str:
    """The file of `relative`; RP2K's non-ASCII names are stored escaped (`#Uxxxx`) by some unzip tools, as in the
    UnED conversion script."""
    path = os.path.join(images_dir, relative)
    if os.path.exists(path) or "rp2k" not in relative:
        return path
    escaped = str(relative.encode("unicode-escape")).replace("\\\\u", "#U").replace("\\\\x", "#U00")[2:-1]
    return os.path.join(images_dir, escaped)


def _label(class_id) -> int:
    return int(class_id[0] if isinstance(class_id, list) else class_id)


def uned_split(info_file: str, images_dir: str) -> Dataset:
    """One split of one domain as a `Dataset` (`image` bytes embedded, `label`, `path`). Raises before reading any
    image when files are missing, naming the first ones."""
    entries = read_info_file(info_file)
    files = [_image_file(images_dir, entry["path"]) for entry in entries]
    missing = [entry["path"] for entry, file in zip(entries, files) if not os.path.isfile(file)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(entries)} images of {info_file} are not under {images_dir}, e.g. "
            f"{missing[:3]}. Download and extract the source dataset as described in the UnED README."
        )

    def rows() -> Iterator[dict]:
        for entry, file in zip(entries, files):
            with open(file, "rb") as handle:
                image = {"bytes": handle.read(), "path": None}
            yield {"image": image, "label": _label(entry["class_id"]), "path": entry["path"]}

    return Dataset.from_generator(rows, features=FEATURES)


def prepare_uned(
    info_files_dir: str,
    images_dir: str,
    output_dir: str,
    domains: Iterable[str] = UNED_DOMAINS,
    splits: Iterable[str] = ("train", "val"),
    hub_prefix: str | None = None,
    private: bool = False,
) -> dict[str, str]:
    """Write `output_dir/DOMAIN` (a `save_to_disk` `DatasetDict` with the requested splits) for every domain.

    A domain whose folder already exists is skipped, so an interrupted preparation restarts where it stopped; each
    folder is written next to its destination and renamed into place. With `hub_prefix` (e.g. `"my-org/uned-"`)
    every domain is also pushed as the dataset `{hub_prefix}{domain}`.

    Returns:
        `{domain: folder}`.
    """
    domains, splits = list(domains), list(splits)
    unknown = sorted(set(domains) - set(UNED_DOMAINS))
    if unknown:
        raise ValueError(f"Unknown UnED domains {unknown}; UnED has {list(UNED_DOMAINS)}.")
    if "train" not in splits:
        raise ValueError(f"--splits must include 'train', got {splits}.")
    missing = [
        os.path.join(info_files_dir, domain, f"{split}.json")
        for domain in domains
        for split in splits
        if not os.path.isfile(os.path.join(info_files_dir, domain, f"{split}.json"))
    ]
    if missing:
        raise FileNotFoundError(
            f"Missing UnED info files: {missing[:4]}{' ...' if len(missing) > 4 else ''}. Extract "
            "https://cmp.felk.cvut.cz/univ_emb/info_files.zip and pass its folder as --info_files_dir."
        )
    os.makedirs(output_dir, exist_ok=True)
    folders = {}
    for domain in domains:
        folder = folders[domain] = os.path.join(output_dir, domain)
        if os.path.exists(os.path.join(folder, "dataset_dict.json")):
            logger.info("%s: already prepared in %s, skipped", domain, folder)
        else:
            logger.info("%s: reading splits %s", domain, splits)
            dataset = DatasetDict(
                {
                    split: uned_split(os.path.join(info_files_dir, domain, f"{split}.json"), images_dir)
                    for split in splits
                }
            )
            with atomic_folder(folder) as staging:
                dataset.save_to_disk(staging)
            logger.info("%s: %s", domain, ", ".join(f"{split} {len(dataset[split])}" for split in splits))
        if hub_prefix:
            repo_id = f"{hub_prefix}{domain}"
            DatasetDict.load_from_disk(folder).push_to_hub(repo_id, private=private)
            logger.info("%s: pushed to https://huggingface.co/datasets/%s", domain, repo_id)
    return folders
