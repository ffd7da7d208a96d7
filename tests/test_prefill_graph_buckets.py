"""Which steps take a CUDA graph, and which bucket (runners/graph_buckets.py, runners/torch_runner.py): the bucket
rules without a GPU (tests/test_prefill_graphs_gpu.py replays the prefill graphs against the eager step)."""

from types import SimpleNamespace

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.runners import graph_buckets
from kvtriton.backend.runners.graph_buckets import batch_buckets, context_buckets, verify_buckets
from kvtriton.backend.runners.torch_runner import TorchRunner


def shape(graphs=True, kernel=True, batches=(1, 2, 4, 8), **config):
    runner = SimpleNamespace(config=EngineConfig(**config), use_cuda_graphs=graphs, prefill_kernel=kernel,
                             graph_batch_sizes=list(batches))
    return TorchRunner._prefill_graph_shape(runner)


def test_token_buckets_double_up_to_the_limit_and_the_step_budget():
    tokens = lambda sizes: sorted({t for t, _ in sizes})  # noqa: E731
    assert tokens(shape()) == [16, 32, 64, 128, 256, 512]
    assert tokens(shape(max_prefill_graph_tokens=300)) == [16, 32, 64, 128, 256, 300]
    assert tokens(shape(max_num_batched_tokens=100)) == [16, 32, 64, 100]


def test_past_512_tokens_buckets_grow_by_an_eighth_at_the_largest_sequence_bucket():
    sizes = shape(batches=(1, 2, 4, 8, 16, 32, 64), max_prefill_graph_tokens=8192, max_num_batched_tokens=8192)
    large = [(t, b) for t, b in sizes if t > 512]
    assert [t for t, _ in large] == ([512 + 64 * i for i in range(1, 9)] + [1024 + 128 * i for i in range(1, 9)]
                                     + [2048 + 256 * i for i in range(1, 9)] + [4096 + 512 * i for i in range(1, 9)])
    assert {b for _, b in large} == {64}
    assert shape(max_prefill_graph_tokens=1000, max_num_batched_tokens=4096)[-2:] == [(960, 8), (1000, 8)]


def test_sequence_buckets_are_the_decode_batches_with_a_token_each():
    assert shape(batches=(1, 2, 4, 8, 16, 32), max_prefill_graph_tokens=32) == [
        (16, 1), (16, 2), (16, 4), (16, 8), (16, 16), (32, 1), (32, 2), (32, 4), (32, 8), (32, 16), (32, 32)]


def test_no_prefill_graphs_when_off_or_without_graphs_or_the_varlen_kernel():
    assert shape(max_prefill_graph_tokens=0) == []
    assert shape(graphs=False) == []
    assert shape(kernel=False) == []


def test_a_step_takes_the_smallest_bucket_that_holds_its_tokens_and_logits_rows():
    runner = SimpleNamespace(prefill_graph_sizes=shape(), _prefill_graphs={"captured": True})

    def bucket(tokens, seqs, rows=None):
        step = SimpleNamespace(input_ids=torch.zeros(tokens), num_seqs=seqs,
                               last_token_indices=torch.zeros(rows or seqs))
        return TorchRunner._prefill_bucket(runner, step)

    assert bucket(20, 1) == (32, 1)
    assert bucket(34, 3) == (64, 4)
    assert bucket(16, 1) == (16, 1)
    assert bucket(17, 2, rows=6) == (32, 8)  # a verify beside a prompt: its proposals' rows count
    assert bucket(513, 1) is None  # past the largest bucket: eager
    runner.prefill_graph_sizes = shape(max_prefill_graph_tokens=2048, max_num_batched_tokens=2048)
    assert bucket(513, 1) == (576, 8)  # past 512 tokens, the largest sequence bucket
    assert bucket(2000, 8) == (2048, 8)
    assert bucket(40, 9) is None  # more sequences than any bucket


def test_decode_batch_buckets_double_and_end_at_max_num_seqs():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert batch_buckets(1) == [1]
    assert batch_buckets(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_the_attention_kernel_takes_one_context_bucket_the_pytorch_path_doubling_ones():
    assert context_buckets(128, 128) == [128]  # the kernel's widest table: every context
    assert context_buckets(8, 128) == [8, 16, 32, 64, 128]
    assert context_buckets(8, 100) == [8, 16, 32, 64, 100]


def test_verify_buckets_reach_the_largest_speculating_batch_within_the_row_limit(monkeypatch):
    batches = [1, 2, 4, 8, 16, 32, 64]
    assert verify_buckets(5, 24, batches) == [1, 2, 4, 8, 16, 32]  # 32 x 5 rows <= 256
    assert verify_buckets(5, 64, batches) == [1, 2, 4, 8, 16, 32]  # 64 x 5 rows is past the limit: eager
    assert verify_buckets(3, 4, batches) == [1, 2, 4]
    monkeypatch.setattr(graph_buckets, "MAX_VERIFY_GRAPH_ROWS", 0)  # benchmarks/spec_bench.py --eager-verify
    assert verify_buckets(3, 4, batches) == []
