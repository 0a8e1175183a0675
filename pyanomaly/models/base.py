"""The detector layer shared by CPCAD and AnoMem: PyOD's and scikit-learn's contract, in one place.

- Parameters: the constructor's keyword arguments, stored as given (``get_params``, ``set_params``,
  ``sklearn.base.clone`` and ``__repr__`` work); the detector validates them at construction.
- ``fit(data)`` on normal images; ``score(images)``: image scores (N,) and anomaly maps in one pass;
  ``decision_function`` (N,), higher = more anomalous; ``anomaly_map``; ``predict`` (0/1 through
  ``threshold_``); ``predict_proba`` (PyOD's "linear" and "unify"); ``predict_masks`` (through
  ``pixel_threshold_``).
- Thresholds: ``contamination`` of the training scores (PyOD's default), :meth:`fit_threshold` on a
  validation set (best F1 with labelled anomalies, or a false-positive rate on normal images), or
  :meth:`set_threshold` by hand; the same three for the pixel threshold.
- Maps are normalised against statistics of the training maps stored at fit time
  (``map_low_``, ``pixel_threshold_``), never per call.
- ``save(path)`` / ``load(path)``: one file, written atomically, with a format version, the pyanomaly
  and torch versions and a SHA-256 of the payload, loadable on CPU whatever device it was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from pyanomaly import distributed
from pyanomaly.data._sources import EpochLoader, ImageSource

__all__ = ["METHODS", "Detector", "FORMAT_VERSION", "atomic_save", "get_method", "resolve_device"]

#: 1: the payload dict itself. 2: the payload serialised, with its SHA-256 and the versions beside it.
FORMAT_VERSION = 2
#: Quantile of the training maps' pixel values that sets the default ``pixel_threshold_``.
PIXEL_QUANTILE = 0.999
_PROBA_METHODS = ("linear", "unify")


class _TrainingStep(torch.nn.Module):
    """A model and the function that computes its training loss, as one module (what DDP wraps)."""

    def __init__(self, model: torch.nn.Module, loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *args, **kwargs):
        return self.loss(*args, **kwargs)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other value must name a usable torch device.

    Raises a one-line ValueError for unknown strings and for CUDA on a torch (or machine) without it.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"CUDA requested (device={str(device)!r}) but this torch has no CUDA; use device 'cpu' or 'auto'"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"CUDA requested (device={str(device)!r}) but no CUDA device is visible; use device 'cpu' or 'auto'"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return resolved


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves any earlier file at ``path`` untouched; the file gets the user's
    umask (not mkstemp's 0600); stale temporaries of an interrupted earlier save are removed.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory; give a file name such as model.pt")
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot save to {str(path)!r}: folder {str(path.parent)!r} does not exist")
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete ``.<name>.*.tmp`` files beside ``path`` left by a save that was killed."""
    path = Path(path)
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass


def _versions() -> dict[str, str]:
    import pyanomaly

    return {"pyanomaly_version": str(pyanomaly.__version__), "torch_version": str(torch.__version__)}


def _jsonable(value: Any) -> Any:
    """Constructor arguments as JSON values (tuples -> lists, devices -> strings, numpy -> Python)."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


class Detector:
    """Base class of the detectors; see the module docstring for the contract.

    Subclasses set ``method`` and ``grayscale`` and implement ``fit`` (which ends with
    :meth:`_fit_thresholds`), ``score`` and ``_get_state`` / ``_set_state`` (tensors and plain
    values); every constructor argument is keyword-only and becomes a parameter.
    """

    method: ClassVar[str] = "detector"
    #: Whether the method reads gray images (True: colour inputs are converted to luma) or keeps
    #: each input's own channels (False).
    grayscale: ClassVar[bool] = False
    #: Named configurations: ``name -> constructor arguments``; see each detector's docstring.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Record every construction's arguments, as given, for ``get_params`` (sklearn's contract)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            params = {k: v for k, v in bound.arguments.items() if k != "self"}
            init(self, *args, **kw)
            if type(self) is cls:  # the most derived constructor's arguments are the parameters
                self._params = params

        cls.__init__ = recording_init

    def __init__(self, contamination: float = 0.1) -> None:
        if isinstance(contamination, bool) or not isinstance(contamination, (int, float)) or not (
            0.0 < contamination <= 0.5
        ):
            raise ValueError(f"contamination must be in (0, 0.5] (PyOD's range), got {contamination!r}")
        self.contamination = float(contamination)
        self.threshold_: float | None = None
        self.decision_scores_: np.ndarray | None = None
        self.labels_: np.ndarray | None = None
        self.map_low_: float | None = None
        self.pixel_threshold_: float | None = None

    # -- parameters (scikit-learn) -------------------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(p.name for p in signature.parameters.values() if p.name != "self")

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as given (``deep`` is accepted for scikit-learn; no nesting)."""
        return dict(self._params)

    def set_params(self, **params: Any) -> Detector:
        """Change constructor arguments (validated as in the constructor); refit afterwards."""
        unknown = sorted(set(params) - set(self._params))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for {type(self).__name__}; valid: {', '.join(sorted(self._params))}"
            )
        fresh = type(self)(**{**self._params, **params})
        for key, value in fresh.__dict__.items():
            if not (key.endswith("_") and not key.startswith("_")):  # keep fitted attributes
                setattr(self, key, value)
        return self

    def config(self) -> dict[str, Any]:
        """The parameters as JSON values: what ``save`` and the CLI's config.json record."""
        return _jsonable(self.get_params())

    def __repr__(self) -> str:
        defaults = {
            name: p.default for name, p in inspect.signature(type(self).__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        changed = []
        for name, value in sorted(self._params.items()):
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = bool(value == default) if not isinstance(value, torch.Tensor) else False
            except Exception:
                same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def preset_arguments(cls, name: str) -> dict[str, Any]:
        """The constructor arguments of the named preset (a ValueError naming the choices if none)."""
        if name not in cls.PRESETS:
            choices = ", ".join(cls.PRESETS) or "none"
            raise ValueError(f"unknown preset {name!r} for {cls.__name__}; choose one of: {choices}")
        return dict(cls.PRESETS[name])

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Detector:
        """A detector built from the named preset, with ``overrides`` applied on top."""
        return cls(**{**cls.preset_arguments(name), **overrides})

    # -- what subclasses implement -------------------------------------------------------------
    def fit(self, data, *args, **kwargs) -> Detector:
        raise NotImplementedError

    def score(self, images) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (N,) float64 and anomaly maps (one float32 (H_i, W_i) per image), one pass."""
        raise NotImplementedError

    def _get_state(self) -> dict:
        raise NotImplementedError

    def _set_state(self, state: dict) -> None:
        raise NotImplementedError

    # -- scores, labels, maps ------------------------------------------------------------------
    def decision_function(self, images) -> np.ndarray:
        """Anomaly score per image (N,) float64, higher = more anomalous."""
        return self.score(images)[0]

    def anomaly_map(self, images, *, normalize: bool = False) -> np.ndarray | list[np.ndarray]:
        """Pixel anomaly maps at each image's size: (N, H, W) float32, or a list when sizes differ.

        ``normalize=True`` maps the training statistics stored at fit time onto a fixed scale:
        0 = the training maps' median, 1 = ``pixel_threshold_`` (the same for every call, so a
        normal image scored alone stays cool).
        """
        _, maps = self.score(images)
        if normalize:
            maps = [self.normalize_map(m) for m in maps]
        return _stack_if_same(maps)

    def normalize_map(self, amap: np.ndarray) -> np.ndarray:
        """``(amap - map_low_) / (pixel_threshold_ - map_low_)``: 1.0 at the pixel threshold."""
        self._check_pixel_threshold()
        span = max(self.pixel_threshold_ - self.map_low_, 1e-12)
        return ((np.asarray(amap, dtype=np.float32) - self.map_low_) / span).astype(np.float32)

    def predict(self, images) -> np.ndarray:
        """0/1 labels (N,): 1 where the score exceeds ``threshold_``."""
        self._check_fitted()
        return (self.decision_function(images) > self.threshold_).astype(np.int64)

    def predict_masks(self, images) -> np.ndarray | list[np.ndarray]:
        """Boolean defect masks (map > ``pixel_threshold_``): (N, H, W), or a list when sizes differ."""
        self._check_pixel_threshold()
        _, maps = self.score(images)
        return _stack_if_same([m > self.pixel_threshold_ for m in maps])

    def predict_proba(self, images, method: str = "linear") -> np.ndarray:
        """(N, 2) probabilities [normal, anomalous], PyOD's semantics, from the training scores.

        ``"linear"``: the score min-max scaled by the training scores' range, clipped to [0, 1];
        ``"unify"``: ``erf((score - mean) / (std * sqrt(2)))`` of the training scores, clipped
        (Kriegel et al., "Interpreting and unifying outlier scores", as in PyOD).
        """
        self._check_fitted()
        if method not in _PROBA_METHODS:
            raise ValueError(f"method must be one of {_PROBA_METHODS}, got {method!r}")
        scores = self.decision_function(images)
        return self._proba(scores, method)

    def _proba(self, scores: np.ndarray, method: str) -> np.ndarray:
        train = np.asarray(self.decision_scores_, dtype=np.float64)
        if method == "linear":
            low, high = float(train.min()), float(train.max())
            p = (scores - low) / max(high - low, 1e-12)
        else:
            from scipy.special import erf

            p = erf((scores - train.mean()) / (max(float(train.std()), 1e-12) * math.sqrt(2)))
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)

    # -- thresholds -----------------------------------------------------------------------------
    def _fit_thresholds(self, training_scores: np.ndarray, training_maps) -> None:
        """At the end of ``fit``: ``threshold_`` so a ``contamination`` fraction of the training
        scores lie above it; ``map_low_`` (median) and ``pixel_threshold_`` (the PIXEL_QUANTILE
        quantile) of the training maps' pixel values."""
        scores = np.asarray(training_scores, dtype=np.float64)
        self.decision_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        self.labels_ = (scores > self.threshold_).astype(np.int64)
        pixels = _pixel_sample(training_maps)
        self.map_low_ = float(np.median(pixels))
        self.pixel_threshold_ = float(np.quantile(pixels, PIXEL_QUANTILE))

    def fit_threshold(
        self, images, labels=None, *, masks=None, fpr: float | None = None, pixel_fpr: float = 0.001
    ) -> Detector:
        """Set ``threshold_`` and ``pixel_threshold_`` from a validation set (scored once).

        Image threshold: with ``labels`` (1 = anomalous) holding both classes and no ``fpr``, the
        best-F1 threshold; otherwise the threshold that flags an ``fpr`` fraction of the normal
        images (``fpr`` default ``contamination``). Pixel threshold: with ``masks`` that mark some
        pixels, the best pixel-F1 threshold; otherwise the one that flags a ``pixel_fpr`` fraction
        of the normal images' pixels.

        Args:
            images: validation images (any form :func:`pyanomaly.data.as_images` takes).
            labels: (N,) 0/1, or None when all are normal.
            masks: optional (N, H, W) bool masks (or a list of (H_i, W_i)) at the images' sizes.
            fpr, pixel_fpr: false-positive budgets in (0, 1).
        """
        from pyanomaly.metrics import f1_max

        self._check_fitted()
        for name, value in (("fpr", fpr), ("pixel_fpr", pixel_fpr)):
            if value is not None and not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {value!r}")
        scores, maps = self.score(images)
        n = len(scores)
        y = np.zeros(n, dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64).ravel()
        if y.shape != (n,) or not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be {n} values of 0 (normal) or 1 (anomalous), got shape {np.shape(labels)}")
        normal = y == 0
        if fpr is None and normal.any() and (~normal).any():
            _, best = f1_max(y, scores)
            self.threshold_ = float(np.nextafter(best, -np.inf))  # predict uses score > threshold_
        else:
            if not normal.any():
                raise ValueError("fit_threshold needs normal images (label 0) for a false-positive budget")
            self.threshold_ = float(np.quantile(scores[normal], 1.0 - (fpr if fpr is not None else self.contamination)))
        if self.map_low_ is None:  # models saved in format 1: take the maps' median here
            self.map_low_ = float(np.median(_pixel_sample(maps)))
        if masks is not None:
            mask_list = [np.asarray(m, dtype=bool) for m in masks]
            if len(mask_list) != n or any(m.shape != a.shape for m, a in zip(mask_list, maps)):
                raise ValueError("masks must hold one (H, W) mask per image, at the image's own size")
            flat_masks = np.concatenate([m.ravel() for m in mask_list])
            if flat_masks.any() and not flat_masks.all():
                _, best = f1_max(flat_masks, np.concatenate([a.ravel() for a in maps]))
                self.pixel_threshold_ = float(np.nextafter(best, -np.inf))
                return self
        normal_maps = [a for a, is_normal in zip(maps, normal) if is_normal]
        if not normal_maps:
            raise ValueError("fit_threshold needs masks or normal images (label 0) for the pixel threshold")
        self.pixel_threshold_ = float(np.quantile(_pixel_sample(normal_maps), 1.0 - pixel_fpr))
        return self

    def set_threshold(self, image: float | None = None, *, pixel: float | None = None) -> Detector:
        """Set ``threshold_`` (image scores) and/or ``pixel_threshold_`` (maps) by hand."""
        self._check_fitted()
        for name, value in (("image", image), ("pixel", pixel)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} threshold must be a finite number, got {value!r}")
        if image is not None:
            self.threshold_ = float(image)
        if pixel is not None:
            self.pixel_threshold_ = float(pixel)
        return self

    def _check_pixel_threshold(self) -> None:
        self._check_fitted()
        if self.pixel_threshold_ is None or self.map_low_ is None:  # models saved in format 1
            raise RuntimeError(
                f"this {type(self).__name__} has no pixel statistics (saved by an older pyanomaly): call "
                "fit_threshold(images) on normal images, or set_threshold(pixel=...), then save it again"
            )

    def _check_fitted(self) -> None:
        if self.threshold_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(...) or load(...) first")

    def export(self, path: str | os.PathLike, format: str = "onnx") -> Path:
        """Write the fitted detector as one graph: ``"onnx"`` or ``"torch"`` (``torch.export``); see
        :mod:`pyanomaly.export`. Returns the path written."""
        from pyanomaly.export import export

        return export(self, path, format)

    # -- resumable fits ---------------------------------------------------------------------
    #: Parameters that may differ between a checkpoint and the fit resuming it.
    _RESUME_FREE = ("checkpoint_every", "checkpoint_dir", "verbose", "device", "epochs", "activation_checkpointing")

    def _set_checkpointing(self, checkpoint_every: int, checkpoint_dir: str | None) -> None:
        """Validate and store the two checkpoint arguments both detectors take."""
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
        if checkpoint_every and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (the folder to write checkpoints to)")
        self.checkpoint_every, self.checkpoint_dir = checkpoint_every, checkpoint_dir

    def _set_data_loading(self, num_workers: int, cache_images: bool | str) -> None:
        """Validate and store the two training-data arguments both detectors take."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if isinstance(cache_images, str) and cache_images.lower() in ("true", "false"):  # the CLI's text
            cache_images = cache_images.lower() == "true"
        if cache_images not in (True, False, "auto"):
            raise ValueError(f"cache_images must be True, False or 'auto', got {cache_images!r}")
        self.num_workers, self.cache_images = num_workers, cache_images

    def _training_source(self, data: Any, name: str, **kwargs) -> ImageSource:
        """The training images, decoded per epoch from their files or cached (``cache_images``)."""
        return ImageSource(data, name, cache=getattr(self, "cache_images", "auto"), **kwargs)

    def _epoch_loader(self, source: ImageSource, transform, *, seed: int, batch_size: int, drop_last: bool,
                      collate=None, split_over_ranks: bool = False) -> EpochLoader:
        """Batches of ``transform`` over ``source``, in ``num_workers`` DataLoader workers (pinned
        memory when training on CUDA); ``split_over_ranks``: this rank's slice of each batch."""
        return EpochLoader(source, transform, seed=seed, batch_size=batch_size, drop_last=drop_last,
                           num_workers=getattr(self, "num_workers", 0),
                           pin_memory=torch.device(self.device).type == "cuda", collate=collate,
                           ranks=distributed.world() if split_over_ranks else (0, 1))

    def _global_batch(self) -> tuple[int, int]:
        """(rank, world size) of this fit, after checking that ``batch_size`` splits evenly."""
        rank, size = distributed.world()
        if size > 1 and self.batch_size % size:
            raise ValueError(f"batch_size ({self.batch_size}) is the global batch: it must be a multiple of the "
                             f"number of ranks ({size})")
        return rank, size

    def _data_parallel(self, model: torch.nn.Module, loss):
        """``loss`` (a function of a batch that runs ``model`` and returns its training loss), as a
        DistributedDataParallel module over ``model`` when training is distributed, else itself."""
        if distributed.world()[1] == 1:
            return loss
        device = torch.device(self.device)
        return torch.nn.parallel.DistributedDataParallel(
            _TrainingStep(model, loss), device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True,
        )

    def _checkpoint_file(self) -> Path | None:
        directory = getattr(self, "checkpoint_dir", None)
        return None if directory is None else Path(directory) / f"{self.method}-checkpoint.pt"

    def _maybe_checkpoint(self, epoch: int, training: dict[str, Any]) -> None:
        """After ``epoch`` (1-based): write the training state atomically every ``checkpoint_every``
        epochs (and after the last)."""
        every, path = getattr(self, "checkpoint_every", 0), self._checkpoint_file()
        if not every or path is None or (epoch % every and epoch != self.epochs) or not distributed.is_main():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"format": "pyanomaly-checkpoint", "method": self.method, "config": self.config(),
                     **_versions(), "epoch": epoch, "training": _to_cpu(training)}, path)

    def _read_checkpoint(self, resume: str | os.PathLike) -> dict[str, Any]:
        """The training state saved by :meth:`_maybe_checkpoint` in ``resume`` (a file or the folder
        holding ``<method>-checkpoint.pt``), after checking that it belongs to this configuration."""
        path = Path(resume)
        if path.is_dir():
            path = path / f"{self.method}-checkpoint.pt"
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint to resume from at {str(path)!r}")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a readable pyanomaly checkpoint ({exc})") from exc
        if not isinstance(saved, dict) or saved.get("format") != "pyanomaly-checkpoint" or saved.get("method") != self.method:
            raise ValueError(f"{str(path)!r} is not a {self.method} checkpoint")
        mine, theirs = self.config(), saved["config"]
        changed = sorted(k for k in set(mine) | set(theirs) if k not in self._RESUME_FREE and mine.get(k) != theirs.get(k))
        if changed:
            raise ValueError(
                f"checkpoint {str(path)!r} was written with other settings ({', '.join(changed)}); resume with the same ones"
            )
        if saved["epoch"] > self.epochs:
            raise ValueError(f"checkpoint {str(path)!r} is at epoch {saved['epoch']}, past epochs={self.epochs}")
        return {"epoch": int(saved["epoch"]), **saved["training"]}

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one file (atomically: an existing file is replaced whole).
        In distributed training only rank 0 writes; the other ranks return at once."""
        self._check_fitted()
        if not distributed.is_main():
            return
        payload = {
            "method": self.method,
            "config": self.config(),
            "threshold": self.threshold_,
            "pixel_threshold": self.pixel_threshold_,
            "map_low": self.map_low_,
            "decision_scores": torch.as_tensor(self.decision_scores_),
            "state": _to_cpu(self._get_state()),
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        blob = buffer.getvalue()
        atomic_save(
            {"format": "pyanomaly", "format_version": FORMAT_VERSION, "method": self.method, **_versions(),
             "sha256": hashlib.sha256(blob).hexdigest(), "payload": blob},
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = "auto") -> Detector:
        """Load a detector saved by :meth:`save` onto ``device`` ("auto": CUDA when available).

        A damaged file (its SHA-256 does not match) or one of a newer format is refused with a
        one-line ValueError naming it.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved model at {str(path)!r}")
        remove_stale_temporaries(path)
        try:
            outer = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a readable pyanomaly model file (damaged or not one: {exc})") from exc
        if not isinstance(outer, dict) or outer.get("format") != "pyanomaly":
            raise ValueError(f"{str(path)!r} is not a pyanomaly model file")
        version = outer.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format version {version!r} (written by pyanomaly "
                f"{outer.get('pyanomaly_version', '?')}); this pyanomaly reads up to {FORMAT_VERSION}: upgrade pyanomaly"
            )
        if version >= 2:
            blob = outer.get("payload")
            if not isinstance(blob, bytes) or hashlib.sha256(blob).hexdigest() != outer.get("sha256"):
                raise ValueError(f"{str(path)!r} is damaged: its checksum does not match (re-save or re-train the model)")
            payload = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        else:
            payload = outer
        if cls is not Detector and payload["method"] != cls.method:
            raise ValueError(f"{str(path)!r} holds a {payload['method']} model, not {cls.method}")
        target = cls if cls is not Detector else get_method(payload["method"])
        config = dict(payload["config"])
        if "amp" in config:  # files from before ``precision``: amp only acted on CUDA, so fp32 reproduces CPU scores
            config.pop("amp")
            config.setdefault("precision", "fp32")
        config["device"] = str(device) if device is not None else "cpu"
        known = set(target._get_param_names())
        detector = target(**{k: v for k, v in config.items() if k in known})
        detector._set_state(payload["state"])
        detector.threshold_ = float(payload["threshold"])
        detector.decision_scores_ = payload["decision_scores"].numpy()
        detector.labels_ = (detector.decision_scores_ > detector.threshold_).astype(np.int64)
        detector.map_low_ = payload.get("map_low")
        detector.pixel_threshold_ = payload.get("pixel_threshold")
        return detector


def _stack_if_same(maps: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    if maps and len({m.shape for m in maps}) == 1:
        return np.stack(maps)
    return maps


def _pixel_sample(maps, limit: int = 2_000_000) -> np.ndarray:
    """The maps' pixel values (float64), a fixed-stride subsample when there are more than ``limit``."""
    flat = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in maps])
    if flat.size > limit:
        flat = flat[:: int(math.ceil(flat.size / limit))]
    return flat


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


#: The one method registry: ``name -> (module, class name)`` or the class itself. The CLI, the
#: runs and ``Detector.load`` look methods up here.
METHODS: dict[str, Any] = {
    "cpcad": ("pyanomaly.models.cpcad", "CPCAD"),
    "anomem": ("pyanomaly.models.anomem", "AnoMem"),
}


def get_method(name: str) -> type[Detector]:
    """The detector class registered as ``name`` (a ValueError naming the choices if none)."""
    import importlib

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHODS))}")
    entry = METHODS[name]
    if isinstance(entry, type):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(module), cls)
