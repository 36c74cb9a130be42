"""recipes/task_distill.py end to end on tiny models and real MNIST digits: probe (cached), KD on real + synthetic
images, export as a stock transformers image classifier with its processor and card, resume, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from huggingface_hub import metadata_load
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTForImageClassification, ViTModel

from hf_distill import probing
from hf_distill.trainers import KDTrainer

from ..conftest import KillAt, load_recipe, mnist_images, save_with_processor, tiny_vit_config
from ..hub.test_hub import cites, new_paper

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("task_distill")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """MNIST digits (train 80 / test 40, ClassLabel), 24 synthetic blends of random pairs, a tiny ViT teacher with its
    processor, a tiny ViT student config."""
    root = tmp_path_factory.mktemp("task")
    images, labels = mnist_images(120)
    features = Features({"image": Image(), "label": ClassLabel(names=[f"digit{i}" for i in range(10)])})
    DatasetDict(
        {
            "train": Dataset.from_dict({"image": images[:80], "label": labels[:80]}, features=features),
            "test": Dataset.from_dict({"image": images[80:], "label": labels[80:]}, features=features),
        }
    ).save_to_disk(str(root / "digits"))
    rng = np.random.default_rng(0)
    blends = []
    for _ in range(24):
        a, b = rng.choice(80, size=2, replace=False)
        blends.append(Image().decode_example(Image().encode_example(
            (np.asarray(images[a], dtype=np.float32) * 0.5 + np.asarray(images[b], dtype=np.float32) * 0.5).astype(np.uint8)
        )))  # fmt: skip
    Dataset.from_dict({"image": blends}).save_to_disk(str(root / "synthetic"))
    torch.manual_seed(0)
    save_with_processor(ViTModel(tiny_vit_config()), root / "teacher", [0.5] * 3, [0.5] * 3, 32)
    tiny_vit_config().save_pretrained(root / "student")
    return root


def args(root, output_dir, *extra):
    return [
        "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--student_random_init",
        "--dataset", str(root / "digits"), "--eval_split", "test",
        "--synthetic_dataset", str(root / "synthetic"), "--synthetic_ratio", "0.25",
        "--image_size", "32", "--load_size", "36", "--image_mean", "0.5", "0.5", "0.5", "--image_std", "0.5", "0.5", "0.5",
        "--per_device_train_batch_size", "8", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--output_dir", str(output_dir), "--use_cpu", "--report_to", "none",
        "--disable_tqdm", "true", "--seed", "0",
        *extra,
    ]  # fmt: skip


def test_probe_distil_export_and_card(task, tmp_path, monkeypatch):
    seen = []
    compute_loss = KDTrainer.compute_loss

    def recording(self, model, inputs, *a, **k):
        seen.append(inputs["labels"].tolist())
        return compute_loss(self, model, inputs, *a, **k)

    monkeypatch.setattr(KDTrainer, "compute_loss", recording)
    monkeypatch.setattr(KDTrainer, "_paper", new_paper("kd-variant"))  # the card cites the trainer's paper
    monkeypatch.setattr(KDTrainer, "_tag_names", [*KDTrainer._tag_names, "kd-variant"])  # and carries its tags
    trainer, results = recipe.main(args(task, tmp_path / "out"))
    assert len(seen) == 6 and all(len(b) == 8 and sum(v == -100 for v in b) == 2 for b in seen)  # 2 synthetic rows
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 6 and all({"cross_entropy", "kl"} <= set(e) for e in logs)
    assert all(e["synthetic_fraction"] == 0.25 for e in logs)
    assert 0 <= results["student_accuracy"] <= 100 and 0 <= results["teacher_probe_accuracy"] <= 100
    assert results["num_synthetic"] == 24

    out = tmp_path / "out"
    model = AutoModelForImageClassification.from_pretrained(out).eval()  # stock transformers, no hf_distill
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label[3] == "digit3" and model.config.num_labels == 10
    images, labels = mnist_images(120)
    with torch.no_grad():
        logits = model(**processor(images=images[80:], return_tensors="pt")).logits
    accuracy = 100.0 * (logits.argmax(-1) == torch.tensor(labels[80:])).float().mean().item()
    assert accuracy == pytest.approx(results["student_accuracy"], abs=2.6)  # PIL vs tensor resize may flip one image
    saved = json.loads((out / "eval_results.json").read_text())
    assert saved["student_accuracy"] == results["student_accuracy"]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "task-specific-distillation" in card
    assert set(KDTrainer._tag_names) <= set(metadata_load(out / "README.md")["tags"])
    assert f"{results['student_accuracy']:.2f}".rstrip("0").rstrip(".") in card and cites(
        card, new_paper("kd-variant")
    )
    assert (out / "plots" / "training_loss.png").is_file()
    probe = json.loads((out / "probe" / "probe_results.json").read_text())
    assert probe["accuracy"] == results["teacher_probe_accuracy"]
    assert len(list((out / "probe" / "features").glob("*.safetensors"))) == 2  # train and eval features, cached


def test_probe_is_reused_and_killed_run_resumes_to_the_same_weights(task, tmp_path, monkeypatch, caplog):
    full, _ = recipe.main(args(task, tmp_path / "full"))
    with pytest.raises(KeyboardInterrupt):
        recipe.main(args(task, tmp_path / "killed"), callbacks=[KillAt(4)])

    def no_extraction(*a, **k):
        raise AssertionError("the teacher features were computed again")

    monkeypatch.setattr(probing, "extract_features", no_extraction)  # the probe fitting of the recipe
    with caplog.at_level("INFO"):
        resumed, results = recipe.main(args(task, tmp_path / "killed"))
    assert "Reusing the probe" in caplog.text and resumed.state.global_step == 6
    expected = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(again[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_cached_teacher_features_are_read_back_when_the_head_is_refitted(task, tmp_path, caplog):
    _, first = recipe.main(args(task, tmp_path / "a", "--max_steps", "1"))
    shutil.copytree(tmp_path / "a" / "probe" / "features", tmp_path / "b" / "probe" / "features")
    with caplog.at_level("INFO"):
        _, second = recipe.main(args(task, tmp_path / "b", "--max_steps", "1"))
    assert caplog.text.count("Reading cached features") == 2 and "Reusing the probe" not in caplog.text
    assert second["teacher_probe_accuracy"] == first["teacher_probe_accuracy"]


def test_alpha_zero_is_plain_supervised_training_and_without_synthetic_data(task, tmp_path):
    trainer, results = recipe.main(
        args(task, tmp_path / "ce", "--alpha", "0", "--synthetic_ratio", "0", "--max_steps", "2")
    )
    assert results["num_synthetic"] == 0 and results["alpha"] == 0
    assert all(e["synthetic_fraction"] == 0 for e in trainer.state.log_history if "loss" in e)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(e["loss"] == pytest.approx(e["cross_entropy"], rel=1e-4) and e["kl"] == 0 for e in logs)


def test_gradient_accumulation_divides_the_loss_and_draws_new_augmentations_per_micro_batch(task, tmp_path):
    trainer, _ = recipe.main(
        args(
            task, tmp_path / "ga", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--max_steps", "2", "--color_jitter_prob", "0.5", "--grayscale_prob", "0.5", "--alpha", "0.3",
        )
    )  # fmt: skip
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2
    for entry in logs:  # the logged loss is the mean over the micro-batches, not their sum
        expected = 0.7 * entry["cross_entropy"] + 0.3 * 2.0**2 * entry["kl"]
        assert entry["loss"] == pytest.approx(expected, rel=1e-4)
    pixels = torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8)
    device = trainer.args.device
    first = trainer.make_views(pixels, True, trainer.step_generator(device))
    second = trainer.make_views(pixels, True, trainer.step_generator(device))
    assert not torch.equal(first, second)  # two micro-batches of one step
    trainer._rng_position = (-1, 0)  # as after a restart at this step
    torch.testing.assert_close(trainer.make_views(pixels, True, trainer.step_generator(device)), first)


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--alpha", "1.5"], ValueError, "alpha must be in"),
        (["--temperature", "0"], ValueError, "temperature must be > 0"),
        (["--synthetic_ratio", "1.0"], ValueError, r"synthetic_ratio must be in \[0, 1\)"),
        (["--grayscale_prob", "2"], ValueError, r"grayscale_prob must be in \[0, 1\]"),
        (["--label_column", "category"], ValueError, "no label column 'category'"),
        (["--eval_split", "validation"], ValueError, "no split 'validation'"),
    ],
)
def test_bad_input_fails_before_any_work(task, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        recipe.main(args(task, tmp_path / "bad", *extra))
    assert not (tmp_path / "bad" / "probe").exists()


def test_a_pretrained_student_at_the_wrong_image_size_fails_before_the_probe(task, tmp_path):
    ViTForImageClassification(tiny_vit_config(num_labels=10)).save_pretrained(tmp_path / "pretrained")
    argv = args(task, tmp_path / "bad", "--image_size", "16", "--load_size", "18")
    argv[argv.index("--student") + 1] = str(tmp_path / "pretrained")
    argv.remove("--student_random_init")
    with pytest.raises(ValueError, match="cannot classify 16 px images .*pass --image_size 32"):
        recipe.main(argv)
    assert not (tmp_path / "bad" / "probe").exists()


def test_synthetic_ratio_without_synthetic_dataset_is_rejected(task, tmp_path):
    argv = [a for a in args(task, tmp_path / "bad") if a != str(task / "synthetic") and a != "--synthetic_dataset"]
    with pytest.raises(ValueError, match="needs --synthetic_dataset"):
        recipe.parse_args(argv)


def test_the_fashion_mnist_config_parses():
    script_args, training_args = recipe.parse_args(
        ["--config", str(ROOT / "recipes" / "configs" / "task_distill_fashion_mnist.yaml")]
    )
    assert script_args.teacher_image_size == 98 and script_args.student_random_init
    assert (training_args.alpha, training_args.temperature, training_args.image_size) == (0.5, 2.0, 28)


def test_the_hub_config_parses():
    script_args, training_args = recipe.parse_args(
        [
            "--config",
            str(ROOT / "recipes" / "configs" / "task_distill_dinov2_base_deit_tiny_cifar10.yaml"),
            "--bf16",
            "false",
        ]
    )  # bf16 is for GPUs: TrainingArguments rejects it on this CPU
    assert (script_args.teacher, script_args.image_column) == ("facebook/dinov2-base", "img")
    assert not script_args.student_random_init and training_args.image_size == 224


@pytest.mark.distributed
def test_two_processes_read_disjoint_mixed_batches_and_end_identical(task, tmp_path):
    """DDP on 2 CPU processes: every batch of every process keeps the real / synthetic ratio, the processes read
    different real images, and both end with the same student."""
    import os
    import subprocess
    import sys

    record_dir = tmp_path / "records"
    record_dir.mkdir()
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29535",
        str(ROOT / "tests" / "scripts" / "record_ranks.py"), "task_distill", str(record_dir),
        *args(task, tmp_path / "out", "--max_steps", "4"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 and len(record["batches"]) == 4 for record in records)
    for record in records:
        assert all(sum(label == -100 for label in batch["labels"]) == 2 for batch in record["batches"])
    real = [
        {f for batch in record["batches"] for f, label in zip(batch["fingerprints"], batch["labels"]) if label != -100}
        for record in records
    ]
    assert len(real[0]) == 24 and not real[0] & real[1]  # 4 steps x 6 real images each, different images
    weights = [load_file(record_dir / f"rank{rank}.st") for rank in (0, 1)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "out").config.num_labels == 10
