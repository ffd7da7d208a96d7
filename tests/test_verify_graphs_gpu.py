"""On a CUDA GPU: a verify step replayed through its CUDA graph (runners/torch_runner.py, attention/uniform.py)
gives the eager step's logits and K/V. A small random Llama built from a config (no checkpoint, no
tokenizer); bf16, the Triton kernels and torch.compile on, as served."""

import pytest
import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.step_input import prepare_step
from kvtriton.backend.runners.torch_runner import TorchRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BLOCK = 16


class Seq:
    """What prepare_step reads of a sequence (runners/step_input.ScheduledSequence)."""

    def __init__(self, token_ids, num_computed_tokens, block_ids):
        self.token_ids, self.num_computed_tokens, self.block_ids = token_ids, num_computed_tokens, block_ids
        self.spec_token_ids: list[int] = []


@pytest.fixture(scope="module")
def runner():
    model_config = ModelConfig.from_dict(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=256,
        intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True))
    config = EngineConfig(model="unused", device="cuda", dtype="bfloat16", dummy_weights=True, block_size=BLOCK,
                          num_kv_blocks=64, max_num_seqs=8, speculative_method="ngram", num_speculative_tokens=4)
    torch.manual_seed(0)
    runner = TorchRunner(config, model_config, None, torch.device("cuda"), torch.bfloat16, 512)
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
        batch = prepare_step(scheduled, BLOCK, runner.device)
        replayed = runner.execute(batch).clone()
        k_before = [t.clone() for t in runner.kv.k]
        eager = runner.execute_eager(batch)  # writes the same K/V again
        torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)
        assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
        assert replayed.shape[0] == len(batch.last_token_indices)
        for a, b in zip(k_before, runner.kv.k):  # the scratch block (padding rows' slots) aside
            torch.testing.assert_close(a[: runner.scratch_block], b[: runner.scratch_block], atol=2e-2, rtol=2e-2)
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
