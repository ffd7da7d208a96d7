"""A vocabulary head's product written in fp32 (the sampler's and logprobs' precision) by cuBLAS."""

from __future__ import annotations

import torch

# torch.mm(a, b, out_dtype=torch.float32) of 16-bit CUDA tensors (aten::mm.dtype, torch >= 2.8).
MM_WRITES_FP32 = "dtype" in torch.ops.aten.mm.overloads()


def writes_fp32(hidden: torch.Tensor) -> bool:
    """Whether fp32_logits serves this input: 16-bit, on CUDA, with a torch that has the product."""
    return hidden.is_cuda and MM_WRITES_FP32 and hidden.dtype in (torch.bfloat16, torch.float16)


def fp32_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden (M, H) @ weight (V, H)^T -> (M, V) fp32 from cuBLAS's fp32 accumulator, as the fused decode kernels'
    head writes it (llama_decode.rms_norm_linear's out_dtype): the logits are not rounded to 16 bits first, and
    no conversion kernel follows (64 rows of a 49,152-token vocabulary: 19 MB of traffic). See writes_fp32."""
    return torch.mm(hidden, weight.T, out_dtype=torch.float32)
