"""TensorParallelRunner: one model split over tensor_parallel_size processes, behind the runner interface.

This process is rank 0: it holds rank 0's shard in a TorchRunner and, each step,
broadcasts the step's inputs (runners/step_broadcast.py) before running its own
part; the ranks' all-reduces inside the forward pass keep them in step, and the
LM head gathers the full logits for the sampler here. Ranks 1..tp-1 are worker
processes started with torch.multiprocessing's spawn (runners/tp_worker.py) that
rendezvous through rank 0's TCPStore. gloo on the CPU, NCCL on CUDA (rank r on
cuda:r, CUDA graphs captured per rank with the all-reduce inside).

Failure: ranks run in lockstep, so a failed step leaves the group unusable. A
dead worker (or any failure inside a step) raises RunnerFailedError, which fails
the engine: every in-flight request ends with an error and it reports unhealthy.
A watcher thread sees a worker exit even while the engine is idle
(`check_health`). `close()` stops the workers and leaves no process behind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.distributed.parallel_state import (
    abort_tensor_parallel,
    create_store,
    destroy_tensor_parallel,
    init_tensor_parallel,
    spawn_context,
)
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.parallel.sharded_loader import ShardReport
from kvtriton.backend.models.parallel.sharding import check_tensor_parallel
from kvtriton.backend.runners.step_broadcast import STOP, all_reduce_probe, broadcast_header, broadcast_step
from kvtriton.backend.runners.step_input import StepInput
from kvtriton.backend.runners.torch_runner import TorchRunner
from kvtriton.backend.runners.tp_worker import WorkerSpec, cpu_threads_per_rank, rank_device, worker_main

log = logging.getLogger("kvtriton")

STARTUP_POLL_S = 0.05
JOIN_TIMEOUT_S = 10.0


class RunnerFailedError(RuntimeError):
    """The runner can run no further step (a tensor-parallel rank died or fell out of step): the engine fails."""


class TensorParallelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, folder: str, device: torch.device,
                 dtype: torch.dtype, max_model_len: int):
        tp = config.tensor_parallel_size
        check_tensor_parallel(model_config, tp)
        if device.type == "cuda" and torch.cuda.device_count() < tp:
            raise RuntimeError(f"tensor_parallel_size {tp} needs {tp} visible GPUs; this process sees "
                               f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES)")
        if config.quantization == "auto":
            log.info("quantization auto: none (tensor parallelism loads float shards)")
        self.world_size, self.device = tp, rank_device(device.type, 0)
        self._failure: str | None = None  # set once a worker is gone or a step failed
        self._closing = False
        self._threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(tp))
        store = create_store(tp)
        spec = WorkerSpec(config, model_config, str(folder), self.device.type, dtype, max_model_len, "127.0.0.1",
                          store.port, os.getpid())
        # EngineProcess runs the engine as a daemon process, and multiprocessing lets no daemon start children.
        # The workers are this engine's: they are stopped in close() and exit when this process is gone.
        if multiprocessing.current_process().daemon:
            multiprocessing.current_process().daemon = False
        context = spawn_context()
        self._workers = [context.Process(target=worker_main, args=(rank, spec), name=f"kvtriton-tp{rank}",
                                         daemon=True) for rank in range(1, tp)]
        for worker in self._workers:
            worker.start()
        try:
            self._wait_for(store, "joined")
            init_tensor_parallel(store, 0, tp, self.device)
            self.runner = TorchRunner(config, model_config, folder, self.device, dtype, max_model_len)
            reports = self._wait_for(store, "loaded")
            blocks = [self.runner.num_blocks] + [r["num_blocks"] for r in reports]
            if len(set(blocks)) > 1:
                raise RuntimeError(f"the tensor-parallel ranks sized different KV pools: {blocks} blocks")
        except BaseException:
            self._stop_workers(graceful=False)
            destroy_tensor_parallel()
            torch.set_num_threads(self._threads)
            raise
        self.shard_reports = [self.runner.shard_report, *(ShardReport(r["param_bytes"], r["checkpoint_bytes_read"])
                                                          for r in reports)]
        self.model, self.num_blocks = self.runner.model, self.runner.num_blocks
        self._watcher = threading.Thread(target=self._watch_workers, name="kvtriton-tp-watcher", daemon=True)
        self._watcher.start()
        log.info("tensor parallel: %d ranks (%s), rank 0 here, workers pids %s", tp,
                 "NCCL" if self.device.type == "cuda" else "gloo", [w.pid for w in self._workers])

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    # ---- start-up ------------------------------------------------------------------------------
    def _wait_for(self, store, stage: str) -> list[dict]:
        """Each worker's "<stage>/<rank>" key (its JSON value), failing as soon as one exits or reports an error."""
        values: list[dict] = []
        for rank, worker in enumerate(self._workers, start=1):
            key = f"{stage}/{rank}"
            while not store.check([key]):
                if worker.exitcode is not None:
                    raise RuntimeError(f"tensor-parallel rank {rank} exited (code {worker.exitcode}) while starting; "
                                       "its log has the reason")
                time.sleep(STARTUP_POLL_S)
            value = json.loads(store.get(key)) if stage == "loaded" else {}
            if "error" in value:
                raise RuntimeError(f"tensor-parallel rank {rank} could not start: {value['error']}")
            values.append(value)
        return values

    # ---- the runner interface --------------------------------------------------------------------
    def execute(self, step: StepInput) -> torch.Tensor:
        """-> logits (B, V) fp32, gathered from every rank."""
        self.check_health()
        try:
            broadcast_step(step)
            return self.runner.execute(step)
        except Exception as exc:
            self._failure = self._failure or f"a tensor-parallel step failed: {type(exc).__name__}: {exc}"
            raise RunnerFailedError(self._failure) from exc

    def check_health(self) -> None:
        """Raise RunnerFailedError once a worker has exited or a step failed."""
        if self._failure is not None:
            raise RunnerFailedError(self._failure)

    def time_all_reduce(self, shape: tuple[int, ...], dtype: torch.dtype, iterations: int = 20) -> float:
        """Seconds per all-reduce of one `shape` tensor over the group, every rank taking part (benchmarks)."""
        self.check_health()
        header = ("all_reduce_probe", tuple(shape), str(dtype).removeprefix("torch."), iterations)
        return all_reduce_probe(broadcast_header(header), self.device)

    def close(self) -> None:
        """Stop the workers (they leave the group and exit), then leave the group and free rank 0's shard."""
        self._closing = True
        if self._failure is None:
            try:
                broadcast_header(STOP)
            except Exception:
                log.warning("could not tell the tensor-parallel workers to stop; ending them")
        self._stop_workers(graceful=self._failure is None)
        destroy_tensor_parallel()
        self.runner.close()
        if self.device.type == "cpu":
            torch.set_num_threads(self._threads)

    # ---- supervision -------------------------------------------------------------------------------
    def _watch_workers(self) -> None:
        sentinels = {w.sentinel: rank for rank, w in enumerate(self._workers, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._closing:
            return
        worker = self._workers[sentinels[ready[0]] - 1]
        worker.join(1)  # reaps it: its exit code
        self._failure = self._failure or f"tensor-parallel rank {sentinels[ready[0]]} exited (code {worker.exitcode})"
        log.error("%s: the engine fails its requests", self._failure)
        abort_tensor_parallel()  # NCCL: unblock a collective waiting on the dead rank (gloo fails by itself)

    def _stop_workers(self, graceful: bool) -> None:
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if graceful else 0)
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.is_alive():
                worker.kill()
                worker.join(5)
