"""GGUF quantized blocks taken as they are: Q4_0, Q4_1, Q4_K, Q6_K and Q8_0 tensors as group-wise INT4/INT8
weights.

llama.cpp's blocks hold 32 weights each (ggml's block_q4_0, block_q4_1, block_q8_0):
  Q4_0  fp16 d, 16 bytes of 4-bit q        x = d * (q - 8)   -> int4: scale d, zero point 8
  Q4_1  fp16 d, fp16 m, 16 bytes of q      x = d * q + m     -> int4: scale d, zero point 0, offset m
  Q8_0  fp16 d, 32 int8 q                  x = d * q         -> int8: scale d per group of 32
with the 4-bit q of element j in the low nibble of byte j and element j + 16 in its high nibble.
Every number is kept (fp16 scales stay fp16), so the weights equal gguf's own dequantization
exactly (tests/test_int4.py checks that against the gguf package).

Q4_K (the 4-bit k-quant, most of a Q4_K_M file) holds super-blocks of 256 weights: fp16 d and dmin,
then 8 sub-blocks of 32, each with a 6-bit scale sc and a 6-bit min m (12 packed bytes), and
  x = (d * sc) * q - (dmin * m)   -> int4: scale d*sc, zero point 0, offset -dmin*m, groups of 32
with sub-blocks 2c and 2c + 1 in the low and high nibbles of bytes 32c .. 32c + 31. The products d*sc
and dmin*m, exact in fp32, are rounded to fp16, the scales' type here: a weight moves by at most half
an fp16 ulp of each, 2^-11 (15 |d*sc| + |dmin*m|), far below the CPU kernel's own bf16 rounding of them
(tests/test_gguf_kquants.py bounds it against the gguf package).

Q6_K (a Q4_K_M file's attn_v, ffn_down and output) holds super-blocks of 256: 6-bit q in two planes, an
int8 scale sc per 16, fp16 d, and x = (d * sc) * (q - 32) -> int8 groups of 16, scale d*sc (fp16, rounded
as Q4_K's). Only kvtriton's CPU GEMV takes groups of 16, so the loader keeps Q6_K blocks only under
quantization auto on a CPU where it serves (loader._gguf_linears).

Other tensor types (F32, F16, Q5_*, ...) are not returned: the loader quantizes those from their float
values (quantization auto: in no fewer bits than the file's, TYPE_BITS).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from kvtriton.backend.models.quantization import GGUF_BLOCK_TYPES, DeferredBlocks, GroupQuantized

log = logging.getLogger("kvtriton")

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}
# The bits of each quantized GGUF type's codes (k- and i-quants' sub-block scales aside): what quantization auto
# keeps at least. Float types (F32, F16, BF16) are absent; a type missing here counts as 8.
TYPE_BITS = {
    "IQ1_S": 1, "IQ1_M": 1, "Q2_K": 2, "IQ2_XXS": 2, "IQ2_XS": 2, "IQ2_S": 2, "TQ1_0": 2, "TQ2_0": 2,
    "Q3_K": 3, "IQ3_XXS": 3, "IQ3_S": 3, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "IQ4_NL": 4, "IQ4_XS": 4, "MXFP4": 4,
    "Q5_0": 5, "Q5_1": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8,
}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# The stored types' codes once decoded (GroupQuantized.bits): Q6_K's 6-bit codes are kept as int8 groups of 16.
STORED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q6_K": 8, "Q8_0": 8}


def gguf_source(checkpoint: str) -> Path | None:
    """The GGUF file behind a checkpoint name, if it has one: the default model's, or a .gguf path."""
    if checkpoint == "default":
        from kvtriton.backend.models.default_model import ensure_default_gguf

        return ensure_default_gguf(progress=log.info)
    path = Path(checkpoint).expanduser()
    return path if path.is_file() and path.suffix == ".gguf" else None


def decode_blocks(data: np.ndarray, type_name: str) -> GroupQuantized:
    """One GGUF tensor's raw rows (rows, bytes per row) uint8 -> its numbers, rows in the file's order."""
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(rows, -1, BLOCK_BYTES[type_name])
    if type_name == "Q4_K":
        return _decode_q4_k(blocks)
    if type_name == "Q6_K":
        return _decode_q6_k(blocks)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # (rows, G)
    if type_name == "Q8_0":
        codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, -1)  # (rows, K)
        return GroupQuantized(8, torch.from_numpy(codes), torch.from_numpy(d), None, None, BLOCK, type_name)
    start = 2 if type_name == "Q4_0" else 4
    qs = blocks[..., start:]  # (rows, G, 16)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, -1)  # (rows, K): j, then j + 16
    zero_point = np.full(d.shape, 8 if type_name == "Q4_0" else 0, dtype=np.uint8)
    offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]) if type_name == "Q4_1" else None
    return GroupQuantized(4, torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(zero_point), offset,
                          BLOCK, type_name)


def _decode_q4_k(blocks: np.ndarray) -> GroupQuantized:
    """(rows, super-blocks, 144) uint8 -> int4 groups of 32 (ggml's dequantize_row_q4_K, kept as numbers)."""
    rows = blocks.shape[0]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # (rows, S, 1)
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    low, mid, high = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]  # the 12 packed scale bytes
    # ggml's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    # 4-7 in the nibbles of bytes 8-11, with their top 2 bits in the top bits of bytes 0-3 and 4-7.
    sc = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=-1)  # (rows, S, 8)
    m = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(rows, -1, 4, 1, 32)  # byte 32c + l: sub-block 2c (low), 2c + 1 (high)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)  # (rows, K)
    scale = torch.from_numpy((d * sc).astype(np.float16).reshape(rows, -1))  # (rows, G)
    offset = torch.from_numpy((-(dmin * m)).astype(np.float16).reshape(rows, -1))
    zero_point = torch.zeros(scale.shape, dtype=torch.uint8)
    return GroupQuantized(4, torch.from_numpy(codes), scale, zero_point, offset, BLOCK, "Q4_K")


def _decode_q6_k(blocks: np.ndarray) -> GroupQuantized:
    """(rows, super-blocks, 210) uint8 -> int8 groups of 16 (ggml's dequantize_row_q6_K, kept as numbers)."""
    rows, supers = blocks.shape[:2]
    # Each half of a super-block: 64 bytes of low 4 bits (elements 0-63 in the low nibbles, 64-127 in the high)
    # and 32 bytes of high 2 bits (elements 32j + l in bits 2j, 2j + 1 of byte l).
    low = blocks[..., :128].reshape(rows, supers, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    high = blocks[..., 128:192].reshape(rows, supers, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    q = (low & 0x0F).reshape(rows, supers, 8, 32) | ((high & 0x03).reshape(rows, supers, 8, 32) << 4)
    codes = (q.astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)  # (rows, K) in [-32, 31]
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # (rows, S, 16)
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)  # (rows, S, 1)
    scale = torch.from_numpy((d * sc).astype(np.float16).reshape(rows, -1))  # (rows, K / 16)
    return GroupQuantized(8, torch.from_numpy(codes), scale, None, None, 16, "Q6_K")


def permute_rows(q: GroupQuantized, order: np.ndarray) -> GroupQuantized:
    """The same weight with its rows (output channels) reordered; groups run along the inputs, so they move whole."""
    index = torch.from_numpy(order)
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return GroupQuantized(q.bits, q.codes[index], q.scale[index], pick(q.zero_point), pick(q.offset), q.group_size,
                          q.source)


def read_quantized_tensors(gguf_path: str | Path, num_layers: int, num_heads: int, num_kv_heads: int,
                           stored_types: tuple[str, ...] = GGUF_BLOCK_TYPES
                           ) -> tuple[dict[str, DeferredBlocks], dict[str, str]]:
    """One pass over the file's index: ({HF tensor name: its blocks, decoded when loaded} for every tensor of
    `stored_types`, in HF's layout once loaded (a llama file's Q and K rows back in HF's rope order, as
    gguf_checkpoint.llama_tensors does for floats), {HF tensor name: its GGUF type name ("Q4_K", "Q6_K", "F16",
    ...)} for every tensor). The file stays memory-mapped while any of the blocks is referenced."""
    # Imported here: the gguf package is needed only where a GGUF is read (a host serving an HF folder may lack it).
    import gguf

    from kvtriton.backend.models.gguf_checkpoint import ROPE_FREQS, ROPE_PERMUTED_ARCHITECTURES, hf_tensor_name

    reader = gguf.GGUFReader(str(gguf_path))
    permuted = reader.fields["general.architecture"].contents() in ROPE_PERMUTED_ARCHITECTURES
    stored, types = {}, {}
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:
            continue  # not a weight (the config's rope scaling)
        type_name = tensor.tensor_type.name
        name = hf_tensor_name(tensor.name, num_layers)
        types[name] = type_name
        if type_name not in stored_types:
            continue
        heads = num_heads if name.endswith("q_proj.weight") else num_kv_heads if name.endswith("k_proj.weight") \
            else None
        load = partial(_load_blocks, tensor.data, type_name, heads if permuted else None)
        stored[name] = DeferredBlocks(STORED_BITS[type_name], load)
    return stored, types


def _load_blocks(data: np.ndarray, type_name: str, rope_heads: int | None) -> GroupQuantized:
    """decode_blocks, then a permuted llama file's Q or K rows (rope_heads of them) back in HF's order."""
    from kvtriton.backend.models.gguf_checkpoint import unpermute_rope_rows

    q = decode_blocks(data, type_name)
    if rope_heads is not None:
        order = np.arange(q.shape[0])[:, None]  # (rows, 1): where each HF row comes from
        q = permute_rows(q, unpermute_rope_rows(order, rope_heads)[:, 0])
    return q
