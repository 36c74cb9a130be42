"""UnED preparation (info files + images -> one `datasets` folder per domain) and the UnED UDON config."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Image as ImageFeature
from datasets import load_from_disk
from PIL import Image

from hf_distill.data.domains import load_domains
from hf_distill.data.uned import UNED_DOMAINS

from ..conftest import load_recipe, mnist_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def uned_tree(tmp_path):
    """Two UnED domains laid out as the UnED README says, with real MNIST images; one RP2K file stored under the
    escaped name some unzip tools produce."""
    images, labels = mnist_images(24)
    for domain, offset in (("cars", 0), ("rp2k", 12)):
        for split, part in (("train", range(offset, offset + 8)), ("val", range(offset + 8, offset + 12))):
            entries = []
            for i in part:
                relative = f"{domain}/imgs/{split}_{i}.png"
                if domain == "rp2k" and i == offset:
                    relative = f"{domain}/imgs/饮料_{i}.png"
                    stored = f"{domain}/imgs/#U996e#U6599_{i}.png"
                else:
                    stored = relative
                (tmp_path / "images" / stored).parent.mkdir(parents=True, exist_ok=True)
                images[i].save(tmp_path / "images" / stored)
                entries.append({"path": relative, "class_id": int(labels[i]) + 100 if i % 2 else [int(labels[i]), 7]})
            (tmp_path / "info" / domain).mkdir(parents=True, exist_ok=True)
            (tmp_path / "info" / domain / f"{split}.json").write_text(json.dumps(entries))
    return tmp_path, images, labels


def test_prepare_writes_one_datasetdict_per_domain_and_skips_done_ones(uned_tree, caplog):
    root, images, labels = uned_tree
    prepare = load_recipe("prepare_uned")
    args = ["--info_files_dir", str(root / "info"), "--images_dir", str(root / "images"),
            "--output_dir", str(root / "uned"), "--domains", "cars", "rp2k"]  # fmt: skip
    folders = prepare.main(args)
    assert set(folders) == {"cars", "rp2k"}
    rp2k = load_from_disk(folders["rp2k"])
    assert set(rp2k) == {"train", "val"} and len(rp2k["train"]) == 8 and len(rp2k["val"]) == 4
    first = rp2k["train"][0]
    assert first["path"] == "rp2k/imgs/饮料_12.png" and first["label"] == int(labels[12])  # list -> first id
    assert rp2k["train"][1]["label"] == int(labels[13]) + 100
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(images[12]))  # bytes embedded, lossless
    assert not (root / "uned" / "rp2k.partial").exists()
    data = load_domains([{"name": "cars", "path": folders["cars"], "eval_split": "val"}])
    assert data.domains[0]["num_train"] == 8 and len(data.eval["cars"]) == 4

    (root / "images" / "cars" / "imgs" / "train_0.png").unlink()  # done domains are not read again
    with caplog.at_level("INFO"):
        prepare.main(args)
    assert "already prepared" in caplog.text


def test_missing_images_and_info_files_fail_with_a_clear_error(uned_tree):
    root, _, _ = uned_tree
    prepare = load_recipe("prepare_uned")
    base = ["--info_files_dir", str(root / "info"), "--images_dir", str(root / "images"), "--output_dir",
            str(root / "uned")]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="Missing UnED info files.*sop"):
        prepare.main(base + ["--domains", "cars", "sop"])
    with pytest.raises(ValueError, match="Unknown UnED domains"):
        prepare.main(base + ["--domains", "cars", "imagenet"])
    (root / "images" / "cars" / "imgs" / "val_9.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 4 images.*val_9.png"):
        prepare.main(base + ["--domains", "cars"])
    assert not (root / "uned" / "cars").exists()


def test_the_uned_udon_config_names_all_eight_domains_with_the_paper_settings():
    udon = load_recipe("udon")
    script_args, training_args, domains = udon.parse_args(
        ["--config", str(ROOT / "recipes" / "configs" / "udon_uned_clip_vitb16.yaml")]
    )
    assert sorted(domain["name"] for domain in domains) == sorted(UNED_DOMAINS)
    assert script_args.backbone == "openai/clip-vit-base-patch16" and script_args.embedding_dim == 64
    assert script_args.teacher_dim == 256 and training_args.sampling == "dynamic"
    assert training_args.sampler_update_every == 1000 and training_args.freeze_backbone_epochs == 2
    assert training_args.per_device_train_batch_size == 128 and training_args.backbone_learning_rate == 1e-5


def test_images_are_stored_as_bytes_not_paths(uned_tree):
    root, _, _ = uned_tree
    prepare = load_recipe("prepare_uned")
    folders = prepare.main(["--info_files_dir", str(root / "info"), "--images_dir", str(root / "images"),
                            "--output_dir", str(root / "uned"), "--domains", "cars"])  # fmt: skip
    raw = load_from_disk(folders["cars"])["train"].cast_column("image", ImageFeature(decode=False))
    assert raw[0]["image"]["path"] is None and Image.open(io.BytesIO(raw[0]["image"]["bytes"])).format == "PNG"
