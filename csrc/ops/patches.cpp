// Schemas of the patch ops. extract_patches cuts (B, C, H, W) images into (sub-)patches with uint8
// scaling, BT.601 gray, per-channel (x - mean) / std and a per-image horizontal flip fused in;
// fold_patches averages (or sums) per-patch values back onto pixels. Each backward is its own op.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyanomaly, m) {
  // images (B, C, H, W) -> (B, nh, nw, C', ph, pw), or (B, nh, nw, mh, mw, C', sh, sw) when sub_size
  // and sub_stride are given (empty lists: one level).
  m.def(
      "extract_patches(Tensor images, int[] size, int[] stride, int[] sub_size, int[] sub_stride, "
      "bool grayscale, float[]? mean, float[]? std, Tensor? hflip, ScalarType dtype) -> Tensor");
  // Overlap-add of grad (the forward's output shape) back onto (B, C, H, W), in images_dtype;
  // gathered per input pixel (deterministic). Only floating images are differentiable.
  m.def(
      "extract_patches_backward(Tensor grad, SymInt[] images_shape, ScalarType images_dtype, int[] size, "
      "int[] stride, int[] sub_size, int[] sub_stride, bool grayscale, float[]? std, Tensor? hflip) -> Tensor");
  // values (B, nh, nw, C) -> (B, C, H, W): per pixel the mean (mean=True) or sum of the covering patches.
  m.def("fold_patches(Tensor values, int[] size, int[] stride, int[] output_size, bool mean) -> Tensor");
  // grad (B, C, H, W) -> (B, nh, nw, C): per patch the sum of grad (/ coverage count) over its window.
  m.def("fold_patches_backward(Tensor grad, int[] size, int[] stride, SymInt[] grid, bool mean) -> Tensor");
}
