"""recipes/synthesize.py on a tiny seeded ImageMixer pipeline and real MNIST digits: provenance, class-agnostic seeded
pairs, resume after a kill (exactly N distinct indices, same images), settings checks, reading the set back."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, load_dataset

from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.data.synthetic_dataset import load_synthetic_dataset
from hf_distill.synthetic import ImageMixerPipeline
from hf_distill.synthetic.synthesis import SynthesisSettings, mix_plan

from .conftest import mnist_images
from .test_image_mixer import make_pipeline

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("synthesize_recipe", ROOT / "recipes" / "synthesize.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesis")
    make_pipeline().save_pretrained(root / "pipeline")
    images, labels = mnist_images(20)
    Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(root / "digits"))
    return root


def args(root, output_dir, *extra):
    return [
        "--dataset", str(root / "digits"), "--pipeline", str(root / "pipeline"), "--output_dir", str(output_dir),
        "--num_images", "10", "--shard_size", "4", "--batch_size", "3", "--num_inference_steps", "2", "--seed", "7",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def pixels(dataset):
    return {row["index"]: np.asarray(row["image"]) for row in dataset}


def test_synthetic_set_columns_provenance_and_loading(inputs, tmp_path):
    out = recipe.main(args(inputs, tmp_path / "set"))
    files = sorted(p.name for p in (Path(out) / "data").iterdir())
    assert files == ["shard-00000000-00000004.parquet", "shard-00000004-00000008.parquet",
                     "shard-00000008-00000010.parquet"]  # fmt: skip
    dataset = load_synthetic_dataset(out)
    assert sorted(dataset["index"]) == list(range(10))
    assert set(dataset.column_names) == {"image", "index", "source_indices", "source_labels", "weights", "seed",
                                         "num_inference_steps", "guidance_scale", "pipeline", "source_dataset"}  # fmt: skip
    sources = Dataset.load_from_disk(str(inputs / "digits"))
    for row in dataset:
        a, b = row["source_indices"]
        assert a != b and row["source_labels"] == [sources[a]["label"], sources[b]["label"]]
        assert row["weights"] == [1.0, 1.0] and row["seed"] == 7 and row["num_inference_steps"] == 2
        assert row["pipeline"] == str(inputs / "pipeline") and row["image"].size == (8, 8)
    config = json.loads((Path(out) / "synthesis_config.json").read_text())
    assert config["num_images"] == 10 and config["shard_size"] == 4
    assert len(load_image_dataset(out)) == 10  # what recipes/task_distill.py --synthetic_dataset reads
    parquet = load_dataset("parquet", data_files=str(Path(out) / "data" / "*.parquet"), split="train")
    assert parquet.features["image"].__class__.__name__ == "Image"


def test_pairs_are_seeded_per_index_class_agnostic_and_independent_of_n():
    settings = SynthesisSettings(source_dataset="d", pipeline="p", num_images=100, seed=3)
    pairs, weights = mix_plan(settings, np.arange(100), 20)
    assert np.all(pairs[:, 0] != pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < 20
    assert len({tuple(p) for p in pairs}) > 80  # random pairs, not a fixed pattern
    again, _ = mix_plan(
        SynthesisSettings(source_dataset="d", pipeline="p", num_images=5, seed=3), np.arange(60, 65), 20
    )
    np.testing.assert_array_equal(again, pairs[60:65])  # image i does not depend on N or on the batch
    other, _ = mix_plan(
        SynthesisSettings(source_dataset="d", pipeline="p", num_images=100, seed=4), np.arange(100), 20
    )
    assert not np.array_equal(other, pairs)
    random = SynthesisSettings(
        source_dataset="d", pipeline="p", num_images=10, mix_weights=(0.2, 0.8), random_weights=True
    )
    _, w = mix_plan(random, np.arange(10), 20)
    assert np.all((w[:, 0] >= 0.2) & (w[:, 0] <= 0.8)) and np.allclose(w.sum(1), 1) and len(set(w[:, 0])) == 10


def test_killed_run_completes_with_exactly_n_distinct_indices_and_the_same_images(inputs, tmp_path, monkeypatch):
    clean = pixels(load_synthetic_dataset(recipe.main(args(inputs, tmp_path / "clean"))))
    calls = {"n": 0}
    original = ImageMixerPipeline.__call__

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during the second shard: the first shard is written, the second is not
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(ImageMixerPipeline, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args(inputs, tmp_path / "killed"))
    written = sorted(p.name for p in (tmp_path / "killed" / "data").iterdir())
    assert written == ["shard-00000000-00000004.parquet"]  # no partial shard visible
    first_shard = (tmp_path / "killed" / "data" / written[0]).stat().st_mtime_ns
    with pytest.raises(ValueError, match="incomplete.*same recipes/synthesize.py command"):
        load_synthetic_dataset(str(tmp_path / "killed"))
    monkeypatch.setattr(ImageMixerPipeline, "__call__", original)
    out = recipe.main(args(inputs, tmp_path / "killed"))
    assert (tmp_path / "killed" / "data" / written[0]).stat().st_mtime_ns == first_shard  # not regenerated
    resumed = load_synthetic_dataset(out)
    assert sorted(resumed["index"]) == list(range(10))
    again = pixels(resumed)
    for index in range(10):
        np.testing.assert_allclose(again[index].astype(int), clean[index].astype(int), atol=1, err_msg=str(index))


def test_weights_change_the_images(inputs, tmp_path):
    equal = pixels(load_synthetic_dataset(recipe.main(args(inputs, tmp_path / "a", "--num_images", "3"))))
    skewed = pixels(
        load_synthetic_dataset(
            recipe.main(args(inputs, tmp_path / "b", "--num_images", "3", "--mix_weights", "1.0", "0.2"))
        )
    )
    assert any(not np.array_equal(equal[i], skewed[i]) for i in range(3))


def test_other_settings_in_the_same_folder_are_rejected_before_loading(inputs, tmp_path, monkeypatch):
    recipe.main(args(inputs, tmp_path / "set", "--num_images", "4"))

    def no_loading(*a, **k):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(ImageMixerPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="guidance_scale 3.0 vs 5.0.*same options"):
        recipe.main(args(inputs, tmp_path / "set", "--num_images", "4", "--guidance_scale", "5"))
    recipe.main(args(inputs, tmp_path / "set", "--num_images", "4"))  # the same command: complete, nothing loaded


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_images", "0"], "num_images must be >= 1"),
        (["--random_weights", "--mix_weights", "0.9", "0.1"], "0 <= low <= high <= 1"),
        (["--torch_dtype", "float64"], "--torch_dtype must be one of"),
        (["--push_to_hub"], "needs --hub_dataset_id"),
        (["--image_column", "picture"], "no column 'picture'"),
    ],
)
def test_bad_input(inputs, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        recipe.main(args(inputs, tmp_path / "bad", *extra))


def test_too_few_source_images(inputs, tmp_path):
    images, labels = mnist_images(1)
    Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(tmp_path / "one"))
    argv = args(inputs, tmp_path / "bad")
    argv[argv.index("--dataset") + 1] = str(tmp_path / "one")
    with pytest.raises(ValueError, match="at least 2 source images"):
        recipe.main(argv)


def test_the_image_mixer_config_parses_with_the_demo_settings():
    _, settings = recipe.parse_args(["--config", str(ROOT / "recipes" / "configs" / "synthesize_image_mixer.yaml")])
    assert (settings.num_inference_steps, settings.guidance_scale, settings.height, settings.width) == (
        30,
        3.0,
        640,
        640,
    )
    assert settings.mix_weights == (1.0, 1.0) and not settings.random_weights
