"""Training UNIC directly from teacher-output WebDataset shards (`--streaming --teacher_cache DIR`): a step fed from
the shards is the step fed from the map-style cache of the same images and views, a shard-fed run killed mid-epoch
resumes with the batches of an uninterrupted one (each image once per epoch), and shards built for other teachers or
views, or missing a shard, are refused before training."""

import copy
import os
import shutil
from functools import partial

import pytest
import torch
from datasets import Dataset

from hf_distill import UnicStudentConfig, UnicStudentModel, load_teacher
from hf_distill.data.streaming import STREAM_POSITION, StreamingImageDataset, load_streaming_dataset
from hf_distill.models import teacher_spec
from hf_distill.trainers import UnicConfig, UnicTrainer
from hf_distill.trainers.cache_views import CropViews
from hf_distill.trainers.teacher_cache import TeacherOutputCache
from hf_distill.trainers.teacher_cache_shards import TeacherOutputShards

from ..conftest import KillAt, mnist_images, tiny_vit_config
from ..data.test_streaming import RecordIds, assert_each_epoch_once, streaming_args, write_shards
from ..recipes.test_unic import recipe as unic

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("crops", [None, CropViews(seed=3, scale=(0.3, 1.0))], ids=["fixed-views", "crops"])
def test_a_step_from_shards_equals_the_step_from_the_map_style_cache(crops, tiny_teachers, tmp_path):
    """The same 8 digits cached both ways (same teacher, views, float32 storage); the first training step of two
    identical students, one fed 4 images from the shards, one the same 4 rows from the map-style cache."""
    images, _ = mnist_images(8)
    dataset = Dataset.from_dict({"image": images})
    teacher = load_teacher(tiny_teachers["vit"], grid_alignment="resize")
    options = dict(
        image_size=32, load_size=32, student_mean=MEAN, student_std=STD, grid_size=(4, 4), num_views=2,
        dtype=torch.float32, crops=crops,
    )  # fmt: skip
    TeacherOutputCache.build(str(tmp_path / "map"), [("vit", teacher)], dataset, "image", batch_size=4, **options)
    shards = TeacherOutputShards.build(
        str(tmp_path / "shards"), [("vit", teacher)], dataset, "image", batch_size=3, samples_per_shard=3, **options
    )
    assert len(shards.files) == 3 and shards.image_column == "png"

    torch.manual_seed(0)
    config = UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=[teacher_spec("vit", teacher)])
    student = UnicStudentModel(config)
    losses, views = {}, {}
    for kind in ("map", "shards"):
        args = UnicConfig(
            output_dir=str(tmp_path / f"out-{kind}"), teacher_cache=str(tmp_path / kind), image_size=32,
            load_size=32, per_device_train_batch_size=4, max_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, teacher_cache_crops=crops is not None,
        )  # fmt: skip
        if kind == "map":
            trainer = UnicTrainer(model=copy.deepcopy(student), args=args, train_dataset=dataset)
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        else:
            stream = StreamingImageDataset(load_streaming_dataset(str(tmp_path / "shards"), "png"), 0, 0, 0, 1)
            trainer = UnicTrainer(model=copy.deepcopy(student), args=args, train_dataset=stream, image_column="png")
            examples = [example for example, _ in zip(stream, range(4))]  # in order: no shuffle buffer
            batch = trainer.data_collator([{k: v for k, v in e.items() if k != STREAM_POSITION} for e in examples])
        trainer.model.register_forward_pre_hook(partial(record_input, views, kind), with_kwargs=True)
        trainer.model.train()
        losses[kind] = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(views["shards"], views["map"], rtol=0, atol=1e-6)  # the student saw the same views
    assert abs(losses["shards"].item() - losses["map"].item()) <= 1e-6
    assert losses["map"].item() > 0


def record_input(views: dict, kind: str, module, args, kwargs) -> None:
    views[kind] = kwargs["pixel_values"]


def recipe_args(tiny_teachers, student_config_dir, data, output_dir, cache, *extra):
    return streaming_args(
        tiny_teachers, student_config_dir, data, output_dir, "--teacher_cache", str(cache),
        "--teacher_cache_shard_size", "4", "--dataloader_num_workers", "2", "--max_steps", "8", "--save_steps", "3",
        *extra,
    )  # fmt: skip


def test_shard_fed_run_killed_mid_epoch_resumes_exactly(tiny_teachers, student_config_dir, tmp_path, monkeypatch):
    """The recipe writes the shards of a 16-image tar stream (4 shards of 4) and trains from them, uninterrupted;
    a second run trains from the written shards (`--train_data` = `--teacher_cache`, the key checked), is killed at
    step 4 and resumed: it trains on the batches of the uninterrupted run, each image once per epoch (1 process, 2
    data-loader workers, 2 epochs of 4 steps)."""
    source, cache = write_shards(tmp_path / "source", "tar", 16, 4), tmp_path / "cache"
    reference = RecordIds(monkeypatch)
    unic.main(recipe_args(tiny_teachers, student_config_dir, source, tmp_path / "reference", cache))
    assert [os.path.basename(path) for path in TeacherOutputShards(str(cache)).files] == [
        f"shard-{n:05d}.tar" for n in range(4)
    ]
    assert_each_epoch_once(reference.steps, 16, 4)

    monkeypatch.undo()
    killed = RecordIds(monkeypatch)
    args = recipe_args(tiny_teachers, student_config_dir, str(cache), tmp_path / "run", cache)
    with pytest.raises(KeyboardInterrupt):
        unic.main(args, callbacks=[KillAt(4)])
    monkeypatch.undo()
    resumed = RecordIds(monkeypatch)
    trainer = unic.main(args)
    assert trainer.state.global_step == 8 and min(resumed.steps) == 4
    assert "teacher-output cache of 2 fixed views" in (tmp_path / "run" / "README.md").read_text()
    stitched = {step: ids for step, ids in killed.steps.items() if step <= 3} | resumed.steps
    assert stitched == reference.steps


@pytest.fixture(scope="module")
def built_shards(tiny_teachers, student_config_dir, tmp_path_factory):
    """Shards written by the recipe (one training step) from 8 id images: 2 shards of 4 (not to be modified)."""
    root = tmp_path_factory.mktemp("built_shards")
    source, cache = write_shards(root / "source", "tar", 8, 2), root / "cache"
    unic.main(recipe_args(tiny_teachers, student_config_dir, source, root / "build", cache, "--max_steps", "1"))
    return str(cache)


@pytest.mark.parametrize(
    "change, message",
    [
        (("--teachers", "DINOV2"), r"differs in: teachers\[0\]\..*"),
        (("--teacher_cache_views", "1"), "differs in: num_views"),
        (("--teacher_cache_crops", "true"), "differs in: crops"),
        (("--load_size", "36"), "differs in: load_size"),
    ],
    ids=["other-teachers", "one-view", "crops", "load-size"],
)
def test_shards_built_for_another_configuration_are_refused(
    change, message, built_shards, tiny_teachers, student_config_dir, tmp_path, monkeypatch
):
    change = tuple(tiny_teachers["dinov2"] if value == "DINOV2" else value for value in change)
    trained = RecordIds(monkeypatch)
    args = recipe_args(tiny_teachers, student_config_dir, built_shards, tmp_path / "run", built_shards, *change)
    with pytest.raises(ValueError, match=f"shards in {built_shards} were built for another configuration.*{message}"):
        unic.main(args)
    assert trained.steps == {}  # refused before training


def test_a_missing_shard_is_refused_before_training(
    built_shards, tiny_teachers, student_config_dir, tmp_path, monkeypatch
):
    cache = str(tmp_path / "cache")
    shutil.copytree(built_shards, cache)
    os.remove(os.path.join(cache, "shard-00001.tar"))
    trained = RecordIds(monkeypatch)
    args = recipe_args(tiny_teachers, student_config_dir, cache, tmp_path / "run", cache)
    with pytest.raises(ValueError, match="shard-00001.tar is missing"):
        unic.main(args)
    assert trained.steps == {}


def test_shards_need_a_streamed_training_set(tiny_teachers, tmp_path):
    images, _ = mnist_images(4)
    teacher = load_teacher(tiny_teachers["vit"], grid_alignment="resize")
    dataset = Dataset.from_dict({"image": images})
    TeacherOutputShards.build(
        str(tmp_path / "shards"), [("vit", teacher)], dataset, "image", image_size=32, load_size=32,
        student_mean=MEAN, student_std=STD, grid_size=(4, 4),
    )  # fmt: skip
    student = UnicStudentModel(
        UnicStudentConfig(backbone_config=tiny_vit_config(), teachers=[teacher_spec("vit", teacher)])
    )
    args = UnicConfig(
        output_dir=str(tmp_path / "out"), teacher_cache=str(tmp_path / "shards"), image_size=32, load_size=32,
        max_steps=1, report_to="none", use_cpu=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="WebDataset teacher-output shards, read as a stream: train with --streaming"):
        UnicTrainer(model=student, args=args, train_dataset=dataset)
    stream = StreamingImageDataset(load_streaming_dataset(str(tmp_path / "shards"), "png"), 0, 0, 0, 1)
    args.load_size = 36
    with pytest.raises(ValueError, match="do not match this run: images loaded at 32 px cached, training uses 36 px"):
        UnicTrainer(model=student, args=args, train_dataset=stream, image_column="png")
