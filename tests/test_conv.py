"""StrideSafeConv2d: nn.Conv2d's results, and finite bf16 weight gradients on one-pixel-wide maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyanomaly.nn.conv import StrideSafeConv2d
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.nn.resnet import resnet18


def _pair(kernel, stride, in_channels=3, out_channels=5, **kwargs) -> tuple[nn.Conv2d, StrideSafeConv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, **kwargs).double()
    safe = StrideSafeConv2d(in_channels, out_channels, kernel, stride=stride, **kwargs).double()
    safe.load_state_dict(plain.state_dict())
    return plain, safe


@pytest.mark.parametrize("kernel, padding", [(1, 0), (3, 1), (7, 3), (3, 0), (3, 2)])
@pytest.mark.parametrize("size", [(1, 1), (2, 1), (1, 2), (1, 5), (4, 1), (3, 3), (6, 6)])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_output_and_gradients_as_nn_conv2d(kernel, padding, size, stride):
    plain, safe = _pair(kernel, stride, padding=padding)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    if min(s + 2 * padding - kernel for s in size) < 0:
        with pytest.raises(RuntimeError):
            plain(x)
        return
    x_plain, x_safe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain, y_safe = plain(x_plain), safe(x_safe)
    assert y_safe.shape == y_plain.shape
    torch.testing.assert_close(y_safe, y_plain, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_plain)
    (y_plain * g).sum().backward()
    (y_safe * g).sum().backward()
    torch.testing.assert_close(x_safe.grad, x_plain.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(safe.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(safe.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


def test_drops_the_stride_only_where_it_changes_nothing():
    conv = StrideSafeConv2d(1, 1, 3, stride=2, padding=1)
    assert conv._stride_for((1, 1)) == (1, 1)
    assert conv._stride_for((1, 4)) == (1, 2)
    assert conv._stride_for((4, 1)) == (2, 1)
    assert conv._stride_for((2, 2)) == (2, 2)  # size 2: the stride picks which taps meet the input
    assert StrideSafeConv2d(1, 1, 3, stride=2, padding=0)._stride_for((3, 3)) == (2, 2)
    assert StrideSafeConv2d(1, 1, 3, stride=2, padding=2)._stride_for((1, 1)) == (2, 2)  # output 2 at stride 1
    assert StrideSafeConv2d(1, 1, 3, stride=1, padding=1, padding_mode="reflect")._stride_for((1, 1)) == (1, 1)


def test_gradcheck_on_a_one_pixel_map():
    _, safe = _pair(3, 2, padding=1)
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.nn.functional.conv2d(x, w, b, 1, 1), (x, safe.weight, safe.bias))
    assert torch.autograd.gradcheck(safe, (x,))


def _weight_grads(encoder: nn.Module, x: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    encoder.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = encoder(x)
    out = out[-1] if isinstance(out, (list, tuple)) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    return {name: p.grad.clone() for name, p in encoder.named_parameters()}


@pytest.mark.parametrize("as_matmul", [False, True], ids=["onednn", "matmul"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("build", ["cpcad", "resnet18"])
def test_bf16_weight_gradients_on_one_pixel_maps_track_fp32(build, channels_last, as_matmul, monkeypatch):
    """The case that gave garbage gradients before (results/bf16_cpu_nan.py): the last stage's stride-2
    convs see 1x1 maps. Several repeats, because the failure was intermittent on some machines.

    Without normalisation (CPC-AD's encoder) bf16 rounding moves the gradients by a few percent (up to
    8% in the first layers of a wider encoder on 3600 sub-patches); the garbage was far above 100%.
    Through BatchNorm at random init they do not: the normalised gradients nearly cancel and bf16
    rounding moves them by up to 80% (also on 32-64 px maps, where no 1x1 map occurs), so for the
    ResNet the bound is only that the error stays below the gradient's own size, which the garbage
    (NaN, inf, ~1e36) breaks. Both ways: small maps through oneDNN (the stride-dropping fix) and as
    matrix products (the CPU default)."""
    from pyanomaly.nn import conv

    monkeypatch.setattr(conv, "SMALL_MAPS_AS_MATMUL", as_matmul)
    torch.manual_seed(0)
    if build == "cpcad":  # 8 px sub-patches: fast stem -> 2x2, then stride-2 stages -> 1x1
        encoder, x = PreActResNetEncoder(1, (8, 16, 32), (1, 1, 1), (1, 2, 2), "fast"), torch.randn(256, 1, 8, 8)
    else:  # 16 px images through the ImageNet stem: stage maps 4, 2, 1, 1
        encoder, x = resnet18(in_channels=1, width=4), torch.randn(64, 1, 16, 16)
    if channels_last:
        encoder, x = encoder.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    bound = 0.25 if build == "cpcad" else 1.0
    fp32 = _weight_grads(encoder, x, bf16=False)
    for _ in range(4):
        bf16 = _weight_grads(encoder, x, bf16=True)
        for name, grad in bf16.items():
            assert torch.isfinite(grad).all(), name
            assert float((grad - fp32[name]).norm() / fp32[name].norm()) < bound, name


# --- maps no larger than the kernel: one matrix product on CPU ---------------------------------------

DENSE_GEOMETRIES = [  # (in, out, kernel, stride, padding, dilation, input size): H·W <= kh·kw
    (3, 5, 3, 1, 1, 1, (1, 1)),
    (3, 5, 3, 2, 1, 1, (1, 1)),
    (3, 5, 3, 1, 1, 1, (2, 2)),
    (3, 5, 3, 2, 1, 1, (2, 2)),
    (3, 5, 3, 2, 1, 1, (3, 3)),
    (3, 5, 3, 1, 0, 1, (3, 3)),
    (2, 4, 3, 1, 2, 2, (2, 3)),
    (2, 4, (3, 5), (1, 2), (1, 2), 1, (3, 2)),
    (1, 6, 7, 2, 3, 1, (6, 6)),
    (4, 3, 1, 1, 0, 1, (1, 1)),
    (4, 3, 1, 2, 0, 1, (1, 1)),
]


def _no_conv(monkeypatch):
    """From here on, F.conv2d (what nn.Conv2d and the fallback call) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("F.conv2d ran: the matrix-product path was not taken")

    monkeypatch.setattr(torch.nn.functional, "conv2d", refuse)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geometry", DENSE_GEOMETRIES, ids=str)
def test_small_maps_run_as_one_matmul_with_nn_conv2d_results(geometry, bias, layout, monkeypatch):
    cin, cout, kernel, stride, padding, dilation, size = geometry
    plain, safe = _pair(kernel, stride, cin, cout, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(3, cin, *size, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other sample of a larger batch: not contiguous in any format
        x = torch.randn(6, cin, *size, dtype=torch.float64)[::2]
    x_plain, x_safe = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_plain = plain(x_plain)
    g = torch.randn_like(y_plain)
    (y_plain * g).sum().backward()
    _no_conv(monkeypatch)
    y_safe = safe(x_safe)
    (y_safe * g).sum().backward()
    assert y_safe.shape == y_plain.shape
    torch.testing.assert_close(y_safe, y_plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_safe.grad, x_plain.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(safe.weight.grad, plain.weight.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(safe.bias.grad, plain.bias.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", [DENSE_GEOMETRIES[i] for i in (1, 3, 6, 7)], ids=str)
def test_gradcheck_of_the_matmul_path(geometry, monkeypatch):
    cin, cout, kernel, stride, padding, dilation, size = geometry
    _, safe = _pair(kernel, stride, cin, cout, padding=padding, dilation=dilation)
    x = torch.randn(2, cin, *size, dtype=torch.float64, requires_grad=True)
    _no_conv(monkeypatch)

    def run(x, weight, bias):
        return safe._conv_forward(x, weight, bias)

    assert torch.autograd.gradcheck(run, (x, safe.weight, safe.bias))
    assert torch.autograd.gradgradcheck(run, (x, safe.weight, safe.bias))


def test_matmul_path_output_layout_empty_batch_and_switch(monkeypatch):
    from pyanomaly.nn import conv

    _, safe = _pair(3, 2, padding=1)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    calls = []
    real_conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **kw: calls.append(1) or real_conv2d(*a, **kw))
    y = safe(x)
    assert not calls and y.is_contiguous(memory_format=torch.channels_last)
    assert safe(x[:0]).shape == (0, 5, 1, 1)
    assert not calls
    monkeypatch.setattr(conv, "SMALL_MAPS_AS_MATMUL", False)
    torch.testing.assert_close(safe(x), y, rtol=1e-12, atol=1e-12)
    assert calls  # switched off: oneDNN's conv, the same result
    calls.clear()
    safe(torch.randn(1, 3, 4, 4, dtype=torch.float64))  # 16 > 9 taps: always the conv
    assert calls
    with pytest.raises(RuntimeError):  # an empty output: the conv's own error, not the matmul's
        StrideSafeConv2d(1, 1, 3)(torch.randn(1, 1, 1, 1))


def test_matmul_path_bf16_error_at_most_twice_the_convs():
    """Under CPU bf16 autocast the product runs in bf16 like the conv; its error against the float64
    result stays within twice the conv's (the low-precision rule of the ops)."""
    from pyanomaly.nn import conv

    torch.manual_seed(0)
    safe = StrideSafeConv2d(64, 64, 3, padding=1)
    x = torch.randn(512, 64, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        truth = torch.nn.functional.conv2d(x.double(), safe.weight.double(), safe.bias.double(), padding=1)
    errors = {}
    for as_matmul in (False, True):
        conv.SMALL_MAPS_AS_MATMUL = as_matmul
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = safe(x)
        finally:
            conv.SMALL_MAPS_AS_MATMUL = True
        assert out.dtype == torch.bfloat16
        errors[as_matmul] = float((out.detach().double() - truth).abs().max())
    assert errors[True] <= 2 * errors[False], errors



def test_matmul_path_keeps_the_conv_beyond_the_dense_size_cap(monkeypatch):
    """A dense matrix above MAX_DENSE_ENTRIES (wide convs on 3x3 maps) stays a conv: no 100 MB index."""
    from pyanomaly.nn import conv

    small = StrideSafeConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 3, 3)
    assert small._runs_as_matmul(x)  # 9·8 x 9·8 entries
    monkeypatch.setattr(conv, "MAX_DENSE_ENTRIES", 9 * 8 * 9 * 8 - 1)
    assert not small._runs_as_matmul(x)
    monkeypatch.undo()
    assert not StrideSafeConv2d(512, 512, 3, padding=1)._runs_as_matmul(torch.randn(1, 512, 3, 3))
    assert StrideSafeConv2d(1, 1, 3, padding=2)._runs_as_matmul(torch.randn(1, 1, 1, 1))  # output 3x3 > input
