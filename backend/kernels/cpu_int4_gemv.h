// The CPU int4 GEMV (cpu_int4_gemv.cpp), for the other kernels of the library that call it directly
// (cpu_decode_layers.cpp) rather than through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace kvtriton {

// x (M, K) fp32 or bf16 -> (M, N16) fp32: x times the weight packed by kernels/cpu_int4.py (N16: its rows
// padded to whole tiles of 16).
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zeros,
                     int64_t group_size);

}  // namespace kvtriton
