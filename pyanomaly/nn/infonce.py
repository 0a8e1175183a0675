"""InfoNCE with sampled negatives as a layer: the ``nn.Module`` over :func:`pyanomaly.ops.infonce`."""

from __future__ import annotations

import math

import torch
from torch import nn

from pyanomaly.ops.infonce import infonce, sample_negatives

__all__ = ["InfoNCE"]


class InfoNCE(nn.Module):
    """Per-query InfoNCE loss (CPC-AD's training loss and anomaly score) with uniform negatives.

    Args:
        num_negatives: K, negatives drawn per query when ``forward`` gets no ``neg_idx``.
        temperature: T > 0, the logits are dot products divided by T.
        exclude_positive: never draw bank row i for query i; for when the bank is the positives
            (then the bank must have N rows).
        deterministic: see :func:`pyanomaly.ops.infonce`.

    Example:
        >>> loss_fn = InfoNCE(num_negatives=16)
        >>> loss = loss_fn(predictions, targets, targets).mean()  # the targets are also the bank
    """

    def __init__(
        self,
        num_negatives: int = 16,
        temperature: float = 1.0,
        *,
        exclude_positive: bool = False,
        deterministic: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise ValueError(f"num_negatives must be an int >= 1, got {num_negatives!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.exclude_positive = bool(exclude_positive)
        self.deterministic = bool(deterministic)

    def forward(
        self,
        queries: torch.Tensor,
        positives: torch.Tensor,
        bank: torch.Tensor,
        neg_idx: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Loss per query.

        Args:
            queries: (N, D) predictions.
            positives: (N, D) targets, row-aligned with the queries.
            bank: (M, D) rows the negatives come from (often ``positives`` itself).
            neg_idx: (N, K) int64 rows of ``bank``; drawn with :func:`pyanomaly.ops.sample_negatives`
                (``num_negatives`` per query, on the queries' device) when None.
            generator: random generator for that draw.

        Returns:
            (N,) loss in the queries' dtype.
        """
        if neg_idx is None:
            if not isinstance(queries, torch.Tensor) or not isinstance(bank, torch.Tensor):
                raise TypeError("queries and bank must be torch.Tensors")
            if queries.dim() != 2 or bank.dim() != 2:
                raise ValueError(
                    f"queries and bank must have shapes (N, D) and (M, D), got {tuple(queries.shape)} "
                    f"and {tuple(bank.shape)}"
                )
            num_queries, bank_size = queries.shape[0], bank.shape[0]
            exclude = None
            if self.exclude_positive:
                if bank_size != num_queries:
                    raise ValueError(
                        "exclude_positive=True needs one bank row per query (the positives), got "
                        f"{num_queries} queries and {bank_size} bank rows"
                    )
                exclude = torch.arange(num_queries, device=queries.device)
            neg_idx = sample_negatives(
                num_queries,
                self.num_negatives,
                bank_size,
                generator=generator,
                exclude=exclude,
                device=queries.device,
            )
        return infonce(
            queries, positives, bank, neg_idx, temperature=self.temperature, deterministic=self.deterministic
        )

    def extra_repr(self) -> str:
        return (
            f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
            f"exclude_positive={self.exclude_positive}, deterministic={self.deterministic}"
        )
