"""Build a LlamaForCausalLM from an HF folder (safetensors) or with random ("dummy") weights.

HF checkpoints keep q/k/v and gate/up as separate tensors; the model fuses
them. `_FUSED` says which HF name lands in which slice of which fused
parameter, so loading never materialises an unfused copy of the model.

Quantized (models/quantization.py): every Linear becomes an INT8 or INT4
layer after loading. When the checkpoint is a GGUF, its Q4_0 / Q4_1 / Q4_K /
Q8_0 tensors are taken as stored (fused the same way), never re-quantized.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import Counter
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open

from kvtriton.backend.models import dense_crossover, host_memory
from kvtriton.backend.models.checkpoint import GGUF_SOURCE
from kvtriton.backend.models.llama import TIED_TABLE_ROWS, LlamaForCausalLM
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.quantization import (
    DEFAULT_GROUP_SIZE,
    GGUF_BLOCK_TYPES,
    SCHEMES,
    DeferredBlocks,
    DenseRows,
    GroupQuantized,
    QuantizedLinear,
    quantize_linears,
)
from kvtriton.backend.models.quantized_embedding import QuantizedEmbedding

log = logging.getLogger("kvtriton")
# cpu_dense_min_rows auto, on a CPU without native bf16: where the fp32 copy draws level with the int4 kernel in
# the engine's steps (add_dense_weights' figures).
AUTO_DENSE_MIN_ROWS = 48
# cpu_dense_min_rows auto, on a CPU with native bf16: decode batches of this many sequences, and prefill or mixed
# steps of this many tokens or with a prompt chunk of this many (both on the GEMV below that unless
# models/dense_crossover.py times the copies clearly faster from fewer on this CPU: decode from 32 sequences,
# a prompt chunk from 64 or 128 tokens; a short prompt keeps the kernel's numbers, alone or beside other short
# ones, as in vLLM's AWQ layers, which dequantize for a GEMM from 256). Decode: kvtriton's GEMV multiplies the
# default model's step faster than the bf16 copies up to ~64 rows (all 30 layers' matmuls at 16 / 32 / 48 / 64 rows
# 5.7 / 11.3 / 15.6 / 20.8 ms against 9.7 / 14.4 / 20.5 / 22.2; 2-core Sapphire Rapids), and batches below the
# copies' rows run all layers in one C++ call (runners/cpu_native_decode.py): 16 streams 22.7 -> 13.2 ms a token,
# 32 streams 31.3 -> 25.3. PyTorch's int4 kernel (where the GEMV cannot be built; int8 per channel runs PyTorch's
# too) draws level with them at 12 rows.
# A lower step threshold would cut one request's TTFT (default model, 2-core Sapphire Rapids: ~154 / ~206 prompt
# tokens 247 / 328 ms with the kernel, 91 / 107 ms with the copies), but it moved short prompts sent together
# (tests/test_triton_lora.py's six ~35-token prompts in one step); the prompt-chunk threshold gets that TTFT.
AUTO_BF16_DECODE_ROWS, AUTO_BF16_DECODE_ROWS_TORCH_KERNEL, AUTO_BF16_PREFILL_ROWS = 64, 16, 256
# cpu_dense_min_rows auto makes the copies only if they take at most this share of the memory still available
# after the quantized model is loaded: the rest is for the KV pool, activations and the server (an 8B int4 model's
# bf16 copies are 16 GB, more than its int4 layers' 4.5 GB; llama.cpp keeps no such copies).
DENSE_SHARE_OF_AVAILABLE = 0.5

# HF suffix -> (fused parameter suffix, shard index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _shard_offsets(cfg: ModelConfig, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, cfg.intermediate_size, 2 * cfg.intermediate_size]


def load_model(
    folder: str | Path | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    dummy: bool = False,
    quantization: str | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    gguf: str | Path | None = None,
    dense_min_rows: int = 0,
    keep_gguf_precision: bool = False,
    quantized_embedding: bool = False,
) -> LlamaForCausalLM:
    """Load weights from `folder` (*.safetensors), or random weights when dummy=True
    (for benchmarks at real sizes from a bare config.json).

    quantization "int8" (per output channel) or "int4" (groups of `group_size` inputs): every Linear
    becomes a quantized layer after loading. `gguf`: the GGUF file `folder` was converted from; its
    Q4_0 / Q4_1 / Q4_K / Q8_0 tensors then load as stored (int4 / int8, groups of 32) whatever the scheme,
    which applies to its other tensors only, or with `keep_gguf_precision` (quantization auto) never in
    fewer bits than the file holds them (_gguf_linears). `dense_min_rows` on the CPU: add_dense_weights
    (-1: auto). `quantized_embedding`: an untied embedding stored in such blocks stays in them
    (QuantizedEmbedding, a lookup; a runner's choice, not an exporter's: ONNX graphs gather a float table)."""
    if quantization not in (None, *SCHEMES):
        raise ValueError(f"quantization must be None or one of {', '.join(SCHEMES)}, got {quantization!r}")
    cfg = config or ModelConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    # Built on meta so that no random init runs; the RoPE tables are then rebuilt for real.
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build_tables(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    stored, schemes, embedding = {}, {}, None
    if quantization and gguf is not None and not dummy:
        stored, schemes, embedding = _gguf_linears(cfg, Path(gguf), quantization, keep_gguf_precision,
                                                   torch.device(device).type == "cpu")
    if not quantized_embedding:
        embedding = None
    if dummy:
        _init_dummy(model)
    else:
        # The float weights of layers the GGUF's blocks replace are never read: to_empty's memory for them is
        # never touched, so the load peaks at the other tensors' size, not the whole model's in fp32 (a 0.7 GB
        # Q4_K_M file of a 1.2B Llama peaked at 10.8 GB).
        skip = {f"{module}.weight" for module in stored}
        if embedding is not None:  # never read as floats: a lookup in its blocks (below)
            skip.add("embed_tokens.weight")
        _load_safetensors(model, cfg, Path(folder), skip=skip)
    if embedding is not None:
        model.embed_tokens = QuantizedEmbedding(embedding.load(), dtype)
        log.info("weights: the embedding looked up in its GGUF blocks (%s, %.0f MB; %.0f MB as a %s table)",
                 model.embed_tokens.source, sum(b.numel() * b.element_size() for b in model.embed_tokens.buffers())
                 / 1e6, cfg.vocab_size * cfg.hidden_size * dtype.itemsize / 1e6, str(dtype).removeprefix("torch."))
    if quantization:
        replaced = quantize_linears(model, quantization, group_size, prequantized=stored, schemes=schemes)
        log.info("weights: %s", ", ".join(f"{n} x {what}" for what, n in Counter(replaced.values()).most_common()))
        if torch.device(device).type == "cpu" and quantization in ("int8", "int4"):
            add_dense_weights(model, dense_min_rows)
    if torch.device(device).type == "cpu":
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.release_stored_codes()
        host_memory.release_freed_heap()
    return model.eval()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16, AMX). Without it a bf16 matmul converts more
    than it multiplies: on an AVX2 EPYC a dense bf16 GEMM ran at 15 GFLOP/s against fp32's 73."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def add_dense_weights(model: LlamaForCausalLM, min_rows: int) -> None:
    """CPU: each int4 / int8 layer also keeps its dequantized weight as a dense matrix, for inputs of at least
    `min_rows` rows (prefill chunks, decode batches of that many sequences). min_rows -1 (auto):
    AUTO_DENSE_MIN_ROWS where the copy is fp32, exactly the dequantized weight; where it is bf16, decode
    batches of AUTO_BF16_DECODE_ROWS sequences (fewer where dense_crossover times the copies clearly faster on
    this CPU; AUTO_BF16_DECODE_ROWS_TORCH_KERNEL where a layer runs one of PyTorch's kernels, not kvtriton's
    GEMV) and prefill steps of AUTO_BF16_PREFILL_ROWS tokens or with a prompt chunk of as many (fewer where
    dense_crossover times the copies clearly faster: DenseRows.prompt).

    PyTorch's weight-only CPU kernels stream few bytes, which wins while a step is bound by reading the
    weights (one row: int4 2-7x fp32), but they do not tile for many rows. On a 2-core Sapphire Rapids (AMX)
    the default model's matmuls took, at 1 / 8 / 12 / 16 / 32 / 64 rows, int4 5.0 / 14.7 / 21.5 / 26.7 / 51.7 /
    100 ms against 20.8 / 21.4 / 21.5 / 21.9 / 23.7 / 28.7 ms for dense bf16 copies. On a 2-core AVX2 EPYC (no
    native bf16; dense bf16 5-10x slower than fp32 there) the engine's int4 steps, the copies' and the kernel's
    alternated in one process, took at 32 / 48 / 64 decode rows 180 / 240 / 282 ms with fp32 copies against
    162 / 240 / 329 ms with the kernel, and a 512-token prefill chunk 0.9 s against 1.7 s. So a batch
    multiplies by the copy, as vLLM's AWQ layers dequantize for a GEMM from 256 tokens on; the copy is kept
    rather than made per call, which costs more time than it saves below a few hundred rows.

    It is bf16 where the CPU multiplies bf16 natively (2 bytes a weight), else fp32 (4 bytes a weight, the exact
    dequantized weight). Auto makes the copies only where they take at most DENSE_SHARE_OF_AVAILABLE of the
    memory the host or container has left (host_memory.available_bytes), and says so in a line where not.
    The bf16 copy rounds each weight where the kernel rounds its activations, scales and zero points to bf16:
    as close to the fp32 model on average (the default model's teacher-forced text: mean logit error 0.077
    against the kernel's 0.068, top-1 agreement 97.5% against 96.7%), but greedy output
    moves at near-ties, and the default model's answer to "What is the capital of France?" starts at one. So
    auto keeps a short prompt on the kernel (its chunk under DenseRows.prompt, its step under
    AUTO_BF16_PREFILL_ROWS tokens): one request alone, or beside other short prompts, computes what it did
    without copies, and a batch's numbers differ from it in the last bits, as the
    logits' do where the head takes the float table (models/llama.py TIED_TABLE_ROWS) and as vLLM's kernels
    differ by batch size. On kvtriton's GEMV a row's numbers do not depend on the batch: below the copies' rows
    a batch computes what each request would alone."""
    native_bf16 = cpu_has_native_bf16()
    if min_rows < 0 and native_bf16:
        kernels = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.matmul_on_cpu_kernel]
        on_gemv = all(m.gemv_operands is not None for m in kernels)  # else some run PyTorch's, which do not tile
        rows = DenseRows(AUTO_BF16_DECODE_ROWS if on_gemv else AUTO_BF16_DECODE_ROWS_TORCH_KERNEL,
                         AUTO_BF16_PREFILL_ROWS)
    elif min_rows < 0:
        rows = DenseRows(AUTO_DENSE_MIN_ROWS, AUTO_DENSE_MIN_ROWS)
    elif min_rows:
        rows = DenseRows(min_rows, min_rows)
    else:
        return
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    # A head whose batches read the embedding's float table (llama.py TIED_TABLE_ROWS) gets no fp32 copy: the table
    # holds the same numbers. A bf16 copy it does get: at 32 rows of the default model's head it took 2.9 ms
    # against the fp32 table's 9.5 (Sapphire Rapids), and its logits are rounded to bf16 as the kernel's are.
    unread = model.lm_head if model.tied_table_serves_head() and dtype == torch.float32 \
        and min(rows.decode, rows.prefill) >= TIED_TABLE_ROWS else None
    layers = [m for m in model.modules()
              if isinstance(m, QuantizedLinear) and m.matmul_on_cpu_kernel and m is not unread]
    planned = sum(m.in_features * m.out_features for m in layers) * dtype.itemsize
    available = host_memory.available_bytes()
    if available is not None and planned > DENSE_SHARE_OF_AVAILABLE * available:
        log.warning("weights: %s copies of the quantized layers would take %.1f GB of the %.1f GB this host or "
                    "container has available: %s", str(dtype).removeprefix("torch."), planned / 1e9, available / 1e9,
                    "not made, every step multiplies through the quantized kernels (prefill and large batches "
                    "slower; set cpu_dense_min_rows to force them)" if min_rows < 0 else
                    "made, as cpu_dense_min_rows asks")
        if min_rows < 0:
            return
    size = sum(layer.add_dense_weight(rows, dtype) for layer in layers)
    model.dense_rows = rows
    if min_rows < 0 and native_bf16 and on_gemv:  # where the GEMV and the copies cross on this CPU
        rows.decode, rows.prompt, timings = dense_crossover.dense_rows(layers, rows.decode, rows.prompt)
        if timings:
            log.info("weights: the %s copies take decode batches from %d sequences and prompt chunks from %d tokens, "
                     "timed at load: %s", str(dtype).removeprefix("torch."), rows.decode, rows.prompt, timings)
    log.info("weights: a %s copy of %d quantized layers for decode steps of >= %d sequences, steps with a prompt "
             "chunk of >= %d tokens and other steps of >= %d tokens (%.0f MB)", str(dtype).removeprefix("torch."),
             len(layers), rows.decode, rows.prompt, rows.prefill, size / 1e6)


def resolve_quantization(quantization: str, checkpoint: str,
                         device: torch.device) -> tuple[str | None, Path | None, bool]:
    """EngineConfig.quantization for `checkpoint` on `device` -> (load_model's scheme or None, the GGUF to take
    stored blocks from or None, keep_gguf_precision).

    "auto" never loses precision against the checkpoint: it is int4 on the CPU when the checkpoint is a GGUF
    (its Q4_0/Q4_1/Q4_K/Q8_0 blocks as stored: fewer bytes per step, and measured faster; its other tensors in
    no fewer bits than the file's), else none. On CUDA it stays none: the Triton int4 kernel
    (kernels/int4_matmul.py) has not been measured against bf16 on a GGUF there yet. "fp8" quantizes from the
    float weights (a GGUF's blocks are dequantized first)."""
    from kvtriton.backend.models.gguf_quantized import gguf_source

    if quantization == "none":
        return None, None, False
    gguf = gguf_source(checkpoint)
    if quantization in ("int4", "fp8") and device.type == "cuda" and importlib.util.find_spec("triton") is None:
        log.warning("triton is not installed: %s", "int4 layers on CUDA dequantize their weights on every call "
                    "(slower than bf16) instead of the fused Triton int4 kernel" if quantization == "int4" else
                    "fp8 layers quantize their activations in five PyTorch ops instead of one Triton kernel")
    if quantization == "fp8":
        from kvtriton.backend.models.fp8 import fp8_supported

        if why := fp8_supported(device):
            raise ValueError(why)
        if gguf is not None:
            log.info("quantization fp8: the GGUF's Q4/Q8 blocks are dequantized and quantized again to fp8")
        return "fp8", None, False
    if quantization == "auto":
        chosen = "int4" if device.type == "cpu" and gguf is not None else None
        why_none = "not a GGUF checkpoint" if gguf is None else f"auto picks int4 on the CPU only, not {device.type}"
        log.info("quantization auto: %s", f"{chosen}, the GGUF's blocks as stored" if chosen else f"none ({why_none})")
        return chosen, gguf if chosen else None, chosen is not None
    return quantization, gguf, False


def _gguf_linears(cfg: ModelConfig, gguf_path: Path, scheme: str, keep_precision: bool,
                  on_cpu: bool) -> tuple[dict[str, DeferredBlocks], dict[str, str | None], DeferredBlocks | None]:
    """({Linear module name: its GGUF blocks, fused as the model fuses them, decoded when loaded}, {module name:
    its own scheme}, an untied embedding's blocks or None).

    A module whose parts are not all stored in one family (4-bit or 8-bit) is quantized from its float
    weight, said in a log line: by `scheme`, or with keep_precision (quantization auto) in no fewer bits than
    its parts hold (gguf_quantized.TYPE_BITS): float if one is float (F16, F32), int8 per channel if one has
    5 to 8 bits (a Q4_K_M file's Q6_K attn_v fused with Q4_K q and k; Q5_K). Q6_K blocks are stored (int8
    groups of 16) only with keep_precision on a CPU where kvtriton's GEMV serves, the one kernel that takes
    groups of 16; elsewhere they are quantized from float as above, said once in the log."""
    from kvtriton.backend.models.gguf_quantized import FLOAT_TYPES, TYPE_BITS, read_quantized_tensors
    from kvtriton.backend.models.int4 import gemv_serves

    stored_types = GGUF_BLOCK_TYPES
    if not (keep_precision and on_cpu and gemv_serves()):
        stored_types = tuple(t for t in GGUF_BLOCK_TYPES if t != "Q6_K")
    tensors, file_types = read_quantized_tensors(gguf_path, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads,
                                                 stored_types)
    if "Q6_K" in file_types.values() and "Q6_K" not in stored_types:
        why = "stored only under quantization auto" if not keep_precision else \
            "stored only on a CPU where kvtriton's int4 GEMV serves (the kernel that takes groups of 16)"
        log.info("GGUF Q6_K blocks: %s; quantizing them from their float values", why)
    types: dict[str, dict[int, str]] = {}  # module -> shard -> GGUF type
    embedding = None
    parts: dict[str, dict[int, GroupQuantized]] = {}
    for hf_name, type_name in file_types.items():
        name = hf_name.removeprefix("model.")
        if name == "embed_tokens.weight":
            if not cfg.tie_word_embeddings:
                embedding = tensors.get(hf_name)  # only looked up: QuantizedEmbedding, where the caller wants it
                continue
            name = "lm_head.weight"
        if not (name.endswith("_proj.weight") or name == "lm_head.weight"):
            continue  # norms, biases: not a Linear's weight
        target, rows = _locate(cfg, name)
        shard = 0 if rows is None else _shard_offsets(cfg, target.rpartition(".")[0]).index(rows[0])
        module = target.removesuffix(".weight")
        types.setdefault(module, {})[shard] = type_name
        if hf_name in tensors:
            parts.setdefault(module, {})[shard] = tensors[hf_name]
    fused, schemes = {}, {}
    for module, shard_types in types.items():
        expected = len(_shard_offsets(cfg, module)) - 1 if any(f in module for f, _ in _FUSED.values()) else 1
        ordered = [parts.get(module, {}).get(i) for i in range(expected)]
        if None not in ordered and len({q.bits for q in ordered}) == 1:
            fused[module] = DeferredBlocks(ordered[0].bits, partial(_fuse_blocks, ordered))
            continue
        own = scheme
        if keep_precision:
            bits = [None if t in FLOAT_TYPES else TYPE_BITS.get(t, 8) for t in shard_types.values()]
            own = schemes[module] = None if None in bits else "int8" if max(bits) > 4 else scheme
        partly_stored = any(q is not None for q in ordered)
        if partly_stored or own != scheme:
            log.info("%s: GGUF %s%s; %s", module, "+".join(shard_types.get(i, "?") for i in range(expected)),
                     ", which do not fuse into one stored format" if partly_stored else "",
                     "kept float, as the file holds it" if own is None else
                     f"{own} per channel from its float weight, no fewer bits than the file's" if own != scheme else
                     f"{own} from its float weight")
    return fused, schemes, embedding


def _fuse_blocks(parts: list[DeferredBlocks]) -> GroupQuantized:
    """A fused module's GGUF blocks (q, k, v or gate, up), decoded and stacked along N."""
    return GroupQuantized.cat_rows([part.load() for part in parts])


def _init_dummy(model: LlamaForCausalLM) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def _load_safetensors(model: LlamaForCausalLM, cfg: ModelConfig, folder: Path, skip: set[str] = frozenset()) -> None:
    """The folder's tensors into the model's (fused) parameters; those named in `skip` are left unread. A folder
    converted from a GGUF with floats="unstored" has the rest of its weights in that file (gguf_weights)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    params = dict(model.named_parameters())
    loaded: set[str] = set()

    def load(hf_name: str, get, origin: str) -> None:
        name = hf_name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            return
        target, rows = _locate(cfg, name)
        if target not in skip:
            tensor = get(hf_name)
            if target not in params:
                raise ValueError(f"{origin}: unexpected tensor {hf_name!r} for {cfg.architecture}")
            dst = params[target] if rows is None else params[target][rows[0] : rows[1]]
            if dst.shape != tensor.shape:
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor.to(dst.dtype))
        loaded.add(target if rows is None else f"{target}[{rows[0]}]")

    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for hf_name in f.keys():
                    load(hf_name, f.get_tensor, file.name)
        if (folder / GGUF_SOURCE).is_file():  # imported here: reading GGUF needs the gguf package
            from kvtriton.backend.models.gguf_checkpoint import gguf_weights

            for hf_name, make in gguf_weights(folder).items():
                load(hf_name, lambda _, make=make: torch.from_numpy(make()), folder.name + "'s GGUF")
    expected = _expected_names(model, cfg)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _locate(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None]:
    """HF parameter name (without 'model.') -> (fused parameter name, row range or None)."""
    for hf_suffix, (fused, shard) in _FUSED.items():
        marker = f".{hf_suffix}."
        if marker in name:
            prefix, kind = name.split(marker)
            offsets = _shard_offsets(cfg, fused)
            return f"{prefix}.{fused}.{kind}", (offsets[shard], offsets[shard + 1])
    return name, None


def _expected_names(model: LlamaForCausalLM, cfg: ModelConfig) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fused = next((f for f, _ in _FUSED.values() if f".{f}." in name), None)
        if fused:
            n_shards = len(_shard_offsets(cfg, fused)) - 1
            names.update(f"{name}[{o}]" for o in _shard_offsets(cfg, fused)[:n_shards])
        else:
            names.add(name)
    return names
