"""Batched InfoNCE with sampled negatives (CPC-AD's loss and anomaly score).

loss_i = logsumexp(s_i0, s_i1, ..., s_iK) - s_i0, with s_i0 = <q_i, p_i> / T and
s_ij = <q_i, bank[neg_idx[i, j-1]]> / T.

The fused op (``torch.ops.pyanomaly.infonce``) computes each query's K + 1 dot products and a streamed
logsumexp without ever gathering the (N, K, D) negatives, and saves only the logsumexp per query for
its backward (``torch.ops.pyanomaly.infonce_backward``), which recomputes the logits. The bank's
gradient is a scatter-add over ``neg_idx`` done as a segment reduction over the stably sorted indices,
so it is deterministic; ``deterministic=False`` allows float atomics on CUDA instead. The backward
keeps an (N, K + 1) table of softmax coefficients in float32 (float64 for float64 inputs), K + 1
numbers per query rather than K * D.

When the same tensor is passed as ``positives`` and ``bank`` (as CPC-AD does), the positive term's
gradient is added to the bank's gradient inside the kernel, so no separate (N, D) gradient for the
positives is built and summed. This is decided by identity (``positives is bank``).

Unlike Greedy InfoMax's loss (softmax over the K + 1 logits, then ``-log(p_0 + 1e-11)``), this op has
no epsilon: ``loss = -log p_0`` exactly, so a very unlikely positive is not capped at
``-log(1e-11) = 25.3`` and its gradient does not vanish there. The two are related by
``gim = -log(exp(-loss) + 1e-11)`` (tested to ~1e-14 in float64), so Greedy InfoMax's scores can be
recovered from ours; below ~20 nats they are the same.
"""

from __future__ import annotations

import math

import torch

from pyanomaly import _ext
from pyanomaly.ops._utils import check_no_overflow, require_finite, tracing

__all__ = ["infonce", "infonce_ref", "sample_negatives"]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _check_infonce_args(
    queries: torch.Tensor,
    positives: torch.Tensor,
    bank: torch.Tensor,
    neg_idx: torch.Tensor,
    temperature: float,
) -> None:
    """Shapes, dtypes, devices and temperature (no data is read: safe under torch.compile)."""
    for name, value in (("queries", queries), ("positives", positives), ("bank", bank), ("neg_idx", neg_idx)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if queries.dim() != 2:
        raise ValueError(f"queries must have shape (N, D), got shape {tuple(queries.shape)}")
    n, d = queries.shape
    if positives.shape != queries.shape:
        raise ValueError(
            f"positives must have the queries' shape (N, D) = ({n}, {d}), got shape {tuple(positives.shape)}"
        )
    if bank.dim() != 2 or bank.shape[1] != d:
        raise ValueError(
            f"bank must have shape (M, D) with D = {d} like queries, got shape {tuple(bank.shape)}"
        )
    if neg_idx.dim() != 2 or neg_idx.shape[0] != n:
        raise ValueError(f"neg_idx must have shape (N, K) with N = {n}, got shape {tuple(neg_idx.shape)}")
    if neg_idx.shape[1] < 1:
        raise ValueError(
            f"neg_idx must have at least one column (K >= 1 negatives), got shape {tuple(neg_idx.shape)}"
        )
    if queries.dtype not in _FLOATING:
        raise TypeError(f"queries must be float16, bfloat16, float32 or float64, got {queries.dtype}")
    for name, value in (("positives", positives), ("bank", bank)):
        if value.dtype != queries.dtype:
            raise TypeError(f"{name} must have the queries' dtype {queries.dtype}, got {value.dtype}")
    if neg_idx.dtype != torch.int64:
        raise TypeError(f"neg_idx must be int64, got {neg_idx.dtype}")
    for name, value in (("positives", positives), ("bank", bank), ("neg_idx", neg_idx)):
        if value.device != queries.device:
            raise ValueError(f"{name} must be on the queries' device {queries.device}, got {value.device}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _check_index_range(name: str, index: torch.Tensor, size: int, what: str) -> None:
    """Raise IndexError unless every value of ``index`` lies in [0, size) (reads the data)."""
    if index.numel() == 0:
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= size:
        raise IndexError(f"{name} must hold {what} in [0, {size}), got values in [{lo}, {hi}]")


def infonce(
    queries: torch.Tensor,
    positives: torch.Tensor,
    bank: torch.Tensor,
    neg_idx: torch.Tensor,
    *,
    temperature: float = 1.0,
    deterministic: bool = True,
    check_finite: bool = True,
) -> torch.Tensor:
    """InfoNCE loss per query, fused: the (N, K, D) negatives are never gathered.

    Args:
        queries: (N, D) predictions.
        positives: (N, D) true targets, row-aligned with the queries.
        bank: (M, D) rows the negatives come from (may be the same tensor as ``positives``).
        neg_idx: (N, K) int64 rows of ``bank``, K >= 1, duplicates allowed (see :func:`sample_negatives`).
        temperature: T > 0, the logits are dot products divided by T.
        deterministic: reduce the bank's gradient in a fixed order (default). False allows float
            atomics on CUDA (faster, run-to-run differences in the last bits); the CPU is always
            deterministic.
        check_finite: raise a ValueError naming the argument when a value the loss reads (queries,
            positives, or a bank row that ``neg_idx`` names) is NaN/inf, and a FloatingPointError
            when finite inputs overflow. With the CPU kernel this costs a look at the (N,) result
            only (a non-finite logit makes its row's loss NaN; the inputs are scanned only then);
            CUDA and the reference fallback scan the inputs first (one sum each). Skipped while
            torch.compile traces.

    Returns:
        (N,) loss_i = logsumexp_j(s_ij) - s_i0 in the inputs' dtype (computed in float32 for half
        inputs), differentiable with respect to queries, positives and bank.

    Raises:
        TypeError, ValueError: wrong types, dtypes, shapes or devices (the message names the argument).
        IndexError: a value of ``neg_idx`` outside [0, M).
    """
    _check_infonce_args(queries, positives, bank, neg_idx, temperature)
    inputs = {"queries": queries, "positives": positives, "bank": bank}
    cpu_kernel = _ext.has_kernels(queries.device) and queries.device.type == "cpu"
    if check_finite and not cpu_kernel:  # only the CPU kernel NaN-marks rows with a bad logit
        require_finite(**inputs)
    if not _ext.has_kernels(queries.device):
        if not tracing():
            _check_index_range("neg_idx", neg_idx, bank.shape[0], "rows of bank")
        loss = infonce_ref(queries, positives, bank, neg_idx, temperature=temperature)
    else:
        loss, _ = torch.ops.pyanomaly.infonce(
            queries, positives, bank, neg_idx, float(temperature), bool(deterministic)
        )
    if check_finite:  # a non-finite loss: names a non-finite input, else reports the overflow
        check_no_overflow("infonce", loss, **inputs)
    return loss


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

    Args:
        num_queries: N >= 0.
        k: negatives per query, >= 1.
        bank_size: M, rows to draw from: >= 1, and >= 2 with ``exclude``.
        generator: the random generator (on ``device``).
        exclude: (num_queries,) int64 in [0, bank_size): a row each query never draws (e.g. its
            positive's own row when the bank is the positives); the others stay equally likely.
        device: where the indices are made (default: ``exclude``'s device, else the CPU).

    Returns:
        (num_queries, k) int64.
    """
    for name, value, minimum in (("num_queries", num_queries, 0), ("k", k, 1), ("bank_size", bank_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if exclude is None:
        return torch.randint(bank_size, (num_queries, k), generator=generator, device=device)
    if not isinstance(exclude, torch.Tensor):
        raise TypeError(f"exclude must be a torch.Tensor, got {type(exclude).__name__}")
    if exclude.dtype != torch.int64:
        raise TypeError(f"exclude must be int64, got {exclude.dtype}")
    if exclude.shape != (num_queries,):
        raise ValueError(
            f"exclude must have shape (num_queries,) = ({num_queries},), got shape {tuple(exclude.shape)}"
        )
    if bank_size < 2:
        raise ValueError(
            f"bank_size must be >= 2 when exclude is given (one row is never drawn), got {bank_size}"
        )
    if device is None:
        device = exclude.device
    elif torch.device(device) != exclude.device:
        raise ValueError(f"exclude must be on device {torch.device(device)}, got {exclude.device}")
    if not tracing():
        _check_index_range("exclude", exclude, bank_size, "bank rows")
    draw = torch.randint(bank_size - 1, (num_queries, k), generator=generator, device=device)
    return draw + (draw >= exclude.view(-1, 1)).long()


if _ext.has_kernels():

    @torch.library.register_fake("pyanomaly::infonce")
    def _infonce_fake(queries, positives, bank, neg_idx, temperature=1.0, deterministic=True):
        n = queries.shape[0]
        torch._check(positives.shape == queries.shape, lambda: "positives must be (N, D)")
        torch._check(bank.dim() == 2 and bank.shape[1] == queries.shape[1], lambda: "bank must be (M, D)")
        torch._check(neg_idx.dim() == 2 and neg_idx.shape[0] == n, lambda: "neg_idx must be (N, K)")
        for name, value in (("positives", positives), ("bank", bank), ("neg_idx", neg_idx)):
            torch._check(
                value.device == queries.device, lambda name=name: f"{name} must be on the queries' device"
            )
        lse_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        return queries.new_empty((n,)), queries.new_empty((n,), dtype=lse_dtype)

    @torch.library.register_fake("pyanomaly::infonce_backward")
    def _infonce_backward_fake(
        grad_loss,
        queries,
        positives,
        bank,
        neg_idx,
        lse,
        temperature,
        fold_positives=False,
        deterministic=True,
    ):
        n, d = queries.shape
        return (
            queries.new_empty((n, d)),
            queries.new_empty((0 if fold_positives else n, d)),
            queries.new_empty(tuple(bank.shape)),
        )

    def _infonce_setup_context(ctx, inputs, output):
        queries, positives, bank, neg_idx, temperature, deterministic = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.fold_positives = positives is bank
        ctx.temperature = temperature
        ctx.deterministic = deterministic
        ctx.save_for_backward(queries, positives, bank, neg_idx, lse)

    def _infonce_backward(ctx, grad_loss, _grad_lse):
        queries, positives, bank, neg_idx, lse = ctx.saved_tensors
        grad_queries, grad_positives, grad_bank = torch.ops.pyanomaly.infonce_backward(
            grad_loss,
            queries,
            positives,
            bank,
            neg_idx,
            lse,
            ctx.temperature,
            ctx.fold_positives,
            ctx.deterministic,
        )
        # Folded: the positives' gradient is already inside grad_bank (the same tensor).
        return grad_queries, None if ctx.fold_positives else grad_positives, grad_bank, None, None, None

    torch.library.register_autograd(
        "pyanomaly::infonce", _infonce_backward, setup_context=_infonce_setup_context
    )
