"""Convert a Llama-family GGUF file (llama.cpp's architectures llama, qwen2, qwen3) into an HF-style checkpoint
folder.

Everything downstream (the runners, the ONNX exporter, transformers as the test oracle) reads HF
folders, so GGUF is only a distribution format here: it is dequantized to float32 once, and every
runner starts from the same numbers. The folder holds config.json, model.safetensors,
tokenizer.json, tokenizer_config.json and generation_config.json.

A folder converted with floats="unstored" (a GGUF served by path: checkpoint.resolve_checkpoint) leaves
out of model.safetensors the tensors whose blocks the loader takes as stored (quantization.GGUF_BLOCK_TYPES):
fp32 copies of them were 4 bytes a weight on disk, 32 GB for an 8B model whose file is 5 GB. Its
gguf_source.json names the file and those tensors; the loader reads them from the file (gguf_weights),
dequantized to the same float32 numbers, where it needs them as floats. Such a folder is kvtriton's, not
transformers'.

Anything in the file that would change the model's math and that we do not translate (an unknown
tensor, an unknown rope-scaling key, an unknown pre-tokenizer) is an error, never skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from kvtriton.backend.models.checkpoint import GGUF_SOURCE, gguf_identity
from kvtriton.backend.models.gguf_rope import llama3_rope_scaling
from kvtriton.backend.models.quantization import GGUF_BLOCK_TYPES

# llama.cpp's general.architecture -> the transformers class its folder names (the same dense core: Qwen2 adds q/k/v
# biases, Qwen3 QK-norm; models/model_config.py).
# llama.cpp's form of Llama 3.1-style rope scaling: one divisor per rotary frequency, which becomes the config's
# rope_scaling (gguf_rope.py), never a weight.
ROPE_FREQS = "rope_freqs.weight"
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# Those whose Q and K rows llama.cpp's converter interleaves for its rope (Qwen's use the NEOX rope, HF's layout).
ROPE_PERMUTED_ARCHITECTURES = ("llama",)

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",  # qwen2
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",  # qwen3
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}
_BLOCK_TENSOR_NAME = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_SCALING_KEYS = ("type", "factor", "original_context_length", "finetuned")

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> how the text is split before BPE.
_GPT2_BYTE_LEVEL = dict(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(**_GPT2_BYTE_LEVEL),
    # SmolLM's vocabulary was learned with every digit on its own, then GPT-2's byte-level split.
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(**_GPT2_BYTE_LEVEL)]
    ),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
    # Qwen2 / 2.5 / 3: Llama 3's split, but every digit on its own (its tokenizer.json's pre_tokenizer).
    "qwen2": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # llama.cpp's tokenizer.ggml.token_type values


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, floats: str = "all") -> Path:
    """Write the HF folder for `gguf_path` at `out_dir` and return `out_dir`. floats "all": every weight in
    model.safetensors as float32; "unstored": all but those in GGUF_BLOCK_TYPES blocks (module docstring).

    The folder appears whole or not at all: it is written to a sibling temp folder and renamed, so
    an interrupted conversion leaves no half-written checkpoint behind.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists():
        raise FileExistsError(f"output folder {out_dir} already exists; remove it or choose another out_dir")
    reader = gguf.GGUFReader(gguf_path)
    meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path.name}: general.architecture is {arch!r}; GGUF conversion supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (other checkpoints: use their HF folder)"
        )
    if floats not in ("all", "unstored"):
        raise ValueError(f"floats must be 'all' or 'unstored', got {floats!r}")
    tensor_names = [t.name for t in reader.tensors]
    rope_freqs = next((t.data for t in reader.tensors if t.name == ROPE_FREQS), None)
    config = llama_config(meta, tensor_names, rope_freqs)
    tokenizer = build_tokenizer(meta)
    if tokenizer.get_vocab_size() != config["vocab_size"]:
        raise ValueError(
            f"{gguf_path.name}: tokenizer has {tokenizer.get_vocab_size()} tokens but the model "
            f"declares vocab_size {config['vocab_size']}"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would make a shared cache unreadable to other users.
    staging = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        tensors = llama_tensors(reader, config)
        if floats == "unstored":
            types = {hf_tensor_name(t.name, config["num_hidden_layers"]): t.tensor_type.name for t in reader.tensors}
            left = [name for name, _, _ in tensors if types[name] in GGUF_BLOCK_TYPES]
            tensors = [t for t in tensors if t[0] not in left]
            if left:
                _write_json(staging / GGUF_SOURCE, {**gguf_identity(gguf_path), "tensors": left})
        write_safetensors(staging / "model.safetensors", tensors, metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(meta, config))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        generation.update(generation_sampling(meta))
        _write_json(staging / "generation_config.json", generation)
        _write_json(staging / "config.json", config)
        os.chmod(staging / "model.safetensors", (staging / "config.json").stat().st_mode)  # as the JSON files
        os.rename(staging, out_dir)  # the commit point; fails if another writer got there first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def llama_config(meta: dict, tensor_names: list[str], rope_freqs: np.ndarray | None = None) -> dict:
    """The transformers config dict for a GGUF of a supported architecture (its keys are `<arch>.*`);
    `rope_freqs`: the file's rope_freqs.weight, if it has one (Llama 3.1-style scaling, gguf_rope.py)."""
    arch = meta["general.architecture"]

    def key(name, default=KeyError):
        value = meta.get(f"{arch}.{name}", default)
        if value is KeyError:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}, which the model's config needs")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise ValueError("GGUF states a value head size different from the key head size; Llama needs them equal")
    if key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"GGUF rotates only part of each head ({arch}.rope.dimension_count); Llama rotates all")
    config = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _float32_value(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_value(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length"),
        "vocab_size": key("vocab_size", len(meta["tokenizer.ggml.tokens"])),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,  # Qwen2's q/k/v biases
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if (rope_scaling := _rope_scaling(meta, arch)) is not None:
        config["rope_scaling"] = rope_scaling
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ValueError(f"GGUF has both {ROPE_FREQS} and {arch}.rope.scaling.* metadata; one of them would be "
                             "ignored")
        scaling = llama3_rope_scaling(rope_freqs, config["rope_theta"], head_dim)
        config["rope_scaling"] = {k: _float32_value(v) if isinstance(v, float) else v for k, v in scaling.items()}
    for name, gguf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            config[f"{name}_token_id"] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    return config


def _rope_scaling(meta: dict, arch: str) -> dict | None:
    prefix = f"{arch}.rope.scaling."
    scaling = {k.removeprefix(prefix): v for k, v in meta.items() if k.startswith(prefix)}
    if unknown := sorted(set(scaling) - set(_ROPE_SCALING_KEYS)):
        raise ValueError(f"GGUF rope scaling keys {unknown} are not supported; supported: {list(_ROPE_SCALING_KEYS)}")
    kind = scaling.get("type", "none" if "factor" not in scaling else None)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _float32_value(scaling["factor"])}
    if kind == "yarn":
        return {
            "rope_type": "yarn",
            "factor": _float32_value(scaling["factor"]),
            "original_max_position_embeddings": int(scaling["original_context_length"]),
        }
    raise ValueError(f"GGUF {prefix}type {kind!r} is not supported; supported: none, linear, yarn")


def gguf_weights(folder: Path) -> dict[str, Callable[[], np.ndarray]]:
    """{HF tensor name: a function that makes its float32 tensor} for the weights a floats="unstored" folder
    left in its GGUF ({} for a whole folder). The file must be the one converted: same path, size and mtime."""
    source = folder / GGUF_SOURCE
    if not source.is_file():
        return {}
    record = json.loads(source.read_text())
    path = Path(record["gguf"])
    now = gguf_identity(path) if path.is_file() else None
    if now is None or (now["size"], now["mtime_ns"]) != (record["size"], record["mtime_ns"]):
        raise FileNotFoundError(f"{folder} takes {len(record['tensors'])} of its weights from {path}, which is "
                                f"{'gone' if now is None else 'changed'} since the conversion; serve the GGUF "
                                f"again by its path (a changed file converts anew) or delete {folder}")
    config = json.loads((folder / "config.json").read_text())
    wanted = set(record["tensors"])
    return {name: make for name, _, make in llama_tensors(gguf.GGUFReader(path), config) if name in wanted}


def llama_tensors(reader: gguf.GGUFReader, config: dict) -> list[tuple[str, tuple[int, ...], Callable]]:
    """(transformers' name, shape, a function that makes the float32 tensor, Q and K back in HF's rope layout)
    per weight of the file: made one at a time by write_safetensors."""
    permuted = config["model_type"] in ROPE_PERMUTED_ARCHITECTURES

    def make(tensor, name: str, shape: tuple[int, ...]) -> np.ndarray:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weight = weight.reshape(shape)
        if permuted and name.endswith("q_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
        return np.ascontiguousarray(weight)

    tensors = []
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # not a weight: it is the config's rope_scaling (llama_config)
        name = hf_tensor_name(tensor.name, config["num_hidden_layers"])
        shape = tuple(reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        tensors.append((name, shape, lambda tensor=tensor, name=name, shape=shape: make(tensor, name, shape)))
    names = [name for name, _, _ in tensors]
    if len(set(names)) != len(names):
        raise ValueError("GGUF holds a tensor twice; it is not a Llama checkpoint this converter understands")
    if "model.embed_tokens.weight" not in names:
        raise ValueError("GGUF has no token_embd.weight; it is not a complete Llama checkpoint")
    return tensors


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], Callable]], metadata: dict) -> None:
    """A float32 safetensors file of `tensors`, made and written one at a time. The safetensors package writes
    from a dict that holds every tensor at once: a GGUF of an 8B model is 32 GB of float32, more than the host
    that serves its 4.7 GB of blocks may have. The format is the package's (its loaders read this file): an
    8-byte little-endian header length, the JSON header (each tensor's dtype, shape and byte range, and
    __metadata__; spaces pad it to a multiple of 8 bytes), then the tensors' bytes in the header's order."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in tensors:
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, shape, make in tensors:
            weight = make()
            if weight.shape != shape or weight.dtype != np.float32:
                raise ValueError(f"{name}: made {weight.dtype} {weight.shape}, the header says float32 {shape}")
            f.write(weight.tobytes())


def hf_tensor_name(gguf_name: str, num_layers: int) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _BLOCK_TENSOR_NAME.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_TENSORS and int(match[1]) < num_layers:
        return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no place in a dense Llama model; this file cannot be converted")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order.

    Within each head HF's rotary embedding pairs row i with row i + head_dim/2 (rotate_half);
    llama.cpp stores the pair as neighbours (2i, 2i+1). Rows are therefore (head, i, half) in the
    GGUF and must become (head, half, i).
    """
    rows, cols = weight.shape  # (num_heads * head_dim, hidden)
    half = rows // num_heads // 2
    by_pair = weight.reshape(num_heads, half, 2, cols)  # (H, D/2, 2, hidden)
    return by_pair.transpose(0, 2, 1, 3).reshape(rows, cols)  # (H * 2 * D/2, hidden)


def build_tokenizer(meta: dict) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` equivalent to the one llama.cpp runs for this file."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre {pre!r} is not supported; supported: {sorted(_PRE_TOKENIZERS)}")
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges; the file is incomplete")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    # Some converters store added tokens with raw bytes; BPE looks tokens up in the byte alphabet.
    alphabet = _byte_alphabet()
    symbols = set(alphabet.values())
    vocab = {
        token if set(token) <= symbols else "".join(alphabet[b] for b in token.encode()): index
        for index, token in enumerate(tokens)
    }
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Added tokens must keep their GGUF id; one whose spelling is not in the vocab would get a new
    # id past vocab_size (llama.cpp mislabels a few that way), so only those in place are added.
    in_place = lambda i, t: vocab.get(t) == i  # noqa: E731
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
         if ty == _TOKEN_CONTROL and in_place(i, t)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for i, (t, ty) in enumerate(zip(tokens, types))
         if ty == _TOKEN_USER_DEFINED and in_place(i, t)]
    )
    tokenizer.post_processor = _post_processor(meta, tokens)
    return tokenizer


def _post_processor(meta: dict, tokens: list[str]) -> processors.TemplateProcessing:
    """BOS/EOS insertion exactly as the file's add_bos_token / add_eos_token flags ask."""
    ends = {}
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        if meta.get(f"tokenizer.ggml.{flag}", False):
            if f"tokenizer.ggml.{key}" not in meta:
                raise ValueError(f"GGUF sets tokenizer.ggml.{flag} but has no tokenizer.ggml.{key}")
            token_id = int(meta[f"tokenizer.ggml.{key}"])
            ends[flag] = (tokens[token_id], token_id)
    bos = [ends["add_bos_token"][0]] if "add_bos_token" in ends else []
    eos = [ends["add_eos_token"][0]] if "add_eos_token" in ends else []

    def sequence(name: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in bos] + [f"${name}:{type_id}"] + [f"{t}:{type_id}" for t in eos]

    return processors.TemplateProcessing(
        single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1), special_tokens=list(ends.values())
    )


# llama.cpp's sampling metadata (its converter copies them from the checkpoint's generation_config.json) -> the
# generation_config.json keys they came from, which engine/generation_defaults.py serves as request defaults.
_SAMPLING_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
                  "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
                  "general.sampling.penalty_repeat": "repetition_penalty"}


def generation_sampling(meta: dict) -> dict:
    """The GGUF's recommended sampling as generation_config.json keys ({} when it records none)."""
    return {hf: _float32_value(meta[key]) if hf != "top_k" else int(meta[key])
            for key, hf in _SAMPLING_KEYS.items() if key in meta}


def tokenizer_config(meta: dict, config: dict) -> dict:
    """tokenizer_config.json: special token strings, BOS/EOS flags and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]
    result = {
        # Loads tokenizer.json as written; a Llama-specific class would rebuild the pre-tokenizer.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"),
                      ("unk", "unknown_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            result[f"{name}_token"] = tokens[int(meta[f"tokenizer.ggml.{key}"])]
    if "tokenizer.chat_template" in meta:
        result["chat_template"] = meta["tokenizer.chat_template"]
    return result


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the
    rest (controls, space, ...) are shifted to code points from 256 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}


def _float32_value(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (1e-05, not 9.999999747378752e-06):
    GGUF stores float32, and the decimal the model was published with is the one to keep."""
    return float(str(np.float32(value)))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
