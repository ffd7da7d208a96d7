"""The CPU int4 kernels: built at first use into one library, loaded as torch.ops.kvtriton.int4_gemv
(cpu_int4_gemv.cpp), decode_layers and decode_attention (cpu_decode_layers.cpp, which calls the GEMV and the LoRA
addition), lora_delta (cpu_lora.cpp), and the weight layout the GEMV reads.

The C++ files include only the PyTorch headers they need, so g++ ($CXX) builds them in seconds (the compiler
torch.compile's CPU code needs anyway), with inductor's floating-point flags: ATen's AVX-512 vector code, and no
product and sum contracted into one rounding (-ffp-contract=off), so that elementwise work rounds as aten's.
The library is kept in the folder the caller names (models/int4.py: the kvtriton cache's kernels/), named by a
hash of the sources, the compiler flags and the torch version, and written under a temporary name then renamed,
so processes that build it at once do not see each other's half files. It is built with OpenMP against the
libgomp that torch loads, so its parallel loops run on torch's own thread team (at::parallel_for), not a second
one.

`load()` says in one line why the kernel cannot run here (no AVX-512 BF16, no compiler, a failed build);
models/int4.py then keeps PyTorch's `_weight_int4pack_mm_for_cpu` and says so once.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger("kvtriton")
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_int4_gemv.cpp", "cpu_decode_layers.cpp", "cpu_lora.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_int4_gemv.h", "cpu_lora.h")]
TILE_ROWS = 16
# Rows pack() converts at a time: whole tiles, and a multiple of 64 (PyTorch's CPU int4 pack, which
# models/int4.py slices the same way, lays rows out in blocks of 64).
PACK_ROWS = 4096
_FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512bf16", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-DCPU_CAPABILITY=AVX512",
          "-DCPU_CAPABILITY_AVX512", "-w"]


def _library_path(folder: Path) -> Path:
    text = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + " ".join(_FLAGS).encode() + torch.__version__.encode())
    return folder / f"cpu_int4-{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [os.environ.get("CXX", "g++"), *_FLAGS, *(f"-I{p}" for p in include_paths()),
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *map(str, SOURCES), "-o", partial,
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu"]
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            last = result.stderr.strip().splitlines()[-1:]
            raise RuntimeError(f"{command[0]} exited with {result.returncode}{': ' + last[0] if last else ''}")
        os.replace(partial, target)
        log.info("built the CPU int4 kernels in %.1f s: %s", time.monotonic() - started, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@functools.cache
def load(folder: Path) -> str | None:
    """None once the kernel is loaded (built into `folder` first if it is not there), else why not (one line)."""
    if sys.platform != "linux" or not torch.cpu._is_avx512_bf16_supported():
        return "this CPU has no AVX-512 BF16"
    target = _library_path(folder)
    try:
        if not target.exists():
            _build(target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        return f"building the CPU int4 kernels ({', '.join(p.name for p in SOURCES)}) failed ({e})"
    torch.library.register_fake("kvtriton::int4_gemv")(_int4_gemv_fake)
    torch.library.register_fake("kvtriton::decode_attention")(_decode_attention_fake)
    torch.library.register_fake("kvtriton::lora_delta")(_lora_delta_fake)
    return None


def _int4_gemv_fake(x, packed, scale_zeros, group_size):
    return x.new_empty(x.shape[0], packed.shape[0] * TILE_ROWS, dtype=torch.float32)


def _decode_attention_fake(q, k_pool, v_pool, tables, mask, scale):
    return torch.empty_like(q)


def _lora_delta_fake(x, a, b_t, columns, token_adapters, block):
    return x.new_empty(x.shape[0], b_t.shape[1])


def pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (N, K) in [0, 15], scale and tinygemm zero (N, G) -> the kernel's packed (N16/16, K/8, 64) uint8 and
    scale_zeros (N16/16, G, 2, 16) bf16 (layouts: cpu_int4_gemv.cpp). Padded rows compute 0. Packed
    PACK_ROWS rows at a time: tiles are independent, and the int32 working copies of a whole large layer
    (a 1.2B model's 49152 x 4096-code lm_head: ~3 GB) would set the load's peak memory."""
    return in_row_slices(_pack_slice, (codes, scale, zero), PACK_ROWS, cat_dims=(0, 0))


def in_row_slices(fn, tensors: tuple[torch.Tensor, ...], rows: int, cat_dims: tuple[int, ...]) -> tuple:
    """fn(*tensors) computed on `rows` leading rows of the tensors at a time, each of its outputs concatenated
    along its cat_dim: (un)packing a large layer in one pass takes GBs of int32 working copies. fn must treat
    rows independently (it may pad the last slice)."""
    n = tensors[0].shape[0]
    if n <= rows:
        return fn(*tensors)
    parts = [fn(*(t[i:i + rows] for t in tensors)) for i in range(0, n, rows)]
    return tuple(torch.cat(outputs, dim=dim) for outputs, dim in zip(zip(*parts), cat_dims))


def _pack_slice(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = codes.shape
    pad = -n % TILE_ROWS
    codes = torch.nn.functional.pad(codes.to(torch.int32), (0, 0, 0, pad), value=8)
    scale = torch.nn.functional.pad(scale.float(), (0, 0, 0, pad))
    zero = torch.nn.functional.pad(zero.float(), (0, 0, 0, pad))
    tiles, groups = (n + pad) // TILE_ROWS, scale.shape[1]
    c = codes.reshape(tiles, TILE_ROWS, k // 8, 4, 2)  # tile, row, oct, nibble i, slot s: input 8j + 2i + s
    words = c[:, :, :, 0] | (c[:, :, :, 1] << 4) | (c[:, :, :, 2] << 8) | (c[:, :, :, 3] << 12)  # (t, row, oct, s)
    words = words.permute(0, 2, 1, 3).reshape(tiles, k // 8, 2 * TILE_ROWS).to(torch.int16)  # word = 2 row + s
    packed = words.contiguous().view(torch.uint8)  # little-endian: (tiles, K/8, 64)
    per_tile = lambda t: t.reshape(tiles, TILE_ROWS, groups).transpose(1, 2)  # noqa: E731  (t, G, 16)
    scale_zeros = torch.stack([per_tile(scale), per_tile(zero)], dim=2).to(torch.bfloat16).contiguous()
    return packed, scale_zeros


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """pack's inverse for the codes: packed (N16/16, K/8, 64) uint8 -> codes (N16, K) uint8 in [0, 15] (padded
    rows included)."""
    return in_row_slices(_unpack_slice, (packed,), PACK_ROWS // TILE_ROWS, cat_dims=(0,))[0]


def _unpack_slice(packed: torch.Tensor) -> tuple[torch.Tensor]:
    tiles, octs, _ = packed.shape
    words = packed.view(torch.int16).reshape(tiles, octs, TILE_ROWS, 2)  # (t, oct, row, s)
    # An arithmetic shift of a negative word fills in ones above; the mask keeps the nibble.
    nibbles = torch.stack([(words >> (4 * i)) & 0x0F for i in range(4)], dim=-1)  # (t, oct, row, s, i)
    codes = nibbles.permute(0, 2, 1, 4, 3).reshape(tiles * TILE_ROWS, octs * 8)  # input 8j + 2i + s
    return (codes.to(torch.uint8),)


def unpack_rows(packed: torch.Tensor, rows: slice, n: int) -> torch.Tensor:
    """The codes of `rows` of a packed weight of n rows: unpack of only the tiles that hold them."""
    start, stop, stride = rows.indices(n)
    t0, t1 = start // TILE_ROWS, -(-stop // TILE_ROWS)
    return unpack(packed[t0:t1])[start - t0 * TILE_ROWS:stop - t0 * TILE_ROWS:stride]


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int,
              n: int) -> torch.Tensor:
    """x (M, K) fp32 or bf16 -> (M, n) fp32 (any M; a few rows are what it is fast at)."""
    out = torch.ops.kvtriton.int4_gemv(x.contiguous(), packed, scale_zeros, group_size)
    return out[:, :n] if out.shape[1] != n else out
