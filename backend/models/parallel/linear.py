"""Megatron's linear layers, named as vLLM names them. Each holds its rank's shard only.

For Y = X A: column-parallel splits A's output features (no communication; the
next layer consumes the split), row-parallel splits its input features and sums
the partial products with one all-reduce. So an attention block (q/k/v column,
o_proj row) and an MLP (gate/up column, down row) each cost one all-reduce.

`weight_loader(param, loaded, shard_id)` copies this rank's part of a checkpoint
tensor; `loaded` is a safetensors slice (or a tensor), and only the part
indexed is read from the file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtriton.backend.distributed.communication_op import tensor_model_parallel_all_reduce
from kvtriton.backend.distributed.parallel_state import get_tp_rank, get_tp_world_size
from kvtriton.backend.models.parallel.sharding import num_kv_heads_per_rank


def narrow(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) [start, start + size) of a safetensors slice or a tensor."""
    return loaded[start : start + size] if dim == 0 else loaded[:, start : start + size]


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:  # copy_ would broadcast a wrong shape silently
        raise ValueError(f"checkpoint shard of shape {tuple(src.shape)} does not fit parameter {tuple(dst.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(nn.Linear):
    """Output features split over the ranks: (N, in) -> (N, out / tp)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        super().__init__(input_size, output_size // self.tp_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = param.shape[0]
        copy_checked(param.data, narrow(loaded, 0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices in one matmul (gate and up): each rank holds its slice of each."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = [size // self.tp_size for size in output_sizes]  # per rank

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int = 0) -> None:
        size, offset = self.output_sizes[shard_id], sum(self.output_sizes[:shard_id])
        copy_checked(param.data[offset : offset + size], narrow(loaded, 0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v in one matmul, split by heads: each rank holds num_heads / tp query heads and its KV heads
    (a KV head is replicated over tp / num_kv_heads ranks when there are fewer KV heads than ranks)."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False):
        tp = get_tp_world_size()
        self.head_size = head_size
        self.num_heads = total_num_heads // tp  # per rank
        self.num_kv_heads = num_kv_heads_per_rank(total_num_kv_heads, tp)
        self.num_kv_head_replicas = max(1, tp // total_num_kv_heads)
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp
        super().__init__(hidden_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id: int = 0) -> None:
        """shard_id 0, 1, 2: q, k, v."""
        q_size, kv_size = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        if shard_id == 0:
            offset, size, start = 0, q_size, self.tp_rank * q_size
        else:
            offset = q_size + (shard_id - 1) * kv_size
            size, start = kv_size, (self.tp_rank // self.num_kv_head_replicas) * kv_size
        copy_checked(param.data[offset : offset + size], narrow(loaded, 0, start, size))


class RowParallelLinear(nn.Linear):
    """Input features split over the ranks: (N, in / tp) -> (N, out), the partial sums all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        super().__init__(input_size // self.tp_size, output_size, bias=bias)

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank, added once after the sum
            copy_checked(param.data, loaded[:])
            return
        size = param.shape[1]
        copy_checked(param.data, narrow(loaded, 1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = tensor_model_parallel_all_reduce(F.linear(x, self.weight))  # (N, out)
        return y + self.bias if self.bias is not None else y
