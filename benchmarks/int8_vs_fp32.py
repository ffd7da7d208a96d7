"""INT8 weight-only vs fp32 on the CPU: accuracy on a fixed text and single-stream decode speed.

Every variant runs the same teacher-forced decode: the text's tokens one
step at a time through the runner (the engine's decode path, batch 1), so
one pass gives both each position's logits and the decode tok/s.

  python benchmarks/int8_vs_fp32.py                 # default model (SmolLM2-135M-Instruct)
  python benchmarks/int8_vs_fp32.py --model DIR --tokens 128

Variants: torch fp32 (reference), torch int8 (Int8Linear, torch._weight_int8pack_mm),
onnxruntime fp32 and int8 graphs (built here, in a temporary folder). onnxruntime's default CPU
optimisations fuse DequantizeLinear+MatMul into MatMulNBits, which quantizes activations on the fly
(accuracy level 4); forcing fp32 compute (level 1) measured ~16x slower, so the default is kept.
Printed: mean |logit - fp32 logit|, perplexity of the text, top-1 agreement with fp32, tok/s (1 / median
step time), ratio.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.models.int8 import quantize_linears
from kvtriton.backend.models.loader import load_model
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.step_input import StepInput

TEXT = (
    "Paged attention keeps the keys and values of every sequence in fixed-size blocks, so that memory is "
    "allocated on demand and shared between requests with a common prefix. The scheduler decides each step "
    "how many tokens every running request may compute under one token budget, which lets long prompts be "
    "split into chunks and interleaved with the decoding of other requests. When the cache is full, the "
    "youngest request is preempted and recomputed later. Weight-only quantization stores each matrix in "
    "eight-bit integers with one scale per output channel, halving or quartering the bytes read per step."
)
BLOCK = 16


def decode_step(token: int, position: int, blocks: int) -> StepInput:
    def t(values):
        return torch.tensor(values, dtype=torch.int64)

    return StepInput(
        input_ids=t([token]), positions=t([position]), last_token_indices=t([0]),
        attn=AttentionMetadata(slot_mapping=t([position]), block_tables=t([list(range(blocks))]),
                               context_lens=t([position + 1]), num_decodes=1, query_lens=[1],
                               context_lens_host=[position + 1], decode_context_blocks=position // BLOCK + 1),
    )


def teacher_forced(runner, ids: list[int]) -> tuple[torch.Tensor, float]:
    """-> logits (T, V) of every position, decode tok/s from the median step time (robust to other load on a
    shared machine; the first 8 steps are warm-up)."""
    blocks = -(-len(ids) // BLOCK)
    rows, times = [], []
    for i, tok in enumerate(ids):
        start = time.perf_counter()
        rows.append(runner.execute(decode_step(tok, i, blocks))[0].clone())
        times.append(time.perf_counter() - start)
    return torch.stack(rows), 1.0 / statistics.median(times[8:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="HF folder, or 'default'")
    parser.add_argument("--tokens", type=int, default=96, help="text tokens to decode (teacher-forced)")
    args = parser.parse_args()

    from kvtriton.backend.models.checkpoint import resolve_checkpoint
    from kvtriton.backend.runners.onnx_runner import OnnxRunner
    from kvtriton.backend.runners.torch_runner import TorchRunner
    from kvtriton.build.onnx_export import export_step_graph

    folder = resolve_checkpoint(args.model)
    mc = ModelConfig.from_pretrained(folder)
    ids = Tokenizer.from_pretrained(folder).encode(TEXT)[: args.tokens]
    cpu = torch.device("cpu")
    base = dict(model=str(folder), device="cpu", block_size=BLOCK, num_kv_blocks=len(ids) // BLOCK + 2)
    import onnx
    import onnxruntime

    print(f"model {folder.name}: {mc.num_params / 1e6:.0f}M parameters, {len(ids)} tokens, batch 1, CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")

    results = {}
    config = EngineConfig(**base)
    runner = TorchRunner(config, mc, str(folder), cpu, torch.float32, len(ids))
    results["torch fp32"] = teacher_forced(runner, ids)
    quantize_linears(runner.model)
    results["torch int8"] = teacher_forced(runner, ids)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "int8"):
            path = Path(tmp) / f"{precision}.onnx"
            export_step_graph(load_model(folder), path, BLOCK, precision)
            onnx_runner = OnnxRunner(EngineConfig(**base, runner="onnxruntime", engine_path=str(path)), mc,
                                     folder, cpu, torch.float32, len(ids))
            results[f"onnxruntime {precision}"] = teacher_forced(onnx_runner, ids)
            del onnx_runner

    reference, ref_speed = results["torch fp32"]
    targets = torch.tensor(ids[1:])
    print(f"{'variant':18} {'mean|dlogit|':>12} {'ppl':>8} {'top1 agree':>10} {'tok/s':>8} {'vs fp32':>8}")
    for name, (logits, speed) in results.items():
        fp32_speed = results[name.replace("int8", "fp32")][1]
        nll = torch.nn.functional.cross_entropy(logits[:-1], targets).item()
        err = (logits - reference).abs().mean().item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name:18} {err:12.4f} {math.exp(nll):8.2f} {agree:10.1%} {speed:8.1f} {speed / fp32_speed:7.2f}x")
    print(f"(ratio: int8 speed / fp32 speed of the same runtime; torch fp32 baseline {ref_speed:.1f} tok/s)")


if __name__ == "__main__":
    main()
