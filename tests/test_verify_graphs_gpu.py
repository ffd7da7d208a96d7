"""On a CUDA GPU: a verify step replayed through its CUDA graph (runners/torch_runner.py, attention/uniform.py)
gives the eager step's logits and K/V. A small random Llama built from a config (no checkpoint, no
tokenizer); bf16, the Triton kernels and torch.compile on, as served."""

import pytest
import torch

from kvtriton.backend.runners.step_input import prepare_step

from tests.graph_runner import BLOCK, Seq, assert_replay_equals_eager, small_runner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def runner():
    runner = small_runner(speculative_method="ngram", num_speculative_tokens=4)
    yield runner
    runner.close()


def test_verify_graphs_are_captured(runner):
    # Back-off at 8 (the default): batches up to 7 speculate, bucket 8 covers them; Q = k + 1.
    assert runner.verify_width == 5 and runner.verify_batch_sizes == [1, 2, 4, 8]
    assert sorted(runner._verify_graphs) == [1, 2, 4, 8]


def test_verify_graph_equals_the_eager_step(runner):
    """A decode and verifies of 4 and 2 proposals (bucket 4, one padding sequence), then a lone verify (bucket
    1), then a decode beside a 3-token prompt chunk (also within Q): logits and K/V as the eager step's."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i, n in enumerate([20, 33, 9]):  # prompts, prefilled eagerly but for their last token (sampled, say)
        seq = Seq(torch.randint(3, 300, (n + 1,), generator=g).tolist(), n, list(range(4 * i, 4 * i + 4)))
        runner.execute(prepare_step([(seq, n)], BLOCK, runner.device))
        seqs.append(seq)

    def step(scheduled, proposals):
        for (seq, n), propose in zip(scheduled, proposals):
            seq.spec_token_ids = torch.randint(3, 300, (n - 1,), generator=g).tolist() if propose else []
            seq.num_computed_tokens += n
        assert_replay_equals_eager(runner, scheduled)
        for seq, n in scheduled:  # as if every proposal was accepted, then a token sampled
            seq.token_ids += seq.spec_token_ids + [7]
            seq.spec_token_ids = []

    replays = []
    replay = runner._replay_verify
    runner._replay_verify = lambda batch: replays.append(batch.num_seqs) or replay(batch)
    try:
        step([(seqs[0], 1), (seqs[1], 5), (seqs[2], 3)], [True] * 3)
        step([(seqs[1], 5)], [True])
        fresh = Seq(torch.randint(3, 300, (3,), generator=g).tolist(), 0, [20])  # a 3-token prompt, whole
        step([(seqs[0], 1), (fresh, 3)], [False, False])
    finally:
        del runner._replay_verify
    assert replays == [3, 1, 2]
