"""The CPU's decode attention: one query per sequence, read straight from the paged pools by inductor's loops.

`decode_attention` (attention/paged.py) gathers each context into a fresh tensor and calls SDPA. On a CPU at
decode shapes both are mostly fixed cost: a gather copy and SDPA's flash kernel, built for many queries, per
layer. Written instead as plain reductions over the pools indexed by the block table (`pool[tables]` feeding
a product and a sum), inductor fuses the gather into the dot products and the weighted sum of values, so no
context is copied and each layer runs three small C++ loops. Measured in the default model's compiled decode
step (int4, 2-core Sapphire Rapids, 192-token contexts): one sequence 10.8 -> 9.7 ms, 32 sequences 78.9 ->
67.8 ms.

It only pays compiled: eagerly each op would materialise the (B, L, Hkv, G, D) product. So the compiled decode
graphs inline it (runners/cpu_compiled_decode.py), and the eager steps of a runner with those graphs call the
same function compiled on its own (`CompiledDecodeAttention`), so that a decode row's attention is the same
loops, and the same bits, in a decode-only step and in a mixed prefill + decode step
(tests/test_cpu_compiled_decode.py). Softmax in fp32, whatever the pools' dtype (an fp8 pool's values widen
in the same loops). Where the runner's decode steps run their layers in C++ (runners/cpu_native_decode.py), its
decode rows attend through that C++ attention instead (`native`), for the same reason.
"""

from __future__ import annotations

import logging

import torch

from kvtriton.backend.attention.paged import MIN_DECODE_TABLE_WIDTH, decode_attention, decode_mask
from kvtriton.backend.kernels.no_recompile import without_recompile

log = logging.getLogger("kvtriton")


def decode_attention_in_place(q, k_pool, v_pool, tables, mask, scale: float) -> torch.Tensor:
    """q (B, H, D), one new token per sequence (its K/V already written), over the blocks tables (B, W) names
    in pools (NB, BS, Hkv, D); mask (B, 1, 1, W*BS) bool (attention/paged.py decode_mask) -> (B, H, D)."""
    b, width = tables.shape
    _, bs, hkv, d = k_pool.shape
    group = q.shape[1] // hkv  # query heads per KV head (GQA): head h reads KV head h // group
    keys = k_pool[tables].view(b, width * bs, hkv, 1, d)  # not materialised: inductor indexes the pool
    values = v_pool[tables].view(b, width * bs, hkv, 1, d)
    scores = (q.view(b, 1, hkv, group, d).float() * keys.float()).sum(-1) * scale  # (B, L, Hkv, G)
    scores = scores.masked_fill(~mask.view(b, -1, 1, 1), float("-inf"))
    p = torch.exp(scores - scores.amax(1, keepdim=True))
    out = (p[..., None] * values.float()).sum(1) / p.sum(1)[..., None]  # (B, Hkv, G, D)
    return out.reshape(b, hkv * group, d).to(q.dtype)


class CompiledDecodeAttention:
    """decode_attention_in_place compiled on its own, for the eager steps of a runner whose decode steps are
    compiled. Its two graphs (batch 1 and 2+: dynamo specialises size 1) are compiled at load by `warm_up`, from
    the compiled decode's. A call that would need another graph attends through SDPA instead of stalling the step
    on a compile (correct, not the same bits), said once."""

    def __init__(self, native: bool = False):
        # Symbolic sizes stay apart: with duck shaping, sizes equal at the first trace would share one symbol.
        torch.fx.experimental._config.use_duck_shape = False
        self._compiled = torch.compile(decode_attention_in_place, dynamic=True, fullgraph=True)
        # native: the runner's decode steps attend through kernels/cpu_decode_layers.cpp; so do these rows.
        self.native = native
        self.eager_calls = 0  # calls that fit no graph

    @torch.inference_mode()
    def warm_up(self, batch: int, num_heads: int, dtype: torch.dtype, k_pool, v_pool, scale: float) -> None:
        """Compile the graph of `batch` sequences (1, or any 2 or more) of `dtype` queries now. Its inputs are made
        as the runner's eager steps make theirs, under inference mode (dynamo guards on inference tensors too): q
        and the mask computed in the step, the tables copied in `__call__`, the pools allocated before."""
        if self.native:  # nothing to compile
            return
        tables = torch.zeros(batch, MIN_DECODE_TABLE_WIDTH, dtype=torch.int64)
        mask = decode_mask(torch.ones(batch, dtype=torch.int64), MIN_DECODE_TABLE_WIDTH * k_pool.shape[1])
        q = torch.zeros(batch, num_heads, k_pool.shape[-1], dtype=dtype)
        self._compiled(q, k_pool, v_pool, tables, mask, scale)

    def __call__(self, q, k_pool, v_pool, tables, mask, scale: float) -> torch.Tensor:
        # A mixed step's decode rows pass a column slice of the step's tables; dynamo guards on strides (even a
        # one-row table's first), so every call hands it a fresh, row-major copy: one graph per batch class.
        tables = torch.empty(tables.shape, dtype=tables.dtype).copy_(tables)  # under the step's inference mode
        if self.native:
            return torch.ops.kvtriton.decode_attention(q.contiguous(), k_pool, v_pool, tables, mask.contiguous(), scale)
        out, why = without_recompile(self._compiled, q, k_pool, v_pool, tables, mask, scale)
        if why is None:
            return out
        if not self.eager_calls:
            log.warning("CPU decode attention: a call fits no compiled graph; such calls use SDPA. %s", why)
        self.eager_calls += 1
        return decode_attention(q, k_pool, v_pool, tables, mask, scale)
