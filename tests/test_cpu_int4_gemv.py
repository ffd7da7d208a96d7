"""kvtriton's CPU int4 GEMV (kernels/cpu_int4_gemv.cpp): its numbers against the dequantized weight, its layout,
the int4 and int8 (two-plane) layers that call it, and torch.compile through it."""

import pytest
import torch

from kvtriton.backend.kernels import cpu_int4
from kvtriton.backend.models.cache import cache_dir
from kvtriton.backend.models.int4 import (
    Int4Linear,
    gemv_serves,
    int4_mm_cpu,
    pack_for_cpu_kernel,
    pack_for_tinygemm,
    tinygemm_zero,
    unpack_nibbles,
)
from kvtriton.backend.models.int8 import Int8Linear
from kvtriton.backend.models.quantization import GroupQuantized

pytestmark = pytest.mark.skipif(not gemv_serves(), reason="the CPU int4 GEMV cannot run here: "
                                f"{cpu_int4.load(cache_dir() / 'kernels')}")


def tinygemm_weight(codes, scale, zero, group_size):
    """(N, K) fp32: w = (q - 8) * s + z with s and z rounded to bf16, as the kernel reads them."""
    per_input = lambda t: t.to(torch.bfloat16).float().repeat_interleave(group_size, dim=1)  # noqa: E731
    return (codes.float() - 8) * per_input(scale) + per_input(zero)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 17])
@pytest.mark.parametrize("n,k,group_size", [(48, 64, 32), (40, 256, 64), (1000, 576, 32), (30, 384, 128)])
def test_gemv_equals_the_dequantized_weight(rows, n, k, group_size):
    torch.manual_seed(rows * n + k)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // group_size) * 0.02 + 1e-3
    zero = torch.randn(n, k // group_size) * 0.02
    x = torch.randn(rows, k)
    packed, scale_zeros = cpu_int4.pack(codes, scale, zero)
    out = cpu_int4.int4_gemv(x, packed, scale_zeros, group_size, n)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    # Inputs rounded to bf16, products exact, sums fp32: only the order of the sums differs.
    expected = x.to(torch.bfloat16).float() @ tinygemm_weight(codes, scale, zero, group_size).T
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    bf16_in = cpu_int4.int4_gemv(x.to(torch.bfloat16), packed, scale_zeros, group_size, n)
    assert torch.equal(bf16_in, out)


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 31])
@pytest.mark.parametrize("n,k,group_size", [(48, 64, 32), (1000, 576, 32), (30, 384, 128)])
def test_gemv_forms_give_the_same_bits(rows, n, k, group_size):
    """The vdpbf16ps form and the fp32 FMA form (cpu_int4_gemv.cpp) compute the same sums in the same order, inputs
    below fp32's normal range read as zero by both; so whichever this CPU times faster, a row's numbers are those
    of the dot form, as one row alone computes them."""
    torch.manual_seed(rows + n + k)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scale = torch.rand(n, k // group_size) * 0.02 + 1e-3
    zero = torch.randn(n, k // group_size) * 0.02
    x = torch.randn(rows, k) * torch.logspace(-3, 3, k)
    x[0, :5] = torch.tensor([1e-39, -1e-39, 0.0, -0.0, 1e-40])  # below bf16's normal range
    packed, scale_zeros = cpu_int4.pack(codes, scale, zero)
    dot, fma, timed = (torch.ops.kvtriton.int4_gemv(x, packed, scale_zeros, group_size, form) for form in (1, 2, 0))
    assert torch.equal(dot, fma) and torch.equal(timed, dot)
    assert torch.equal(torch.ops.kvtriton.int4_gemv(x[:1], packed, scale_zeros, group_size), dot[:1])
    assert torch.ops.kvtriton.int4_gemv_rows_form().split(" (")[0] in ("vdpbf16ps", "fp32 FMAs")
    with pytest.raises(RuntimeError, match="form must be"):
        torch.ops.kvtriton.int4_gemv(x, packed, scale_zeros, group_size, 3)


def test_gemv_is_closer_to_the_weight_than_pytorchs_kernel():
    """Same operands as _weight_int4pack_mm_for_cpu, which rounds its output to bf16; the GEMV does not."""
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (256, 512), dtype=torch.uint8)
    scale, zero = torch.rand(256, 16) * 0.02 + 1e-3, torch.randn(256, 16) * 0.02
    x = torch.randn(2, 512)
    expected = x.to(torch.bfloat16).float() @ tinygemm_weight(codes, scale, zero, 32).T
    gemv = cpu_int4.int4_gemv(x, *cpu_int4.pack(codes, scale, zero), 32, 256)
    codes_pad = codes.to(torch.int32)
    pytorch = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_pad, 1), 32,
        torch.stack([scale, zero], -1).transpose(0, 1).to(torch.bfloat16).contiguous()).float()
    torch.testing.assert_close(pytorch, expected, rtol=1e-2, atol=1e-2)
    assert (gemv - expected).abs().max() < (pytorch - expected).abs().max() / 100


def test_layers_pack_for_the_gemv_and_multiply_by_tinygemms_weight():
    """Int4Linear's and the two-plane Int8Linear's CPU matmuls run the GEMV, on the weight with its scales (and
    zeros) rounded to bf16."""
    torch.manual_seed(1)
    int4 = Int4Linear.from_linear(torch.nn.Linear(128, 72), 32)
    assert int4._packed.dim() == 3  # the GEMV's layout, not PyTorch's
    x = torch.randn(3, 128)
    weight = tinygemm_weight(unpack_nibbles(int4.qweight), int4.scale,
                             tinygemm_zero(int4.scale, int4.zero_point, int4.offset), 32)
    torch.testing.assert_close(int4(x), x.to(torch.bfloat16).float() @ weight.T + int4.bias, rtol=1e-5, atol=1e-5)
    codes = torch.randint(-127, 128, (40, 64), dtype=torch.int8)
    scale = (torch.rand(40, 2) * 0.01 + 1e-3).to(torch.float16)
    int8 = Int8Linear.from_group_quantized(GroupQuantized(8, codes, scale, None, None, 32, "test Q8_0"))
    assert int8._packed.dim() == 3
    weight = codes.float() * scale.to(torch.bfloat16).float().repeat_interleave(32, dim=1)
    # Two planes: each group's 128-offset sums (cpu_int4_gemv.cpp) are 16x larger, and so is their fp32 rounding.
    torch.testing.assert_close(int8(x[:, :64]), x[:, :64].to(torch.bfloat16).float() @ weight.T, rtol=1e-5, atol=1e-4)


def test_torch_compile_traces_the_gemv_without_a_break():
    torch.manual_seed(2)
    codes = torch.randint(0, 16, (64, 96), dtype=torch.uint8)
    scale, zero = torch.rand(64, 3) * 0.02 + 1e-3, torch.randn(64, 3) * 0.02
    packed, scale_zeros = pack_for_cpu_kernel(codes, scale, tinygemm_zero(scale, None, zero))

    def layer(x):
        return torch.relu(int4_mm_cpu(x * 2, packed, 32, scale_zeros, 60))

    x = torch.randn(2, 96)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(x), layer(x))


def test_bad_operands_are_refused_in_one_line():
    packed, scale_zeros = cpu_int4.pack(torch.zeros(16, 64, dtype=torch.uint8), torch.ones(16, 2), torch.zeros(16, 2))
    with pytest.raises(RuntimeError, match="do not match the packed weight"):
        torch.ops.kvtriton.int4_gemv(torch.zeros(1, 32), packed, scale_zeros, 32)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        torch.ops.kvtriton.int4_gemv(torch.zeros(1, 64, dtype=torch.float64), packed, scale_zeros, 32)


def test_a_failed_build_is_said_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    why = cpu_int4.load(tmp_path / "kernels")
    assert why.startswith("building the CPU int4 kernels (cpu_int4_gemv.cpp, cpu_decode_layers.cpp, cpu_lora.cpp) "
                          "failed")
    assert "no-such-compiler" in why and "\n" not in why


def test_without_the_gemv_pytorchs_kernel_serves_the_same_layers(torch_int4_kernels):
    """A CPU without AVX-512 BF16 (or a failed build): the layers pack for PyTorch's kernel and multiply the same
    numbers, rounded to bf16 at the end."""
    torch.manual_seed(4)
    layer = Int4Linear.from_linear(torch.nn.Linear(128, 40), 32)
    assert layer._packed.dim() == 2  # PyTorch's layout
    x = torch.randn(2, 128)
    weight = tinygemm_weight(unpack_nibbles(layer.qweight), layer.scale,
                             tinygemm_zero(layer.scale, layer.zero_point, layer.offset), 32)
    torch.testing.assert_close(layer(x), x.to(torch.bfloat16).float() @ weight.T + layer.bias, rtol=1e-2, atol=1e-2)


def test_packing_a_slice_of_rows_at_a_time_gives_the_same_operands(monkeypatch):
    """cpu_int4.pack and pack_for_tinygemm convert large layers PACK_ROWS rows at a time (bounded memory); the
    operands equal one pass's, padding of the last slice included."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (150, 64), generator=g, dtype=torch.uint8)
    scale, zero = torch.rand(150, 2, generator=g), torch.rand(150, 2, generator=g)
    whole = cpu_int4.pack(codes, scale, zero), pack_for_tinygemm(codes, scale, zero)
    monkeypatch.setattr(cpu_int4, "PACK_ROWS", 64)
    sliced = cpu_int4.pack(codes, scale, zero), pack_for_tinygemm(codes, scale, zero)
    for (packed, scale_zeros), (packed_s, scale_zeros_s) in zip(whole, sliced):
        assert torch.equal(packed, packed_s) and torch.equal(scale_zeros, scale_zeros_s)


def test_a_served_layer_reads_its_codes_back_from_the_gemvs_copy():
    """release_stored_codes (the loader's, on a CPU model) drops qweight; the codes, any rows of them, and the
    dequantized weight then come back from the GEMV's packed tiles unchanged, for int4 and two-plane int8."""
    torch.manual_seed(3)
    int4 = Int4Linear.from_linear(torch.nn.Linear(128, 72), 32)
    g = torch.Generator().manual_seed(3)
    int8 = Int8Linear.from_group_quantized(GroupQuantized(
        8, torch.randint(-128, 128, (40, 64), generator=g, dtype=torch.int8), torch.rand(40, 4, generator=g).half(),
        None, None, 16, "Q6_K"))
    for layer in (int4, int8):
        codes, weight = layer.group_quantized().codes, layer.dequantized_weight()
        layer.release_stored_codes()
        assert layer.qweight is None
        assert torch.equal(layer.group_quantized().codes, codes) and torch.equal(layer.dequantized_weight(), weight)
        assert torch.equal(layer.dequantized_weight(slice(5, 37)), weight[5:37])
