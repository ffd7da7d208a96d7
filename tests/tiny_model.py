"""Test helper: a tiny random Llama in an HF folder, with a real byte-level BPE tokenizer and chat template."""

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
                    padded_vocab: int = 0) -> Path:
    """padded_vocab: extra embedding rows past the tokenizer's vocabulary, as some checkpoints have."""
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

    cfg = transformers.LlamaConfig(
        vocab_size=vocab + padded_vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_len, tie_word_embeddings=True,
        eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=tok.token_to_id("<|im_start|>"),
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
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


def prefill_each(model, cache, tables, prompts, lens, block_size: int) -> None:
    """Prefill prompt i's first lens[i] tokens into blocks tables[i] (from slot 0 of its first block), one
    sequence at a time through the PyTorch paged attention: the reference state the decode kernels start from."""
    from kvtriton.backend.attention.metadata import AttentionMetadata
    from kvtriton.backend.attention.paged import PagedAttention

    device = tables.device
    for i, n in enumerate(lens):
        meta = AttentionMetadata(slot_mapping=tables[i, 0] * block_size + torch.arange(n, device=device),
                                 block_tables=tables[i : i + 1], context_lens=torch.tensor([n], device=device),
                                 num_decodes=0, query_lens=[n], context_lens_host=[n], decode_context_blocks=0)
        model(prompts[i][:n], torch.arange(n, device=device), PagedAttention(cache, meta, 64**-0.5))
