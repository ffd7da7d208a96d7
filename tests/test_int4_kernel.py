"""The Triton int4 decode matmul (kernels/int4_matmul.py) equals the dequantized weight's matmul.

Runs on CUDA (gpu marker: also through Int4Linear and in a CUDA graph); on a CPU-only machine only
under Triton's interpreter (TRITON_INTERPRET=1 with triton installed), otherwise skips.
"""

from __future__ import annotations

import os

import pytest
import torch

from kvtriton.backend.models.int4 import Int4Linear, quantize_groupwise

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernel on the CPU)", allow_module_level=True)

from kvtriton.backend.kernels.int4_matmul import int4_matmul  # noqa: E402

from tests.cuda_graph_helpers import replayed_on_new_input  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16  # the interpreter's tl.dot is wrong in bf16


def layer(n: int, k: int, group: int, offset: bool, seed: int = 0) -> Int4Linear:
    g = torch.Generator().manual_seed(seed)
    q = quantize_groupwise(torch.randn(n, k, generator=g) / k**0.5, group)
    if offset:  # GGUF Q4_1's form: zero point 0 and a float offset per group
        q.zero_point = torch.zeros_like(q.zero_point)
        q.offset = (torch.randn(q.scale.shape, generator=g) * 0.01).to(torch.float16)
    return Int4Linear.from_group_quantized(q, device=DEVICE)


def reference(x: torch.Tensor, lin: Int4Linear) -> torch.Tensor:
    """What the kernel promises: x times the dequantized weight rounded to x's dtype, fp32 sums."""
    return x.float() @ lin.dequantized_weight().to(x.dtype).float().T.to(x.device)


@pytest.mark.parametrize("m", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("n, k, group, offset", [(96, 256, 32, False), (40, 384, 128, True), (64, 512, 64, True)])
def test_int4_matmul_equals_the_dequantized_matmul(m, n, k, group, offset):
    lin = layer(n, k, group, offset)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    got = int4_matmul(x, lin.qweight, lin.scale, lin.zero_point, lin.offset, group)
    assert got.shape == (m, n) and got.dtype == DTYPE
    torch.testing.assert_close(got.float(), reference(x, lin), atol=2e-2, rtol=2e-2)


def test_int4_matmul_refuses_prefill_sized_inputs():
    lin = layer(32, 64, 32, False)
    with pytest.raises(ValueError, match="at most 64 rows"):
        int4_matmul(torch.zeros(65, 64, dtype=DTYPE, device=DEVICE), lin.qweight, lin.scale, lin.zero_point, None, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_int4_linear_on_cuda_decodes_through_the_kernel_in_a_cuda_graph_and_prefills_dense():
    lin = layer(4096, 2048, 32, True)
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    static_out = replayed_on_new_input(lin, x)
    torch.testing.assert_close(static_out.float(), reference(x, lin), atol=3e-2, rtol=2e-2)
    prefill = torch.randn(300, 2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(lin(prefill).float(), reference(prefill, lin), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("n, k, group, offset", [(96, 256, 32, False), (40, 384, 128, True)])
def test_int4_dequantize_writes_the_stored_weight(n, k, group, offset):
    from kvtriton.backend.kernels.int4_matmul import int4_dequantize

    lin = layer(n, k, group, offset)
    got = int4_dequantize(lin.qweight, lin.scale, lin.zero_point, lin.offset, group, DTYPE)
    assert got.dtype == DTYPE
    torch.testing.assert_close(got.float(), lin.dequantized_weight().to(DTYPE).float().to(got.device),
                               atol=1e-3, rtol=1e-2)  # on GPU an fma may round the last bit differently
