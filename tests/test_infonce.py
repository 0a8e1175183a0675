"""The fused InfoNCE op against its reference: forward, all three gradients, edge cases, errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from pyanomaly.nn import InfoNCE
from pyanomaly.ops import infonce, infonce_ref, sample_negatives

infonce_module = importlib.import_module("pyanomaly.ops.infonce")  # pyanomaly.ops.infonce is the function

# Absolute / relative tolerance against a float64 reference, per dtype of the fused op's inputs.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}
SHAPES = [  # N, K, D, M
    (1, 1, 1, 1),
    (7, 3, 5, 11),
    (33, 16, 40, 20),
    (20, 5, 300, 9),  # D longer than one CUDA tile (256)
]


def make_inputs(n, k, d, m, dtype=torch.float32, *, seed=0, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    positives = torch.randn(n, d, generator=gen, dtype=torch.float64) * scale
    bank = torch.randn(m, d, generator=gen, dtype=torch.float64) * scale
    neg_idx = torch.randint(max(m, 1), (n, k), generator=gen)
    return [t.to(device=device, dtype=dtype) for t in (queries, positives, bank)] + [neg_idx.to(device)]


def loss_and_grads(fn, queries, positives, bank, neg_idx, grad_out, *, same=False, **kwargs):
    """fn's loss and gradients for (queries, positives, bank); same: positives is bank."""
    q = queries.detach().clone().requires_grad_()
    b = bank.detach().clone().requires_grad_()
    p = b if same else positives.detach().clone().requires_grad_()
    loss = fn(q, p, b, neg_idx, **kwargs)
    grads = torch.autograd.grad(loss, (q, b) if same else (q, p, b), grad_out)
    return (loss.detach(), *grads)


def reference64(queries, positives, bank, neg_idx, grad_out, *, same=False, temperature=1.0):
    up = [t.double() for t in (queries, positives, bank)]
    return loss_and_grads(infonce_ref, *up, neg_idx, grad_out.double(), same=same, temperature=temperature)


def assert_all_close(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        scale = 1 + e.abs().amax().item() if e.numel() else 1
        torch.testing.assert_close(a.double(), e, atol=atol * scale, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_forward_and_gradients_match_reference(shape, dtype, temperature):
    n, k, d, m = shape
    inputs = make_inputs(n, k, d, m, dtype, seed=n + d)
    grad_out = torch.randn(n, dtype=dtype)
    got = loss_and_grads(infonce, *inputs, grad_out, temperature=temperature)
    expected = reference64(*inputs, grad_out, temperature=temperature)
    assert_all_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_positives_passed_as_bank(dtype):
    """CPC-AD passes one tensor as both; its gradient is the sum of both roles (folded in the kernel)."""
    n, k, d = 30, 6, 12
    queries, positives, _, _ = make_inputs(n, k, d, n, dtype)
    neg_idx = sample_negatives(n, k, n, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(n, dtype=dtype)
    got = loss_and_grads(
        infonce, queries, positives, positives, neg_idx, grad_out, same=True, temperature=0.5
    )
    expected = reference64(queries, positives, positives, neg_idx, grad_out, same=True, temperature=0.5)
    assert_all_close(got, expected, dtype)


@pytest.mark.kernels
def test_backward_op_folds_positives_into_bank_gradient():
    n, k, d = 9, 4, 5
    queries, positives, _, neg_idx = make_inputs(n, k, d, n, torch.float64)
    grad_out = torch.randn(n, dtype=torch.float64)
    _, lse = torch.ops.pyanomaly.infonce(queries, positives, positives, neg_idx, 0.7, True)
    args = (grad_out, queries, positives, positives, neg_idx, lse, 0.7)
    gq, gp, gb = torch.ops.pyanomaly.infonce_backward(*args, False, True)
    fq, fp, fb = torch.ops.pyanomaly.infonce_backward(*args, True, True)
    assert fp.shape == (0, d)
    torch.testing.assert_close(fq, gq, rtol=0, atol=0)
    torch.testing.assert_close(fb, gp + gb, rtol=1e-12, atol=1e-12)


@pytest.mark.kernels
def test_forward_saves_logsumexp_not_gathered_rows():
    n, k, d, m = 12, 7, 5, 4
    queries, positives, bank, neg_idx = make_inputs(n, k, d, m)
    queries.requires_grad_()
    loss = infonce(queries, positives, bank, neg_idx)
    saved = loss.grad_fn.saved_tensors
    assert sorted(t.numel() for t in saved) == sorted([n * d, n * d, m * d, n * k, n])
    assert saved[-1].shape == (n,) and saved[-1].dtype == torch.float32


def test_gradcheck_float64():
    queries, positives, bank, neg_idx = make_inputs(6, 3, 4, 5, torch.float64)
    neg_idx[0] = 2  # a duplicated bank row within one query
    tensors = [t.requires_grad_() for t in (queries, positives, bank)]
    assert torch.autograd.gradcheck(lambda q, p, b: infonce(q, p, b, neg_idx, temperature=0.6), tensors)
    assert torch.autograd.gradcheck(
        lambda q, z: infonce(q, z, z, neg_idx % 6, temperature=0.6), (tensors[0], tensors[1])
    )


def test_gradcheck_float64_non_contiguous():
    queries, positives, bank, neg_idx = make_inputs(5, 3, 4, 7, torch.float64)
    queries_t = queries.T.contiguous().requires_grad_()  # (D, N): queries_t.T has strides (1, N)
    bank_wide = torch.randn(7, 9, dtype=torch.float64, requires_grad=True)  # [:, 2:6] has row stride 9
    neg_idx_t = neg_idx.T.contiguous()
    positives.requires_grad_()

    def fn(qt, p, bw):
        return infonce(qt.T, p, bw[:, 2:6], neg_idx_t.T, temperature=0.8)

    assert torch.autograd.gradcheck(fn, (queries_t, positives, bank_wide))


def test_non_contiguous_inputs_match_reference():
    n, k, d, m = 16, 5, 24, 10
    queries, positives, bank, neg_idx = make_inputs(n, k, d, m)
    grad_out = torch.randn(n)

    def leaves(dtype):
        return (
            queries.T.contiguous().to(dtype).requires_grad_(),  # (D, N)
            torch.cat([positives, torch.zeros(n, 3)], 1).to(dtype).requires_grad_(),  # (N, D + 3)
            bank[:1].to(dtype).requires_grad_(),  # (1, D)
        )

    def views(q_t, p_wide, b_row):
        # Column-major queries, positives with row stride D + 3, a bank expanded from one row (row
        # stride 0), transposed indices.
        return q_t.T, p_wide[:, :d], b_row.expand(m, d), neg_idx.T.contiguous().T

    fused_leaves, ref_leaves = leaves(torch.float32), leaves(torch.float64)
    fused_views = views(*fused_leaves)
    assert not fused_views[0].is_contiguous() and not fused_views[1].is_contiguous()
    assert fused_views[2].stride(0) == 0 and not fused_views[3].is_contiguous()
    fused = infonce(*fused_views, temperature=0.5)
    expected = infonce_ref(*views(*ref_leaves), temperature=0.5)
    torch.testing.assert_close(fused.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    fused_grads = torch.autograd.grad(fused, fused_leaves, grad_out)
    ref_grads = torch.autograd.grad(expected, ref_leaves, grad_out.double())
    for a, e in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a.double(), e, atol=1e-4, rtol=1e-5)


def test_all_negatives_point_at_one_bank_row():
    n, k, d, m = 50, 8, 16, 3
    queries, positives, bank, _ = make_inputs(n, k, d, m, torch.float64)
    neg_idx = torch.full((n, k), 1, dtype=torch.int64)
    grad_out = torch.randn(n, dtype=torch.float64)
    got = loss_and_grads(infonce, queries, positives, bank, neg_idx, grad_out)
    expected = reference64(queries, positives, bank, neg_idx, grad_out)
    assert_all_close(got, expected, torch.float64)
    assert torch.count_nonzero(got[3][0]) == 0 and torch.count_nonzero(got[3][2]) == 0  # untouched bank rows


@pytest.mark.parametrize("shape", [(9, 1, 6, 4), (5, 3, 4, 1), (4, 2, 0, 3)], ids=["K=1", "M=1", "D=0"])
def test_small_shapes_match_reference(shape):
    n, k, d, m = shape
    inputs = make_inputs(n, k, d, m, torch.float64)
    grad_out = torch.randn(n, dtype=torch.float64)
    expected = reference64(*inputs, grad_out)
    assert_all_close(loss_and_grads(infonce, *inputs, grad_out), expected, torch.float64)


@pytest.mark.parametrize("m", [0, 3])
def test_no_queries(m):
    queries, positives, bank, neg_idx = make_inputs(0, 4, 5, m)
    queries.requires_grad_()
    bank.requires_grad_()
    loss = infonce(queries, positives, bank, neg_idx)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert queries.grad.shape == (0, 5)
    assert bank.grad.shape == (m, 5) and torch.count_nonzero(bank.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_around_1e4_do_not_overflow(dtype):
    n, k, d, m = 8, 6, 4, 5
    queries, positives, bank, neg_idx = make_inputs(n, k, d, m, torch.float64, scale=60.0)  # |s| ~ 1e4
    queries, positives, bank = (t.to(dtype) for t in (queries, positives, bank))
    logits = (queries.double() @ bank.double().T).abs().max()
    assert logits > 5e3
    grad_out = torch.ones(n, dtype=dtype)
    got = loss_and_grads(infonce, queries, positives, bank, neg_idx, grad_out)
    assert all(torch.isfinite(t).all() for t in got)
    expected = reference64(queries, positives, bank, neg_idx, grad_out)
    # float32 logits of ~1e4 carry absolute errors ~1e-3; the softmax weights are 0 or 1 at this scale.
    atol = 1e-8 if dtype == torch.float64 else 2e-2
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, atol=atol * max(1.0, e.abs().amax().item()), rtol=1e-4)


def test_no_epsilon_unlike_greedy_infomax():
    """Greedy InfoMax: softmax, then -log(p_0 + 1e-11), capped at 25.3; ours is -log p_0 (docstring)."""
    queries, positives, bank, neg_idx = make_inputs(64, 8, 16, 32, torch.float64, seed=5, scale=3.0)
    queries[0] = -10 * positives[0]  # a positive far less likely than every negative: loss >> 25.3
    loss = infonce(queries, positives, bank, neg_idx)
    logits = torch.cat(
        [(queries * positives).sum(1, keepdim=True), torch.einsum("nd,nkd->nk", queries, bank[neg_idx])], dim=1
    )
    greedy_infomax = -torch.log(torch.softmax(logits, dim=1)[:, 0] + 1e-11)
    assert float(loss[0]) > 100 and float(greedy_infomax[0]) == pytest.approx(-math.log(1e-11))
    torch.testing.assert_close(-torch.log(torch.exp(-loss) + 1e-11), greedy_infomax, rtol=0, atol=1e-13)
    q = queries.clone().requires_grad_(True)
    grad = torch.autograd.grad(infonce(q, positives, bank, neg_idx)[0], q)[0]
    assert float(grad[0].abs().max()) > 1.0  # Greedy InfoMax's gradient vanishes there


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_no_worse_than_twice_pytorch(dtype):
    """Low precision accumulates in float32: error vs float32 at most ~2x plain PyTorch's in that dtype."""
    n, k, d, m = 64, 16, 64, 50
    inputs = make_inputs(n, k, d, m, dtype, scale=0.3)
    grad_out = torch.randn(n).to(dtype)
    fused = loss_and_grads(infonce, *inputs, grad_out)
    plain = loss_and_grads(infonce_ref, *inputs, grad_out)
    exact = loss_and_grads(infonce_ref, *(t.float() for t in inputs[:3]), inputs[3], grad_out.float())
    for f, p, e in zip(fused, plain, exact):
        assert f.dtype == dtype
        fused_err = (f.float() - e).abs().max().item()
        plain_err = (p.float() - e).abs().max().item()
        assert fused_err <= 2 * plain_err + 1e-5, (fused_err, plain_err)


@pytest.mark.kernels
def test_bank_gradient_is_deterministic_across_thread_counts():
    n, k, d, m = 300, 16, 32, 7  # ~700 entries per bank row
    inputs = make_inputs(n, k, d, m)
    grad_out = torch.randn(n)
    threads = torch.get_num_threads()
    try:
        results = []
        for num in (1, max(2, threads)):
            torch.set_num_threads(num)
            results.append(loss_and_grads(infonce, *inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.kernels
def test_opcheck():
    samples = []
    for shape, seed in (((7, 3, 5, 11), 0), ((4, 1, 9, 1), 1), ((0, 2, 3, 4), 2)):
        q, p, b, idx = make_inputs(*shape, seed=seed)
        samples.append(((q.requires_grad_(), p.requires_grad_(), b.requires_grad_(), idx, 0.5, True), False))
    q, z, _, idx = make_inputs(6, 4, 3, 6, torch.float64, seed=3)
    z.requires_grad_()
    samples.append(((q, z, z, idx, 2.0, True), True))  # positives is bank
    strided = (q[:, :2].T.contiguous().T, z[:, :2], z[:, 1:3], idx[:, :2], 1.0, False)
    samples.append((strided, False))
    for args, fold in samples:
        torch.library.opcheck(torch.ops.pyanomaly.infonce.default, args)
        q, p, b, idx, temperature, deterministic = (
            a.detach() if isinstance(a, torch.Tensor) else a for a in args
        )
        if fold:
            p = b
        loss, lse = torch.ops.pyanomaly.infonce(q, p, b, idx, temperature, deterministic)
        grad = torch.randn_like(loss)
        torch.library.opcheck(
            torch.ops.pyanomaly.infonce_backward.default,
            (grad, q, p, b, idx, lse, temperature, fold, deterministic),
        )


def test_torch_compile_fullgraph():
    n, k, d = 24, 5, 8
    queries, positives, _, _ = make_inputs(n, k, d, n)
    neg_idx = sample_negatives(n, k, n, generator=torch.Generator().manual_seed(0))
    loss_fn = InfoNCE(num_negatives=k, temperature=0.5)

    def step(q, z, idx):
        return loss_fn(q, z, z, idx).mean()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        q, z = queries.clone().requires_grad_(), positives.clone().requires_grad_()
        loss = fn(q, z, neg_idx)
        loss.backward()
        results.append((loss.detach(), q.grad, z.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_reference_fallback_without_kernels(monkeypatch):
    monkeypatch.setattr(infonce_module._ext, "has_kernels", lambda device=None: False)
    queries, positives, bank, neg_idx = make_inputs(5, 3, 4, 6)
    expected = infonce_ref(queries, positives, bank, neg_idx)
    torch.testing.assert_close(infonce(queries, positives, bank, neg_idx), expected)
    with pytest.raises(IndexError, match="neg_idx"):
        infonce(queries, positives, bank, neg_idx + 3)


def _bad_inputs():
    q, p, b, idx = make_inputs(4, 3, 5, 6)
    return [
        ("queries 1-d", dict(queries=q[0]), ValueError, "queries"),
        ("queries int", dict(queries=q.long(), positives=p.long(), bank=b.long()), TypeError, "queries"),
        ("queries not a tensor", dict(queries=q.tolist()), TypeError, "queries"),
        ("positives shape", dict(positives=p[:3]), ValueError, "positives"),
        ("positives dtype", dict(positives=p.double()), TypeError, "positives"),
        ("bank D", dict(bank=b[:, :4]), ValueError, "bank"),
        ("bank dtype", dict(bank=b.half()), TypeError, "bank"),
        ("bank device", dict(bank=b.to("meta")), ValueError, "bank"),
        ("neg_idx N", dict(neg_idx=idx[:3]), ValueError, "neg_idx"),
        ("neg_idx K=0", dict(neg_idx=idx[:, :0]), ValueError, "neg_idx"),
        ("neg_idx int32", dict(neg_idx=idx.int()), TypeError, "neg_idx"),
        ("neg_idx too large", dict(neg_idx=idx.clone().fill_(6)), IndexError, "neg_idx"),
        ("neg_idx negative", dict(neg_idx=idx - 1 - idx.max()), IndexError, "neg_idx"),
        ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
        ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature"),
        ("temperature tensor", dict(temperature=torch.tensor(1.0)), TypeError, "temperature"),
    ], dict(queries=q, positives=p, bank=b, neg_idx=idx, temperature=1.0)


BAD_INPUTS, GOOD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("change,error,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    args = {**GOOD_INPUTS, **change}
    with pytest.raises(error, match=match):
        infonce(args.pop("queries"), args.pop("positives"), args.pop("bank"), args.pop("neg_idx"), **args)


PYTHON_ONLY = ("queries not a tensor", "temperature tensor", "queries int")  # not expressible to the raw ops


@pytest.mark.kernels
@pytest.mark.parametrize(
    "change,error,match",
    [c[1:] for c in BAD_INPUTS if c[0] not in PYTHON_ONLY],
    ids=[c[0] for c in BAD_INPUTS if c[0] not in PYTHON_ONLY],
)
def test_bad_inputs_to_the_raw_ops_raise_naming_the_argument(change, error, match):
    """torch.ops.pyanomaly.* are callable directly, so the C++ side checks everything too."""
    args = {**GOOD_INPUTS, **change}
    names = ("queries", "positives", "bank", "neg_idx", "temperature")
    q, p, b, idx, temperature = (args[name] for name in names)
    error = IndexError if error is IndexError else RuntimeError
    with pytest.raises(error, match=match):
        torch.ops.pyanomaly.infonce(q, p, b, idx, temperature)
    if q.dim() == 2 and b.device.type == "cpu":
        lse, grad = torch.zeros(q.shape[0]), torch.ones(q.shape[0])
        with pytest.raises(error, match=match):
            torch.ops.pyanomaly.infonce_backward(grad, q, p, b, idx, lse, temperature)


@pytest.mark.kernels
def test_bad_backward_inputs_raise():
    q, p, b, idx = make_inputs(4, 3, 5, 6)
    lse = torch.zeros(4)
    with pytest.raises(RuntimeError, match="grad_loss"):
        torch.ops.pyanomaly.infonce_backward(torch.ones(3), q, p, b, idx, lse, 1.0)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.pyanomaly.infonce_backward(torch.ones(4), q, p, b, idx, lse.double(), 1.0)
    with pytest.raises(RuntimeError, match="fold_positives"):
        torch.ops.pyanomaly.infonce_backward(torch.ones(4), q, p, b, idx, lse, 1.0, True)


def test_sample_negatives_shape_range_and_exclusion():
    gen = torch.Generator().manual_seed(0)
    idx = sample_negatives(1000, 16, 7, generator=gen)
    assert idx.shape == (1000, 16) and idx.dtype == torch.int64
    assert idx.min() == 0 and idx.max() == 6
    counts = torch.bincount(idx.view(-1), minlength=7).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.05  # uniform: 16000 draws, ~2% noise per bin
    exclude = torch.randint(7, (1000,), generator=gen)
    idx = sample_negatives(1000, 16, 7, generator=gen, exclude=exclude)
    assert not (idx == exclude[:, None]).any()
    assert idx.min() == 0 and idx.max() == 6
    assert torch.equal(
        sample_negatives(5, 3, 9, generator=torch.Generator().manual_seed(4)),
        sample_negatives(5, 3, 9, generator=torch.Generator().manual_seed(4)),
    )
    assert sample_negatives(0, 3, 1).shape == (0, 3)
    only_other = sample_negatives(3, 4, 2, exclude=torch.tensor([0, 1, 0]))
    assert torch.equal(only_other, torch.tensor([[1] * 4, [0] * 4, [1] * 4]))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(num_queries=-1), ValueError, "num_queries"),
        (dict(k=0), ValueError, "k must"),
        (dict(k=2.0), TypeError, "k must"),
        (dict(bank_size=0), ValueError, "bank_size"),
        (dict(bank_size=1, exclude=torch.zeros(4, dtype=torch.int64)), ValueError, "bank_size"),
        (dict(exclude=torch.zeros(3, dtype=torch.int64)), ValueError, "exclude"),
        (dict(exclude=torch.zeros(4, dtype=torch.int32)), TypeError, "exclude"),
        (dict(exclude=torch.full((4,), 5)), IndexError, "exclude"),
        (dict(exclude=torch.zeros(4, dtype=torch.int64), device="meta"), ValueError, "exclude"),
    ],
)
def test_sample_negatives_bad_arguments(kwargs, error, match):
    args = {"num_queries": 4, "k": 3, "bank_size": 5, **kwargs}
    with pytest.raises(error, match=match):
        sample_negatives(args.pop("num_queries"), args.pop("k"), args.pop("bank_size"), **args)


def test_infonce_module():
    n, k, d, m = 20, 6, 8, 12
    queries, positives, bank, neg_idx = make_inputs(n, k, d, m)
    module = InfoNCE(num_negatives=k, temperature=0.5)
    expected = infonce(queries, positives, bank, neg_idx, temperature=0.5)
    torch.testing.assert_close(module(queries, positives, bank, neg_idx), expected)
    drawn = sample_negatives(n, k, m, generator=torch.Generator().manual_seed(3), device=queries.device)
    sampled = module(queries, positives, bank, generator=torch.Generator().manual_seed(3))
    assert sampled.shape == (n,)
    torch.testing.assert_close(sampled, infonce(queries, positives, bank, drawn, temperature=0.5))
    # exclude_positive never draws the positive's own row: with M = 2 the negatives are fixed.
    z = positives[:2]
    out = InfoNCE(num_negatives=3, exclude_positive=True)(queries[:2], z, z)
    torch.testing.assert_close(out, infonce(queries[:2], z, z, torch.tensor([[1] * 3, [0] * 3])))
    with pytest.raises(ValueError, match="exclude_positive"):
        InfoNCE(exclude_positive=True)(queries, positives, bank)
    with pytest.raises(ValueError, match="num_negatives"):
        InfoNCE(num_negatives=0)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCE(temperature=-1.0)
    assert "num_negatives=6" in repr(module)


# ---- CUDA (skipped without a GPU and the CUDA kernels) ----

CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(500, 16, 256, 400)])
@pytest.mark.parametrize("same", [False, True], ids=["bank", "positives_is_bank"])
def test_cuda_matches_cpu_and_reference(shape, dtype, same):
    n, k, d, m = shape
    m = n if same else m
    cpu = make_inputs(n, k, d, m, torch.float64, seed=n + d, scale=0.3)
    grad_out = torch.randn(n, dtype=torch.float64)
    exact = reference64(*cpu, grad_out, same=same, temperature=0.5)
    cuda = [t.to(dtype).cuda() if t.is_floating_point() else t.cuda() for t in cpu]
    fused = loss_and_grads(infonce, *cuda, grad_out.to(dtype).cuda(), same=same, temperature=0.5)
    if dtype in (torch.float32, torch.float64):
        assert_all_close([t.cpu() for t in fused], exact, dtype)
        cpu_fused = loss_and_grads(infonce, *(t.to(dtype) if t.is_floating_point() else t for t in cpu),
                                   grad_out.to(dtype), same=same, temperature=0.5)
        assert_all_close([t.cpu() for t in fused], [t.double() for t in cpu_fused], dtype)
    else:
        plain = loss_and_grads(infonce_ref, *cuda, grad_out.to(dtype).cuda(), same=same, temperature=0.5)
        for f, p, e in zip(fused, plain, exact):
            assert f.dtype == dtype
            fused_err = (f.double().cpu() - e).abs().max().item()
            plain_err = (p.double().cpu() - e).abs().max().item()
            assert fused_err <= 2 * plain_err + 1e-5, (fused_err, plain_err)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_and_atomic_paths(dtype):
    n, k, d, m = 2000, 16, 96, 50  # ~640 entries per bank row
    inputs = [t.cuda() for t in make_inputs(n, k, d, m, dtype, scale=0.3)]
    grad_out = torch.randn(n, device="cuda").to(dtype)
    first = loss_and_grads(infonce, *inputs, grad_out)
    second = loss_and_grads(infonce, *inputs, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    atomic = loss_and_grads(infonce, *inputs, grad_out, deterministic=False)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(first, atomic):
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.cuda
def test_cuda_edge_cases_and_errors():
    for shape in ((0, 3, 8, 5), (6, 1, 8, 1), (40, 8, 16, 3)):
        n, k, d, m = shape
        cpu = make_inputs(n, k, d, m, torch.float64)
        if n == 40:
            cpu[3].fill_(2)  # every negative is bank row 2
        grad_out = torch.randn(n, dtype=torch.float64)
        fused = loss_and_grads(infonce, *(t.cuda() for t in cpu), grad_out.cuda())
        assert_all_close([t.cpu() for t in fused], reference64(*cpu, grad_out), torch.float64)
    q, p, b, idx = (t.cuda() for t in make_inputs(4, 3, 8, 5))
    with pytest.raises(IndexError, match="neg_idx"):
        infonce(q, p, b, idx + 5)
    with pytest.raises(ValueError, match="bank"):
        infonce(q, p, b.cpu(), idx)
    with pytest.raises(RuntimeError, match="bank"):
        torch.ops.pyanomaly.infonce(q, p, b.cpu(), idx, 1.0)
    # Non-contiguous views on the GPU.
    qt = q.T.contiguous().T
    bw = torch.cat([b, b], 1)[:, 3:11]
    fused = infonce(qt, p, bw, idx.T.contiguous().T)
    torch.testing.assert_close(fused, infonce_ref(qt, p, bw, idx), atol=1e-5, rtol=1e-5)
