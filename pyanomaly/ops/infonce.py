"""Batched InfoNCE with sampled negatives (CPC-AD's loss and anomaly score).

loss_i = logsumexp(s_i0, s_i1, ..., s_iK) - s_i0, with s_i0 = <q_i, p_i> / T and
s_ij = <q_i, bank[neg_idx[i, j-1]]> / T.
"""

from __future__ import annotations

import torch

__all__ = ["infonce", "infonce_ref", "sample_negatives"]


def infonce_ref(
    queries: torch.Tensor,
    positives: torch.Tensor,
    bank: torch.Tensor,
    neg_idx: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Pure-PyTorch reference: gather (N, K, D) negatives, einsum, logsumexp. Returns (N,)."""
    positive_logit = (queries * positives).sum(-1, keepdim=True)  # N 1
    negative_logits = torch.einsum("nd,nkd->nk", queries, bank[neg_idx])  # N K
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def infonce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    bank: torch.Tensor,
    neg_idx: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """InfoNCE loss per query. queries, positives (N, D); bank (M, D); neg_idx (N, K) int64 -> (N,)."""
    return infonce_ref(queries, positives, bank, neg_idx, temperature=temperature)


def sample_negatives(
    num_queries: int,
    k: int,
    bank_size: int,
    *,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw (num_queries, k) int64 bank rows uniformly with replacement (Greedy InfoMax).

    ``exclude`` (num_queries,) int64: a row each query must never draw (e.g. its positive).
    """
    if exclude is None:
        return torch.randint(bank_size, (num_queries, k), generator=generator, device=device)
    draw = torch.randint(bank_size - 1, (num_queries, k), generator=generator, device=device)
    return draw + (draw >= exclude.view(-1, 1)).long()
