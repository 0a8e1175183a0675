// Argument checks and geometry of extract_patches / fold_patches, shared by the CPU and CUDA glue
// (torch side only; never include from a .cu file).
#pragma once
#include <array>
#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "pyanomaly/check.h"

namespace pyanomaly {
namespace patches {

constexpr double kLuma[3] = {0.299, 0.587, 0.114};  // ITU-R BT.601

// Both patch levels as one geometry: output (B, n1h, n1w, n2h, n2w, C', ph, pw) reads pixel
// y = i1*s1h + i2*s2h + py, x = j1*s1w + j2*s2w + px of the (optionally flipped) image.
// One level is n2 = 1, s2 = 1.
struct ExtractGeometry {
  int64_t batch, in_channels, height, width, out_channels;
  int64_t n1h, n1w, s1h, s1w;
  int64_t n2h, n2w, s2h, s2w;
  int64_t ph, pw;
  bool two_level, grayscale;

  std::vector<int64_t> output_shape() const {
    if (two_level) return {batch, n1h, n1w, n2h, n2w, out_channels, ph, pw};
    return {batch, n1h, n1w, out_channels, ph, pw};
  }
  int64_t output_numel() const { return batch * n1h * n1w * n2h * n2w * out_channels * ph * pw; }
};

// Strides of a tensor of the forward's output shape, as (b, i1, j1, i2, j2, c, py, px); one level has
// no i2/j2 dims (they are always 0, so their stride does not matter).
inline std::array<int64_t, 8> patch_strides(const ExtractGeometry& g, const at::Tensor& t) {
  const auto s = t.strides();
  if (g.two_level) return {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]};
  return {s[0], s[1], s[2], 0, 0, s[3], s[4], s[5]};
}

inline void check_pair(at::IntArrayRef value, const char* name) {
  TORCH_CHECK(value.size() == 2, name, " must be an (h, w) pair, got ", value);
  TORCH_CHECK(value[0] > 0 && value[1] > 0, name, " must be positive, got ", value);
}

inline bool is_floating_io(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline ExtractGeometry extract_geometry(at::IntArrayRef images_shape, at::IntArrayRef size, at::IntArrayRef stride,
                                        at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale) {
  TORCH_CHECK(images_shape.size() == 4, "images must have shape (B, C, H, W), got shape ", images_shape);
  check_pair(size, "size");
  check_pair(stride, "stride");
  ExtractGeometry g{};
  g.batch = images_shape[0];
  g.in_channels = images_shape[1];
  g.height = images_shape[2];
  g.width = images_shape[3];
  TORCH_CHECK(g.in_channels > 0, "images must have at least one channel, got shape ", images_shape);
  TORCH_CHECK(size[0] <= g.height && size[1] <= g.width, "size ", size, " must not exceed the images' (H, W) = (",
              g.height, ", ", g.width, ")");
  TORCH_CHECK(!grayscale || g.in_channels == 1 || g.in_channels == 3,
              "grayscale=True needs images with 1 or 3 channels, got ", g.in_channels);
  g.grayscale = grayscale && g.in_channels == 3;
  g.out_channels = grayscale ? 1 : g.in_channels;
  g.n1h = (g.height - size[0]) / stride[0] + 1;
  g.n1w = (g.width - size[1]) / stride[1] + 1;
  g.s1h = stride[0];
  g.s1w = stride[1];
  TORCH_CHECK(sub_size.size() == sub_stride.size(), "sub_size and sub_stride must be given together, got ", sub_size,
              " and ", sub_stride);
  g.two_level = !sub_size.empty();
  if (g.two_level) {
    check_pair(sub_size, "sub_size");
    check_pair(sub_stride, "sub_stride");
    TORCH_CHECK(sub_size[0] <= size[0] && sub_size[1] <= size[1], "sub_size ", sub_size, " must not exceed size ",
                size);
    g.n2h = (size[0] - sub_size[0]) / sub_stride[0] + 1;
    g.n2w = (size[1] - sub_size[1]) / sub_stride[1] + 1;
    g.s2h = sub_stride[0];
    g.s2w = sub_stride[1];
    g.ph = sub_size[0];
    g.pw = sub_size[1];
  } else {
    g.n2h = g.n2w = g.s2h = g.s2w = 1;
    g.ph = size[0];
    g.pw = size[1];
  }
  return g;
}

// One value per output channel (a single value is broadcast); nullopt when absent.
inline std::vector<double> channel_values(const std::optional<at::ArrayRef<double>>& values, const char* name,
                                          int64_t channels, double fallback) {
  if (!values.has_value()) return std::vector<double>(channels, fallback);
  const auto v = *values;
  TORCH_CHECK(v.size() == static_cast<size_t>(channels) || v.size() == 1, name,
              " must have one value per output channel (", channels, "), got ", v.size());
  if (v.size() == 1) return std::vector<double>(channels, v[0]);
  return std::vector<double>(v.begin(), v.end());
}

// out = raw * scale[c] + shift[c] with raw the (luma of the) input value; scale folds 1/255 and 1/std.
struct ChannelAffine {
  std::vector<double> scale, shift;
};

inline ChannelAffine channel_affine(const std::optional<at::ArrayRef<double>>& mean,
                                    const std::optional<at::ArrayRef<double>>& std, int64_t channels,
                                    bool from_uint8) {
  const auto m = channel_values(mean, "mean", channels, 0.0);
  const auto s = channel_values(std, "std", channels, 1.0);
  ChannelAffine a;
  for (int64_t c = 0; c < channels; ++c) {
    TORCH_CHECK(s[c] != 0.0, "std must not contain zeros, got ", at::ArrayRef<double>(s));
    a.scale.push_back((from_uint8 ? 1.0 / 255.0 : 1.0) / s[c]);
    a.shift.push_back(-m[c] / s[c]);
  }
  return a;
}

inline void check_hflip(const std::optional<at::Tensor>& hflip, int64_t batch, const at::Device& device) {
  if (!hflip.has_value()) return;
  const auto& f = *hflip;
  TORCH_CHECK(f.scalar_type() == at::kBool && f.dim() == 1 && f.size(0) == batch,
              "hflip must be a bool tensor of shape (", batch, "), got ", f.scalar_type(), " of shape ", f.sizes());
  TORCH_CHECK(f.device() == device, "hflip must be on the images' device ", device, ", got ", f.device());
}

inline void check_images(const at::Tensor& images) {
  const auto t = images.scalar_type();
  TORCH_CHECK(t == at::kByte || is_floating_io(t),
              "images must be uint8, float16, bfloat16, float32 or float64, got ", t);
}

inline void check_output_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(is_floating_io(dtype), name, " must be float16, bfloat16, float32 or float64, got ", dtype);
}

// fold_patches: values (B, nh, nw, C) -> (B, C, H, W).
struct FoldGeometry {
  int64_t batch, nh, nw, channels, size_h, size_w, stride_h, stride_w, height, width;
};

inline FoldGeometry fold_geometry(int64_t batch, int64_t nh, int64_t nw, int64_t channels, at::IntArrayRef size,
                                  at::IntArrayRef stride, at::IntArrayRef output_size) {
  check_pair(size, "size");
  check_pair(stride, "stride");
  check_pair(output_size, "output_size");
  TORCH_CHECK(nh > 0 && nw > 0, "values must have at least one patch along each axis, got grid (", nh, ", ", nw,
              ")");
  TORCH_CHECK((nh - 1) * stride[0] + size[0] <= output_size[0] && (nw - 1) * stride[1] + size[1] <= output_size[1],
              "a grid of (", nh, ", ", nw, ") patches of size ", size, " at stride ", stride,
              " does not fit in output_size ", output_size);
  return {batch, nh, nw, channels, size[0], size[1], stride[0], stride[1], output_size[0], output_size[1]};
}

inline int64_t first_covering(int64_t y, int64_t size, int64_t stride) {  // smallest i with i*stride + size > y
  return y - size + 1 <= 0 ? 0 : (y - size + stride) / stride;
}

// Full checks of each op's arguments (device checks are left to the glue).
inline ExtractGeometry check_extract(const at::Tensor& images, at::IntArrayRef size, at::IntArrayRef stride,
                                     at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale,
                                     const std::optional<at::Tensor>& hflip, at::ScalarType dtype) {
  TORCH_CHECK(images.dim() == 4, "images must have shape (B, C, H, W), got shape ", images.sizes());
  check_images(images);
  check_output_dtype(dtype, "dtype");
  const auto g = extract_geometry(images.sizes(), size, stride, sub_size, sub_stride, grayscale);
  check_hflip(hflip, g.batch, images.device());
  return g;
}

inline ExtractGeometry check_extract_backward(const at::Tensor& grad, at::IntArrayRef images_shape,
                                              at::ScalarType images_dtype, at::IntArrayRef size,
                                              at::IntArrayRef stride, at::IntArrayRef sub_size,
                                              at::IntArrayRef sub_stride, bool grayscale,
                                              const std::optional<at::Tensor>& hflip) {
  TORCH_CHECK(is_floating_io(images_dtype),
              "images_dtype must be float16, bfloat16, float32 or float64 (only floating images are "
              "differentiable), got ", images_dtype);
  check_output_dtype(grad.scalar_type(), "grad's dtype");
  const auto g = extract_geometry(images_shape, size, stride, sub_size, sub_stride, grayscale);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(g.output_shape()), "grad must have the output's shape ",
              at::IntArrayRef(g.output_shape()), ", got ", grad.sizes());
  check_hflip(hflip, g.batch, grad.device());
  return g;
}

inline FoldGeometry check_fold(const at::Tensor& values, at::IntArrayRef size, at::IntArrayRef stride,
                               at::IntArrayRef output_size) {
  TORCH_CHECK(values.dim() == 4, "values must have shape (B, nh, nw, C), got shape ", values.sizes());
  check_output_dtype(values.scalar_type(), "values' dtype");
  return fold_geometry(values.size(0), values.size(1), values.size(2), values.size(3), size, stride, output_size);
}

inline FoldGeometry check_fold_backward(const at::Tensor& grad, at::IntArrayRef size, at::IntArrayRef stride,
                                        at::IntArrayRef grid) {
  TORCH_CHECK(grad.dim() == 4, "grad must have shape (B, C, H, W), got shape ", grad.sizes());
  check_output_dtype(grad.scalar_type(), "grad's dtype");
  check_pair(grid, "grid");
  return fold_geometry(grad.size(0), grid[0], grid[1], grad.size(1), size, stride, {grad.size(2), grad.size(3)});
}

}  // namespace patches
}  // namespace pyanomaly
