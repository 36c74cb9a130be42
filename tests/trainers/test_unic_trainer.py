import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, ViTModel

from hf_distill import UnicStudentConfig, UnicStudentModel
from hf_distill.data import load_image_dataset
from hf_distill.io_utils import stale_staging_folders
from hf_distill.models import load_teacher_config
from hf_distill.trainers import UnicConfig, UnicTrainer, teacher_spec, unique_teacher_names

from ..conftest import tiny_vit_config


def build(
    tiny_teachers,
    image_dataset_dir,
    output_dir,
    teachers=("vit", "dinov2"),
    alignments=("resize", "interpolate"),
    **overrides,
):
    sources = [tiny_teachers[name] for name in teachers]
    names = unique_teacher_names(sources)
    options = dict(
        image_size=32,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        max_steps=12,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    options.update(overrides)
    args = UnicConfig(output_dir=str(output_dir), teachers=sources, teacher_grid_alignment=list(alignments), **options)
    specs = [
        teacher_spec(n, load_teacher_config(s, **args.teacher_options(i)))
        for i, (n, s) in enumerate(zip(names, sources))
    ]
    torch.manual_seed(0)
    student = UnicStudentModel(UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=specs))
    dataset = load_image_dataset(image_dataset_dir)
    return UnicTrainer(model=student, args=args, train_dataset=dataset)


def test_training_on_a_fixed_batch_decreases_every_teacher_loss(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(tiny_teachers, image_dataset_dir, tmp_path, augment=False, teacher_drop_prob=0.0, max_steps=30)
    trainer.train_dataset = trainer.train_dataset.select(range(8))  # one fixed batch
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 30
    for key in ("loss", "vit-p4/cls_loss", "vit-p4/patch_loss", "dinov2-p7/cls_loss", "dinov2-p7/patch_loss"):
        values = [entry[key] for entry in logs]
        assert all(torch.isfinite(torch.tensor(values))), key
        assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5, (key, values)
    assert all(entry["vit-p4/kept"] == 1.0 for entry in logs)  # p = 0 keeps every teacher


def test_teacher_dropping_metrics_and_checkpoint_files(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(
        tiny_teachers,
        image_dataset_dir,
        tmp_path,
        max_steps=4,
        save_strategy="steps",
        save_steps=4,
        teacher_drop_prob=0.5,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    kept = [(entry["vit-p4/kept"], entry["dinov2-p7/kept"]) for entry in logs]
    # every image keeps its max-loss teacher, so the two kept fractions add up to at least 1; some are dropped
    assert all(a + b >= 1.0 for a, b in kept) and min(min(pair) for pair in kept) < 1.0
    checkpoint = tmp_path / "checkpoint-4"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in checkpoint.iterdir()
    }
    state = load_file(checkpoint / "model.safetensors")
    assert "cls_heads.vit-p4.rungs.1.2.weight" in state
    # standardization statistics are checkpointed and have moved away from their init
    assert not torch.equal(state["patch_standardizers.dinov2-p7.mean"], torch.zeros(48))
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "hf_distill_unic_student"


def test_evaluation_reports_loss_and_per_teacher_metrics(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(tiny_teachers, image_dataset_dir, tmp_path, max_steps=2, per_device_eval_batch_size=8)
    trainer.train()
    statistics = trainer.model.cls_standardizers["vit-p4"].mean.clone()
    metrics = trainer.evaluate(trainer.train_dataset.select(range(16)))
    assert metrics["eval_loss"] > 0
    assert metrics["eval_vit-p4/kept"] == 1.0 and "eval_dinov2-p7/patch_loss" in metrics
    assert torch.equal(trainer.model.cls_standardizers["vit-p4"].mean, statistics)  # frozen at evaluation


def test_teachers_stay_frozen_and_outside_the_optimizer(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(tiny_teachers, image_dataset_dir, tmp_path, max_steps=2)
    before = [{k: v.clone() for k, v in t.state_dict().items()} for t in trainer.teachers]
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for teacher, state in zip(trainer.teachers, before):
        assert not teacher.training
        assert all(id(p) not in optimized and p.grad is None for p in teacher.parameters())
        assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in state.items())
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    assert "backbone.layers.0.attention.q_proj.weight" in decayed
    assert "backbone.layernorm.weight" not in decayed and "cls_heads.vit-p4.rungs.0.0.bias" not in decayed


def test_export_gives_the_features_of_the_trained_student(tiny_teachers, image_dataset_dir, tmp_path):
    trainer = build(
        tiny_teachers, image_dataset_dir, tmp_path, max_steps=3, teachers=("vit", "clip"), alignments=("resize",)
    )
    trainer.train()
    (tmp_path / "notes.txt").write_text("kept")  # what the folder held is kept, the weights of an earlier export not
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    trainer.save_model()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert not (tmp_path / "model-00002-of-00002.safetensors").exists() and not stale_staging_folders(tmp_path)
    encoder = AutoModel.from_pretrained(tmp_path)
    assert type(encoder) is ViTModel
    pixels = torch.randn(2, 3, 32, 32)
    student = trainer.accelerator.unwrap_model(trainer.model).eval()
    torch.testing.assert_close(encoder.eval()(pixels).last_hidden_state, student(pixels).last_hidden_state)


def test_student_and_teachers_must_match(tiny_teachers, image_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="heads for 2 teachers"):
        trainer = build(tiny_teachers, image_dataset_dir, tmp_path)
        UnicTrainer(model=trainer.model, args=trainer.args, teachers=[tiny_teachers["vit"]])
    with pytest.raises(ValueError, match="build the student for these teachers"):
        trainer = build(tiny_teachers, image_dataset_dir, tmp_path)
        UnicTrainer(model=trainer.model, args=trainer.args, teachers=[tiny_teachers["dinov2"], tiny_teachers["vit"]])


def test_a_plain_module_teacher_trains_beside_a_transformers_teacher(tiny_teachers, image_dataset_dir, tmp_path):
    from torch import nn

    from hf_distill import ModuleTeacher

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(8, 40, 3, stride=4, padding=1))
    cnn_teacher = ModuleTeacher(cnn, image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=8, name="cnn")
    teachers = [tiny_teachers["vit"], cnn_teacher]
    names = unique_teacher_names(teachers)
    specs = [teacher_spec(names[0], load_teacher_config(teachers[0])), teacher_spec(names[1], cnn_teacher)]
    assert specs[1] == {"name": "cnn", "summary_dim": 40, "patch_dim": 40}
    student = UnicStudentModel(UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=specs))
    args = UnicConfig(
        output_dir=str(tmp_path), image_size=32, per_device_train_batch_size=8, max_steps=3, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True,
    )  # fmt: skip
    trainer = UnicTrainer(
        model=student, args=args, teachers=teachers, train_dataset=load_image_dataset(image_dataset_dir)
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["cnn/patch_loss"])) for e in trainer.state.log_history if "loss" in e)


def test_torch_compile_flag_compiles_the_student_and_the_teachers(tiny_teachers, image_dataset_dir, tmp_path):
    from accelerate.utils import is_compiled_module

    def losses(**options):
        trainer = build(tiny_teachers, image_dataset_dir, tmp_path, max_steps=2, teacher_drop_prob=0.0, **options)
        trainer.train()
        return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # the "eager" backend runs the captured graphs without code generation: same numbers, cheap on CPU
    compiled, compiled_losses = losses(torch_compile=True, torch_compile_backend="eager")
    assert all(is_compiled_module(teacher) for teacher in compiled.teachers)
    assert is_compiled_module(compiled.model_wrapped)
    _, plain_losses = losses()
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-4)
