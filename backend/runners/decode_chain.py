"""Which of a CUDA model's decode projections take kernels/pdl_matmul.py's PDL-chained matmul.

cuBLAS's kernels neither start before the kernel ahead of them ends nor let the next start early, so a decode
step's launches on them leave gaps the Triton matmul does not (kernels/pdl.py, kernels/pdl_matmul.py): the qkv
projection lets the attention kernel after it launch early, and with pdl_matmul.CHAIN the layer's other 16-bit
projections join the chain, gate_up ending in the SwiGLU and, with PLANES_INTO_NORM, o_proj and down_proj handing
their split-K partial sums to the compiled residual add + RMSNorm. A projection takes part through attributes the
model's forward reads (models/llama.py `linear`): `decode_matmul`, `swiglu_matmul`, `decode_planes`.
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
