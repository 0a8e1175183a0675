"""Evaluation protocols on class-folder datasets: one-vs-all and out-of-distribution.

- :func:`one_vs_all`: each chosen class in turn is normal; the detector trains on that class's
  training images (plus, in the semi-supervised setting, a fraction ``gamma`` of labelled anomalies
  drawn from the other classes' training images) and is tested on the whole test split (the class
  normal, every other class anomalous). AUROC per class and its mean, per gamma (AnoMem Sec. 4.1).
- :func:`out_of_distribution`: train on an in-distribution dataset, test its test split against an
  out-of-distribution dataset's test split.
- :func:`write_table`: the result as a markdown table and as JSON.

Datasets use the ``<root>/<split>/<class>/*`` layout of :class:`pyanomaly.data.ClassFolderDataset`.
``train_per_class`` / ``test_per_class`` subsample (seeded) for quick CPU runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from pyanomaly import distributed
from pyanomaly.data import ClassFolderDataset, load_image, stack_resized
from pyanomaly.metrics import image_auroc

__all__ = ["GAMMAS", "one_vs_all", "out_of_distribution", "write_table"]

#: The anomaly ratios of AnoMem's one-vs-all table.
GAMMAS = (0.0, 0.01, 0.05, 0.1)

DetectorFactory = Callable[[], Any]
PathLike = Union[str, os.PathLike]


def _factory(detector: DetectorFactory | dict | None) -> DetectorFactory:
    if detector is None or isinstance(detector, dict):
        from pyanomaly.models import AnoMem

        kwargs = dict(detector or {})
        return lambda: AnoMem(**kwargs)
    if not callable(detector):
        raise TypeError(
            f"detector must be a callable returning a fresh detector, a dict of AnoMem arguments or None, "
            f"got {type(detector).__name__}"
        )
    return detector


def _check_limit(value: int | None, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


def _load(paths: Sequence[Path], image_size, grayscale: bool) -> torch.Tensor:
    images = [load_image(p, grayscale=grayscale) for p in paths]
    size = image_size if image_size is not None else tuple(images[0].shape[-2:])
    return stack_resized(images, size)


def _per_class_subset(
    labels: np.ndarray, classes: Sequence[int], limit: int | None, rng: np.random.Generator
) -> np.ndarray:
    """Indices of up to ``limit`` random samples of each class in ``classes`` (sorted)."""
    chosen = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if limit is not None and len(idx) > limit:
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        chosen.append(idx)
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def _resolve_classes(dataset: ClassFolderDataset, classes) -> list[int]:
    if classes is None:
        return list(range(len(dataset.classes)))
    if isinstance(classes, (str, int)):
        classes = [classes]
    out = []
    for c in classes:
        if isinstance(c, str):
            if c not in dataset.class_to_index:
                raise ValueError(
                    f"classes: {c!r} is not a class of {dataset.root} (classes: {dataset.classes})"
                )
            out.append(dataset.class_to_index[c])
        elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < len(dataset.classes):
            out.append(c)
        else:
            raise ValueError(
                f"classes: {c!r} is neither a class name nor an index below {len(dataset.classes)}"
            )
    return out


def one_vs_all(
    root: PathLike,
    *,
    detector: DetectorFactory | dict | None = None,
    classes: Sequence[str | int] | None = None,
    gammas: Sequence[float] = (0.0,),
    train_per_class: int | None = None,
    test_per_class: int | None = None,
    image_size: int | Sequence[int] | None = None,
    grayscale: bool = False,
    train_split: str = "train",
    test_split: str = "test",
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """The one-vs-all protocol: every chosen class is normal once; AUROC per class and the mean.

    Args:
        root: class-folder dataset (``<root>/<split>/<class>/*``).
        detector: a callable returning a fresh, unfitted detector (``fit(normal)``, and
            ``fit(normal, anomalies=...)`` for gamma > 0; ``decision_function``), or a dict of
            :class:`~pyanomaly.AnoMem` arguments (default: AnoMem's defaults).
        classes: the normal classes to run (names or indices); None = all.
        gammas: anomaly ratios; gamma is the fraction of anomalies in the training set, so
            ``round(gamma / (1 - gamma) * n_normal)`` (at least 1) anomalies are drawn uniformly
            from the other classes' training images. 0 = one-class.
        train_per_class: use at most this many training images of each class (None = all).
        test_per_class: use at most this many test images of each class (None = all).
        image_size: resize images to this side or (h, w); None = the first image's size.
        grayscale: load images with one channel.
        train_split, test_split: split folder names.
        seed: seeds the subsampling and the anomaly draws (the detector has its own seed).
        verbose: print progress to stderr.

    Returns:
        A dict with "auroc" {gamma: {class: auroc}}, "mean" {gamma: mean auroc}, "seconds"
        {gamma: {class: fit + score time}}, the counts and the settings (JSON-able; gammas as str).
    """
    make = _factory(detector)
    gammas = [float(g) for g in gammas]
    if not gammas or any(not 0.0 <= g < 1.0 for g in gammas):
        raise ValueError(f"gammas must be numbers in [0, 1), got {gammas}")
    train_per_class = _check_limit(train_per_class, "train_per_class")
    test_per_class = _check_limit(test_per_class, "test_per_class")
    train = ClassFolderDataset(root, train_split, grayscale=grayscale)
    test = ClassFolderDataset(root, test_split, grayscale=grayscale)
    if train.classes != test.classes:
        raise ValueError(
            f"the {train_split!r} and {test_split!r} splits of {root} have different classes: "
            f"{train.classes} vs {test.classes}"
        )
    normal_classes = _resolve_classes(train, classes)
    rng = np.random.default_rng(seed)
    train_labels, test_labels = np.asarray(train.labels), np.asarray(test.labels)
    all_classes = list(range(len(train.classes)))
    train_idx = _per_class_subset(train_labels, all_classes, train_per_class, rng)
    test_idx = _per_class_subset(test_labels, all_classes, test_per_class, rng)
    if image_size is None:
        first = load_image(train.paths[int(train_idx[0])], grayscale=grayscale)
        image_size = tuple(first.shape[-2:])
    _log(verbose, f"loading {len(train_idx)} training and {len(test_idx)} test images from {root}")
    train_images = _load([train.paths[i] for i in train_idx], image_size, grayscale)
    test_images = _load([test.paths[i] for i in test_idx], image_size, grayscale)
    train_y, test_y = train_labels[train_idx], test_labels[test_idx]

    result: dict[str, Any] = {
        "protocol": "one-vs-all",
        "dataset": str(root),
        "classes": [train.classes[c] for c in normal_classes],
        "gammas": gammas,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "image_size": list(image_size) if not isinstance(image_size, int) else [image_size, image_size],
        "seed": seed,
        "n_test": int(len(test_idx)),
        "auroc": {},
        "mean": {},
        "seconds": {},
        "n_train": {},
    }
    jobs = []  # (gamma, class, anomaly picks), drawn in the same order whatever the ranks
    for gamma in gammas:
        for c in normal_classes:
            pick = None
            if gamma > 0:
                pool = np.flatnonzero(train_y != c)
                count = max(1, int(round(gamma / (1.0 - gamma) * int((train_y == c).sum()))))
                pick = np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))
            jobs.append((gamma, c, pick))
    rank, ranks = distributed.world()
    done = {}
    with distributed.local_fits():  # the fits are independent: rank r runs jobs r, r + N, ...
        for index, (gamma, c, pick) in enumerate(jobs):
            if index % ranks != rank:
                continue
            normal = train_images[train_y == c]
            anomalies = None if pick is None else train_images[pick]
            tick = time.perf_counter()
            model = make()
            if anomalies is None:
                model.fit(normal)
            else:
                model.fit(normal, anomalies=anomalies)
            scores = np.asarray(model.decision_function(test_images), dtype=np.float64)
            done[index] = (float(image_auroc((test_y != c).astype(np.int64), scores)), time.perf_counter() - tick,
                           int(len(normal)), 0 if anomalies is None else int(len(anomalies)))
            _log(verbose, f"gamma {gamma:g} normal class {train.classes[c]}: AUROC {done[index][0]:.4f} "
                          f"({done[index][1]:.1f} s)")
    done = distributed.merge_dicts(done)
    for key in (f"{g:g}" for g in gammas):
        result["auroc"][key], result["seconds"][key], result["n_train"][key] = {}, {}, {}
    for index, (gamma, c, _) in enumerate(jobs):
        key, name = f"{gamma:g}", train.classes[c]
        auroc, seconds, n_normal, n_anomalies = done[index]
        result["auroc"][key][name] = auroc
        result["seconds"][key][name] = float(seconds)
        result["n_train"][key][name] = {"normal": n_normal, "anomalies": n_anomalies}
    for key in (f"{g:g}" for g in gammas):
        result["mean"][key] = float(np.mean(list(result["auroc"][key].values())))
        _log(verbose, f"gamma {key}: mean AUROC {result['mean'][key]:.4f}")
    return result


def out_of_distribution(
    in_root: PathLike,
    out_root: PathLike,
    *,
    detector: DetectorFactory | dict | None = None,
    train_limit: int | None = None,
    test_limit: int | None = None,
    image_size: int | Sequence[int] | None = None,
    grayscale: bool = False,
    train_split: str = "train",
    test_split: str = "test",
    seed: int = 0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Out-of-distribution detection: train on ``in_root``'s training split (all classes), then
    score its test split (label 0) against ``out_root``'s test split (label 1).

    Args:
        in_root, out_root: class-folder datasets (in- and out-of-distribution).
        detector: as in :func:`one_vs_all`.
        train_limit: at most this many training images (a seeded random subset; None = all).
        test_limit: at most this many test images from each dataset (None = all).
        image_size: resize to this side or (h, w); None = the first training image's size (the
            out-of-distribution images are resized to it).
        grayscale, train_split, test_split, seed, verbose: as in :func:`one_vs_all`.

    Returns:
        A dict with "auroc", "seconds", the counts and the settings.
    """
    make = _factory(detector)
    train_limit = _check_limit(train_limit, "train_limit")
    test_limit = _check_limit(test_limit, "test_limit")
    rng = np.random.default_rng(seed)
    train = ClassFolderDataset(in_root, train_split, grayscale=grayscale)
    test_in = ClassFolderDataset(in_root, test_split, grayscale=grayscale)
    test_out = ClassFolderDataset(out_root, test_split, grayscale=grayscale)

    def subset(dataset: ClassFolderDataset, limit: int | None) -> list[Path]:
        idx = np.arange(len(dataset))
        if limit is not None and len(idx) > limit:
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        return [dataset.paths[i] for i in idx]

    train_paths = subset(train, train_limit)
    if image_size is None:
        image_size = tuple(load_image(train_paths[0], grayscale=grayscale).shape[-2:])
    in_images = _load(subset(test_in, test_limit), image_size, grayscale)
    out_images = _load(subset(test_out, test_limit), image_size, grayscale)
    _log(verbose, f"training on {len(train_paths)} images of {in_root}")
    tick = time.perf_counter()
    model = make()
    model.fit(_load(train_paths, image_size, grayscale))
    scores = np.asarray(model.decision_function(torch.cat([in_images, out_images])), dtype=np.float64)
    seconds = time.perf_counter() - tick
    labels = np.r_[np.zeros(len(in_images)), np.ones(len(out_images))].astype(np.int64)
    auroc = float(image_auroc(labels, scores))
    _log(verbose, f"OoD {in_root} vs {out_root}: AUROC {auroc:.4f} ({seconds:.1f} s)")
    return {
        "protocol": "out-of-distribution",
        "in_dataset": str(in_root),
        "out_dataset": str(out_root),
        "n_train": len(train_paths),
        "n_test_in": int(len(in_images)),
        "n_test_out": int(len(out_images)),
        "image_size": list(image_size) if not isinstance(image_size, int) else [image_size, image_size],
        "seed": seed,
        "auroc": auroc,
        "seconds": seconds,
    }


def _markdown(result: dict[str, Any]) -> str:
    if result.get("protocol") == "one-vs-all":
        keys = list(result["auroc"])
        lines = [
            f"One-vs-all on `{result['dataset']}` (AUROC %, test images: {result['n_test']})",
            "",
            "| normal class | " + " | ".join(f"gamma = {k}" for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for name in result["classes"]:
            cells = [f"{100 * result['auroc'][k][name]:.1f}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| **mean** | " + " | ".join(f"**{100 * result['mean'][k]:.1f}**" for k in keys) + " |")
        return "\n".join(lines) + "\n"
    if result.get("protocol") == "out-of-distribution":
        return (
            "| in-distribution | out-of-distribution | AUROC % | train | test in / out |\n"
            "|---|---|---:|---:|---:|\n"
            f"| `{result['in_dataset']}` | `{result['out_dataset']}` | {100 * result['auroc']:.1f} | "
            f"{result['n_train']} | {result['n_test_in']} / {result['n_test_out']} |\n"
        )
    raise ValueError("result must come from one_vs_all or out_of_distribution (no known 'protocol' key)")


def write_table(result: dict[str, Any], path: PathLike) -> tuple[Path, Path]:
    """Write ``result`` as ``<path>.md`` (a markdown table) and ``<path>.json``.

    Args:
        result: the dict returned by :func:`one_vs_all` or :func:`out_of_distribution`.
        path: output path; a ``.md`` or ``.json`` suffix is replaced.

    Returns:
        (markdown path, JSON path).
    """
    base = Path(path)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    if not base.parent.exists():
        raise FileNotFoundError(f"path: folder {str(base.parent)!r} does not exist")
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    md.write_text(_markdown(result))
    js.write_text(json.dumps(result, indent=2) + "\n")
    return md, js


def _log(verbose: bool, text: str) -> None:
    if verbose:
        print(f"[protocol] {text}", file=sys.stderr, flush=True)
