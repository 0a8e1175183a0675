// CPU kernels of the patch ops. extract_patches writes one contiguous px row per task, reading the
// images through their four strides; its backward gathers, per input pixel, every patch element that
// read it. fold_patches is computed per output pixel, its backward per patch. No atomics anywhere.
#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pyanomaly/check.h"
#include "pyanomaly/cpu_isa.h"
#include "pyanomaly/huge_pages.h"
#include "pyanomaly/patches_args.h"

namespace pyanomaly {
namespace {

using patches::ExtractGeometry;
using patches::FoldGeometry;
using patches::first_covering;
using patches::kLuma;

constexpr int64_t kGrainElements = 32768;  // elements per parallel task, roughly

template <typename... T>
using acc_for = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

template <typename acc_t, typename T>
inline acc_t load(const T& v) {
  return static_cast<acc_t>(v);
}

// dst[px] = src[px * step] * scale + shift. The contiguous (step 1) and mirrored (step -1) rows, the
// cases of every NCHW image, get loops of their own that the compiler vectorises.
template <typename in_t, typename out_t, typename acc_t>
PYA_INLINE void affine_row(const in_t* __restrict src, int64_t step, out_t* __restrict dst, int64_t n, acc_t scale,
                           acc_t shift) {
  if (step == 1) {
#pragma omp simd
    for (int64_t px = 0; px < n; ++px) dst[px] = static_cast<out_t>(load<acc_t>(src[px]) * scale + shift);
  } else if (step == -1) {
    const in_t* __restrict last = src - (n - 1);
#pragma omp simd
    for (int64_t px = 0; px < n; ++px) dst[px] = static_cast<out_t>(load<acc_t>(last[n - 1 - px]) * scale + shift);
  } else {
    for (int64_t px = 0; px < n; ++px) dst[px] = static_cast<out_t>(load<acc_t>(src[px * step]) * scale + shift);
  }
}

// dst[px] = luma(src[px * step] over 3 channels) * scale + shift
template <typename in_t, typename out_t, typename acc_t>
PYA_INLINE void luma_row(const in_t* src, int64_t channel_step, int64_t step, out_t* __restrict dst, int64_t n,
                         acc_t scale, acc_t shift) {
  const acc_t wr = kLuma[0], wg = kLuma[1], wb = kLuma[2];
  const in_t* __restrict r = src;
  const in_t* __restrict g = src + channel_step;
  const in_t* __restrict b = src + 2 * channel_step;
  if (step == 1 || step == -1) {  // contiguous rows, read forwards or mirrored: vectorisable
#pragma omp simd
    for (int64_t px = 0; px < n; ++px) {
      const int64_t o = step == 1 ? px : -px;
      const acc_t raw = wr * load<acc_t>(r[o]) + wg * load<acc_t>(g[o]) + wb * load<acc_t>(b[o]);
      dst[px] = static_cast<out_t>(raw * scale + shift);
    }
  } else {
    for (int64_t px = 0; px < n; ++px) {
      const int64_t o = px * step;
      const acc_t raw = wr * load<acc_t>(r[o]) + wg * load<acc_t>(g[o]) + wb * load<acc_t>(b[o]);
      dst[px] = static_cast<out_t>(raw * scale + shift);
    }
  }
}

// Sub-patches [begin, end) of the flat (b, i1, j1, i2, j2) order: each writes its (C', ph, pw) block of
// the output, one contiguous pw-row at a time (the index arithmetic once per sub-patch, not per row).
template <typename in_t, typename out_t, typename acc_t>
PYA_CPU_CLONES void extract_units(const ExtractGeometry& g, const in_t* img, std::array<int64_t, 4> strides,
                                  const acc_t* scale, const acc_t* shift, const bool* flip, out_t* out0, int64_t begin,
                                  int64_t end) {
  const auto [sb, sc, sh, sw] = strides;
  const int64_t unit_numel = g.out_channels * g.ph * g.pw;
  for (int64_t unit = begin; unit < end; ++unit) {
    int64_t t = unit;
    const int64_t j2 = t % g.n2w;
    t /= g.n2w;
    const int64_t i2 = t % g.n2h;
    t /= g.n2h;
    const int64_t j1 = t % g.n1w;
    t /= g.n1w;
    const int64_t i1 = t % g.n1h;
    const int64_t b = t / g.n1h;
    const int64_t y0 = i1 * g.s1h + i2 * g.s2h;
    const int64_t x0 = j1 * g.s1w + j2 * g.s2w;
    const bool flipped = flip != nullptr && flip[b];
    const in_t* origin = img + b * sb + y0 * sh + (flipped ? g.width - 1 - x0 : x0) * sw;
    const int64_t step = flipped ? -sw : sw;
    out_t* dst = out0 + unit * unit_numel;
    for (int64_t c = 0; c < g.out_channels; ++c) {
      for (int64_t py = 0; py < g.ph; ++py, dst += g.pw) {
        const in_t* src = origin + py * sh;
        if (g.grayscale) {
          luma_row<in_t, out_t, acc_t>(src, sc, step, dst, g.pw, scale[0], shift[0]);
        } else {
          affine_row<in_t, out_t, acc_t>(src + c * sc, step, dst, g.pw, scale[c], shift[c]);
        }
      }
    }
  }
}

template <typename in_t, typename out_t>
void extract_forward_kernel(const ExtractGeometry& g, const at::Tensor& images, const patches::ChannelAffine& affine,
                            const bool* flip, at::Tensor& out) {
  using acc_t = acc_for<out_t>;
  const in_t* img = images.const_data_ptr<in_t>();
  const std::array<int64_t, 4> strides = {images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  const std::vector<acc_t> scale(affine.scale.begin(), affine.scale.end());
  const std::vector<acc_t> shift(affine.shift.begin(), affine.shift.end());
  out_t* out0 = out.mutable_data_ptr<out_t>();
  const int64_t unit_numel = g.out_channels * g.ph * g.pw;
  const int64_t units = g.output_numel() / unit_numel;
  at::parallel_for(0, units, std::max<int64_t>(1, kGrainElements / unit_numel), [&](int64_t begin, int64_t end) {
    extract_units<in_t, out_t, acc_t>(g, img, strides, scale.data(), shift.data(), flip, out0, begin, end);
  });
}

at::Tensor extract_patches_cpu(const at::Tensor& images, at::IntArrayRef size, at::IntArrayRef stride,
                               at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale,
                               std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> stdev,
                               const std::optional<at::Tensor>& hflip, at::ScalarType dtype) {
  PYA_CHECK_CPU(images);
  const auto g = patches::check_extract(images, size, stride, sub_size, sub_stride, grayscale, hflip, dtype);
  const auto affine = patches::channel_affine(mean, stdev, g.out_channels, images.scalar_type() == at::kByte);
  auto out = at::empty(g.output_shape(), images.options().dtype(dtype));
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  const at::Tensor flip = hflip.has_value() ? hflip->contiguous() : at::Tensor();
  const bool* flip_ptr = flip.defined() ? flip.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "extract_patches", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "extract_patches", [&] {
      extract_forward_kernel<in_t, scalar_t>(g, images, affine, flip_ptr, out);
    });
  });
  return out;
}

// For every coordinate 0..extent-1 along one axis, the offsets (through the patch tensor's strides
// st1, st2, stp) of the patch elements (i1, i2, p) that read it, in CSR form.
struct AxisTaps {
  std::vector<int64_t> start, offset;
};

AxisTaps axis_taps(int64_t extent, int64_t n1, int64_t s1, int64_t n2, int64_t s2, int64_t p, int64_t st1,
                   int64_t st2, int64_t stp) {
  AxisTaps taps;
  taps.start.reserve(extent + 1);
  taps.start.push_back(0);
  const int64_t span = (n2 - 1) * s2 + p;  // the part of a level-1 patch the sub-patches read
  for (int64_t y = 0; y < extent; ++y) {
    const int64_t i1_last = std::min(n1 - 1, y / s1);
    for (int64_t i1 = first_covering(y, span, s1); i1 <= i1_last; ++i1) {
      const int64_t r = y - i1 * s1;
      const int64_t i2_last = std::min(n2 - 1, r / s2);
      for (int64_t i2 = first_covering(r, p, s2); i2 <= i2_last; ++i2) {
        taps.offset.push_back(i1 * st1 + i2 * st2 + (r - i2 * s2) * stp);
      }
    }
    taps.start.push_back(static_cast<int64_t>(taps.offset.size()));
  }
  return taps;
}

template <typename grad_t, typename in_t>
void extract_backward_kernel(const ExtractGeometry& g, const at::Tensor& grad, const std::vector<double>& scale,
                             const bool* flip, at::Tensor& grad_images) {
  using acc_t = acc_for<grad_t, in_t>;
  const auto gs = patches::patch_strides(g, grad);
  const AxisTaps ty = axis_taps(g.height, g.n1h, g.s1h, g.n2h, g.s2h, g.ph, gs[1], gs[3], gs[6]);
  const AxisTaps tx = axis_taps(g.width, g.n1w, g.s1w, g.n2w, g.s2w, g.pw, gs[2], gs[4], gs[7]);
  const grad_t* grad0 = grad.const_data_ptr<grad_t>();
  in_t* out0 = grad_images.mutable_data_ptr<in_t>();  // contiguous (B, C, H, W)
  const int64_t height = g.height, width = g.width, plane = height * width;
  const int64_t rows = g.batch * g.out_channels * height;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / (4 * width)), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (b, c', y)
      const int64_t y = row % height;
      const int64_t c = (row / height) % g.out_channels;
      const int64_t b = row / (height * g.out_channels);
      const bool flipped = flip != nullptr && flip[b];
      const grad_t* base = grad0 + b * gs[0] + c * gs[5];
      const int64_t* oy_begin = ty.offset.data() + ty.start[y];
      const int64_t* oy_end = ty.offset.data() + ty.start[y + 1];
      const int64_t in_channel0 = g.grayscale ? 0 : c;
      in_t* dst = out0 + (b * g.in_channels + in_channel0) * plane + y * width;
      for (int64_t x = 0; x < width; ++x) {
        const int64_t xo = flipped ? width - 1 - x : x;  // the output column that read pixel x
        const int64_t* ox_begin = tx.offset.data() + tx.start[xo];
        const int64_t* ox_end = tx.offset.data() + tx.start[xo + 1];
        acc_t sum = 0;
        for (const int64_t* oy = oy_begin; oy != oy_end; ++oy) {
          for (const int64_t* ox = ox_begin; ox != ox_end; ++ox) sum += load<acc_t>(base[*oy + *ox]);
        }
        if (g.grayscale) {
          for (int k = 0; k < 3; ++k) dst[k * plane + x] = static_cast<in_t>(sum * static_cast<acc_t>(scale[0] * kLuma[k]));
        } else {
          dst[x] = static_cast<in_t>(sum * static_cast<acc_t>(scale[c]));
        }
      }
    }
  });
}

at::Tensor extract_patches_backward_cpu(const at::Tensor& grad, at::IntArrayRef images_shape,
                                        at::ScalarType images_dtype, at::IntArrayRef size, at::IntArrayRef stride,
                                        at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale,
                                        std::optional<at::ArrayRef<double>> stdev,
                                        const std::optional<at::Tensor>& hflip) {
  PYA_CHECK_CPU(grad);
  const auto g = patches::check_extract_backward(grad, images_shape, images_dtype, size, stride, sub_size,
                                                 sub_stride, grayscale, hflip);
  const auto affine = patches::channel_affine(std::nullopt, stdev, g.out_channels, false);
  auto grad_images = at::empty(images_shape, grad.options().dtype(images_dtype));
  if (grad_images.numel() == 0) return grad_images;
  if (grad.numel() == 0) return grad_images.zero_();
  advise_huge_pages(grad_images.data_ptr(), grad_images.nbytes());
  const at::Tensor flip = hflip.has_value() ? hflip->contiguous() : at::Tensor();
  const bool* flip_ptr = flip.defined() ? flip.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "extract_patches_backward", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images_dtype, "extract_patches_backward", [&] {
      extract_backward_kernel<grad_t, scalar_t>(g, grad, affine.scale, flip_ptr, grad_images);
    });
  });
  return grad_images;
}

// A run [x_begin, x_end) of output columns covered by the same patch columns j_first .. j_first + taps - 1.
struct FoldSegment {
  int64_t x_begin, x_end, j_first, taps;
};

// Output rows [begin, end) of the flat (b, c, y) order. A row is constant on each segment: per row the
// covering patch rows' values are summed per patch column (increasing i), then per segment over its
// columns in increasing j (the order of a plain per-pixel loop), and the segment is filled with it.
// Consecutive rows covered by the same patch rows are equal, so such a row is a copy of the one above
// it (still in cache): only one row per run of rows is computed, and the kernel runs at store speed.
template <typename scalar_t, typename acc_t>
PYA_CPU_CLONES void fold_rows(const FoldGeometry& f, const scalar_t* values0, std::array<int64_t, 4> strides,
                              const FoldSegment* segments, int64_t n_segments, bool mean, scalar_t* out0,
                              int64_t begin, int64_t end) {
  const auto [vb, vi, vj, vc] = strides;
  std::vector<acc_t> column_sum(f.nw, acc_t(0));
  int64_t above_first = -1, above_last = -1;  // covering patch rows of the row above (none at begin)
  for (int64_t row = begin; row < end; ++row) {
    const int64_t y = row % f.height;
    const int64_t c = (row / f.height) % f.channels;
    const int64_t b = row / (f.height * f.channels);
    const int64_t i_first = first_covering(y, f.size_h, f.stride_h);
    const int64_t i_last = std::min(f.nh - 1, y / f.stride_h);
    scalar_t* dst = out0 + row * f.width;
    const bool same_as_above = y > 0 && i_first == above_first && i_last == above_last;  // same (b, c) too
    above_first = i_first;
    above_last = i_last;
    if (same_as_above) {
      std::copy(dst - f.width, dst, dst);
      continue;
    }
    const scalar_t* src = values0 + b * vb + c * vc;
    for (int64_t j = 0; j < f.nw; ++j) {
      acc_t sum = 0;
      for (int64_t i = i_first; i <= i_last; ++i) sum += load<acc_t>(src[i * vi + j * vj]);
      column_sum[j] = sum;
    }
    const int64_t rows_covering = std::max<int64_t>(0, i_last - i_first + 1);
    for (int64_t s = 0; s < n_segments; ++s) {
      const FoldSegment& seg = segments[s];
      acc_t sum = 0;
      for (int64_t t = 0; t < seg.taps; ++t) sum += column_sum[seg.j_first + t];
      const int64_t count = rows_covering * seg.taps;
      const acc_t value = count == 0 ? acc_t(0) : (mean ? sum / static_cast<acc_t>(count) : sum);
      std::fill(dst + seg.x_begin, dst + seg.x_end, static_cast<scalar_t>(value));
    }
  }
}

template <typename scalar_t>
void fold_forward_kernel(const FoldGeometry& f, const at::Tensor& values, bool mean, at::Tensor& out) {
  using acc_t = acc_for<scalar_t>;
  std::vector<FoldSegment> segments;  // runs of x with the same covering patch columns
  for (int64_t x = 0; x < f.width; ++x) {
    const int64_t j_first = std::min(first_covering(x, f.size_w, f.stride_w), f.nw);
    const int64_t taps = std::max<int64_t>(0, std::min(f.nw - 1, x / f.stride_w) - j_first + 1);
    if (!segments.empty() && segments.back().j_first == j_first && segments.back().taps == taps) {
      segments.back().x_end = x + 1;
    } else {
      segments.push_back({x, x + 1, j_first, taps});
    }
  }
  const std::array<int64_t, 4> strides = {values.stride(0), values.stride(1), values.stride(2), values.stride(3)};
  const scalar_t* values0 = values.const_data_ptr<scalar_t>();
  scalar_t* out0 = out.mutable_data_ptr<scalar_t>();
  const int64_t rows = f.batch * f.channels * f.height;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / f.width), [&](int64_t begin, int64_t end) {
    fold_rows<scalar_t, acc_t>(f, values0, strides, segments.data(), static_cast<int64_t>(segments.size()), mean,
                               out0, begin, end);
  });
}

at::Tensor fold_patches_cpu(const at::Tensor& values, at::IntArrayRef size, at::IntArrayRef stride,
                            at::IntArrayRef output_size, bool mean) {
  PYA_CHECK_CPU(values);
  const auto f = patches::check_fold(values, size, stride, output_size);
  auto out = at::empty({f.batch, f.channels, f.height, f.width}, values.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "fold_patches",
                                  [&] { fold_forward_kernel<scalar_t>(f, values, mean, out); });
  return out;
}

// How many patches cover each coordinate along one axis.
std::vector<int64_t> coverage(int64_t extent, int64_t n, int64_t size, int64_t stride) {
  std::vector<int64_t> count(extent);
  for (int64_t y = 0; y < extent; ++y) {
    count[y] = std::max<int64_t>(0, std::min(n - 1, y / stride) - first_covering(y, size, stride) + 1);
  }
  return count;
}

template <typename scalar_t>
void fold_backward_kernel(const FoldGeometry& f, const at::Tensor& grad, bool mean, at::Tensor& grad_values) {
  using acc_t = acc_for<scalar_t>;
  const auto cy = coverage(f.height, f.nh, f.size_h, f.stride_h);
  const auto cx = coverage(f.width, f.nw, f.size_w, f.stride_w);
  const scalar_t* grad0 = grad.const_data_ptr<scalar_t>();
  const int64_t gb = grad.stride(0), gc = grad.stride(1), gy = grad.stride(2), gx = grad.stride(3);
  scalar_t* out0 = grad_values.mutable_data_ptr<scalar_t>();  // contiguous (B, nh, nw, C)
  const int64_t patches = f.batch * f.nh * f.nw;
  const int64_t work = std::max<int64_t>(1, f.channels * f.size_h * f.size_w);
  at::parallel_for(0, patches, std::max<int64_t>(1, kGrainElements / work), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {  // p = (b, i, j)
      const int64_t j = p % f.nw;
      const int64_t i = (p / f.nw) % f.nh;
      const int64_t b = p / (f.nw * f.nh);
      const int64_t y0 = i * f.stride_h, x0 = j * f.stride_w;
      for (int64_t c = 0; c < f.channels; ++c) {
        const scalar_t* src = grad0 + b * gb + c * gc;
        acc_t sum = 0;
        for (int64_t y = y0; y < y0 + f.size_h; ++y) {
          for (int64_t x = x0; x < x0 + f.size_w; ++x) {
            const acc_t v = load<acc_t>(src[y * gy + x * gx]);
            sum += mean ? v / static_cast<acc_t>(cy[y] * cx[x]) : v;
          }
        }
        out0[p * f.channels + c] = static_cast<scalar_t>(sum);
      }
    }
  });
}

at::Tensor fold_patches_backward_cpu(const at::Tensor& grad, at::IntArrayRef size, at::IntArrayRef stride,
                                     at::IntArrayRef grid, bool mean) {
  PYA_CHECK_CPU(grad);
  const auto f = patches::check_fold_backward(grad, size, stride, grid);
  auto grad_values = at::empty({f.batch, f.nh, f.nw, f.channels}, grad.options());
  if (grad_values.numel() == 0) return grad_values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fold_patches_backward",
                                  [&] { fold_backward_kernel<scalar_t>(f, grad, mean, grad_values); });
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyanomaly, CPU, m) {
  m.impl("extract_patches", &extract_patches_cpu);
  m.impl("extract_patches_backward", &extract_patches_backward_cpu);
  m.impl("fold_patches", &fold_patches_cpu);
  m.impl("fold_patches_backward", &fold_patches_backward_cpu);
}

}  // namespace pyanomaly
