"""Model card, plots and Hub upload of a distilled student (`hf_distill.hub`), offline.

The push tests run `push_to_hub` for real against the fake Hub of `tests/fake_hub.py` served on 127.0.0.1 (regular
and LFS uploads) and check the bytes it got.
"""

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import EvalResult, HfApi, ModelCard, metadata_load
from PIL import Image

from hf_distill.hub import (
    CARD_END_MARKER,
    CARD_START_MARKER,
    PAPERS,
    UPLOAD_PATTERNS,
    create_or_update_model_card,
    plot_eval_comparison,
    plot_training_curves,
    push_to_hub,
    upload_file_list,
    validate_card_metadata,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEACHERS = [
    {"name": "vit-p4", "source": "/models/vit-p4", "summary": "cls", "grid_alignment": "resize"},
    {
        "name": "dinov2-small",
        "source": "facebook/dinov2-small",
        "revision": "ed25f3a",
        "summary": "pooler",
        "grid_alignment": "interpolate",
    },
]
SETTINGS = {
    "student architecture": "ViT /8, hidden 32, 2 blocks",
    "image size": 32,
    "steps": 50,
    "batch size": 16,
    "teacher dropping p": 0.5,
    "ladder": True,
    "standardization": "unic",
    "learning rate": 1e-3,
}


def knn(value, k=20, split="test"):
    return EvalResult(
        task_type="image-classification",
        task_name="k-NN classification",
        dataset_type="zalando-datasets/fashion_mnist",
        dataset_name="Fashion-MNIST",
        dataset_split=split,
        metric_type="accuracy",
        metric_name=f"k-NN@{k} accuracy",
        metric_value=value,
    )


def linear(value):
    return EvalResult(
        task_type="image-classification",
        task_name="Linear probe",
        dataset_type="uoft-cs/cifar10",
        dataset_name="CIFAR-10",
        dataset_split="test",
        metric_type="accuracy",
        metric_name="top-1 accuracy",
        metric_value=value,
    )


def results_by_key(card):
    return {(r.task_name, r.dataset_name, r.metric_name): r.metric_value for r in card.data.eval_results}


def render(output_dir, eval_results, **kwargs):
    kwargs = {
        "model_name": "unic-tiny",
        "teachers": TEACHERS,
        "training_data": "ylecun/mnist",
        "settings": SETTINGS,
        "eval_results": eval_results,
        "repo_id": "me/unic-tiny",
        **kwargs,
    }
    return create_or_update_model_card(output_dir, **kwargs)


def test_model_card_renders_and_parses_back(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))
    returned = render(
        tmp_path,
        [knn(0.8125), linear(0.5)],
        comparison=[
            {
                "task": "k-NN classification",
                "dataset": "Fashion-MNIST",
                "metric": "k-NN@20 accuracy",
                "teachers": {"vit-p4": 0.75, "dinov2-small": 0.875},
            }
        ],
        plots=["plots/teacher_losses.png", str(tmp_path / "plots" / "eval_comparison.png")],
    )
    path = tmp_path / "README.md"
    assert path.is_file() and not list(tmp_path.glob(".README.md.*"))  # no temp file left

    card = ModelCard.load(path)
    assert card.data.eval_results == returned.data.eval_results == [knn(0.8125), linear(0.5)]
    assert validate_card_metadata(path) == [knn(0.8125), linear(0.5)]
    assert results_by_key(card) == {
        ("k-NN classification", "Fashion-MNIST", "k-NN@20 accuracy"): 0.8125,
        ("Linear probe", "CIFAR-10", "top-1 accuracy"): 0.5,
    }
    assert card.data.model_name == "unic-tiny"
    metadata = metadata_load(path)
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"hf_distill", "unic", "distillation"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["ylecun/mnist"]
    index = metadata["model-index"][0]
    assert index["name"] == "unic-tiny"
    knn_result = next(r for r in index["results"] if r["dataset"]["name"] == "Fashion-MNIST")
    assert knn_result["task"]["type"] == "image-classification" and knn_result["dataset"]["split"] == "test"
    assert knn_result["metrics"] == [{"type": "accuracy", "value": 0.8125, "name": "k-NN@20 accuracy"}]

    text = card.text
    assert text.count(CARD_START_MARKER) == 1 and text.count(CARD_END_MARKER) == 1
    assert "# unic-tiny" in text
    assert 'AutoModel.from_pretrained("me/unic-tiny")' in text
    assert 'AutoImageProcessor.from_pretrained("me/unic-tiny")' in text and "last_hidden_state[:, 0]" in text
    assert "`ViTModel`" in text
    for row in (
        "| vit-p4 | vit-p4 | - | cls | resize |",  # a local path is published as its folder name
        "| dinov2-small | [facebook/dinov2-small](https://huggingface.co/facebook/dinov2-small) | ed25f3a | pooler "
        "| interpolate |",
        "| teacher dropping p | 0.5 |",
        "| learning rate | 0.001 |",
        "| Task | Dataset | Metric | Student | vit-p4 | dinov2-small |",
        "| k-NN classification | Fashion-MNIST (test) | k-NN@20 accuracy | 0.8125 | 0.75 | 0.875 |",
        "| Linear probe | CIFAR-10 (test) | top-1 accuracy | 0.5 | - | - |",
    ):
        assert row in text
    assert "![teacher losses](plots/teacher_losses.png)" in text
    assert "![eval comparison](plots/eval_comparison.png)" in text
    assert "[`ylecun/mnist`](https://huggingface.co/datasets/ylecun/mnist)" in text
    for package in ("hf_distill", "transformers", "torch", "accelerate", "datasets"):
        assert f"- {package}: " in text
    assert f"- huggingface_hub: {huggingface_hub.__version__}" not in text  # only the listed frameworks
    assert "@inproceedings{sariyildiz2024unic," in text
    assert "title={{UNIC}: Universal Classification Models via Multi-teacher Distillation}" in text
    assert "booktitle={European Conference on Computer Vision (ECCV)}" in text


def test_model_card_local_training_data_and_no_results(tmp_path):
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    card = render(tmp_path / "out", None, training_data=str(data_dir), repo_id=None, tags=["vit"], base_model=None)
    metadata = metadata_load(tmp_path / "out" / "README.md")
    assert "datasets" not in metadata and "model-index" not in metadata
    assert metadata["tags"] == ["hf_distill", "unic", "distillation", "vit"]
    assert "No evaluation results reported yet." in card.text
    assert 'AutoModel.from_pretrained("out")' in card.text  # the folder's name, not its local path
    assert str(tmp_path) not in (tmp_path / "out" / "README.md").read_text()


def test_model_card_update_keeps_human_text_and_merges_results(tmp_path):
    render(tmp_path, [knn(0.5), linear(0.6)])
    path = tmp_path / "README.md"
    original = path.read_text()
    front, body = original.split(CARD_START_MARKER)
    edited = (
        front.replace("library_name: transformers", "license: apache-2.0\nlibrary_name: transformers")
        + "## Notes by a person\n\nThis paragraph was written by hand.\n\n"
        + CARD_START_MARKER
        + body
        + "\n## Limitations\n\nHand-written limitations.\n"
    )
    path.write_text(edited)

    card = render(tmp_path, [knn(0.7), knn(0.65, k=10)], tags=["vit"])
    text = path.read_text()
    assert text == str(card)
    assert text.count(CARD_START_MARKER) == 1 and text.count(CARD_END_MARKER) == 1
    assert text.index("This paragraph was written by hand.") < text.index(CARD_START_MARKER)
    assert text.index(CARD_END_MARKER) < text.index("Hand-written limitations.")

    reloaded = ModelCard.load(path)
    validate_card_metadata(path)
    assert results_by_key(reloaded) == {
        ("k-NN classification", "Fashion-MNIST", "k-NN@20 accuracy"): 0.7,  # replaced
        ("Linear probe", "CIFAR-10", "top-1 accuracy"): 0.6,  # kept
        ("k-NN classification", "Fashion-MNIST", "k-NN@10 accuracy"): 0.65,  # added
    }
    metadata = metadata_load(path)
    assert metadata["license"] == "apache-2.0"  # a key written by a person is kept
    assert metadata["tags"] == ["hf_distill", "unic", "distillation", "vit"]
    # The generated table is rebuilt from the merged results.
    assert "| k-NN classification | Fashion-MNIST (test) | k-NN@20 accuracy | 0.7 |" in text
    assert "| k-NN classification | Fashion-MNIST (test) | k-NN@10 accuracy | 0.65 |" in text
    assert "| Linear probe | CIFAR-10 (test) | top-1 accuracy | 0.6 |" in text
    assert "k-NN@20 accuracy | 0.5 |" not in text

    # A result on another split is another measurement: kept beside the test one.
    render(tmp_path, [knn(0.9, split="validation")])
    assert len(ModelCard.load(path).data.eval_results) == 4


def test_model_card_appends_block_to_card_without_markers(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nlicense: mit\ntags:\n- custom\n---\n\n# My student\n\nWritten before hf_distill.\n")
    render(tmp_path, [knn(0.5)])
    text = path.read_text()
    assert text.index("Written before hf_distill.") < text.index(CARD_START_MARKER)
    assert text.count(CARD_START_MARKER) == 1
    metadata = metadata_load(path)
    assert metadata["license"] == "mit"
    assert metadata["tags"][0] == "custom" and "unic" in metadata["tags"]
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    render(tmp_path, [knn(0.6)])  # the second update replaces the appended block
    text = path.read_text()
    assert text.count(CARD_START_MARKER) == 1 and text.count("Written before hf_distill.") == 1


def test_model_card_method_picks_tag_summary_and_citation_and_updates_keep_it(tmp_path):
    """The card's method (not UNIC by default) gives its tag, its summary and its citation, and an update that only
    knows the evaluation (as `recipes/evaluate.py` makes) keeps them."""
    udon = tmp_path / "udon"
    create_or_update_model_card(udon, model_name="udon-tiny", method="udon", summary="A UDON student.")
    create_or_update_model_card(udon, eval_results=[knn(0.5)])
    text = (udon / "README.md").read_text()
    assert "A UDON student." in text
    assert "@inproceedings{ypsilantis2024udon," in text and "sariyildiz2024unic" not in text
    tags = metadata_load(udon / "README.md")["tags"]
    assert "udon" in tags and "unic" not in tags

    task = tmp_path / "task"
    teachers = [{"name": "dinov2-small", "source": "facebook/dinov2-small"}]
    create_or_update_model_card(task, model_name="kd-tiny", teachers=teachers, method="task")
    text = (task / "README.md").read_text()
    assert "An image classifier distilled with hf_distill's implementation of task-specific distillation" in text
    assert "from 1 teacher: dinov2-small." in text
    assert "@article{marrie2024taskspecific," in text and "sariyildiz2024unic" not in text
    assert metadata_load(task / "README.md")["tags"] == ["hf_distill", "task-specific-distillation", "distillation"]


def cites(card_text: str, paper: dict) -> bool:
    """Whether a card names `paper` (title, authors, venue) and holds its BibTeX entry."""
    return f"{paper['title']} ({paper['authors']}, {paper['venue']})" in card_text and paper["citation"] in card_text


def new_paper(name: str) -> dict:
    """The paper of a method the card does not know (as a new trainer's `_paper` would declare it)."""
    return {
        "title": f"{name}: a new method",
        "authors": "Doe, Roe",
        "venue": "arXiv 2026",
        "citation": f"@misc{{{name}}}",
    }


@pytest.mark.parametrize("method", ["unic", "udon", "task"])
def test_each_trainer_declares_the_paper_its_method_card_cites(method, tmp_path):
    from hf_distill.trainers import KDTrainer, UdonTrainer, UnicTrainer

    trainer = {"unic": UnicTrainer, "udon": UdonTrainer, "task": KDTrainer}[method]
    create_or_update_model_card(tmp_path, model_name="m", method=method)  # an update that names no paper
    assert trainer._paper is PAPERS[method] and cites((tmp_path / "README.md").read_text(), trainer._paper)


def test_the_card_cites_the_paper_it_is_given_and_updates_keep_it(tmp_path):
    """A trainer's `_paper` (here of a method the card does not know) is named and cited, and an update that only
    knows the evaluation (as `recipes/evaluate.py` makes) keeps it."""
    paper = new_paper("newkd")
    create_or_update_model_card(tmp_path, model_name="new", method="task", paper=paper)
    create_or_update_model_card(tmp_path, eval_results=[knn(0.5)])
    text = (tmp_path / "README.md").read_text()
    assert cites(text, paper) and "marrie2024taskspecific" not in text
    assert metadata_load(tmp_path / "README.md")["hf_distill"]["paper"] == paper


def synthetic_log_history(steps=10, teachers=("vit-p4", "dinov2-p7")):
    history = []
    for step in range(1, steps + 1):
        entry = {"loss": 1.0 / step, "learning_rate": 1e-3, "epoch": step / 4, "step": step}
        for i, teacher in enumerate(teachers):
            entry[f"{teacher}/cls_loss"] = 1.0 / step + 0.1 * i
            entry[f"{teacher}/patch_loss"] = 0.8 / step + 0.1 * i
            entry[f"{teacher}/kept"] = 0.5 + 0.04 * step * (-1) ** i / 2
        history.append(entry)
    history.append({"train_runtime": 12.0, "train_loss": 0.3, "epoch": 2.5, "step": steps})
    return history


def assert_png(path, min_width=400, min_height=200):
    path = Path(path)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert min_width <= width <= 4000 and min_height <= height <= 3000


def test_plot_training_curves(tmp_path):
    output = tmp_path / "plots" / "teacher_losses.png"
    assert plot_training_curves(synthetic_log_history(), output) == str(output)
    assert_png(output, min_width=800)

    no_teachers = [{"loss": 0.5, "step": 1}, {"eval_loss": 0.4, "step": 1}, {"train_runtime": 1.0}]
    assert plot_training_curves(no_teachers, tmp_path / "none.png") is None
    assert plot_training_curves([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_plot_eval_comparison(tmp_path):
    results = {
        "unic-tiny": {"Fashion-MNIST k-NN@20": 0.81, "CIFAR-10 linear": 0.55},
        "vit-p4": {"Fashion-MNIST k-NN@20": 0.79, "CIFAR-10 linear": 0.6},
        "dinov2-p7": {"Fashion-MNIST k-NN@20": 0.84},  # no bar for the missing metric
    }
    output = tmp_path / "plots" / "eval_comparison.png"
    assert plot_eval_comparison(results, output, title="Student vs teachers") == str(output)
    assert_png(output)
    with pytest.raises(ValueError):
        plot_eval_comparison({}, tmp_path / "empty.png")


def write_export(folder: Path) -> dict[str, bytes]:
    """An export folder as the UNIC recipe leaves it, a model card and plots; returns the files a push must send."""
    files = {
        "config.json": json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}).encode(),
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)),
        "preprocessor_config.json": b'{"image_processor_type": "ViTImageProcessor"}',
        "README.md": b"---\nlibrary_name: transformers\ntags:\n- unic\n---\n\n# unic-tiny\n",
        "eval_results.json": b'{"knn": 0.8}',
        "plots/a.png": PNG_SIGNATURE + b"not really a png",
    }
    leftovers = {
        "checkpoint-1/model.safetensors": b"old weights",
        "checkpoint-1/optimizer.pt": b"optimizer",
        "checkpoint-1/trainer_state.json": b"{}",
        "trainer_state.json": b'{"log_history": []}',
        "training_args.bin": b"args",
        "optimizer.pt": b"optimizer",
        "scheduler.pt": b"scheduler",
        "train_results.json": b"{}",
        "all_results.json": b"{}",
        "plots/notes.txt": b"not a png",
        "runs/events.out.tfevents": b"tensorboard",
    }
    for name, data in {**files, **leftovers}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def test_upload_file_list(tmp_path):
    expected = write_export(tmp_path)
    assert upload_file_list(tmp_path) == sorted(expected)
    assert "plots/*.png" in UPLOAD_PATTERNS and "README.md" in UPLOAD_PATTERNS


def test_upload_file_list_sharded_weights(tmp_path):
    write_export(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for shard in shards:
        (tmp_path / shard).write_bytes(b"shard")
    (tmp_path / "model-stale.safetensors").write_bytes(b"not in the index")
    index = {"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1], "c.weight": shards[1]}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = upload_file_list(tmp_path)
    assert {*shards, "model.safetensors.index.json"} <= set(files)
    assert "model-stale.safetensors" not in files and "model.safetensors" not in files


@pytest.mark.timeout(60)
def test_push_to_hub_uploads_exactly_the_model_files(tmp_path, fake_hub):
    expected = write_export(tmp_path)
    url = push_to_hub(tmp_path, "me/unic-tiny", token="hf_dummy_token", commit_message="Add student")
    hub = fake_hub
    assert not hub.unknown, f"requests the fake hub does not implement: {hub.unknown}"
    assert hub.created == [{"name": "unic-tiny", "organization": "me", "type": "model"}]
    assert hub.authorizations() == {"Bearer hf_dummy_token"}
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["revision"] == "main" and commit["header"]["value"]["summary"] == "Add student"
    assert hub.files == {"me/unic-tiny": expected}  # exactly these paths, with these bytes
    assert url == f"{hub.endpoint}/me/unic-tiny/commit/{1:040x}"
    # the weights went through the LFS path (batch, PUT, verify, lfsFile pointer), the small text files inline
    assert hub.uploaded["model.safetensors"] == "lfs" and hub.uploaded["config.json"] == "regular"
    assert hub.verified == [hashlib.sha256(expected["model.safetensors"]).hexdigest()]
    assert b"hf_dummy_token" not in hub.all_bytes()


@pytest.mark.timeout(60)
def test_fake_hub_lfs_path_for_large_files(tmp_path, fake_hub):
    """Above the size threshold every file is LFS, text files included: the bytes that arrive are the file's."""
    expected = write_export(tmp_path)
    fake_hub.lfs_threshold = 16
    push_to_hub(tmp_path, "me/unic-tiny", token="hf_dummy_token", revision="v1")
    assert fake_hub.files == {"me/unic-tiny": expected}
    large = {path for path, data in expected.items() if len(data) >= 16}
    assert {path for path, mode in fake_hub.uploaded.items() if mode == "lfs"} == large
    assert fake_hub.branches == [("me/unic-tiny", "v1")] and fake_hub.commits[0]["revision"] == "v1"
    assert sorted(fake_hub.verified) == sorted({hashlib.sha256(expected[path]).hexdigest() for path in large})


def test_push_to_hub_commits_one_operation_per_listed_file(tmp_path, monkeypatch):
    expected = write_export(tmp_path)
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    class Commit:
        commit_url = "https://hub.invalid/me/unic-tiny/commit/0"

    monkeypatch.setattr(HfApi, "create_commit", lambda self, **kw: calls.setdefault("commit", kw) and Commit())
    assert push_to_hub(tmp_path, "me/unic-tiny", private=True) == Commit.commit_url
    assert calls["create"] == (
        "me/unic-tiny",
        {"exist_ok": True, "private": True, "token": None, "repo_type": "model"},
    )
    operations = calls["commit"]["operations"]
    assert [op.path_in_repo for op in operations] == sorted(expected)
    assert [Path(op.path_or_fileobj) for op in operations] == [tmp_path / name for name in sorted(expected)]
    assert calls["commit"]["repo_id"] == "me/unic-tiny"


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json", "README.md"])
def test_push_to_hub_rejects_incomplete_folder_before_any_request(tmp_path, monkeypatch, missing):
    write_export(tmp_path)
    (tmp_path / missing).unlink()

    def no_network(*args, **kwargs):
        raise AssertionError("push_to_hub reached the network")

    monkeypatch.setattr(HfApi, "create_repo", no_network)
    monkeypatch.setattr(HfApi, "create_commit", no_network)
    with pytest.raises(ValueError, match=missing.split(".")[0]):
        push_to_hub(tmp_path, "me/unic-tiny", token="hf_dummy_token")
    with pytest.raises(ValueError, match="not a folder"):
        push_to_hub(tmp_path / "does-not-exist", "me/unic-tiny")
