"""A tensor-parallel worker: ranks 1..tp-1, each a process of its own that runs the runner only.

Rank 0 (runners/tensor_parallel_runner.py, in the engine's process) schedules, samples
and processes outputs; a worker loads its shard, then runs every step rank 0
broadcasts (runners/step_broadcast.py) until told to stop. It reports its start-up
through the rendezvous store: "joined/<rank>" before joining the group, then
"loaded/<rank>" with its ShardReport or the error that stopped it.

A worker never outlives rank 0: a collective with a dead rank fails (gloo sees the
closed connection), and a watcher thread exits when the parent process is gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.distributed.parallel_state import connect_store, destroy_tensor_parallel, init_tensor_parallel
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.step_broadcast import all_reduce_probe, broadcast_header, receive_step

log = logging.getLogger("kvtriton")

PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its runner (picklable: it crosses the spawn)."""

    config: EngineConfig
    model_config: ModelConfig
    folder: str
    device_type: str  # "cpu" or "cuda": rank r runs on cuda:r
    dtype: torch.dtype
    max_model_len: int
    store_host: str
    store_port: int
    parent_pid: int


def rank_device(device_type: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")


def cpu_threads_per_rank(world_size: int) -> int:
    """The ranks share the host's cores (one OpenMP team each, never oversubscribed)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // world_size)


def worker_main(rank: int, spec: WorkerSpec) -> None:
    logging.basicConfig(level=logging.INFO, format=f"kvtriton-tp{rank}: %(message)s", stream=sys.stderr)
    threading.Thread(target=_exit_with_parent, args=(spec.parent_pid,), name="kvtriton-tp-parent", daemon=True).start()
    world = spec.config.tensor_parallel_size
    device = rank_device(spec.device_type, rank)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world))
    store = connect_store(spec.store_host, spec.store_port, world)
    store.set(f"joined/{rank}", "1")
    try:
        init_tensor_parallel(store, rank, world, device)
        from kvtriton.backend.runners.torch_runner import TorchRunner  # after the group: it loads the shard

        runner = TorchRunner(spec.config, spec.model_config, spec.folder, device, spec.dtype, spec.max_model_len)
    except Exception as exc:
        log.exception("rank %d could not start", rank)
        store.set(f"loaded/{rank}", json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        sys.exit(1)
    store.set(f"loaded/{rank}", json.dumps({"num_blocks": runner.num_blocks,
                                            **dataclasses.asdict(runner.shard_report)}))
    del store  # the group holds its own reference while it lives
    _serve(runner, device)
    runner.close()
    destroy_tensor_parallel()


def _serve(runner, device: torch.device) -> None:
    """Run what rank 0 broadcasts until "stop"; any failure ends the process (rank 0 sees it and fails)."""
    with torch.inference_mode():
        while True:
            header = broadcast_header(None)
            if header[0] == "stop":
                return
            if header[0] == "step":
                runner.execute(receive_step(header, device))
            elif header[0] == "all_reduce_probe":
                all_reduce_probe(header, device)
            else:
                raise RuntimeError(f"unknown command from rank 0: {header[0]!r}")


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0's process is gone (killed, say): nobody is left to serve; exit at once."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(1)
