"""What a Q4_K_M GGUF costs and buys on the CPU under each quantization: auto (no tensor below the file's
bits), int4 (4 bits everywhere), none (fp32).

No real Q4_K_M file is reachable here (PyPI only), so the benchmark writes one: a Llama of --hidden /
--layers / --ffn with the default model's tokenizer and random k-quant blocks, laid out as llama.cpp's
Q4_K_M lays them out (Q4_K everywhere; Q6_K for `output` and for `attn_v` and `ffn_down` in the first and
last eighth of the layers and every third between; the embedding Q4_K). Random weights make the
quality meaningless but the bytes and kernels real. For each variant it prints one stream's decode tok/s
through the engine (greedy, EOS ignored, the median of --rounds, variants alternated), the bytes of the
quantized layers, and the bound: those bytes over this machine's measured copy bandwidth; then the ratio
to fp32 and to HF transformers' fp32 `generate` on the same converted folder.

--as-shipped serves each variant as model_repository/llm does (compiled decode, one OpenMP team, so one engine
at a time) and adds `auto-graphs`: auto with the one-call C++ decode layers turned off in this process, so its
decode steps run the compiled graphs, as they did for such a file before those layers took int8 projections.

  python benchmarks/gguf_kquant_bench.py                                  # hidden 1024, 12 layers
  python benchmarks/gguf_kquant_bench.py --hidden 2048 --layers 16 --ffn 8192 --rounds 3
  python benchmarks/gguf_kquant_bench.py --as-shipped --variants auto,auto-graphs,int4
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from engine_bench import run_hf  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.engine.tokenizer import Tokenizer  # noqa: E402
from kvtriton.backend.models.checkpoint import resolve_checkpoint  # noqa: E402
from kvtriton.backend.models.default_model import ensure_default_gguf  # noqa: E402
from kvtriton.backend.models.gguf_checkpoint import convert_gguf  # noqa: E402
from kvtriton.backend.models.quantization import QuantizedLinear, layer_sources  # noqa: E402
from kvtriton.backend.runners import cpu_compiled_decode  # noqa: E402

from tests.test_gguf_checkpoint import llama_cpp_rope_order, random_kquant_rows  # noqa: E402

TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.chat_template")


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers whose attn_v and ffn_down Q4_K_M keeps in Q6_K."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def write_q4_k_m(path: Path, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int) -> None:
    source = gguf.GGUFReader(str(ensure_default_gguf(progress=lambda *_: None)))
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key in TOKENIZER_KEYS:  # the default model's tokenizer, as its GGUF states it
        field = source.fields[key]
        writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    head_dim = hidden // heads

    def tensor(name: str, rows: int, cols: int, kind: str, rope_heads: int = 0) -> None:
        if kind == "F32":
            writer.add_tensor(name, np.ones(rows, dtype=np.float32) if cols == 1 else
                              rng.standard_normal((rows, cols), dtype=np.float32))
            return
        raw = random_kquant_rows(rows, cols, kind, rng)
        if rope_heads:  # llama.cpp's Q/K row order (whole rows move: a row's blocks stay together)
            raw = llama_cpp_rope_order(raw, rope_heads)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType[kind])

    tensor("token_embd.weight", vocab, hidden, "Q4_K")
    tensor("output_norm.weight", hidden, 1, "F32")
    tensor("output.weight", vocab, hidden, "Q6_K")
    for i in range(layers):
        big = "Q6_K" if more_bits(i, layers) else "Q4_K"
        tensor(f"blk.{i}.attn_norm.weight", hidden, 1, "F32")
        tensor(f"blk.{i}.ffn_norm.weight", hidden, 1, "F32")
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden, "Q4_K", heads)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, "Q4_K", kv_heads)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, big)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim, "Q4_K")
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden, "Q4_K")
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden, "Q4_K")
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn, big)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_bandwidth() -> float:
    """Bytes a second this machine's cores read and write copying 256 MiB (the bound's denominator)."""
    src = torch.empty(1 << 28, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * src.numel() * 5 / (time.perf_counter() - t0)


def layer_bytes(model) -> int:
    """Bytes a decode step reads from the linear layers (their stored numbers; norms and embedding rows aside)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for name, b in module.named_buffers()
                         if name in ("qweight", "scale", "zero_point", "offset"))
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="auto,int4,none", help="quantization settings, and with --as-shipped "
                    "auto-graphs (auto without the one-call C++ decode layers)")
    ap.add_argument("--as-shipped", action="store_true", help="compiled decode and one OpenMP team, as the shipped "
                    "config.pbtxt serves")
    args = ap.parse_args()
    if args.hidden % 256 or args.ffn % 256:
        ap.error("k-quants need --hidden and --ffn multiples of 256")
    path = Path(tempfile.mkdtemp()) / "synthetic-Q4_K_M.gguf"
    write_q4_k_m(path, args.hidden, args.layers, args.ffn, args.heads, args.kv_heads)
    folder = resolve_checkpoint(str(path))
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or 'cpu'}, "
          f"{torch.get_num_threads()} threads; a synthetic Q4_K_M Llama: hidden {args.hidden}, {args.layers} layers, "
          f"ffn {args.ffn}, {args.heads}/{args.kv_heads} heads; one stream, {args.max_tokens} tokens, median of "
          f"{args.rounds}; " + ("as shipped (compiled decode, one OpenMP team)" if args.as_shipped else
                               "EngineConfig's defaults otherwise (no single OpenMP team, no compiled decode)"))
    bandwidth = copy_bandwidth()
    variants = args.variants.split(",")
    if "auto-graphs" in variants and not args.as_shipped:
        ap.error("auto-graphs compares the compiled decode steps: with --as-shipped")
    prompt = Tokenizer.from_pretrained(folder).encode("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    rows = {}
    real_why = cpu_compiled_decode.why_not_native
    # One engine at a time (as shipped, two would hold two OpenMP teams); variants alternated round by round.
    for _ in range(args.rounds):
        for v in variants:
            cpu_compiled_decode.why_not_native = (real_why if v != "auto-graphs" else
                                                  lambda *_: "turned off by kvtriton's benchmark")
            torch._dynamo.reset()  # each engine compiles the same functions: a fresh count of recompiles
            engine = LLMEngine(EngineConfig(model=str(path), device="cpu", quantization=v.removesuffix("-graphs"),
                                            cpu_single_openmp_team=args.as_shipped,
                                            cpu_compile_decode=args.as_shipped)).start()
            try:
                engine.generate([prompt], params)  # warm-up
                out = engine.generate([prompt], params)[0]
                speeds[v].append((len(out.token_ids) - 1) / (out.time - out.first_token_time))  # after the first
                model = engine.runner.model
                rows[v] = (statistics.median(speeds[v]), layer_bytes(model), layer_sources(model))
            finally:
                engine.shutdown()
    cpu_compiled_decode.why_not_native = real_why
    whole = convert_gguf(path, path.parent / "hf-whole")  # every weight as float32: a folder transformers loads
    hf = run_hf(whole, [prompt], args.max_tokens, "cpu", torch.float32, 1)["tok_s"]
    base = rows.get("none", (None,))[0]
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s; HF transformers fp32 generate {hf:.1f} tok/s")
    print("| quantization | decode tok/s | vs fp32 | vs HF fp32 | linear layers MB | bound tok/s | of bound |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for v, (tok_s, size, _) in rows.items():
        bound = bandwidth / size
        vs_fp32 = f"{tok_s / base:.2f}x" if base else "-"
        print(f"| {v} | {tok_s:.1f} | {vs_fp32} | {tok_s / hf:.2f}x | {size / 1e6:.0f} | {bound:.0f} | "
              f"{tok_s / bound:.0%} |")
    for v, (_, _, sources) in rows.items():
        print(f"# {v}: " + ("; ".join(f"{n} x {what}" for what, n in sources.items()) or "every layer fp32"))


if __name__ == "__main__":
    main()
