"""Test helpers: a tiny random Llama in an HF folder, with a real byte-level BPE tokenizer and chat template; and a
small random Llama loaded in memory, with the decode step the kernel tests compare through PyTorch and Triton."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "What is the capital of France? Paris is the capital of France.",
    "Paged attention stores keys and values in fixed-size blocks. 北京 東京 🚀 ünïcödé",
] * 20


def make_tiny_model(folder: Path, num_layers: int = 2, hidden: int = 64, max_len: int = 512, seed: int = 0,
                    padded_vocab: int = 0, architecture: str = "llama") -> Path:
    """padded_vocab: extra embedding rows past the tokenizer's vocabulary, as some checkpoints have.
    architecture "qwen3": HF's Qwen3 (QK-norm, heads of 32 where hidden / heads is 16)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "add_bos_token": False,
    }))
    import transformers

    shape = dict(
        vocab_size=vocab + padded_vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len, tie_word_embeddings=True,
        eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=tok.token_to_id("<|im_start|>"),
    )
    torch.manual_seed(seed)
    if architecture == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=32)).eval()
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).eval()
    # Sharper logits than the default init, so greedy ties between near-equal logits do not occur.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(25)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_tiny_engine(folder: Path, **overrides):
    """An LLMEngine on a tiny model with small, exact-to-reason-about pools (4-token blocks, 64-token budget)."""
    from kvtriton.backend.config import EngineConfig
    from kvtriton.backend.engine.llm_engine import LLMEngine

    config = dict(model=str(folder), device="cpu", block_size=4, num_kv_blocks=256, max_num_seqs=16,
                  max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def small_decode_model(dtype: torch.dtype, device: str, qkv_bias: bool = False, quantization: str | None = None,
                       qk_norm: bool = False):
    """A 2-layer random Llama (vocabulary 300, 4 heads over 2 KV heads of 64), loaded as served: the model the
    decode-kernel tests step. qkv_bias: Qwen2's form of it; qk_norm: Qwen3's (its norms' weights random, not 1);
    quantization: its layers' ("fp8", "int4")."""
    from kvtriton.backend.models.loader import load_model
    from kvtriton.backend.models.model_config import ModelConfig

    arch = "Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"
    cfg = ModelConfig.from_dict(dict(
        architectures=[arch], vocab_size=300, hidden_size=256, intermediate_size=384,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=True))
    torch.manual_seed(3)
    model = load_model(None, dtype=dtype, device=device, config=cfg, dummy=True, quantization=quantization)
    with torch.no_grad():
        for layer in model.layers if qk_norm else ():
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def decode_step_both_ways(model, prompt_lens: list[int], blocks_per_seq: int, block_size: int = 16):
    """One decode step after a random prompt per sequence, through PyTorch and through the Triton kernels.

    Prompt i's first prompt_lens[i] tokens are prefilled one sequence at a time through the PyTorch paged
    attention, in blocks of their own; then every sequence's next token goes through the model's forward +
    compute_logits on a copy of the pools (the reference) and through the Triton decode step (decode_logits,
    fused matmuls) on the pools themselves. Returns (kernel logits, reference logits, the kernel's pools, the
    reference's pools)."""
    from kvtriton.backend.attention.kv_cache import KVCache
    from kvtriton.backend.attention.metadata import AttentionMetadata
    from kvtriton.backend.attention.paged import PagedAttention
    from kvtriton.backend.models.llama_decode import KernelPagedDecode, decode_logits

    cfg, weight = model.config, model.embed_tokens.weight
    device, scale, batch = weight.device, cfg.head_dim**-0.5, len(prompt_lens)
    cache = KVCache.allocate(cfg.num_layers, batch * blocks_per_seq + 1, block_size, cfg.num_kv_heads, cfg.head_dim,
                             weight.dtype, device)
    tables = torch.arange(batch * blocks_per_seq, device=device).view(batch, blocks_per_seq)
    prompts = [torch.randint(0, cfg.vocab_size, (n + 1,), device=device) for n in prompt_lens]
    with torch.inference_mode():
        for i, n in enumerate(prompt_lens):
            meta = AttentionMetadata(slot_mapping=tables[i, 0] * block_size + torch.arange(n, device=device),
                                     block_tables=tables[i : i + 1], context_lens=torch.tensor([n], device=device),
                                     num_decodes=0, query_lens=[n], context_lens_host=[n], decode_context_blocks=0)
            model(prompts[i][:n], torch.arange(n, device=device), PagedAttention(cache, meta, scale))
        ids = torch.stack([p[-1] for p in prompts])
        pos = torch.tensor(prompt_lens, device=device)
        slots = torch.stack([tables[i, n // block_size] * block_size + n % block_size
                             for i, n in enumerate(prompt_lens)])
        context_lens = pos + 1
        reference = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v])
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=context_lens, num_decodes=batch,
                                 query_lens=[1] * batch, context_lens_host=context_lens.tolist(),
                                 decode_context_blocks=blocks_per_seq, decode_only=True)
        expected = model.compute_logits(model(ids, pos, PagedAttention(reference, meta, scale)))
        got = decode_logits(model, ids, KernelPagedDecode(cache, pos, slots, tables, context_lens, scale, model.rotary),
                            fuse_matmuls=True)
    return got, expected, cache, reference
