"""The build options both teacher-output cache formats share ([`CacheOptions`]): how the images are read and viewed
for the teachers, how their outputs are stored, and with the teachers' identities the part of the cache key that
determines the stored values; [`CacheOptions.outputs`] runs the teachers over a batch of images."""

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from ..data.augmentations import resized_crop
from ..data.image_datasets import ImageCollator
from .cache_views import CropViews, fixed_views

BOXES = "views.boxes"  # the stored crop boxes of random-crop views: left, top, width, height, flip

# identity fields recorded for each teacher but not part of the key: they do not change the stored values
_NOT_KEYED = ("source", "revision")


@dataclass(frozen=True)
class CacheOptions:
    """How the images are read and viewed for the teachers, and how their outputs are stored: the build options that
    both cache formats ([`TeacherOutputCache`], [`~hf_distill.trainers.teacher_cache_shards.TeacherOutputShards`])
    share, and with the teachers the part of their cache key that determines the stored values.

    Args:
        image_column (`str`): column holding the images.
        image_size (`int`): side of the student's (and the teachers') views.
        load_size (`int`): side of the decoded images the views are cut from.
        student_mean, student_std (`list[float]`): the student's normalization, which the teachers' inputs go through.
        grid_size (`tuple[int, int]`): the student's patch grid, which the teachers' patch tokens are aligned to.
        num_views (`int`, defaults to 2): fixed views 1 (center) or 2 (center + flip), or the number of `crops`.
        dtype (`torch.dtype`, defaults to `torch.float16`): storage dtype of the outputs.
        jpeg_draft (`bool`, defaults to `True`): JPEG images decoded at reduced size before the resize (as the
            training collator does).
        crops ([`CropViews`], *optional*): `num_views` random resized crops per image instead of the fixed views.
    """

    image_column: str
    image_size: int
    load_size: int
    student_mean: list[float]
    student_std: list[float]
    grid_size: tuple[int, int]
    num_views: int = 2
    dtype: torch.dtype = torch.float16
    jpeg_draft: bool = True
    crops: CropViews | None = None

    def __post_init__(self):
        if self.crops is None and self.num_views not in (1, 2):
            raise ValueError(
                f"num_views must be 1 (center) or 2 (center + flip) for fixed views, got {self.num_views}; pass crops= "
                "for more random-crop views."
            )
        if self.num_views < 1:
            raise ValueError(f"num_views must be at least 1, got {self.num_views}.")

    def description(self, identities: list[dict]) -> dict:
        """What determines the teacher outputs a cache stores for each image, in every cache format's key: the
        teachers (their identities less `_NOT_KEYED`), how the images are read and viewed, and the storage dtype."""
        description = {
            "teachers": [{k: v for k, v in identity.items() if k not in _NOT_KEYED} for identity in identities],
            "image_column": self.image_column,
            "image_size": self.image_size,
            "load_size": self.load_size,
            "student_mean": [float(v) for v in self.student_mean],
            "student_std": [float(v) for v in self.student_std],
            "grid_size": list(self.grid_size),
            "num_views": self.num_views,
            "dtype": str(self.dtype).removeprefix("torch."),
            "jpeg_draft": self.jpeg_draft,  # the decoded pixels of JPEG images differ
        }
        if self.crops is not None:  # only then: the key of a fixed-view cache is unchanged
            description["crops"] = self.crops.describe()
        return description

    def describe_views(self) -> str:
        if self.crops is None:
            return f"{self.num_views} fixed views (center crop and flip)"
        return (
            f"{self.num_views} random resized crops (+ flips) per image, drawn once (seed {self.crops.seed}, scale "
            f"{list(self.crops.scale)}, flip probability {self.crops.flip_prob})"
        )

    @staticmethod
    def from_description(description: dict) -> "CacheOptions":
        """The options a cache was built with, from the `content` of its index."""
        crops = description.get("crops")
        return CacheOptions(
            description["image_column"], description["image_size"], description["load_size"],
            description["student_mean"], description["student_std"], tuple(description["grid_size"]),
            description["num_views"], getattr(torch, description["dtype"]), description.get("jpeg_draft", False),
            None if crops is None else CropViews(crops["seed"], tuple(crops["scale"]), tuple(crops["ratio"]),
                                                 crops["flip_prob"]),
        )  # fmt: skip

    def outputs(self, teachers, subset, batch_size, device, progress, boxes=None) -> dict[str, torch.Tensor]:
        """`{"{teacher}.summary": [n, V, D], "{teacher}.patch": [n, V, h * w, D]}` of the fixed views of `subset` (a
        dataset or a list of examples), or of its crops `boxes` (`[n, V, 5]`, then also stored as `views.boxes`);
        `progress` (a tqdm bar, or `None`) advances by the images done."""
        device = torch.device(device)
        mean = torch.tensor(self.student_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.student_std, device=device).view(1, -1, 1, 1)
        outputs: dict[str, list[torch.Tensor]] = {}
        collate = ImageCollator(self.load_size, image_column=self.image_column, jpeg_draft=self.jpeg_draft)
        done = 0
        for batch in DataLoader(subset, batch_size=batch_size, collate_fn=collate):
            pixels = batch["pixel_values"].to(device)
            per_view = {}
            for view in range(self.num_views):
                if boxes is None:
                    views = fixed_views(pixels, self.image_size, torch.full((pixels.shape[0],), view, device=device))
                else:
                    crops = boxes[done : done + pixels.shape[0], view].to(device)
                    views = resized_crop(pixels, crops, self.image_size)
                normalized = (views - mean) / std
                for name, teacher in teachers:
                    result = teacher(normalized, mean.flatten(), std.flatten(), grid_size=self.grid_size)
                    per_view.setdefault(f"{name}.summary", []).append(result.summary.to(self.dtype).cpu())
                    per_view.setdefault(f"{name}.patch", []).append(result.patch_tokens.to(self.dtype).cpu())
            for key, values in per_view.items():
                outputs.setdefault(key, []).append(torch.stack(values, dim=1))  # [b, V, ...]
            if progress is not None:
                progress.update(pixels.shape[0])
            done += pixels.shape[0]
        tensors = {key: torch.cat(values).contiguous() for key, values in outputs.items()}
        if boxes is not None:
            tensors[BOXES] = boxes.contiguous()
        return tensors
