"""INT4 weight-only linear layers: 4-bit codes in groups of 32/64/128 inputs, a scale and zero point per group.

Layout (`Int4Linear`'s persistent buffers, and what the ONNX exporter reads):
  qweight     (N, K/2) uint8, two codes per byte, the even input in the low nibble: ONNX's INT4 order
              and onnxruntime's MatMulNBits `B` (reshaped to (N, K/g, g/2))
  scale       (N, K/g) fp16
  zero_point  (N, K/g) uint8 in [0, 15]
  offset      (N, K/g) fp16, or None: a float term per group, for formats that have one (GGUF Q4_1)
so that w = (q - zero_point) * scale + offset.

On CUDA, decode batches (up to 64 rows) run the Triton kernel kernels/int4_matmul.py (dequantize in
registers + matmul, one launch, capturable in the CUDA graphs); longer inputs (prefill) dequantize the
weight once per call and use cuBLAS.

On the CPU the matmul is kvtriton's AVX-512 BF16 GEMV (kernels/cpu_int4_gemv.cpp, built at first use)
where the CPU has AVX-512 BF16, else PyTorch's `_weight_int4pack_mm_for_cpu`; both multiply tinygemm's
numbers (w = (q - 8) * s + z with a float z per group; x, s and z rounded to bf16, fp32 sums), PyTorch's
kernel also rounds its output to bf16. benchmarks/quant_kernels_bench.py measures them against the
alternatives: at one row PyTorch's was the fastest of PyTorch's and onnxruntime's (7x fp32 for the default
model's step, MatMulNBits 6x), and the GEMV takes 0.6x its time at one row from cache (0.8x from memory, as in
a step) and less at every row count measured up to 255 (README, Quantization). PyTorch's fp32 and fp16
variants are about 30x slower than bf16 on a CPU without fp16 arithmetic. Past about 16 rows neither gains
much on dense matmuls (batch 32: 1.5-1.8x fp32, a dense bf16 matmul 2.2x; loader.add_dense_weights). Both
want K a multiple of the group size; rows are padded to 16.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from kvtriton.backend.kernels import cpu_int4
from kvtriton.backend.models.cache import cache_dir
from kvtriton.backend.models.quantization import GROUP_SIZES, GroupQuantized, QuantizedLinear

log = logging.getLogger("kvtriton")
_CPU_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_KERNEL_ROWS = 16  # _convert_weight_to_int4pack_for_cpu wants N % 16 == 0


def quantize_groupwise(weight: torch.Tensor, group_size: int, source: str = "") -> GroupQuantized:
    """weight (N, K) float -> 4-bit codes, asymmetric, one scale and integer zero point per group of K.

    Each group's range is widened to include 0 (so that a zero point in [0, 15] exists) and split in 15
    steps; the scale is rounded to fp16 first and the codes computed with the rounded scale, so the
    stored numbers are self-consistent. Error: at most half a step, plus half a step at the range's
    ends where the zero point's rounding shifts the grid. An all-zero group gets scale 1.
    """
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group size {group_size} must be one of {GROUP_SIZES} and divide the {k} inputs")
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, g)
    low = w.amin(-1).clamp(max=0)  # (N, G)
    high = w.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # (N, G) fp16
    s = scale.float()
    zero_point = torch.round(-low / s).clamp(0, 15)  # (N, G)
    codes = (torch.round(w / s[..., None]) + zero_point[..., None]).clamp(0, 15)  # (N, G, g)
    return GroupQuantized(4, codes.reshape(n, k).to(torch.uint8), scale, zero_point.to(torch.uint8), None,
                          group_size, source or f"int4 g{group_size}")


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 in [0, 15] -> (N, K/2) uint8, element 2j in the low nibble of byte j."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8: the inverse of pack_nibbles."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def tinygemm_zero(scale: torch.Tensor, zero_point: torch.Tensor | None, offset: torch.Tensor | None) -> torch.Tensor:
    """(N, G) fp32 z such that (q - zp) * s + offset == (q - 8) * s + z: tinygemm's float zero."""
    z = scale.float() * (8 - (zero_point.float() if zero_point is not None else 8.0))
    return z + offset.float() if offset is not None else z


def pack_for_cpu_kernel(codes: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) in [0, 15], scale and tinygemm zero (N, G) -> (packed weight, scales and zeros) for the CPU
    kernel that serves here: the GEMV's (3-D packed, kernels/cpu_int4.py) or PyTorch's (pack_for_tinygemm)."""
    return cpu_int4.pack(codes, scale, zero) if gemv_serves() else pack_for_tinygemm(codes, scale, zero)


def pack_for_tinygemm(codes: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same numbers for PyTorch's kernel: (N16, K/2) uint8 and (G, N16, 2) bf16, N16 = N rounded up to 16
    (padded rows compute 0)."""
    return cpu_int4.in_row_slices(_tinygemm_slice, (codes, scale, zero), cpu_int4.PACK_ROWS, cat_dims=(0, 1))


def _tinygemm_slice(codes: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = codes.shape
    pad = -n % _KERNEL_ROWS
    if pad:
        codes = torch.cat([codes, torch.full((pad, k), 8, dtype=codes.dtype)])
        scale = torch.cat([scale, torch.zeros(pad, scale.shape[1], dtype=scale.dtype)])
        zero = torch.cat([zero, torch.zeros(pad, zero.shape[1], dtype=zero.dtype)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    scale_zeros = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1)  # (G, N16, 2)
    return packed, scale_zeros.to(torch.bfloat16).contiguous()


@functools.cache
def gemv_serves() -> bool:
    """Whether kvtriton's GEMV serves this process's CPU int4 matmuls (built at first use into the kvtriton
    cache's kernels/ folder); says once why not where it does not."""
    try:
        why = cpu_int4.load(cache_dir() / "kernels")
    except OSError as e:  # no writable cache
        why = str(e)
    if why:
        log.warning("kvtriton: int4 CPU matmuls use PyTorch's _weight_int4pack_mm_for_cpu, not kvtriton's AVX-512 "
                    "BF16 GEMV: %s", why)
    else:
        log.info("kvtriton: the CPU int4 GEMV multiplies 3+ rows with %s", torch.ops.kvtriton.int4_gemv_rows_form())
    return why is None


def int4_mm_cpu(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_zeros: torch.Tensor,
                n: int) -> torch.Tensor:
    """x (M, K) -> (M, n) through the CPU kernel that `packed` was packed for (the GEMV's layout is 3-D): fp32
    from the GEMV, bf16 from PyTorch's kernel."""
    if packed.dim() == 3:
        return cpu_int4.int4_gemv(x, packed, scale_zeros, group_size, n)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size, scale_zeros)
    return out[:, :n] if out.shape[1] != n else out


def _cuda_kernel():
    """(the Triton int4 decode matmul, its dequantize for prefill, the most rows the matmul takes) from
    kernels/int4_matmul.py, or (None, None, 0) without triton (then every CUDA call dequantizes in PyTorch
    ops; loader.resolve_quantization says so at load)."""
    try:
        from kvtriton.backend.kernels.int4_matmul import MAX_ROWS, int4_dequantize, int4_matmul
    except ImportError:
        return None, None, 0
    return int4_matmul, int4_dequantize, MAX_ROWS


class Int4Linear(QuantizedLinear):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 offset: torch.Tensor | None, group_size: int, bias: torch.Tensor | None, source: str = ""):
        super().__init__(qweight.shape[0], qweight.shape[1] * 2, bias)
        self.group_size, self.source = group_size, source
        self.register_buffer("qweight", qweight)  # (N, K/2) uint8; None once release_stored_codes() has run
        self.register_buffer("scale", scale)  # (N, G) fp16
        self.register_buffer("zero_point", zero_point)  # (N, G) uint8
        self.register_buffer("offset", offset)  # (N, G) fp16 or None
        packed = scale_zeros = None  # the CPU kernel's copy of the same numbers
        if qweight.device.type == "cpu" and _CPU_KERNEL:
            packed, scale_zeros = pack_for_cpu_kernel(unpack_nibbles(qweight), scale,
                                                      tinygemm_zero(scale, zero_point, offset))
        self.register_buffer("_packed", packed, persistent=False)
        self.register_buffer("_scale_zeros", scale_zeros, persistent=False)
        # Chosen here, not per call: torch.compile then traces a plain attribute, not an import.
        self._cuda_matmul, self._cuda_dequantize, self._cuda_rows = (
            _cuda_kernel() if qweight.device.type == "cuda" else (None, None, 0))

    @classmethod
    def from_group_quantized(cls, q: GroupQuantized, bias: torch.Tensor | None = None,
                             device: torch.device | str = "cpu") -> "Int4Linear":
        if q.bits != 4:
            raise ValueError(f"Int4Linear takes 4-bit codes, got {q.bits}-bit ({q.source})")
        zero_point = q.zero_point if q.zero_point is not None else torch.full(q.scale.shape, 8, dtype=torch.uint8)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return cls(to(pack_nibbles(q.codes)), to(q.scale), to(zero_point), to(q.offset), q.group_size, to(bias),
                   q.source)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, name: str = "") -> "Int4Linear":
        k = linear.in_features
        if k % group_size:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            raise ValueError(f"quantization_group_size {group_size} does not divide the {k} inputs of "
                             f"{name or 'a Linear'}; use {' or '.join(map(str, fits)) or 'quantization int8'}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_group_quantized(quantize_groupwise(linear.weight, group_size), bias, linear.weight.device)

    def group_quantized(self, rows: slice = slice(None)) -> GroupQuantized:
        """The stored numbers (of `rows` only, if given) as a GroupQuantized (codes unpacked), for exporters."""
        return GroupQuantized(4, self._codes(rows), self.scale[rows], self.zero_point[rows],
                              None if self.offset is None else self.offset[rows], self.group_size, self.source)

    def _codes(self, rows: slice) -> torch.Tensor:
        """(rows, K) uint8 codes: from qweight, or unpacked from the GEMV's tiles that hold those rows."""
        if self.qweight is not None:
            return unpack_nibbles(self.qweight[rows])
        return cpu_int4.unpack_rows(self._packed, rows, self.out_features)

    @property
    def matmul_on_cpu_kernel(self) -> bool:
        return self._packed is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and x.device.type == "cpu":
            return int4_mm_cpu(x, self._packed, self.group_size, self._scale_zeros, self.out_features)
        if self._cuda_matmul is not None and x.shape[0] <= self._cuda_rows:
            return self._cuda_matmul(x, self.qweight, self.scale, self.zero_point, self.offset, self.group_size)
        if self._cuda_dequantize is not None:  # prefill: the weight dequantized once per call, then cuBLAS
            return x @ self._cuda_dequantize(self.qweight, self.scale, self.zero_point, self.offset, self.group_size,
                                             x.dtype).T
        return self.dense_matmul(x)

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.group_quantized(rows).dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, " \
               f"source={self.source!r}"
