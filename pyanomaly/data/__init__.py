"""Image loading and datasets: MVTec AD layout, plain folders and class folders."""

from pyanomaly.data._datasets import (
    MVTEC_LAYOUT,
    ClassFolderDataset,
    FolderDataset,
    MVTecDataset,
    MVTecSample,
    mvtec_categories,
)
from pyanomaly.data._inputs import as_images, image_files
from pyanomaly.data._io import IMAGE_EXTENSIONS, list_image_files, load_image, load_mask, read_image_size
from pyanomaly.data._transforms import resize_masks, stack_resized

__all__ = [
    "as_images",
    "image_files",
    "IMAGE_EXTENSIONS",
    "MVTEC_LAYOUT",
    "load_image",
    "load_mask",
    "read_image_size",
    "list_image_files",
    "MVTecSample",
    "MVTecDataset",
    "mvtec_categories",
    "FolderDataset",
    "ClassFolderDataset",
    "stack_resized",
    "resize_masks",
]
