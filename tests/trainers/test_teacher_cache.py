import os

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from hf_distill import UnicStudentConfig, UnicStudentModel, load_teacher
from hf_distill.data.image_datasets import ImageCollator
from hf_distill.trainers import UnicConfig, UnicTrainer
from hf_distill.trainers.cache_views import CropViews, fixed_views
from hf_distill.trainers.teacher_cache import TeacherOutputCache

from ..conftest import tiny_vit_config

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_cache(
    directory, tiny_teachers, dataset, shard_size=8, teachers=None, load_size=36, num_views=2, jpeg_draft=True
):
    teachers = teachers or [
        ("vit-p4", load_teacher(tiny_teachers["vit"])),
        ("dinov2-p7", load_teacher(tiny_teachers["dinov2"], grid_alignment="interpolate")),
    ]
    cache = TeacherOutputCache.build(
        str(directory), teachers, dataset, "image", image_size=32, load_size=load_size, student_mean=MEAN,
        student_std=STD, grid_size=(4, 4), num_views=num_views, batch_size=4, shard_size=shard_size,
        dtype=torch.float32, jpeg_draft=jpeg_draft,
    )  # fmt: skip
    return cache, dict(teachers)


def online_outputs(teacher, dataset, indices, views, load_size=36):
    """What the teacher gives now for these (image, view) pairs, computed without the cache."""
    pixels = ImageCollator(load_size)([dataset[int(i)] for i in indices])["pixel_values"]
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    normalized = (fixed_views(pixels, 32, views) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.inference_mode():
        return teacher(normalized, mean, std, grid_size=(4, 4))


def assert_cache_serves(cache, name, teacher, dataset, load_size=36):
    """Every row of the cache equals the online outputs of `teacher` (nothing stale or mixed)."""
    indices = torch.arange(len(dataset)).repeat_interleave(2)
    views = torch.tensor([0, 1]).repeat(len(dataset))
    expected = online_outputs(teacher, dataset, indices, views, load_size)
    summary, patch = cache.lookup(name, indices, views)
    torch.testing.assert_close(summary, expected.summary, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patch, expected.patch_tokens, rtol=1e-5, atol=1e-5)


def perturbed(teacher, seed=0):
    """The same teacher (same folder, name and options) with other weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return teacher


def stamps(directory):
    return {p.name: os.stat(p).st_mtime_ns for p in sorted(directory.glob("shard-*.safetensors"))}


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
    assert (tmp_path / "shard-00002.safetensors").exists()
    assert cache.info["shards"][-1]["file"] == "shard-00002.safetensors"
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


def test_same_folder_with_other_teacher_weights_is_rebuilt(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(12))
    build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", load_teacher(tiny_teachers["vit"]))])
    other = perturbed(load_teacher(tiny_teachers["vit"]))
    before = stamps(tmp_path)
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", other)])
    after = stamps(tmp_path)
    assert all(after[name] != before[name] for name in before)  # every shard recomputed
    assert_cache_serves(cache, "vit-p4", other, dataset)
    # the same teacher again: everything reused
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", other)])
    assert stamps(tmp_path) == after


@pytest.mark.parametrize("change", ["summary", "grid_alignment", "load_size"])
def test_changed_teacher_option_or_load_size_is_rebuilt(change, tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(8))
    build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", load_teacher(tiny_teachers["vit"]))])
    options = {"summary": {"summary": "mean_patch"}, "grid_alignment": {"grid_alignment": "interpolate"}}
    teacher = load_teacher(tiny_teachers["vit"], **options.get(change, {}))
    load_size = 48 if change == "load_size" else 36
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", teacher)], load_size=load_size)
    assert_cache_serves(cache, "vit-p4", teacher, dataset, load_size=load_size)
    assert cache.info["load_size"] == load_size


def test_first_lookup_inside_bf16_autocast_reads_the_float16_shards(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(8))
    teachers = [("vit-p4", load_teacher(tiny_teachers["vit"]))]
    TeacherOutputCache.build(
        str(tmp_path), teachers, dataset, "image", image_size=32, load_size=36, student_mean=MEAN, student_std=STD,
        grid_size=(4, 4), batch_size=4, shard_size=4, dtype=torch.float16,
    )  # fmt: skip
    cache = TeacherOutputCache(str(tmp_path))  # nothing loaded yet: the first lookup concatenates the shards
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summary, patch = cache.lookup("vit-p4", torch.tensor([0, 7]), torch.tensor([1, 0]))
    expected = online_outputs(teachers[0][1], dataset, torch.tensor([0, 7]), torch.tensor([1, 0]))
    assert summary.dtype == torch.float32
    torch.testing.assert_close(summary, expected.summary.float(), atol=2e-3, rtol=2e-3)


def test_jpeg_draft_decoding_is_keyed_and_checked(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(8))
    teachers = [("vit-p4", load_teacher(tiny_teachers["vit"]))]
    build_cache(tmp_path, tiny_teachers, dataset, teachers=teachers, jpeg_draft=True)
    before = stamps(tmp_path)
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=teachers, jpeg_draft=False)
    after = stamps(tmp_path)
    assert all(after[name] != before[name] for name in before)  # other decoded pixels: every shard recomputed
    assert cache.info["jpeg_draft"] is False
    with pytest.raises(ValueError, match="JPEG draft decoding False cached, training uses True"):
        cache.check(dataset, 32, (4, 4), 36, jpeg_draft=True)


def test_corrupt_shard_is_reported_and_only_it_is_rebuilt(tiny_teachers, image_dataset_dir, tmp_path, caplog):
    dataset = load_from_disk(image_dataset_dir).select(range(20))
    teacher = load_teacher(tiny_teachers["vit"])
    build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", teacher)])
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one byte of tensor data flipped in place: the file still parses
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.safetensors of the teacher-output cache is corrupt"):
        TeacherOutputCache(str(tmp_path)).lookup("vit-p4", torch.tensor([0]), torch.tensor([0]))
    before = stamps(tmp_path)
    with caplog.at_level("INFO", logger="hf_distill"):
        cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", teacher)])
    after = stamps(tmp_path)
    assert [name for name in before if after[name] != before[name]] == ["shard-00001.safetensors"]
    assert "shard-00001.safetensors (checksum mismatch" in caplog.text
    assert_cache_serves(cache, "vit-p4", teacher, dataset)


def test_missing_or_truncated_shard_gives_a_clear_error(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(12))
    build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", load_teacher(tiny_teachers["vit"]))])
    shard = tmp_path / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(ValueError, match="shard-00001.safetensors of the teacher-output cache has 50 bytes.*rebuilds"):
        TeacherOutputCache(str(tmp_path))
    os.remove(shard)
    with pytest.raises(ValueError, match="shard-00001.safetensors of the teacher-output cache is missing"):
        TeacherOutputCache(str(tmp_path))


def test_interrupted_build_resumed_with_another_teacher_uses_nothing_of_the_first(
    tiny_teachers, image_dataset_dir, tmp_path
):
    dataset = load_from_disk(image_dataset_dir).select(range(20))
    first = load_teacher(tiny_teachers["vit"])
    build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", first)])
    os.remove(tmp_path / "cache.json")  # killed after shard 0 of teacher A
    for name in ("shard-00001.safetensors", "shard-00002.safetensors"):
        os.remove(tmp_path / name)
    second = perturbed(load_teacher(tiny_teachers["vit"]), seed=1)
    cache, _ = build_cache(tmp_path, tiny_teachers, dataset, teachers=[("vit-p4", second)])
    assert_cache_serves(cache, "vit-p4", second, dataset)  # shard 0 too: recomputed with teacher B
    assert cache.info["teachers"][0]["weights"] == cache.info["content"]["teachers"][0]["weights"]


def numpy_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """Float64 reference of the crop `box` = (left, top, width, height, flip) of a `[3, H, W]` image in [0, 1],
    resampled to `size x size`: bicubic convolution (a = -0.75), taps clamped to the border, pixel centers at
    `left + (j + 0.5) * width / size` (mirrored when flipped)."""
    left, top, width, height, flip = (float(v) for v in box)
    _, rows, cols = image.shape
    j = (np.arange(size) + 0.5) / size
    xs = left + (1.0 - j if flip > 0.5 else j) * width - 0.5
    ys = top + j * height - 0.5

    def taps(coords, limit):
        base = np.floor(coords)
        t = coords - base
        a = -0.75
        weights = np.stack(
            [
                ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
                ((a + 2) * t - (a + 3)) * t * t + 1,
                ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
                ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
            ],
            axis=1,
        )
        index = np.clip(base[:, None].astype(int) + np.arange(-1, 3)[None], 0, limit - 1)
        return weights, index

    wx, ix = taps(xs, cols)
    wy, iy = taps(ys, rows)
    out = np.einsum("yk,xl,cykxl->cyx", wy, wx, image[:, iy[:, :, None, None], ix[None, None, :, :]])
    return np.clip(out, 0.0, 1.0)


def build_crop_cache(directory, teacher, dataset, num_views=3, seed=0, shard_size=8):
    return TeacherOutputCache.build(
        str(directory), [("vit-p4", teacher)], dataset, "image", image_size=32, load_size=36, student_mean=MEAN,
        student_std=STD, grid_size=(4, 4), num_views=num_views, batch_size=4, shard_size=shard_size,
        dtype=torch.float32, crops=CropViews(seed=seed, scale=(0.3, 1.0)),
    )  # fmt: skip


def test_crop_cache_student_and_teachers_see_the_stored_crop(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(16))
    teacher = load_teacher(tiny_teachers["vit"])
    cache = build_crop_cache(tmp_path / "cache", teacher, dataset)
    boxes = cache._load()["views.boxes"]
    assert boxes.shape == (16, 3, 5) and cache.num_views == 3
    left, top, width, height, flip = boxes.unbind(-1)
    assert (left >= 0).all() and (left + width <= 36 + 1e-4).all() and (top + height <= 36 + 1e-4).all()
    area = width * height / 36**2
    assert (area > 0.3 - 1e-4).all() and ((flip == 0) | (flip == 1)).all() and 0 < flip.mean() < 1
    loaded = ImageCollator(36)([dataset[i] for i in range(16)])["pixel_values"].double().numpy() / 255.0
    # the teachers' stored outputs are those of the crop the boxes describe
    indices, views = torch.tensor([0, 3, 3, 15]), torch.tensor([0, 0, 2, 1])
    crops = np.stack([numpy_crop(loaded[i], boxes[i, v].numpy(), 32) for i, v in zip(indices, views)])
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    normalized = (torch.from_numpy(crops).float() - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.inference_mode():
        online = teacher(normalized, mean, std, grid_size=(4, 4))
    summary, patch = cache.lookup("vit-p4", indices, views)
    torch.testing.assert_close(summary, online.summary, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(patch, online.patch_tokens, rtol=1e-4, atol=1e-4)

    # the student's training input for a cached (image, view) is the same crop of the same image
    student = UnicStudentModel(UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=cache.teacher_specs()))
    args = UnicConfig(
        output_dir=str(tmp_path / "out"), teacher_cache=str(tmp_path / "cache"), image_size=32, load_size=36,
        per_device_train_batch_size=8, max_steps=2, save_strategy="no", report_to="none", use_cpu=True,
        teacher_cache_views=3, teacher_cache_crops=True,
    )  # fmt: skip
    trainer = UnicTrainer(model=student, args=args, train_dataset=dataset)
    seen, looked_up = [], []
    student.register_forward_pre_hook(lambda module, a, kw: seen.append(kw["pixel_values"].clone()), with_kwargs=True)
    lookup = trainer.teacher_cache.lookup
    trainer.teacher_cache.lookup = lambda name, i, v, device=None: (
        looked_up.append((i, v)) or lookup(name, i, v, device)
    )
    trainer.train()
    assert len(seen) == 2 and trainer.teacher_cache.describe_views().startswith("3 random resized crops")
    for pixels, (rows, columns) in zip(seen, looked_up):
        assert columns.unique().numel() > 1  # views drawn per image
        expected = np.stack([numpy_crop(loaded[r], boxes[r, c].numpy(), 32) for r, c in zip(rows, columns)])
        view = pixels * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
        torch.testing.assert_close(view, torch.from_numpy(expected).float(), rtol=1e-4, atol=1e-4)


def test_crop_cache_resumes_with_the_same_crops_and_the_seed_is_keyed(tiny_teachers, image_dataset_dir, tmp_path):
    dataset = load_from_disk(image_dataset_dir).select(range(20))
    teacher = load_teacher(tiny_teachers["vit"])
    first = build_crop_cache(tmp_path, teacher, dataset)
    boxes, outputs = (
        first._load()["views.boxes"].clone(),
        first.lookup("vit-p4", torch.arange(20), torch.ones(20).long()),
    )
    assert first.crops["seed"] == 0
    os.remove(tmp_path / "cache.json")  # killed: shards 1 and 2 lost
    os.remove(tmp_path / "shard-00001.safetensors")
    os.remove(tmp_path / "shard-00002.safetensors")
    kept = stamps(tmp_path)
    resumed = build_crop_cache(tmp_path, teacher, dataset)
    assert stamps(tmp_path)["shard-00000.safetensors"] == kept["shard-00000.safetensors"]
    torch.testing.assert_close(resumed._load()["views.boxes"], boxes, rtol=0, atol=0)  # same crops as one build
    torch.testing.assert_close(resumed.lookup("vit-p4", torch.arange(20), torch.ones(20).long()), outputs)
    before = stamps(tmp_path)
    other = build_crop_cache(tmp_path, teacher, dataset, seed=1)  # another seed: other crops, every shard rebuilt
    assert all(stamps(tmp_path)[name] != before[name] for name in before)
    assert not torch.allclose(other._load()["views.boxes"], boxes)
    with pytest.raises(ValueError, match="num_views must be 1 .* or 2 .* for fixed views, got 3"):
        build_cache(tmp_path / "fixed", tiny_teachers, dataset, teachers=[("vit-p4", teacher)], num_views=3)
