"""recipes/synthesize.py on a tiny seeded ImageMixer pipeline and real MNIST digits: provenance, class-agnostic seeded
pairs, per-image noise independent of N and of the batching, resume after a kill (exactly N distinct indices, the same
bytes), settings checks, reading the set back."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Image, load_dataset
from diffusers import DDPMScheduler

from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.synthetic import ImageMixerPipeline, SynthesisSettings, load_synthetic_dataset, mix_plan

from ..conftest import load_recipe, mnist_images
from ..synthetic.test_pipeline_image_mixer import make_pipeline

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("synthesize")

SHARDS = ["shard-00000000-00000004.parquet", "shard-00000004-00000008.parquet", "shard-00000008-00000010.parquet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthesis")
    pipe = make_pipeline()
    pipe.save_pretrained(root / "pipeline")
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # stochastic steps: noise at every step
    pipe.save_pretrained(root / "pipeline-ddpm")
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


def png_bytes(path):
    dataset = load_dataset("parquet", data_files=str(path), split="train").cast_column("image", Image(decode=False))
    return [row["image"]["bytes"] for row in dataset]


def test_synthetic_set_columns_provenance_and_loading(inputs, tmp_path):
    out = tmp_path / "set"
    dataset = recipe.main(args(inputs, out))
    assert sorted(p.name for p in (out / "data").iterdir()) == SHARDS
    assert dataset["index"] == list(range(10))
    features = {name: str(feature) for name, feature in dataset.features.items()}
    assert features["index"] == "Value('int64')" and features["seed"] == "Value('int64')"
    assert dataset.features["source_indices"].feature.dtype == "int64"
    assert dataset.features["source_labels"].feature.dtype == "int64"
    assert dataset.features["weights"].feature.dtype == "float32"
    assert set(dataset.column_names) == {"image", "index", "source_indices", "source_labels", "weights", "seed",
                                         "num_inference_steps", "guidance_scale", "pipeline", "source_dataset",
                                         "generator"}  # fmt: skip
    sources = Dataset.load_from_disk(str(inputs / "digits"))
    for row in dataset:
        a, b = row["source_indices"]
        assert a != b and row["source_labels"] == [sources[a]["label"], sources[b]["label"]]
        assert row["weights"] == [1.0, 1.0] and row["seed"] == 7 and row["num_inference_steps"] == 2
        assert row["guidance_scale"] == 3.0 and row["source_dataset"] == "digits"  # a local path: its folder name
        assert row["pipeline"] == "pipeline" and row["image"].size == (8, 8) and row["generator"] == "ImageMixer"
    assert all(image.startswith(b"\x89PNG") for image in png_bytes(out / "data" / SHARDS[0]))
    config = json.loads((out / "synthesis_config.json").read_text())
    assert config["num_images"] == 10 and config["shard_size"] == 4 and config["num_source_images"] == 20
    assert config["weights"] == [1.0, 1.0] and config["torch_dtype"] == "float32"
    assert load_image_dataset(str(out))["index"] == list(range(10))  # what task_distill.py --synthetic_dataset reads
    copy = tmp_path / "hub-copy"  # the layout of a pushed set downloaded again: data/*.parquet, no config
    shutil.copytree(out / "data", copy / "data")
    assert sorted(load_image_dataset(str(copy))["index"]) == list(range(10))
    assert sorted(load_synthetic_dataset(str(copy))["index"]) == list(range(10))
    no_labels = recipe.main(args(inputs, tmp_path / "no-labels", "--num_images", "2", "--label_column", ""))
    assert no_labels["source_labels"] == [[-1, -1], [-1, -1]]


def test_pairs_are_seeded_per_index_class_agnostic_and_independent_of_n():
    settings = SynthesisSettings(source_dataset="d", pipeline="p", num_images=100, seed=3)
    pairs, weights = mix_plan(settings, np.arange(100), 20)
    assert np.all(pairs[:, 0] != pairs[:, 1]) and pairs.min() >= 0 and pairs.max() < 20
    assert len({tuple(p) for p in pairs}) > 80  # random pairs, not a fixed pattern
    assert len(np.unique(pairs)) == 20  # every source can be drawn: classes are ignored
    again, _ = mix_plan(
        SynthesisSettings(source_dataset="d", pipeline="p", num_images=5, seed=3), np.arange(60, 65), 20
    )
    np.testing.assert_array_equal(again, pairs[60:65])  # image i does not depend on N or on the batch
    other, _ = mix_plan(
        SynthesisSettings(source_dataset="d", pipeline="p", num_images=100, seed=4), np.arange(100), 20
    )
    assert not np.array_equal(other, pairs)
    random = SynthesisSettings(
        source_dataset="d", pipeline="p", num_images=10, weights=(0.2, 0.8), random_weights=True
    )
    _, w = mix_plan(random, np.arange(10), 20)
    assert np.all((w[:, 0] >= 0.2) & (w[:, 0] <= 0.8)) and np.allclose(w.sum(1), 1) and len(set(w[:, 0])) == 10
    np.testing.assert_array_equal(mix_plan(random, np.arange(5, 10), 20)[1], w[5:])


def test_an_image_does_not_depend_on_n_nor_on_the_batching_with_a_stochastic_scheduler(inputs, tmp_path):
    """DDPM draws noise at every step: it comes from the image's own generator, not from the batch or global RNG."""
    ddpm = ["--pipeline", str(inputs / "pipeline-ddpm"), "--num_images", "4", "--shard_size", "4"]
    batched = recipe.main(args(inputs, tmp_path / "b4", *ddpm, "--batch_size", "4"))
    single = recipe.main(args(inputs, tmp_path / "b1", *ddpm, "--batch_size", "1"))
    fewer = recipe.main(args(inputs, tmp_path / "n2", *ddpm, "--num_images", "2", "--batch_size", "2"))
    assert batched["source_indices"] == single["source_indices"] and batched["weights"] == single["weights"]
    assert fewer["source_indices"] == batched["source_indices"][:2]
    reference = pixels(batched)
    for other in (pixels(single), pixels(fewer)):
        for index, image in other.items():  # batched float maths may round differently: at most 1 level
            np.testing.assert_allclose(image.astype(int), reference[index].astype(int), atol=1, err_msg=str(index))
    assert not np.array_equal(reference[0], reference[1])


def test_killed_run_completes_with_exactly_n_distinct_indices_and_the_same_bytes(inputs, tmp_path, monkeypatch):
    recipe.main(args(inputs, tmp_path / "clean"))
    clean = {name: png_bytes(tmp_path / "clean" / "data" / name) for name in SHARDS}
    calls = {"n": 0}
    original = ImageMixerPipeline.__call__

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # during the second shard: the first shard is written, the second is not
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(ImageMixerPipeline, "__call__", dying)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args(inputs, killed))
    assert sorted(p.name for p in (killed / "data").iterdir()) == SHARDS[:1]  # no partial shard visible
    (killed / "data" / f".{SHARDS[1]}.abc123.tmp").write_bytes(b"half a shard")  # what a hard kill can leave
    first_shard = (killed / "data" / SHARDS[0]).stat().st_mtime_ns
    with pytest.raises(ValueError, match="incomplete: 2 of 3.*same recipes/synthesize.py command"):
        load_synthetic_dataset(str(killed))
    with pytest.raises(ValueError, match="incomplete"):
        load_image_dataset(str(killed))
    assert load_synthetic_dataset(str(killed), allow_incomplete=True)["index"] == [0, 1, 2, 3]
    monkeypatch.setattr(ImageMixerPipeline, "__call__", original)
    resumed = recipe.main(args(inputs, killed))
    assert sorted(p.name for p in (killed / "data").iterdir()) == SHARDS  # the stray temporary file is gone
    assert (killed / "data" / SHARDS[0]).stat().st_mtime_ns == first_shard  # not regenerated
    assert resumed["index"] == list(range(10))
    assert {name: png_bytes(killed / "data" / name) for name in SHARDS} == clean  # the same batches: the same bytes
    (killed / "data" / SHARDS[1]).unlink()  # a lost shard is regenerated alone, identically
    recipe.main(args(inputs, killed))
    assert png_bytes(killed / "data" / SHARDS[1]) == clean[SHARDS[1]]
    assert (killed / "data" / SHARDS[0]).stat().st_mtime_ns == first_shard


def test_a_set_made_before_the_generator_setting_resumes_and_gets_its_card(inputs, tmp_path):
    out = tmp_path / "older"
    recipe.main(args(inputs, out, "--num_images", "4"))
    config = json.loads((out / "synthesis_config.json").read_text())
    for key in ("generator", "mix_alpha"):  # what synthesis_config.json held before pixel mixup existed
        del config[key]
    (out / "synthesis_config.json").write_text(json.dumps(config))
    (out / "data" / "shard-00000000-00000004.parquet").unlink()
    assert recipe.main(args(inputs, out, "--num_images", "4"))["index"] == [0, 1, 2, 3]
    assert "# ImageMixer mixes of digits" in (out / "README.md").read_text()


def test_weights_change_the_images(inputs, tmp_path):
    equal = pixels(recipe.main(args(inputs, tmp_path / "a", "--num_images", "3")))
    skewed = recipe.main(args(inputs, tmp_path / "b", "--num_images", "3", "--weights", "1.0", "0.2"))
    assert skewed["weights"] == [[1.0, pytest.approx(0.2)]] * 3
    assert all(not np.array_equal(equal[i], image) for i, image in pixels(skewed).items())
    drawn = recipe.main(
        args(inputs, tmp_path / "c", "--num_images", "3", "--random_weights", "--weights", "0.2", "0.8")
    )
    assert all(0.2 <= w <= 0.8 and v == pytest.approx(1 - w) for w, v in drawn["weights"])


def test_other_settings_in_the_same_folder_are_rejected_before_loading(inputs, tmp_path, monkeypatch):
    recipe.main(args(inputs, tmp_path / "set", "--num_images", "4"))

    def no_loading(*a, **k):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(ImageMixerPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="guidance_scale 3.0 vs 5.0.*same options.*another --output_dir"):
        recipe.main(args(inputs, tmp_path / "set", "--num_images", "4", "--guidance_scale", "5"))
    with pytest.raises(ValueError, match=r"num_images 4 vs 6, weights \[1.0, 1.0\] vs \[1.0, 0.5\]"):
        recipe.main(args(inputs, tmp_path / "set", "--num_images", "6", "--weights", "1", "0.5"))
    with pytest.raises(ValueError, match="torch_dtype 'float32' vs 'bfloat16'"):
        recipe.main(args(inputs, tmp_path / "set", "--num_images", "4", "--torch_dtype", "bfloat16"))
    digits = tmp_path / "digits"  # the same path with other content: the pairs would differ
    shutil.copytree(inputs / "digits", digits)
    changing = args(inputs, tmp_path / "other-set", "--num_images", "4")
    changing[changing.index("--dataset") + 1] = str(digits)
    monkeypatch.undo()
    recipe.main(changing)
    monkeypatch.setattr(ImageMixerPipeline, "from_pretrained", no_loading)
    fewer = Dataset.load_from_disk(str(digits)).select(range(12))
    fewer.save_to_disk(str(tmp_path / "fewer"))
    shutil.rmtree(digits)
    shutil.copytree(tmp_path / "fewer", digits)
    with pytest.raises(ValueError, match="made from 20 source images.*now has 12.*another --output_dir"):
        recipe.main(changing)
    recipe.main(args(inputs, tmp_path / "set", "--num_images", "4"))  # the same command: complete, nothing loaded


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num_images", "0"], "num_images must be >= 1"),
        (["--seed", "-1"], "seed must be >= 0"),
        (["--random_weights", "--weights", "0.9", "0.1"], "0 <= low <= high <= 1"),
        (["--torch_dtype", "float64"], "torch_dtype must be one of"),
        (["--batch_size", "0"], "--batch_size must be >= 1"),
        (["--push_to_hub"], "needs --hub_dataset_id"),
        (["--pipeline", ""], "--pipeline required"),
        (["--image_column", "picture"], "no column 'picture'"),
        (["--label_column", "class"], "no column 'class'.*--label_column ''"),
    ],
)
def test_bad_input(inputs, tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(ImageMixerPipeline, "from_pretrained", None)  # every check comes before loading the pipeline
    with pytest.raises(ValueError, match=message):
        recipe.main(args(inputs, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_too_few_source_images_or_a_foreign_output_dir(inputs, tmp_path):
    images, labels = mnist_images(1)
    Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(tmp_path / "one"))
    argv = args(inputs, tmp_path / "bad")
    argv[argv.index("--dataset") + 1] = str(tmp_path / "one")
    with pytest.raises(ValueError, match="at least 2 source images"):
        recipe.main(argv)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthesis folder.*another --output_dir"):
        recipe.main(args(inputs, tmp_path / "foreign"))


def test_the_image_mixer_config_parses_with_the_demo_settings():
    _, settings = recipe.parse_args(["--config", str(ROOT / "recipes" / "configs" / "synthesize_image_mixer.yaml")])
    generation = (settings.num_inference_steps, settings.guidance_scale, settings.height, settings.width)
    assert generation == (30, 3.0, 640, 640)
    assert settings.weights == (1.0, 1.0) and not settings.random_weights and settings.torch_dtype == "float16"


def test_the_settings_are_parsed_from_their_dataclass_under_the_recipes_option_names(tmp_path):
    """`SynthesisSettings` is parsed directly: `--dataset` / `--dataset_split` (command line and YAML keys) set its
    `source_dataset` / `split`; a YAML key that is no option is refused."""
    config = tmp_path / "mixes.yaml"
    config.write_text("dataset: data/cub\ndataset_split: validation\npipeline: mixer\noutput_dir: out\nseed: 5\n")
    args, settings = recipe.parse_args(["--config", str(config), "--num_images", "12", "--weights", "0.5", "1"])
    assert (settings.source_dataset, settings.split, settings.pipeline) == ("data/cub", "validation", "mixer")
    assert settings.seed == 5 and settings.num_images == 12 and settings.weights == (0.5, 1.0)
    assert args.output_dir == "out"
    argv = ["--dataset", "d", "--dataset_split", "test", "--pipeline", "p", "--output_dir", "o"]
    _, settings = recipe.parse_args(argv)
    assert (settings.source_dataset, settings.split, settings.num_images) == ("d", "test", 1000)  # the recipe default
    config.write_text("datasets: d\npipeline: p\noutput_dir: o\n")
    with pytest.raises(ValueError, match=r"Unknown options.*\['datasets'\]"):
        recipe.parse_args(["--config", str(config)])
