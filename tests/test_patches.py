"""extract_patches / fold_patches: the fused kernels against their pure-PyTorch references."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from pyanomaly import _ext
from pyanomaly.ops import extract_patches, extract_patches_ref, fold_patches, fold_patches_ref, huge_pages
from pyanomaly.ops import patches as patches_module

OPS = torch.ops.pyanomaly
FLOATING = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
INPUT_DTYPES = [torch.uint8, *FLOATING]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_images(shape, dtype, layout="contiguous", seed=0, device="cpu") -> torch.Tensor:
    """Random (B, C, H, W) images in the given dtype and memory layout."""
    gen = torch.Generator().manual_seed(seed)
    batch, channels, height, width = shape
    # "strided": a transposed, every-other-row view of a bigger tensor (no unit stride anywhere)
    base_shape = (batch, channels, width, 2 * height) if layout == "strided" else shape
    if dtype == torch.uint8:
        base = torch.randint(0, 256, base_shape, generator=gen, dtype=torch.uint8)
    else:
        base = torch.randn(base_shape, generator=gen, dtype=torch.float64).to(dtype)
    base = base.to(device)
    if layout == "strided":
        images = base.transpose(2, 3)[:, :, ::2]
        assert batch == 0 or not images.is_contiguous()
    elif layout == "channels_last":
        images = base.contiguous(memory_format=torch.channels_last)
    else:
        images = base
    assert images.shape == shape
    return images


def make_flip(batch, seed=0, device="cpu") -> torch.Tensor:
    flip = torch.rand(batch, generator=torch.Generator().manual_seed(seed + 1)) < 0.5
    if batch > 1:  # both flipped and unflipped images
        flip[0], flip[1] = True, False
    return flip.to(device)


# (images shape, size, stride, sub_size, sub_stride, options); "flip" in options means a random hflip.
CASES = {
    "odd": ((2, 3, 17, 23), (5, 7), (3, 4), None, None, {}),
    "stride_gt_size": ((2, 3, 19, 21), 4, (6, 5), None, None, {"flip": True}),
    "stride_eq_size": ((3, 3, 16, 18), (4, 6), (4, 6), None, None, {"grayscale": True, "flip": True}),
    "patch_eq_image": ((2, 3, 9, 11), (9, 11), (2, 3), None, None,
                       {"mean": [0.1, 0.2, 0.3], "std": [0.5, 2.0, 0.25]}),
    "gray_normalised": ((2, 3, 15, 14), (6, 5), (2, 3), None, None,
                        {"grayscale": True, "mean": [0.45], "std": [0.226], "flip": True}),
    "one_channel_gray": ((2, 1, 13, 12), 5, 4, None, None, {"grayscale": True, "mean": 0.5, "std": 0.25}),
    "two_level": ((2, 3, 33, 29), (16, 12), (8, 7), (6, 5), (3, 2),
                  {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "flip": True}),
    "two_level_gray_gaps": ((2, 3, 27, 31), (12, 13), (5, 9), (3, 4), (4, 3),
                            {"grayscale": True, "flip": True}),
    "two_level_sub_eq_size": ((1, 2, 10, 10), (4, 4), (3, 3), (4, 4), (2, 2), {}),
    "empty_batch": ((0, 3, 12, 12), 4, 2, 2, 1, {"grayscale": True, "flip": True}),
}


def case_kwargs(case, batch, device="cpu"):
    _, size, stride, sub_size, sub_stride, options = case
    kwargs = {k: v for k, v in options.items() if k != "flip"}
    if options.get("flip"):
        kwargs["hflip"] = make_flip(batch, device=device)
    return size, stride, dict(sub_size=sub_size, sub_stride=sub_stride, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_extract_matches_reference(name, dtype, layout):
    case = CASES[name]
    images = make_images(case[0], dtype, layout)
    size, stride, kwargs = case_kwargs(case, images.shape[0])
    out = extract_patches(images, size, stride, **kwargs)
    ref = extract_patches_ref(images, size, stride, **kwargs)
    assert out.dtype == ref.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref)  # the default tolerance of the output dtype: its rounding


def random_case(seed):
    """A random geometry and option set (odd sizes, strides up to beyond the patch, one or two levels)."""
    rng = torch.Generator().manual_seed(1000 + seed)

    def randint(low, high):  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    channels = [1, 3, 4][randint(0, 2)]
    shape = (randint(0, 3), channels, randint(1, 40), randint(1, 40))
    size = (randint(1, shape[2]), randint(1, shape[3]))
    stride = (randint(1, size[0] + 3), randint(1, size[1] + 3))
    sub_size = sub_stride = None
    if randint(0, 1):
        sub_size = (randint(1, size[0]), randint(1, size[1]))
        sub_stride = (randint(1, sub_size[0] + 2), randint(1, sub_size[1] + 2))
    options = {"flip": bool(randint(0, 1))}
    if channels in (1, 3) and randint(0, 1):
        options["grayscale"] = True
    if randint(0, 1):
        out_channels = 1 if options.get("grayscale") else channels
        options["mean"] = torch.rand(out_channels, generator=rng).tolist()
        options["std"] = (torch.rand(out_channels, generator=rng) + 0.1).tolist()
    return shape, size, stride, sub_size, sub_stride, options


@pytest.mark.parametrize("seed", range(16))
def test_extract_random_geometries(seed):
    case = random_case(seed)
    dtype = INPUT_DTYPES[seed % len(INPUT_DTYPES)]
    images = make_images(case[0], dtype, LAYOUTS[seed % len(LAYOUTS)], seed=seed)
    size, stride, kwargs = case_kwargs(case, images.shape[0])
    out = extract_patches(images, size, stride, **kwargs)
    torch.testing.assert_close(out, extract_patches_ref(images, size, stride, **kwargs))
    if dtype == torch.float64:
        fused_in, ref_in = images.detach().requires_grad_(), images.detach().requires_grad_()
        grad = torch.randn_like(out)
        (fused_grad,) = torch.autograd.grad(extract_patches(fused_in, size, stride, **kwargs), fused_in, grad)
        (ref_grad,) = torch.autograd.grad(extract_patches_ref(ref_in, size, stride, **kwargs), ref_in, grad)
        torch.testing.assert_close(fused_grad, ref_grad)


@pytest.mark.parametrize(
    ("in_dtype", "out_dtype"),
    [(torch.uint8, torch.float16), (torch.uint8, torch.bfloat16), (torch.uint8, torch.float64),
     (torch.float16, torch.float32), (torch.bfloat16, torch.float64), (torch.float64, torch.float32),
     (torch.float32, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("name", ["two_level", "gray_normalised"])
def test_extract_output_dtype(name, in_dtype, out_dtype):
    case = CASES[name]
    images = make_images(case[0], in_dtype, "channels_last")
    size, stride, kwargs = case_kwargs(case, images.shape[0])
    out = extract_patches(images, size, stride, dtype=out_dtype, **kwargs)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, extract_patches_ref(images, size, stride, dtype=out_dtype, **kwargs))


def test_extract_values_by_hand():
    """Independent of the reference: one pixel of one sub-patch, computed by hand."""
    images = make_images((2, 3, 20, 22), torch.uint8, "channels_last")
    flip = torch.tensor([False, True])
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    out = extract_patches(images, (10, 12), (5, 4), sub_size=(4, 6), sub_stride=(3, 2), mean=mean, std=std,
                          hflip=flip)
    assert out.shape == (2, 3, 3, 3, 4, 3, 4, 6)
    b, i1, j1, i2, j2, c, py, px = 1, 2, 1, 1, 3, 2, 3, 5
    y, x = i1 * 5 + i2 * 3 + py, j1 * 4 + j2 * 2 + px
    expected = (images[b, c, y, 22 - 1 - x].item() / 255 - mean[c]) / std[c]
    assert out[b, i1, j1, i2, j2, c, py, px].item() == pytest.approx(expected, rel=1e-6)
    gray = extract_patches(images, 20, 1, grayscale=True)
    luma = sum(w * images[0, k, 7, 9].item() / 255 for k, w in enumerate((0.299, 0.587, 0.114)))
    assert gray[0, 0, 0, 0, 7, 9].item() == pytest.approx(luma, rel=1e-6)


@pytest.mark.parametrize("dtype", FLOATING, ids=str)
@pytest.mark.parametrize("name", [n for n in CASES if n != "empty_batch"])
def test_extract_gradients_match_reference(name, dtype):
    case = CASES[name]
    images = make_images(case[0], dtype, "strided")
    size, stride, kwargs = case_kwargs(case, images.shape[0])
    fused_in = images.detach().requires_grad_()
    ref_in = images.detach().to(torch.float64).requires_grad_()  # exact: the fp64 reference
    out = extract_patches(fused_in, size, stride, **kwargs)
    ref = extract_patches_ref(ref_in, size, stride, **kwargs)
    gen = torch.Generator().manual_seed(3)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    (fused_grad,) = torch.autograd.grad(out, fused_in, grad)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.to(torch.float64))
    assert fused_grad.dtype == dtype
    torch.testing.assert_close(fused_grad, ref_grad.to(dtype))


@pytest.mark.kernels
def test_extract_gradient_of_strided_grad_and_empty_batch():
    images = make_images((2, 3, 21, 19), torch.float64).requires_grad_()
    kwargs = dict(sub_size=(5, 4), sub_stride=(2, 3), hflip=torch.tensor([True, False]), std=[0.5, 2.0, 4.0])
    out = extract_patches(images, (11, 10), (5, 4), **kwargs)
    out.sum().backward()  # an expanded (stride 0) grad
    ref_in = images.detach().requires_grad_()
    extract_patches_ref(ref_in, (11, 10), (5, 4), **kwargs).sum().backward()
    torch.testing.assert_close(images.grad, ref_in.grad)
    # a permuted, non-contiguous grad through the backward op directly
    grad = torch.randn(out.shape[::-1], dtype=torch.float64).permute(*reversed(range(out.dim())))
    direct = OPS.extract_patches_backward(grad, [2, 3, 21, 19], torch.float64, [11, 10], [5, 4], [5, 4],
                                          [2, 3], False, [0.5, 2.0, 4.0], kwargs["hflip"])
    (expected,) = torch.autograd.grad(extract_patches_ref(ref_in, (11, 10), (5, 4), **kwargs), ref_in, grad)
    torch.testing.assert_close(direct, expected)
    empty = make_images((0, 3, 8, 8), torch.float32).requires_grad_()
    extract_patches(empty, 4, 2).sum().backward()
    assert empty.grad.shape == empty.shape


def test_extract_uint8_is_not_differentiable_and_backward_is_deterministic():
    out = extract_patches(make_images((1, 3, 8, 8), torch.uint8), 4, 2)
    assert not out.requires_grad
    images = make_images((2, 3, 30, 30), torch.float32).requires_grad_()
    flip = torch.tensor([True, False])
    out = extract_patches(images, 12, 6, sub_size=4, sub_stride=2, grayscale=True, hflip=flip)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, images, grad, retain_graph=True)[0]
    second = torch.autograd.grad(out, images, grad)[0]
    assert torch.equal(first, second)


GRADCHECK_CASES = [
    ((2, 3, 7, 8), (4, 3), (2, 3), None, None,
     {"mean": [0.1, 0.2, 0.3], "std": [0.5, 2.0, 0.25], "flip": True}),
    ((2, 3, 9, 8), (6, 7), (3, 1), (3, 4), (2, 3), {"grayscale": True, "std": [0.3], "flip": True}),
    ((1, 2, 8, 9), 3, (4, 5), None, None, {}),  # stride > size: some pixels are in no patch
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["one_level", "two_level_gray", "gaps"])
def test_extract_gradcheck(case):
    images = make_images(case[0], torch.float64, "channels_last").requires_grad_()
    size, stride, kwargs = case_kwargs(case, images.shape[0])

    def fn(x):
        return extract_patches(x, size, stride, **kwargs)

    assert torch.autograd.gradcheck(fn, (images,))
    assert torch.autograd.gradgradcheck(fn, (images,))


# fold_patches cases: (scores shape, size, stride, output_size)
FOLD_CASES = {
    "cpcad": ((2, 7, 7), 8, 4, (32, 32)),
    "odd_channels": ((2, 4, 5, 3), (5, 4), (3, 2), (15, 13)),
    "larger_output": ((1, 3, 4, 2), (4, 5), (4, 5), (17, 23)),
    "stride_gt_size": ((2, 3, 3), 3, 5, (14, 15)),
    "single_patch": ((3, 1, 1), (6, 5), (2, 2), (6, 5)),
    "empty_batch": ((0, 3, 3, 2), 4, 2, (8, 8)),
}


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOATING, ids=str)
@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_fold_matches_reference(name, dtype, reduce):
    if dtype in (torch.float16, torch.bfloat16) and not _ext.has_kernels("cpu"):
        pytest.skip("the fp32-accumulating kernels are not loaded; the reference fallback sums in the half dtype")
    shape, size, stride, output_size = FOLD_CASES[name]
    gen = torch.Generator().manual_seed(0)
    # non-contiguous scores: a transposed view
    scores = torch.randn(shape[::-1], generator=gen, dtype=torch.float64).to(dtype)
    scores = scores.permute(*reversed(range(len(shape)))).requires_grad_()
    ref_in = scores.detach().to(torch.float64).requires_grad_()
    out = fold_patches(scores, size, stride, output_size, reduce=reduce)
    ref = fold_patches_ref(ref_in, size, stride, output_size, reduce=reduce)  # fp64: the exact value
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref.to(dtype))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype)
    (fused_grad,) = torch.autograd.grad(out, scores, grad)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, grad.to(torch.float64))
    torch.testing.assert_close(fused_grad, ref_grad.to(dtype))


@pytest.mark.parametrize("seed", range(8))
def test_fold_random_geometries(seed):
    rng = torch.Generator().manual_seed(2000 + seed)

    def randint(low, high):  # inclusive
        return int(torch.randint(low, high + 1, (1,), generator=rng))

    size, stride = (randint(1, 9), randint(1, 9)), (randint(1, 10), randint(1, 10))
    grid = (randint(1, 6), randint(1, 6))
    output_size = tuple((n - 1) * t + s + randint(0, 3) for n, t, s in zip(grid, stride, size))
    shape = (randint(0, 3), *grid) + ((randint(1, 3),) if seed % 2 else ())
    scores = torch.randn(shape, generator=rng, dtype=torch.float64).requires_grad_()
    reduce = ["mean", "sum"][(seed // 2) % 2]
    out = fold_patches(scores, size, stride, output_size, reduce=reduce)
    ref = fold_patches_ref(scores, size, stride, output_size, reduce=reduce)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, scores, grad)[0], torch.autograd.grad(ref, scores, grad)[0])


def test_fold_values_by_hand():
    scores = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # 2x2 patches of 4 at stride 2 on 8x8
    out = fold_patches(scores, 4, 2, (8, 8))
    assert out[0, 0, 0] == 1 and out[0, 3, 3] == 2.5 and out[0, 2, 5] == 3.0 and out[0, 7, 7] == 0
    total = fold_patches(scores, 4, 2, (8, 8), reduce="sum")
    assert total[0, 3, 3] == 10 and total[0, 5, 5] == 4


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_fold_gradcheck(reduce):
    scores = torch.randn(2, 4, 3, 2, dtype=torch.float64).requires_grad_()

    def fn(v):
        return fold_patches(v, (4, 5), (3, 2), (14, 12), reduce=reduce)

    assert torch.autograd.gradcheck(fn, (scores,))
    assert torch.autograd.gradgradcheck(fn, (scores,))


@pytest.mark.kernels
def test_opcheck():
    flip = torch.tensor([True, False])
    images = make_images((2, 3, 12, 13), torch.float64).requires_grad_()
    images_uint8 = make_images((2, 3, 12, 13), torch.uint8, "channels_last")
    patch_grad = torch.randn(2, 3, 3, 3, 5, dtype=torch.float64).requires_grad_().unsqueeze(3)
    values = torch.randn(2, 5, 6, 3, dtype=torch.float64).requires_grad_()
    map_grad = torch.randn(2, 3, 17, 19, dtype=torch.float64).requires_grad_()
    samples = [
        (OPS.extract_patches.default,
         (images, [6, 5], [3, 4], [3, 2], [2, 1], True, None, [0.5], flip, torch.float64)),
        (OPS.extract_patches.default,
         (images_uint8, [6, 5], [3, 4], [], [], False, [0.1, 0.2, 0.3], [0.5], None, torch.float32)),
        (OPS.extract_patches_backward.default,
         (patch_grad, [2, 1, 12, 13], torch.float64, [3, 5], [4, 4], [], [], False, [0.5], flip)),
        (OPS.fold_patches.default, (values, [4, 5], [3, 2], [17, 19], True)),
        (OPS.fold_patches_backward.default, (map_grad, [4, 5], [3, 2], [5, 6], False)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    flip = torch.tensor([True, False])

    @torch.compile(fullgraph=True)
    def patch_scores(images, scores):
        patches = extract_patches(images, 8, 4, sub_size=4, sub_stride=2, grayscale=True, mean=[0.5],
                                  std=[0.25], hflip=flip)
        return patches, fold_patches(scores, 4, 2, (8, 8))

    images = make_images((2, 3, 16, 16), torch.float32).requires_grad_()
    scores = torch.randn(2, 3, 3, requires_grad=True)
    patches, segmentation = patch_scores(images, scores)
    ref_images = images.detach().requires_grad_()
    ref_scores = scores.detach().requires_grad_()
    ref_patches = extract_patches_ref(ref_images, 8, 4, sub_size=4, sub_stride=2, grayscale=True, mean=[0.5],
                                      std=[0.25], hflip=flip)
    ref_segmentation = fold_patches_ref(ref_scores, 4, 2, (8, 8))
    torch.testing.assert_close(patches, ref_patches)
    torch.testing.assert_close(segmentation, ref_segmentation)
    (patches.square().sum() + segmentation.sum()).backward()
    (ref_patches.square().sum() + ref_segmentation.sum()).backward()
    torch.testing.assert_close(images.grad, ref_images.grad)
    torch.testing.assert_close(scores.grad, ref_scores.grad)


@pytest.mark.kernels
def test_public_functions_use_the_kernels(monkeypatch):
    assert _ext.has_kernels("cpu")

    def no_reference(*args, **kwargs):
        raise AssertionError("the reference ran instead of the kernel")

    monkeypatch.setattr(patches_module, "extract_patches_ref", no_reference)
    monkeypatch.setattr(patches_module, "fold_patches_ref", no_reference)
    extract_patches(make_images((1, 3, 8, 8), torch.float32), 4, 2)
    fold_patches(torch.zeros(1, 3, 3), 4, 2, 8)


# Bad input: (call, exception type, pattern naming the argument)
_IMG = torch.zeros(2, 3, 16, 16, dtype=torch.uint8)
BAD_EXTRACT = {
    "patch_larger": (lambda: extract_patches(_IMG, (17, 4), 2), ValueError, "size"),
    "sub_larger": (lambda: extract_patches(_IMG, 8, 2, sub_size=9, sub_stride=1), ValueError, "sub_size"),
    "stride_zero": (lambda: extract_patches(_IMG, 4, 0), ValueError, "stride"),
    "stride_negative": (lambda: extract_patches(_IMG, 4, (2, -1)), ValueError, "stride"),
    "sub_stride_zero": (lambda: extract_patches(_IMG, 8, 4, sub_size=4, sub_stride=0), ValueError,
                        "sub_stride"),
    "sub_stride_alone": (lambda: extract_patches(_IMG, 8, 4, sub_stride=2), ValueError, "sub_size"),
    "size_triple": (lambda: extract_patches(_IMG, (4, 4, 4), 2), TypeError, "size"),
    "ndim": (lambda: extract_patches(_IMG[0], 4, 2), ValueError, "images"),
    "images_dtype": (lambda: extract_patches(_IMG.int(), 4, 2), TypeError, "images"),
    "out_dtype": (lambda: extract_patches(_IMG, 4, 2, dtype=torch.int32), TypeError, "dtype"),
    "mean_length": (lambda: extract_patches(_IMG, 4, 2, mean=[0.1, 0.2]), ValueError, "mean"),
    "std_length_gray": (lambda: extract_patches(_IMG, 4, 2, grayscale=True, std=[0.1, 0.2, 0.3]), ValueError,
                        "std"),
    "std_zero": (lambda: extract_patches(_IMG, 4, 2, std=0.0), ValueError, "std"),
    "gray_channels": (lambda: extract_patches(_IMG[:, :2], 4, 2, grayscale=True), ValueError, "grayscale"),
    "hflip_shape": (lambda: extract_patches(_IMG, 4, 2, hflip=torch.zeros(3, dtype=torch.bool)), ValueError,
                    "hflip"),
    "hflip_dtype": (lambda: extract_patches(_IMG, 4, 2, hflip=torch.zeros(2)), ValueError, "hflip"),
}


@pytest.mark.parametrize("name", list(BAD_EXTRACT))
def test_extract_bad_input(name):
    call, error, pattern = BAD_EXTRACT[name]
    with pytest.raises(error, match=pattern):
        call()


_SCORES = torch.zeros(2, 3, 3)
_VALUES = torch.zeros(2, 3, 3, 1)
_MAP = torch.zeros(2, 3, 16, 16)
BAD_FOLD = {
    "ndim": (lambda: fold_patches(_SCORES[0], 4, 2, 8), ValueError, "scores"),
    "dtype": (lambda: fold_patches(_SCORES.long(), 4, 2, 8), TypeError, "scores"),
    "does_not_fit": (lambda: fold_patches(_SCORES, 4, 2, 7), ValueError, "output_size"),
    "stride_zero": (lambda: fold_patches(_SCORES, 4, 0, 8), ValueError, "stride"),
    "size_negative": (lambda: fold_patches(_SCORES, -4, 2, 8), ValueError, "size"),
    "reduce": (lambda: fold_patches(_SCORES, 4, 2, 8, reduce="max"), ValueError, "reduce"),
    "empty_grid": (lambda: fold_patches(torch.zeros(2, 0, 3), 4, 2, 8), ValueError, "scores"),
}


@pytest.mark.parametrize("name", list(BAD_FOLD))
def test_fold_bad_input(name):
    call, error, pattern = BAD_FOLD[name]
    with pytest.raises(error, match=pattern):
        call()


def _vma_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping of this process that holds ``address`` (Linux), or None."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(v, 16) for v in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


THP_AVAILABLE = sys.platform == "linux" and os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.skipif(not THP_AVAILABLE, reason="transparent huge pages are a Linux feature")
@pytest.mark.kernels
def test_large_outputs_are_advised_huge_pages_and_values_do_not_change():
    """Outputs over 32 MiB (always their own mmap) get MADV_HUGEPAGE ("hg" in VmFlags) before they are
    written; with the advice off the values are the same, bit for bit, and equal the reference's. The
    fold's CPC-AD grid also spans several parallel tasks, so rows copied from the row above meet task
    boundaries."""
    images = make_images((2, 1, 768, 768), torch.uint8)
    scores = torch.randn(16, 23, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    results, default = {}, _ext._C.huge_pages_enabled()
    for enabled in (True, False):
        with huge_pages(enabled):
            assert _ext._C.huge_pages_enabled() is enabled
            patches = extract_patches(images, 256, 128, sub_size=64, sub_stride=32, mean=[0.5], std=[0.25])
            folded = fold_patches(scores, 64, 32, (768, 768))
        if enabled:
            for out in (patches, folded):
                assert out.nbytes > 32 * 2**20
                assert "hg" in (_vma_flags(out.data_ptr() + out.nbytes // 2) or []), "no huge-page advice"
        results[enabled] = (patches, folded)
    assert _ext._C.huge_pages_enabled() is default  # restored on leaving
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    ref = extract_patches_ref(images, 256, 128, sub_size=64, sub_stride=32, mean=[0.5], std=[0.25])
    torch.testing.assert_close(results[True][0], ref)
    torch.testing.assert_close(results[True][1], fold_patches_ref(scores.double(), 64, 32, (768, 768)).float())


# The compiled ops check their arguments too (they can be called directly).
def direct_extract(**overrides):
    args = dict(images=_IMG, size=[4, 4], stride=[2, 2], sub_size=[], sub_stride=[], grayscale=False,
                mean=None, std=None, hflip=None, dtype=torch.float32)
    args.update(overrides)
    return OPS.extract_patches(*args.values())


def direct_extract_backward(**overrides):
    args = dict(grad=torch.zeros(2, 7, 7, 3, 4, 4), images_shape=[2, 3, 16, 16], images_dtype=torch.float32,
                size=[4, 4], stride=[2, 2], sub_size=[], sub_stride=[], grayscale=False, std=None, hflip=None)
    args.update(overrides)
    return OPS.extract_patches_backward(*args.values())


BAD_DIRECT = {
    "patch_larger": (lambda: direct_extract(size=[17, 4]), "size"),
    "stride_zero": (lambda: direct_extract(stride=[0, 2]), "stride"),
    "size_pair": (lambda: direct_extract(size=[4]), "size"),
    "sub_size_larger": (lambda: direct_extract(sub_size=[5, 2], sub_stride=[1, 1]), "sub_size"),
    "sub_stride_missing": (lambda: direct_extract(sub_size=[2, 2]), "sub_stride"),
    "sub_stride_negative": (lambda: direct_extract(sub_size=[2, 2], sub_stride=[1, -1]), "sub_stride"),
    "ndim": (lambda: direct_extract(images=_IMG[0]), "images"),
    "images_dtype": (lambda: direct_extract(images=_IMG.int()), "images"),
    "out_dtype": (lambda: direct_extract(dtype=torch.int64), "dtype"),
    "mean_length": (lambda: direct_extract(mean=[0.1, 0.2]), "mean"),
    "std_zero": (lambda: direct_extract(std=[1.0, 0.0, 1.0]), "std"),
    "gray_channels": (lambda: direct_extract(images=_IMG[:, :2], grayscale=True), "grayscale"),
    "hflip_shape": (lambda: direct_extract(hflip=torch.zeros(3, dtype=torch.bool)), "hflip"),
    "hflip_dtype": (lambda: direct_extract(hflip=torch.zeros(2, dtype=torch.uint8)), "hflip"),
    "backward_uint8": (lambda: direct_extract_backward(images_dtype=torch.uint8), "images_dtype"),
    "backward_grad_shape": (lambda: direct_extract_backward(grad=torch.zeros(2, 7, 7, 3, 4, 5)), "grad"),
    "fold_ndim": (lambda: OPS.fold_patches(torch.zeros(2, 3, 3), [4, 4], [2, 2], [8, 8], True), "values"),
    "fold_does_not_fit": (lambda: OPS.fold_patches(_VALUES, [4, 4], [2, 2], [7, 8], True), "output_size"),
    "fold_stride": (lambda: OPS.fold_patches(_VALUES, [4, 4], [2, -2], [8, 8], True), "stride"),
    "fold_dtype": (lambda: OPS.fold_patches(_VALUES.int(), [4, 4], [2, 2], [8, 8], True), "values"),
    "fold_backward_grid": (lambda: OPS.fold_patches_backward(_MAP, [4, 4], [2, 2], [8, 7], True),
                           "output_size"),
}


@pytest.mark.kernels
@pytest.mark.parametrize("name", list(BAD_DIRECT))
def test_compiled_ops_check_arguments(name):
    call, pattern = BAD_DIRECT[name]
    with pytest.raises(RuntimeError, match=pattern):
        call()


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_extract_matches_cpu_and_reference(name, dtype, layout):
    case = CASES[name]
    images = make_images(case[0], dtype, layout)
    size, stride, kwargs = case_kwargs(case, images.shape[0])
    cpu = extract_patches(images, size, stride, **kwargs)
    gpu_images = make_images(case[0], dtype, layout, device="cuda")
    _, _, gpu_kwargs = case_kwargs(case, images.shape[0], device="cuda")
    gpu = extract_patches(gpu_images, size, stride, **gpu_kwargs)
    ref = extract_patches_ref(gpu_images, size, stride, **gpu_kwargs)
    torch.testing.assert_close(gpu, ref)
    torch.testing.assert_close(gpu.cpu(), cpu)
    if dtype != torch.uint8 and images.shape[0] > 0:
        grad = torch.randn(cpu.shape, dtype=torch.float64).to(cpu.dtype)
        cpu_in, gpu_in = images.detach().requires_grad_(), gpu_images.detach().requires_grad_()
        (cpu_grad,) = torch.autograd.grad(extract_patches(cpu_in, size, stride, **kwargs), cpu_in, grad)
        gpu_out = extract_patches(gpu_in, size, stride, **gpu_kwargs)
        (gpu_grad,) = torch.autograd.grad(gpu_out, gpu_in, grad.cuda())
        torch.testing.assert_close(gpu_grad.cpu(), cpu_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("dtype", FLOATING, ids=str)
@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_cuda_fold_matches_cpu(name, dtype, reduce):
    shape, size, stride, output_size = FOLD_CASES[name]
    scores = torch.randn(shape[::-1], dtype=torch.float64).to(dtype).permute(*reversed(range(len(shape))))
    gpu_scores = scores.cuda().requires_grad_()
    cpu_scores = scores.clone().requires_grad_()
    gpu = fold_patches(gpu_scores, size, stride, output_size, reduce=reduce)
    cpu = fold_patches(cpu_scores, size, stride, output_size, reduce=reduce)
    torch.testing.assert_close(gpu.cpu(), cpu)
    grad = torch.randn(cpu.shape, dtype=torch.float64).to(dtype)
    (gpu_grad,) = torch.autograd.grad(gpu, gpu_scores, grad.cuda())
    (cpu_grad,) = torch.autograd.grad(cpu, cpu_scores, grad)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad)


@pytest.mark.cuda
def test_cuda_gradcheck_and_determinism():
    images = make_images((2, 3, 11, 10), torch.float64, "channels_last", device="cuda").requires_grad_()
    flip = torch.tensor([True, False], device="cuda")

    def fn(x):
        return extract_patches(x, (6, 7), (3, 2), sub_size=(3, 4), sub_stride=(2, 3), grayscale=True,
                               std=[0.3], hflip=flip)

    assert torch.autograd.gradcheck(fn, (images,))
    scores = torch.randn(2, 4, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: fold_patches(v, (4, 5), (3, 2), (14, 12)), (scores,))
    big = make_images((4, 3, 96, 96), torch.float32, device="cuda").requires_grad_()
    out = extract_patches(big, 32, 16, sub_size=8, sub_stride=4)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, big, grad, retain_graph=True)[0]
    assert torch.equal(first, torch.autograd.grad(out, big, grad)[0])


@pytest.mark.cuda
def test_cuda_extract_allocates_only_its_output():
    images = make_images((4, 1, 512, 512), torch.uint8, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = extract_patches(images, 256, 128, sub_size=64, sub_stride=32, grayscale=True, mean=[0.5],
                          std=[0.25])
    torch.cuda.synchronize()
    output_bytes = out.numel() * out.element_size()
    assert torch.cuda.max_memory_allocated() - before <= output_bytes + 1024 * 1024
