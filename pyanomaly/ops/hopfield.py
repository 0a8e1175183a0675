"""Converging modern-Hopfield retrieval (AnoMem's memory layers).

Each query iterates xi <- softmax(beta * xi X^T) X over the stored patterns X until it stops moving.
"""

from __future__ import annotations

import torch

__all__ = ["hopfield_retrieve", "hopfield_retrieve_ref"]


def hopfield_retrieve_ref(
    queries: torch.Tensor,
    memory: torch.Tensor,
    *,
    beta: float,
    max_iter: int = 1,
    tol: float = 1e-4,
    grad: str = "unrolled",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop with per-query freezing. queries (N, D), memory (M, D) -> ((N, D), (N,) int32)."""
    compute = torch.float64 if queries.dtype == torch.float64 else torch.float32
    state, patterns = queries.to(compute), memory.to(compute)
    iterations = torch.zeros(queries.shape[0], dtype=torch.int32, device=queries.device)
    active = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    previous = state
    for _ in range(max_iter):
        previous = torch.where(active[:, None], state, previous)
        new_state = torch.softmax(beta * state @ patterns.T, dim=-1) @ patterns
        moved = (new_state - state).norm(dim=-1)
        state = torch.where(active[:, None], new_state, state)
        iterations = iterations + active.int()
        active = active & (moved > tol)
    if grad == "last":
        start = previous if max_iter == 1 else previous.detach()
        state = torch.softmax(beta * start @ patterns.T, dim=-1) @ patterns
    return state.to(queries.dtype), iterations


def hopfield_retrieve(
    queries: torch.Tensor,
    memory: torch.Tensor,
    *,
    beta: float,
    max_iter: int = 1,
    tol: float = 1e-4,
    grad: str = "unrolled",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieve from ``memory`` (M, D) for ``queries`` (N, D); returns (retrieved (N, D), iterations (N,) int32)."""
    return hopfield_retrieve_ref(queries, memory, beta=beta, max_iter=max_iter, tol=tol, grad=grad)
