"""INT8 weight-only linear layers: int8 weights, symmetric, one fp scale per output channel or per group.

Per channel (`quantize_per_channel`, from float weights): the same numbers feed the ONNX graph's
DequantizeLinear initializers (build/onnx_int8.py), so every runner computes with identical int8
weights. On the CPU torch's `_weight_int8pack_mm` is the fast path (measured in
benchmarks/int8_vs_fp32.py); it wants bf16 activations there, so the layer computes in bf16 and
returns the caller's dtype.

Per group (GGUF Q8_0: w = d * q per block of 32, taken as stored): no PyTorch CPU kernel takes
group-wise int8 scales, so the codes are split in two 4-bit planes, q + 128 = 16 h + l, and run
through the INT4 kernel (models/int4.py) as one matmul over [x, x]:
    d q = (h - 8) * 16d + 8d  +  (l - 8) * d
exactly (16d and 8d are exact in bf16), at the same bytes per weight as int8.
"""

from __future__ import annotations

import torch
from torch import nn

from kvtriton.backend.kernels import cpu_int4
from kvtriton.backend.models.int4 import _CPU_KERNEL, int4_mm_cpu, pack_for_cpu_kernel
from kvtriton.backend.models.quantization import GroupQuantized, QuantizedLinear


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (out, in) float -> (int8 (out, in), scale (out,) fp32) with weight ~= q * scale[:, None].

    Symmetric, range [-127, 127] (not -128) so that negation is exact; an all-zero row gets scale 1.
    """
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


class Int8Linear(QuantizedLinear):
    """qweight (out, in) int8; scale (out,) fp32 per channel, or (out, in / group_size) fp16 per group."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, source: str = ""):
        super().__init__(qweight.shape[0], qweight.shape[1], bias)
        self.group_size = 0 if scale.dim() == 1 else qweight.shape[1] // scale.shape[1]  # 0: per channel
        self.source = source or "int8 per channel"
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        on_cpu = qweight.device.type == "cpu"
        scale_bf16 = packed = scale_zeros = None
        if on_cpu and not self.group_size:
            scale_bf16 = scale.to(torch.bfloat16)
        elif on_cpu and _CPU_KERNEL:
            packed, scale_zeros = two_plane_pack(qweight, scale)
        self.register_buffer("_scale_bf16", scale_bf16, persistent=False)
        self.register_buffer("_packed", packed, persistent=False)
        self.register_buffer("_scale_zeros", scale_zeros, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scale = quantize_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), bias)

    @classmethod
    def from_group_quantized(cls, q: GroupQuantized, bias: torch.Tensor | None = None,
                             device: torch.device | str = "cpu") -> "Int8Linear":
        if q.bits != 8 or q.zero_point is not None or q.offset is not None:
            raise ValueError(f"Int8Linear takes symmetric 8-bit codes, got {q.bits}-bit ({q.source})")
        return cls(q.codes.to(device), q.scale.to(device), None if bias is None else bias.to(device), q.source)

    def group_quantized(self) -> GroupQuantized:
        """Per-group weights as a GroupQuantized, for exporters (per channel: one group of all inputs)."""
        scale = self.scale if self.group_size else self.scale[:, None]
        return GroupQuantized(8, self._codes(slice(None)), scale, None, None, self.group_size or self.in_features,
                              self.source)

    def _codes(self, rows: slice) -> torch.Tensor:
        """(rows, in) int8 codes: qweight, or read back from the GEMV's two planes (two_plane_pack's inverse)."""
        if self.qweight is not None:
            return self.qweight[rows]
        planes = cpu_int4.unpack_rows(self._packed, rows, self.out_features)  # (rows, 2 in): high, then low
        k = self.in_features
        return ((planes[:, :k] << 4 | planes[:, k:]) ^ 0x80).view(torch.int8)  # code + 128, its sign bit flipped

    @property
    def matmul_on_cpu_kernel(self) -> bool:
        return self._scale_bf16 is not None or self._packed is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._scale_bf16 is not None and x.device.type == "cpu":
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._scale_bf16)  # (M, out)
        if self._packed is not None and x.device.type == "cpu":
            xb = x.to(torch.bfloat16)
            return int4_mm_cpu(torch.cat([xb, xb], dim=1), self._packed, self.group_size, self._scale_zeros,
                               self.out_features)
        # GPU: correct but not yet faster (the dequantized copy is materialised each call); a fused
        # int8-weight GEMM kernel is future work.
        return self.dense_matmul(x)

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        scale, codes = self.scale[rows].float(), self._codes(rows).float()
        if self.group_size:
            return codes * scale.repeat_interleave(self.group_size, dim=1)  # (out, in)
        return codes * scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, source={self.source!r}"


def two_plane_pack(qweight: torch.Tensor, scale: torch.Tensor,
                   pack=pack_for_cpu_kernel) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (N, K), group scales (N, G) -> an INT4 CPU kernel's operands for [x, x] (N, 2K), packed by
    `pack` (models/int4.py: the kernel that serves here, or pack_for_tinygemm)."""
    u = qweight.view(torch.uint8) ^ 0x80  # (N, K): code + 128 in [0, 255] (flipping the sign bit), a byte each
    codes = torch.cat([u >> 4, u & 0x0F], dim=1)  # (N, 2K): high plane, then low plane
    s = scale.to(torch.bfloat16).float()  # the kernel's scale; 16s and 8s stay exact in bf16
    scales = torch.cat([16 * s, s], dim=1)  # (N, 2G)
    zeros = torch.cat([8 * s, torch.zeros_like(s)], dim=1)
    return pack(codes, scales, zeros)
