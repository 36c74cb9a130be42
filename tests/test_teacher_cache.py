import os

import pytest
import torch
from datasets import load_from_disk

from hf_distill import UnicStudentConfig, UnicStudentModel, load_teacher
from hf_distill.data.image_datasets import ImageCollator
from hf_distill.data.teacher_cache import TeacherOutputCache, fixed_views
from hf_distill.trainers import UnicConfig, UnicTrainer

from .conftest import tiny_vit_config

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_cache(directory, tiny_teachers, dataset, shard_size=8):
    teachers = [
        ("vit-p4", load_teacher(tiny_teachers["vit"])),
        ("dinov2-p7", load_teacher(tiny_teachers["dinov2"], grid_alignment="interpolate")),
    ]
    cache = TeacherOutputCache.build(
        str(directory), teachers, dataset, "image", image_size=32, load_size=36, student_mean=MEAN,
        student_std=STD, grid_size=(4, 4), num_views=2, batch_size=4, shard_size=shard_size, dtype=torch.float32,
    )  # fmt: skip
    return cache, dict(teachers)


def test_cached_outputs_equal_online_teacher_outputs(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(20))
    cache, teachers = build_cache(tmp_path, tiny_teachers, dataset)
    assert cache.teacher_specs() == [
        {"name": "vit-p4", "summary_dim": 32, "patch_dim": 32},
        {"name": "dinov2-p7", "summary_dim": 48, "patch_dim": 48},
    ]
    indices, views = torch.tensor([0, 5, 19, 5]), torch.tensor([0, 1, 1, 0])
    pixels = ImageCollator(36)([dataset[int(i)] for i in indices])["pixel_values"]
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    normalized = (fixed_views(pixels, 32, views) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    for name, teacher in teachers.items():
        with torch.inference_mode():
            online = teacher(normalized, mean, std, grid_size=(4, 4))
        summary, patch = cache.lookup(name, indices, views)
        torch.testing.assert_close(summary, online.summary, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patch, online.patch_tokens, rtol=1e-5, atol=1e-5)
    # view 1 is the flip of view 0: different outputs for the same image
    assert not torch.allclose(
        cache.lookup("vit-p4", torch.tensor([5]), torch.tensor([0]))[1],
        cache.lookup("vit-p4", torch.tensor([5]), torch.tensor([1]))[1],
    )


def test_interrupted_build_resumes_from_written_shards(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(20))
    build_cache(tmp_path, tiny_teachers, dataset)
    kept = tmp_path / "shard-00000.safetensors"
    stamp = os.stat(kept).st_mtime_ns
    os.remove(tmp_path / "cache.json")  # as if killed before the end
    os.remove(tmp_path / "shard-00002.safetensors")
    with pytest.raises(ValueError, match="no complete teacher-output cache"):
        TeacherOutputCache(str(tmp_path))
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset)
    assert os.stat(kept).st_mtime_ns == stamp  # not recomputed
    assert (tmp_path / "shard-00002.safetensors").exists() and cache.info["shards"][-1] == "shard-00002.safetensors"
    assert cache.lookup("vit-p4", torch.tensor([19]), torch.tensor([1]))[0].shape == (1, 32)


def test_trainer_reads_the_cache_instead_of_running_teachers(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir)
    cache, _ = build_cache(tmp_path / "cache", tiny_teachers, dataset, shard_size=16)
    student = UnicStudentModel(UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=cache.teacher_specs()))
    args = UnicConfig(
        output_dir=str(tmp_path / "out"), teacher_cache=str(tmp_path / "cache"), image_size=32, load_size=36,
        per_device_train_batch_size=8, learning_rate=1e-3, max_steps=20, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, teacher_drop_prob=0.0,
    )  # fmt: skip
    trainer = UnicTrainer(model=student, args=args, train_dataset=dataset)
    assert trainer.teachers == []
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20 and sum(losses[-4:]) < sum(losses[:4])
    with pytest.raises(ValueError, match="does not match this run.*samples cached"):
        UnicTrainer(model=student, args=args, train_dataset=dataset.select(range(10)))
