"""Teacher outputs precomputed as WebDataset shards for streaming data: written from a stream, read back with the
`webdataset` builder of `datasets` equal to the teacher run on the images by hand, checksums catch a corrupt shard,
and a rebuild rewrites only that one."""

import io
import os
import tarfile

import numpy as np
import pytest
import torch
from datasets import load_dataset
from PIL import Image

from hf_distill.data.streaming import load_streaming_dataset
from hf_distill.models import load_teacher
from hf_distill.models.configuration_teacher import IMAGENET_MEAN, IMAGENET_STD
from hf_distill.trainers.teacher_cache_shards import TeacherOutputShards

from ..conftest import mnist_images


@pytest.fixture
def digit_shards(tmp_path):
    """10 real 32 px digits in 2 WebDataset tar shards, read as a stream."""
    images, _ = mnist_images(10)
    folder = tmp_path / "tar"
    folder.mkdir()
    for shard, rows in enumerate((range(0, 6), range(6, 10))):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for row in rows:
                buffer = io.BytesIO()
                images[row].save(buffer, format="PNG")
                info = tarfile.TarInfo(f"{row:04d}.png")
                info.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(info, buffer)
    return images, str(folder)


def build(directory, teacher, examples):
    return TeacherOutputShards.build(
        str(directory), [("vit", teacher)], examples, image_column="png", image_size=32, load_size=32,
        student_mean=IMAGENET_MEAN, student_std=IMAGENET_STD, grid_size=(4, 4), batch_size=3, samples_per_shard=4,
    )  # fmt: skip


def test_shards_hold_the_teacher_outputs_of_every_streamed_image(digit_shards, tiny_teachers, tmp_path):
    images, data = digit_shards
    teacher = load_teacher(tiny_teachers["vit"], grid_alignment="resize")
    shards = build(tmp_path / "cache", teacher, load_streaming_dataset(data, image_column="png"))
    assert [os.path.basename(path) for path in shards.files] == [f"shard-{n:05d}.tar" for n in range(3)]  # 4, 4, 2
    assert shards.info["num_samples"] == 10 and shards.teacher_names == ["vit"]
    shards.verify()

    # read back as any WebDataset, compared with the teacher run by hand on the two fixed views of each digit
    stream = load_dataset("webdataset", data_files=shards.files, split="train", streaming=True)
    rows = list(stream)
    assert len(rows) == 10
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for image, row in zip(images, rows):
        assert np.array_equal(np.asarray(row["png"].convert("RGB")), np.asarray(image))  # the image, as read
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
        views = torch.cat([pixels, pixels.flip(-1)])
        with torch.no_grad():
            expected = teacher((views - mean) / std, mean.flatten(), std.flatten(), grid_size=(4, 4))
        summary, patch = np.asarray(row["vit.summary.npy"]), np.asarray(row["vit.patch.npy"])
        assert summary.shape == (2, 32) and patch.shape == (2, 16, 32) and summary.dtype == np.float16
        np.testing.assert_allclose(summary, expected.summary.numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(patch, expected.patch_tokens.numpy(), rtol=2e-3, atol=2e-3)
    # the same shards are a streaming training source for the images
    assert sum(1 for _ in load_streaming_dataset(str(tmp_path / "cache"), image_column="png")) == 10


def test_a_corrupt_shard_is_caught_and_only_it_is_rebuilt(digit_shards, tiny_teachers, tmp_path, caplog):
    _, data = digit_shards
    teacher = load_teacher(tiny_teachers["vit"], grid_alignment="resize")
    shards = build(tmp_path / "cache", teacher, load_streaming_dataset(data, image_column="png"))
    first, corrupt = shards.files[0], shards.files[1]
    first_time = os.stat(first).st_mtime_ns
    with open(corrupt, "r+b") as handle:  # same size, one byte flipped inside an array
        handle.seek(os.path.getsize(corrupt) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="shard-00001.tar is corrupt"):
        TeacherOutputShards(str(tmp_path / "cache")).verify()

    with caplog.at_level("INFO", logger="hf_distill"):
        rebuilt = build(tmp_path / "cache", teacher, load_streaming_dataset(data, image_column="png"))
    assert "(1 written, 2 kept after checking their checksums)" in caplog.text
    rebuilt.verify()
    assert os.stat(first).st_mtime_ns == first_time

    os.remove(tmp_path / "cache" / "cache.json")
    with pytest.raises(ValueError, match="cache.json is missing"):
        TeacherOutputShards(str(tmp_path / "cache"))


def test_a_pil_image_dataset_is_written_as_png(tiny_teachers, tmp_path):
    from datasets import Dataset

    images = [Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)) for value in (10, 200)]
    teacher = load_teacher(tiny_teachers["vit"], grid_alignment="resize")
    shards = build(tmp_path / "cache", teacher, Dataset.from_dict({"png": images}))
    samples = list(shards.examples())
    assert [sample["__key__"] for sample in samples] == ["000000000", "000000001"]
    for image, sample in zip(images, samples):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["image"]))), np.asarray(image))
        assert sample["vit.summary"].shape == (2, 32)
