// Argument checks for the torch glue (.cpp files only; never include from a .cu file).
// Every message names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define PYA_CHECK_DIM(x, n) \
  TORCH_CHECK((x).dim() == (n), #x " must have " #n " dimensions, got shape ", (x).sizes())
#define PYA_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())
#define PYA_CHECK_SAME_DEVICE(x, y)                                                               \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", \
              (x).device(), " and ", (y).device())
#define PYA_CHECK_SHAPE(x, ...)                                                             \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ \
              "), got ", (x).sizes())
#define PYA_CHECK_CPU(x) TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got ", (x).device())
#define PYA_CHECK_CUDA(x) TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
