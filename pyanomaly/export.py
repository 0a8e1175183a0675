"""Deployment: a fitted detector as one graph (ONNX or ``torch.export``), and one inference API.

The exported graph takes a uint8 batch (N, C, S, S) at the model's input size (C: 1 for CPC-AD, the
fitted channels for AnoMem) and returns the image scores (N,) and the anomaly maps (N, S, S), the
same as ``detector.score()`` on those images. It does the preprocessing itself (scaling, gray
conversion, normalisation). The batch axis is dynamic.

- ONNX (opset 18, the legacy TorchScript exporter, standard operators only): the ops' pure-PyTorch
  references stand in for the fused kernels; CPC-AD's test-time negatives are the detector's own
  seeded set for its grid (``CPCAD._scoring_negatives``), baked in, so the graph is deterministic
  and equals the detector's scoring; AnoMem's Hopfield retrieval runs its iterations with per-query
  freezing as ``Where`` ops.
- ``torch``: ``torch.export`` keeping the fused custom ops (their fake kernels make this possible),
  saved with ``torch.export.save``; load it with :class:`Inferencer` (which imports pyanomaly, so the
  ops are registered) or ``torch.export.load`` after ``import pyanomaly``.

Both files carry the detector's thresholds and statistics as metadata, so :class:`Inferencer`
labels and normalises like the detector.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FORMATS", "OPSET", "Inferencer", "export"]

FORMATS = ("onnx", "torch")
OPSET = 18
_SUFFIX = {"onnx": ".onnx", "torch": ".pt2"}


class _CPCADGraph(nn.Module):
    """uint8 (N, 1, S, S) -> scores (N,), maps (N, S, S): ``CPCAD.score`` for square input at S."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.detector = detector
        self.model = detector.model_  # registered, so its weights are the graph's parameters
        self.negatives = detector._scoring_negatives() if "infonce" in detector._components() else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from pyanomaly.ops import fold_patches

        d = self.detector
        grid = d._normalized(d._grid_components(images, self.negatives))
        scores = grid.reshape(grid.shape[0], -1).topk(d._top_k(), dim=1).values.mean(1)
        maps = fold_patches(grid, d.sub_size, d.sub_stride, (d.image_size, d.image_size))
        return scores, maps


class _AnoMemGraph(nn.Module):
    """uint8 (N, C, H, W) at the fit size -> scores (N,), maps (N, H, W): ``AnoMem.score``."""

    def __init__(self, detector) -> None:
        super().__init__()
        self.detector = detector
        self.model = detector.model_
        self.register_buffer("weights", torch.tensor(detector.weights_, dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.detector
        x = images.float() / 255.0
        deviations = self.model.deviations(x)
        scores = (d._scores_of(deviations) * self.weights).sum(dim=1)
        return scores, d._maps_of(deviations, x.shape[-2:])


def _graph(detector) -> tuple[nn.Module, tuple[int, int, int]]:
    """The export module and its input's (C, H, W)."""
    detector._check_fitted()
    if detector.method == "cpcad":
        return _CPCADGraph(detector).eval(), (1, detector.image_size, detector.image_size)
    if detector.method == "anomem":
        return _AnoMemGraph(detector).eval(), (detector.in_channels_, *detector.fit_size_)
    raise ValueError(f"no exporter for method {detector.method!r}")


def _metadata(detector, shape: tuple[int, int, int]) -> dict[str, Any]:
    import pyanomaly

    train = np.asarray(detector.decision_scores_, dtype=np.float64)
    return {
        "method": detector.method, "input_shape": list(shape), "threshold": detector.threshold_,
        "pixel_threshold": detector.pixel_threshold_, "map_low": detector.map_low_,
        "train_score_min": float(train.min()), "train_score_max": float(train.max()),
        "train_score_mean": float(train.mean()), "train_score_std": float(train.std()),
        "pyanomaly_version": pyanomaly.__version__, "torch_version": str(torch.__version__),
    }


def export(detector, path: str | os.PathLike, format: str = "onnx") -> Path:
    """Write ``detector`` (fitted, on any device) as an ONNX model or a ``torch.export`` program.

    Args:
        detector: a fitted CPCAD or AnoMem (one-class or semi-supervised).
        path: the file to write (``.onnx`` / ``.pt2`` added when it has no suffix).
        format: "onnx" (onnx and onnxruntime: ``pip install "pyanomaly[export]"``) or "torch".

    Returns:
        the path written.
    """
    from pyanomaly import _ext

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if getattr(detector, "threshold_", None) is None:
        raise RuntimeError(f"this {type(detector).__name__} is not fitted yet: fit (or load) it before exporting")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(_SUFFIX[format])
    if path.is_dir():
        raise IsADirectoryError(f"export path {str(path)!r} is a folder; give a file name such as model{_SUFFIX[format]}")
    if not path.parent.exists():
        raise FileNotFoundError(f"cannot export to {str(path)!r}: folder {str(path.parent)!r} does not exist")
    device = detector.device
    detector.model_.to("cpu")
    detector.device = torch.device("cpu")
    banks = getattr(detector, "banks_", None)
    if banks is not None:
        detector.banks_ = [b.cpu() for b in banks]
    try:
        graph, shape = _graph(detector)
        example = torch.zeros(2, *shape, dtype=torch.uint8)
        meta = _metadata(detector, shape)
        if format == "onnx":
            _require_onnx()
            with _ext.reference_mode(), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    graph, (example,), str(path), dynamo=False, opset_version=OPSET,
                    input_names=["images"], output_names=["scores", "maps"],
                    dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
                )
            import onnx

            model = onnx.load(str(path))
            for key, value in meta.items():
                entry = model.metadata_props.add()
                entry.key, entry.value = f"pyanomaly.{key}", json.dumps(value)
            onnx.save(model, str(path))
        else:
            batch = torch.export.Dim("batch", min=1)
            with torch.no_grad():
                program = torch.export.export(graph, (example,), dynamic_shapes={"images": {0: batch}}, strict=False)
            torch.export.save(program, str(path), extra_files={"pyanomaly.json": json.dumps(meta)})
    finally:
        detector.device = device
        detector.model_.to(device)
        if banks is not None:
            detector.banks_ = banks
    return path


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ImportError(
            'ONNX export and inference need onnx and onnxruntime: pip install "pyanomaly[export]"'
        ) from None


class Inferencer:
    """Score images with a saved detector (model.pt), an ONNX file or a torch.export file (.pt2).

    ``score``, ``decision_function``, ``predict``, ``predict_proba``, ``anomaly_map`` and
    ``normalize_map`` behave as the detector's. Inputs are anything
    :func:`pyanomaly.data.as_images` takes; exported graphs get them resized to their input size.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "auto") -> None:
        from pyanomaly.models.base import Detector, resolve_device

        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "model.pt"
        if not self.path.is_file():
            raise FileNotFoundError(f"no model file at {str(path)!r}")
        self.device = resolve_device(device)
        self.kind = {".onnx": "onnx", ".pt2": "torch"}.get(self.path.suffix.lower(), "detector")
        self.detector = None
        if self.kind == "detector":
            self.detector = Detector.load(self.path, device=self.device)
            return
        if self.kind == "onnx":
            _require_onnx()
            import onnx
            import onnxruntime

            model = onnx.load(str(self.path))
            meta = {p.key[len("pyanomaly."):]: json.loads(p.value) for p in model.metadata_props
                    if p.key.startswith("pyanomaly.")}
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.type == "cuda" else [
                "CPUExecutionProvider"]
            self._session = onnxruntime.InferenceSession(str(self.path), providers=providers)
        else:
            extra = {"pyanomaly.json": ""}
            import pyanomaly  # noqa: F401  (registers the custom ops the program calls)

            self._program = torch.export.load(str(self.path), extra_files=extra).module()
            meta = json.loads(extra["pyanomaly.json"])
        if not meta:
            raise ValueError(f"{str(self.path)!r} was not exported by pyanomaly (no pyanomaly metadata)")
        self.meta = meta
        self.method = meta["method"]
        self.threshold_ = meta["threshold"]
        self.pixel_threshold_ = meta["pixel_threshold"]
        self.map_low_ = meta["map_low"]

    def __getattr__(self, name: str):  # model.pt: the detector's own attributes (threshold_, ...)
        detector = self.__dict__.get("detector")
        if detector is not None:
            return getattr(detector, name)
        raise AttributeError(name)

    def score(self, images) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image scores (N,) float64 and one (H_i, W_i) float32 map per image."""
        if self.detector is not None:
            return self.detector.score(images)
        import torch.nn.functional as F

        from pyanomaly.data import as_images, stack_resized

        channels, height, width = self.meta["input_shape"]
        image_list = as_images(images, "images", mode="gray" if channels == 1 else "rgb")
        sizes = [tuple(x.shape[1:]) for x in image_list]
        batch = stack_resized(image_list, (height, width))
        if self.kind == "onnx":
            scores, maps = self._session.run(None, {"images": batch.numpy()})
            scores, maps = torch.from_numpy(scores), torch.from_numpy(maps)
        else:
            with torch.no_grad():
                scores, maps = self._program(batch)
        out = []
        for amap, size in zip(maps.float(), sizes):
            if tuple(amap.shape) != size:
                amap = F.interpolate(amap[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            out.append(amap.numpy().astype(np.float32))
        return scores.double().numpy(), out

    def decision_function(self, images) -> np.ndarray:
        return self.score(images)[0]

    def predict(self, images) -> np.ndarray:
        return (self.decision_function(images) > self.threshold_).astype(np.int64)

    def _proba(self, scores: np.ndarray, method: str) -> np.ndarray:
        if self.detector is not None:
            return self.detector._proba(scores, method)
        if method == "linear":
            low, high = self.meta["train_score_min"], self.meta["train_score_max"]
            p = (scores - low) / max(high - low, 1e-12)
        else:
            from scipy.special import erf

            p = erf((scores - self.meta["train_score_mean"]) / (max(self.meta["train_score_std"], 1e-12) * np.sqrt(2)))
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1)

    def predict_proba(self, images, method: str = "linear") -> np.ndarray:
        if method not in ("linear", "unify"):
            raise ValueError(f"method must be one of ('linear', 'unify'), got {method!r}")
        return self._proba(self.decision_function(images), method)

    def normalize_map(self, amap: np.ndarray) -> np.ndarray:
        if self.detector is not None:
            return self.detector.normalize_map(amap)
        span = max(self.pixel_threshold_ - self.map_low_, 1e-12)
        return ((np.asarray(amap, dtype=np.float32) - self.map_low_) / span).astype(np.float32)

    def anomaly_map(self, images, *, normalize: bool = False):
        maps = self.score(images)[1]
        maps = [self.normalize_map(m) for m in maps] if normalize else maps
        return np.stack(maps) if len({m.shape for m in maps}) == 1 else maps
