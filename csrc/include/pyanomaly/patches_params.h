// Parameters and launchers of the CUDA patch kernels (shared by csrc/cuda/patches.cu and its glue).
#pragma once
#include <cstdint>

#include <cuda_runtime_api.h>

#include "pyanomaly/dtype.h"

namespace pyanomaly {

constexpr int kPatchesMaxChannels = 64;  // per-channel scale/shift held in the params struct

// Both patch levels as one geometry: output (B, n1h, n1w, n2h, n2w, C', ph, pw) reads pixel
// y = i1*s1h + i2*s2h + py, x = j1*s1w + j2*s2w + px of the (optionally flipped) image.
// One level is n2 = 1, s2 = 1.
struct PatchGeometry {
  int64_t batch, in_channels, height, width, out_channels;
  int64_t n1h, n1w, s1h, s1w;
  int64_t n2h, n2w, s2h, s2w;
  int64_t ph, pw;
  bool grayscale;  // 3 channels -> one BT.601 luma channel
};

struct ExtractPatchesParams {
  PatchGeometry geo;
  const void* images;  // (B, C, H, W), any strides
  ElemType images_type;
  int64_t images_stride[4];
  void* out;  // contiguous, the geometry's output shape
  ElemType out_type;
  const bool* hflip;  // (B,) or nullptr
  int n_affine;       // 1 (shared) or out_channels
  double scale[kPatchesMaxChannels];  // out = raw * scale[c] + shift[c]
  double shift[kPatchesMaxChannels];
};

struct ExtractPatchesBackwardParams {
  PatchGeometry geo;
  const void* grad;  // the forward's output shape, any strides
  ElemType grad_type;
  int64_t grad_stride[8];  // (b, i1, j1, i2, j2, c, py, px)
  void* grad_images;       // contiguous (B, C, H, W)
  ElemType images_type;
  const bool* hflip;  // (B,) or nullptr
  int n_affine;
  double scale[kPatchesMaxChannels];
};

// fold_patches: a (nh, nw) grid of size x size patches at stride, on an (H, W) map.
struct FoldShape {
  int64_t batch, nh, nw, channels, size_h, size_w, stride_h, stride_w, height, width;
};

struct FoldPatchesParams {
  FoldShape shape;
  ElemType type;
  bool mean;
  const void* values;  // forward: (B, nh, nw, C), any strides
  int64_t values_stride[4];
  void* out;  // forward: contiguous (B, C, H, W)
};

struct FoldPatchesBackwardParams {
  FoldShape shape;
  ElemType type;
  bool mean;
  const void* grad;  // (B, C, H, W), any strides
  int64_t grad_stride[4];
  void* grad_values;  // contiguous (B, nh, nw, C)
};

cudaError_t launch_extract_patches(const ExtractPatchesParams& params, cudaStream_t stream);
cudaError_t launch_extract_patches_backward(const ExtractPatchesBackwardParams& params, cudaStream_t stream);
cudaError_t launch_fold_patches(const FoldPatchesParams& params, cudaStream_t stream);
cudaError_t launch_fold_patches_backward(const FoldPatchesBackwardParams& params, cudaStream_t stream);

}  // namespace pyanomaly
