"""The detector contract shared by CPCAD and AnoMem (PyOD's, which users already know).

``fit(data)`` on normal images; ``decision_function(images)`` (N,) higher = more anomalous;
``predict(images)`` 0/1 through ``threshold_``, fitted from ``contamination`` on the training
scores; ``save(path)`` / ``load(path)``: one file, written atomically, with a format version,
loadable on CPU whatever device it was trained on.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["Detector", "FORMAT_VERSION", "atomic_save"]

FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it.

    A crash or a full disk leaves any earlier file at ``path`` untouched.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory; give a file name such as model.pt")
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot save to {str(path)!r}: folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Detector:
    """Base class: threshold fitting, predict, save and load. Subclasses implement the rest.

    Subclasses set ``method`` and implement ``fit``, ``decision_function``, ``_get_config``
    (JSON-able constructor arguments), ``_get_state`` / ``_set_state`` (tensors and plain values).
    """

    method: ClassVar[str] = "detector"
    #: Named configurations: ``name -> constructor arguments``; see each detector's docstring.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, contamination: float = 0.1) -> None:
        if not 0.0 < contamination < 0.5:
            raise ValueError(f"contamination must be in (0, 0.5), got {contamination}")
        self.contamination = contamination
        self.threshold_: float | None = None
        self.decision_scores_: np.ndarray | None = None
        self.labels_: np.ndarray | None = None

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

    # -- the contract -------------------------------------------------------------------------
    def fit(self, data, *args, **kwargs) -> Detector:
        raise NotImplementedError

    def decision_function(self, images) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images) -> np.ndarray:
        """0/1 labels (N,): 1 where the score exceeds ``threshold_``."""
        self._check_fitted()
        return (self.decision_function(images) > self.threshold_).astype(np.int64)

    def _fit_threshold(self, training_scores: np.ndarray) -> None:
        """Set ``threshold_`` so a ``contamination`` fraction of the training scores lie above it."""
        scores = np.asarray(training_scores, dtype=np.float64)
        self.decision_scores_ = scores
        self.threshold_ = float(np.quantile(scores, 1.0 - self.contamination))
        self.labels_ = (scores > self.threshold_).astype(np.int64)

    def _check_fitted(self) -> None:
        if self.threshold_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet: call fit(...) or load(...) first")

    # -- persistence --------------------------------------------------------------------------
    def _get_config(self) -> dict:
        raise NotImplementedError

    def _get_state(self) -> dict:
        raise NotImplementedError

    def _set_state(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted detector to one file (atomically: an existing file is replaced whole)."""
        self._check_fitted()
        payload = {
            "format": "pyanomaly",
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "config": self._get_config(),
            "threshold": self.threshold_,
            "decision_scores": torch.as_tensor(self.decision_scores_),
            "state": _to_cpu(self._get_state()),
        }
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None) -> Detector:
        """Load a detector saved by :meth:`save` (onto ``device``, default CPU)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved model at {str(path)!r}")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a readable pyanomaly model file ({exc})") from exc
        if not isinstance(payload, dict) or payload.get("format") != "pyanomaly":
            raise ValueError(f"{str(path)!r} is not a pyanomaly model file")
        version = payload.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format version {version!r}; this pyanomaly reads up to {FORMAT_VERSION}: upgrade pyanomaly"
            )
        if cls is not Detector and payload["method"] != cls.method:
            raise ValueError(f"{str(path)!r} holds a {payload['method']} model, not {cls.method}")
        target = cls if cls is not Detector else _registry()[payload["method"]]
        config = dict(payload["config"])
        if "amp" in config:  # files from before ``precision``: amp only acted on CUDA, so fp32 reproduces CPU scores
            config.pop("amp")
            config.setdefault("precision", "fp32")
        if device is not None or "device" in config:  # default CPU, whatever it was trained on
            config["device"] = str(device) if device is not None else "cpu"
        detector = target(**config)
        detector._set_state(payload["state"])
        detector.threshold_ = float(payload["threshold"])
        detector.decision_scores_ = payload["decision_scores"].numpy()
        detector.labels_ = (detector.decision_scores_ > detector.threshold_).astype(np.int64)
        return detector


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _registry() -> dict[str, type[Detector]]:
    from pyanomaly.models import CPCAD, AnoMem

    return {CPCAD.method: CPCAD, AnoMem.method: AnoMem}
