"""INT8 weight-only linear layers: int8 weights with one fp scale per output channel (symmetric).

Decode is bandwidth-bound: each step reads every weight once, so int8
weights halve (vs bf16) or quarter (vs fp32) the bytes per step while the
activations stay in floating point. The same quantization (`quantize_per_channel`)
feeds the ONNX graph's DequantizeLinear initializers (build/onnx_int8.py), so
every runner computes with identical int8 weights.

On the CPU, torch's weight-only kernel `_weight_int8pack_mm` is the fast path
(measured in benchmarks/int8_vs_fp32.py); it wants bf16 activations there, so
the layer computes in bf16 and returns the caller's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (int8 (out, in), scale (out,) fp32) with weight ~= q * scale[:, None].

    Symmetric, range [-127, 127] (not -128) so that negation is exact; an all-zero row gets scale 1.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


class Int8Linear(nn.Module):
    """Drop-in for nn.Linear (no bias: the Llama core's projections have none, except optional qkv bias)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,) fp32
        self.register_buffer("bias", bias)
        self._use_pack_mm = qweight.device.type == "cpu"
        self.register_buffer("_scale_bf16", scale.to(torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        if self._use_pack_mm:
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self._scale_bf16)  # (M, out)
        else:
            # GPU: correct but not yet faster (the dequantized copy is materialised each call); a fused
            # int8-weight GEMM kernel is future work.
            out = x2 @ (self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]).T
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """(out, in) fp32: what the layer multiplies by, for tests and for error reports."""
        return self.qweight.float() * self.scale[:, None]


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every nn.Linear in `model` by an Int8Linear, in place; returns the replaced names.

    A Linear sharing its weight with an embedding (tied lm_head) is quantized as
    its own copy: the embedding keeps its float table (a Gather reads only N rows).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name not in skip:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, Int8Linear.from_linear(module))
            replaced.append(name)
    return replaced
