"""Rank 0 -> every rank: what to run next. torch.distributed broadcasts only, no protocol of our own.

Each command is a small host header (broadcast_object_list on the CPU group),
followed for a step by two device broadcasts: the step's packed int64 buffer
(ids, positions, slots, context lens, last-token indices; StepInput.packed) and
its block tables. The header carries the host lists the step's attention needs,
so no rank reads a device tensor back to learn them.

  ("step", N, num_decodes, query_lens, context_lens, decode_context_blocks, table_width)
  ("all_reduce_probe", shape, dtype name, iterations)   every rank all-reduces; rank 0 times it
  ("stop",)
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from kvtriton.backend.distributed.communication_op import tensor_model_parallel_all_reduce
from kvtriton.backend.distributed.parallel_state import get_cpu_group, get_device_group
from kvtriton.backend.runners.step_input import StepInput, unpack_step

STOP = ("stop",)


def broadcast_header(header: tuple) -> tuple:
    """Rank 0 passes its header; the others pass None and get rank 0's."""
    box = [header]
    dist.broadcast_object_list(box, src=0, group=get_cpu_group())
    return box[0]


def broadcast_step(step: StepInput) -> None:
    """Rank 0: send the step every rank runs (placeholders already filled into step.packed)."""
    attn = step.attn
    broadcast_header(("step", step.input_ids.shape[0], attn.num_decodes, attn.query_lens, attn.context_lens_host,
                      attn.decode_context_blocks, attn.block_tables.shape[1]))
    dist.broadcast(step.packed, src=0, group=get_device_group())
    dist.broadcast(attn.block_tables.contiguous(), src=0, group=get_device_group())


def receive_step(header: tuple, device: torch.device) -> StepInput:
    """Ranks > 0: the step whose header was received."""
    _, n, num_decodes, query_lens, context_lens, decode_blocks, width = header
    b = len(query_lens)
    packed = torch.empty(3 * n + 2 * b, dtype=torch.int64, device=device)
    tables = torch.empty(b, width, dtype=torch.int64, device=device)
    dist.broadcast(packed, src=0, group=get_device_group())
    dist.broadcast(tables, src=0, group=get_device_group())
    return unpack_step(packed, tables, n, num_decodes, query_lens, context_lens, decode_blocks)


def all_reduce_probe(header: tuple, device: torch.device) -> float:
    """Every rank: the all-reduce of one shape, `iterations` times -> seconds per all-reduce (on this rank)."""
    _, shape, dtype_name, iterations = header
    x = torch.zeros(shape, dtype=getattr(torch, dtype_name), device=device)
    tensor_model_parallel_all_reduce(x)  # warm-up (NCCL sets up its channels on first use)
    _sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        tensor_model_parallel_all_reduce(x)
    _sync(device)
    return (time.perf_counter() - started) / iterations


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
