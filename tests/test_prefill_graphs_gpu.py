"""On a CUDA GPU: prefill and mixed steps replayed through their CUDA graphs (runners/torch_runner.py) give the
eager step's logits and K/V. A small random Llama built from a config (no checkpoint, no tokenizer); bf16, the
Triton kernels and torch.compile on, as served."""

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
                          num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=128, max_prefill_graph_tokens=64)
    torch.manual_seed(0)
    runner = TorchRunner(config, model_config, None, torch.device("cuda"), torch.bfloat16, 512)
    yield runner
    runner.close()


def test_prefill_graphs_are_captured_per_token_and_sequence_bucket(runner):
    assert runner.prefill_graph_sizes == [(16, 1), (16, 2), (16, 4), (16, 8), (32, 1), (32, 2), (32, 4), (32, 8),
                                          (64, 1), (64, 2), (64, 4), (64, 8)]
    assert sorted(runner._prefill_graphs) == sorted(runner.prefill_graph_sizes)


def test_prefill_graph_equals_the_eager_step(runner):
    """A whole prompt; a prompt beside decodes; a chunk after a cached prefix; a step past the largest bucket
    (eager): logits and K/V as the eager step's, each through the bucket it fits."""
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(3, 300, (n,), generator=g).tolist()  # noqa: E731
    replays = []
    replay = runner._replay_prefill
    runner._replay_prefill = lambda step, bucket: replays.append(bucket) or replay(step, bucket)

    def step(scheduled):
        for seq, n in scheduled:
            seq.num_computed_tokens += n
        batch = prepare_step(scheduled, BLOCK, runner.device)
        replayed = runner.execute(batch).clone()
        k_before = [t.clone() for t in runner.kv.k]
        eager = runner.execute_eager(batch)  # writes the same K/V again
        torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)
        assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
        assert replayed.shape[0] == len(batch.last_token_indices)
        for a, b in zip(k_before, runner.kv.k):  # the scratch block (padding tokens' slots) aside
            torch.testing.assert_close(a[: runner.scratch_block], b[: runner.scratch_block], atol=2e-2, rtol=2e-2)
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
