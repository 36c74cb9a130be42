"""Publishing ImageMixer outputs: a saved pipeline loads with the diffusers-standard `DiffusionPipeline.from_pretrained`
where hf_distill cannot be imported, and a synthetic set is pushed as a Hub dataset repo (to a fake Hub on 127.0.0.1)
with a dataset card that records its provenance."""

import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import DatasetCard

from hf_distill.data.image_datasets import load_image_dataset
from hf_distill.synthetic import SynthesisSettings, push_synthetic_dataset, synthesis_card, write_dataset_card

from ..recipes import test_synthesize
from ..recipes.test_synthesize import args as synthesize_args
from ..recipes.test_synthesize import recipe as synthesize_recipe
from .test_pipeline_image_mixer import STEPS, make_pipeline

synthesis_inputs = test_synthesize.inputs  # the `inputs` fixture: a saved tiny pipeline and 20 MNIST digits

LOAD_WITHOUT_HF_DISTILL = """
import sys
sys.modules["hf_distill"] = None  # importing hf_distill (or anything under it) now fails
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, images_file, output_file = sys.argv[1:]
try:
    DiffusionPipeline.from_pretrained(folder)
    raise SystemExit("loaded without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code=True" in str(error), error
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
assert type(pipe).__name__ == "ImageMixerPipeline" and not type(pipe).__module__.startswith("hf_distill")
pipe.set_progress_bar_config(disable=True)
images = np.load(images_file)
mixes = [[(images[0], 1.0), (images[1], 0.5)], [(images[2], 1.2)]]
generator = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
np.save(output_file, pipe(mixes, num_inference_steps=%d, generator=generator, output_type="np").images)
"""


def test_a_saved_pipeline_loads_with_diffusion_pipeline_where_hf_distill_is_not_importable(tmp_path):
    pipe = make_pipeline(context_tokens=3)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    mixes = [[(images[0], 1.0), (images[1], 0.5)], [(images[2], 1.2)]]
    generator = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    expected = pipe(mixes, num_inference_steps=STEPS, generator=generator, output_type="np").images
    pipe.save_pretrained(tmp_path / "pipeline")
    code = (tmp_path / "pipeline" / "pipeline_image_mixer.py").read_text()
    assert not re.search(r"^\s*(from|import)\s+hf_distill", code, flags=re.MULTILINE)  # self-contained
    np.save(tmp_path / "images.npy", images)

    # -I: no PYTHONPATH, no user site, not the current folder; hf_distill blocked even if installed in the venv
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    script = [sys.executable, "-I", "-c", LOAD_WITHOUT_HF_DISTILL % STEPS]
    files = [str(tmp_path / "pipeline"), str(tmp_path / "images.npy"), str(tmp_path / "out.npy")]
    run = subprocess.run(script + files, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_a_synthetic_set_is_pushed_as_a_dataset_repo_with_a_provenance_card(synthesis_inputs, tmp_path, fake_hub):
    inputs = synthesis_inputs
    out = tmp_path / "set"
    options = ["--num_images", "6", "--random_weights", "--weights", "0.3", "0.7"]
    push = ["--push_to_hub", "--hub_dataset_id", "me/digit-mixes"]
    synthesize_recipe.main(synthesize_args(inputs, out, *options, *push))
    shards = ["data/shard-00000000-00000004.parquet", "data/shard-00000004-00000006.parquet"]

    (commit,) = fake_hub.commits
    assert fake_hub.created[0]["type"] == "dataset" and commit["repo_type"] == "dataset"
    uploaded = fake_hub.files["me/digit-mixes"]
    assert sorted(uploaded) == ["README.md", *shards, "synthesis_config.json"]  # exactly these, nothing else
    assert all(uploaded[shard] == (out / shard).read_bytes() for shard in shards)  # the shards as written
    assert uploaded["README.md"] == (out / "README.md").read_bytes()  # the card written beside the set

    # no local path anywhere: a local source or pipeline is recorded by its folder name
    assert str(tmp_path).encode() not in fake_hub.all_bytes() and str(inputs).encode() not in fake_hub.all_bytes()
    for shard in shards:
        table = pq.read_table(io.BytesIO(uploaded[shard]), columns=["pipeline", "source_dataset"]).to_pydict()
        assert set(table["pipeline"]) == {"pipeline"} and set(table["source_dataset"]) == {"digits"}
    config = json.loads(uploaded["synthesis_config.json"])
    assert config["source_dataset"] == "digits" and config["pipeline"] == "pipeline" and config["num_images"] == 6

    card = DatasetCard(uploaded["README.md"].decode())
    provenance = card.data.hf_distill["synthesis"]
    assert provenance["source_dataset"] == "digits" and provenance["pipeline"] == "pipeline"
    assert provenance["scheduler"] == "DDIMScheduler" and provenance["seed"] == 7 and provenance["num_images"] == 6
    assert provenance["weights"] == [0.3, 0.7] and provenance["random_weights"] is True
    assert provenance["num_inference_steps"] == 2 and provenance["guidance_scale"] == 3.0
    assert card.data.license == "other" and card.data.size_categories == ["n<1K"] and card.data.source_datasets is None
    assert card.data.configs[0]["data_files"][0] == {"split": "train", "path": "data/*.parquet"}
    for text in ("`w ~ U(0.3, 0.7)` for the first source, `1 - w` for the second", "| Seed | 7:",
                 "| Denoising steps | 2 |", "| Guidance scale | 3.0 |", "20 images", 'load_dataset("me/digit-mixes"',
                 "## License"):  # fmt: skip
        assert text in card.text, text

    # the pushed files are a loadable synthetic set
    copy = tmp_path / "downloaded"
    for name, data in uploaded.items():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(data)
    assert sorted(load_image_dataset(str(copy))["index"]) == list(range(6))


def test_a_hub_source_is_named_as_is_and_an_incomplete_set_is_not_pushed(tmp_path, fake_hub):
    folder = tmp_path / "set"
    (folder / "data").mkdir(parents=True)
    config = SynthesisSettings(
        source_dataset="uoft-cs/cifar10", pipeline=str(tmp_path / "models" / "image-mixer"), num_images=3, shard_size=2
    ).to_dict()
    (folder / "synthesis_config.json").write_text(json.dumps({**config, "num_source_images": 50000}))
    card = synthesis_card(str(folder), "me/cifar-mixes")
    assert (
        card.data.source_datasets == ["uoft-cs/cifar10"]
        and card.data.hf_distill["synthesis"]["pipeline"] == "image-mixer"
    )
    assert str(tmp_path) not in str(card) and "fixed: 1.0 for the first source, 1.0 for the second" in card.text
    write_dataset_card(str(folder), "me/cifar-mixes")
    with pytest.raises(ValueError, match="incomplete.*run the same recipes/synthesize.py command"):
        push_synthetic_dataset(str(folder), "me/cifar-mixes")
    assert fake_hub.requests == []  # refused before any network call
