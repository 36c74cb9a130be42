"""recipes/synthesize.py --generator pixel-mixup: the cheap stand-in for ImageMixer through the same synthesis stage.
Each written image is checked against `lam * a + (1 - lam) * b` computed here in float64 from the two source images and
the recorded `lam`; the rows, config and card name the generator for what it is; a killed run resumes without
duplicating or losing images."""

import json

import numpy as np
import pytest
from datasets import Dataset, Image, load_dataset

from hf_distill.synthetic import load_synthetic_dataset
from hf_distill.synthetic import synthesis as synthesis_module

from ..conftest import load_recipe, mnist_images

recipe = load_recipe("synthesize")
LABEL = "pixel mixup (stand-in for ImageMixer)"
SHARDS = ["shard-00000000-00000004.parquet", "shard-00000004-00000008.parquet", "shard-00000008-00000010.parquet"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """20 grayscale 28 x 28 digits (mode L: the mix is made in 8-bit RGB, as training reads them)."""
    root = tmp_path_factory.mktemp("pixel-mixup")
    images, labels = mnist_images(20, size=28)
    Dataset.from_dict({"image": [image.convert("L") for image in images], "label": labels}).save_to_disk(
        str(root / "digits")
    )
    return root / "digits"


def args(digits, output_dir, *extra):
    return [
        "--generator", "pixel-mixup", "--mix_alpha", "0.4", "--dataset", str(digits), "--output_dir", str(output_dir),
        "--num_images", "10", "--shard_size", "4", "--batch_size", "3", "--seed", "5", *extra,
    ]  # fmt: skip


def png_bytes(path):
    dataset = load_dataset("parquet", data_files=str(path), split="train").cast_column("image", Image(decode=False))
    return [row["image"]["bytes"] for row in dataset]


def test_each_image_is_the_recorded_mix_of_its_two_sources_and_says_what_made_it(digits, tmp_path):
    out = tmp_path / "set"
    dataset = recipe.main(args(digits, out))
    assert dataset["index"] == list(range(10))
    sources = Dataset.load_from_disk(str(digits))
    lambdas = []
    for row in dataset:
        a, b = row["source_indices"]
        lam, rest = row["weights"]
        assert a != b and 0.0 <= lam <= 1.0 and rest == pytest.approx(1.0 - lam, abs=1e-6)
        first = np.asarray(sources[a]["image"].convert("RGB"), dtype=np.float64)
        second = np.asarray(sources[b]["image"].convert("RGB"), dtype=np.float64)
        expected = np.clip(np.rint(lam * first + (1.0 - lam) * second), 0, 255)
        written = np.asarray(row["image"])
        assert row["image"].mode == "RGB" and written.shape == (28, 28, 3)
        np.testing.assert_array_equal(written, expected.astype(np.uint8), err_msg=f"image {row['index']}")
        assert row["generator"] == LABEL and row["pipeline"] is None
        assert row["num_inference_steps"] is None and row["guidance_scale"] is None  # no diffusion model
        assert row["source_labels"] == [sources[a]["label"], sources[b]["label"]] and row["seed"] == 5
        lambdas.append(lam)
    assert len(set(lambdas)) == 10  # drawn per image
    config = json.loads((out / "synthesis_config.json").read_text())
    assert config["generator"] == "pixel-mixup" and config["mix_alpha"] == 0.4 and config["pipeline"] is None
    card = (out / "README.md").read_text()
    assert "# Pixel mixup (stand-in for ImageMixer) of digits" in card and "not ImageMixer images" in card
    assert "Beta(0.4, 0.4)" in card and "ImageMixer mixes of" not in card and "image-mixer" not in card
    again = recipe.main(args(digits, tmp_path / "again"))  # the same seed: the same pairs, lambdas and pixels
    assert again["weights"] == dataset["weights"] and again["source_indices"] == dataset["source_indices"]
    other = recipe.main(args(digits, tmp_path / "other", "--seed", "6"))
    assert other["weights"] != dataset["weights"]


def test_a_killed_run_resumes_without_duplicating_or_losing_images(digits, tmp_path, monkeypatch):
    recipe.main(args(digits, tmp_path / "clean"))
    clean = {name: png_bytes(tmp_path / "clean" / "data" / name) for name in SHARDS}
    calls = {"n": 0}
    original = synthesis_module.mix_pixels

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # inside the second shard: the first is written, the second is not
            raise KeyboardInterrupt("simulated kill")
        return original(*a, **k)

    monkeypatch.setattr(synthesis_module, "mix_pixels", dying)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args(digits, killed))
    assert sorted(p.name for p in (killed / "data").iterdir()) == SHARDS[:1]  # no partial shard visible
    first_shard = (killed / "data" / SHARDS[0]).stat().st_mtime_ns
    monkeypatch.setattr(synthesis_module, "mix_pixels", original)
    resumed = recipe.main(args(digits, killed))
    assert sorted(p.name for p in (killed / "data").iterdir()) == SHARDS
    assert (killed / "data" / SHARDS[0]).stat().st_mtime_ns == first_shard  # not regenerated
    assert sorted(resumed["index"]) == list(range(10))  # exactly N distinct indices
    assert {name: png_bytes(killed / "data" / name) for name in SHARDS} == clean
    assert len(load_synthetic_dataset(str(killed))) == 10


def test_sources_of_other_sizes_are_resized_to_the_requested_size(digits, tmp_path):
    sources = Dataset.load_from_disk(str(digits))
    mixed_sizes = [image.resize((20 + i % 3 * 6, 28)) for i, image in enumerate(sources["image"])]
    Dataset.from_dict({"image": mixed_sizes, "label": sources["label"]}).save_to_disk(str(tmp_path / "sizes"))
    dataset = recipe.main(args(tmp_path / "sizes", tmp_path / "set", "--height", "16", "--width", "24"))
    assert {row["image"].size for row in dataset} == {(24, 16)}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--pipeline", "outputs/image-mixer"], "runs no pipeline: leave pipeline unset"),
        (["--weights", "1", "0.5"], "does not use weights"),
        (["--num_inference_steps", "5", "--guidance_scale", "2"], "does not use num_inference_steps, guidance_scale"),
        (["--mix_alpha", "0"], "mix_alpha must be > 0"),
        (["--height", "16"], "both height and width"),
    ],
)
def test_bad_input(digits, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        recipe.main(args(digits, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_the_image_mixer_generator_still_needs_a_pipeline(digits, tmp_path):
    argv = ["--dataset", str(digits), "--output_dir", str(tmp_path / "bad"), "--num_images", "2"]
    with pytest.raises(ValueError, match="--pipeline required"):
        recipe.main(argv)
