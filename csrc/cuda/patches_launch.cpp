// CUDA glue of the patch ops: checks, device guard, current stream, the params struct, the launcher.
#include <algorithm>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "pyanomaly/check.h"
#include "pyanomaly/cuda_glue.h"
#include "pyanomaly/patches_args.h"
#include "pyanomaly/patches_params.h"

namespace pyanomaly {
namespace {

PatchGeometry to_params(const patches::ExtractGeometry& g) {
  return {g.batch, g.in_channels, g.height, g.width, g.out_channels, g.n1h, g.n1w, g.s1h,      g.s1w,
          g.n2h,   g.n2w,         g.s2h,    g.s2w,   g.ph,           g.pw,  g.grayscale};
}

FoldShape fold_shape(const patches::FoldGeometry& f) {
  return {f.batch, f.nh, f.nw, f.channels, f.size_h, f.size_w, f.stride_h, f.stride_w, f.height, f.width};
}

// Copies per-channel values into a fixed array; one value when they are all equal.
int fill_channel_values(const std::vector<double>& values, const std::vector<double>* paired, double* dst) {
  const bool uniform =
      std::all_of(values.begin(), values.end(), [&](double v) { return v == values[0]; }) &&
      (paired == nullptr || std::all_of(paired->begin(), paired->end(), [&](double v) { return v == (*paired)[0]; }));
  const int n = uniform ? 1 : static_cast<int>(values.size());
  TORCH_CHECK(n <= kPatchesMaxChannels, "per-channel mean/std on CUDA support at most ", kPatchesMaxChannels,
              " output channels, got ", values.size());
  std::copy(values.begin(), values.begin() + n, dst);
  return n;
}

const bool* flip_pointer(const std::optional<at::Tensor>& hflip, at::Tensor& holder) {
  if (!hflip.has_value()) return nullptr;
  holder = hflip->contiguous();
  return holder.const_data_ptr<bool>();
}

at::Tensor extract_patches_cuda(const at::Tensor& images, at::IntArrayRef size, at::IntArrayRef stride,
                                at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale,
                                std::optional<at::ArrayRef<double>> mean, std::optional<at::ArrayRef<double>> stdev,
                                const std::optional<at::Tensor>& hflip, at::ScalarType dtype) {
  PYA_CHECK_CUDA(images);
  const auto g = patches::check_extract(images, size, stride, sub_size, sub_stride, grayscale, hflip, dtype);
  const auto affine = patches::channel_affine(mean, stdev, g.out_channels, images.scalar_type() == at::kByte);
  const c10::cuda::CUDAGuard guard(images.device());
  auto out = at::empty(g.output_shape(), images.options().dtype(dtype));
  if (out.numel() == 0) return out;
  ExtractPatchesParams p{};
  p.geo = to_params(g);
  p.images = images.const_data_ptr();
  p.images_type = elem_type(images.scalar_type(), "images");
  for (int d = 0; d < 4; ++d) p.images_stride[d] = images.stride(d);
  p.out = out.mutable_data_ptr();
  p.out_type = elem_type(dtype, "dtype");
  at::Tensor flip;
  p.hflip = flip_pointer(hflip, flip);
  p.n_affine = fill_channel_values(affine.scale, &affine.shift, p.scale);
  std::copy(affine.shift.begin(), affine.shift.begin() + p.n_affine, p.shift);
  check_launch(launch_extract_patches(p, c10::cuda::getCurrentCUDAStream()), "pyanomaly::extract_patches");
  return out;
}

at::Tensor extract_patches_backward_cuda(const at::Tensor& grad, at::IntArrayRef images_shape,
                                         at::ScalarType images_dtype, at::IntArrayRef size, at::IntArrayRef stride,
                                         at::IntArrayRef sub_size, at::IntArrayRef sub_stride, bool grayscale,
                                         std::optional<at::ArrayRef<double>> stdev,
                                         const std::optional<at::Tensor>& hflip) {
  PYA_CHECK_CUDA(grad);
  const auto g = patches::check_extract_backward(grad, images_shape, images_dtype, size, stride, sub_size,
                                                 sub_stride, grayscale, hflip);
  const auto affine = patches::channel_affine(std::nullopt, stdev, g.out_channels, false);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto grad_images = at::empty(images_shape, grad.options().dtype(images_dtype));
  if (grad_images.numel() == 0) return grad_images;
  if (grad.numel() == 0) return grad_images.zero_();
  ExtractPatchesBackwardParams p{};
  p.geo = to_params(g);
  p.grad = grad.const_data_ptr();
  p.grad_type = elem_type(grad.scalar_type(), "grad");
  const auto strides = patches::patch_strides(g, grad);
  std::copy(strides.begin(), strides.end(), p.grad_stride);
  p.grad_images = grad_images.mutable_data_ptr();
  p.images_type = elem_type(images_dtype, "images");
  at::Tensor flip;
  p.hflip = flip_pointer(hflip, flip);
  p.n_affine = fill_channel_values(affine.scale, nullptr, p.scale);
  check_launch(launch_extract_patches_backward(p, c10::cuda::getCurrentCUDAStream()), "pyanomaly::extract_patches_backward");
  return grad_images;
}

at::Tensor fold_patches_cuda(const at::Tensor& values, at::IntArrayRef size, at::IntArrayRef stride,
                             at::IntArrayRef output_size, bool mean) {
  PYA_CHECK_CUDA(values);
  const auto f = patches::check_fold(values, size, stride, output_size);
  const c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty({f.batch, f.channels, f.height, f.width}, values.options());
  if (out.numel() == 0) return out;
  FoldPatchesParams p{};
  p.shape = fold_shape(f);
  p.type = elem_type(values.scalar_type(), "values");
  p.mean = mean;
  p.values = values.const_data_ptr();
  for (int d = 0; d < 4; ++d) p.values_stride[d] = values.stride(d);
  p.out = out.mutable_data_ptr();
  check_launch(launch_fold_patches(p, c10::cuda::getCurrentCUDAStream()), "pyanomaly::fold_patches");
  return out;
}

at::Tensor fold_patches_backward_cuda(const at::Tensor& grad, at::IntArrayRef size, at::IntArrayRef stride,
                                      at::IntArrayRef grid, bool mean) {
  PYA_CHECK_CUDA(grad);
  const auto f = patches::check_fold_backward(grad, size, stride, grid);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto grad_values = at::empty({f.batch, f.nh, f.nw, f.channels}, grad.options());
  if (grad_values.numel() == 0) return grad_values;
  FoldPatchesBackwardParams p{};
  p.shape = fold_shape(f);
  p.type = elem_type(grad.scalar_type(), "grad");
  p.mean = mean;
  p.grad = grad.const_data_ptr();
  for (int d = 0; d < 4; ++d) p.grad_stride[d] = grad.stride(d);
  p.grad_values = grad_values.mutable_data_ptr();
  check_launch(launch_fold_patches_backward(p, c10::cuda::getCurrentCUDAStream()), "pyanomaly::fold_patches_backward");
  return grad_values;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyanomaly, CUDA, m) {
  m.impl("extract_patches", &extract_patches_cuda);
  m.impl("extract_patches_backward", &extract_patches_backward_cuda);
  m.impl("fold_patches", &fold_patches_cuda);
  m.impl("fold_patches_backward", &fold_patches_backward_cuda);
}

}  // namespace pyanomaly
