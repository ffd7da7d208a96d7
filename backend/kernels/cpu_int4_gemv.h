// The CPU int4 GEMV (cpu_int4_gemv.cpp), for the other kernels of the library that call it directly
// (cpu_decode_layers.cpp) rather than through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace kvtriton {

// x (M, K) fp32 or bf16 -> (M, N16) fp32: x times the weight packed by kernels/cpu_int4.py (N16: its rows
// padded to whole tiles of 16). form: 0 the faster form on this CPU for 3+ rows (timed once), 1 vdpbf16ps,
// 2 fp32 FMAs; every form gives the same bits.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale_zeros,
                     int64_t group_size, int64_t form = 0);

// Which form serves 3+ rows here, and the timings that chose it (for the log).
std::string int4_gemv_rows_form();

}  // namespace kvtriton
