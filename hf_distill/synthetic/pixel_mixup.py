"""Pixel mixup: a cheap stand-in for ImageMixer in the synthesis stage (`--generator pixel-mixup`).

Synthetic image `i` is `lam * a + (1 - lam) * b`, pixel by pixel, of two distinct training images `a` and `b` drawn
uniformly whatever their classes, with `lam ~ Beta(mix_alpha, mix_alpha)` (mixup, Zhang et al. 2018) drawn from the
generator seeded with `(seed, i)`; the pair and `lam` are recorded in the row (`source_indices`, `weights` =
`[lam, 1 - lam]`). It runs no model: thousands of images per second on a CPU. It goes through the same synthesis stage
as ImageMixer images (resumable atomic shards, provenance columns, dataset card), and every row, card and log names it
for what it is, [`PIXEL_MIXUP_LABEL`]: these are not ImageMixer images and results obtained with them are not
ImageMixer results.

```bash
python recipes/synthesize.py --generator pixel-mixup --mix_alpha 0.4 --dataset outputs/data/fashion-mnist \
    --num_images 2000 --output_dir outputs/synthetic/fashion-mnist-pixel-mixup
```
"""

import numpy as np
from PIL import Image

from ..data.image_datasets import to_rgb

IMAGE_MIXER = "image-mixer"
PIXEL_MIXUP = "pixel-mixup"
GENERATORS = (IMAGE_MIXER, PIXEL_MIXUP)
PIXEL_MIXUP_LABEL = "pixel mixup (stand-in for ImageMixer)"
GENERATOR_LABELS = {IMAGE_MIXER: "ImageMixer", PIXEL_MIXUP: PIXEL_MIXUP_LABEL}
"""How each generator is named in the rows (`generator` column), the dataset card and the logs."""


def mix_pixels(first: Image.Image, second: Image.Image, weight: float, size: tuple[int, int] | None = None):
    """`weight * first + (1 - weight) * second` per pixel (8-bit RGB, computed in float64, rounded to the nearest
    level), as a PIL image.

    Args:
        first, second: the two source images (any mode: converted to 8-bit RGB as in training).
        weight: the weight `lam` of `first`, in [0, 1].
        size: `(width, height)` of the mix; both images are resized (bicubic) to it when they differ. Default: the
            size of `first`.
    """
    first, second = to_rgb(first), to_rgb(second)
    size = tuple(size) if size is not None else first.size
    first, second = (image if image.size == size else image.resize(size, Image.BICUBIC) for image in (first, second))
    mixed = weight * np.asarray(first, dtype=np.float64) + (1.0 - weight) * np.asarray(second, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
