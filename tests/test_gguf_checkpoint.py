"""GGUF -> HF folder conversion.

Fast tests build a tiny GGUF with gguf.GGUFWriter from known HF-layout weights and check that the
conversion gives them back. Slow tests convert the real default model and compare it with
transformers' own GGUF loader (weights, tokenizer) and with a greedy generation.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from kvtriton.backend.models import gguf_checkpoint
from kvtriton.backend.models.gguf_checkpoint import convert_gguf

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 32, 4, 2, 8, 64, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ 1", "1 2"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's 256 byte symbols, written out independently of the code under test."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_vocab() -> list[str]:
    return SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def llama_cpp_rope_order(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Row order llama.cpp writes Q/K in: HF row (head, half, i) goes to GGUF row (head, i, half)."""
    head_dim = weight.shape[0] // num_heads
    perm = np.empty(weight.shape[0], dtype=np.int64)
    for h in range(num_heads):
        for i in range(head_dim // 2):
            for half in range(2):
                perm[h * head_dim + 2 * i + half] = h * head_dim + half * (head_dim // 2) + i
    return weight[perm]


# k-quants gguf-py cannot quantize to: (bytes per super-block of 256, where their fp16 scales sit).
K_QUANTS = {"Q4_K": (144, (0, 2)), "Q6_K": (210, (208,))}


def random_kquant_rows(rows: int, cols: int, kind: str, rng) -> np.ndarray:
    """Random blocks of a k-quant, (rows, bytes per row) uint8: every byte pattern is a valid block, save the
    fp16 super-block scales, which are set to small positive numbers (weights of order 0.1 to 1)."""
    size, scale_offsets = K_QUANTS[kind]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    for offset in scale_offsets:
        d = rng.uniform(0.002, 0.02, size=(rows, cols // 256)).astype(np.float16)
        blocks[..., offset:offset + 2] = d[..., None].view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path, *, arch="llama", pre="smollm", untied=False, add_bos=False, quantize_q8=True,
                    extra_tensors=(), quant_types=None, metadata=None, ffn=None, hidden=None,
                    head_dim=None) -> dict[str, np.ndarray]:
    """Write a 2-layer Llama GGUF (arch "qwen2": with q/k/v biases; "qwen3": with QK-norm; neither has its Q/K
    rows interleaved, as llama.cpp writes them); return the HF-layout float32 weights it was made from.

    quant_types: {GGUF tensor name: "Q4_0" | "Q4_1" | "Q8_0" | "Q4_K" | "Q6_K"}; default (quantize_q8): two
    Q8_0 tensors. A k-quant tensor holds random blocks, and its HF weight is their dequantization; k-quants
    need inputs of a multiple of 256: `ffn` (default FFN) and `hidden` (default HIDDEN; heads stay HEADS x head_dim,
    default HEAD_DIM)."""
    ffn, hidden, head_dim = ffn or FFN, hidden or HIDDEN, head_dim or HEAD_DIM
    if quant_types is None:
        quant_types = dict.fromkeys(("blk.1.attn_q.weight", "blk.1.ffn_down.weight"), "Q8_0") if quantize_q8 else {}
    rng = np.random.default_rng(0)
    vocab = tiny_vocab()
    hf = {"model.embed_tokens.weight": rng.standard_normal((len(vocab), hidden), dtype=np.float32),
          "model.norm.weight": rng.standard_normal(hidden, dtype=np.float32)}
    if untied:
        hf["lm_head.weight"] = rng.standard_normal((len(vocab), hidden), dtype=np.float32)
    gguf_tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if untied:
        gguf_tensors["output.weight"] = hf["lm_head.weight"]
    shapes = {"q_proj": (HEADS * head_dim, hidden), "k_proj": (KV_HEADS * head_dim, hidden),
              "v_proj": (KV_HEADS * head_dim, hidden), "o_proj": (hidden, HEADS * head_dim),
              "gate_proj": (ffn, hidden), "up_proj": (ffn, hidden), "down_proj": (hidden, ffn)}
    raw = {}  # GGUF name -> k-quant blocks, in the file's row order
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                  "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for norm, gguf_norm in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            hf[f"{prefix}.{norm}.weight"] = rng.standard_normal(hidden, dtype=np.float32)
            gguf_tensors[f"blk.{layer}.{gguf_norm}.weight"] = hf[f"{prefix}.{norm}.weight"]
        for proj, shape in shapes.items():
            block = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            weight = rng.standard_normal(shape, dtype=np.float32)
            gguf_name = f"blk.{layer}.{gguf_names[proj]}.weight"
            if quant_types.get(gguf_name) in K_QUANTS:
                raw[gguf_name] = random_kquant_rows(*shape, quant_types[gguf_name], rng)
                weight = gguf.quants.dequantize(raw[gguf_name], gguf.GGMLQuantizationType[quant_types[gguf_name]])
            hf[f"{prefix}.{block}.{proj}.weight"] = weight
            if proj == "q_proj" and arch == "llama":
                weight = llama_cpp_rope_order(weight, HEADS)
                raw = {k: llama_cpp_rope_order(v, HEADS) if k == gguf_name else v for k, v in raw.items()}
            elif proj == "k_proj" and arch == "llama":
                weight = llama_cpp_rope_order(weight, KV_HEADS)
                raw = {k: llama_cpp_rope_order(v, KV_HEADS) if k == gguf_name else v for k, v in raw.items()}
            gguf_tensors[gguf_name] = weight
            if arch == "qwen2" and proj in ("q_proj", "k_proj", "v_proj"):
                hf[f"{prefix}.self_attn.{proj}.bias"] = rng.standard_normal(shape[0], dtype=np.float32)
                gguf_tensors[f"blk.{layer}.{gguf_names[proj]}.bias"] = hf[f"{prefix}.self_attn.{proj}.bias"]
        for norm in ("q_norm", "k_norm") if arch == "qwen3" else ():
            hf[f"{prefix}.self_attn.{norm}.weight"] = rng.standard_normal(head_dim, dtype=np.float32)
            gguf_tensors[f"blk.{layer}.attn_{norm}.weight"] = hf[f"{prefix}.self_attn.{norm}.weight"]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    if hidden != HEADS * head_dim:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (metadata or {}).items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    for name, weight in gguf_tensors.items():
        if name in raw:
            kind = gguf.GGMLQuantizationType[quant_types[name]]
            writer.add_tensor(name, raw[name], raw_shape=raw[name].shape, raw_dtype=kind)
        elif name in quant_types:
            kind = gguf.GGMLQuantizationType[quant_types[name]]
            packed = gguf.quants.quantize(weight, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, weight)
    for name, weight in extra_tensors:
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    hf = write_tiny_gguf(root / "tiny.gguf")
    return hf, convert_gguf(root / "tiny.gguf", root / "hf")


def test_config_states_the_llama_shape(tiny):
    _, folder = tiny
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (HIDDEN, FFN, LAYERS)
    heads = (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert heads == (HEADS, KV_HEADS, HEAD_DIM)
    # float32 in the file, published decimals in the config
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["vocab_size"] == len(tiny_vocab()) and config["max_position_embeddings"] == 256
    assert config["tie_word_embeddings"] is True and "rope_scaling" not in config
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2


def test_weights_come_back_in_hf_layout(tiny):
    hf, folder = tiny
    converted = load_file(str(folder / "model.safetensors"))
    assert set(converted) == set(hf)  # tied: no lm_head.weight
    quantized = {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    for name, expected in hf.items():
        assert converted[name].dtype == np.float32 and converted[name].shape == expected.shape, name
        if name in quantized:  # Q8_0 keeps ~1% of the row's max; the un-permutation must still hold
            assert np.abs(converted[name] - expected).max() < 0.02 * np.abs(expected).max(), name
        else:
            np.testing.assert_array_equal(converted[name], expected, err_msg=name)


def test_untied_output_becomes_lm_head(tmp_path):
    hf = write_tiny_gguf(tmp_path / "untied.gguf", untied=True)
    folder = convert_gguf(tmp_path / "untied.gguf", tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(load_file(str(folder / "model.safetensors"))["lm_head.weight"], hf["lm_head.weight"])


def test_tokenizer_splits_digits_and_keeps_special_tokens_whole(tiny):
    _, folder = tiny
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = tiny_vocab()
    ids = lambda *tokens: [vocab.index(t) for t in tokens]  # noqa: E731
    assert tokenizer.encode("hello").ids == ids("hello")
    # smollm isolates every digit, so the merges "Ġ 1" and "1 2" never apply
    assert tokenizer.encode(" 12").ids == ids("Ġ", "1", "2")
    assert tokenizer.encode("<|im_start|>hello<|im_end|>").ids == ids("<|im_start|>", "hello", "<|im_end|>")
    text = "héllo 12 🙂 中文\n\tx"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_gpt2_pre_tokenizer_keeps_digit_runs(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", pre="gpt-2")
    tokenizer = Tokenizer.from_file(str(convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "hf") / "tokenizer.json"))
    vocab = tiny_vocab()
    assert tokenizer.encode(" 12").ids == [vocab.index("Ġ1"), vocab.index("2")]


def test_tokenizer_config_carries_specials_and_chat_template(tiny):
    _, folder = tiny
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False


def test_add_bos_token_prepends_bos(tmp_path):
    write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    folder = convert_gguf(tmp_path / "bos.gguf", tmp_path / "hf")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokenizer.encode("hello").ids == [1, tiny_vocab().index("hello")]
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_llama_cpp_sampling_metadata_becomes_the_generation_config(tmp_path):
    """general.sampling.* (llama.cpp's converter writes them from generation_config.json) go back there, where
    generation_config: auto serves them as request defaults; a GGUF without them gets none (the default model)."""
    from kvtriton.backend.engine.generation_defaults import sampling_defaults

    write_tiny_gguf(tmp_path / "s.gguf", metadata={"general.sampling.temp": 0.7, "general.sampling.top_k": 20,
                                                    "general.sampling.top_p": 0.8})
    folder = convert_gguf(tmp_path / "s.gguf", tmp_path / "hf")
    assert sampling_defaults(folder, "auto") == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_files_convert_without_llama_s_row_order_and_match_transformers(tmp_path, arch):
    """Qwen2 / 2.5 (q/k/v biases) and Qwen3 (QK-norm) GGUFs: their Q/K rows are HF's (llama.cpp interleaves only
    llama's), the Qwen2 pre-tokenizer splits every digit, and transformers' own model on the folder gives the
    logits kvtriton's loader gives."""
    import torch
    import transformers

    from kvtriton.backend.models.loader import load_model

    from tests.llama_reference import prefill_logits

    hf = write_tiny_gguf(tmp_path / "q.gguf", arch=arch, pre="qwen2", quantize_q8=False)
    folder = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]]
    assert config["attention_bias"] is (arch == "qwen2")
    converted = load_file(str(folder / "model.safetensors"))
    assert set(converted) == set(hf)
    for name, expected in hf.items():
        np.testing.assert_array_equal(converted[name], expected, err_msg=name)
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode("12").tokens == ["1", "2"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = [5, 9, 3, 77, 12, 1, 8]
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(load_model(folder), [prompt])[0], want, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    write_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(ValueError, match=r"'gemma'.*supports llama, qwen2, qwen3"):
        convert_gguf(tmp_path / "gemma.gguf", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [tmp_path / "gemma.gguf"]


def test_unknown_tensor_is_an_error_not_skipped(tmp_path):
    router = np.zeros((4, HIDDEN), np.float32)
    write_tiny_gguf(tmp_path / "moe.gguf", extra_tensors=[("blk.0.ffn_gate_inp.weight", router)])
    with pytest.raises(ValueError, match="blk.0.ffn_gate_inp.weight"):
        convert_gguf(tmp_path / "moe.gguf", tmp_path / "hf")


def test_existing_output_folder_is_not_overwritten(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    write_tiny_gguf(tmp_path / "tiny.gguf")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(gguf_checkpoint, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its staging copy


# ---------------------------------------------------------------- the real default model (slow)

SAMPLE_TEXTS = [
    "Hello, world! How are you today?",
    "def f(x):\n    return x**2  # square\n\tpass",
    "Prices: 12345 and 3.14159, year 2024, 1,000,000",
    "Emoji 🙂🚀👍🏽 and accents: café naïve façade",
    "中文测试，日本語のテキスト、한국어 문장",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces, trailing   ",
    "It's they'll we've I'M",
    "<repo_name>x<file_sep><|endoftext|>",
    "a\n\n\nb\r\nc",
]


@pytest.fixture(scope="module")
def default_model():
    from kvtriton.backend.models.default_model import ensure_default_gguf, ensure_default_model

    return ensure_default_model(), ensure_default_gguf()


@pytest.mark.slow
def test_weights_equal_transformers_gguf_load(default_model):
    transformers = pytest.importorskip("transformers")
    folder, gguf_path = default_model
    ours = transformers.AutoModelForCausalLM.from_pretrained(folder).state_dict()
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    reference = reference.state_dict()
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-6, name


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(default_model):
    transformers = pytest.importorskip("transformers")
    folder, gguf_path = default_model
    ours = transformers.AutoTokenizer.from_pretrained(folder)
    reference = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in SAMPLE_TEXTS:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text


@pytest.mark.slow
def test_tokenizer_isolates_digits_like_llama_cpp_smollm(default_model):
    """transformers' GGUF loader has no 'smollm' entry and lets a run of spaces reach the digits;
    llama.cpp (and SmolLM2's own tokenizer.json) split every digit out first."""
    folder, _ = default_model
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for spaces, digits in (("    ", "1234"), ("x  ", "12")):
        assert tokenizer.encode(spaces + digits).ids == tokenizer.encode(spaces).ids + tokenizer.encode(digits).ids


@pytest.mark.slow
def test_greedy_answer_names_paris(default_model):
    transformers = pytest.importorskip("transformers")
    folder, _ = default_model
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=20, do_sample=False)  # (1, T + new)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_the_streamed_safetensors_file_reads_back_as_the_packages_own(tmp_path):
    """write_safetensors makes one tensor at a time; the safetensors package reads the file, header, metadata and
    every tensor, as it would read its own."""
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    arrays = {"b": rng.standard_normal((3, 5), dtype=np.float32), "a.weight": rng.standard_normal(7, dtype=np.float32),
              "scalar_row": rng.standard_normal((1, 1), dtype=np.float32)}
    gguf_checkpoint.write_safetensors(tmp_path / "m.safetensors",
                                      [(name, a.shape, lambda a=a: a) for name, a in arrays.items()], {"format": "pt"})
    got = load_file(str(tmp_path / "m.safetensors"))
    assert set(got) == set(arrays) and all(np.array_equal(got[n], a) for n, a in arrays.items())
    with safe_open(str(tmp_path / "m.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="the header says float32"):
        gguf_checkpoint.write_safetensors(tmp_path / "bad.safetensors", [("x", (2,), lambda: np.zeros(3, np.float32))],
                                          {})
