"""kernels/rms_norm.py: a decode layer's residual add and RMSNorm in one pass compute what models/llama.py's
RMSNorm.add_forward computes unfused (the sum exactly; the norm to its rounding), and a layer given the kernel
routes through it. Runs on a GPU, or the kernel on the CPU under Triton's interpreter (TRITON_INTERPRET=1 with
triton installed), otherwise skips."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)", allow_module_level=True)

from kvtriton.backend.kernels.rms_norm import add_rms_norm  # noqa: E402
from kvtriton.backend.models.llama import RMSNorm  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16


@pytest.mark.parametrize("m, k", [(1, 2048), (5, 96), (64, 576)])  # 96, 576: a row tail masked off
def test_the_one_pass_add_and_norm_equal_the_unfused_ones(m, k):
    g = torch.Generator().manual_seed(m)
    x, delta = ((torch.randn(m, k, generator=g) * 2).to(DEVICE, DTYPE) for _ in range(2))
    norm = RMSNorm(k, 1e-5).to(DEVICE, DTYPE)
    norm.weight.data = (torch.rand(k, generator=g) + 0.5).to(DEVICE, DTYPE)
    total, h = add_rms_norm(x, delta, norm.weight, norm.eps)
    expected_total, expected_h = norm.add_forward(x, delta)
    assert torch.equal(total, expected_total)
    # The mean of squares summed in another order: at most a last-bit difference after the rounding to DTYPE.
    torch.testing.assert_close(h.float(), expected_h.float(), rtol=8e-3, atol=1e-3)


@pytest.mark.skipif(not CUDA, reason="RMSNorm.add_forward takes the kernel on CUDA tensors only")
def test_a_norm_given_the_kernel_runs_it():
    norm = RMSNorm(256, 1e-5).to(DEVICE, DTYPE)
    calls = []
    norm.fused_add = lambda *args: calls.append(args[0].shape) or add_rms_norm(*args)
    x, delta = (torch.randn(3, 256, device=DEVICE, dtype=DTYPE) for _ in range(2))
    total, h = norm.add_forward(x, delta)
    assert calls == [(3, 256)] and torch.equal(total, x + delta)
    torch.testing.assert_close(h.float(), norm(x + delta).float(), rtol=8e-3, atol=1e-3)
