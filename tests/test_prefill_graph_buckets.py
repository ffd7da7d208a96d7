"""Which prefill and mixed steps take a CUDA graph, and which bucket (runners/torch_runner.py): the bucket
rules without a GPU (tests/test_prefill_graphs_gpu.py replays the graphs against the eager step)."""

from types import SimpleNamespace

import torch

from kvtriton.backend.config import EngineConfig
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
