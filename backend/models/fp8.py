"""FP8 (e4m3) W8A8 linear layers: fp8 weights with one scale per output channel, activations quantized
per token at run time, the matmul through `torch._scaled_mm` (Hopper/Ada tensor cores on CUDA).

    y[m, n] = sum_k xq[m, k] wq[n, k] * x_scale[m] * w_scale[n]

Weights are quantized once at load from the checkpoint's bf16/fp32 values (`quantize_fp8_per_channel`).
Activation scales are dynamic: max |x| of each row / 448, so no calibration set is needed and one
outlier token does not cost the others their precision. On CUDA the activation quantization is one
Triton kernel (kernels/fp8_quant.py) and the whole layer is two launches with no host sync: it is
captured in the decode CUDA graphs like any other op. The down projection's input is quantized in the
SwiGLU's own pass (`Fp8Linear.swiglu_forward`, one kernel that reads gate_up once). Decode batches
multiply in a Triton W8A8 kernel (kernels/fp8_matmul.py) where its measured table says it beats
cuBLASLt's `_scaled_mm`, which pads a few rows to a 64-row tile; and at batch 1-2 the runner's fused
decode kernels (kernels/skinny_matmul.py) read these weights directly, quantizing x per token inside the
matmul. On the CPU the same math runs through PyTorch ops and the CPU `_scaled_mm` (for tests; no speed
is claimed there).
"""

from __future__ import annotations

import torch
from torch import nn

from kvtriton.backend.models.quantization import QuantizedLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros under any scale; this one avoids 0/0


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> (wq (N, K) e4m3, scale (N,) fp32), weight ~= wq * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)  # (N,)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def per_token_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (xq (M, K) e4m3, scale (M, 1) fp32): the PyTorch form of kernels/fp8_quant.py."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)  # (M, 1)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _triton_kernels():
    """(the per-token activation quantizer, its SwiGLU form, the matmul that picks the Triton GEMV or _scaled_mm by
    rows, its form as split-K partial sums), or Nones without triton (then five PyTorch ops quantize and _scaled_mm
    multiplies at every size)."""
    try:
        from kvtriton.backend.kernels.fp8_matmul import fp8_matmul, fp8_matmul_planes
        from kvtriton.backend.kernels.fp8_quant import per_token_fp8, silu_mul_per_token_fp8
    except ImportError:
        return None, None, None, None
    return per_token_fp8, silu_mul_per_token_fp8, fp8_matmul, fp8_matmul_planes


def fp8_supported(device: torch.device) -> str | None:
    """None if `device` runs fp8 matmuls, else why not (one line)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        return (f"quantization fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                f"this GPU is {major}.{minor}: use int8 or int4")
    if not hasattr(torch, "_scaled_mm"):
        return f"this torch ({torch.__version__}) has no torch._scaled_mm: quantization fp8 needs torch >= 2.4"
    if device.type == "cpu" and not _cpu_scaled_mm_takes_row_scales():
        return (f"quantization fp8 on the CPU needs torch._scaled_mm with per-row scales, which this torch "
                f"({torch.__version__}) lacks (per-tensor only; torch 2.13 has them): use int8 or int4 here")
    return None


def _cpu_scaled_mm_takes_row_scales() -> bool:
    """Some CPU builds (torch 2.11, seen on the GPU host) assert on per-row scales inside _scaled_mm; ask once
    with a 16 x 16 product rather than fail every step."""
    a = torch.zeros(16, 16, dtype=FP8)
    try:
        torch._scaled_mm(a, a.T, scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


# Layers whose input comes straight from a kernel that torch.compile cannot fuse into: attention's output
# projection reads the Triton attention kernel's output, a graph input of the compiled layer function. Inductor
# quantizes such an input in two launches of its own (an amax reduction, then the cast: 7.4 us a layer at 64 rows
# on an H200), the Triton quantizer in one (1.4 us).
UNFUSED_INPUT = ("self_attn.o_proj",)


class Fp8Linear(QuantizedLinear):
    """weight (N, K) float8_e4m3fn, weight_scale (1, N) fp32; activations quantized per token each call."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 unfused_input: bool = False):
        super().__init__(weight.shape[0], weight.shape[1], bias)
        self.source = "fp8 e4m3 per channel"
        self.unfused_input = unfused_input  # UNFUSED_INPUT: quantize with the Triton op even when compiled
        # Planes this layer hands on as split-K partial sums where its caller asks (`swiglu_forward`'s planes), set by
        # the CUDA runner for unpadded layers without a bias (kernels/fp8_matmul.py PLANES_INTO_NORM); 0: the product.
        self.planes = 0
        pad = -weight.shape[0] % 16  # _scaled_mm wants N % 16 == 0: padded rows are zeros, sliced off
        if pad:
            weight = torch.cat([weight, torch.zeros(pad, weight.shape[1], dtype=weight.dtype, device=weight.device)])
            weight_scale = torch.cat([weight_scale.reshape(-1), weight_scale.new_ones(pad)])
        self.register_buffer("weight", weight)  # (N16, K) e4m3, row-major: weight.T is the column-major mat2
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).float())  # (1, N16)
        self._choose_kernels()

    def _choose_kernels(self) -> None:
        # Chosen once for the weight's device, not per call: torch.compile then traces a plain attribute, not an
        # import.
        kernels = _triton_kernels() if self.weight.device.type == "cuda" else (None, None, None, None)
        self._quantize, self._quantize_swiglu, self._matmul, self._matmul_planes = kernels

    def _apply(self, fn, recurse=True):
        # .to() / .cuda(): a layer made on the CPU and moved takes its new device's kernels, not the CPU's
        # PyTorch forms in silence.
        module = super()._apply(fn, recurse)
        self._choose_kernels()
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, name: str = "") -> "Fp8Linear":
        n, k = linear.weight.shape
        if k % 16:
            raise ValueError(f"quantization fp8: {name or 'a Linear'} has {k} inputs; torch._scaled_mm needs a "
                             f"multiple of 16")
        wq, scale = quantize_fp8_per_channel(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(wq, scale, bias, unfused_input=name.endswith(UNFUSED_INPUT))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Eagerly, the Triton quantizer is one launch where PyTorch ops are five. Inside torch.compile (the
        # runner's per-layer functions, captured in the decode graphs) the PyTorch form is the better one where
        # inductor fuses it into the kernel that makes x (RMSNorm), as vLLM's fused
        # rms_norm_dynamic_per_token_quant does by hand, where the opaque Triton op would be a launch of its own;
        # not where no compiled kernel makes x (UNFUSED_INPUT).
        fused_by_compile = torch.compiler.is_compiling() and not self.unfused_input
        quantize = self._quantize if x.device.type == "cuda" and not fused_by_compile else None
        xq, x_scale = quantize(x, FP8_MAX, MIN_SCALE) if quantize is not None else per_token_fp8_reference(x)
        return self._scaled_product(xq, x_scale, x.dtype)

    @property
    def takes_swiglu(self) -> bool:
        """Whether `swiglu_forward` runs here: on CUDA with triton (the SwiGLU quantizer is a Triton kernel)."""
        return self._quantize_swiglu is not None

    def swiglu_forward(self, gate_up: torch.Tensor, planes: bool = False) -> torch.Tensor:
        """self(silu(gate) * up) for the gate_up projection's output (M, 2 * in_features), [gate | up]: the
        SwiGLU and this layer's per-token quantizer in one pass over gate_up (kernels/fp8_quant.py), the
        SwiGLU's product never written out. Only where `takes_swiglu`. planes (a step the model's delta_planes
        covers): with self.planes, the product as that many split-K partial sums (models/llama.py planes_sum)."""
        hq, h_scale = self._quantize_swiglu(gate_up, FP8_MAX, MIN_SCALE)
        if planes and self.planes:
            return self._matmul_planes(hq, h_scale, self.weight, self.weight_scale, self.planes)
        return self.output(self._scaled_product(hq, h_scale, gate_up.dtype), gate_up.dtype)

    def _scaled_product(self, xq: torch.Tensor, x_scale: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        """(xq * x_scale) @ (weight * weight_scale)^T for xq (M, in) e4m3 -> (M, out) in x_dtype (bf16 for fp32)."""
        out_dtype = x_dtype if x_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        if self._matmul is not None and xq.device.type == "cuda":  # decode rows: a Triton GEMV (kernels/fp8_matmul.py)
            out = self._matmul(xq, x_scale, self.weight, self.weight_scale, out_dtype)  # (M, N16)
        else:
            out = torch._scaled_mm(xq, self.weight.T, scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=out_dtype)  # (M, N16)
        return out[:, :self.out_features] if out.shape[1] != self.out_features else out

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        n = self.out_features  # the stored weight's rows are padded to a multiple of 16
        return self.weight[:n][rows].float() * self.weight_scale.reshape(-1, 1)[:n][rows]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per channel"
