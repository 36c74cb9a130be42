"""Teacher outputs precomputed as WebDataset shards, for streaming data (as Theia stores its teachers' features).

The map-style [`TeacherOutputCache`] indexes outputs by row of a dataset it holds in memory; a web-scale stream has no
rows to index. Here every sample is written with its outputs into tar shards that the `webdataset` builder of
`datasets` streams like any other WebDataset (`load_dataset("webdataset", data_files=..., streaming=True)`, or
`--train_data DIR --streaming` with [`~hf_distill.data.streaming.load_streaming_dataset`]):

    DIR/shard-00000.tar     000000000.png                  the sample's encoded image, as read
                            000000000.{teacher}.summary.npy  [V, D] summary token of each fixed view
                            000000000.{teacher}.patch.npy    [V, h * w, D] patch tokens of each fixed view
                            000000001.png ...
    DIR/shard-00000.json    its cache key, samples, size and XXH3-128 checksum (written atomically after the shard)
    DIR/cache.json          written last: teachers, sizes, grid, views, dtype, and every shard with its checksum

The views are those of [`TeacherOutputCache`]: fixed (view 0: the resized center crop, view 1: its horizontal flip)
or random resized crops drawn once ([`CropViews`], their boxes stored as `{key}.views.boxes.npy` `[V, 5]`; drawn
from one generator over the stream, so image `i` gets the boxes a map-style cache of the same data would give it). The
cache key covers the same things ([`CacheOptions`]: teacher weights fingerprints and options, sizes, normalization,
grid, views, storage dtype, decoding; plus the data's fingerprint and the shard size). A build that is stopped and
started again keeps every shard whose record names this key and whose checksum matches, and writes the others.

Training reads the shards as a stream (`--streaming --teacher_cache DIR` in the UNIC recipe): a
[`~hf_distill.data.streaming.StreamingImageDataset`] over them, batches collated by [`ShardCollator`] (images decoded,
outputs stacked), and [`TeacherOutputShards.views`] / [`TeacherOutputShards.lookup`] give the student the view the
teachers saw and their outputs of it.
"""

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.augmentations import resized_crop
from ..io_utils import atomic_path, write_json_atomically
from ..models.fingerprint import teacher_identity
from .cache_options import BOXES, CacheOptions
from .cache_views import CropViews, fixed_views
from .teacher_cache import CACHE_INDEX, TeacherOutputCache, _differences, checksum, file_checksum

logger = logging.getLogger(__name__)
SHARDS_FORMAT = "webdataset-1"
_SHARD = re.compile(r"shard-(\d{5})\.(tar|json)$")
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")


def _image_bytes(image) -> tuple[bytes, str]:
    """The encoded bytes and extension of an undecoded image (`{"bytes", "path"}`, as streamed), or of a PIL image
    (re-encoded as PNG)."""
    if isinstance(image, dict):
        path = image.get("path") or ""
        extension = os.path.splitext(path)[1].lstrip(".").lower()
        data = image.get("bytes")
        if data is None:
            with open(path, "rb") as handle:
                data = handle.read()
        return data, extension if extension in _IMAGE_EXTENSIONS else "png"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _first_sample(path: str) -> dict[str, np.ndarray]:
    """`{"{teacher}.summary" | "{teacher}.patch": array}` of the first sample of a shard."""
    arrays, key = {}, None
    with tarfile.open(path) as tar:
        for member in tar:
            sample_key, field = member.name.split(".", 1)
            if key is not None and sample_key != key:
                break
            key = sample_key
            if field.endswith(".npy"):
                arrays[field.removesuffix(".npy")] = np.load(tar.extractfile(member), allow_pickle=False)
    return arrays


class TeacherOutputShards:
    """Teacher outputs stored in WebDataset tar shards (see the module docstring).

    Opening checks the index and the size of every shard; [`~TeacherOutputShards.verify`] reads every shard and checks
    its checksum. Problems are `ValueError`s naming the file and saying how to rebuild.
    """

    def __init__(self, directory: str):
        rebuild = f"Build it again with TeacherOutputShards.build({directory!r}, ...): intact shards are kept."
        info = _read_json(os.path.join(directory, CACHE_INDEX))
        if info is None:
            raise ValueError(
                f"{directory} holds no complete teacher-output shards ({CACHE_INDEX} is missing or unreadable: the "
                f"build did not finish). {rebuild}"
            )
        if info.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{directory} is not a WebDataset teacher-output cache ({info.get('format')}). {rebuild}")
        for shard in info["shards"]:
            path = os.path.join(directory, shard["file"])
            if not os.path.isfile(path) or os.path.getsize(path) != shard["bytes"]:
                raise ValueError(
                    f"Shard {path} is missing or does not have the {shard['bytes']} bytes written. {rebuild}"
                )
        self.directory, self.info, self._rebuild = directory, info, rebuild

    @property
    def teacher_names(self) -> list[str]:
        return [teacher["name"] for teacher in self.info["teachers"]]

    @property
    def files(self) -> list[str]:
        """The shard paths, in order (e.g. for `--train_data` or `load_dataset("webdataset", data_files=...)`)."""
        return [os.path.join(self.directory, shard["file"]) for shard in self.info["shards"]]

    def verify(self) -> None:
        """Read every shard and compare its checksum with the one written with it."""
        for shard, path in zip(self.info["shards"], self.files):
            if file_checksum(path) != shard["xxh3_128"]:
                raise ValueError(
                    f"Shard {path} is corrupt (its checksum differs from the one written). {self._rebuild}"
                )

    def examples(self) -> Iterator[dict]:
        """Every sample in order: `{"__key__", "image": bytes, "{teacher}.summary": [V, D], "{teacher}.patch":
        [V, h * w, D]}` (numpy arrays in the stored dtype)."""
        for path in self.files:
            sample = {}
            with tarfile.open(path) as tar:
                for member in tar:
                    key, field = member.name.split(".", 1)
                    if sample and key != sample["__key__"]:
                        yield sample
                        sample = {}
                    data = tar.extractfile(member).read()
                    sample["__key__"] = key
                    if field.endswith(".npy"):
                        sample[field.removesuffix(".npy")] = np.load(io.BytesIO(data), allow_pickle=False)
                    else:
                        sample["image"] = data
            if sample:
                yield sample

    # ------------------------------------------------------------------ training from the shards

    @property
    def options(self) -> CacheOptions:
        """The options the shards were built with."""
        return CacheOptions.from_description(self.info["content"])

    @property
    def num_views(self) -> int:
        return self.info["num_views"]

    @property
    def crops(self) -> CropViews | None:
        return self.options.crops

    def describe_views(self) -> str:
        return self.options.describe_views()

    def teacher_specs(self) -> list[dict]:
        """`{"name", "summary_dim", "patch_dim"}` per teacher, for the student config."""
        return [
            {key: teacher[key] for key in ("name", "summary_dim", "patch_dim")} for teacher in self.info["teachers"]
        ]

    @property
    def fields(self) -> list[str]:
        """The arrays of each sample a training batch needs: every teacher's outputs (and the crop boxes)."""
        fields = [f"{name}.{part}" for name in self.teacher_names for part in ("summary", "patch")]
        return fields + ([BOXES] if self.crops is not None else [])

    @property
    def image_column(self) -> str:
        """The column of the images when the shards are streamed: the extension of the first sample's image."""
        with tarfile.open(self.files[0]) as tar:
            for member in tar:
                field = member.name.split(".", 1)[1]
                if not field.endswith(".npy"):
                    return field
        raise ValueError(f"Shard {self.files[0]} holds no image. {self._rebuild}")

    def check_key(self, identities: list[dict], options: CacheOptions) -> None:
        """Fail, naming what differs, unless the shards were built for exactly these teachers (`identities`, see
        [`~hf_distill.models.fingerprint.teacher_identity`]) and `options`: the cache key the run expects (the data
        fields of the key are the shards' own: training reads the data from the shards)."""
        content = self.info["content"]
        expected = {
            "format": SHARDS_FORMAT,
            **options.description(identities),
            "data_fingerprint": content.get("data_fingerprint"),
            "samples_per_shard": content.get("samples_per_shard"),
        }
        if checksum(json.dumps(expected, sort_keys=True).encode()) != self.info["key"]:
            changed = ", ".join(_differences(content, expected)) or "format"
            raise ValueError(
                f"The teacher-output shards in {self.directory} were built for another configuration than this run "
                f"(differs in: {changed}). Build them again for these teachers and options (train with --train_data "
                f"SOURCE --streaming true --teacher_cache {self.directory}, or TeacherOutputShards.build): intact "
                "shards of this configuration are kept."
            )

    def check(self, dataset, image_size: int, grid_size: tuple[int, int], load_size: int, jpeg_draft: bool) -> None:
        """Fail with a clear message when a training stream `dataset` (a
        [`~hf_distill.data.streaming.StreamingImageDataset`]) does not read these shards' outputs, or when the shards
        were built for another size, grid or decoding than the run's."""
        from ..data.streaming import StreamingImageDataset

        if not isinstance(dataset, StreamingImageDataset):
            raise ValueError(
                f"{self.directory} holds WebDataset teacher-output shards, read as a stream: train with --streaming "
                f"true (a StreamingImageDataset over the shards), or build a map-style --teacher_cache."
            )
        options, problems = self.options, []
        columns = list(dataset.dataset.features or {})
        missing = [field for field in self.fields if f"{field}.npy" not in columns]
        if missing:
            problems.append(f"the training stream has no {', '.join(missing)} (it does not read these shards)")
        if options.image_size != image_size:
            problems.append(f"views of {options.image_size} px cached, training uses {image_size} px")
        if options.load_size != load_size:
            problems.append(f"images loaded at {options.load_size} px cached, training uses {load_size} px")
        if options.jpeg_draft != jpeg_draft:
            problems.append(f"JPEG draft decoding {options.jpeg_draft} cached, training uses {jpeg_draft}")
        if tuple(options.grid_size) != tuple(grid_size):
            problems.append(f"grid {list(options.grid_size)} cached, the student's is {list(grid_size)}")
        if problems:
            raise ValueError(
                f"The teacher-output shards in {self.directory} do not match this run: {'; '.join(problems)}. "
                f"{self._rebuild}"
            )

    def collator(self, image_collator) -> "ShardCollator":
        return ShardCollator(image_collator, self.fields)

    def views(
        self, pixel_values: torch.Tensor, boxes: torch.Tensor | None, views: torch.Tensor, size: int
    ) -> torch.Tensor:
        """The student's view of the cached views `views` of a batch: uint8 `[B, 3, S, S]` images loaded at the load
        size -> float `[B, 3, size, size]` in [0, 1], the very view the teachers saw (`boxes`: the batch's stored
        crops `[B, V, 5]`, `None` for fixed views)."""
        if self.crops is None:
            return fixed_views(pixel_values, size, views)
        rows = torch.arange(views.shape[0], device=views.device)
        return resized_crop(pixel_values, boxes[rows, views].to(pixel_values.device), size)

    @staticmethod
    def lookup(
        name: str, batch: dict, views: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summary `[B, D]` and patch tokens `[B, h * w, D]` (float32, on `device`) of views `views` of a batch of
        a [`ShardCollator`]."""
        rows = torch.arange(views.shape[0], device=views.device)
        summary, patch = batch[f"{name}.summary"].to(views.device), batch[f"{name}.patch"].to(views.device)
        return summary[rows, views].to(device, torch.float32), patch[rows, views].to(device, torch.float32)

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        directory: str,
        teachers: list[tuple[str, torch.nn.Module]],
        examples: Iterable[dict],
        image_column: str,
        batch_size: int = 64,
        samples_per_shard: int = 1000,
        device: torch.device | str = "cpu",
        data_fingerprint: str | None = None,
        **options,
    ) -> "TeacherOutputShards":
        """Run `teachers` (`(name, module)` pairs) on the cached views of every example of `examples` (a streamed or
        map-style dataset, read once in order) and write them, with the images, as shards of `samples_per_shard`.

        `options`: the other fields of [`~hf_distill.trainers.cache_options.CacheOptions`] (`image_size`,
        `load_size`, `student_mean`, `student_std`, `grid_size`, `num_views`, `dtype`, `jpeg_draft`, and `crops`:
        [`CropViews`] for `num_views` random resized crops per image, their boxes stored with the outputs as
        `{key}.views.boxes.npy` `[V, 5]`). `data_fingerprint` identifies the data in the cache key (default: the
        dataset's own fingerprint). Shards of an earlier build with the same key that pass their checksum are kept
        without running the teachers.
        """
        options = CacheOptions(image_column, **options)
        for name, _ in teachers:
            if "/" in name:
                raise ValueError(f"Teacher name {name!r}: a '/' cannot be part of a file name in a tar shard.")
        if data_fingerprint is None:
            data_fingerprint = getattr(examples, "_fingerprint", None) or getattr(
                examples, "_hf_distill_fingerprint", None
            )
        os.makedirs(directory, exist_ok=True)
        identities = [{"name": name, **teacher_identity(teacher)} for name, teacher in teachers]
        description = {
            "format": SHARDS_FORMAT,
            **options.description(identities),
            "data_fingerprint": data_fingerprint,
            "samples_per_shard": samples_per_shard,
        }
        # crops: one generator drawn shard after shard (kept shards too), so image i gets the boxes of a one-call draw
        generator = torch.Generator().manual_seed(options.crops.seed) if options.crops is not None else None
        key = checksum(json.dumps(description, sort_keys=True).encode())
        index_path = os.path.join(directory, CACHE_INDEX)

        def outputs_of(chunk: list[dict], boxes: torch.Tensor | None) -> dict[str, np.ndarray]:
            outputs = options.outputs(teachers, chunk, batch_size, device, progress=None, boxes=boxes)
            return {field: values.numpy() for field, values in outputs.items()}

        records, written, number, first = [], 0, 0, 0
        progress = tqdm(desc="Caching teacher outputs as shards", unit="img")
        chunk: list[dict] = []
        iterator = iter(examples)
        while True:
            example = next(iterator, None)
            if example is not None:
                chunk.append(example)
                if len(chunk) < samples_per_shard:
                    continue
            if not chunk:
                break
            name = f"shard-{number:05d}.tar"
            boxes = None
            if generator is not None:
                boxes = options.crops.boxes(len(chunk), options.num_views, options.load_size, generator)
            path, record_path = os.path.join(directory, name), os.path.join(directory, f"shard-{number:05d}.json")
            record = _read_json(record_path)
            intact = (
                record is not None
                and record.get("key") == key
                and record.get("samples") == len(chunk)
                and os.path.isfile(path)
                and os.path.getsize(path) == record.get("bytes")
                and file_checksum(path) == record.get("xxh3_128")
            )
            if not intact:
                if os.path.exists(index_path):
                    os.remove(index_path)  # a build stopped from here on leaves no index naming a mix of shards
                outputs = outputs_of(chunk, boxes)
                with atomic_path(path) as temporary:
                    with tarfile.open(temporary, "w") as tar:
                        for row, sample in enumerate(chunk):
                            sample_key = f"{first + row:09d}"
                            data, extension = _image_bytes(sample[image_column])
                            _add(tar, f"{sample_key}.{extension}", data)
                            for field, values in outputs.items():
                                _add(tar, f"{sample_key}.{field}.npy", _npy(values[row]))
                    with open(temporary, "rb+") as handle:
                        os.fsync(handle.fileno())
                record = {"file": name, "key": key, "first": first, "samples": len(chunk)}
                record.update(bytes=os.path.getsize(path), xxh3_128=file_checksum(path))
                write_json_atomically(record_path, record)  # after the shard: a shard without its record is rewritten
                written += 1
                dims = {field: values.shape[-1] for field, values in outputs.items() if field != BOXES}
            records.append(record)
            progress.update(len(chunk))
            first, number, chunk = first + len(chunk), number + 1, []
            if example is None:
                break
        progress.close()
        if not records:
            raise ValueError("Cannot build teacher-output shards of an empty dataset.")
        for entry in os.listdir(directory):  # shards of a longer, older build
            match = _SHARD.match(entry)
            if match and int(match.group(1)) >= len(records):
                os.remove(os.path.join(directory, entry))
        if written == 0:  # every shard kept: read the dimensions from the first one
            sample = _first_sample(os.path.join(directory, records[0]["file"]))
            dims = {field: values.shape[-1] for field, values in sample.items() if field != BOXES}
        info = {
            "format": SHARDS_FORMAT,
            "key": key,
            "content": description,
            "teachers": [
                {
                    **identity,
                    "summary_dim": dims[f"{identity['name']}.summary"],
                    "patch_dim": dims[f"{identity['name']}.patch"],
                }
                for identity in identities
            ],
            "num_samples": first,
            "num_views": options.num_views,
            "image_size": options.image_size,
            "load_size": options.load_size,
            "grid_size": list(options.grid_size),
            "dtype": description["dtype"],
            "shards": records,
        }
        write_json_atomically(index_path, info)
        logger.info(
            "Teacher-output shards in %s: %d images in %d shards (%d written, %d kept after checking their checksums)",
            directory, first, len(records), written, len(records) - written,
        )  # fmt: skip
        return cls(directory)


class ShardCollator:
    """Collate examples streamed from [`TeacherOutputShards`]: the images as `image_collator` decodes them
    (`pixel_values`), plus each of `fields` stacked in its stored dtype (`"{teacher}.summary"` `[B, V, D]`,
    `"{teacher}.patch"` `[B, V, h * w, D]`, `"views.boxes"` `[B, V, 5]`)."""

    def __init__(self, image_collator, fields: list[str]):
        self.image_collator = image_collator
        self.fields = fields

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.image_collator(examples)
        for field in self.fields:
            batch[field] = torch.from_numpy(np.stack([np.asarray(example[f"{field}.npy"]) for example in examples]))
        return batch


def open_teacher_cache(directory: str) -> "TeacherOutputCache | TeacherOutputShards":
    """The teacher-output cache in `directory`, of either format (read from its index)."""
    info = _read_json(os.path.join(directory, CACHE_INDEX))
    if info is not None and info.get("format") == SHARDS_FORMAT:
        return TeacherOutputShards(directory)
    return TeacherOutputCache(directory)
