"""Tensor parallelism on the CPU with gloo: sharded loading, logits and greedy output equal to one process,
a dead worker fails the engine without hanging, and shutdown leaves no process behind."""

import os
import queue
import signal
import time
from dataclasses import dataclass, field

import pytest
import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.engine_process import EngineProcess
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.parallel.sharding import check_tensor_parallel, rank_model_config
from kvtriton.backend.runners.step_input import prepare_step

from tests.engine_helpers import assert_engine_dead
from tests.process_tree import alive, cmdline, descendants
from tests.tiny_model import make_tiny_model

pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of", "blocks of keys and values"]
# fp32 logits of a tensor-parallel step against one process: the sums are split over the ranks, so they round
# differently. Measured max |diff|: 1.4e-6 (tiny, TP 2) and 1.9e-6 (TP 4) of logits up to 31; 1.6e-4 (default
# model, TP 3) of logits up to 35. The bound leaves 6x margin over the largest.
LOGITS_ATOL = 1e-3


@dataclass
class Seq:  # what prepare_step reads of a scheduled sequence
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    spec_token_ids: list[int] = field(default_factory=list)  # no speculative proposals
    lora_adapter: int = 0  # the base model


def run_steps(runner, block_size: int, device: str = "cpu") -> list[torch.Tensor]:
    """Two prefills of different lengths, then three decode steps of both: the logits of each step."""
    seqs = [Seq([5, 17, 33, 2, 9, 101, 7], block_ids=[0, 1, 2]), Seq([44, 3, 250, 12], block_ids=[3, 4, 5])]
    logits = []
    scheduled = []
    for seq in seqs:
        seq.num_computed_tokens = len(seq.token_ids)
        scheduled.append((seq, len(seq.token_ids)))
    logits.append(runner.execute(prepare_step(scheduled, block_size, device)))
    for _ in range(3):
        for seq, row in zip(seqs, logits[-1]):
            seq.token_ids.append(int(row.argmax()))
            seq.num_computed_tokens += 1
        logits.append(runner.execute(prepare_step([(s, 1) for s in seqs], block_size, device)))
    return logits


class Outputs:
    """A request's sink whose end is awaited with a deadline: a regression fails the test instead of hanging it."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()

    def put(self, output) -> None:
        self.queue.put(output)

    def first(self, timeout_s: float = 60):
        return self.queue.get(timeout=timeout_s)

    def last(self, timeout_s: float = 60):
        while not (out := self.queue.get(timeout=timeout_s)).finished:
            pass
        return out


def tiny_config(folder, tp: int, **overrides) -> EngineConfig:
    return EngineConfig(model=str(folder), device="cpu", block_size=4, num_kv_blocks=512, max_num_seqs=8,
                        max_num_batched_tokens=64, tensor_parallel_size=tp, **overrides)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))  # 4 query heads, 2 KV heads


@pytest.fixture(scope="module")
def reference(tiny):
    return single_process_reference(tiny_config(tiny, 1))


def single_process_reference(config: EngineConfig, device: str = "cpu"):
    """One process: the logits of run_steps, the greedy outputs of PROMPTS and the model's parameter bytes."""
    engine = LLMEngine(config)
    logits = run_steps(engine.runner, engine.config.block_size, device)
    whole = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    outputs = engine.generate(PROMPTS, GREEDY)
    engine.shutdown()
    return logits, outputs, whole


def check_tp_engine(config: EngineConfig, reference, replicated_share: float = 0.15) -> None:
    """replicated_share: the part of a rank's parameters beyond whole / tp (norms, replicated KV heads)."""
    expected_logits, expected_outputs, whole = reference
    tp = config.tensor_parallel_size
    engine = LLMEngine(config)
    try:
        logits = run_steps(engine.runner, engine.config.block_size)
        for got, want in zip(logits, expected_logits):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=LOGITS_ATOL, rtol=0)
        # No rank holds the whole model: each read from the checkpoint only what it keeps (its shard), and
        # keeps about 1/tp of it (the norms, and KV heads when replicated, are whole on every rank).
        for report in engine.runner.shard_reports:
            assert report.checkpoint_bytes_read <= report.param_bytes < whole / tp * (1 + replicated_share)
        outputs = engine.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outputs] == [e.token_ids for e in expected_outputs]
        assert [o.text for o in outputs] == [e.text for e in expected_outputs]
    finally:
        engine.shutdown()


def test_config_refuses_what_tensor_parallelism_cannot_run():
    for kwargs, message in [
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
        (dict(tensor_parallel_size=2, runner="onnxruntime"), "runs on the torch runner"),
        (dict(tensor_parallel_size=2, quantization="int4"), "not supported yet"),
        (dict(tensor_parallel_size=2, device="cuda:1"), "rank r runs on cuda:r"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineConfig(**kwargs)
    assert EngineConfig.from_mapping({"tensor_parallel_size": "2"}).tensor_parallel_size == 2


def test_head_counts_decide_the_world_sizes():
    def cfg(heads, kv, inter=1536):
        return ModelConfig("LlamaForCausalLM", 49152, 576, inter, 2, heads, kv, 64, 1e-5, 1e4, 2048, True)

    check_tensor_parallel(cfg(9, 3), 3)  # the default model
    check_tensor_parallel(cfg(4, 2), 4)  # KV heads replicated: 2 ranks share each
    assert rank_model_config(cfg(4, 2), 4).num_kv_heads == 1
    assert rank_model_config(cfg(9, 3), 3).num_heads == 3
    with pytest.raises(ValueError, match="must divide the model's 9 attention heads; this model splits over 1, 3$"):
        check_tensor_parallel(cfg(9, 3), 2)
    with pytest.raises(ValueError, match="one must divide the other"):
        check_tensor_parallel(cfg(12, 3), 4)
    with pytest.raises(ValueError, match="intermediate_size"):
        check_tensor_parallel(cfg(4, 2, inter=1537), 2)


def test_an_engine_whose_model_does_not_split_fails_at_load_in_one_line(tiny):
    with pytest.raises(ValueError, match=r"^tensor_parallel_size 3 must divide the model's 4 attention heads; "
                                         r"this model splits over 1, 2, 4$"):
        LLMEngine(tiny_config(tiny, 3))


def test_tp2_logits_and_greedy_output_equal_one_process(tiny, reference):
    check_tp_engine(tiny_config(tiny, 2), reference)


@pytest.mark.slow
def test_qwen3_at_tp2_equals_one_process(tmp_path):
    """QK-norm's weights (one head's width) are replicated like the other norms."""
    folder = make_tiny_model(tmp_path / "qwen3", architecture="qwen3")
    check_tp_engine(tiny_config(folder, 2), single_process_reference(tiny_config(folder, 1)))


@pytest.mark.slow
def test_tp4_with_replicated_kv_heads_equals_one_process(tiny, reference):
    check_tp_engine(tiny_config(tiny, 4), reference)


def test_a_dead_worker_fails_every_request_and_the_engine(tiny):
    engine = LLMEngine(tiny_config(tiny, 2)).start()
    workers = engine.runner.worker_pids
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    sinks = [engine.add_request(f"r{i}", p, long, Outputs()) for i, p in enumerate(PROMPTS)]
    sinks[0].first()  # generating
    os.kill(workers[0], signal.SIGKILL)
    assert_engine_dead(engine, [sink.last() for sink in sinks], "engine failed")
    engine.shutdown(timeout_s=1)


def test_an_idle_engine_sees_its_worker_die(tiny):
    engine = LLMEngine(tiny_config(tiny, 2)).start()
    os.kill(engine.runner.worker_pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.is_healthy() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.is_healthy()
    engine.shutdown(timeout_s=1)


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_engine_process_shutdown_leaves_no_process_behind(tiny):
    engine = EngineProcess(tiny_config(tiny, 2))
    tree = {engine.pid} | descendants(engine.pid)
    assert len(tree) >= 2  # the engine (rank 0) and its worker (rank 1), at least
    assert engine.add_request("s", "hello", GREEDY).result().finish_reason == "length"
    engine.shutdown(timeout_s=5)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in tree if alive(p)]


@pytest.mark.slow
def test_default_model_fp32_at_tp3_equals_one_process(default_model_folder):
    """SmolLM2-135M: 9 query heads and 3 KV heads, one KV head per rank."""
    settings = dict(model="default", device="cpu", dtype="float32", quantization="none", num_kv_blocks=64,
                    max_num_seqs=4, max_num_batched_tokens=128, max_model_len=512)
    reference = single_process_reference(EngineConfig(**settings))
    check_tp_engine(EngineConfig(**settings, tensor_parallel_size=3), reference, replicated_share=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("tp, compile_layers", [(2, False), (2, True), (4, False)])
def test_gpu_tp_with_cuda_graphs_and_triton_kernels_equals_one_gpu(tmp_path, tp, compile_layers):
    """NCCL, each rank on cuda:rank, decode replaying CUDA graphs with the all-reduces captured, Triton attention
    kernels on each rank's heads (head_dim 32: the kernels' smallest). bf16: the logits round differently on
    the split sums, so they are compared loosely; greedy output exactly (the tiny model's logits are sharp)."""
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA GPUs")
    folder = make_tiny_model(tmp_path / "tiny", hidden=128)
    settings = dict(model=str(folder), device="cuda", dtype="bfloat16", block_size=16, num_kv_blocks=64,
                    max_num_seqs=8, max_num_batched_tokens=64, enable_torch_compile=compile_layers)
    expected_logits, expected_outputs, _ = single_process_reference(EngineConfig(**settings), "cuda")
    engine = LLMEngine(EngineConfig(**settings, tensor_parallel_size=tp))
    try:
        assert engine.runner.runner._graphs, "rank 0 captured no CUDA graph"
        for got, want in zip(run_steps(engine.runner, 16, "cuda"), expected_logits):
            torch.testing.assert_close(got, want, atol=0.25, rtol=0.02)
        outputs = engine.generate(PROMPTS, GREEDY)
        assert [o.token_ids for o in outputs] == [e.token_ids for e in expected_outputs]
    finally:
        engine.shutdown()


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_a_dead_worker_under_engine_process_fails_its_requests_and_leaves_nothing_behind(tiny):
    """As Triton runs it: the engine (rank 0) in EngineProcess's child, its worker a grandchild."""
    engine = EngineProcess(tiny_config(tiny, 2))
    tree = {engine.pid} | descendants(engine.pid)
    [worker] = [pid for pid in descendants(engine.pid) if "spawn_main" in cmdline(pid)]
    sink = engine.add_request("long", "hello", SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True),
                              Outputs())
    sink.first()  # generating
    os.kill(worker, signal.SIGKILL)
    last = sink.last()
    assert last.finish_reason == "error" and "engine failed" in last.error
    assert not engine.is_healthy()
    engine.shutdown(timeout_s=1)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in tree if alive(p)]
