from .augmentations import UnicAugmentation, resize_center
from .image_datasets import ImageCollator, load_image_dataset

__all__ = ["ImageCollator", "UnicAugmentation", "load_image_dataset", "resize_center"]
