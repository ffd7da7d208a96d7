// The LoRA addition of cpu_lora.cpp, for the other kernels of the library that call it directly
// (cpu_decode_layers.cpp) rather than through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

namespace kvtriton {

// delta (tokens, out), zeroed by the caller, += each token's adapter's (x A^T) B^T: x rows `ldx` apart, a
// (S*W, in), b_t (S*W, out) zero outside each row's columns, columns (S*W, 2) those [first, last), adapters one a token
// (0: the base model, nothing added), W = block. cpu_lora.cpp says in which order it sums.
void lora_delta_rows(const float* x, int64_t ldx, int64_t tokens, int64_t in, const float* a, const float* b_t,
                     int64_t out, const int64_t* columns, const int64_t* adapters, int64_t block, float* delta);

// TORCH_CHECKs: a, b_t and columns in that layout for inputs of `in` features, block dividing a's rows.
void check_lora_operands(const at::Tensor& a, const at::Tensor& b_t, const at::Tensor& columns, int64_t block,
                         int64_t in);

// TORCH_CHECK: token_adapters contiguous int64, `tokens` of them, each in 0 .. adapters.
void check_token_adapters(const at::Tensor& token_adapters, int64_t tokens, int64_t adapters);

}  // namespace kvtriton
