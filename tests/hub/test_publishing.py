"""Publishing that is right for every method, and safe: per-protocol model-index tasks that round-trip, results tied
to the weights they were measured on, no local path or token in anything published, no symbolic link followed, and
every recipe's `--push_to_hub` end to end against the fake Hub of `tests/fake_hub.py` (regular and LFS uploads)."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard, metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index
from safetensors.torch import save_file

from hf_distill.hub import (
    create_or_update_model_card,
    publishable_name,
    push_to_hub,
    scrub_local_paths,
    upload_file_list,
    validate_card_metadata,
    weight_files_sha256,
)

from ..recipes.test_task_distill import task  # noqa: F401  (fixture)
from ..recipes.test_udon import two_domains  # noqa: F401  (fixture)
from .test_hub import PNG_SIGNATURE, write_export

TOKEN = "hf_publishingTestToken0123456789"


def knn(value, k):
    return EvalResult(
        task_type="image-classification",
        task_name=f"k-NN classification (k={k})",
        dataset_type="uoft-cs/cifar10",
        dataset_name="cifar10",
        dataset_split="test",
        metric_type="accuracy",
        metric_name=f"k-NN top-1 (k={k})",
        metric_value=value,
    )


def linear(value):
    return EvalResult(
        task_type="image-classification",
        task_name="Linear probe",
        dataset_type="uoft-cs/cifar10",
        dataset_name="cifar10",
        dataset_split="test",
        metric_type="accuracy",
        metric_name="Linear probe top-1",
        metric_value=value,
    )


def write_weights(folder: Path, value: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4,), value)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))


def table_rows(text: str) -> list[list[str]]:
    lines = text[text.index("## Evaluation results") :].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]


# ----------------------------------------------------------------------------------------------- model-index


def test_each_protocol_is_its_own_model_index_task_and_round_trips(tmp_path):
    written = [knn(81.25, 10), knn(80.5, 20), linear(88.0)]
    # huggingface_hub's own writer merges the three: same task type, dataset and split
    assert len(eval_results_to_model_index("m", written)[0]["results"]) == 1

    create_or_update_model_card(tmp_path, model_name="m", eval_results=written)
    path = tmp_path / "README.md"
    assert ModelCard.load(path).data.eval_results == written  # exactly, task names included
    assert validate_card_metadata(path) == written
    entries = metadata_load(path)["model-index"][0]["results"]
    assert [(e["task"]["name"], [m["name"] for m in e["metrics"]]) for e in entries] == [
        ("k-NN classification (k=10)", ["k-NN top-1 (k=10)"]),
        ("k-NN classification (k=20)", ["k-NN top-1 (k=20)"]),
        ("Linear probe", ["Linear probe top-1"]),
    ]

    # A rewrite (e.g. the card of a resumed run, which passes no results) keeps every result under its own task, and
    # the comparison rows still meet their results: no row of "-" cells.
    comparison = [
        {"task": "Linear probe", "dataset": "cifar10 (test)", "metric": "Linear probe top-1", "teachers": {"t": 90.0}}
    ]
    create_or_update_model_card(tmp_path, eval_results=[knn(82.0, 10)], comparison=comparison)
    create_or_update_model_card(tmp_path, settings={"steps": 12})
    card = ModelCard.load(path)
    assert card.data.eval_results == [knn(82.0, 10), knn(80.5, 20), linear(88.0)]
    rows = table_rows(card.text)
    assert rows == [
        ["k-NN classification (k=10)", "cifar10 (test)", "k-NN top-1 (k=10)", "82.00", "-"],
        ["k-NN classification (k=20)", "cifar10 (test)", "k-NN top-1 (k=20)", "80.50", "-"],
        ["Linear probe", "cifar10 (test)", "Linear probe top-1", "88.00", "90.00"],
    ]
    validate_card_metadata(path)


def test_results_are_tied_to_the_weights_they_were_measured_on(tmp_path, caplog):
    write_weights(tmp_path, 1.0)
    first = weight_files_sha256(tmp_path)
    (tmp_path / "plots").mkdir()
    for name in ("teacher_losses.png", "eval_comparison.png"):
        (tmp_path / "plots" / name).write_bytes(PNG_SIGNATURE + b"plot")
    create_or_update_model_card(tmp_path, model_name="m", plots=["plots/teacher_losses.png"])
    comparison = [{"task": "Linear probe", "dataset": "cifar10", "metric": "Linear probe top-1", "teachers": {"t": 9}}]
    create_or_update_model_card(
        tmp_path,
        eval_results=[linear(88.0)],
        comparison=comparison,
        plots=["plots/eval_comparison.png"],
        measured_on=first,
    )
    (tmp_path / "eval_results.json").write_text(json.dumps({"linear": 88.0, "weights": first}))
    assert metadata_load(tmp_path / "README.md")["hf_distill"]["weights"] == first
    assert "eval_results.json" in upload_file_list(tmp_path)
    assert "plots/eval_comparison.png" in upload_file_list(tmp_path)

    with pytest.raises(ValueError, match="measured on weights"):
        create_or_update_model_card(tmp_path, eval_results=[linear(1.0)], measured_on="sha256:" + "0" * 64)

    write_weights(tmp_path, 2.0)  # a resumed run exported new weights over the folder
    create_or_update_model_card(tmp_path, settings={"steps": 20})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and "model-index" not in metadata_load(tmp_path / "README.md")
    assert "No evaluation results reported yet." in card.text and "eval comparison" not in card.text
    assert "teacher losses" in card.text
    assert "measured" in caplog.text
    assert card.data.hf_distill["weights"] == weight_files_sha256(tmp_path) != first
    files = upload_file_list(tmp_path)
    assert "eval_results.json" not in files and "plots/eval_comparison.png" not in files
    assert "plots/teacher_losses.png" in files
    validate_card_metadata(tmp_path / "README.md")


# ------------------------------------------------------------------------------------------------ local paths


def test_publishable_names(tmp_path):
    folder = tmp_path / "teachers" / "vit-p4"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert publishable_name(str(folder)) == "vit-p4"
    assert publishable_name(str(folder / "config.json")) == "vit-p4"
    assert publishable_name(f"{folder}/") == "vit-p4"
    assert publishable_name("/data/private/cifar10") == "cifar10"  # absolute, even when it does not exist here
    assert publishable_name("~/datasets/mnist") == "mnist"
    assert publishable_name("facebook/dinov2-small") == "facebook/dinov2-small"
    assert (
        publishable_name("py:demo.teachers:efficientnet_lite0_teacher")
        == "py:demo.teachers:efficientnet_lite0_teacher"
    )
    assert publishable_name(str(folder), name="my-teacher") == "my-teacher"
    assert scrub_local_paths({"a": [str(folder), "text with /slash"], "b": 3}) == {
        "a": ["vit-p4", "text with /slash"],
        "b": 3,
    }


# ----------------------------------------------------------------------------------------------- safe uploads


@pytest.mark.timeout(60)
def test_push_never_follows_symbolic_links(tmp_path, fake_hub):
    export = tmp_path / "export"
    export.mkdir()
    expected = write_export(export)
    secret = tmp_path / "private" / "id_ed25519"
    secret.parent.mkdir()
    secret.write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (export / "plots" / "key.png").symlink_to(secret)  # outside the folder
    (export / "plots" / "alias.png").symlink_to(export / "plots" / "a.png")  # inside, but a link all the same
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(PNG_SIGNATURE + b"outside")
    (export / "plots" / "linked-dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (export / "eval_results.json").unlink()
    (export / "eval_results.json").symlink_to(secret)
    expected.pop("eval_results.json")

    assert upload_file_list(export) == sorted(expected)
    push_to_hub(export, "me/unic-tiny", token=TOKEN)
    assert fake_hub.files == {"me/unic-tiny": expected}
    assert b"PRIVATE KEY" not in fake_hub.all_bytes() and b"outside" not in fake_hub.all_bytes()

    (export / "README.md").rename(tmp_path / "README.md")
    (export / "README.md").symlink_to(tmp_path / "README.md")
    with pytest.raises(ValueError, match="README.md"):
        push_to_hub(export, "me/unic-tiny", token=TOKEN)


def test_push_refuses_a_file_holding_the_token(tmp_path, fake_hub):
    write_export(tmp_path)
    (tmp_path / "eval_results.json").write_text(json.dumps({"args": {"hub_token": TOKEN}}))
    with pytest.raises(ValueError, match="eval_results.json contains the Hub token"):
        push_to_hub(tmp_path, "me/unic-tiny", token=TOKEN)
    assert fake_hub.requests == []


@pytest.mark.parametrize("config_class", ["UnicConfig", "UdonConfig", "KDConfig"])
def test_training_arguments_never_pickle_the_token_and_never_let_the_trainer_push(config_class, tmp_path):
    import io

    from hf_distill import trainers
    from hf_distill.hub import take_hub_options

    args = getattr(trainers, config_class)(output_dir=str(tmp_path), hub_token=TOKEN, report_to="none")
    buffer = io.BytesIO()
    torch.save(args, buffer)  # what Trainer writes as training_args.bin
    assert TOKEN.encode() not in buffer.getvalue() and args.hub_token == TOKEN
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).hub_token is None

    args.push_to_hub = True
    with pytest.raises(ValueError, match="--hub_model_id"):
        take_hub_options(args)
    args.push_to_hub, args.hub_model_id, args.hub_revision = True, "me/x", "dev"
    options = take_hub_options(args)
    assert (options.repo_id, options.token, options.revision) == ("me/x", TOKEN, "dev")
    assert args.push_to_hub is False and args.hub_token is None


# ---------------------------------------------------------------------------------------------- code teachers


def test_code_teachers_from_a_yaml_need_the_command_line_flag(tmp_path, student_config_dir, image_dataset_dir):
    from ..recipes.test_unic import recipe

    config = tmp_path / "shared.yaml"
    config.write_text(yaml.safe_dump({"teachers": ["py:no_such_module_anywhere:build"], "max_steps": 1}))
    base = ["--config", str(config), "--student_config", student_config_dir, "--train_data", image_dataset_dir]
    with pytest.raises(ValueError, match="imports and runs Python code.*--allow_code_teachers"):
        recipe.parse_args(base)
    _, training_args = recipe.parse_args([*base, "--allow_code_teachers"])  # nothing is imported while parsing
    assert training_args.teachers == ["py:no_such_module_anywhere:build"]
    typed = recipe.parse_args([*base, "--teachers", "py:no_such_module_anywhere:build"])  # typed: explicit
    assert typed[1].teachers == ["py:no_such_module_anywhere:build"]

    config.write_text(yaml.safe_dump({"teachers": ["py:m:f"], "allow_code_teachers": True}))
    with pytest.raises(ValueError, match="cannot allow itself"):
        recipe.parse_args(base)


# ------------------------------------------------------------------------------------------ recipes end to end


def everything_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_published_safely(hub, repo_id: str, output_dir: Path, base_temp: Path, expected_files: list[str]):
    """The push sent exactly `expected_files` in one commit, weights through LFS; no token and no absolute local path
    in anything sent; the token in no file of the run (checkpoints' training_args.bin included); the card validates."""
    assert not [r for r in hub.unknown if r[0] != "GET"], hub.unknown
    assert len(hub.commits) == 1, [c["header"]["value"]["summary"] for c in hub.commits]  # no "Training in progress"
    uploaded = hub.files[repo_id]
    assert sorted(uploaded) == sorted(expected_files)
    for name, data in uploaded.items():
        assert data == (output_dir / name).read_bytes(), name
    assert hub.uploaded["model.safetensors"] == "lfs"
    sent = hub.all_bytes()
    assert TOKEN.encode() not in sent
    assert str(base_temp).encode() not in sent, "an absolute local path was published"
    assert hub.authorizations() == {f"Bearer {TOKEN}"}
    files = everything_in(output_dir)
    assert not [name for name, data in files.items() if TOKEN.encode() in data]
    assert sorted(output_dir.glob("checkpoint-*"))  # the run left checkpoints: none of them was pushed
    for path in output_dir.rglob("training_args.bin"):
        assert torch.load(path, weights_only=False).hub_token is None
    return validate_card_metadata(output_dir / "README.md")


@pytest.mark.timeout(180)
def test_udon_push_uploads_exactly_the_embedding_export_with_its_card(two_domains, tmp_path, fake_hub):  # noqa: F811
    from ..recipes.test_udon import recipe, recipe_args

    output_dir = tmp_path / "udon"
    push = ["--push_to_hub", "true", "--hub_model_id", "me/udon-tiny", "--hub_token", TOKEN]
    push += ["--hub_private_repo", "true", "--hub_revision", "dev"]
    _, results = recipe.main(recipe_args(two_domains, output_dir, *push))

    assert fake_hub.created == [{"name": "udon-tiny", "organization": "me", "visibility": "private", "type": "model"}]
    assert fake_hub.branches == [("me/udon-tiny", "dev")] and fake_hub.commits[0]["revision"] == "dev"
    card_results = assert_published_safely(
        fake_hub,
        "me/udon-tiny",
        output_dir,
        two_domains.parent,
        [
            "README.md", "config.json", "configuration_udon_embedding.py", "modeling_udon_embedding.py",
            "model.safetensors", "preprocessor_config.json", "eval_results.json",
            "plots/retrieval_per_domain.png", "plots/sampler.png",
        ],
    )  # fmt: skip
    config = json.loads(fake_hub.files["me/udon-tiny"]["config.json"])
    assert config["model_type"] == "hf_distill_udon_embedding" and set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
    }
    assert "_name_or_path" not in config and config["backbone_config"].get("_name_or_path", "") == ""
    # R@1 and mMP@5 of each domain and of the mean, as retrieval tasks, with the values the recipe computed
    values = {(r.dataset_name, r.metric_name): r.metric_value for r in card_results}
    expected = {(name, m): round(v[m], 2) for name, v in results["per_domain"].items() for m in ("R@1", "mMP@5")}
    expected.update({("Mean over 2 domains", m): round(results["mean"][m], 2) for m in ("R@1", "mMP@5")})
    assert values == expected
    assert {r.task_type for r in card_results} == {"image-retrieval"}
    assert {r.dataset_type for r in card_results if r.dataset_name in ("digits", "tinted")} == {"digits", "tinted"}
    card = ModelCard.load(output_dir / "README.md")
    assert "trust_remote_code=True" in card.text and "ypsilantis2024udon" in card.text
    assert "![retrieval per domain](plots/retrieval_per_domain.png)" in card.text
    assert "![sampler](plots/sampler.png)" in card.text
    published = json.loads(fake_hub.files["me/udon-tiny"]["eval_results.json"])
    assert published["weights"] == weight_files_sha256(output_dir)
    assert published["mean"] == results["mean"]


@pytest.mark.timeout(180)
def test_task_distill_push_uploads_exactly_the_classifier_with_its_card(task, tmp_path, fake_hub):  # noqa: F811
    from ..recipes.test_task_distill import args, recipe

    output_dir = tmp_path / "task"
    push = ["--push_to_hub", "true", "--hub_model_id", "me/task-tiny", "--hub_token", TOKEN, "--hub_revision", "v1"]
    _, results = recipe.main(args(task, output_dir, *push))

    assert (output_dir / "probe" / "features").is_dir()  # cached teacher features exist, and stay here
    assert fake_hub.commits[0]["revision"] == "v1"
    card_results = assert_published_safely(
        fake_hub,
        "me/task-tiny",
        output_dir,
        task.parent,
        [
            "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "eval_results.json",
            "plots/training_loss.png",
        ],
    )  # fmt: skip
    (result,) = card_results
    assert result.task_type == "image-classification" and result.dataset_type == "digits"
    assert result.dataset_split == "test" and result.metric_value == round(results["student_accuracy"], 2)
    card = ModelCard.load(output_dir / "README.md")
    assert 'pipeline("image-classification", model="me/task-tiny")' in card.text
    row = next(r for r in table_rows(card.text) if r[0] == result.task_name)
    assert row[3:] == [f"{results['student_accuracy']:.2f}", f"{results['teacher_probe_accuracy']:.2f}"]


@pytest.mark.timeout(240)
def test_unic_push_after_evaluation_publishes_the_evaluated_weights_only(
    tiny_teachers, image_dataset_dir, student_config_dir, mnist_splits_dir, tmp_path, fake_hub
):
    """Train with --push_to_hub, evaluate into the card, push again; then resume training for more steps: the new
    card drops the results of the old weights and the push leaves eval_results.json and the comparison plot out."""
    from ..recipes.test_evaluate import recipe as evaluate
    from ..recipes.test_unic import recipe, recipe_args

    output_dir = tmp_path / "student"
    push = ["--push_to_hub", "true", "--hub_model_id", "me/unic-tiny", "--hub_token", TOKEN]
    recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, *push))
    assert_published_safely(
        fake_hub,
        "me/unic-tiny",
        output_dir,
        Path(image_dataset_dir).parents[1],
        ["README.md", "config.json", "model.safetensors", "plots/teacher_losses.png", "preprocessor_config.json"],
    )
    assert torch.load(output_dir / "training_args.bin", weights_only=False).hub_token is None

    evaluate.main(
        [
            "--models", str(output_dir), "--model_names", "student",
            "--dataset", f"mnist={mnist_splits_dir}", "--knn_k", "10", "20",
            "--output_dir", str(tmp_path / "eval"), "--model_card_dir", str(output_dir),
        ]
    )  # fmt: skip
    push_to_hub(output_dir, "me/unic-tiny", token=TOKEN)
    uploaded = fake_hub.files["me/unic-tiny"]
    assert {"eval_results.json", "plots/eval_comparison.png"} <= set(uploaded)
    assert str(Path(image_dataset_dir).parents[1]).encode() not in fake_hub.all_bytes()
    results = validate_card_metadata(output_dir / "README.md")
    assert {r.task_name for r in results} == {
        "k-NN classification (k=10)",
        "k-NN classification (k=20)",
        "Linear probe",
    }
    assert all(row[3] != "-" for row in table_rows(ModelCard.load(output_dir / "README.md").text))

    # Resume for more steps (a manifest change, allowed explicitly): the export changes, the card rewrite drops the
    # old results.
    more_steps = ("--max_steps", "9", "--allow_config_change", "max_steps")
    recipe.main(recipe_args(tiny_teachers, image_dataset_dir, student_config_dir, output_dir, *more_steps, *push))
    assert ModelCard.load(output_dir / "README.md").data.eval_results is None
    files = upload_file_list(output_dir)
    assert "eval_results.json" not in files and "plots/eval_comparison.png" not in files
    assert os.path.exists(output_dir / "eval_results.json")  # left on disk, not published
