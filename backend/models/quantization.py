"""Quantized linear layers: what INT8, INT4 and FP8 layers share, and the one way to quantize a model's Linears.

Decode is bandwidth-bound: each step reads every weight once, so fewer bits per
weight is fewer bytes per step, while the activations stay in floating point.

Schemes (`quantize_linears`):
  int8  weight-only, per output channel, symmetric (models/int8.py)
  int4  weight-only, groups of 32, 64 or 128 inputs, asymmetric: a scale and an integer zero point per
        group (models/int4.py)
  fp8   W8A8 e4m3: per-channel weight scales, dynamic per-token activation scales (models/fp8.py)
and one data carrier, `GroupQuantized`, for group-wise weights that arrive already
quantized (GGUF Q4_0, Q4_1, Q4_K and Q8_0 blocks, models/gguf_quantized.py): those are
taken as they are, never re-quantized. Scales are kept in fp16 (GGUF's own type,
so Q4_0 / Q4_1 / Q8_0 blocks are held exactly, Q4_K's scale products rounded);
each kernel takes them in the dtype it needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4", "fp8")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 32  # GGUF's block; divides every hidden size that is a multiple of 32


@dataclass
class GroupQuantized:
    """A (N, K) weight quantized in groups of `group_size` along K (the input dimension):

        w[n, k] = (codes[n, k] - zero_point[n, g]) * scale[n, g] + offset[n, g],   g = k // group_size

    bits 4: codes uint8 in [0, 15], zero_point uint8 (N, G) in [0, 15]; offset (N, G) only where the
    format has one (GGUF Q4_1: w = d*q + m), else None. bits 8: codes int8, symmetric (zero_point and
    offset None). scale (N, G) fp16. `source` says where the numbers came from, for logs.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    offset: torch.Tensor | None
    group_size: int
    source: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """(N, K) fp32: the weight these numbers stand for."""
        g = self.group_size
        w = self.codes.float()  # (N, K)
        if self.zero_point is not None:
            w = w - self.zero_point.float().repeat_interleave(g, dim=1)
        w = w * self.scale.float().repeat_interleave(g, dim=1)
        if self.offset is not None:
            w = w + self.offset.float().repeat_interleave(g, dim=1)
        return w

    @staticmethod
    def cat_rows(parts: list["GroupQuantized"]) -> "GroupQuantized":
        """Stack weights along N (q, k, v -> qkv); all must share bits and group size."""
        first = parts[0]
        if any((p.bits, p.group_size, p.shape[1]) != (first.bits, first.group_size, first.shape[1]) for p in parts):
            raise ValueError("cannot fuse weights of different bits, group sizes or widths: "
                             + ", ".join(f"{p.source} {p.shape}" for p in parts))

        def cat(name: str, fill: float) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            if all(t is None for t in tensors):
                return None
            like = next(t for t in tensors if t is not None)
            return torch.cat([t if t is not None else torch.full(p.scale.shape, fill, dtype=like.dtype)
                              for p, t in zip(parts, tensors)])

        sources = sorted({p.source for p in parts})
        return GroupQuantized(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                              cat("zero_point", 8), cat("offset", 0.0), first.group_size, "+".join(sources))


DEQUANTIZE_ROWS = 4096  # rows of a quantized layer add_dense_weight dequantizes at a time

# The dense copies multiply through oneDNN, which JIT-compiles a kernel (a primitive) for each input shape and
# keeps up to 1,024 of them: with every prompt length its own row count, the default model's served engine grew
# ~3 MB a new length (1.46 -> 2.19 GB over prompts of 60-458 tokens), each new length also paying the compiles.
# 16-bit rows padded to a multiple of this keep the shapes to a few dozen (fp32 copies go through BLAS, which
# caches nothing, and are left as they are). Padding rows are zeros; a real row's result may still move by a
# rounding with the shape, as it already does with the step's other rows.
DENSE_ROW_BUCKET = 16


def dense_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ weight.T in weight's dtype -> (M, out); 16-bit rows padded to a multiple of DENSE_ROW_BUCKET."""
    m = x.shape[0]
    x = x.to(weight.dtype)
    if m % DENSE_ROW_BUCKET and weight.element_size() == 2:
        x = F.pad(x, (0, 0, 0, -m % DENSE_ROW_BUCKET))
    return F.linear(x, weight)[:m]


@dataclass(frozen=True)
class DeferredBlocks:
    """A GroupQuantized not decoded yet: its bits now, its numbers when `load()` is called. A GGUF's blocks are
    decoded one layer at a time as quantize_linears replaces that layer (the file is memory-mapped), so a
    model's codes are never all in memory unpacked at once (1 byte a 4-bit code, twice the packed layer)."""

    bits: int
    load: Callable[[], GroupQuantized]


class DenseRows:
    """From how many rows the quantized layers of a model multiply by their dense copies (add_dense_weight):
    `decode` in a decode-only step, whose rows are sequences; in any other, whose rows are tokens, `prompt`
    where one of its prompt chunks has at least `prompt` tokens, else `prefill`. Three numbers because a copy
    that rounds (bf16) should serve a long prompt and a batch of many requests, where it pays most, without
    changing what a short prompt computes, alone or beside other short ones (loader.add_dense_weights). All
    the layers of a model share one; the runner marks the steps that are not decode-only (`prefill_step`)."""

    def __init__(self, decode: int, prefill: int, prompt: int | None = None):
        self.decode, self.prefill = decode, prefill
        self.prompt = prefill if prompt is None else prompt  # <= prefill: a long chunk only lowers it
        self.in_prefill = False
        self._step_rows = prefill  # this prefill step's threshold

    def min_rows(self) -> int:
        return self._step_rows if self.in_prefill else self.decode

    @contextlib.contextmanager
    def prefill_step(self, longest_chunk: int):
        """A step that is not decode-only, whose longest prompt chunk (query) has `longest_chunk` tokens."""
        self.in_prefill = True
        self._step_rows = self.prompt if longest_chunk >= self.prompt else self.prefill
        try:
            yield
        finally:
            self.in_prefill = False


class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear with quantized weights: subclasses give the matmul and the dequantized weight.

    Activations keep the caller's dtype outside; inside, each kernel takes what it needs (the CPU
    kernels run in bf16) and the result is returned in the caller's dtype.
    """

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("bias", bias)
        # A dense copy of the dequantized weight, for inputs of as many rows as dense_rows says (add_dense_weight).
        self.register_buffer("dense_weight", None, persistent=False)
        self.dense_rows: DenseRows | None = None

    @property
    def matmul_on_cpu_kernel(self) -> bool:
        """Whether matmul runs a weight-only CPU kernel (int4, int8), which a dense copy may beat at many rows."""
        return False

    @property
    def gemv_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(packed, scale_zeros) where this layer multiplies through kvtriton's CPU GEMV (the int4 layers, and the
        int8 ones as two 4-bit planes, keep them as `_packed` / `_scale_zeros`; the GEMV's layout is 3-D), for
        callers that run the GEMV themselves (runners/cpu_native_decode.py); else None."""
        packed = getattr(self, "_packed", None)
        return (packed, self._scale_zeros) if packed is not None and packed.dim() == 3 else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) -> (M, out), in any float dtype."""
        raise NotImplementedError

    def dequantized_weight(self, rows: slice = slice(None)) -> torch.Tensor:
        """(out, in) fp32, or those `rows` of it: what the layer multiplies by, for tests, references, error
        reports and the dense copy."""
        raise NotImplementedError

    def release_stored_codes(self) -> None:
        """Drop the stored codes where the CPU kernel's packed copy holds them all (they are read back from it
        when asked for: exporters, dense copies); a no-op elsewhere. The loader calls it on a served CPU model:
        two copies of every code were 0.68 GB of a 1.2B Q4_K_M model's 5.2 GB. The layers that have them read
        their codes through their own _codes."""
        if self.gemv_operands is not None:  # the GEMV's tiles (or two planes) hold every code
            self.qweight = None

    @property
    def dense_min_rows(self) -> int:
        """From how many rows a decode step multiplies by the dense copy (0: no copy)."""
        return self.dense_rows.decode if self.dense_rows is not None else 0

    def dense_copy_serves(self, rows: int) -> bool:
        """Whether an input of `rows` rows multiplies by the dense copy in this step."""
        return self.dense_weight is not None and rows >= self.dense_rows.min_rows()

    def add_dense_weight(self, rows: "DenseRows | int", dtype: torch.dtype = torch.bfloat16) -> int:
        """Keep the dequantized weight in `dtype` beside the quantized one, and multiply inputs of as many rows
        as `rows` says by it (an int: that many, in any step), where a dense matmul beats the quantized kernel
        (see loader.add_dense_weights). Returns the copy's bytes. Dequantized DEQUANTIZE_ROWS rows at a time:
        the fp32 working copies of a whole large layer (an lm_head of 100M weights: ~1.2 GB) would set the
        load's peak memory."""
        device = next(b for b in self.buffers() if b is not None).device
        self.dense_weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        for start in range(0, self.out_features, DEQUANTIZE_ROWS):
            self.dense_weight[start:start + DEQUANTIZE_ROWS] = self.dequantized_weight(
                slice(start, start + DEQUANTIZE_ROWS))
        self.dense_rows = rows if isinstance(rows, DenseRows) else DenseRows(rows, rows)
        return self.dense_weight.numel() * self.dense_weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        if self.dense_copy_serves(rows.shape[0]):
            out = dense_linear(rows, self.dense_weight)  # (M, out)
        else:
            out = self.matmul(rows)
        return self.output(out, x.dtype).reshape(*shape[:-1], self.out_features)

    def output(self, product: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """What the layer returns for its matmul's product: in the caller's dtype, plus the bias."""
        out = product.to(dtype)
        return out if self.bias is None else out + self.bias.to(dtype)

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path (and, for now, the GPU's): the dequantized weight materialised each call."""
        return x @ self.dequantized_weight().to(x.dtype).T


def quantize_linears(model: nn.Module, scheme: str, group_size: int = DEFAULT_GROUP_SIZE, skip: tuple[str, ...] = (),
                     prequantized: dict[str, GroupQuantized | DeferredBlocks] | None = None,
                     schemes: dict[str, str | None] | None = None) -> dict[str, str]:
    """Replace every nn.Linear in `model` by its quantized layer, in place; returns {name: what it became}.

    A Linear named in `prequantized` takes those numbers as they are (4-bit codes become an Int4Linear,
    8-bit an Int8Linear with their group scales; DeferredBlocks are decoded when their layer's turn comes);
    every other one is quantized from its float weight by `scheme`, or by its own entry in `schemes` (None:
    it stays float). A Linear sharing its weight with an embedding (tied lm_head) is quantized as its own
    copy: the embedding keeps its float table (a Gather reads only N rows).
    """
    # Imported here: both layers subclass QuantizedLinear above.
    from kvtriton.backend.models.fp8 import Fp8Linear
    from kvtriton.backend.models.int4 import Int4Linear
    from kvtriton.backend.models.int8 import Int8Linear

    if scheme not in SCHEMES:
        raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    prequantized, schemes = dict(prequantized or {}), schemes or {}
    if bad := sorted({s for s in schemes.values() if s is not None} - set(SCHEMES)):
        raise ValueError(f"quantization scheme must be one of {', '.join(SCHEMES)}, got {bad[0]!r}")
    replaced = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in skip:
            continue
        bias = None if module.bias is None else module.bias.detach().clone()
        given = prequantized.pop(name, None)
        if isinstance(given, DeferredBlocks):
            given = given.load()
        layer_scheme = schemes.get(name, scheme)
        if given is None and layer_scheme is None:
            continue
        if given is not None:
            if given.shape != tuple(module.weight.shape):
                raise ValueError(f"{name}: quantized weight {given.shape} != {tuple(module.weight.shape)}")
            layer_type = Int4Linear if given.bits == 4 else Int8Linear
            new = layer_type.from_group_quantized(given, bias, module.weight.device)
            what = f"{given.source} (int{given.bits} g{given.group_size}, as stored)"
        elif layer_scheme == "fp8":
            new = Fp8Linear.from_linear(module, name=name)
            what = "fp8 e4m3 per channel, per-token activations"
        elif layer_scheme == "int4":
            new = Int4Linear.from_linear(module, group_size, name=name)
            what = f"int4 g{group_size}"
        else:
            new = Int8Linear.from_linear(module)
            what = "int8 per channel"
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        replaced[name] = what
    if prequantized:
        raise ValueError(f"quantized weights for modules the model does not have: {sorted(prequantized)[:3]}")
    return replaced


GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q8_0")  # what models/gguf_quantized.py takes as stored
GGUF_EXACT_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # ... bit for bit (k-quants' scale products are rounded to fp16)


def layer_sources(model: nn.Module) -> dict[str, int]:
    """{where a quantized layer's numbers came from: how many layers}, for the manifest and logs:
    "gguf Q4_1 blocks as stored (lossless, g32)" or "int4 g128 quantized from float weights"."""
    sources: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            source = getattr(module, "source", "")
            parts = source.split("+") if source else []
            exact = "lossless" if all(p in GGUF_EXACT_TYPES for p in parts) else "scales in fp16"
            what = f"gguf {source} blocks as stored ({exact}, g{module.group_size})" \
                if parts and all(p in GGUF_BLOCK_TYPES for p in parts) else f"{source} quantized from float weights"
            sources[what] = sources.get(what, 0) + 1
    return dict(sorted(sources.items()))
