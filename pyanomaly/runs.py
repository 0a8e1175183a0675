"""The application layer: fit, evaluate, predict and benchmark as functions over run folders.

The CLI parses arguments and calls these; the demo and scripts call them too. A run folder holds one
run: ``model.pt``, ``config.json`` (method, data, parameters, versions, history), and after
``evaluate`` ``metrics.json``, ``per_defect.csv`` and ``heatmaps/``. Every check that can fail runs
before training or scoring starts; a lock file keeps two processes from writing one folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyanomaly import distributed

__all__ = [
    "RUN_OUTPUTS", "RunError", "TestSet", "benchmark_run", "claim_run_folder", "evaluate_run", "export_run", "fit_run",
    "load_detector", "predict_run", "test_set",
]

#: What a run writes into its folder (``--overwrite`` clears exactly these).
RUN_OUTPUTS = ("model.pt", "config.json", "metrics.json", "per_defect.csv", "heatmaps", "eval", "model.onnx", "model.pt2",
               "fit-args.json", "cpcad-checkpoint.pt", "anomem-checkpoint.pt")
#: What an interrupted, checkpointed fit leaves: ``--resume`` continues it.
RESUMABLE = ("fit-args.json", "cpcad-checkpoint.pt", "anomem-checkpoint.pt")
LOCK_NAME = ".pyanomaly.lock"
#: An empty lock younger than this may be one being written (where there are no hard links): not stale.
FRESH_EMPTY_LOCK_SECONDS = 10.0


class RunError(Exception):
    """An expected failure (bad folder, option or file): the CLI prints it as one line."""


# -- run folders -------------------------------------------------------------------------------
@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold ``folder/.pyanomaly.lock`` for the block; a lock of a dead process is taken over.

    The lock file appears atomically with its owner's pid in it (written to a private file, then
    hard-linked into place, which fails if the lock exists), so a second process never sees an empty
    lock and mistakes it for a stale one. A stale lock is renamed aside before it is removed, and put
    back if what was renamed turns out to be a newer, live lock.
    """
    lock = folder / LOCK_NAME
    mine = folder / f"{LOCK_NAME}.{os.getpid()}"
    try:
        mine.write_text(str(os.getpid()))
    except PermissionError:
        raise RunError(f"run folder {folder} is not writable") from None
    try:
        for _ in range(5):
            try:
                _link_or_create(mine, lock)
                break
            except FileExistsError:
                pid, inode, age = _lock_owner(lock)
                if (pid and _alive(pid)) or (not pid and inode is not None and age < FRESH_EMPTY_LOCK_SECONDS):
                    raise RunError(
                        f"run folder {folder} is in use by another pyanomaly process (pid {pid or 'being written'}); "
                        f"wait for it, or delete {lock} if that process is gone"
                    ) from None
                _take_over_stale(lock, inode)
        else:  # pragma: no cover - a race with other processes
            raise RunError(f"could not lock run folder {folder}; another process keeps taking it")
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _link_or_create(mine: Path, lock: Path) -> None:
    """Hard-link ``mine`` as ``lock``; where the file system has no hard links, create it (O_EXCL) and write."""
    try:
        os.link(mine, lock)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FAT mounts): the empty-file window comes back
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))


def _lock_owner(lock: Path) -> tuple[int, int | None, float]:
    """(pid written in the lock file or 0, its inode or None when it is gone, its age in seconds)."""
    try:
        with open(lock) as f:
            text, stat = f.read().strip(), os.fstat(f.fileno())
    except OSError:
        return 0, None, 0.0
    age = time.time() - stat.st_mtime
    try:
        return int(text or 0), stat.st_ino, age
    except ValueError:
        return 0, stat.st_ino, age


def _take_over_stale(lock: Path, inode: int | None) -> None:
    """Remove the stale lock ``inode``; a lock that replaced it in the meantime is left in place."""
    if inode is None:
        return
    aside = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return  # someone else removed it
    if os.stat(aside).st_ino != inode:  # a new owner's lock: put it back
        try:
            os.link(aside, lock)
        except FileExistsError:  # pragma: no cover - three-way race
            pass
    aside.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_run_folder(out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False):
    """Validate, create and lock a run folder before any work; returns the lock's context manager.

    Refuses: an empty name or the current folder (a run needs its own folder), a path that is a
    file, a folder that cannot be written, and a folder holding another run's outputs unless
    ``overwrite`` (which then deletes those outputs, and only those).
    """
    text = os.fspath(out)
    if not text.strip():
        raise RunError("--out is empty; name a run folder, e.g. --out runs/tile")
    folder = Path(text)
    if folder.resolve() == Path.cwd().resolve():
        raise RunError(f"--out {text!r} is the current folder; name a run folder of its own, e.g. --out runs/tile")
    _make_writable_folder(folder, text, file_label="--out", label="run folder", kind="run folder")
    lock = _locked(folder)
    lock.__enter__()
    try:
        existing = [name for name in RUN_OUTPUTS if (folder / name).exists() and not (resume and name in RESUMABLE)]
        if existing and not overwrite:
            raise RunError(
                f"run folder {text!r} already holds a run ({', '.join(existing)}); use another --out, "
                "or --overwrite to replace it"
            )
        for name in existing:
            target = folder / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    return lock


def _write_json(path: Path, record: Any) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def load_detector(run_or_model: str | os.PathLike, device: str | None = None):
    """The detector saved in a run folder (its model.pt) or a model file; an exported .onnx / .pt2
    comes back as an :class:`~pyanomaly.export.Inferencer` (the same scoring surface)."""
    from pyanomaly.models.base import Detector

    path = Path(run_or_model)
    if path.suffix.lower() in (".onnx", ".pt2") and path.is_file():
        from pyanomaly.export import Inferencer

        return Inferencer(path, device=device if device is not None else "auto")
    if path.is_dir():
        path = path / "model.pt"
        if not path.is_file():
            raise RunError(f"no model.pt in run folder {run_or_model} (train one with `pyanomaly fit ... --out {run_or_model}`)")
    elif not path.exists():
        raise RunError(f"run folder not found: {run_or_model}")
    return Detector.load(path, device=device if device is not None else "auto")


# -- data ----------------------------------------------------------------------------------------
def training_files(*, data: str | os.PathLike | None = None, category: str | None = None,
                   train: str | os.PathLike | None = None) -> tuple[list[Path], dict[str, Any]]:
    """The normal training images: ``<data>/<category>/train/good`` (MVTec AD) or a plain folder."""
    from pyanomaly.data import MVTecDataset, image_files

    if (train is None) == (data is None):
        raise RunError("give either --data ROOT --category NAME (MVTec AD layout) or --train FOLDER")
    if train is not None:
        return image_files(train, what="--train"), {"train": str(Path(train).resolve())}
    if category is None:
        raise RunError("--data needs --category (a category folder under it)")
    if not Path(data).is_dir():
        raise RunError(f"data folder not found: {data}")
    dataset = MVTecDataset(data, category, "train")
    return list(dataset.image_paths), {"data": str(Path(data).resolve()), "category": category}


@dataclass
class TestSet:
    """Test images with labels, defect names and (optional) mask files."""

    name: str
    paths: list[Path]
    labels: np.ndarray
    defects: list[str]
    mask_paths: list[Path | None]

    @property
    def has_masks(self) -> bool:
        return all(m is not None for m, y in zip(self.mask_paths, self.labels) if y == 1) and bool(self.labels.any())


def test_set(*, data: str | os.PathLike | None = None, category: str | None = None,
             test: str | os.PathLike | None = None) -> TestSet:
    """``<data>/<category>/test`` (MVTec AD, masks required) or a plain folder with ``good/`` and
    one subfolder per defect type (masks optional, in ``ground_truth/<defect>/<stem>_mask.png``)."""
    from pyanomaly.data import MVTecDataset, list_image_files

    if (test is None) == (data is None):
        raise RunError("give either --data ROOT [--category NAME] (MVTec AD layout) or --test FOLDER")
    if data is not None:
        if not Path(data).is_dir():
            raise RunError(f"data folder not found: {data}")
        ds = MVTecDataset(data, category, "test")
        return TestSet(category, list(ds.image_paths), np.array(ds.labels), list(ds.defect_types), list(ds.mask_paths))
    root = Path(test)
    if not root.is_dir():
        raise RunError(f"--test folder not found: {test}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "ground_truth")
    if not (root / "good").is_dir() or len(folders) < 2:
        raise RunError(f"--test folder {test} must hold good/ (normal images) and at least one defect subfolder, e.g. bad/")
    paths, labels, defects, masks = [], [], [], []
    for folder in folders:
        for path in list_image_files(folder, what="--test subfolder"):
            mask = root / "ground_truth" / folder.name / f"{path.stem}_mask.png"
            paths.append(path)
            labels.append(int(folder.name != "good"))
            defects.append(folder.name)
            masks.append(mask if folder.name != "good" and mask.is_file() else None)
    return TestSet(root.name, paths, np.array(labels), defects, masks)


# -- fit -----------------------------------------------------------------------------------------
RESUME_ARGS = "fit-args.json"


def fit_run(method: str, out: str | os.PathLike, config: dict[str, Any], *, data=None, category=None, train=None,
            overwrite: bool = False, resume: bool = False):
    """Train ``method`` on the training images; write ``out/model.pt`` and ``out/config.json``.

    Everything that can fail (data, options, the run folder) is checked before the first epoch.
    With ``checkpoint_every`` the training state goes to ``out`` (unless ``checkpoint_dir`` says
    otherwise) and the arguments to ``out/fit-args.json``; ``resume=True`` continues the fit those
    describe (``pyanomaly fit --resume RUN``).
    """
    import pyanomaly
    import torch

    from pyanomaly.models.base import get_method

    if resume:
        args_file = Path(out) / RESUME_ARGS
        if not args_file.is_file():
            raise RunError(f"nothing to resume in {out}: no {RESUME_ARGS} (fit with --checkpoint-every N first)")
        saved = json.loads(args_file.read_text())
        method, config = saved["method"], {**saved["config"], **config}
        data, category, train = saved.get("data"), saved.get("category"), saved.get("train")
    config = dict(config)
    if config.get("checkpoint_every") and not config.get("checkpoint_dir"):
        config["checkpoint_dir"] = str(out)
    cls = get_method(method)
    try:
        detector = cls(**config)
    except TypeError as exc:
        raise RunError(f"bad option for method {method!r}: {exc}") from None
    except NotImplementedError as exc:
        raise RunError(f"method {method!r} is not implemented yet ({exc})") from None
    if getattr(detector, "epochs", 1) < 1:
        raise RunError("epochs must be >= 1 (0 would save an untrained model)")
    files, source = training_files(data=data, category=category, train=train)
    # distributed (torchrun): every rank trains, rank 0 alone claims and writes the run folder; the
    # others learn whether it could, so a refused folder stops every rank instead of leaving them waiting
    main = distributed.is_main()
    lock, refused = nullcontext(), None
    if main:
        try:
            lock = claim_run_folder(out, overwrite=overwrite, resume=resume)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the other ranks heard of it
            refused = exc
    refusal = distributed.broadcast_object(None if refused is None else str(refused))
    if refusal is not None:
        raise refused if refused is not None else RunError(refusal)
    out = Path(out)
    try:
        checkpointing = getattr(detector, "checkpoint_every", 0)
        if checkpointing and not resume and main:
            _write_json(out / RESUME_ARGS, {"method": method, "config": detector.config(), "data": data and str(data),
                                            "category": category, "train": train and str(train)})
        start = time.perf_counter()
        try:
            detector.fit(files, **({"resume": detector.checkpoint_dir} if resume else {}))
        except KeyboardInterrupt:
            if checkpointing:
                raise RunError(f"interrupted: the last checkpoint is in {detector.checkpoint_dir}; "
                               f"continue with `pyanomaly fit --resume {out}`") from None
            raise RunError(f"interrupted: nothing was saved to {out}") from None
        seconds = time.perf_counter() - start
        if not main:
            return detector
        detector.save(out / "model.pt")
        _write_json(out / "config.json", {
            "method": method, **source, "config": detector.config(), "fit_seconds": round(seconds, 1),
            "train_images": len(files), "history": list(getattr(detector, "history_", [])),
            "pyanomaly_version": pyanomaly.__version__, "torch_version": str(torch.__version__),
        })
    finally:
        lock.__exit__(None, None, None)
    return detector


# -- evaluate ------------------------------------------------------------------------------------
def _heat(detector, amap: np.ndarray) -> np.ndarray:
    """Colormap input: fit-time normalisation, the pixel threshold at 2/3 of the scale."""
    return detector.normalize_map(amap) / 1.5


def evaluate_run(run: str | os.PathLike, *, data=None, category=None, test=None, heatmaps: bool = True,
                 eval_size: int | None = None, device: str | None = None) -> dict[str, Any]:
    """Score a test set; write ``metrics.json``, ``per_defect.csv`` and ``heatmaps/``.

    The run's own category (MVTec AD, the default) writes into the run folder; another category or
    a plain ``--test`` folder writes into ``<run>/eval/<name>/``. Without masks only the image-level
    metrics are computed. Pixel metrics are at the images' own size when all share it, otherwise maps
    (bilinear) and masks (nearest) are resized to ``eval_size`` (default 256).
    """
    import torch
    import torch.nn.functional as F

    from pyanomaly.data import load_mask, resize_masks
    from pyanomaly.metrics import aupro, f1_max, image_auroc, pixel_auroc
    from pyanomaly.visualize import save_overlay

    run = Path(run)
    if not run.is_dir():
        raise RunError(f"run folder not found: {run}")
    if eval_size is not None and eval_size < 1:
        raise RunError(f"--eval-size must be a positive number of pixels, got {eval_size}")
    detector = load_detector(run, device)
    record = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    if data is not None and category is None:
        category = record.get("category")
        if category is None:
            raise RunError(f"no --category given and no category in {run / 'config.json'} to take it from")
    tests = test_set(data=data, category=category, test=test)
    own = test is None and category == record.get("category")
    target = run if own else run / "eval" / tests.name
    with _locked(run):
        target.mkdir(parents=True, exist_ok=True)
        if (target / "heatmaps").is_dir():
            shutil.rmtree(target / "heatmaps")
        start = time.perf_counter()
        scores, maps = detector.score(tests.paths)
        seconds = time.perf_counter() - start
        labels = tests.labels
        masks = None
        if tests.has_masks:
            mask_list = [load_mask(m) if m is not None else torch.zeros(a.shape, dtype=torch.bool)
                         for m, a in zip(tests.mask_paths, maps)]
            if len({m.shape for m in maps}) == 1 and eval_size is None:
                size = maps[0].shape
                pix_maps, masks = np.stack(maps), torch.stack(mask_list).numpy()
            else:
                size = (eval_size or 256,) * 2
                pix_maps = np.stack([F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear")[0, 0].numpy()
                                     for m in maps])
                masks = resize_masks(mask_list, size).numpy()

        def block(index) -> dict[str, Any]:
            lab = labels[index]
            row: dict[str, Any] = {"images": int(len(index))}
            row["image_auroc"] = image_auroc(lab, scores[index]) if 0 < lab.sum() < len(lab) else None
            if masks is not None and masks[index].any() and not masks[index].all():
                row["pixel_auroc"], row["aupro"] = pixel_auroc(masks[index], pix_maps[index]), aupro(masks[index], pix_maps[index])
            else:
                row["pixel_auroc"] = row["aupro"] = None
            return row

        everything = np.arange(len(labels))
        metrics: dict[str, Any] = {"method": detector.method, "category": tests.name, **block(everything)}
        image_f1 = f1_max(labels, scores) if labels.any() else (None, None)
        pixel_f1 = f1_max(masks, pix_maps) if masks is not None else (None, None)
        metrics.update({
            "image_f1_max": image_f1[0], "image_f1_threshold": image_f1[1],
            "pixel_f1_max": pixel_f1[0], "pixel_f1_threshold": pixel_f1[1],
            "eval_size": list(size) if masks is not None else None, "score_seconds": round(seconds, 1),
            "threshold": detector.threshold_, "pixel_threshold": detector.pixel_threshold_,
            "predicted_anomalous": int((scores > detector.threshold_).sum()),
        })
        per_defect = {}
        good = [i for i, d in enumerate(tests.defects) if labels[i] == 0]
        for defect in sorted({d for d, y in zip(tests.defects, labels) if y == 1}):
            index = np.array(good + [i for i, d in enumerate(tests.defects) if d == defect])
            per_defect[defect] = block(index)
            per_defect[defect]["images"] = sum(d == defect for d in tests.defects)
        metrics["per_defect"] = per_defect
        _write_json(target / "metrics.json", metrics)
        with open(target / "per_defect.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["defect", "images", "image_auroc", "pixel_auroc", "aupro"])
            for defect, row in per_defect.items():
                writer.writerow([defect, row["images"], row["image_auroc"], row["pixel_auroc"], row["aupro"]])
        if heatmaps and detector.pixel_threshold_ is not None:
            for path, defect, amap, mask_path in zip(tests.paths, tests.defects, maps, tests.mask_paths):
                image = _load_for_display(path)
                mask = load_mask(mask_path).numpy() if mask_path is not None else None
                save_overlay(target / "heatmaps" / defect / (path.stem + ".png"), image, _heat(detector, amap), mask)
    metrics["output_folder"] = str(target)
    return metrics


def _load_for_display(path: Path):
    from pyanomaly.data import as_images

    return as_images(path)[0]


# -- predict -------------------------------------------------------------------------------------
def _output_names(paths: Sequence[Path], roots: Sequence[Path | None]) -> list[str]:
    """A collision-free relative name per image: its path below the folder it came from (or its
    file name), with a short hash of the full path added where two would still collide."""
    names = []
    for path, root in zip(paths, roots):
        rel = path.relative_to(root) if root is not None else Path(path.name)
        names.append(rel.with_suffix("").as_posix())
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name if seen[name] == 1 else f"{name}-{hashlib.sha1(str(p.resolve()).encode()).hexdigest()[:8]}"
            for name, p in zip(names, paths)]


def _make_writable_folder(folder: Path, shown, *, file_label: str, label: str, kind: str) -> None:
    """Create ``folder`` (and its parents) and check that files can be written in it; a RunError
    naming it as ``shown`` otherwise (``file_label``/``label`` prefix the messages)."""
    if folder.exists() and not folder.is_dir():
        raise RunError(f"{file_label} {shown!r} is a file, not a {kind}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create {label} {shown!r}: {exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunError(f"{label} {shown!r} is not writable")


def _output_dir(value: str | os.PathLike | None, option: str) -> Path | None:
    if value is None:
        return None
    folder = Path(value)
    _make_writable_folder(folder, value, file_label=option, label=option, kind="folder")
    return folder


def predict_run(run_or_model: str | os.PathLike, inputs: Sequence[str], *, output: str | None = None,
                fmt: str = "csv", heatmap_dir=None, mask_dir=None, map_dir=None, device: str | None = None) -> list[dict]:
    """Score image files, folders and glob patterns: one row per image (path, score, label,
    probability) as CSV with a header or JSON (to ``output`` or returned); optionally heatmap PNGs,
    predicted-mask PNGs and ``.npy`` maps under collision-free names."""
    from PIL import Image

    from pyanomaly.data import image_files
    from pyanomaly.visualize import save_overlay

    if fmt not in ("csv", "json"):
        raise RunError(f"--format must be csv or json, got {fmt!r}")
    detector = load_detector(run_or_model, device)
    paths, roots = [], []
    for spec in inputs:
        files = image_files(spec, what="predict input", recursive=True)
        paths.extend(files)
        roots.extend([Path(spec)] * len(files) if Path(spec).is_dir() else [None] * len(files))
    if output is not None and Path(output).is_dir():
        raise RunError(f"--output {output!r} is a folder; give a file name such as scores.{fmt}")
    heat_dir, masks_dir, maps_dir = (_output_dir(heatmap_dir, "--heatmap-dir"), _output_dir(mask_dir, "--mask-dir"),
                                     _output_dir(map_dir, "--map-dir"))
    if (heat_dir or masks_dir) and detector.pixel_threshold_ is None:
        raise RunError("this model has no pixel threshold (saved by an older pyanomaly); re-save it after fit_threshold")
    scores, maps = detector.score(paths)
    proba = detector._proba(scores, "linear")[:, 1]
    names = _output_names(paths, roots)
    rows = [{"path": str(p), "score": float(s), "label": int(s > detector.threshold_), "probability": float(q)}
            for p, s, q in zip(paths, scores, proba)]
    for name, path, amap in zip(names, paths, maps):
        if heat_dir is not None:
            save_overlay(heat_dir / f"{name}.png", _load_for_display(path), _heat(detector, amap))
        if masks_dir is not None:
            (masks_dir / f"{name}.png").parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((amap > detector.pixel_threshold_).astype(np.uint8) * 255).save(masks_dir / f"{name}.png")
        if maps_dir is not None:
            (maps_dir / f"{name}.npy").parent.mkdir(parents=True, exist_ok=True)
            np.save(maps_dir / f"{name}.npy", amap)
    if output is not None:
        _write_rows(Path(output), rows, fmt)
    return rows


def _write_rows(path: Path, rows: list[dict], fmt: str) -> None:
    if fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "score", "label", "probability"])
        writer.writeheader()
        writer.writerows(rows)


def format_rows(rows: list[dict], fmt: str) -> str:
    """The rows as CSV (with a header) or JSON text."""
    import io

    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "score", "label", "probability"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().rstrip("\n")


# -- export --------------------------------------------------------------------------------------
def export_run(run_or_model: str | os.PathLike, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
    """Export a run's model (default file: ``<run>/model.onnx`` or ``<run>/model.pt2``)."""
    from pyanomaly.export import _SUFFIX, FORMATS

    if fmt not in FORMATS:
        raise RunError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    source = Path(run_or_model)
    detector = load_detector(source, "cpu")
    if out is None:
        out = (source if source.is_dir() else source.parent) / f"model{_SUFFIX[fmt]}"
    return detector.export(out, fmt)


# -- benchmark -----------------------------------------------------------------------------------
def benchmark_run(method: str, data: str | os.PathLike, categories: Sequence[str] | str, out: str | os.PathLike,
                  config: dict[str, Any], *, overwrite: bool = False, heatmaps: bool = False) -> dict[str, Any]:
    """Fit and evaluate ``method`` on several MVTec AD categories (``"all"``: every one under
    ``data``); each in ``out/<category>/``; one table in ``out/benchmark.md`` and ``.json``."""
    from pyanomaly.data import mvtec_categories

    if not Path(data).is_dir():
        raise RunError(f"data folder not found: {data}")
    names = mvtec_categories(data) if categories == "all" or categories == ["all"] else list(categories)
    known = set(mvtec_categories(data))
    unknown = [c for c in names if c not in known]
    if unknown:
        raise RunError(f"unknown categories {unknown} under {data}; found: {', '.join(sorted(known))}")
    out = Path(out)
    for name in names:  # every folder is claimed (and checked) before the first fit
        claim_run_folder(out / name, overwrite=overwrite).__exit__(None, None, None)
    rows = []
    for name in names:
        start = time.perf_counter()
        fit_run(method, out / name, config, data=data, category=name, overwrite=True)
        fit_seconds = time.perf_counter() - start
        metrics = evaluate_run(out / name, data=data, category=name, heatmaps=heatmaps)
        rows.append({"category": name, "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
                     "aupro": metrics["aupro"], "fit_seconds": round(fit_seconds, 1), "score_seconds": metrics["score_seconds"]})
    means = {key: _mean([r[key] for r in rows]) for key in ("image_auroc", "pixel_auroc", "aupro")}
    result = {"method": method, "data": str(Path(data).resolve()), "config": config, "rows": rows, "mean": means}
    _write_json(out / "benchmark.json", result)
    lines = [f"# {method} on {data}", "", "| category | image AUROC | pixel AUROC | AUPRO | fit s | score s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['category']} | {_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} | {_fmt(r['aupro'])} | "
                     f"{r['fit_seconds']} | {r['score_seconds']} |")
    lines.append(f"| **mean** | {_fmt(means['image_auroc'])} | {_fmt(means['pixel_auroc'])} | {_fmt(means['aupro'])} | | |")
    (out / "benchmark.md").write_text("\n".join(lines) + "\n")
    result["table"] = "\n".join(lines)
    return result


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
