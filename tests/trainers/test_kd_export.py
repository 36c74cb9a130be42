"""The task-specific trainer's final save is atomic: a failure during the export leaves the previous export whole and
no half-written folder."""

import hashlib
import os

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import CLIPImageProcessorPil, ViTForImageClassification

from hf_distill.io_utils import stale_staging_folders
from hf_distill.models import TeacherConfig, TeacherModel, freeze_teacher
from hf_distill.models.probed_teacher import ProbedTeacher
from hf_distill.trainers import KDConfig, KDTrainer

from ..conftest import tiny_vit_config


def folder_digest(folder) -> dict[str, str]:
    return {
        name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
        for name in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, name))
    }


def test_a_failed_final_save_leaves_the_previous_export_whole(tmp_path, monkeypatch):
    torch.manual_seed(0)
    student = ViTForImageClassification(tiny_vit_config(num_labels=3))
    teacher = freeze_teacher(TeacherModel(TeacherConfig(backbone_config=tiny_vit_config())))
    probed = ProbedTeacher(teacher, torch.randn(32, 3), torch.zeros(3), torch.zeros(32), torch.ones(32))
    images = [Image.new("RGB", (32, 32), (40 * i, 0, 0)) for i in range(4)]
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    args = KDConfig(
        output_dir=str(tmp_path / "out"), image_size=32, per_device_train_batch_size=2, report_to=[], use_cpu=True
    )
    trainer = KDTrainer(
        student, probed, args, Dataset.from_dict({"image": images, "label": [0, 1, 2, 0]}), processing_class=processor
    )
    output_dir = tmp_path / "out"
    trainer.save_model()
    (output_dir / "notes.txt").write_text("kept")  # what the folder holds besides the export is carried over
    first = folder_digest(output_dir)
    assert "model.safetensors" in first and "preprocessor_config.json" in first

    with torch.no_grad():  # a second export with other weights fails after the weights are written
        student.classifier.weight.add_(1.0)
    monkeypatch.setattr(processor, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model()
    assert folder_digest(output_dir) == first
    assert stale_staging_folders(output_dir) == []
    assert sorted(os.listdir(tmp_path)) == ["out"]

    monkeypatch.undo()
    trainer.save_model()  # a successful one replaces the weights and keeps the other entries
    second = folder_digest(output_dir)
    assert second["model.safetensors"] != first["model.safetensors"] and second["notes.txt"] == first["notes.txt"]
