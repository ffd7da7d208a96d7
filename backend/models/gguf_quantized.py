"""GGUF quantized blocks taken as they are: Q4_0, Q4_1 and Q8_0 tensors as group-wise INT4/INT8 weights.

llama.cpp's blocks hold 32 weights each (ggml's block_q4_0, block_q4_1, block_q8_0):
  Q4_0  fp16 d, 16 bytes of 4-bit q        x = d * (q - 8)   -> int4: scale d, zero point 8
  Q4_1  fp16 d, fp16 m, 16 bytes of q      x = d * q + m     -> int4: scale d, zero point 0, offset m
  Q8_0  fp16 d, 32 int8 q                  x = d * q         -> int8: scale d per group of 32
with the 4-bit q of element j in the low nibble of byte j and element j + 16 in its high nibble.
Every number is kept (fp16 scales stay fp16), so the weights equal gguf's own dequantization
exactly (tests/test_int4.py checks that against the gguf package).

Other tensor types (F32, F16, K-quants, ...) are not returned: the loader quantizes those from their
float values like any checkpoint's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from kvtriton.backend.models.quantization import GGUF_BLOCK_TYPES, GroupQuantized

log = logging.getLogger("kvtriton")

BLOCK = 32


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
    blocks = np.ascontiguousarray(data).reshape(rows, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[type_name])
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


def permute_rows(q: GroupQuantized, order: np.ndarray) -> GroupQuantized:
    """The same weight with its rows (output channels) reordered; groups run along the inputs, so they move whole."""
    index = torch.from_numpy(order)
    pick = lambda t: None if t is None else t[index]  # noqa: E731
    return GroupQuantized(q.bits, q.codes[index], q.scale[index], pick(q.zero_point), pick(q.offset), q.group_size,
                          q.source)


def read_quantized_tensors(gguf_path: str | Path, num_layers: int, num_heads: int,
                           num_kv_heads: int) -> dict[str, GroupQuantized]:
    """{HF tensor name: GroupQuantized} for every Q4_0 / Q4_1 / Q8_0 tensor in the file, in HF's layout
    (a llama file's Q and K rows back in HF's rope order, as gguf_checkpoint.llama_state_dict does for floats)."""
    # Imported here: the gguf package is needed only where a GGUF is read (a host serving an HF folder may lack it).
    import gguf

    from kvtriton.backend.models.gguf_checkpoint import ROPE_PERMUTED_ARCHITECTURES, hf_tensor_name, unpermute_rope_rows

    reader = gguf.GGUFReader(str(gguf_path))
    permuted = reader.fields["general.architecture"].contents() in ROPE_PERMUTED_ARCHITECTURES
    out = {}
    for tensor in reader.tensors:
        type_name = tensor.tensor_type.name
        if type_name not in GGUF_BLOCK_TYPES:
            continue
        name = hf_tensor_name(tensor.name, num_layers)
        q = decode_blocks(tensor.data, type_name)
        for proj, heads in (("q_proj", num_heads), ("k_proj", num_kv_heads)):
            if permuted and name.endswith(f"{proj}.weight"):
                order = np.arange(q.shape[0])[:, None]  # (rows, 1): where each HF row comes from
                q = permute_rows(q, unpermute_rope_rows(order, heads)[:, 0])
        out[name] = q
    return out
