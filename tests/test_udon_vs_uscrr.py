"""benchmarks/udon_vs_uscrr.py: the statistics and verdicts (checked against numbers worked out by hand), its input
checks, and the whole command at tiny scale (a tiny DINOv2 built in code, small real-image domains): data subsets,
runs of the recipe, results JSON read back from the runs, plot, and a resumed command that trains nothing."""

import json

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image
from transformers import Dinov2Config, Dinov2Model

from benchmarks import udon_vs_uscrr as bench

from .conftest import mnist_images


def run(mnist, fashion, digits, mean):
    domains = {"mnist": mnist, "fashion_mnist": fashion, "sklearn_digits": digits}
    return {
        "per_domain": {name: {"R@1": r1, "mMP@5": mp} for name, (r1, mp) in domains.items()},
        "mean": {"R@1": mean[0], "mMP@5": mean[1]},
    }


RESULTS = {
    "uscrr": {0: run((50, 40), (60, 50), (70, 60), (60, 50)), 1: run((52, 42), (58, 48), (72, 62), (61, 51))},
    "udon_dynamic": {0: run((56, 41), (59, 50), (71, 61), (62, 51)), 1: run((58, 43), (61, 49), (70, 63), (63, 52))},
}


def test_means_stds_and_verdicts():
    summary = bench.summarize(RESULTS)
    uscrr = summary["arms"]["uscrr"]["metrics"]["R@1"]["mnist"]
    assert uscrr["per_seed"] == {"0": 50.0, "1": 52.0}
    # by hand: mean 51, sample std sqrt(((-1)^2 + 1^2) / 1) = sqrt(2)
    assert uscrr["mean"] == 51.0 and uscrr["std"] == pytest.approx(2**0.5)
    comparison = summary["comparisons"]["udon_dynamic_minus_uscrr"]
    mnist = comparison["R@1 mnist"]  # 57 - 51 = 6 > sqrt(2) + sqrt(2), both seeds +6
    assert mnist["per_seed_difference"] == {"0": 6.0, "1": 6.0}
    assert mnist["verdict"] == "udon_dynamic > uscrr beyond the seed-to-seed spread"
    fashion = comparison["R@1 fashion_mnist"]  # +1 mean, seeds -1 and +3: no verdict
    assert fashion["mean_difference"] == 1.0 and not fashion["same_sign_every_seed"]
    assert fashion["verdict"] == "udon_dynamic vs uscrr: no difference beyond the seed-to-seed spread"
    mean = comparison["mMP@5 mean"]  # +1 both seeds, but 1.0 < 0.71 + 0.71 (R@1 mean: +2 both seeds, 2 > 1.41)
    assert mean["same_sign_every_seed"] and not mean["intervals_separated"]
    assert set(summary["comparisons"]) == {"udon_dynamic_minus_uscrr"}  # the arms not run are left out
    table = bench.format_table({"setting": {}, **summary})
    assert "| USCRR (round-robin) | 51.00 +- 1.41 | 41.00 +- 1.41 |" in table
    assert "- R@1 mean: udon_dynamic > uscrr beyond the seed-to-seed spread (+2.00)" in table


def test_input_checks(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--backbone", str(tmp_path), "--mnist", str(tmp_path)])
    error = capsys.readouterr().err
    assert "python -m demo.convert_dinov2" in error and "python -m demo.data outputs/data" in error
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "0", "--freeze_backbone_epochs", "2", "--num_train_epochs", "2"])
    error = capsys.readouterr().err
    assert "at least 2 distinct seeds" in error and "must be trained after its frozen epochs" in error


def _save(folder, images, labels, names):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
    half = len(images) // 2
    DatasetDict(
        {
            "train": Dataset.from_dict({"image": images[:half], "label": labels[:half]}, features=features),
            "test": Dataset.from_dict({"image": images[half:], "label": labels[half:]}, features=features),
        }
    ).save_to_disk(str(folder))


def test_tiny_command_writes_results_from_its_runs_and_resumes(tmp_path, monkeypatch):
    images, labels = mnist_images(80, size=28)
    _save(tmp_path / "mnist", images[:40], labels[:40], [str(d) for d in range(10)])
    inverted = [Image.fromarray(255 - np.asarray(image)) for image in images[40:]]  # a second look, other labels
    _save(tmp_path / "fashion", inverted, labels[40:], [f"c{d}" for d in range(10)])
    tiny = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=8, image_size=32)  # fmt: skip
    Dinov2Model(tiny).save_pretrained(tmp_path / "backbone")
    argv = [
        "--backbone", str(tmp_path / "backbone"), "--mnist", str(tmp_path / "mnist"),
        "--fashion_mnist", str(tmp_path / "fashion"), "--train_per_domain", "16", "--eval_per_domain", "10",
        "--image_size", "32", "--batch_size", "16", "--sampler_update_every", "1", "--seeds", "0", "1",
        "--arms", "udon_dynamic", "--output_dir", str(tmp_path / "runs"),
        "--results_dir", str(tmp_path / "results"), "--extra_args", "--disable_tqdm", "true",
    ]  # fmt: skip
    report = bench.main(argv)
    tag = "train16x3-ep2-freeze1-32px"
    saved = json.loads((tmp_path / "results" / f"udon_vs_uscrr_{tag}.json").read_text())
    assert saved["complete"] and saved["arms"] == report["arms"]
    assert (tmp_path / "results" / f"udon_vs_uscrr_{tag}.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "results" / f"udon_vs_uscrr_{tag}.partial.json").exists()
    data = tmp_path / "runs" / "data-train16-eval10"
    digits = load_from_disk(str(data / "sklearn_digits"))
    assert (len(digits["train"]), len(digits["test"])) == (16, 10)
    assert np.asarray(digits["train"][0]["image"]).shape == (8, 8)  # scikit-learn's 8x8 digits
    mnist_test = load_from_disk(str(data / "mnist"))["test"]
    assert len(mnist_test) == 10 and len(set(mnist_test["label"])) > 3  # a seeded draw, not a class-sorted prefix
    per_seed = []  # the statistics are those of the runs' own eval_results.json
    for seed in (0, 1):
        results = json.loads((tmp_path / "runs" / tag / f"udon_dynamic-seed{seed}" / "eval_results.json").read_text())
        assert results["method"] == "udon"
        per_seed.append([results["per_domain"][name]["mMP@5"] for name in ("mnist", "fashion_mnist")])
    stats = saved["arms"]["udon_dynamic"]["metrics"]["mMP@5"]
    np.testing.assert_allclose([stats["mnist"]["mean"], stats["fashion_mnist"]["mean"]], np.mean(per_seed, 0))
    assert set(stats) == {"mnist", "fashion_mnist", "sklearn_digits", "mean"} and set(saved["arms"]) == {
        "udon_dynamic"
    }
    weights = saved["dynamic_sampler_last_weights"]
    assert set(weights) == {"0", "1"} and all(sum(w.values()) == pytest.approx(1.0) for w in weights.values())

    def no_training():
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(bench, "load_udon_recipe", lambda: type("Recipe", (), {"main": staticmethod(no_training)}))
    again = bench.main(argv)
    assert again["arms"] == saved["arms"] and set(again["wall_time_s"]) == set(saved["wall_time_s"])
