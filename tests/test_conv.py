"""StrideSafeConv2d: nn.Conv2d's results, and finite bf16 weight gradients on one-pixel-wide maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyanomaly.nn.conv import StrideSafeConv2d
from pyanomaly.nn.preact_resnet import PreActResNetEncoder
from pyanomaly.nn.resnet import resnet18


def _pair(kernel: int, stride: int, **kwargs) -> tuple[nn.Conv2d, StrideSafeConv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 5, kernel, stride=stride, **kwargs).double()
    safe = StrideSafeConv2d(3, 5, kernel, stride=stride, **kwargs).double()
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


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("build", ["cpcad", "resnet18"])
def test_bf16_weight_gradients_on_one_pixel_maps_track_fp32(build, channels_last):
    """The case that gave garbage gradients before (results/bf16_cpu_nan.py): the last stage's stride-2
    convs see 1x1 maps. Several repeats, because the failure was intermittent on some machines.

    Without normalisation (CPC-AD's encoder) bf16 rounding moves the gradients by a few percent (up to
    8% in the first layers of a wider encoder on 3600 sub-patches); the garbage was far above 100%.
    Through BatchNorm at random init they do not: the normalised gradients nearly cancel and bf16
    rounding moves them by up to 80% (also on 32-64 px maps, where no 1x1 map occurs), so for the
    ResNet the bound is only that the error stays below the gradient's own size, which the garbage
    (NaN, inf, ~1e36) breaks."""
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
