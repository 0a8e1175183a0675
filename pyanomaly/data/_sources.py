"""Training images as the detectors read them: decoded per access or cached, fed by a DataLoader.

:class:`ImageSource` is a detector's training set. Images given as files are read from disk each
time they are used (every epoch) unless ``cache`` keeps their decoded uint8 pixels in memory;
images given as arrays, tensors or PIL images are in memory already. :class:`EpochLoader` runs a
per-sample transform in DataLoader workers over the batches of one epoch's order. Every random
draw of a sample comes from its own generator, seeded by (seed, epoch, index): a seeded fit is
the same with any number of workers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pyanomaly.data._inputs import MODES, _file_is_gray, _items, _one, as_images
from pyanomaly.data._io import read_image_size

__all__ = ["CACHE_LIMIT_BYTES", "EpochLoader", "ImageSource", "sample_generator"]

#: ``cache="auto"`` keeps decoded images in memory up to this many bytes of uint8 pixels.
CACHE_LIMIT_BYTES = 1 << 30


class ImageSource(Sequence):
    """A list of (C, H, W) images, decoded on access from their files or kept in memory.

    Args:
        data: any input :func:`pyanomaly.data.as_images` takes.
        name: the argument named in errors.
        mode, min_size, allow_float: as in :func:`~pyanomaly.data.as_images`.
        cache: for file inputs: True keeps every decoded image in memory (read once), False reads
            the files at every access, "auto" caches when the decoded pixels take at most
            :data:`CACHE_LIMIT_BYTES` (estimated from the file headers). Other inputs are always
            in memory.

    Attributes:
        sizes: (H, W) of each image, from the file headers for files not decoded yet.
        cached: whether the images are in memory.
        channels: C of every image.
    """

    def __init__(self, data: Any, name: str = "images", *, mode: str | None = None, min_size: int = 1,
                 allow_float: bool = False, cache: bool | str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        files = _dataset_files(data)
        if files is not None:  # MVTecDataset / FolderDataset / ClassFolderDataset: their files, read lazily
            data, mode = files, mode or ("gray" if data.grayscale else "rgb")
        items = _items(data, name)
        if not items:
            raise ValueError(f"{name} is empty (no image)")
        files = all(isinstance(item, (str, os.PathLike)) for item, _ in items)
        self._images: list[torch.Tensor] | None = None
        self._files: list[tuple[Path, str]] = []
        self._allow_float = allow_float
        if not files:
            self._set_decoded(as_images(data, name, mode=mode, min_size=min_size, allow_float=allow_float))
            return
        if mode is None:  # as as_images: gray files replicated to 3 channels when any file is colour
            mode = "gray" if all(_file_is_gray(Path(item)) for item, _ in items) else "rgb"
        self._mode, self.channels = mode, 1 if mode == "gray" else 3
        self._files = [(Path(item), label) for item, label in items]
        self.sizes = []
        for path, label in self._files:
            width, height = read_image_size(path)
            if min(height, width) < min_size:
                raise ValueError(
                    f"{label} is {height}x{width} pixels; this detector needs at least {min_size} px a side"
                )
            self.sizes.append((height, width))
        decoded_bytes = sum(h * w * self.channels for h, w in self.sizes)
        if cache is True or (cache == "auto" and decoded_bytes <= CACHE_LIMIT_BYTES):
            self._set_decoded([self._read(i) for i in range(len(self._files))])

    def _set_decoded(self, images: list[torch.Tensor]) -> None:
        self._images = images
        self.sizes = [tuple(image.shape[1:]) for image in images]
        self.channels = int(images[0].shape[0])

    def _read(self, index: int) -> torch.Tensor:
        path, label = self._files[index]
        image = _one(path, label, self._mode, self._allow_float)
        if tuple(image.shape[1:]) != self.sizes[index]:
            raise ValueError(f"{label} changed on disk during the fit: now {tuple(image.shape[1:])}, was {self.sizes[index]}")
        return image

    @property
    def cached(self) -> bool:
        return self._images is not None

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if self._images is not None:
            return self._images[index]
        return self._read(range(len(self))[index])

    def subset(self, indices: Sequence[int]) -> ImageSource:
        """The images at ``indices`` (a view: nothing is decoded)."""
        out = ImageSource.__new__(ImageSource)
        out._allow_float, out.channels = self._allow_float, self.channels
        out._images = None if self._images is None else [self._images[i] for i in indices]
        out._files = [self._files[i] for i in indices] if self._images is None else []
        out._mode = getattr(self, "_mode", None)
        out.sizes = [self.sizes[i] for i in indices]
        return out


def _dataset_files(data: Any) -> list[str] | None:
    """The image files of one of pyanomaly's folder datasets (None for anything else)."""
    from pyanomaly.data._datasets import ClassFolderDataset, FolderDataset, MVTecDataset

    if isinstance(data, MVTecDataset):
        return [str(p) for p in data.image_paths]
    if isinstance(data, (FolderDataset, ClassFolderDataset)):
        return [str(p) for p in data.paths]
    return None


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator every random draw of sample ``index`` in ``epoch`` comes from."""
    state = np.random.SeedSequence([seed & (2**63 - 1), epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


class _Transformed(Dataset):
    """``transform(image, generator)`` of ``source[index]`` for keys (epoch, index)."""

    def __init__(self, source: ImageSource, transform: Callable, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        return self.transform(self.source[index], sample_generator(self.seed, epoch, index))


class _EpochOrder:
    """The batches of the current epoch's order, as (epoch, index) keys; set by the training loop.
    With ``ranks`` (rank, world size), each batch is rank's equal consecutive slice of it."""

    def __init__(self, ranks: tuple[int, int]) -> None:
        self.batches: list[list[tuple[int, int]]] = []
        self.rank, self.size = ranks

    def set(self, epoch: int, order: Sequence[int], batch_size: int, drop_last: bool) -> None:
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        batches = [order[start : min(start + batch_size, stop)] for start in range(0, stop, batch_size)]
        if self.size > 1:
            per_rank = batch_size // self.size
            batches = [batch[self.rank * per_rank : (self.rank + 1) * per_rank] for batch in batches]
        self.batches = [[(epoch, int(i)) for i in batch] for batch in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochLoader:
    """Per-epoch training batches of ``transform`` applied to a source, through a DataLoader.

    ``loader.epoch(e, order)`` yields the collated batches of that order (``batch_size`` per batch,
    the ragged last one dropped with ``drop_last``). Workers (``num_workers`` > 0) persist across
    epochs; ``pin_memory`` for CUDA. ``ranks`` = (rank, world size): this rank's slice of every
    batch (``batch_size`` a multiple of the world size, ``drop_last``).
    """

    def __init__(self, source: Dataset, transform: Callable, *, seed: int, batch_size: int, drop_last: bool,
                 num_workers: int = 0, pin_memory: bool = False, collate: Callable | None = None,
                 ranks: tuple[int, int] = (0, 1)) -> None:
        if ranks[1] > 1 and (batch_size % ranks[1] or not drop_last):
            raise ValueError(f"a batch of {batch_size} cannot be split evenly over {ranks[1]} ranks")
        self._order = _EpochOrder(ranks)
        self.batch_size, self.drop_last = batch_size, drop_last
        self._loader = DataLoader(
            _Transformed(source, transform, seed), batch_sampler=self._order, num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=num_workers > 0, collate_fn=collate,
        )

    def epoch(self, epoch: int, order: Sequence[int]):
        self._order.set(epoch, order, self.batch_size, self.drop_last)
        return iter(self._loader)

