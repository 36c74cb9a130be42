"""A teacher-output cache for fixed views: run the teachers once, then train the student from stored outputs.

Useful when teachers dominate the cost (CPU runs, small datasets, task-specific probing). Every training image has
`num_views` fixed views: view 0 is the resized center crop, view 1 its horizontal flip. For each teacher the summary
token `[D]` and the patch tokens `[h * w, D]` of every (image, view) are stored in safetensors shards, written
atomically one by one, so an interrupted build resumes where it stopped. During training a view is drawn per image and
the stored outputs are read instead of running the teachers (no random crops or color augmentation in this mode).

Layout: `DIR/shard-00000.safetensors` ... with tensors `{teacher}.summary` `[n, V, D]` and `{teacher}.patch`
`[n, V, h * w, D]`, and `DIR/cache.json` (written last) describing teachers, sizes, grid and the dataset fingerprint.
"""

import json
import logging
import os

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..io_utils import save_safetensors_atomically, write_json_atomically
from ..models.modeling_teacher import teacher_source
from .augmentations import resize_center
from .image_datasets import ImageCollator

logger = logging.getLogger(__name__)
INDEX_COLUMN = "__sample_index__"
CACHE_INDEX = "cache.json"


def fixed_views(pixel_values: torch.Tensor, size: int, views: torch.Tensor) -> torch.Tensor:
    """uint8 `[B, 3, S, S]` -> float `[B, 3, size, size]` in [0, 1]: center view, horizontally flipped where
    `views == 1`."""
    images = resize_center(pixel_values, size)
    return torch.where((views == 1).view(-1, 1, 1, 1), images.flip(-1), images)


class TeacherOutputCache:
    """Stored teacher outputs of fixed views, looked up by sample index and view."""

    def __init__(self, directory: str):
        index_path = os.path.join(directory, CACHE_INDEX)
        if not os.path.exists(index_path):
            raise ValueError(f"{directory} holds no complete teacher-output cache ({CACHE_INDEX} is missing).")
        with open(index_path) as handle:
            self.info = json.load(handle)
        self.directory = directory
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def teacher_names(self) -> list[str]:
        return [teacher["name"] for teacher in self.info["teachers"]]

    @property
    def num_views(self) -> int:
        return self.info["num_views"]

    def teacher_specs(self) -> list[dict]:
        """`{"name", "summary_dim", "patch_dim"}` per teacher, for the student config."""
        return [
            {key: teacher[key] for key in ("name", "summary_dim", "patch_dim")} for teacher in self.info["teachers"]
        ]

    def check(self, dataset, image_size: int, grid_size: tuple[int, int]) -> None:
        """Fail with a clear message when the cache was built for other data, another size or another grid."""
        problems = []
        if self.info["num_samples"] != len(dataset):
            problems.append(f"{self.info['num_samples']} samples cached, the dataset has {len(dataset)}")
        if self.info["dataset_fingerprint"] != getattr(dataset, "_fingerprint", None):
            problems.append("the dataset fingerprint differs")
        if self.info["image_size"] != image_size:
            problems.append(f"views of {self.info['image_size']} px cached, training uses {image_size} px")
        if tuple(self.info["grid_size"]) != tuple(grid_size):
            problems.append(f"grid {self.info['grid_size']} cached, the student's is {list(grid_size)}")
        if problems:
            raise ValueError(
                f"The teacher-output cache in {self.directory} does not match this run: {'; '.join(problems)}. "
                "Point --teacher_cache to a new folder to rebuild it."
            )

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            shards = [load_file(os.path.join(self.directory, name)) for name in self.info["shards"]]
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
        image_size: int,
        load_size: int,
        student_mean: list[float],
        student_std: list[float],
        grid_size: tuple[int, int],
        num_views: int = 2,
        batch_size: int = 64,
        shard_size: int = 2048,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> "TeacherOutputCache":
        """Run `teachers` (`(name, teacher module)` pairs) on every fixed view of `dataset` and store their outputs.

        Shards already on disk are kept (an interrupted build resumes); `cache.json` is written last.
        """
        if num_views not in (1, 2):
            raise ValueError(f"num_views must be 1 (center) or 2 (center + flip), got {num_views}.")
        os.makedirs(directory, exist_ok=True)
        device = torch.device(device)
        mean = torch.tensor(student_mean, device=device)
        std = torch.tensor(student_std, device=device)
        collate = ImageCollator(load_size, image_column=image_column)
        shard_names = []
        starts = list(range(0, len(dataset), shard_size))
        progress = tqdm(total=len(dataset), desc="Caching teacher outputs", unit="img")
        for number, start in enumerate(starts):
            shard_name = f"shard-{number:05d}.safetensors"
            shard_names.append(shard_name)
            path = os.path.join(directory, shard_name)
            stop = min(start + shard_size, len(dataset))
            if os.path.exists(path):
                progress.update(stop - start)
                continue
            outputs: dict[str, list[torch.Tensor]] = {}
            subset = dataset.select(range(start, stop)).select_columns([image_column])
            for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
                pixels = batch["pixel_values"].to(device)
                per_view = {}
                for view in range(num_views):
                    views = torch.full((pixels.shape[0],), view, device=device)
                    normalized = (fixed_views(pixels, image_size, views) - mean.view(1, -1, 1, 1)) / std.view(
                        1, -1, 1, 1
                    )
                    for name, teacher in teachers:
                        result = teacher(normalized, mean, std, grid_size=grid_size)
                        per_view.setdefault(f"{name}.summary", []).append(result.summary.to(dtype).cpu())
                        per_view.setdefault(f"{name}.patch", []).append(result.patch_tokens.to(dtype).cpu())
                for key, values in per_view.items():
                    outputs.setdefault(key, []).append(torch.stack(values, dim=1))  # [b, V, ...]
                progress.update(pixels.shape[0])
            save_safetensors_atomically({key: torch.cat(values) for key, values in outputs.items()}, path)
        progress.close()
        first = load_file(os.path.join(directory, shard_names[0]))
        info = {
            "teachers": [
                {
                    "name": name,
                    "summary_dim": first[f"{name}.summary"].shape[-1],
                    "patch_dim": first[f"{name}.patch"].shape[-1],
                    "source": teacher_source(teacher),
                    "summary": getattr(getattr(teacher, "config", None), "summary", "mean_patch"),
                    "grid_alignment": getattr(teacher, "grid_alignment", None),
                }
                for name, teacher in teachers
            ],
            "num_samples": len(dataset),
            "num_views": num_views,
            "image_size": image_size,
            "grid_size": list(grid_size),
            "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
            "dtype": str(dtype).removeprefix("torch."),
            "shards": shard_names,
        }
        write_json_atomically(os.path.join(directory, CACHE_INDEX), info)
        logger.info(
            "Cached the outputs of %d teachers for %d images x %d views in %s",
            len(teachers),
            len(dataset),
            num_views,
            directory,
        )
        return cls(directory)
