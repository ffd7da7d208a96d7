"""An untied embedding kept in its GGUF blocks: a step dequantizes only the rows it looks up.

A model whose head is its own tensor (Llama 3.1 8B, Qwen2.5 7B) reads its embedding only by lookup, a few
rows a step, yet a float table costs the whole vocabulary: 128,256 x 4,096 weights are 2.1 GB in fp32, a
third of such a model's CPU memory beside its 4-bit layers; as Q4_K blocks (packed two codes a byte, fp16
scales and offsets per 32) they are 0.33 GB. The rows come out as GroupQuantized.dequantize makes them, so the
model computes what it computed from the float table where the blocks convert exactly (Q4_0, Q4_1, Q8_0; a
Q4_K or Q6_K scale is rounded to fp16 once, as for the quantized layers: models/gguf_quantized.py).
"""

from __future__ import annotations

import torch
from torch import nn

from kvtriton.backend.models.int4 import pack_nibbles, unpack_nibbles
from kvtriton.backend.models.quantization import GroupQuantized


class QuantizedEmbedding(nn.Module):
    """nn.Embedding's lookup over a GroupQuantized (vocab, hidden) table; outputs in `dtype`."""

    def __init__(self, table: GroupQuantized, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.bits, self.group_size, self.source, self.dtype = table.bits, table.group_size, table.source, dtype
        self.register_buffer("codes", pack_nibbles(table.codes) if table.bits == 4 else table.codes)
        self.register_buffer("scale", table.scale)
        self.register_buffer("zero_point", table.zero_point)
        self.register_buffer("offset", table.offset)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(-1)
        codes = unpack_nibbles(self.codes[ids]) if self.bits == 4 else self.codes[ids]
        rows = GroupQuantized(self.bits, codes, self.scale[ids],
                              None if self.zero_point is None else self.zero_point[ids],
                              None if self.offset is None else self.offset[ids], self.group_size, self.source)
        return rows.dequantize().to(self.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.source} (int{self.bits} g{self.group_size})"
