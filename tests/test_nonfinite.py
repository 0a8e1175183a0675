"""The ops refuse non-finite inputs (naming the argument) and report overflow instead of NaN."""

from __future__ import annotations

import pytest
import torch

from pyanomaly.ops import extract_patches, hopfield_retrieve, hopfield_retrieve_ref, infonce
from pyanomaly.ops.infonce import sample_negatives


def _infonce_args(scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    q, p, b = (torch.randn(12, 8, generator=g) * scale for _ in range(3))
    return q, p, b, sample_negatives(12, 4, 12, generator=g)


@pytest.mark.parametrize("which", ["queries", "positives", "bank"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_infonce_names_the_non_finite_argument(which, bad):
    q, p, b, idx = _infonce_args()
    idx[0, 0] = 3  # bank row 3 is read
    args = {"queries": q, "positives": p, "bank": b}
    args[which][3, 1] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or infinite values"):
        infonce(args["queries"], args["positives"], args["bank"], idx)


def test_infonce_minus_infinity_hidden_by_the_logsumexp_still_raises():
    """A -inf negative logit adds exp(-inf) = 0: the loss alone would look finite (and the gradient be NaN)."""
    q, p, b, idx = _infonce_args()
    q[0] = 1.0
    b[idx[0, 0]] = float("-inf")
    with pytest.raises(ValueError, match="bank contains NaN or infinite values"):
        infonce(q, p, b, idx)


@pytest.mark.kernels  # the reference fallback scans every input first
def test_infonce_ignores_bank_rows_it_never_reads():
    """The check covers what the loss reads: a NaN in a bank row no query draws changes nothing."""
    q, p, b, idx = _infonce_args()
    idx[idx == 5] = 6
    clean = infonce(q, p, b, idx)
    b[5] = float("nan")
    torch.testing.assert_close(infonce(q, p, b, idx), clean)


def test_infonce_overflow_is_an_error_not_nan():
    q, p, b, idx = _infonce_args(1e30)
    with pytest.raises(FloatingPointError, match=r"infonce overflowed .*\(max \|queries\| = "):
        infonce(q, p, b, idx)
    q, p, b, idx = _infonce_args()
    q[0, 0] = float("nan")
    assert torch.isnan(infonce(q, p, b, idx, check_finite=False)[0])  # the documented opt-out


def test_extract_patches_refuses_nan_images():
    images = torch.rand(2, 1, 16, 16)
    images[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="images contains NaN or infinite values"):
        extract_patches(images, 8, 4)
    extract_patches(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8), 8, 4)  # uint8: nothing to check


@pytest.mark.parametrize("which", ["queries", "memory"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tol", [0.0, 1e-3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_hopfield_names_the_non_finite_argument(which, bad, tol, dtype):
    """Also a single bad entry whose sign meets memory columns of one sign only (a -inf logit for
    every pattern), and zero memory columns (0 * inf): the CPU kernel finds bad queries in its result."""
    gen = torch.Generator().manual_seed(0)
    args = {"queries": torch.randn(6, 8, generator=gen), "memory": torch.randn(5, 8, generator=gen)}
    args["memory"][:, 1] = args["memory"][:, 1].abs()  # column 1 positive: q[., 1] = -inf gives all -inf logits
    args["memory"][:, 2] = 0.0  # column 2 zero: q[., 2] = inf gives 0 * inf
    for row, col in ((0, 0), (3, 1), (4, 2)):
        args[which][row, col] = bad
    with pytest.raises(ValueError, match=f"{which} contains NaN or infinite values"):
        hopfield_retrieve(args["queries"].to(dtype), args["memory"].to(dtype), beta=1.0, tol=tol)


@pytest.mark.parametrize("col", [0, 1, 2])
def test_hopfield_one_bad_query_entry_is_named(col):
    """One non-finite entry alone, in each kind of memory column (mixed signs, positive, zero)."""
    gen = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    memory[:, 1], memory[:, 2] = memory[:, 1].abs(), 0.0
    for bad in (float("nan"), float("inf"), float("-inf")):
        q = queries.clone()
        q[4, col] = bad
        with pytest.raises(ValueError, match="queries contains NaN or infinite values"):
            hopfield_retrieve(q, memory, beta=0.5, max_iter=3, tol=1e-4)


def test_hopfield_bad_memory_is_named_with_no_queries():
    memory = torch.randn(5, 8)
    memory[2, 3] = float("nan")
    with pytest.raises(ValueError, match="memory contains NaN or infinite values"):
        hopfield_retrieve(torch.randn(0, 8), memory, beta=1.0)


def test_hopfield_overflow_is_an_error_not_nan():
    with pytest.raises(FloatingPointError, match="hopfield_retrieve overflowed"):
        hopfield_retrieve(torch.randn(6, 8) * 1e30, torch.randn(5, 8) * 1e30, beta=1.0)


def test_hopfield_rows_near_overflow_take_exact_arithmetic():
    """The CPU forward's flash kernel turns overflowing logits into a finite zero row; rows whose
    logits could overflow are redone with the plain arithmetic: a huge but representable row matches
    the reference, one whose logits overflow raises instead of coming back as zeros."""
    gen = torch.Generator().manual_seed(0)
    queries, memory = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    queries[2] *= 1e35  # logits ~1e35: finite, far beyond the kernel's safe bound
    retrieved, _ = hopfield_retrieve(queries, memory, beta=1.0, max_iter=3, tol=0.0)
    expected, _ = hopfield_retrieve_ref(queries, memory, beta=1.0, max_iter=3, tol=0.0)
    torch.testing.assert_close(retrieved, expected)
    queries[2] *= 1e3  # now the row's logits overflow float32; later steps must not wash the NaN out
    for max_iter, tol in ((1, 1e-4), (3, 0.0), (3, 1e-4)):
        with pytest.raises(FloatingPointError, match="hopfield_retrieve overflowed"):
            hopfield_retrieve(queries, memory, beta=1.0, max_iter=max_iter, tol=tol)
