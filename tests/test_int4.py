"""INT4 weight-only (group-wise, asymmetric) and GGUF blocks loaded without loss, in the torch runner's model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.models.fp8 import fp8_supported
from kvtriton.backend.models.gguf_checkpoint import convert_gguf
from kvtriton.backend.models.gguf_quantized import decode_blocks, gguf_source
from kvtriton.backend.models.int4 import Int4Linear, gemv_serves, pack_nibbles, quantize_groupwise, unpack_nibbles
from kvtriton.backend.models.int8 import Int8Linear
from kvtriton.backend.models.llama import TIED_TABLE_ROWS
from kvtriton.backend.models.loader import load_model, resolve_quantization
from kvtriton.backend.models.quantization import DenseRows, GroupQuantized, QuantizedLinear, quantize_linears
from kvtriton.backend.runners.step_graph import StepGraph, example_inputs

from tests.test_gguf_checkpoint import LAYERS, write_tiny_gguf
from tests.tiny_model import make_tiny_engine, make_tiny_model

# The CPU kernels compute in bf16 (8 significant bits): the logits of a few-layer model stay within a
# few percent of their range of the fp32 reference, and the top token agrees.
BF16_LOGITS = 0.05


def linear_error(layer: QuantizedLinear, bias=None) -> float:
    """max |layer(x) - x @ W_dequantized^T| / max |x @ W_dequantized^T| over a random batch."""
    x = torch.randn(5, layer.in_features)
    expected = nn.functional.linear(x, layer.dequantized_weight(), bias)
    return ((layer(x) - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_groupwise_codes_zero_points_and_error(group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.logspace(-3, 0, 48)[:, None]  # rows of very different range
    w[7, :group_size] = 0.0  # one all-zero group
    w[9] = w[9].abs() + 0.5  # a row with no negative weights: the range is widened to include 0
    q = quantize_groupwise(w, group_size)
    groups = 256 // group_size
    assert (q.bits, q.group_size, q.offset) == (4, group_size, None)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scale.dtype == torch.float16 and q.scale.shape == (48, groups)
    assert q.zero_point.dtype == torch.uint8 and int(q.zero_point.max()) <= 15
    assert q.scale[7, 0] == 1 and (q.codes[7, :group_size] == q.zero_point[7, 0]).all()
    assert (q.zero_point[9] == 0).all()
    step = q.scale.float().repeat_interleave(group_size, dim=1)
    assert ((q.dequantize() - w).abs() <= step + 1e-7).all()  # half a step, plus half at the grid's ends


def test_nibbles_are_onnx_order_and_round_trip():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 32) and (packed[:, 0] == codes[:, 0] + 16 * codes[:, 1]).all()
    assert torch.equal(unpack_nibbles(packed), codes)


@pytest.mark.parametrize("out_features", [48, 50])  # 50: not a multiple of the kernel's 16 rows
def test_int4_linear_matches_its_dequantized_weight(out_features):
    torch.manual_seed(0)
    lin = nn.Linear(128, out_features, bias=True)
    layer = Int4Linear.from_linear(lin, 32)
    assert layer.qweight.shape == (out_features, 64) and layer._packed is not None  # the CPU kernel's path
    assert linear_error(layer, lin.bias) < 1e-2  # bf16 activations
    x = torch.randn(2, 3, 128)
    assert layer(x).shape == (2, 3, out_features) and layer(x).dtype == torch.float32
    # Off the kernel (the GPU's path today) it is the dequantized weight's matmul exactly.
    layer._packed = None
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.dequantized_weight(), lin.bias), atol=1e-5)


def test_dense_copies_see_few_row_counts(monkeypatch):
    """oneDNN compiles and caches a kernel per input shape: 16-bit copies multiply rows padded to a bucket, so
    prompts of every length make a few shapes; the padding never reaches the result."""
    from kvtriton.backend.models import quantization

    seen = []
    linear = nn.functional.linear
    monkeypatch.setattr(quantization.F, "linear", lambda x, w: seen.append(x.shape[0]) or linear(x, w))
    torch.manual_seed(0)
    w = torch.randn(48, 128, dtype=torch.bfloat16)
    for m in range(17, 33):
        x = torch.randn(m, 128)
        out = quantization.dense_linear(x, w)
        assert out.shape == (m, 48) and torch.allclose(out.float(), linear(x.bfloat16(), w).float(), rtol=1e-2,
                                                        atol=1e-1)
    assert set(seen) == {32}
    seen.clear()
    quantization.dense_linear(torch.randn(17, 128), w.float())  # fp32 copies go through BLAS: unpadded
    assert seen == [17]


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-2)])
def test_inputs_of_many_rows_multiply_by_the_dense_copy(dtype, atol):
    torch.manual_seed(0)
    lin = nn.Linear(128, 48, bias=True)
    layer = Int4Linear.from_linear(lin, 32)
    x = torch.randn(4, 128)
    kernel = layer(x)
    size = layer.add_dense_weight(4, dtype)
    assert size == 48 * 128 * dtype.itemsize and layer.dense_weight.dtype == dtype
    assert torch.equal(layer(x[:3]), kernel[:3])  # fewer rows: the kernel, as before
    dense = nn.functional.linear(x.to(dtype), layer.dequantized_weight().to(dtype)).float() + lin.bias
    assert torch.equal(layer(x), dense)  # 4 rows: the copy
    assert (dense - kernel).abs().max() < atol * kernel.abs().max()  # the kernel's bf16 product of the same weight
    if dtype == torch.float32:  # the fp32 copy is the dequantized weight itself: the reference product
        assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantized_weight(), lin.bias))


def test_load_model_gives_the_quantized_layers_dense_copies_on_the_cpu(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny")
    plain = load_model(folder, quantization="int4", group_size=64)
    model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=24)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m is not model.lm_head]
    assert layers and all(m.dense_weight is not None and m.dense_min_rows == 24 for m in layers)
    assert all(m.dense_weight is None for m in plain.modules() if isinstance(m, QuantizedLinear))
    assert_logits_close(model, plain, input_ids=torch.arange(3, 35)[None], top1=False)  # 32 rows: the copies


def test_dense_copies_auto_are_fp32_without_native_bf16_and_bf16_for_decode_batches_with_it(tmp_path, monkeypatch):
    import kvtriton.backend.models.loader as loader

    folder = make_tiny_model(tmp_path / "tiny")

    def copied(model):
        return [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.dense_weight is not None]

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)
    model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=-1)
    auto = loader.AUTO_DENSE_MIN_ROWS
    assert copied(model) and all(m.dense_weight.dtype == torch.float32 for m in copied(model))
    assert (model.dense_rows.decode, model.dense_rows.prefill) == (auto, auto)
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=-1)
    assert copied(model) and all(m.dense_weight.dtype == torch.bfloat16 for m in copied(model))
    decode = loader.AUTO_BF16_DECODE_ROWS if gemv_serves() else loader.AUTO_BF16_DECODE_ROWS_TORCH_KERNEL
    assert (model.dense_rows.decode, model.dense_rows.prefill) == (decode, loader.AUTO_BF16_PREFILL_ROWS)
    assert all(m.dense_rows is model.dense_rows for m in copied(model))  # one rule: the runner marks prefill once
    model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=24)  # asked for: every step
    assert (model.dense_rows.decode, model.dense_rows.prefill) == (24, 24)
    assert load_model(folder, quantization="int4", group_size=64, dense_min_rows=0).dense_rows is None


@pytest.mark.skipif(not gemv_serves(), reason="the crossover is timed against kvtriton's int4 GEMV")
def test_dense_copies_auto_thresholds_are_timed_on_this_cpu(tmp_path, monkeypatch, caplog):
    """A model large enough to time: the copies take decode batches and prompt chunks from a candidate row count
    where they win by the margin on this CPU, else from the fixed one; the choice and its timings are logged."""
    import kvtriton.backend.models.dense_crossover as crossover
    import kvtriton.backend.models.loader as loader

    folder = make_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(crossover, "MIN_WEIGHTS", 0)  # time even the tiny model's layers
    with caplog.at_level("INFO", logger="kvtriton"):
        model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=-1)
    rows = model.dense_rows
    assert rows.decode in (*crossover.DECODE_CANDIDATES, loader.AUTO_BF16_DECODE_ROWS)
    assert rows.prompt in (*crossover.PROMPT_CANDIDATES, loader.AUTO_BF16_PREFILL_ROWS)
    assert rows.prefill == loader.AUTO_BF16_PREFILL_ROWS  # a step of many short prompts: not timed
    assert (f"decode batches from {rows.decode} sequences and prompt chunks from {rows.prompt} tokens, timed at "
            "load: 32 rows: GEMV") in caplog.text
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.dense_weight is not None]
    # The margin: the copies at most 0.8 the GEMV's time; each candidate timed once, lowest first.
    for timings, decode, prefill in [({32: (1.0, 0.5), 64: (1.0, 0.5)}, 32, 64),
                                     ({32: (1.0, 0.9), 64: (1.0, 0.9), 128: (1.0, 0.7)}, 64, 128),
                                     ({32: (1.0, 0.9), 64: (1.0, 0.9), 128: (1.0, 0.9)}, 64, 256)]:
        asked = []
        monkeypatch.setattr(crossover, "_timings", lambda layers, r, t=timings: asked.append(r) or t[r])
        assert crossover.dense_rows(layers, 64, 256)[:2] == (decode, prefill)
        assert asked == sorted(timings)
    monkeypatch.setattr(crossover, "MIN_WEIGHTS", 10**12)  # too small to time: the fixed thresholds, no timings
    assert crossover.dense_rows(layers, 64, 256) == (64, 256, None)


def test_dense_copies_auto_are_not_made_where_memory_is_short(tmp_path, monkeypatch, caplog):
    import kvtriton.backend.models.loader as loader

    folder = make_tiny_model(tmp_path / "tiny")
    monkeypatch.setattr(loader.host_memory, "available_bytes", lambda: 1000)  # bytes: less than any copy
    with caplog.at_level("INFO", logger="kvtriton"):
        model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=-1)
    assert model.dense_rows is None
    assert all(m.dense_weight is None for m in model.modules() if isinstance(m, QuantizedLinear))
    assert "not made" in caplog.text and "cpu_dense_min_rows" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="kvtriton"):  # asked for: made, with a warning
        model = load_model(folder, quantization="int4", group_size=64, dense_min_rows=24)
    assert model.dense_rows.decode == 24 and "as cpu_dense_min_rows asks" in caplog.text


def test_dense_rows_give_prefill_steps_and_long_prompt_chunks_their_own_thresholds():
    torch.manual_seed(0)
    layer = Int4Linear.from_linear(nn.Linear(128, 48), 32)
    x = torch.randn(8, 128)
    kernel = layer(x)
    rows = DenseRows(decode=4, prefill=64, prompt=6)
    layer.add_dense_weight(rows, torch.float32)
    copy = nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
    assert torch.equal(layer(x), copy)  # a decode step of 8 sequences: the copy
    with rows.prefill_step(longest_chunk=4):
        assert torch.equal(layer(x), kernel)  # 8 tokens of short prompts: the kernel
        assert torch.equal(layer(x[:1]), kernel[:1])
    with rows.prefill_step(longest_chunk=7):
        assert torch.equal(layer(x), copy)  # a step with a 7-token chunk: the copy from 6 rows...
        assert torch.equal(layer(x[:1]), kernel[:1])  # ...and the kernel below (a head's logits rows)
    assert torch.equal(layer(x), copy) and not rows.in_prefill
    assert DenseRows(4, 64).prompt == 64  # a prompt threshold defaults to the prefill one


def test_the_runner_takes_the_prefill_threshold_in_steps_that_are_not_decode_only(tiny_folder, monkeypatch):
    engine = make_tiny_engine(tiny_folder, quantization="int4", cpu_dense_min_rows=2)
    seen, chunks = [], []
    rows = engine.runner.model.dense_rows
    monkeypatch.setattr(DenseRows, "min_rows", lambda self: seen.append(self.in_prefill) or 2)
    prefill_step = DenseRows.prefill_step
    monkeypatch.setattr(DenseRows, "prefill_step", lambda self, longest: chunks.append(longest) or prefill_step(
        self, longest))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        engine.generate([[5, 6, 7, 8], [9, 10, 11]], params)
    finally:
        engine.shutdown()
    assert rows is not None and True in seen and False in seen  # the prompts' step, then the decode steps
    assert chunks == [4]  # one step of both prompts, told its longest chunk
    assert not rows.in_prefill


def test_a_head_that_reads_the_tied_table_in_batches_gets_no_fp32_copy_but_a_bf16_one(tmp_path, monkeypatch,
                                                                                     torch_int4_kernels):
    # torch_int4_kernels: the table serves heads on PyTorch's kernels, which do not tile rows
    import kvtriton.backend.models.loader as loader

    write_tiny_gguf(tmp_path / "tiny.gguf")
    folder = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf")
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: False)  # fp32 copies: the table is the same numbers
    model = load_model(folder, quantization="int4", gguf=tmp_path / "tiny.gguf", dense_min_rows=TIED_TABLE_ROWS)
    assert model.tied_table_serves_head() and model.lm_head.dense_weight is None
    assert model.layers[0].mlp.down_proj.dense_weight is not None
    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: True)  # bf16 copies: the head's is the faster one
    model = load_model(folder, quantization="int4", gguf=tmp_path / "tiny.gguf", dense_min_rows=TIED_TABLE_ROWS)
    head = model.lm_head
    assert head.dense_weight.dtype == torch.bfloat16
    hidden = torch.randn(TIED_TABLE_ROWS, head.in_features)
    copy = nn.functional.linear(hidden.bfloat16(), head.dense_weight).float()
    assert torch.equal(model.compute_logits(hidden), copy)
    model.dense_rows.prefill = TIED_TABLE_ROWS + 1
    with model.dense_rows.prefill_step(longest_chunk=1):  # as many rows of short prompts, below it: the table
        assert torch.equal(model.compute_logits(hidden), torch.mm(model.embed_tokens.weight, hidden.T).T)


def test_group_size_that_does_not_divide_the_inputs_is_refused_with_the_sizes_that_do():
    with pytest.raises(ValueError, match="group_size 128 does not divide the 96 inputs of proj; use 32"):
        Int4Linear.from_linear(nn.Linear(96, 32), 128, name="proj")


def test_int8_groups_run_as_two_int4_planes_exactly():
    """Q8_0-style weights: int8 codes over their full range, one fp16 scale per 32."""
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (40, 96), dtype=torch.int8)
    codes[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)
    q = GroupQuantized(8, codes, (torch.rand(40, 3) * 0.01).half(), None, None, 32, "Q8_0")
    layer = Int8Linear.from_group_quantized(q)
    assert layer.group_size == 32 and layer._packed is not None
    assert torch.equal(layer.dequantized_weight(), q.dequantize())
    assert linear_error(layer) < 1e-2


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_to_ggufs_own_dequantization_exactly(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 96), dtype=np.float32) + rng.standard_normal((16, 1), dtype=np.float32)
    packed = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    q = decode_blocks(packed, kind)
    assert (q.bits, q.group_size, q.source) == (8 if kind == "Q8_0" else 4, 32, kind)
    np.testing.assert_array_equal(q.dequantize().numpy(),
                                  gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[kind]))


QUANT_TYPES = {  # a mix, as llama.cpp files have: Q4_1 mostly, one layer Q4_0, the embedding (= tied lm_head) Q8_0
    **{f"blk.{i}.{t}.weight": "Q4_1" for i in range(LAYERS)
       for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")},
    **{f"blk.1.{t}.weight": "Q4_0" for t in ("attn_q", "attn_k", "attn_v")},
    "token_embd.weight": "Q8_0",
}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf", quant_types=QUANT_TYPES)
    return root / "tiny.gguf", convert_gguf(root / "tiny.gguf", root / "hf")


def assert_stored_without_loss(quantized, reference):
    """Every quantized layer multiplies by exactly the weight of the fp32 (dequantized) checkpoint."""
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    floats = dict(reference.named_modules())
    assert layers and all(isinstance(floats[n], nn.Linear) for n in layers)
    for name, layer in layers.items():
        assert torch.equal(layer.dequantized_weight(), floats[name].weight), name
    return layers


def assert_logits_close(quantized, reference, input_ids=None, top1=True):
    """Prefill logits of `input_ids` (B, T) (default: the tracing example) against the reference's.
    top1=False for random-weight models, whose logits are too flat for bf16 to keep their order."""
    inputs = example_inputs(reference, batch=2, tokens=5, block_size=4)
    if input_ids is not None:  # a prefill from position 0: no old context
        b, t = input_ids.shape
        inputs = (input_ids, torch.arange(t).repeat(b, 1), *inputs[2:4], torch.zeros(b, 1, dtype=torch.int64))
    with torch.no_grad():
        got, expected = StepGraph(quantized)(*inputs)[0], StepGraph(reference)(*inputs)[0]  # (B, V)
    assert (got - expected).abs().max() < BF16_LOGITS * expected.abs().max()
    assert not top1 or torch.equal(got.argmax(-1), expected.argmax(-1))


def test_tiny_gguf_loads_its_blocks_as_stored(tiny_gguf):
    path, folder = tiny_gguf
    reference = load_model(folder)  # the fp32 conversion: gguf's own dequantization
    model = load_model(folder, quantization="int4", gguf=path)
    layers = assert_stored_without_loss(model, reference)
    sources = {name: (type(layer).__name__, layer.source) for name, layer in layers.items()}
    assert sources["layers.0.self_attn.qkv_proj"] == ("Int4Linear", "Q4_1")
    assert sources["layers.1.self_attn.qkv_proj"] == ("Int4Linear", "Q4_0")
    assert sources["layers.1.mlp.down_proj"] == ("Int4Linear", "Q4_1")
    assert sources["lm_head"] == ("Int8Linear", "Q8_0") and model.lm_head.group_size == 32
    assert model.embed_tokens.weight.dtype == torch.float32  # the embedding stays a float table
    assert_logits_close(model, reference, top1=False)
    # int8 takes the same blocks: the file chose the precision, the scheme applies to float tensors.
    assert load_model(folder, quantization="int8", gguf=path).layers[0].mlp.down_proj.source == "Q4_1"


def test_a_gguf_served_by_path_keeps_its_blocks_only_in_the_file(tiny_gguf, tmp_path, monkeypatch):
    """resolve_checkpoint converts a GGUF with floats="unstored": model.safetensors holds only the tensors not in
    blocks, and the loader makes the rest from the file: the same float weights as a whole folder's, the same
    blocks as stored. A moved file is named in one line, and serving it from where it went points the folder there."""
    from safetensors import safe_open

    from kvtriton.backend.models.checkpoint import GGUF_SOURCE, resolve_checkpoint

    path, whole = tiny_gguf
    monkeypatch.setenv("KVTRITON_CACHE", str(tmp_path / "cache"))
    served = tmp_path / "served.gguf"
    served.write_bytes(path.read_bytes())
    folder = resolve_checkpoint(str(served))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        written = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" not in written and "model.embed_tokens.weight" not in written
    assert "model.norm.weight" in written and (folder / GGUF_SOURCE).is_file()
    reference = load_model(whole)
    assert all(torch.equal(a, b) for a, b in zip(load_model(folder).state_dict().values(),
                                                 reference.state_dict().values()))
    assert_stored_without_loss(load_model(folder, quantization="int4", gguf=served), reference)
    moved = tmp_path / "elsewhere" / "served.gguf"
    moved.parent.mkdir()
    served.rename(moved)
    with pytest.raises(FileNotFoundError, match="served.gguf, which is gone"):
        load_model(folder)
    assert resolve_checkpoint(str(moved)) == folder  # the same name and bytes: the folder now reads the new path
    assert_stored_without_loss(load_model(folder, quantization="int4", gguf=moved), reference)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_qwen_gguf_loads_its_blocks_in_hf_row_order(tmp_path, arch):
    """Qwen's Q/K rows are stored in HF's order (llama.cpp interleaves only llama's): the blocks load as they are."""
    write_tiny_gguf(tmp_path / "q.gguf", arch=arch, pre="qwen2", quant_types=QUANT_TYPES)
    folder = convert_gguf(tmp_path / "q.gguf", tmp_path / "hf")
    reference = load_model(folder)
    model = load_model(folder, quantization="int4", gguf=tmp_path / "q.gguf")
    assert_stored_without_loss(model, reference)
    assert_logits_close(model, reference, top1=False)


def test_many_rows_of_logits_multiply_by_the_tied_float_table(tiny_gguf, torch_int4_kernels):
    """The Q8_0 head tied to the embedding, on PyTorch's kernels: few rows through its kernel, TIED_TABLE_ROWS or
    more through the embedding's fp32 table, which holds the same numbers (so those logits are the fp32 model's)."""
    path, folder = tiny_gguf
    model = load_model(folder, quantization="int4", gguf=path)
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.dequantized_weight(), model.embed_tokens.weight)
    hidden = torch.randn(TIED_TABLE_ROWS, model.config.hidden_size)
    with torch.no_grad():
        few, many = model.compute_logits(hidden[:2]), model.compute_logits(hidden)
        assert torch.equal(few, model.lm_head(hidden[:2]).float())  # the kernel (bf16 activations)
        assert torch.allclose(many, hidden @ model.embed_tokens.weight.T, rtol=1e-5, atol=1e-5)
        assert not torch.equal(many[:2], few)


@pytest.mark.skipif(not gemv_serves(), reason="kvtriton's CPU GEMV is not built on this CPU")
def test_a_head_on_kvtriton_gemv_multiplies_every_batch_itself_row_for_row(tiny_gguf):
    """kvtriton's GEMV tiles rows, so the head never takes the float table; and a row's logits do not depend on
    the rows beside it."""
    path, folder = tiny_gguf
    model = load_model(folder, quantization="int4", gguf=path)
    assert model.lm_head.gemv_operands is not None and not model.tied_table_serves_head()
    hidden = torch.randn(TIED_TABLE_ROWS + 5, model.config.hidden_size)
    with torch.no_grad():
        batch = model.compute_logits(hidden)
        assert torch.equal(batch, model.lm_head(hidden).float())
        assert all(torch.equal(batch[i:i + 1], model.compute_logits(hidden[i:i + 1])) for i in (0, 7, 20))


def test_a_fused_module_with_parts_in_different_families_is_quantized_from_float(tmp_path):
    types = {**QUANT_TYPES, "blk.0.attn_v.weight": "Q8_0"}
    write_tiny_gguf(tmp_path / "mixed.gguf", quant_types=types)
    folder = convert_gguf(tmp_path / "mixed.gguf", tmp_path / "hf")
    model = load_model(folder, quantization="int4", gguf=tmp_path / "mixed.gguf")
    assert model.layers[0].self_attn.qkv_proj.source == "int4 g32"  # Q4_1 + Q4_1 + Q8_0: not one format
    assert model.layers[1].self_attn.qkv_proj.source == "Q4_0"


def test_float_checkpoint_quantizes_every_linear(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny")
    reference = load_model(folder)
    model = load_model(folder, quantization="int4", group_size=64)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 2 * 4 + 1 and all(isinstance(m, Int4Linear) and m.group_size == 64 for m in layers.values())
    assert_logits_close(model, reference)
    with pytest.raises(ValueError, match="quantization scheme must be one of int8, int4"):
        quantize_linears(reference, "int3")


def test_engine_config_validates_the_quantization_knobs():
    assert EngineConfig(quantization="int4", quantization_group_size=128).quantization_group_size == 128
    with pytest.raises(ValueError, match="quantization_group_size must be 32, 64 or 128"):
        EngineConfig(quantization="int4", quantization_group_size=16)
    with pytest.raises(ValueError, match="quantization must be none, auto, int8, int4 or fp8"):
        EngineConfig(quantization="fp4")
    with pytest.raises(ValueError, match="kvtriton build --precision int4"):
        EngineConfig(quantization="int4", runner="onnxruntime")
    assert EngineConfig.from_mapping({"quantization": "int4", "quantization_group_size": "64"}).quantization == "int4"


def test_default_model_int4_from_its_q4_1_blocks_equals_the_fp32_conversion(default_model_folder):
    """SmolLM2's GGUF: Q4_1 projections and a Q8_0 embedding/lm_head, loaded as stored."""
    reference = load_model(default_model_folder)
    model = load_model(default_model_folder, quantization="int4", gguf=gguf_source("default"))
    layers = assert_stored_without_loss(model, reference)
    assert {layer.source for layer in layers.values()} == {"Q4_1", "Q8_0"}
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    # Prompts whose next token leads by a margin (1.8 to 4 logits) well above the kernels' rounding.
    for prompt in ["The capital of France is", "def fibonacci(n):\n    return", "1 2 3 4 5 6 7 8"]:
        assert_logits_close(model, reference, input_ids=torch.tensor([tokenizer.encode(prompt)]))


def test_engine_serves_a_gguf_from_its_blocks(tiny_gguf, tmp_path, monkeypatch):
    """model=<file>.gguf, quantization=int4: the engine converts the file once (tokenizer, config) and the
    torch runner multiplies by the file's own Q4 blocks."""
    from kvtriton.backend.engine.llm_engine import LLMEngine
    from kvtriton.backend.engine.sampling_params import SamplingParams

    monkeypatch.setenv("KVTRITON_CACHE", str(tmp_path / "cache"))
    path, _ = tiny_gguf
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", block_size=4, num_kv_blocks=64,
                                    quantization="int4")).start()
    try:
        model = engine.runner.model
        assert model.layers[0].mlp.gate_up_proj.source == "Q4_1" and model.lm_head.source == "Q8_0"
        out = engine.generate(["hello 12"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 6
    finally:
        engine.shutdown()


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_an_untied_embedding_is_looked_up_in_its_blocks(tmp_path, monkeypatch, kind):
    """An untied GGUF's quantized token_embd stays in its blocks where the runner asks (quantized_embedding):
    each looked-up row equals the fp32 conversion's row (gguf's dequantization) exactly, so the logits are the
    float table's bit for bit, and a GGUF served by path never makes the float table at all. The engine on the
    CPU asks for it."""
    from kvtriton.backend.engine.llm_engine import LLMEngine
    from kvtriton.backend.models.checkpoint import resolve_checkpoint
    from kvtriton.backend.models.quantized_embedding import QuantizedEmbedding

    path = tmp_path / "untied.gguf"
    write_tiny_gguf(path, untied=True, quant_types={**QUANT_TYPES, "token_embd.weight": kind,
                                                    "output.weight": "Q8_0"})
    monkeypatch.setenv("KVTRITON_CACHE", str(tmp_path / "cache"))
    folder = resolve_checkpoint(str(path))  # floats="unstored": the embedding only in the file
    reference = load_model(folder)
    table = load_model(folder, quantization="int4", gguf=path)
    assert isinstance(table.embed_tokens, nn.Embedding)  # not asked for: a float table, as exporters gather
    model = load_model(folder, quantization="int4", gguf=path, quantized_embedding=True)
    assert isinstance(model.embed_tokens, QuantizedEmbedding) and model.embed_tokens.source == kind
    ids = torch.arange(reference.config.vocab_size)
    assert torch.equal(model.embed_tokens(ids), reference.embed_tokens.weight)
    assert model.embed_tokens(ids[:10].view(2, 5)).shape == (2, 5, reference.config.hidden_size)
    inputs = example_inputs(reference, batch=2, tokens=5, block_size=4)
    with torch.no_grad():
        assert torch.equal(StepGraph(model)(*inputs)[0], StepGraph(table)(*inputs)[0])
    engine = LLMEngine(EngineConfig(model=str(path), device="cpu", block_size=4, num_kv_blocks=64,
                                    quantization="int4")).start()
    try:
        assert isinstance(engine.runner.model.embed_tokens, QuantizedEmbedding)
        out = engine.generate(["hello 12"], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
        assert out.finish_reason == "length" and len(out.token_ids) == 6
    finally:
        engine.shutdown()


def test_auto_is_int4_only_for_a_gguf_on_the_cpu(tiny_gguf):
    """auto never loses precision against the checkpoint: the GGUF's own blocks, or the float weights."""
    path, folder = tiny_gguf
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_quantization("auto", str(path), cpu) == ("int4", path, True)  # and no fewer bits than the file's
    assert resolve_quantization("auto", str(folder), cpu) == (None, None, False)  # an HF folder: stays float
    assert resolve_quantization("auto", str(path), cuda) == (None, None, False)  # int4 on CUDA: not measured yet
    assert resolve_quantization("int4", str(path), cpu) == ("int4", path, False)  # asked for: 4 bits everywhere
    assert resolve_quantization("int8", str(folder), cpu) == ("int8", None, False)
    assert resolve_quantization("none", str(path), cpu) == (None, None, False)
    if fp8_supported(cpu) is not None:  # a torch whose CPU _scaled_mm takes no per-row scales (2.11, as on GPU hosts)
        with pytest.raises(ValueError, match="fp8"):
            resolve_quantization("fp8", str(path), cpu)
    else:
        assert resolve_quantization("fp8", str(path), cpu) == ("fp8", None, False)  # from the dequantized blocks
