"""Tests for pyanomaly.data: image/mask loading, dataset layouts, resizing."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyanomaly.data import (
    ClassFolderDataset,
    FolderDataset,
    MVTecDataset,
    MVTecSample,
    load_image,
    load_mask,
    mvtec_categories,
    resize_masks,
    stack_resized,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MVTEC_FORMAT = SHARED_DATA / "mvtec_format"


def escaped(path: Path) -> str:
    return re.escape(str(path))


def save(path: Path, array: np.ndarray, mode: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **kwargs)
    return path


def gradient(height: int, width: int) -> np.ndarray:
    return ((np.arange(height)[:, None] * 7 + np.arange(width)[None, :] * 3) % 256).astype(np.uint8)


def rgb_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """RGB-mode mask with the anomaly drawn in pure red (G = B = 0)."""
    mask = np.zeros((height, width, 3), dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right, 0] = 255
    return mask


def palette_mask(path: Path, height: int, width: int, box: tuple[int, int, int, int]) -> Path:
    indices = np.zeros((height, width), dtype=np.uint8)
    top, left, bottom, right = box
    indices[top:bottom, left:right] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * (256 * 3 - 6))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture()
def mvtec_root(tmp_path: Path) -> Path:
    """A small MVTec-layout tree: PNG/JPEG, gray/RGB, varying sizes, RGB- and P-mode masks."""
    root = tmp_path / "mvtec"
    category = root / "widget"
    save(category / "train" / "good" / "000.png", gradient(20, 16))
    save(category / "train" / "good" / "001.jpg", np.dstack([gradient(24, 24)] * 3), quality=95)
    save(category / "train" / "good" / "002.PNG", gradient(18, 30), mode="P")
    save(category / "train" / "good" / ".hidden.png", gradient(5, 5))
    (category / "train" / "good" / "notes.txt").write_text("not an image")
    save(category / "test" / "good" / "000.png", gradient(20, 16))
    save(category / "test" / "scratch" / "000.png", np.dstack([gradient(16, 20)] * 3))
    save(category / "test" / "scratch" / "001.jpg", gradient(12, 14), quality=95)
    save(category / "test" / "hole" / "big.png", gradient(30, 10))
    save(category / "ground_truth" / "scratch" / "000_mask.png", rgb_mask(16, 20, (2, 3, 6, 9)))
    palette_mask(category / "ground_truth" / "scratch" / "001_mask.png", 12, 14, (0, 0, 2, 14))
    save(category / "ground_truth" / "hole" / "big_mask.png", (gradient(30, 10) > 200).astype(np.uint8) * 255)
    (root / "not_a_category").mkdir()
    (root / "README.txt").write_text("x")
    return root


# ---------------------------------------------------------------------------
# load_image / load_mask
# ---------------------------------------------------------------------------


def test_load_image_modes(tmp_path: Path) -> None:
    gray = gradient(6, 5)
    rgb = np.dstack([gray, 255 - gray, gray // 2])
    path = save(tmp_path / "gray.png", gray)
    assert load_image(path, grayscale=True).shape == (1, 6, 5)
    assert torch.equal(load_image(path, grayscale=True)[0], torch.from_numpy(gray))
    replicated = load_image(path, grayscale=False)
    assert replicated.dtype == torch.uint8 and replicated.shape == (3, 6, 5)
    assert all(torch.equal(channel, torch.from_numpy(gray)) for channel in replicated)

    path = save(tmp_path / "rgb.png", rgb)
    assert torch.equal(load_image(path, grayscale=False), torch.from_numpy(rgb).permute(2, 0, 1))
    luma = np.array(Image.fromarray(rgb).convert("L"))
    assert torch.equal(load_image(path, grayscale=True)[0], torch.from_numpy(luma))

    path = save(tmp_path / "rgba.png", np.dstack([rgb, np.full_like(gray, 7)]))
    assert torch.equal(load_image(path, grayscale=False), torch.from_numpy(rgb).permute(2, 0, 1))

    path = save(tmp_path / "binary.png", gray > 20, mode="1")
    assert set(load_image(path, grayscale=True).unique().tolist()) == {0, 255}

    path = save(tmp_path / "palette.png", rgb, mode="P")
    palette_rgb = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(load_image(path, grayscale=False), torch.from_numpy(palette_rgb).permute(2, 0, 1))

    sixteen = np.array([[0, 257, 65535], [1000, 30000, 512]], dtype=np.uint16)
    path = save(tmp_path / "sixteen.png", sixteen)
    assert Image.open(path).mode.startswith("I;16")
    expected = torch.from_numpy(np.rint(sixteen / 257.0).astype(np.uint8))
    assert torch.equal(load_image(path, grayscale=True)[0], expected)
    assert load_image(path, grayscale=False).shape == (3, 2, 3)

    path = save(tmp_path / "photo.jpeg", rgb, quality=100)
    assert load_image(path, grayscale=False).shape == (3, 6, 5)
    path = save(tmp_path / "cmyk.jpg", rgb, mode="CMYK")
    assert load_image(path, grayscale=False).shape == (3, 6, 5)
    path = save(tmp_path / "image.tif", gray)
    assert torch.equal(load_image(path, grayscale=True)[0], torch.from_numpy(gray))


def test_load_mask_modes(tmp_path: Path) -> None:
    expected = np.zeros((5, 6), dtype=bool)
    expected[1:3, 2:5] = True
    gray = save(tmp_path / "gray.png", expected.astype(np.uint8) * 255)
    ones = save(tmp_path / "ones.png", expected.astype(np.uint8))  # 0/1 values, as some tools write
    binary = save(tmp_path / "binary.png", expected, mode="1")
    red = save(tmp_path / "red.png", rgb_mask(5, 6, (1, 2, 3, 5)))
    rgba = save(
        tmp_path / "rgba.png", np.dstack([rgb_mask(5, 6, (1, 2, 3, 5)), np.full((5, 6), 255, np.uint8)])
    )
    palette = palette_mask(tmp_path / "palette.png", 5, 6, (1, 2, 3, 5))
    sixteen = save(tmp_path / "sixteen.png", expected.astype(np.uint16) * 3)
    for path in (gray, ones, binary, red, rgba, palette, sixteen):
        mask = load_mask(path)
        assert mask.dtype == torch.bool and torch.equal(mask, torch.from_numpy(expected)), path.name


def test_load_mask_palette_uses_colours_not_indices(tmp_path: Path) -> None:
    indices = np.array([[0, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0] + [0] * (256 * 3 - 6))  # index 0 is white
    image.save(tmp_path / "inverted_palette.png")
    assert load_mask(tmp_path / "inverted_palette.png").tolist() == [[True, False]]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=escaped(missing)):
        load_image(missing, grayscale=True)
    with pytest.raises(FileNotFoundError, match=r"is not a file: " + escaped(tmp_path)):
        load_mask(tmp_path)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image file " + escaped(garbage)):
        load_image(garbage, grayscale=False)
    with pytest.raises(ValueError, match=r"cannot read mask file " + escaped(garbage)):
        load_mask(garbage)
    good = save(tmp_path / "good.png", np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=escaped(truncated)):
        load_image(truncated, grayscale=True)
    floating = tmp_path / "float.tif"
    Image.fromarray(np.ones((3, 3), dtype=np.float32)).save(floating)
    with pytest.raises(ValueError, match=escaped(floating) + r".*mode F"):
        load_image(floating, grayscale=True)


# ---------------------------------------------------------------------------
# MVTecDataset
# ---------------------------------------------------------------------------


def test_mvtec_categories(mvtec_root: Path, tmp_path: Path) -> None:
    assert mvtec_categories(mvtec_root) == ["widget"]
    with pytest.raises(FileNotFoundError, match=escaped(tmp_path / "nowhere")):
        mvtec_categories(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no MVTec AD category .*" + escaped(tmp_path / "empty")):
        mvtec_categories(tmp_path / "empty")


def test_mvtec_train_split(mvtec_root: Path) -> None:
    dataset = MVTecDataset(mvtec_root, "widget", "train")
    assert len(dataset) == 3
    assert [path.name for path in dataset.image_paths] == ["000.png", "001.jpg", "002.PNG"]
    assert dataset.labels == [0, 0, 0] and dataset.defect_types == ["good"] * 3
    shapes = []
    for sample in dataset:
        assert isinstance(sample, MVTecSample)
        assert sample.image.dtype == torch.uint8 and sample.image.shape[0] == 1
        assert sample.mask.dtype == torch.bool and sample.mask.shape == sample.image.shape[1:]
        assert not sample.mask.any() and sample.label == 0 and sample.defect_type == "good"
        shapes.append(tuple(sample.image.shape))
    assert shapes == [(1, 20, 16), (1, 24, 24), (1, 18, 30)]
    assert torch.equal(dataset[0].image[0], torch.from_numpy(gradient(20, 16)))
    assert dataset[-1].path == str(mvtec_root / "widget" / "train" / "good" / "002.PNG")
    assert MVTecDataset(mvtec_root, "widget", grayscale=False)[1].image.shape == (3, 24, 24)


def test_mvtec_test_split(mvtec_root: Path) -> None:
    dataset = MVTecDataset(mvtec_root, "widget", "test", grayscale=False)
    assert [(path.parent.name, path.name) for path in dataset.image_paths] == [
        ("good", "000.png"),
        ("hole", "big.png"),
        ("scratch", "000.png"),
        ("scratch", "001.jpg"),
    ]
    assert dataset.labels == [0, 1, 1, 1]
    assert dataset.defect_types == ["good", "hole", "scratch", "scratch"]
    good, hole, scratch_rgb, scratch_palette = (dataset[index] for index in range(4))
    assert good.image.shape == (3, 20, 16) and not good.mask.any()
    assert hole.image.shape == (3, 30, 10)
    assert torch.equal(hole.mask, torch.from_numpy(gradient(30, 10) > 200))
    expected = torch.zeros(16, 20, dtype=torch.bool)
    expected[2:6, 3:9] = True
    assert torch.equal(scratch_rgb.mask, expected)  # RGB-mode mask, red only
    assert scratch_palette.mask.sum() == 2 * 14 and scratch_palette.mask[:2].all()  # P-mode mask
    assert all(
        sample.mask.shape == sample.image.shape[1:] for sample in (good, hole, scratch_rgb, scratch_palette)
    )
    assert "anomalous=3" in repr(dataset)


def test_mvtec_missing_folders(mvtec_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=escaped(tmp_path / "nope") + r".*expected the layout"):
        MVTecDataset(tmp_path / "nope", "widget")
    with pytest.raises(
        FileNotFoundError, match=escaped(mvtec_root / "bottle") + r".*categories found.*widget"
    ):
        MVTecDataset(mvtec_root, "bottle")
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test'"):
        MVTecDataset(mvtec_root, "widget", "val")
    with pytest.raises(ValueError, match=r"category must be a folder name"):
        MVTecDataset(mvtec_root, "")
    (mvtec_root / "half").mkdir()
    (mvtec_root / "half" / "train").mkdir()
    with pytest.raises(
        FileNotFoundError, match=escaped(mvtec_root / "half" / "train" / "good") + r".*train/good"
    ):
        MVTecDataset(mvtec_root, "half", "train")
    with pytest.raises(FileNotFoundError, match=escaped(mvtec_root / "half" / "test") + r".*test/<defect>"):
        MVTecDataset(mvtec_root, "half", "test")
    (mvtec_root / "half" / "train" / "good").mkdir()
    with pytest.raises(
        ValueError, match=escaped(mvtec_root / "half" / "train" / "good") + r" contains no image"
    ):
        MVTecDataset(mvtec_root, "half", "train")
    (mvtec_root / "half" / "test").mkdir()
    with pytest.raises(ValueError, match=escaped(mvtec_root / "half" / "test") + r" has no defect subfolder"):
        MVTecDataset(mvtec_root, "half", "test")


def test_mvtec_missing_mask_names_expected_path(mvtec_root: Path) -> None:
    mask_path = mvtec_root / "widget" / "ground_truth" / "hole" / "big_mask.png"
    mask_path.unlink()
    with pytest.raises(FileNotFoundError, match=r"big\.png: expected " + escaped(mask_path)):
        MVTecDataset(mvtec_root, "widget", "test")
    MVTecDataset(mvtec_root, "widget", "train")  # the training split needs no masks


def test_mvtec_mask_size_mismatch_names_both_files(mvtec_root: Path) -> None:
    mask_path = mvtec_root / "widget" / "ground_truth" / "hole" / "big_mask.png"
    save(mask_path, np.zeros((30, 11), dtype=np.uint8))
    image_path = mvtec_root / "widget" / "test" / "hole" / "big.png"
    pattern = escaped(mask_path) + r" is 11x30 \(WxH\) but its image " + escaped(image_path) + r" is 10x30"
    with pytest.raises(ValueError, match=pattern):
        MVTecDataset(mvtec_root, "widget", "test")


def test_mvtec_corrupt_files_name_the_file(mvtec_root: Path) -> None:
    corrupt_mask = mvtec_root / "widget" / "ground_truth" / "hole" / "big_mask.png"
    corrupt_mask.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=escaped(corrupt_mask)):
        MVTecDataset(mvtec_root, "widget", "test")
    corrupt_image = mvtec_root / "widget" / "train" / "good" / "001.jpg"
    corrupt_image.write_bytes(b"garbage")
    dataset = MVTecDataset(mvtec_root, "widget", "train")
    with pytest.raises(ValueError, match=escaped(corrupt_image)):
        dataset[1]
    with pytest.raises(IndexError):
        dataset[3]


# ---------------------------------------------------------------------------
# FolderDataset / ClassFolderDataset
# ---------------------------------------------------------------------------


def test_folder_dataset(tmp_path: Path) -> None:
    save(tmp_path / "images" / "b.jpg", np.dstack([gradient(8, 9)] * 3))
    save(tmp_path / "images" / "a.png", gradient(5, 7))
    save(tmp_path / "images" / ".c.png", gradient(5, 7))
    (tmp_path / "images" / "sub").mkdir()
    dataset = FolderDataset(tmp_path / "images")
    assert [path.name for path in dataset.paths] == ["a.png", "b.jpg"]
    assert dataset[0].shape == (3, 5, 7) and dataset[1].shape == (3, 8, 9)
    assert FolderDataset(tmp_path / "images", grayscale=True)[0].shape == (1, 5, 7)
    with pytest.raises(FileNotFoundError, match=escaped(tmp_path / "missing")):
        FolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match=escaped(tmp_path / "images" / "sub") + r" contains no image file"):
        FolderDataset(tmp_path / "images" / "sub")


def test_class_folder_dataset(tmp_path: Path) -> None:
    for class_name, count in (("dog", 2), ("cat", 3)):
        for index in range(count):
            save(tmp_path / "train" / class_name / f"{index:04d}.jpg", np.dstack([gradient(32, 32)] * 3))
    dataset = ClassFolderDataset(tmp_path, "train")
    assert dataset.classes == ["cat", "dog"] and dataset.class_to_index == {"cat": 0, "dog": 1}
    assert dataset.labels == [0, 0, 0, 1, 1] and len(dataset) == 5
    image, label = dataset[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 1
    batch = torch.utils.data.default_collate([dataset[index] for index in range(5)])
    assert batch[0].shape == (5, 3, 32, 32) and batch[1].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match=escaped(tmp_path / "test") + r".*<root>/<split>/<class>"):
        ClassFolderDataset(tmp_path, "test")
    (tmp_path / "val").mkdir()
    with pytest.raises(ValueError, match=escaped(tmp_path / "val") + r" has no class subfolder"):
        ClassFolderDataset(tmp_path, "val")
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match=escaped(tmp_path / "val" / "bird") + r" contains no image file"):
        ClassFolderDataset(tmp_path, "val")


# ---------------------------------------------------------------------------
# stack_resized / resize_masks
# ---------------------------------------------------------------------------


def test_stack_resized_matches_pillow_bilinear() -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((37, 53), (16, 16), (9, 12))]
    batch = stack_resized([torch.from_numpy(array)[None] for array in arrays], 16)
    assert batch.shape == (3, 1, 16, 16) and batch.dtype == torch.uint8
    for array, resized in zip(arrays, batch):
        reference = np.asarray(Image.fromarray(array).resize((16, 16), Image.BILINEAR)).astype(int)
        assert np.abs(resized[0].numpy().astype(int) - reference).max() <= 1
    assert torch.equal(batch[1, 0], torch.from_numpy(arrays[1]))  # already at size: unchanged
    constant = torch.full((3, 11, 7), 77, dtype=torch.uint8)
    assert (stack_resized([constant], (5, 9)) == 77).all()
    assert stack_resized(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), (4, 6)).shape == (2, 3, 4, 6)


def test_resize_masks_nearest() -> None:
    rng = np.random.default_rng(1)
    large, small = rng.random((37, 53)) > 0.7, rng.random((20, 20)) > 0.7
    resized = resize_masks([torch.from_numpy(large), torch.from_numpy(large[:30, :40])], (20, 30))
    assert resized.shape == (2, 20, 30) and resized.dtype == torch.bool
    reference = np.asarray(Image.fromarray(large).resize((30, 20), Image.NEAREST))
    assert np.array_equal(resized[0].numpy(), reference)  # pixel-centre aligned, like Pillow
    upscaled = resize_masks(torch.from_numpy(small)[None], (40, 60))[0].numpy()
    assert np.array_equal(upscaled, small.repeat(2, axis=0).repeat(3, axis=1))


def test_resize_rejects_bad_input() -> None:
    gray, color = torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"images\[1\] has 3 channels but images\[0\] has 1"):
        stack_resized([gray, color], 8)
    with pytest.raises(ValueError, match=r"images\[0\] must be a uint8 tensor \(C, H, W\)"):
        stack_resized([gray.float()], 8)
    with pytest.raises(ValueError, match=r"images is empty"):
        stack_resized([], 8)
    for size in (0, -3, (4,), (4, 0), 2.5, True):
        with pytest.raises(ValueError, match=r"size must be"):
            stack_resized([gray], size)
    with pytest.raises(ValueError, match=r"masks\[0\] must be a bool tensor \(H, W\)"):
        resize_masks([torch.zeros(4, 4, dtype=torch.uint8)], 8)


# ---------------------------------------------------------------------------
# Real data in ../shared/data (skipped when absent)
# ---------------------------------------------------------------------------


def require(path: Path) -> Path:
    if not path.is_dir():
        pytest.skip(f"real data not available at {path}")
    return path


@pytest.mark.data
def test_real_magnetic_tile() -> None:
    root = require(MVTEC_FORMAT / "magnetic_tile").parent
    assert "magnetic_tile" in mvtec_categories(root)
    train = MVTecDataset(root, "magnetic_tile", "train")
    assert len(train) == 100 and set(train.labels) == {0}
    test = MVTecDataset(root, "magnetic_tile", "test")
    counts = {defect: test.defect_types.count(defect) for defect in set(test.defect_types)}
    assert counts == {"good": 30, "blowhole": 10, "break": 10, "crack": 10, "fray": 10, "uneven": 10}
    sizes = set()
    empty_anomalous = []
    for index in range(len(test)):
        sample = test[index]
        assert sample.image.shape[0] == 1 and sample.mask.shape == sample.image.shape[1:]
        if sample.label == 0:
            assert not sample.mask.any(), sample.path
        elif not sample.mask.any():
            empty_anomalous.append(Path(sample.path).name)
        sizes.add(tuple(sample.image.shape))
    # The source data set ships one all-black mask for an "uneven" image; every other one is non-empty.
    assert empty_anomalous == ["exp4_num_45057.jpg"]
    assert len(sizes) > 10  # JPEGs of varying sizes
    first = train[0].image
    assert stack_resized([first, test[0].image], 64).shape == (2, 1, 64, 64)


@pytest.mark.data
def test_real_glass() -> None:
    root = require(MVTEC_FORMAT / "glass").parent
    assert len(MVTecDataset(root, "glass", "train")) == 18
    test = MVTecDataset(root, "glass", "test")
    assert len(test) == 98 and sum(test.labels) == 80
    assert {defect: test.defect_types.count(defect) for defect in set(test.defect_types)} == {
        "good": 18,
        "angle": 24,
        "edge": 56,
    }
    for index in range(len(test)):
        sample = test[index]
        assert sample.image.shape == (1, 256, 256)
        assert bool(sample.mask.any()) == (sample.label == 1), sample.path


@pytest.mark.data
def test_real_cifar10_jpeg_members(tmp_path: Path) -> None:
    archive = SHARED_DATA / "cifar10-jpg.tar.gz"
    if not archive.is_file():
        pytest.skip(f"real data not available at {archive}")
    extracted = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                split, class_name, name = Path(member.name).parts[-3:]
                target = tmp_path / split / class_name / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                extracted += 1
                if extracted == 12:
                    break
    dataset = ClassFolderDataset(tmp_path, split)
    assert len(dataset) == 12
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and 0 <= label < len(dataset.classes)
