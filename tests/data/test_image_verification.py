import contextlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset, load_dataset, load_from_disk
from PIL import Image

from hf_distill.data import image_verification
from hf_distill.data.domains import load_domains
from hf_distill.data.image_datasets import DATASET_INDEX_COLUMN, ImageCollator
from hf_distill.data.image_verification import find_unreadable_images, verify_domain_images, with_dataset_index

from ..recipes.test_unic import recipe, recipe_args


@pytest.fixture
def broken_folder(image_dataset_dir, tmp_path):
    """An image folder of 12 real MNIST digits (PNG, one folder per class) in which one file is truncated to half its
    bytes and one is empty."""
    root = tmp_path / "digits"
    digits = load_from_disk(image_dataset_dir).select(range(12))
    images, labels = digits["image"], digits["label"]
    paths = []
    for number, (image, label) in enumerate(zip(images, labels)):
        os.makedirs(root / str(label), exist_ok=True)
        path = root / str(label) / f"digit{number:02d}.png"
        image.save(path)
        paths.append(str(path))
    truncated, empty = paths[3], paths[8]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    open(empty, "wb").close()
    return str(root), truncated, empty


def folder_dataset(root):
    return load_dataset("imagefolder", data_dir=root, split="train")


def test_truncated_and_empty_files_are_found_with_their_index_and_path(broken_folder, tmp_path, monkeypatch):
    root, truncated, empty = broken_folder
    dataset = folder_dataset(root)
    found = find_unreadable_images(dataset, cache_dir=str(tmp_path / "checks"), num_workers=2, progress=False)
    assert sorted(entry.path for entry in found) == sorted([truncated, empty])
    paths = [value["path"] for value in with_dataset_index(dataset)["image"]]
    for entry in found:  # the index is the row of that file in the dataset
        assert paths[entry.index] == entry.path
    errors = {entry.path: entry.error for entry in found}
    assert "truncated" in errors[truncated] and "cannot identify image file" in errors[empty]

    # cached by dataset fingerprint: a second check decodes nothing
    monkeypatch.setattr(image_verification, "_decode_problem", lambda value: pytest.fail("decoded again"))
    assert find_unreadable_images(dataset, cache_dir=str(tmp_path / "checks"), progress=False) == found
    report = json.loads(next((tmp_path / "checks").glob("*.json")).read_text())
    assert len(report["unreadable"]) == 2 and report["fingerprint"] == dataset._fingerprint
    monkeypatch.undo()

    # a repaired file changes the dataset's fingerprint: checked again
    good = next(str(path) for path in sorted(Path(root).glob("*/*.png")) if str(path) not in (truncated, empty))
    Image.open(good).save(empty)
    found = find_unreadable_images(folder_dataset(root), cache_dir=str(tmp_path / "checks"), progress=False)
    assert [entry.path for entry in found] == [truncated]


def test_recipe_stops_before_training_and_lists_every_unreadable_file(
    broken_folder, tiny_teachers, student_config_dir, tmp_path
):
    root, truncated, empty = broken_folder
    args = recipe_args(tiny_teachers, root, student_config_dir, tmp_path / "out", "--max_steps", "2")
    with pytest.raises(ValueError, match="2 unreadable image") as error:
        recipe.main(args)
    message = str(error.value)
    assert truncated in message and empty in message and "--skip_bad_images" in message
    assert "image file is truncated" in message and "index " in message
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # nothing trained


def test_recipe_skips_bad_images_when_asked_and_logs_them(
    broken_folder, tiny_teachers, student_config_dir, tmp_path, caplog
):
    root, truncated, empty = broken_folder
    args = recipe_args(tiny_teachers, root, student_config_dir, tmp_path / "out", "--max_steps", "3")
    with caplog.at_level("WARNING"):
        trainer = recipe.main([*args, "--skip_bad_images", "true"])
    assert trainer.state.global_step == 3  # two epochs over the 10 readable images: the bad ones are never drawn
    assert len(trainer.train_dataset) == 10
    assert truncated not in {value["path"] for value in trainer.train_dataset["image"]}
    assert "Skipping 2 unreadable image(s)" in caplog.text and truncated in caplog.text and empty in caplog.text


def test_unreadable_image_at_run_time_names_its_index_and_file(
    broken_folder, tiny_teachers, student_config_dir, tmp_path, caplog
):
    root, truncated, empty = broken_folder
    args = recipe_args(tiny_teachers, root, student_config_dir, tmp_path / "out", "--max_steps", "4")
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="Unreadable image at dataset index") as error:
        recipe.main([*args, "--verify_images", "false"])  # an epoch is 2 steps: a bad image is drawn
    assert "Image verification skipped" in caplog.text
    index = int(str(error.value).split("dataset index ")[1].split(" ")[0])
    path = [value["path"] for value in with_dataset_index(folder_dataset(root))["image"]][index]
    assert path in (truncated, empty) and f"({path})" in str(error.value)


def test_collator_names_the_dataset_index_of_stored_image_bytes(image_dataset_dir):
    images = load_from_disk(image_dataset_dir).select(range(4))["image"]
    dataset = with_dataset_index(Dataset.from_dict({"image": images}))  # PNG bytes stored in the dataset, no files
    rows = [dataset[i] for i in range(4)]
    rows[2]["image"] = {"bytes": rows[2]["image"]["bytes"][:60], "path": None}  # truncated in storage
    collate = ImageCollator(32)
    assert collate([rows[0], rows[1], rows[3]])["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match=r"dataset index 2 \(image bytes stored in the dataset\)"):
        collate(rows)
    assert rows[2][DATASET_INDEX_COLUMN] == 2
    # decoding in the collator gives exactly the pixels of datasets' own decoding
    decoded = Dataset.from_dict({"image": images})
    expected = ImageCollator(32)([decoded[i] for i in (0, 1, 3)])["pixel_values"]
    assert torch.equal(collate([rows[0], rows[1], rows[3]])["pixel_values"], expected)


def check_args(**options):
    """The few training arguments `verify_images` reads."""
    defaults = {"verify_images": True, "skip_bad_images": False, "local_process_index": 0, "disable_tqdm": True}
    return SimpleNamespace(**{**defaults, **options}, main_process_first=lambda desc: contextlib.nullcontext())


def test_udon_domains_lose_only_their_unreadable_images(broken_folder, image_dataset_dir):
    root, truncated, empty = broken_folder
    specs = [{"name": "broken", "path": root, "eval_fraction": 0.25}, {"name": "clean", "path": image_dataset_dir}]
    data = load_domains(specs)
    with pytest.raises(ValueError, match="2 unreadable image") as error:
        verify_domain_images(data, check_args())
    assert truncated in str(error.value) and empty in str(error.value)

    checked = verify_domain_images(data, check_args(skip_bad_images=True))
    paths = [value["path"] for value in checked.train["image"]] + [
        value["path"] for value in checked.eval["broken"]["image"]
    ]
    assert truncated not in paths and empty not in paths
    domains = checked.train["domain"]
    assert domains == sorted(domains)  # each domain's rows stay contiguous
    for index, domain in enumerate(checked.domains):
        assert domain["num_train"] == domains.count(index)
        assert domain["num_eval"] == len(checked.eval[domain["name"]])
    assert checked.domains[1] == data.domains[1]  # the clean domain is untouched
    lost = (data.domains[0]["num_train"] - checked.domains[0]["num_train"]) + (
        data.domains[0]["num_eval"] - checked.domains[0]["num_eval"]
    )
    assert lost == 2
