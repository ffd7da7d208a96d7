"""The embedding and the LM head split by vocabulary (vLLM's VocabParallelEmbedding and ParallelLMHead).

Rank r owns the rows [r * P, (r + 1) * P) with P = ceil(V / tp); rows past V (the
last rank's padding) are zero. The embedding looks up the ids it owns, zeroes the
others and sums over the ranks; the LM head computes its P logits per token and
gathers the ranks' slices into the full (M, V) for the sampler. Tied, both share
the one sharded weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtriton.backend.distributed.communication_op import (
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from kvtriton.backend.distributed.parallel_state import get_tp_rank, get_tp_world_size
from kvtriton.backend.models.fp32_logits import fp32_logits, writes_fp32
from kvtriton.backend.models.parallel.linear import copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        tp, rank = get_tp_world_size(), get_tp_rank()
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // tp)
        self.vocab_start_index = rank * self.num_embeddings_per_partition
        self.vocab_end_index = min(self.vocab_start_index + self.num_embeddings_per_partition, num_embeddings)
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        rows = self.vocab_end_index - self.vocab_start_index
        copy_checked(param.data[:rows], loaded[self.vocab_start_index : self.vocab_end_index])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (N,) -> (N, hidden)."""
        owned = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)  # (N,)
        local = torch.where(owned, input_ids - self.vocab_start_index, 0)
        x = F.embedding(local, self.weight) * owned.unsqueeze(-1).to(self.weight.dtype)  # (N, hidden)
        return tensor_model_parallel_all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, hidden) -> logits (M, V), gathered from every rank's (M, V / tp); on CUDA in fp32, as one
        GPU's head writes them (models/fp32_logits.py)."""
        local = fp32_logits(hidden, self.weight) if writes_fp32(hidden) else F.linear(hidden, self.weight)
        return tensor_model_parallel_all_gather(local)[:, : self.num_embeddings]
