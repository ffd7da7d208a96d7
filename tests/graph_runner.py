"""What the CUDA-graph tests share (tests/test_verify_graphs_gpu.py, tests/test_prefill_graphs_gpu.py): a
small random Llama's TorchRunner on the GPU (bf16, the Triton kernels and torch.compile on, as served), the
sequences prepare_step reads, and the check that a step replayed through a graph is the eager step."""

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.step_input import prepare_step
from kvtriton.backend.runners.torch_runner import TorchRunner

BLOCK = 16


class Seq:
    """What prepare_step reads of a sequence (runners/step_input.ScheduledSequence)."""

    def __init__(self, token_ids, num_computed_tokens, block_ids):
        self.token_ids, self.num_computed_tokens, self.block_ids = token_ids, num_computed_tokens, block_ids
        self.spec_token_ids: list[int] = []
        self.lora_adapter = 0


def small_runner(**config) -> TorchRunner:
    """A 2-layer random Llama (vocabulary 300, 4 heads over 2 KV heads of 64) with a 64-block pool, on cuda."""
    model_config = ModelConfig.from_dict(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=256,
        intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True))
    engine_config = EngineConfig(model="unused", device="cuda", dtype="bfloat16", dummy_weights=True,
                                 block_size=BLOCK, num_kv_blocks=64, max_num_seqs=8, **config)
    torch.manual_seed(0)
    return TorchRunner(engine_config, model_config, None, torch.device("cuda"), torch.bfloat16, 512)


def assert_replay_equals_eager(runner: TorchRunner, scheduled) -> None:
    """The step of `scheduled` (its counts already advanced) through runner.execute, then eagerly: the same
    logits (bf16 tolerance, the same argmax) and the same K/V, the scratch block (padding's slots) aside."""
    batch = prepare_step(scheduled, BLOCK, runner.device)
    replayed = runner.execute(batch).clone()
    k_before = [t.clone() for t in runner.kv.k]
    eager = runner.execute_eager(batch)  # writes the same K/V again
    torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)
    assert torch.equal(replayed.argmax(-1), eager.argmax(-1))
    assert replayed.shape[0] == len(batch.last_token_indices)
    for a, b in zip(k_before, runner.kv.k):
        torch.testing.assert_close(a[: runner.scratch_block], b[: runner.scratch_block], atol=2e-2, rtol=2e-2)
