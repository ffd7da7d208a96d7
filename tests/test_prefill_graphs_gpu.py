"""On a CUDA GPU: prefill and mixed steps replayed through their CUDA graphs (runners/torch_runner.py) give the
eager step's logits and K/V. A small random Llama built from a config (no checkpoint, no tokenizer); bf16, the
Triton kernels and torch.compile on, as served."""

import pytest
import torch

from tests.graph_runner import Seq, assert_replay_equals_eager, small_runner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def runner():
    runner = small_runner(max_num_batched_tokens=128, max_prefill_graph_tokens=64)
    yield runner
    runner.close()


def record_replays(runner) -> list:
    """The buckets of the runner's prefill-graph replays from now on, in order (an instance attribute wraps the
    method: `del runner._replay_prefill` takes it away)."""
    replays, replay = [], runner._replay_prefill
    runner._replay_prefill = lambda step, bucket: replays.append(bucket) or replay(step, bucket)
    return replays


def test_prefill_graphs_are_captured_per_token_and_sequence_bucket(runner):
    assert runner.prefill_graph_sizes == [(16, 1), (16, 2), (16, 4), (16, 8), (32, 1), (32, 2), (32, 4), (32, 8),
                                          (64, 1), (64, 2), (64, 4), (64, 8)]
    assert sorted(runner._prefill_graphs) == sorted(runner.prefill_graph_sizes)


def test_prefill_graph_equals_the_eager_step(runner):
    """A whole prompt; a prompt beside decodes; a chunk after a cached prefix; a step past the largest bucket
    (eager): logits and K/V as the eager step's, each through the bucket it fits."""
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    replays = record_replays(runner)

    def step(scheduled):
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        assert_replay_equals_eager(runner, scheduled)
        for seq, _ in scheduled:
            seq.token_ids.append(7)

    try:
        a = Seq(tokens(21), 0, [0, 1, 2, 3])
        step([(a, 21)])  # 21 tokens, 1 sequence: bucket (32, 1)
        b, c = Seq(tokens(9), 0, [4, 5]), Seq(tokens(40), 0, [6, 7, 8, 9])
        step([(a, 1), (b, 9), (c, 24)])  # a decode, a whole prompt, a first chunk: 34 tokens, 3 sequences
        step([(a, 1), (c, 16)])  # the chunk after c's 24 cached tokens
        d = Seq(tokens(100), 0, list(range(10, 17)))
        step([(d, 100)])  # past the largest bucket: eager
    finally:
        del runner._replay_prefill
    assert replays == [(32, 1), (64, 4), (32, 2)]


def test_a_step_past_512_tokens_replays_a_fine_bucket_as_the_eager_step():
    """Past 512 tokens the buckets grow by eighths at the largest sequence bucket: two 300-token prompts (600
    tokens) take the (640, 8) graph, and its logits and K/V are the eager step's."""
    runner = small_runner(max_num_batched_tokens=1024, max_prefill_graph_tokens=1024)
    try:
        assert [s for s in runner.prefill_graph_sizes if s[0] > 512] == [(t, 8) for t in range(576, 1025, 64)]
        replays = record_replays(runner)
        g = torch.Generator().manual_seed(1)
        a = Seq(torch.randint(3, 300, (300,), generator=g).tolist(), 300, list(range(0, 19)))
        b = Seq(torch.randint(3, 300, (300,), generator=g).tolist(), 300, list(range(19, 38)))
        assert_replay_equals_eager(runner, [(a, 300), (b, 300)])
        assert replays == [(640, 8)]
    finally:
        runner.close()
