"""GGUF k-quants, as a Q4_K_M file holds them: Q4_K blocks load as stored (int4 groups of 32, their scale
products rounded to fp16); under quantization auto Q6_K blocks too (int8 groups of 16, on kvtriton's CPU
GEMV) and every other tensor keeps at least the file's bits: a fused module with a Q6_K part becomes int8
per channel, a float one stays float. Asked for int4, everything not stored as 4-bit is int4."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from kvtriton.backend.models.gguf_checkpoint import convert_gguf
from kvtriton.backend.models.gguf_quantized import decode_blocks
from kvtriton.backend.models.int4 import Int4Linear, gemv_serves
from kvtriton.backend.models.int8 import Int8Linear
from kvtriton.backend.models.loader import load_model
from kvtriton.backend.models.quantization import layer_sources

from tests.test_gguf_checkpoint import random_kquant_rows, write_tiny_gguf
from tests.test_int4 import assert_logits_close


def fp16_rounding_bound(q) -> torch.Tensor:
    """Per weight, how far the fp16 scale and offset may move it: half an fp16 ulp of each, times the code."""
    g = q.group_size
    scale, offset = q.scale.float().repeat_interleave(g, 1), q.offset.float().repeat_interleave(g, 1)
    return (15 * scale.abs() + offset.abs()) * 2.0**-11


def test_q4_k_blocks_decode_to_ggufs_dequantization_within_the_fp16_scales():
    raw = random_kquant_rows(8, 512, "Q4_K", np.random.default_rng(0))
    q = decode_blocks(raw, "Q4_K")
    assert (q.bits, q.group_size, q.source, q.shape) == (4, 32, "Q4_K", (8, 512))
    assert q.codes.max() <= 15 and q.zero_point.eq(0).all()
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))
    error = (q.dequantize() - reference).abs()
    assert (error <= fp16_rounding_bound(q)).all()
    assert 0 < error.max() < 1e-3 * reference.abs().max()  # rounded indeed (d * sc is not always an fp16), finely


def test_q6_k_blocks_decode_to_ggufs_dequantization_within_the_fp16_scales():
    raw = random_kquant_rows(8, 512, "Q6_K", np.random.default_rng(1))
    q = decode_blocks(raw, "Q6_K")
    assert (q.bits, q.group_size, q.source, q.shape) == (8, 16, "Q6_K", (8, 512))
    assert q.zero_point is None and q.offset is None and -32 <= q.codes.min() and q.codes.max() <= 31
    reference = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q6_K))
    error = (q.dequantize() - reference).abs()
    assert (error <= 32 * q.scale.float().abs().repeat_interleave(16, 1) * 2.0**-11).all()  # |q - 32| <= 32
    assert 0 < error.max() < 1e-3 * reference.abs().max()


# A Q4_K_M-like mix: layer 0's v and down in Q6_K (its qkv then mixes Q4_K and Q6_K), its o_proj left in F32;
# layer 1 all Q4_K; the embedding (= tied head) Q8_0.
KQUANT_TYPES = {
    **{f"blk.{i}.{t}.weight": "Q4_K" for i in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                               "ffn_gate", "ffn_up", "ffn_down")},
    "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "token_embd.weight": "Q8_0",
}
del KQUANT_TYPES["blk.0.attn_output.weight"]


@pytest.fixture(scope="module")
def q4_k_m(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquants")
    # Inputs of 256 for the k-quants; o_proj's (heads x head_dim = 32) cannot be one, so it is Q8_0 in layer 1.
    types = {**KQUANT_TYPES, "blk.1.attn_output.weight": "Q8_0"}
    write_tiny_gguf(root / "m.gguf", quant_types=types, hidden=256, ffn=256)
    return root / "m.gguf", convert_gguf(root / "m.gguf", root / "hf")


def kinds(model) -> dict[str, tuple]:
    return {name: (type(m).__name__, getattr(m, "source", ""), getattr(m, "group_size", None))
            for name, m in model.named_modules() if isinstance(m, nn.Linear) or hasattr(m, "source")}


def test_auto_keeps_each_tensor_in_no_fewer_bits_than_the_file(q4_k_m):
    path, folder = q4_k_m
    reference = load_model(folder)  # fp32: the file's own dequantization
    model = load_model(folder, quantization="int4", gguf=path, keep_gguf_precision=True)
    got = kinds(model)
    assert got["layers.1.self_attn.qkv_proj"] == ("Int4Linear", "Q4_K", 32)  # stored
    assert got["layers.0.mlp.gate_up_proj"] == ("Int4Linear", "Q4_K", 32)
    assert got["layers.0.self_attn.qkv_proj"][:1] == ("Int8Linear",)  # Q4_K + Q4_K + Q6_K: 6 bits kept
    assert model.layers[0].self_attn.qkv_proj.group_size == 0  # per channel, from float
    # Q6_K alone: its blocks as int8 groups of 16 where the GEMV serves, else int8 per channel from float
    assert got["layers.0.mlp.down_proj"] == (("Int8Linear", "Q6_K", 16) if gemv_serves() else
                                             ("Int8Linear", "int8 per channel", 0))
    assert type(model.layers[0].self_attn.o_proj) is nn.Linear  # F32 in the file: stays float
    assert got["layers.1.self_attn.o_proj"] == ("Int8Linear", "Q8_0", 32) and got["lm_head"][:2] == ("Int8Linear",
                                                                                                       "Q8_0")
    stored = model.layers[1].self_attn.qkv_proj
    error = (stored.dequantized_weight() - reference.layers[1].self_attn.qkv_proj.weight).abs()
    assert (error <= fp16_rounding_bound(stored.group_quantized())).all()
    sources = layer_sources(model)
    assert "gguf Q4_K blocks as stored (scales in fp16, g32)" in sources
    assert not gemv_serves() or "gguf Q6_K blocks as stored (scales in fp16, g16)" in sources
    assert_logits_close(model, reference, top1=False)


def test_asked_for_int4_everything_not_stored_is_int4(q4_k_m):
    path, folder = q4_k_m
    model = load_model(folder, quantization="int4", gguf=path)
    assert isinstance(model.layers[0].self_attn.qkv_proj, Int4Linear)
    assert model.layers[0].self_attn.qkv_proj.source == "int4 g32"  # from float: 4 bits, as asked
    assert isinstance(model.layers[0].mlp.down_proj, Int4Linear)  # Q6_K: stored only under auto
    assert isinstance(model.layers[0].self_attn.o_proj, Int4Linear)
    assert model.layers[1].self_attn.qkv_proj.source == "Q4_K"
    assert isinstance(model.lm_head, Int8Linear)


def test_q4_k_blocks_export_to_onnx_as_stored(q4_k_m, tmp_path):
    """kvtriton build --precision int4 from a Q4_K_M file: the Q4_K blocks become MatMulNBits over their codes
    with a group term for the offsets (as Q4_1's), and the graph computes what the layers compute."""
    from tests.test_onnx_int4 import export, max_diff, outputs

    path, folder = q4_k_m
    model = load_model(folder, quantization="int4", gguf=path)
    _, ops = export(model, tmp_path / "int4.onnx", "onnxruntime")
    assert ops["MatMulNBits"] == 2 * 4 + 1  # every projection and the head
    assert ops["group term"] >= 3  # layer 1's qkv, both gate_up: Q4_K's offsets
    got, expected = outputs(model, tmp_path / "int4.onnx"), outputs(model, kernels=False)
    assert (got[0] - expected[0]).abs().max() < 1e-2 * expected[0].abs().max()  # 8-bit head: int8 activations
    for g, e in zip(got[1:], expected[1:]):  # K and V: fp32 sums of 256 products of weights up to ~8
        assert max_diff([g], [e])[0] < 1e-5 * e.abs().max()
