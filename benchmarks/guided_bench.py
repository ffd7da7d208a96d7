"""Structured-output benchmark (in-process engine, no Triton): the throughput cost of a JSON schema at 32 in flight.

Workload: engine_bench's 32 chat prompts, all in flight, greedy.
  guided:    each request constrained by a JSON schema (ANSWER_SCHEMA), max_tokens 128; it ends when its
             object is complete.
  unguided:  the same prompts, each request asked for exactly as many tokens as its guided run produced
             (min_tokens = max_tokens), so that both runs decode the same number of tokens with the same
             batch shape.
The two alternate --rounds times in one process (which goes first alternates too, against drift in a shared
machine's load); the medians and their ratio are the figure. Also printed:
the host time spent filling the grammar bitmasks per step (llguidance) and the sampler's mask op, against the
step's time (on a shared CPU, a steadier figure than the throughput ratio), and how many guided outputs parse
and validate.

  python benchmarks/guided_bench.py                       # default model, CPU fp32
  python benchmarks/guided_bench.py --device cuda         # default model on the GPU, where a step is short
  python benchmarks/guided_bench.py --config llama-1b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import QUESTIONS, add_workload_options, model_folder, run_engine  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.engine.token_bitmask import apply_token_bitmask_  # noqa: E402

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 60},
        "answer": {"type": "string", "maxLength": 200},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["topic", "answer", "confidence", "keywords"],
    "additionalProperties": False,
}


class MaskTimer:
    """Wraps the engine's bitmask fill to add up its host time (the per-step cost structured output adds on
    the engine thread; on a GPU it overlaps the step's forward)."""

    def __init__(self, engine: LLMEngine):
        self.fill, self.seconds, self.calls, self.rows = engine.structured_output.bitmask, 0.0, 0, 0
        engine.structured_output.bitmask = self

    def __call__(self, seqs, device):
        t0 = time.perf_counter()
        mask = self.fill(seqs, device)
        if mask is not None:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.rows += sum(s.grammar is not None for s in seqs)
        return mask


def time_mask_op(device: torch.device, batch: int, vocab: int) -> float:
    """The sampler's bitmask op alone on (batch, vocab) float32 logits, in ms (median of 50)."""
    logits = torch.randn(batch, vocab, device=device)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab + 31) // 32), dtype=torch.int64).to(torch.int32)
    bitmask = bitmask.to(device)
    times = []
    for _ in range(50):
        work = logits.clone()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        apply_token_bitmask_(work, bitmask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def valid_count(texts: list[str]) -> int:
    try:
        import jsonschema
    except ImportError:
        print("# jsonschema is not installed: outputs are only parsed, not validated (pip install jsonschema)")
        jsonschema = None
    ok = 0
    for text in texts:
        try:
            value = json.loads(text)
            if jsonschema is not None:
                jsonschema.validate(value, ANSWER_SCHEMA)
            ok += 1
        except Exception:  # noqa: BLE001 - counted, not raised: the figure says how many failed
            pass
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap)
    ap.add_argument("--rounds", type=int, default=3, help="guided / unguided pairs, alternated (medians reported)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    model, dummy = model_folder(args.config, args.tokenizer)  # llama-1b: random weights (gibberish, but JSON)
    cfg = EngineConfig(model=model, device=args.device, dummy_weights=dummy, max_num_seqs=64,
                       max_num_batched_tokens=2048, max_model_len=2048, kv_cache_memory_gb=1.0)
    engine = LLMEngine(cfg).start()
    timer = MaskTimer(engine)
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q + " Answer in JSON."}]),
                                add_special_tokens=False) for q in QUESTIONS]
    guided = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, guided_json=ANSWER_SCHEMA)] * len(prompts)

    print(f"# guided decoding benchmark: {args.config} on {engine.device} ({engine.dtype}), {len(prompts)} prompts "
          f"in flight, greedy, guided max_tokens {args.max_tokens}")
    print(f"# torch {torch.__version__}, llguidance {version('llguidance')}, python {platform.python_version()}, "
          f"{torch.cuda.get_device_name() if engine.device.type == 'cuda' else platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine: CPU figures "
          "move with it)")
    run_engine(engine, prompts[:4], 8)  # warm-up: allocator, graphs
    run_engine(engine, prompts[:4], 8, guided[:4])  # warm-up: the llguidance tokenizer, the schema's compilation
    # Greedy: every guided round produces these lengths, so the unguided run may go first.
    counts = run_engine(engine, prompts, args.max_tokens, guided)["counts"]
    # min_tokens = max_tokens: EOS is masked out rather than ignored, so the baseline never decodes the
    # special tokens an instruct model emits after its answer when EOS is ignored.
    same_length = [SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n) for n in counts]
    rows = []
    for r in range(args.rounds):
        u = run_engine(engine, prompts, args.max_tokens, same_length) if r % 2 else None
        timer.seconds = timer.calls = timer.rows = 0
        g = run_engine(engine, prompts, args.max_tokens, guided)
        mask_ms, mask_rows = timer.seconds / max(timer.calls, 1) * 1e3, timer.rows / max(timer.calls, 1)
        u = u or run_engine(engine, prompts, args.max_tokens, same_length)
        assert u["tokens"] == g["tokens"] and g["counts"] == counts, (u["tokens"], g["tokens"])
        valid = valid_count(g["texts"])
        step_ms = g["wall_s"] / max(timer.calls, 1) * 1e3  # steps with a guided row: all but the warm-up's
        rows.append((g["tok_s"], u["tok_s"], mask_ms, step_ms))
        print(f"round {r + 1}: guided {g['tok_s']:8.1f} tok/s ({g['tokens']} tokens, {g['wall_s']:.2f} s, "
              f"{valid}/{len(prompts)} valid)   unguided {u['tok_s']:8.1f} tok/s ({u['wall_s']:.2f} s)   "
              f"ratio {g['tok_s'] / u['tok_s']:.3f}   bitmask fill {mask_ms:.2f} ms/step for {mask_rows:.1f} rows "
              f"of a {step_ms:.1f} ms step")
    guided_tok_s, plain_tok_s, mask_ms, step_ms = (statistics.median(col) for col in zip(*rows))
    apply_ms = time_mask_op(engine.device, len(prompts), engine.model_config.vocab_size)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"median of {len(rows)} rounds: guided {guided_tok_s:.1f} tok/s vs unguided {plain_tok_s:.1f} tok/s "
          f"= {guided_tok_s / plain_tok_s:.3f}x ({(1 - guided_tok_s / plain_tok_s) * 100:+.1f}% cost)")
    print(f"per step: bitmask fill {mask_ms:.2f} ms + mask op {apply_ms:.3f} ms ({len(prompts)} rows) = "
          f"{(mask_ms + apply_ms) / step_ms * 100:.1f}% of a {step_ms:.1f} ms guided step"
          + (" (the fill overlaps the forward pass on a GPU)" if engine.device.type == "cuda" else ""))
    print(f"example output: {g['texts'][0]}")
    engine.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rounds=rows, guided_tok_s=guided_tok_s, unguided_tok_s=plain_tok_s,
                                                   mask_ms=mask_ms, mask_op_ms=apply_ms, step_ms=step_ms,
                                                   loadavg=os.getloadavg()), indent=1))


if __name__ == "__main__":
    main()
