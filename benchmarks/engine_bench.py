"""Engine benchmark (in-process, no Triton): throughput, TTFT, inter-token latency, against HF transformers.

Workload: 32 chat prompts, 128 output tokens each, EOS ignored.
  1. kvtriton, all 32 requests in flight      vs  HF `generate`, static batch 32
  2. kvtriton, one request (single stream)     vs  HF `generate`, batch 1
  3. on CUDA: the batch-1 decode step (CUDA graph replay) vs the HBM roofline (weight bytes / bandwidth,
     bandwidth measured with a device-to-device copy in this run)

  python benchmarks/engine_bench.py                                  # default model, CPU fp32
  python benchmarks/engine_bench.py --config llama-1b --device cuda  # 1B-class Llama, dummy weights, bf16
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis simply.", "Write a haiku about the sea.",
    "How do vaccines work?", "Give three tips for learning to code.", "What causes the seasons on Earth?",
    "Describe a cat to someone who has never seen one.", "Why is the sky blue?", "What is a prime number?",
    "Summarise the plot of Romeo and Juliet.", "How does a refrigerator keep food cold?",
    "What is the difference between weather and climate?", "Suggest a name for a bakery.",
    "How many legs does a spider have?", "What is machine learning?", "Explain gravity to a child.",
    "What are the benefits of exercise?", "Write a short poem about autumn.", "What is the speed of light?",
    "How do bees make honey?", "What is democracy?", "Give a recipe for pancakes.",
    "Why do we dream?", "What is the tallest mountain in the world?", "How do airplanes fly?",
    "What is an atom?", "List the planets of the solar system.", "What is inflation in economics?",
    "How can I sleep better?", "What is the Pythagorean theorem?", "Describe the water cycle.",
    "What does a CPU do?",
]
# Llama 3.2 1B shape (tied embeddings) with the default model's 49152-token vocabulary, so that its
# tokenizer can detokenize every id: 1.07 B parameters, 2.14 GB in bf16.
LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=2048,
                intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)


def chat_prompt_ids(tokenizer, run: str = "") -> list[list[int]]:
    """QUESTIONS as chat prompts, in token ids. run: a tag before each question, so that one run's prompts are new to
    an engine that served another's (they share the chat template's own prefix only, as real chats do): no run's
    prefill is cut short by a prefix-cache hit on an earlier run's, which HF's side would not get."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{run} {q}".strip()}]) for q in QUESTIONS]
    return [tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def add_workload_options(ap: argparse.ArgumentParser) -> None:
    """The options of a benchmark on this workload: the model (--config, --tokenizer: model_folder's), where it
    runs (--device), and the output tokens per request (--max-tokens)."""
    ap.add_argument("--config", choices=["default", "llama-1b"], default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json for --config llama-1b (default: the default "
                                        "model's; a GPU host without network needs it)")


def add_prefill_graph_option(ap: argparse.ArgumentParser, default: int) -> None:
    """--prefill-graph-tokens: the benchmark's engines' max_prefill_graph_tokens (CUDA), printed in its setup."""
    ap.add_argument("--prefill-graph-tokens", type=int, default=default,
                    help=f"the engine's max_prefill_graph_tokens (default {default}; the engine's own is "
                         f"{EngineConfig.max_prefill_graph_tokens}: longer prefill steps run eagerly)")


def model_folder(config: str, tokenizer: str | None) -> tuple[str, bool]:
    """(model folder, dummy weights) for --config: the default model's folder, or for llama-1b a fresh folder
    with LLAMA_1B's config.json (random weights) and the tokenizer of `tokenizer` (a folder) or the default
    model (`tokenizer` serves llama-1b only)."""
    if config == "default":
        return str(_default_model()), False
    source = Path(tokenizer) if tokenizer else _default_model()
    folder = Path(tempfile.mkdtemp()) / config
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a 1B config has none: borrow the default's
        shutil.copy(source / name, folder / name)
    return str(folder), True


def _default_model() -> Path:
    from kvtriton.backend.models.default_model import ensure_default_model  # needs the gguf package

    return ensure_default_model(progress=lambda *_: None)


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def run_engine(engine, prompts, max_tokens, params=None):
    """All prompts in flight at once: greedy, max_tokens, EOS ignored, unless `params` gives one SamplingParams
    per prompt. Returns the throughput, TTFT and ITL samples, and each request's text and token count."""
    if params is None:
        params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)] * len(prompts)
    t0 = time.perf_counter()
    streams = [engine.add_request(f"b{time.monotonic_ns()}-{i}", p, sp)
               for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]
    ttft, itl, tokens, texts, counts = [], [], 0, [], []
    for s in streams:
        last, text, count = None, "", 0
        for out in s:
            text += out.text
            if not out.token_ids:
                continue
            count += len(out.token_ids)
            if last is None:
                ttft.append(out.time - out.arrival_time)
            else:
                itl.append(out.time - last)
            last = out.time
        tokens += count
        texts.append(text)
        counts.append(count)
    wall = time.perf_counter() - t0
    return dict(tok_s=tokens / wall, wall_s=wall, tokens=tokens, ttft=ttft, itl=itl, texts=texts, counts=counts)


def run_hf(folder, prompts_ids, max_tokens, device, dtype, batch, **sampling):
    """HF transformers' generate over the prompts in static batches: greedy, or `sampling` (do_sample=True,
    top_p=...)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    pad = 0
    total, t0 = 0, time.perf_counter()
    for i in range(0, len(prompts_ids), batch):
        chunk = prompts_ids[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, pad_token_id=pad, **(sampling or {"do_sample": False}))
        total += (out.shape[1] - width) * len(chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    del model
    return dict(tok_s=total / wall, wall_s=wall, tokens=total)


def decode_step_vs_roofline(engine):
    """Time the batch-1 decode step alone (graph replay + logits, 64-token context) against weight bytes /
    bandwidth."""
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    bandwidth = 2 * src.numel() * 20 / (time.perf_counter() - t0)  # read + write
    del src, dst
    from kvtriton.backend.engine.sequence import Sequence
    from kvtriton.backend.runners.step_input import prepare_step

    seq = Sequence("probe", list(range(1, 65)), SamplingParams())
    seq.num_computed_tokens = 64  # this step's token included, as the scheduler leaves it
    bm = engine.block_manager
    seq.block_ids = bm.allocate_slots("probe", seq.token_ids, 0, 64)
    step = prepare_step([(seq, 1)], engine.config.block_size, engine.device)
    for _ in range(5):
        runner.execute(step)
    torch.cuda.synchronize()
    rounds = []  # the median of 7 rounds of 100 steps: one round can catch a clock or neighbour hiccup
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(100):
            runner.execute(step)
        torch.cuda.synchronize()
        rounds.append((time.perf_counter() - t0) / 100)
    step_s = statistics.median(rounds)
    bm.free("probe")
    roofline_s = weight_bytes / bandwidth
    result = dict(step_ms=step_s * 1e3, roofline_ms=roofline_s * 1e3, fraction=roofline_s / step_s,
                  weight_gb=weight_bytes / 1e9, bandwidth_tb_s=bandwidth / 1e12)
    props = torch.cuda.get_device_properties()
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # the data sheet's peak: double data rate x bus width
        spec = 2 * clock_khz * 1e3 * bus_bits / 8
        result.update(spec_bandwidth_tb_s=spec / 1e12, spec_fraction=weight_bytes / spec / step_s)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--cuda-graphs", default="on", choices=["on", "off"])
    ap.add_argument("--rounds", type=int, default=1,
                    help="CPU: alternate kvtriton and HF this many times and report medians (a shared CPU is noisy)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    folder, dummy = model_folder(args.config, args.tokenizer)
    cfg = EngineConfig(model=folder, device=args.device, dummy_weights=dummy, max_num_seqs=64,
                       max_num_batched_tokens=2048, enable_cuda_graphs=args.cuda_graphs == "on",
                       max_model_len=2048, kv_cache_memory_gb=1.0)
    logging.basicConfig(level=logging.INFO, format="# %(message)s")
    started = time.perf_counter()
    engine = LLMEngine(cfg).start()
    print(f"# engine start-up (weights, KV pool, CUDA graphs): {time.perf_counter() - started:.1f} s")
    prompt_ids = chat_prompt_ids(engine.tokenizer, "(batch)")
    single_ids = chat_prompt_ids(engine.tokenizer, "(single)")[:1]

    print(f"# kvtriton engine benchmark: {args.config} on {engine.device} ({engine.dtype}), "
          f"{len(prompt_ids)} prompts x {args.max_tokens} tokens, EOS ignored, each run's prompts new to the engine")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}, cuda graphs {args.cuda_graphs}")
    run_engine(engine, chat_prompt_ids(engine.tokenizer, "(warm-up)")[:4], 8)  # graph capture, allocator
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    batch = run_engine(engine, prompt_ids, args.max_tokens)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else _rss_gib()
    single = run_engine(engine, single_ids, args.max_tokens)
    single_decode = (len(single["itl"])) / sum(single["itl"])
    results = dict(batch32=_summary(batch), single=_summary(single), single_decode_tok_s=single_decode,
                   peak_memory_gib=peak)
    print(f"kvtriton  batch 32 in flight: {batch['tok_s']:8.1f} output tok/s   TTFT p50/p90/p99 "
          f"{pct(batch['ttft'], 50)*1e3:.0f}/{pct(batch['ttft'], 90)*1e3:.0f}/{pct(batch['ttft'], 99)*1e3:.0f} ms"
          f"   ITL p50/p90/p99 {pct(batch['itl'], 50)*1e3:.1f}/{pct(batch['itl'], 90)*1e3:.1f}/"
          f"{pct(batch['itl'], 99)*1e3:.1f} ms   peak memory {peak:.2f} GiB")
    print(f"kvtriton  single stream:      {single['tok_s']:8.1f} output tok/s   decode {single_decode:.1f} tok/s"
          f"   TTFT {single['ttft'][0]*1e3:.0f} ms")
    if cuda:
        roof = decode_step_vs_roofline(engine)
        results["decode_step"] = roof
        print(f"batch-1 decode step: {roof['step_ms']:.3f} ms   roofline {roof['roofline_ms']:.3f} ms "
              f"({roof['weight_gb']:.2f} GB weights / {roof['bandwidth_tb_s']:.2f} TB/s measured)   "
              f"= {roof['fraction']*100:.0f}% of roofline")
        if "spec_bandwidth_tb_s" in roof:
            print(f"  against the peak bandwidth from the memory clock and bus width "
                  f"({roof['spec_bandwidth_tb_s']:.2f} TB/s): {roof['spec_fraction']*100:.0f}% of that roofline")
    engine.shutdown()
    if not args.no_hf:
        import transformers

        dtype = engine.dtype
        hf_folder = folder
        if dummy:  # HF needs weights: save ours (same dummy init) in HF layout
            hf_folder = _save_dummy_for_hf(folder, dtype)
        hf_batch = run_hf(hf_folder, prompt_ids, args.max_tokens, "cuda" if cuda else "cpu", dtype, 32)
        hf_single = run_hf(hf_folder, single_ids, args.max_tokens, "cuda" if cuda else "cpu", dtype, 1)
        results.update(hf_batch32_tok_s=hf_batch["tok_s"], hf_single_tok_s=hf_single["tok_s"],
                       transformers=transformers.__version__)
        print(f"HF transformers {transformers.__version__}  generate batch 32: {hf_batch['tok_s']:8.1f} tok/s   "
              f"batch 1: {hf_single['tok_s']:8.1f} tok/s")
        print(f"ratio kvtriton / HF:  batch 32 {batch['tok_s'] / hf_batch['tok_s']:.2f}x   "
              f"single stream {single['tok_s'] / hf_single['tok_s']:.2f}x")
    if args.rounds > 1 and not cuda and not args.no_hf:
        _more_rounds(args, engine_cfg=cfg, folder=folder, tokenizer=engine.tokenizer, dtype=engine.dtype,
                     first=(batch["tok_s"], single["tok_s"], hf_batch["tok_s"], hf_single["tok_s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _more_rounds(args, engine_cfg, folder, tokenizer, dtype, first):
    """Alternate both sides args.rounds times in all (each round's prompts new to the engine); print each round and
    the medians."""
    rows = [first]
    engine = LLMEngine(engine_cfg).start()
    for r in range(2, args.rounds + 1):
        prompt_ids = chat_prompt_ids(tokenizer, f"(round {r})")
        single_ids = chat_prompt_ids(tokenizer, f"(single {r})")[:1]
        b, s1 = run_engine(engine, prompt_ids, args.max_tokens), run_engine(engine, single_ids, args.max_tokens)
        hb = run_hf(folder, prompt_ids, args.max_tokens, "cpu", dtype, 32)
        hs = run_hf(folder, single_ids, args.max_tokens, "cpu", dtype, 1)
        rows.append((b["tok_s"], s1["tok_s"], hb["tok_s"], hs["tok_s"]))
    engine.shutdown()
    for i, (b, s1, hb, hs) in enumerate(rows):
        print(f"round {i + 1}: kvtriton batch 32 {b:7.1f}  single {s1:5.1f}   HF batch 32 {hb:7.1f}  batch 1 {hs:5.1f}"
              f"   ratios {b / hb:.2f}x / {s1 / hs:.2f}x")
    med = [statistics.median(col) for col in zip(*rows)]
    print(f"median of {len(rows)} rounds: kvtriton batch 32 {med[0]:.1f} tok/s vs HF {med[2]:.1f} "
          f"({med[0] / med[2]:.2f}x); single stream {med[1]:.1f} vs HF {med[3]:.1f} ({med[1] / med[3]:.2f}x)")


def _summary(run):
    return dict(tok_s=run["tok_s"], tokens=run["tokens"], wall_s=run["wall_s"],
                ttft_ms={q: pct(run["ttft"], q) * 1e3 for q in (50, 90, 99)},
                itl_ms={q: pct(run["itl"], q) * 1e3 for q in (50, 90, 99)})


def _rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _save_dummy_for_hf(folder, dtype):
    import transformers

    out = Path(tempfile.mkdtemp()) / "hf"
    cfg = transformers.AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    return str(out)


if __name__ == "__main__":
    main()
