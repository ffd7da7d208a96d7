"""Which of a CUDA model's decode projections take kernels/pdl_matmul.py's PDL-chained matmul.

cuBLAS's kernels neither start before the kernel ahead of them ends nor let the next start early, so a decode
step's launches on them leave gaps the Triton matmul does not (kernels/pdl.py, kernels/pdl_matmul.py): the qkv
projection lets the attention kernel after it launch early, and with pdl_matmul.CHAIN the layer's other 16-bit
projections join the chain, gate_up ending in the SwiGLU and, with PLANES_INTO_NORM, o_proj and down_proj handing
their split-K partial sums to the compiled residual add + RMSNorm; fp8 down projections may hand on theirs too
(kernels/fp8_matmul.py PLANES_INTO_NORM). A projection takes part through attributes the model's forward reads
(models/llama.py `linear`): `decode_matmul`, `swiglu_matmul`, `decode_planes` (an fp8 layer's `planes`).
"""

from __future__ import annotations

import torch
from torch import nn


def chain_decode_projections(model: nn.Module, device: torch.device) -> None:
    """Give each plain 16-bit qkv projection the PDL matmul, so that at 3-64 decode rows the attention kernel after
    it launches early and streams its past K/V during the projection (Hopper+); with pdl_matmul.CHAIN, the layer's
    other 16-bit projections too. Quantized layers keep their own kernels."""
    from kvtriton.backend.kernels import pdl, pdl_matmul

    if not (pdl.EARLY_ATTENTION and pdl.pdl_supported(device)):
        return
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        chain = (attn.o_proj, mlp.gate_up_proj, mlp.down_proj) if pdl_matmul.CHAIN else ()
        for proj in (attn.qkv_proj, *chain):
            if type(proj) is torch.nn.Linear and proj.weight.dtype in (torch.bfloat16, torch.float16):
                proj.decode_matmul = pdl_matmul.pdl_linear if proj is attn.qkv_proj else pdl_matmul.chain_linear
        if chain and pdl_matmul.SWIGLU_EPILOGUE and hasattr(mlp.gate_up_proj, "decode_matmul") \
                and mlp.gate_up_proj.bias is None:
            mlp.gate_up_proj.swiglu_matmul = pdl_matmul.chain_swiglu_linear
    if pdl_matmul.CHAIN and pdl_matmul.PLANES_INTO_NORM:
        _narrow_projections_hand_on_planes(model)


def _narrow_projections_hand_on_planes(model: nn.Module) -> None:
    """PLANES_INTO_NORM: every layer's o_proj and down_proj on the chain give compiled decode steps their split-K
    partial sums, which the residual add + RMSNorm after them adds; the model's delta_planes says for which rows
    and how many planes (down_proj's: its output crosses the layers). Only where every one is on the chain."""
    from kvtriton.backend.kernels import pdl_matmul

    narrow = [proj for layer in model.layers for proj in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    if not all(hasattr(proj, "decode_matmul") for proj in narrow):
        return
    min_rows = pdl_matmul.planes_min_rows()
    planes = pdl_matmul.planes_for(*model.layers[0].mlp.down_proj.weight.shape, min_rows)
    for proj in narrow:
        proj.decode_planes = pdl_matmul.chain_linear_planes
    model.delta_planes = (min_rows, pdl_matmul.MAX_ROWS, planes)


def fp8_down_projections_hand_on_planes(model: nn.Module) -> None:
    """kernels/fp8_matmul.py PLANES_INTO_NORM: every layer's fp8 down_proj gives compiled decode steps of its
    PLANES_MIN_ROWS-64 rows its split-K partial sums, which the next layer's residual add + RMSNorm adds (o_proj,
    unsplit there, hands on its product whole). Only where every down_proj is fp8 on the Triton kernels and splits."""
    from kvtriton.backend.kernels import fp8_matmul
    from kvtriton.backend.models.fp8 import Fp8Linear

    downs = [layer.mlp.down_proj for layer in model.layers]
    if not (fp8_matmul.PLANES_INTO_NORM and model.delta_planes is None and all(
            isinstance(down, Fp8Linear) and down.takes_swiglu and down.bias is None
            and down.weight.shape[0] == down.out_features for down in downs)):  # no bias to add, no padded rows
        return
    planes = fp8_matmul.planes_for(*downs[0].weight.shape)
    if planes < 2 or any(down.weight.shape != downs[0].weight.shape for down in downs):
        return
    for down in downs:
        down.planes = planes
    model.delta_planes = (fp8_matmul.PLANES_MIN_ROWS, fp8_matmul.MAX_ROWS, planes)
