"""UDON model, export, trainer and recipe on tiny models and two small real-image domains."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from huggingface_hub import metadata_load
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, TrainerCallback, ViTModel

from hf_distill.models import UdonModel, UdonModelConfig
from hf_distill.trainers import UdonTrainer

from ..conftest import TINY, KillAt, load_recipe, mnist_images, tiny_vit_config
from ..hub.test_hub import cites, new_paper

ROOT = Path(__file__).resolve().parents[2]
recipe = load_recipe("udon")
DOMAINS = [{"name": "a", "num_classes": 3}, {"name": "b", "num_classes": 5}]


def make_model(**kwargs):
    torch.manual_seed(0)
    return UdonModel(UdonModelConfig(backbone_config=tiny_vit_config(), domains=DOMAINS, **kwargs))


def test_forward_shapes_norms_and_uscrr():
    model = make_model()
    out = model(torch.randn(4, 3, 32, 32), domain="b", labels=torch.tensor([0, 1, 2, 4]))
    assert out.student_embeds.shape == (4, 64) and out.teacher_embeds.shape == (4, 256)
    assert out.student_cosines.shape == (4, 5) and out.teacher_cosines.shape == (4, 5)
    torch.testing.assert_close(out.student_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.teacher_embeds.norm(dim=-1), torch.ones(4))
    assert len(out.loss_terms) == 4
    uscrr = make_model(use_teacher_heads=False)
    assert not hasattr(uscrr, "teacher_heads")
    out = uscrr(torch.randn(4, 3, 32, 32), domain=0, labels=torch.tensor([0, 1, 2, 0]))
    assert set(out.loss_terms) == {"student_classification"} and out.teacher_embeds is None
    with pytest.raises(ValueError, match="Unknown domain"):
        uscrr(torch.randn(1, 3, 32, 32), domain="c")
    with pytest.raises(ValueError, match="unique"):
        UdonModelConfig(backbone_config=tiny_vit_config(), domains=[DOMAINS[0], DOMAINS[0]])
    with pytest.raises(ValueError, match="num_classes"):
        UdonModelConfig(backbone_config=tiny_vit_config(), domains=[{"name": "x", "num_classes": 0}])


@pytest.mark.parametrize("to_backbone", [True, False])
def test_distillation_gradients_reach_the_backbone_only_when_asked(to_backbone):
    model = make_model(distill_to_backbone=to_backbone)
    pixels, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])

    def backbone_grads(use_distillation):
        model.zero_grad()
        terms = model(pixels, domain="a", labels=labels).loss_terms
        loss = terms["teacher_classification"] + terms["student_classification"]
        if use_distillation:
            loss = loss + terms["logit_distillation"] + terms["relational_distillation"]
        loss.backward()
        return torch.cat(
            [p.grad.flatten() for p in model.backbone_parameters()]
        ), model.student_head.weight.grad.clone()

    full, head_full = backbone_grads(True)
    ce_only, head_ce = backbone_grads(False)
    assert not torch.allclose(head_full, head_ce)  # the student head always learns from distillation
    assert torch.allclose(full, ce_only, atol=1e-7) != to_backbone


def test_export_round_trip_without_hf_distill(tmp_path):
    model = make_model().eval()
    pixels = torch.randn(3, 3, 32, 32)
    expected = model(pixels, domain=0).student_embeds
    model.save_embedding_model(tmp_path / "export", image_size=32)
    names = {p.name for p in (tmp_path / "export").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_udon_embedding.py", "preprocessor_config.json"} <= names
    assert not any(
        "teacher" in key or "classifier" in key for key in load_file(tmp_path / "export" / "model.safetensors")
    )
    torch.save(pixels, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['hf_distill'] = None\n"
        "import torch\nfrom transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained(r'{tmp_path / 'export'}', trust_remote_code=True).eval()\n"
        f"torch.save(m(torch.load(r'{tmp_path / 'x.pt'}')).image_embeds, r'{tmp_path / 'y.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-5, atol=1e-6)


def test_backbone_from_a_vit_folder_and_a_clip_checkpoint(tmp_path):
    vit = ViTModel(tiny_vit_config())
    vit.save_pretrained(tmp_path / "vit")
    model = UdonModel.from_backbone(str(tmp_path / "vit"), UdonModelConfig(domains=DOMAINS))
    torch.testing.assert_close(model.backbone.state_dict(), vit.state_dict())
    clip = CLIPModel(
        CLIPConfig(
            vision_config=dict(**TINY, image_size=32, patch_size=16),
            text_config=dict(**TINY, vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        )
    )
    clip.save_pretrained(tmp_path / "clip")
    model = UdonModel.from_backbone(str(tmp_path / "clip"), UdonModelConfig(domains=DOMAINS))
    assert model.uses_pooler and model.config.backbone_config.model_type == "clip_vision_model"
    torch.testing.assert_close(model.backbone.state_dict(), clip.vision_model.state_dict())
    assert model(torch.randn(2, 3, 32, 32), domain="a").student_embeds.shape == (2, 64)


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two small real-image domains with their own label spaces: MNIST digits, and other digits inverted and tinted
    with string labels."""
    root = tmp_path_factory.mktemp("domains")
    images, labels = mnist_images(160)
    Dataset.from_dict({"image": images[:80], "label": labels[:80]}).save_to_disk(str(root / "digits"))
    tinted = [
        Image.fromarray((255 - np.asarray(image.convert("RGB"))) // 2 + np.array([0, 60, 120], dtype=np.uint8))
        for image in images[80:]
    ]
    Dataset.from_dict({"image": tinted, "label": [f"c{v}" for v in labels[80:]]}).save_to_disk(str(root / "tinted"))
    config_dir = root / "backbone"
    tiny_vit_config().save_pretrained(config_dir)
    return root


def recipe_args(root, output_dir, *extra):
    return [
        "--backbone", str(root / "backbone"), "--random_init",
        "--domains", f"digits={root / 'digits'}", f"tinted={root / 'tinted'}",
        "--output_dir", str(output_dir), "--image_size", "32", "--load_size", "36",
        "--per_device_train_batch_size", "8", "--max_steps", "8", "--sampler_update_every", "2",
        "--freeze_backbone_epochs", "0", "--backbone_learning_rate", "1e-3", "--save_steps", "4",
        "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_recipe_trains_logs_evaluates_and_resumes_exactly(two_domains, tmp_path, monkeypatch):
    monkeypatch.setattr(UdonTrainer, "_paper", new_paper("udon-variant"))  # the card cites the trainer's paper
    monkeypatch.setattr(UdonTrainer, "_tag_names", [*UdonTrainer._tag_names, "udon-variant"])  # and carries its tags
    trainer, results = recipe.main(recipe_args(two_domains, tmp_path / "full"))
    assert set(UdonTrainer._tag_names) <= set(metadata_load(tmp_path / "full" / "README.md")["tags"])
    assert cites((tmp_path / "full" / "README.md").read_text(), new_paper("udon-variant"))
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8 and all(np.isfinite(entry["loss"]) for entry in logs)
    assert any("digits/loss" in e for e in logs) and any("tinted/loss" in e for e in logs)
    assert all("sampler/digits" in e and "teacher_classification" in e for e in logs)
    weights = [(e["sampler/digits"], e["sampler/tinted"]) for e in logs]
    assert weights[0] == (0.5, 0.5) and len(set(weights)) > 1  # the dynamic sampler moved
    assert set(results["per_domain"]) == {"digits", "tinted"} and 0 <= results["mean"]["mMP@5"] <= 100
    saved = json.loads((tmp_path / "full" / "eval_results.json").read_text())
    assert saved["method"] == "udon"
    sampler_state = json.loads((tmp_path / "full" / "checkpoint-8" / "domain_sampler.json").read_text())
    assert len(sampler_state["history"]) > 1

    with pytest.raises(KeyboardInterrupt):
        recipe.main(recipe_args(two_domains, tmp_path / "killed"), callbacks=[KillAt(6)])
    resumed, _ = recipe.main(recipe_args(two_domains, tmp_path / "killed"))
    assert resumed.state.global_step == 8
    assert resumed.domain_sampler.history == trainer.domain_sampler.history
    full = load_file(tmp_path / "full" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model.safetensors")
    for key in full:
        torch.testing.assert_close(again[key], full[key], rtol=1e-5, atol=1e-6, msg=key)


class BackboneAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = {k: v.clone() for k, v in model.backbone.state_dict().items()}


def test_uscrr_and_frozen_backbone(two_domains, tmp_path):
    start = BackboneAtStart()
    args = recipe_args(two_domains, tmp_path, "--method", "uscrr", "--sampling", "round_robin")
    args += ["--freeze_backbone_epochs", "1", "--num_train_epochs", "1", "--max_steps", "-1"]
    trainer, results = recipe.main(args, callbacks=[start])
    model = trainer.udon_model
    assert not model.config.use_teacher_heads and results["method"] == "uscrr"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(set(e) & {"teacher_classification", "logit_distillation"} == set() for e in logs)
    assert [(e["sampler/digits"], e["sampler/tinted"]) for e in logs] == [(0.5, 0.5)] * len(logs)
    for name, value in model.backbone.state_dict().items():  # frozen during the single epoch
        assert torch.equal(value, start.weights[name]), name
    assert not torch.equal(model.student_head.weight, torch.zeros_like(model.student_head.weight))


def test_bad_domains_fail_before_training(two_domains, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"domains:\n  - {{name: a, path: {two_domains / 'digits'}, label_column: category}}\n")
    base = recipe_args(two_domains, tmp_path)
    no_cli_domains = base[:3] + base[6:]  # drop --domains and its two values
    with pytest.raises(ValueError, match="no label column 'category'"):
        recipe.main(["--config", str(config), *no_cli_domains])
    with pytest.raises(ValueError, match="unique"):
        recipe.main([*base[:3], "--domains", f"a={two_domains / 'digits'}", f"a={two_domains / 'tinted'}", *base[6:]])
    with pytest.raises(ValueError, match="No domains"):
        recipe.main(no_cli_domains)


@pytest.mark.distributed
def test_two_processes_share_each_steps_domain_and_read_disjoint_rows(two_domains, tmp_path):
    """DDP: every optimizer step sees ONE domain on both processes (the per-domain heads get gradients of that domain
    only), each process its own rows; the dynamic weights are reduced over processes, so both ranks keep the same
    schedule and end with identical weights; the sampler state lands in the checkpoint."""
    import os
    import shutil

    record_dir = tmp_path / "records"
    record_dir.mkdir()
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
        str(ROOT / "tests" / "scripts" / "record_ranks.py"), "udon", str(record_dir),
        *recipe_args(two_domains, tmp_path / "out", "--per_device_train_batch_size", "4", "--max_steps", "6",
                     "--save_steps", "6"),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    records = [json.loads((record_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(record["world_size"] == 2 for record in records)
    steps = [[(batch["domain"], batch["fingerprints"]) for batch in record["batches"]] for record in records]
    assert len(steps[0]) == len(steps[1]) == 6
    assert [domain for domain, _ in steps[0]] == [domain for domain, _ in steps[1]]  # same domain per step
    assert {domain for domain, _ in steps[0]} == {0, 1}
    for (_, rows0), (_, rows1) in zip(*steps):
        assert len(rows0) == len(rows1) == 4 and not set(rows0) & set(rows1)
    weights = [load_file(record_dir / f"rank{rank}.st") for rank in (0, 1)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "domain_sampler.json").read_text())
    assert state["num_replicas"] == 2 and state["steps"] == 6 and len(state["history"]) > 1


class BackboneAtEpochEnds(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model, self.weights = model, [{k: v.clone() for k, v in model.backbone.state_dict().items()}]

    def on_epoch_end(self, args, state, control, **kwargs):
        self.weights.append({k: v.clone() for k, v in self.model.backbone.state_dict().items()})


def test_backbone_frozen_for_its_epochs_then_trained(two_domains, tmp_path):
    """`--freeze_backbone_epochs 1` of 2: the backbone is bit-identical after epoch 1 (heads trained), then moves."""
    epochs = BackboneAtEpochEnds()
    args = recipe_args(two_domains, tmp_path, "--freeze_backbone_epochs", "1", "--num_train_epochs", "2")
    args += ["--max_steps", "-1", "--save_strategy", "no", "--per_device_train_batch_size", "16"]
    trainer, _ = recipe.main(args, callbacks=[epochs])
    start, after_frozen, after_trained = epochs.weights
    assert trainer.state.global_step == 2 * 8  # 64 + 64 training rows, batches of 16, two epochs
    assert all(torch.equal(after_frozen[name], start[name]) for name in start)
    moved = [name for name in start if not torch.equal(after_trained[name], after_frozen[name])]
    trainable = [name for name, p in trainer.udon_model.backbone.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(moved) and trainable  # every trainable backbone weight moved in epoch 2
