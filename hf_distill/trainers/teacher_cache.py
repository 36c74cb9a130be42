"""A teacher-output cache: run the teachers once over `num_views` views of every image, then train the student from
stored outputs.

Useful when teachers dominate the cost (CPU runs, small datasets, task-specific probing). Two kinds of views:

- fixed views (default): view 0 is the resized center crop, view 1 its horizontal flip;
- random resized crops (`crops=CropViews(...)`): `num_views` crops (+ flips) per image, drawn ONCE from a seeded
  generator as in UNIC's RandomResizedCrop, their boxes stored with the outputs (as fast knowledge distillation, Shen
  & Xing 2021, stores the crop parameters with its soft labels). The student's view of a cached (image, view) is the
  same crop of the same image ([`TeacherOutputCache.views`]), so cached training keeps the crop augmentation at the
  student's cost only. The boxes depend only on the seed, the number of images and views, the crop options and the
  load size (all in the cache key), so a resumed build draws the same crops.

For each teacher the summary token `[D]` and the patch tokens `[h * w, D]` of every (image, view) are stored in
safetensors shards. During training a view is drawn per image and the stored outputs are read instead of running the
teachers (no color augmentation in this mode).

Layout: `DIR/shard-00000.safetensors` ... with tensors `{teacher}.summary` `[n, V, D]` and `{teacher}.patch`
`[n, V, h * w, D]` (and, for crops, `views.boxes` `[n, V, 5]`: left, top, width, height in pixels of the image loaded
at `load_size`, flip 0 / 1); beside each shard `shard-00000.json` (its cache key, rows, size and XXH3-128 checksum, written
atomically after the shard); and `DIR/cache.json` (written last) describing teachers, sizes, grid, dataset and shards.

Nothing stale, nothing mixed: the cache key covers everything that determines the stored values (each teacher's
weights fingerprint, dtype and reading options, the student's image size, load size, normalization and grid, the
views, the storage dtype, the dataset fingerprint and image column). [`TeacherOutputCache.build`] reuses a shard only
when its key, size and checksum match, and rebuilds the others: a folder reused for another teacher, a changed option,
a shard corrupted in place, or an interrupted build resumed with different teachers never mixes old outputs in.
"""

import json
import logging
import os
import re

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as serialize_safetensors
from tqdm.auto import tqdm

from ..data.augmentations import resized_crop
from ..io_utils import atomic_path, write_json_atomically
from ..models.fingerprint import teacher_identity
from .cache_options import BOXES, CacheOptions
from .cache_views import fixed_views

logger = logging.getLogger(__name__)
INDEX_COLUMN = "__sample_index__"
CACHE_INDEX = "cache.json"
CACHE_FORMAT = 2
SHARD_PATTERN = re.compile(r"shard-(\d{5})\.(safetensors|json)$")


def checksum(data: bytes | memoryview) -> str:
    """XXH3-128 hex digest (about 4 GB/s on one core: every shard is verified each time the cache is opened)."""
    return xxhash.xxh3_128(data).hexdigest()


def file_checksum(path: str, chunk_size: int = 64 << 20) -> str:
    """[`checksum`] of a file, read in chunks."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`, or `None` when it is missing or unreadable (a stale or partial record)."""
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _differences(old, new, prefix: str = "") -> list[str]:
    """Names of the fields that differ between two key descriptions, e.g. `teachers[0].weights`, `load_size`."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) and prefix in ("teachers",):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [prefix or "format"]


def _shard_problem(directory: str, record: dict | None, key: str | None, start: int, stop: int) -> str | None:
    """Why the shard described by `record` (its sidecar) cannot be reused, or `None` when it is intact."""
    if record is None:
        return "no checksum record (written by an interrupted or older build)"
    path = os.path.join(directory, record.get("file", ""))
    if key is not None and record.get("key") != key:
        return "built for another configuration"
    if (record.get("start"), record.get("stop")) != (start, stop):
        return f"holds rows {record.get('start')}:{record.get('stop')}, expected {start}:{stop}"
    if not os.path.isfile(path):
        return "file missing"
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        return f"{size} bytes on disk, {record.get('bytes')} recorded"
    if file_checksum(path) != record.get("xxh3_128"):
        return "checksum mismatch (the file was modified or corrupted)"
    return None


class TeacherOutputCache:
    """Stored teacher outputs of fixed views, looked up by sample index and view.

    Opening checks the index and the size of every shard; the shards are read (and their checksums verified) by
    [`~TeacherOutputCache.check`] or at the first lookup. Any problem is a `ValueError` naming the file and saying how
    to rebuild.
    """

    def __init__(self, directory: str):
        index_path = os.path.join(directory, CACHE_INDEX)
        rebuild = (
            f"Run the UNIC recipe again with --teacher_cache {directory} (or call TeacherOutputCache.build): it "
            "rebuilds only the shards that are missing, corrupt or stale."
        )
        if not os.path.exists(index_path):
            raise ValueError(
                f"{directory} holds no complete teacher-output cache ({CACHE_INDEX} is missing: the build did not "
                f"finish or never started). {rebuild}"
            )
        info = _read_json(index_path)
        if info is None:
            raise ValueError(f"The teacher-output cache index {index_path} is not valid JSON. {rebuild}")
        if info.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"The teacher-output cache in {directory} was written by an older hf_distill (format "
                f"{info.get('format', 1)}, this version reads {CACHE_FORMAT}). {rebuild}"
            )
        for shard in info["shards"]:
            path = os.path.join(directory, shard["file"])
            if not os.path.isfile(path):
                raise ValueError(f"Shard {path} of the teacher-output cache is missing. {rebuild}")
            if os.path.getsize(path) != shard["bytes"]:
                raise ValueError(
                    f"Shard {path} of the teacher-output cache has {os.path.getsize(path)} bytes, {shard['bytes']} "
                    f"were written: it was truncated or replaced. {rebuild}"
                )
        self.info = info
        self.directory = directory
        self._rebuild_hint = rebuild
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def teacher_names(self) -> list[str]:
        return [teacher["name"] for teacher in self.info["teachers"]]

    @property
    def num_views(self) -> int:
        return self.info["num_views"]

    @property
    def crops(self) -> dict | None:
        """The crop options (`seed`, `scale`, `ratio`, `flip_prob`) of a cache of random crops, `None` for fixed views."""
        return self.info["content"].get("crops")

    def describe_views(self) -> str:
        return CacheOptions.from_description(self.info["content"]).describe_views()

    def views(self, pixel_values: torch.Tensor, indices: torch.Tensor, views: torch.Tensor, size: int) -> torch.Tensor:
        """The student's view of cached (image `indices`, view `views`) pairs: uint8 `[B, 3, S, S]` images loaded at
        the cache's load size -> float `[B, 3, size, size]` in [0, 1], the very view the teachers saw."""
        if self.crops is None:
            return fixed_views(pixel_values, size, views)
        boxes = self._load()[BOXES][indices.cpu(), views.cpu()]
        return resized_crop(pixel_values, boxes.to(pixel_values.device), size)

    def teacher_specs(self) -> list[dict]:
        """`{"name", "summary_dim", "patch_dim"}` per teacher, for the student config."""
        return [
            {key: teacher[key] for key in ("name", "summary_dim", "patch_dim")} for teacher in self.info["teachers"]
        ]

    def check(
        self,
        dataset,
        image_size: int,
        grid_size: tuple[int, int],
        load_size: int | None = None,
        jpeg_draft: bool | None = None,
    ) -> None:
        """Fail with a clear message when the cache was built for other data, another size or another grid, then
        read every shard and verify its checksum (so a corrupt shard is reported before training starts)."""
        problems = []
        if self.info["num_samples"] != len(dataset):
            problems.append(f"{self.info['num_samples']} samples cached, the dataset has {len(dataset)}")
        if self.info["dataset_fingerprint"] != getattr(dataset, "_fingerprint", None):
            problems.append("the dataset fingerprint differs")
        if self.info["image_size"] != image_size:
            problems.append(f"views of {self.info['image_size']} px cached, training uses {image_size} px")
        if load_size is not None and self.info["load_size"] != load_size:
            problems.append(f"images loaded at {self.info['load_size']} px cached, training uses {load_size} px")
        if jpeg_draft is not None and self.info.get("jpeg_draft", False) != jpeg_draft:
            problems.append(
                f"JPEG draft decoding {self.info.get('jpeg_draft', False)} cached, training uses {jpeg_draft}"
            )
        if tuple(self.info["grid_size"]) != tuple(grid_size):
            problems.append(f"grid {self.info['grid_size']} cached, the student's is {list(grid_size)}")
        if problems:
            raise ValueError(
                f"The teacher-output cache in {self.directory} does not match this run: {'; '.join(problems)}. "
                f"{self._rebuild_hint}"
            )
        self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            shards = []
            for shard in self.info["shards"]:
                path = os.path.join(self.directory, shard["file"])
                try:
                    with open(path, "rb") as handle:
                        data = handle.read()
                except FileNotFoundError as error:
                    message = f"Shard {path} of the teacher-output cache is missing. {self._rebuild_hint}"
                    raise ValueError(message) from error
                if checksum(data) != shard["xxh3_128"]:
                    raise ValueError(
                        f"Shard {path} of the teacher-output cache is corrupt (its checksum differs from the one "
                        f"written with it). {self._rebuild_hint}"
                    )
                try:
                    shards.append(load_safetensors(data))
                except SafetensorError as error:
                    message = f"Shard {path} is not a readable safetensors file ({error}). {self._rebuild_hint}"
                    raise ValueError(message) from error
            with torch.autocast("cpu", enabled=False):  # CPU autocast refuses to concatenate float16 tensors
                self._tensors = {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]}
        return self._tensors

    def lookup(
        self, name: str, indices: torch.Tensor, views: torch.Tensor, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summary `[B, D]` and patch tokens `[B, h * w, D]` (float32, on `device`) of samples `indices`, views
        `views`."""
        tensors = self._load()
        rows, columns = indices.cpu(), views.cpu()
        summary = tensors[f"{name}.summary"][rows, columns]
        patch = tensors[f"{name}.patch"][rows, columns]
        return summary.to(device, torch.float32), patch.to(device, torch.float32)

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        directory: str,
        teachers: list[tuple[str, torch.nn.Module]],
        dataset,
        image_column: str,
        batch_size: int = 64,
        shard_size: int = 2048,
        device: torch.device | str = "cpu",
        **options,
    ) -> "TeacherOutputCache":
        """Run `teachers` (`(name, teacher module)` pairs) on every cached view of `dataset` and store their outputs,
        reusing what is already in `directory` when it is intact and was built for exactly this configuration.

        `options`: the other fields of [`CacheOptions`] (`image_size`, `load_size`, `student_mean`, `student_std`,
        `grid_size`, `num_views`, `dtype`, `jpeg_draft`, and `crops`: [`CropViews`] for `num_views` random resized
        crops per image instead of the fixed views).

        Each shard is kept only if its checksum record names this cache key, its rows, its size and its checksum;
        the others (missing, interrupted, corrupt, or built for other teachers, options, sizes or data) are rebuilt
        and the log says which and why. `cache.json` is removed before any shard is rewritten and written last.
        """
        options = CacheOptions(image_column, **options)
        if len(dataset) == 0:
            raise ValueError("Cannot build a teacher-output cache of an empty dataset.")
        os.makedirs(directory, exist_ok=True)
        identities = [{"name": name, **teacher_identity(teacher)} for name, teacher in teachers]
        description = {  # everything that determines the stored values and the shard layout
            "format": CACHE_FORMAT,
            **options.description(identities),
            "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
            "num_samples": len(dataset),
            "shard_size": shard_size,
        }
        crops, num_views = options.crops, options.num_views
        boxes = crops.boxes(len(dataset), num_views, options.load_size) if crops is not None else None
        key = checksum(json.dumps(description, sort_keys=True).encode())
        index_path = os.path.join(directory, CACHE_INDEX)
        previous = _read_json(index_path)
        if previous is not None and previous.get("key") != key:
            changed = _differences(previous.get("content", {}), description)
            logger.warning(
                "The teacher-output cache in %s was built for another configuration (differs in: %s): rebuilding the "
                "shards that do not match.",
                directory,
                ", ".join(changed) or "format",
            )

        starts = list(range(0, len(dataset), shard_size))
        records, rebuilt = [], []
        progress = tqdm(total=len(dataset), desc="Caching teacher outputs", unit="img")
        for number, start in enumerate(starts):
            stop = min(start + shard_size, len(dataset))
            name = f"shard-{number:05d}.safetensors"
            path, record_path = os.path.join(directory, name), os.path.join(directory, f"shard-{number:05d}.json")
            record = _read_json(record_path)
            problem = _shard_problem(directory, record, key, start, stop) if os.path.exists(path) else "file missing"
            if problem is None:
                records.append(record)
                progress.update(stop - start)
                continue
            rebuilt.append(f"{name} ({problem})")
            if os.path.exists(index_path):
                os.remove(index_path)  # a build killed from here on leaves no index naming a mix of old and new shards
            subset = dataset.select(range(start, stop)).select_columns([image_column])
            tensors = options.outputs(
                teachers, subset, batch_size, device, progress, None if boxes is None else boxes[start:stop]
            )
            data = serialize_safetensors(tensors, metadata={"cache_key": key, "rows": f"{start}:{stop}"})
            with atomic_path(path) as temporary, open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            record = {"file": name, "key": key, "start": start, "stop": stop, "bytes": len(data)}
            record["xxh3_128"] = checksum(data)
            write_json_atomically(record_path, record)  # after the shard: a shard without its record is rebuilt
            records.append(record)
        progress.close()
        for entry in sorted(os.listdir(directory)):  # shards of a larger, older build would only confuse
            match = SHARD_PATTERN.match(entry)
            if match and int(match.group(1)) >= len(starts):
                os.remove(os.path.join(directory, entry))

        with open(os.path.join(directory, records[0]["file"]), "rb") as handle:
            first = load_safetensors(handle.read())
        info = {
            "format": CACHE_FORMAT,
            "key": key,
            "content": description,
            "teachers": [
                {
                    **identity,
                    "summary_dim": first[f"{identity['name']}.summary"].shape[-1],
                    "patch_dim": first[f"{identity['name']}.patch"].shape[-1],
                }
                for identity in identities
            ],
            "num_samples": len(dataset),
            "num_views": num_views,
            "image_size": options.image_size,
            "load_size": options.load_size,
            "jpeg_draft": options.jpeg_draft,
            "grid_size": list(options.grid_size),
            "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
            "dtype": description["dtype"],
            "shards": records,
        }
        write_json_atomically(index_path, info)
        if rebuilt:
            logger.info(
                "Teacher-output cache in %s: %d of %d shards built (%s), %d reused after checking their checksums; "
                "%d teachers, %d images x %d views",
                directory, len(rebuilt), len(starts), "; ".join(rebuilt), len(starts) - len(rebuilt), len(teachers),
                len(dataset), num_views,
            )  # fmt: skip
        else:
            logger.info("Using the teacher-output cache in %s (all %d shards verified)", directory, len(starts))
        return cls(directory)
