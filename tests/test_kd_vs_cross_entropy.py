"""benchmarks/kd_vs_cross_entropy.py: the statistics and verdicts (checked against numbers worked out by hand), the plot
and table it writes, its input checks, the pixel mixup set it makes from the student's images, and (tiny models, a few
steps) that the equal-steps arms make as many optimizer steps as the arms they match."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from transformers import ViTModel

from benchmarks import kd_vs_cross_entropy as bench
from hf_distill.synthetic import load_synthetic_dataset
from hf_distill.trainers import KDTrainer

from .conftest import mnist_images, save_with_processor, tiny_vit_config

ACCURACIES = {
    "ce": {0: 60.0, 1: 61.0, 2: 62.5},
    "kd": {0: 64.0, 1: 65.5, 2: 64.5},
    "kd_pixel_mixup": {0: 64.5, 1: 64.0, 2: 66.0},
}


def test_means_stds_and_verdicts():
    summary = bench.summarize(ACCURACIES)
    ce, kd = summary["arms"]["ce"], summary["arms"]["kd"]
    # by hand: ce mean 183.5 / 3, deviations -1.1667, -0.1667, 1.3333 -> variance 3.1667 / 2 (sample std)
    assert ce["mean"] == pytest.approx(61.1667, abs=1e-4) and ce["std"] == pytest.approx(1.2583, abs=1e-4)
    assert kd["mean"] == pytest.approx(64.6667, abs=1e-4) and kd["std"] == pytest.approx(0.7638, abs=1e-4)
    assert ce["per_seed"] == {"0": 60.0, "1": 61.0, "2": 62.5}
    kd_ce = summary["comparisons"]["kd_minus_ce"]
    assert kd_ce["per_seed_difference"] == {"0": 4.0, "1": 4.5, "2": 2.0}
    assert kd_ce["verdict"] == "kd > ce beyond the seed-to-seed spread"  # 3.5 > 1.26 + 0.76, every seed agrees
    mixup = summary["comparisons"]["kd_pixel_mixup_minus_kd"]
    assert mixup["mean_difference"] == pytest.approx(1 / 6) and not mixup["same_sign_every_seed"]
    assert mixup["verdict"] == "kd_pixel_mixup vs kd: no difference beyond the seed-to-seed spread"
    worse = bench.summarize({"ce": {0: 70.0, 1: 71.0}, "kd": {0: 60.0, 1: 61.0}})["comparisons"]["kd_minus_ce"]
    assert worse["verdict"] == "kd < ce beyond the seed-to-seed spread"
    overlapping = bench.summarize({"ce": {0: 60.0, 1: 64.0}, "kd": {0: 61.0, 1: 65.0}})["comparisons"]
    assert not overlapping["kd_minus_ce"]["intervals_separated"]  # every seed agrees, but 1.0 < 2.83 + 2.83
    # the synthetic images against the equal-steps control: by hand, means 35.83 and 30.50, stds 0.76 and 0.50
    mixup = {0: 36.0, 1: 35.0, 2: 36.5}
    control = bench.summarize({"kd_pixel_mixup": mixup, "kd_equal_steps": {0: 30.0, 1: 31.0, 2: 30.5}})["comparisons"]
    assert control["kd_pixel_mixup_minus_kd_equal_steps"]["mean_difference"] == pytest.approx(16 / 3)
    assert control["kd_pixel_mixup_minus_kd_equal_steps"]["verdict"] == (
        "kd_pixel_mixup > kd_equal_steps beyond the seed-to-seed spread"
    )
    mixed = bench.summarize({"kd_pixel_mixup": mixup, "kd_equal_steps": {0: 35.5, 1: 35.5, 2: 35.0}})["comparisons"]
    assert not mixed["kd_pixel_mixup_minus_kd_equal_steps"]["same_sign_every_seed"]  # +0.5, -0.5, +1.5


def test_plot_and_table(tmp_path):
    steps = {"ce": {0: 30, 1: 30, 2: 30}, "kd": {0: 30, 1: 30, 2: 30}, "kd_pixel_mixup": {0: 62, 1: 62, 2: 60}}
    summary = bench.summarize(ACCURACIES, steps)
    assert summary["arms"]["kd_pixel_mixup"]["steps"] == {"0": 62, "1": 62, "2": 60}
    bench.plot(summary, "title", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    table = bench.format_table({"setting": {"seeds": [0, 1, 2]}, **summary})
    assert "| cross-entropy only (alpha 0) | 30 | 60.00 | 61.00 | 62.50 | 61.17 +- 1.26 |" in table
    assert "| KD + pixel mixup (stand-in for ImageMixer) | 62/60 | 64.50 |" in table  # the step counts that occur
    assert "KD + pixel mixup (stand-in for ImageMixer)" in table


def test_input_checks(tmp_path, capsys):
    ready = ["--teacher", str(tmp_path), "--dataset", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.parse_args(ready)
    error = capsys.readouterr().err
    assert "python -m demo.convert_dinov2" in error and "python -m demo.data outputs/data" in error
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit):
        bench.parse_args([*ready, "--seeds", "0", "0"])
    assert "at least 2 distinct seeds" in capsys.readouterr().err
    quick = bench.parse_args(ready)  # the default: the setting of docs/results.md, the control arm included
    assert quick.values["num_train_epochs"] == 2 and quick.values["teacher_image_size"] == 56
    assert quick.arms == ["ce", "kd", "kd_pixel_mixup", "kd_equal_steps"]
    assert bench.setting_tag(quick.values) == "train1000-ep2-teacher56px"
    args = bench.parse_args([*ready, "--setting", "full", "--num_train_epochs", "2"])
    assert args.values == {
        "max_train_samples": 6000,
        "num_train_epochs": 2,
        "max_eval_samples": 2000,
        "teacher_image_size": 98,
    }
    assert bench.setting_tag(args.values) == "train6000-ep2"
    assert bench.setting_tag({**args.values, "max_eval_samples": 500}) == "train6000-ep2-eval500"
    assert bench.setting_tag({**args.values, "teacher_image_size": 56}) == "train6000-ep2-teacher56px"


def test_the_mixes_are_made_of_the_students_training_images_only(tmp_path):
    images, labels = mnist_images(12, size=28)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    DatasetDict({"train": Dataset.from_dict({"image": images, "label": labels}, features=features)}).save_to_disk(
        str(tmp_path / "data")
    )
    source = bench.training_images(str(tmp_path / "data"), 5, str(tmp_path / "first5"))
    folder = bench.pixel_mixup_set(source, 8, seed=1, mix_alpha=0.4, folder=str(tmp_path / "mixes"))
    mixes = load_synthetic_dataset(folder)
    assert len(mixes) == 8 and np.asarray(mixes["source_indices"]).max() < 5  # only the 5 images the student sees
    assert set(mixes["generator"]) == {"pixel mixup (stand-in for ImageMixer)"}
    assert json.loads((tmp_path / "mixes" / "synthesis_config.json").read_text())["num_source_images"] == 5


def test_an_equal_steps_arm_needs_the_arm_it_matches(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "train").mkdir()
    ready = ["--teacher", str(tmp_path), "--dataset", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.parse_args([*ready, "--arms", "kd", "kd_equal_steps"])
    assert "makes as many steps as the kd_pixel_mixup run of its seed: add kd_pixel_mixup" in capsys.readouterr().err
    args = bench.parse_args([*ready, "--arms", "kd_pixel_mixup_equal_steps", "kd_equal_steps", "kd_pixel_mixup", "kd"])
    assert args.arms == ["kd", "kd_pixel_mixup", "kd_equal_steps", "kd_pixel_mixup_equal_steps"]  # matched arms first


def test_equal_steps_arms_make_the_steps_of_the_arms_they_match(tmp_path, monkeypatch):
    """16 real images, batches of 8: KD makes 16 // 8 = 2 steps an epoch; with half of every batch synthetic, an epoch
    is 16 // 4 = 4 steps. Steps are counted here from the training batches the trainer computes a loss on (no
    gradient accumulation: one optimizer step each), not from the benchmark's own count."""
    images, labels = mnist_images(24)
    features = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10)})
    DatasetDict(
        {
            "train": Dataset.from_dict({"image": images[:16], "label": labels[:16]}, features=features),
            "test": Dataset.from_dict({"image": images[16:], "label": labels[16:]}, features=features),
        }
    ).save_to_disk(str(tmp_path / "digits"))
    torch.manual_seed(0)
    teacher = save_with_processor(ViTModel(tiny_vit_config()), tmp_path / "teacher", [0.5] * 3, [0.5] * 3, 32)
    tiny_vit_config().save_pretrained(tmp_path / "student")
    batches = defaultdict(list)  # run folder -> labels of every training batch
    compute_loss = KDTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training:
            batches[Path(self.args.output_dir).name].append(inputs["labels"].tolist())
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(KDTrainer, "compute_loss", recording)
    report = bench.main(
        [
            "--teacher", teacher, "--dataset", str(tmp_path / "digits"), "--seeds", "0", "1",
            "--max_train_samples", "16", "--num_train_epochs", "1", "--max_eval_samples", "8",
            "--teacher_image_size", "32", "--arms", "kd", "kd_pixel_mixup", "kd_equal_steps",
            "kd_pixel_mixup_equal_steps", "--output_dir", str(tmp_path / "runs"), "--results_dir",
            str(tmp_path / "results"), "--extra_args", "--student", str(tmp_path / "student"), "--image_size", "32",
            "--load_size", "36", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    expected = {"kd": 2, "kd_pixel_mixup": 4, "kd_equal_steps": 4, "kd_pixel_mixup_equal_steps": 2}
    for seed in (0, 1):
        counted = {arm: len(batches[f"{arm}-seed{seed}"]) for arm in expected}
        assert counted == expected
        synthetic = {arm: {sum(v == -100 for v in b) for b in batches[f"{arm}-seed{seed}"]} for arm in expected}
        assert synthetic == {
            "kd": {0},
            "kd_pixel_mixup": {4},
            "kd_equal_steps": {0},
            "kd_pixel_mixup_equal_steps": {4},
        }
        # as many images seen: every batch holds 8 rows
        assert {len(b) for arm in expected for b in batches[f"{arm}-seed{seed}"]} == {8}
    assert {arm: entry["steps"] for arm, entry in report["arms"].items()} == {
        arm: {"0": n, "1": n} for arm, n in expected.items()
    }
    written = json.loads((tmp_path / "results" / "kd_vs_cross_entropy_train16-ep1-eval8-teacher32px.json").read_text())
    assert written["arms"]["kd_equal_steps"]["label"] == "KD, real images only, as many steps as KD + pixel mixup"
    assert "kd_pixel_mixup_minus_kd_equal_steps" in written["comparisons"]
