"""Datasets over folders of images: MVTec AD layout, plain folders, class folders."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from pyanomaly.data._io import PathLike, list_image_files, load_image, load_mask, read_image_size

__all__ = [
    "MVTecSample",
    "MVTecDataset",
    "mvtec_categories",
    "FolderDataset",
    "ClassFolderDataset",
    "MVTEC_LAYOUT",
]

#: Human-readable description of the expected MVTec AD layout (used in errors).
MVTEC_LAYOUT = (
    "<root>/<category>/train/good/<images>, <root>/<category>/test/<defect>/<images> "
    "(defect 'good' = normal) and <root>/<category>/ground_truth/<defect>/<name>_mask.png"
)

_NORMAL = "good"


def _visible_subfolders(folder: Path) -> list[Path]:
    """Sorted non-hidden subdirectories of ``folder``."""
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _require_folder(folder: Path, what: str, expected: str) -> None:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "not found"
        raise FileNotFoundError(f"{what} {state}: {folder} (expected {expected})")


def _check_name(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise ValueError(f"{name} must be a folder name (non-empty string without separators), got {value!r}")
    return value


def _categories_in(root: Path) -> list[str]:
    return [
        folder.name
        for folder in _visible_subfolders(root)
        if (folder / "train").is_dir() or (folder / "test").is_dir()
    ]


def mvtec_categories(root: PathLike) -> list[str]:
    """Names of the MVTec AD categories under ``root``, sorted.

    A category is a (non-hidden) subfolder holding a ``train/`` or ``test/`` folder.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no category folder was found.
    """
    root_dir = Path(root)
    _require_folder(root_dir, "MVTec AD root folder", f"the layout {MVTEC_LAYOUT}")
    categories = _categories_in(root_dir)
    if not categories:
        raise ValueError(
            f"no MVTec AD category (a folder with train/ or test/ inside) found under {root_dir}; "
            f"expected the layout {MVTEC_LAYOUT}"
        )
    return categories


class MVTecSample(NamedTuple):
    """One MVTec AD sample.

    Attributes:
        image: uint8 tensor (C, H, W), C = 1 (grayscale) or 3.
        label: 0 = normal, 1 = anomalous.
        mask: bool tensor (H, W); all False for normal images.
        defect_type: name of the defect folder ("good" for normal images).
        path: image file path.
    """

    image: torch.Tensor
    label: int
    mask: torch.Tensor
    defect_type: str
    path: str


class MVTecDataset(Dataset):
    """A split of one category in the MVTec AD folder layout.

    Layout: ``<root>/<category>/train/good/*`` (training, all normal),
    ``<root>/<category>/test/<defect>/*`` (``good`` = normal, any other folder
    = anomalous) and ``<root>/<category>/ground_truth/<defect>/<stem>_mask.png``
    for every anomalous test image. Image files are .png .jpg .jpeg .bmp .tif
    .tiff (any case); hidden files and other files are ignored; order is
    sorted by defect folder then file name. Images may differ in size. Every
    anomalous image must have a mask of its own size; this is checked (from
    file headers) when the dataset is built. Only ``train/good`` is read for
    the training split.

    Args:
        root: folder holding the category folders.
        category: category folder name, e.g. "bottle".
        split: "train" or "test".
        grayscale: load images with 1 channel (True) or 3 (False).

    Attributes:
        image_paths: image file of each sample.
        mask_paths: mask file of each sample (None for normal images).
        labels: 0/1 label of each sample.
        defect_types: defect folder name of each sample.
    """

    def __init__(
        self, root: PathLike, category: str, split: str = "train", *, grayscale: bool = True
    ) -> None:
        self.root = Path(root)
        self.category = _check_name(category, "category")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.grayscale = bool(grayscale)

        _require_folder(self.root, "MVTec AD root folder", f"the layout {MVTEC_LAYOUT}")
        category_dir = self.root / category
        if not category_dir.is_dir():
            found = _categories_in(self.root)
            raise FileNotFoundError(
                f"MVTec AD category folder not found: {category_dir} (expected the layout {MVTEC_LAYOUT}; "
                f"categories found under {self.root}: {found})"
            )
        self.image_paths: list[Path] = []
        self.mask_paths: list[Path | None] = []
        self.labels: list[int] = []
        self.defect_types: list[str] = []
        if split == "train":
            self._add_train(category_dir)
        else:
            self._add_test(category_dir)

    def _add_train(self, category_dir: Path) -> None:
        train_dir = category_dir / "train"
        _require_folder(train_dir, "MVTec AD train folder", "train/good/ holding the normal training images")
        good_dir = train_dir / _NORMAL
        _require_folder(good_dir, "MVTec AD train folder", "train/good/ holding the normal training images")
        for image_path in list_image_files(good_dir, what="MVTec AD train folder"):
            self._append(image_path, None, _NORMAL)

    def _add_test(self, category_dir: Path) -> None:
        test_dir = category_dir / "test"
        _require_folder(
            test_dir, "MVTec AD test folder", "test/<defect>/ folders, test/good/ for normal images"
        )
        defect_dirs = _visible_subfolders(test_dir)
        if not defect_dirs:
            raise ValueError(
                f"MVTec AD test folder {test_dir} has no defect subfolder "
                f"(expected test/good/ and test/<defect>/ folders)"
            )
        ground_truth_dir = category_dir / "ground_truth"
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            for image_path in list_image_files(defect_dir, what="MVTec AD test folder"):
                if defect == _NORMAL:
                    self._append(image_path, None, defect)
                    continue
                mask_path = ground_truth_dir / defect / f"{image_path.stem}_mask.png"
                if not mask_path.is_file():
                    raise FileNotFoundError(
                        f"ground-truth mask not found for anomalous test image {image_path}: "
                        f"expected {mask_path}"
                    )
                image_size = read_image_size(image_path)
                mask_size = _read_mask_size(mask_path)
                if image_size != mask_size:
                    raise ValueError(_size_mismatch(image_path, image_size, mask_path, mask_size))
                self._append(image_path, mask_path, defect)

    def _append(self, image_path: Path, mask_path: Path | None, defect: str) -> None:
        self.image_paths.append(image_path)
        self.mask_paths.append(mask_path)
        self.labels.append(0 if defect == _NORMAL else 1)
        self.defect_types.append(defect)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> MVTecSample:
        """Loads sample ``index``: image (C, H, W) uint8 and mask (H, W) bool."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of size {len(self)}")
        image_path = self.image_paths[index]
        mask_path = self.mask_paths[index]
        image = load_image(image_path, grayscale=self.grayscale)
        if mask_path is None:
            mask = torch.zeros(image.shape[1:], dtype=torch.bool)
        else:
            mask = load_mask(mask_path)
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise ValueError(
                    _size_mismatch(
                        image_path,
                        (image.shape[2], image.shape[1]),
                        mask_path,
                        (mask.shape[1], mask.shape[0]),
                    )
                )
        return MVTecSample(image, self.labels[index], mask, self.defect_types[index], str(image_path))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, category={self.category!r}, "
            f"split={self.split!r}, samples={len(self)}, anomalous={sum(self.labels)})"
        )


def _read_mask_size(mask_path: Path) -> tuple[int, int]:
    try:
        return read_image_size(mask_path)
    except ValueError as error:
        raise ValueError(f"cannot read mask file {mask_path}: {error.__cause__ or error}") from error


def _size_mismatch(
    image_path: Path, image_size: tuple[int, int], mask_path: Path, mask_size: tuple[int, int]
) -> str:
    return (
        f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} "
        f"is {image_size[0]}x{image_size[1]}"
    )


class FolderDataset(Dataset):
    """The image files directly inside one folder (no labels), sorted by name.

    Args:
        folder: folder of images (.png .jpg .jpeg .bmp .tif .tiff; hidden
            and other files are ignored; not recursive).
        grayscale: load images with 1 channel (True) or 3 (False).

    Attributes:
        paths: the image files.
    """

    def __init__(self, folder: PathLike, *, grayscale: bool = False) -> None:
        self.folder = Path(folder)
        self.grayscale = bool(grayscale)
        self.paths: list[Path] = list_image_files(self.folder, what="image folder")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Loads image ``index`` as uint8 (C, H, W)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of size {len(self)}")
        return load_image(self.paths[index], grayscale=self.grayscale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(folder={str(self.folder)!r}, images={len(self)})"


class ClassFolderDataset(Dataset):
    """Images in ``<root>/<split>/<class>/*`` with integer class labels.

    This is the layout of e.g. CIFAR-10 exported as JPEG files. Classes are
    the sorted (non-hidden) subfolder names of ``<root>/<split>``; label =
    index in :attr:`classes`.

    Args:
        root: dataset folder.
        split: split folder name, e.g. "train" or "test".
        grayscale: load images with 1 channel (True) or 3 (False).

    Attributes:
        classes: sorted class names.
        class_to_index: class name -> label.
        paths: image file of each sample.
        labels: class label of each sample.
    """

    def __init__(self, root: PathLike, split: str, *, grayscale: bool = False) -> None:
        self.root = Path(root)
        self.split = _check_name(split, "split")
        self.grayscale = bool(grayscale)
        layout = "<root>/<split>/<class>/<images>"
        _require_folder(self.root, "dataset root folder", f"the layout {layout}")
        split_dir = self.root / split
        _require_folder(split_dir, "split folder", f"the layout {layout}")
        class_dirs = _visible_subfolders(split_dir)
        if not class_dirs:
            raise ValueError(
                f"split folder {split_dir} has no class subfolder (expected the layout {layout})"
            )
        self.classes: list[str] = [folder.name for folder in class_dirs]
        self.class_to_index: dict[str, int] = {name: index for index, name in enumerate(self.classes)}
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for index, class_dir in enumerate(class_dirs):
            files = list_image_files(class_dir, what="class folder")
            self.paths.extend(files)
            self.labels.extend([index] * len(files))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Loads sample ``index``: (uint8 image (C, H, W), class label)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for dataset of size {len(self)}")
        return load_image(self.paths[index], grayscale=self.grayscale), self.labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"classes={len(self.classes)}, images={len(self)})"
        )
