"""AnoMem's memory layer: learned stored patterns retrieved by a converging modern-Hopfield update."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

import pyanomaly.ops
from pyanomaly.ops.hopfield import DEFAULT_MAX_ITER

__all__ = ["HopfieldMemory", "HopfieldRecall"]


class HopfieldRecall(NamedTuple):
    """What :class:`HopfieldMemory` returns.

    Attributes:
        features: the state patterns sent to the memory (LayerNorm-ed with ``normalize=True``):
            the (N, D) input, the (B, C, H, W) input map, or with ``sample_ratio`` the sampled
            vectors, (K, D) or (B, K, C).
        retrieved: their recollections, same shape as ``features``.
        iterations: int32 updates per vector: (N,), (B, H, W), (K,) or (B, K).
        index: the sampled positions, or None when every vector was used: (K,) rows of an (N, D)
            input, or (B, K) flat spatial positions (h * W + w) of a map, distinct within each image.
    """

    features: torch.Tensor
    retrieved: torch.Tensor
    iterations: torch.Tensor
    index: torch.Tensor | None


class HopfieldMemory(nn.Module):
    """A memory of ``num_patterns`` learned patterns, queried by iterating xi <- softmax(beta xi X^T) X.

    The patterns are a parameter initialised N(0, 0.02), like hopfield-layers' ``HopfieldLayer``
    (the input supplies the queries; no projections). ``normalize=True`` LayerNorms the queries and
    the stored patterns before retrieval, hopfield-layers' ``normalize_state_pattern`` and
    ``normalize_stored_pattern`` (on by default there, off here; AnoMem turns them on). Applied to
    (N, D) vectors or to every spatial vector of a (B, C, H, W) map; ``sample_ratio`` retrieves a
    random fraction of the positions only (AnoMem's per-scale sampling ratio), drawn without
    replacement per image. Retrieval calls :func:`pyanomaly.ops.hopfield_retrieve`, looked up at
    call time.

    For AnoMem's memory loss use the sampled form: ``recall.features`` and ``recall.retrieved`` are
    (B, K, C) pairs to compare, and :meth:`gather_positions` picks the same positions from the other
    branch's map. For the deviation map (stage 2) call it without ``sample_ratio``:
    ``recall.features - recall.retrieved`` is then (B, C, H, W).

    Args:
        num_patterns: M, the number of stored patterns.
        dim: D, the pattern dimension (the channels C of a map).
        beta: inverse temperature; default 1 / sqrt(dim), hopfield-layers' default scaling.
        max_iter: most updates per vector; default 1 (hopfield-layers' single step).
        tol: a vector stops once an update moved it by at most tol (hopfield-layers'
            ``update_steps_eps`` default 1e-4); 0 always runs ``max_iter`` updates.
        grad: "unrolled" (exact gradient through every update) or "last" (final update only; the
            queries then get a gradient only when max_iter == 1). See
            :func:`pyanomaly.ops.hopfield_retrieve`.
        normalize: LayerNorm (learned affine) on the queries and on the stored patterns.
    """

    def __init__(
        self,
        num_patterns: int,
        dim: int,
        *,
        beta: float | None = None,
        max_iter: int = DEFAULT_MAX_ITER,
        tol: float = 1e-4,
        grad: str = "unrolled",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if num_patterns < 1:
            raise ValueError(f"num_patterns must be >= 1, got {num_patterns}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.num_patterns, self.dim = num_patterns, dim
        self.beta = float(beta) if beta is not None else 1.0 / math.sqrt(dim)
        self.max_iter, self.tol, self.grad = max_iter, tol, grad
        self.patterns = nn.Parameter(torch.empty(num_patterns, dim))
        self.normalize = bool(normalize)
        self.state_norm = nn.LayerNorm(dim) if self.normalize else None
        self.pattern_norm = nn.LayerNorm(dim) if self.normalize else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.patterns, mean=0.0, std=0.02)
        for norm in (self.state_norm, self.pattern_norm):
            if norm is not None:
                norm.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"num_patterns={self.num_patterns}, dim={self.dim}, beta={self.beta:.4g}, "
            f"max_iter={self.max_iter}, tol={self.tol}, grad={self.grad!r}, normalize={self.normalize}"
        )

    def states(self, vectors: torch.Tensor) -> torch.Tensor:
        """(N, D) input vectors -> the state patterns the memory compares (LayerNorm-ed or as is)."""
        return self.state_norm(vectors) if self.state_norm is not None else vectors

    def stored_patterns(self) -> torch.Tensor:
        """The (M, D) patterns retrieval uses (LayerNorm-ed or as is)."""
        return self.pattern_norm(self.patterns) if self.pattern_norm is not None else self.patterns

    def retrieve(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Recollections (N, D) and iterations (N,) int32 of (N, D) state patterns (see :meth:`states`)."""
        patterns = self.stored_patterns().to(states.dtype)
        return pyanomaly.ops.hopfield_retrieve(
            states, patterns, beta=self.beta, max_iter=self.max_iter, tol=self.tol, grad=self.grad
        )

    @staticmethod
    def gather_positions(feature_map: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Vectors of a (B, C, H, W) map at flat positions ``index`` (B, K) -> (B, K, C)."""
        batch, channels = feature_map.shape[:2]
        flat = feature_map.reshape(batch, channels, -1)
        positions = index[:, None, :].expand(batch, channels, index.shape[1])
        return torch.gather(flat, 2, positions).transpose(1, 2)

    def forward(
        self,
        features: torch.Tensor,
        *,
        sample_ratio: float | None = None,
        generator: torch.Generator | None = None,
    ) -> HopfieldRecall:
        """Recall (N, D) vectors or a (B, C, H, W) map, optionally at a random fraction of positions.

        Args:
            features: (N, D) vectors or a (B, C, H, W) feature map with C == dim.
            sample_ratio: in (0, 1]: retrieve only round(ratio * count) positions (at least one) per
                image (or of the N rows), drawn without replacement; None retrieves all of them.
            generator: random generator for the sampling (on the device of ``features``).
        """
        if features.dim() not in (2, 4) or features.shape[1] != self.dim:
            raise ValueError(
                f"features must be (N, {self.dim}) vectors or a (B, {self.dim}, H, W) map, "
                f"got shape {tuple(features.shape)}"
            )
        if sample_ratio is not None and not 0.0 < sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in (0, 1], got {sample_ratio!r}")

        if features.dim() == 2:
            index = None
            if sample_ratio is not None:
                count = max(1, round(sample_ratio * features.shape[0]))
                order = torch.rand(features.shape[0], generator=generator, device=features.device).argsort()
                index = order[:count]
                features = features[index]
            states = self.states(features)
            retrieved, iterations = self.retrieve(states)
            return HopfieldRecall(states, retrieved, iterations, index)

        batch, channels, height, width = features.shape
        if sample_ratio is None:
            vectors = features.permute(0, 2, 3, 1).reshape(-1, channels)
            states = self.states(vectors)
            retrieved, iterations = self.retrieve(states)

            def to_map(rows: torch.Tensor) -> torch.Tensor:
                return rows.reshape(batch, height, width, channels).permute(0, 3, 1, 2)

            state_map = to_map(states) if self.normalize else features
            iterations = iterations.reshape(batch, height, width)
            return HopfieldRecall(state_map, to_map(retrieved), iterations, None)
        positions = height * width
        count = max(1, round(sample_ratio * positions))
        noise = torch.rand(batch, positions, generator=generator, device=features.device)
        index = noise.argsort(dim=1)[:, :count]
        states = self.states(self.gather_positions(features, index))  # B K C
        retrieved, iterations = self.retrieve(states.reshape(-1, channels))
        return HopfieldRecall(
            states, retrieved.reshape(batch, count, channels), iterations.reshape(batch, count), index
        )
