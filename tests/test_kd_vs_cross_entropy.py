"""benchmarks/kd_vs_cross_entropy.py without training: the statistics and verdicts (checked against numbers worked out
by hand), the plot and table it writes, its input checks, and the pixel mixup set it makes from the student's images."""

import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature

from benchmarks import kd_vs_cross_entropy as bench
from hf_distill.synthetic import load_synthetic_dataset

from .conftest import mnist_images

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


def test_plot_and_table(tmp_path):
    summary = bench.summarize(ACCURACIES)
    bench.plot(summary, "title", str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")
    table = bench.format_table({"setting": {"seeds": [0, 1, 2]}, **summary})
    assert "| cross-entropy only (alpha 0) | 60.00 | 61.00 | 62.50 | 61.17 +- 1.26 |" in table
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
