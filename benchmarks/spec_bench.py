"""Speculative decoding benchmark (in-process): output tok/s with speculation against the same engine
without it, in the same run, with the mean acceptance length (1 + accepted / drafts, vLLM's definition).

CPU, default model (SmolLM2-135M-Instruct, fp32, no quantization; --as-shipped: from its GGUF in int4 with the
compiled and one-call decode steps, as model_repository/llm serves it), greedy, each engine in a process of its own
(EngineProcess, one OpenMP team, as tritonserver runs it) and this process their client:
  1. single stream, a chat question, 128 tokens, EOS ignored: draft self-int8 and self-int4 vs plain;
  2. single stream, a quoting request ("repeat this paragraph with one word changed"): ngram vs plain;
  3. 32 chat requests in flight, up to 128 tokens each (EOS ends them, so the batch thins out and its tail
     speculates), back-off on (speculative_disable_by_batch_size as set): ngram and self-int8 vs plain.
GPU (--device cuda --config llama-1b: the Llama-3.2-1B shape, random bf16 weights):
  1. single stream, the quoting request: ngram vs plain (random weights do not quote their prompt, so the
     acceptance printed means little), then with k proposals every round (forced_proposals) at forced 0% and
     100% acceptance: the n-gram path's cost per round;
  2. a 2-layer draft of the same shape, random weights: its acceptance means nothing, so the draft path's
     cost is measured with the acceptance forced: the verification accepts every proposal (100%) or none
     (0%), the draft and the verify step running as ever;
  3. 32 in flight with back-off, ngram vs plain.
GPU with real weights (--device cuda --model DIR, a checkpoint folder, bf16): the quoting request and 32 in
flight with ngram, whose acceptance now means something; with --draft-model (a checkpoint folder sharing the
tokenizer, or self-int8 / self-int4) the chat stream with that draft too.

  python benchmarks/spec_bench.py                                   # CPU; the machine's load is printed
  python benchmarks/spec_bench.py --device cuda --config llama-1b   # the GPU host, random weights
  python benchmarks/spec_bench.py --device cuda --model DIR         # the GPU host, a real checkpoint
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import LLAMA_1B, QUESTIONS  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.engine_process import EngineProcess  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.engine.speculative import verify_step  # noqa: E402
from kvtriton.backend.engine.speculative.ngram import NgramProposer  # noqa: E402
from kvtriton.backend.runners import graph_buckets  # noqa: E402

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PARAGRAPH = ("The river runs past the old mill, under the stone bridge, and on to the sea, where the fishing "
             "boats wait for the morning tide. In winter the water rises over the meadows, and the children of "
             "the village skate on the frozen fields until the thaw comes in March.")
QUOTE = CHAT.format(f"Repeat this paragraph with one word changed:\n\n{PARAGRAPH}")


def run(engine: LLMEngine, prompts: list[str], max_tokens: int, ignore_eos: bool) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=ignore_eos)
    before = engine.stats()
    t0 = time.perf_counter()
    streams = [engine.add_request(f"s{time.monotonic_ns()}-{i}", p, params) for i, p in enumerate(prompts)]
    outs = [s.result() for s in streams]
    wall = time.perf_counter() - t0
    after = engine.stats()
    drafts = after.num_spec_drafts - before.num_spec_drafts
    accepted = after.num_spec_accepted_tokens - before.num_spec_accepted_tokens
    proposed = after.num_spec_proposed_tokens - before.num_spec_proposed_tokens
    tokens = sum(len(o.token_ids) for o in outs)
    # After the first token: what speculation changes (the prompt's prefill is the same work either way).
    decode_s = max(o.time for o in outs) - min(o.first_token_time for o in outs)
    return dict(tok_s=tokens / wall, decode_tok_s=(tokens - len(outs)) / decode_s, tokens=tokens, wall_s=wall,
                ids=[o.token_ids for o in outs],
                mean_acceptance_length=1 + accepted / drafts if drafts else 0.0,
                acceptance=accepted / proposed if proposed else 0.0)


@contextlib.contextmanager
def forced_acceptance(accept: bool):
    """The engine's verification rule replaced: every proposal accepted (the proposals become the output,
    then the target's bonus token) or none (the target's own token, as without speculation). The draft and
    the verify step run as ever, so their cost is measured at a fixed acceptance. (Replacing the proposals
    by a plain run's tokens instead forces nothing when random weights make near-tied logits: bf16 rounding
    in the verify step flips the argmax, the output leaves the plain run's, and every proposal misses.)"""
    def forced(sampled: list[int], proposals: list[list[int]]) -> list[tuple[int, int]]:
        runs, row = [], 0
        for props in proposals:
            if accept:
                sampled[row : row + len(props)] = props
            runs.append((row, len(props) + 1 if accept else 1))
            row += len(props) + 1
        return runs

    real = verify_step.accepted_runs
    verify_step.accepted_runs = forced
    try:
        yield
    finally:
        verify_step.accepted_runs = real


@contextlib.contextmanager
def forced_proposals():
    """Prompt lookup always proposes k tokens: the lookup runs as ever, and its proposal is filled up with the
    text's last tokens. Random weights never quote their prompt, so with forced_acceptance this measures the
    n-gram path's cost per round at a fixed acceptance, as the draft's is measured."""
    real = NgramProposer.propose

    def propose(self, seqs, ks):
        return [(found + seq.token_ids[-k:])[:k] for found, seq, k in zip(real(self, seqs, ks), seqs, ks)]

    NgramProposer.propose = propose
    try:
        yield
    finally:
        NgramProposer.propose = real


def model_folders(config: str, tokenizer: str | None = None, model: str | None = None) -> tuple[str, str | None, bool]:
    """(target folder, draft folder or None, dummy weights). `tokenizer`: a folder with tokenizer.json for a
    random-weights config (default: the default model's, which a GPU host without network may not have).
    `model`: a real checkpoint folder, which wins over `config`."""
    from kvtriton.backend.models.default_model import ensure_default_model

    if model:
        if not (Path(model) / "config.json").is_file():
            raise SystemExit(f"--model {model}: not a checkpoint folder (no config.json)")
        return model, None, False
    if config == "default":  # by name: self-int4 then takes the GGUF's own 4-bit blocks (no second rounding)
        return "default", None, False
    root = Path(tempfile.mkdtemp())
    folders = []
    for name, layers in ((config, LLAMA_1B["num_hidden_layers"]), (f"{config}-draft", 2)):
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**LLAMA_1B, "num_hidden_layers": layers}))
        source = Path(tokenizer) if tokenizer else ensure_default_model(progress=lambda *_: None)
        for file in ("tokenizer.json", "tokenizer_config.json"):  # a 1B config has none: borrow the default's
            shutil.copy(source / file, folder / file)
        folders.append(str(folder))
    return folders[0], folders[1], True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", choices=["default", "llama-1b"], default="default")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--tokens", type=int, default=96, help="output tokens, single stream")
    ap.add_argument("--batch-tokens", type=int, default=128, help="max output tokens per request, 32 in flight")
    ap.add_argument("--tokenizer", help="folder with tokenizer.json for --config llama-1b (default: the default "
                    "model's)")
    ap.add_argument("--model", help="a real checkpoint folder (wins over --config): on a GPU host without the "
                    "default model, e.g. SmolLM2-135M-Instruct carried there")
    ap.add_argument("--draft-model", help="with --model on a GPU: the draft for the chat stream (a checkpoint "
                    "folder sharing the tokenizer, self-int8 or self-int4); without it the draft case is skipped")
    ap.add_argument("--eager-verify", action="store_true", help="GPU: verify steps without their CUDA graphs "
                    "(to measure what the graphs bring)")
    ap.add_argument("--as-shipped", action="store_true", help="CPU: the default model as the shipped config serves "
                    "it (quantization auto: int4 from the GGUF; cpu_compile_decode on)")
    ap.add_argument("--only", default="", help="comma-separated subset: draft,ngram,batch")
    ap.add_argument("--rounds", type=int, default=5, help="plain and speculating runs alternated; medians")
    ap.add_argument("--batch-rounds", type=int, default=1, help="the same, 32 in flight")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    if args.eager_verify:
        graph_buckets.MAX_VERIFY_GRAPH_ROWS = 0  # no verify bucket fits: every verify step runs eagerly
    folder, draft_folder, dummy = model_folders(args.config, args.tokenizer, args.model)
    base = dict(model=folder, device=args.device, dummy_weights=dummy, quantization="none",
                dtype="bfloat16" if cuda else "float32", max_num_seqs=32, max_model_len=2048)
    if cuda:  # two engines at once (the baseline and the speculating one): fixed pools, not memory fractions
        base["num_kv_blocks"] = 4096
    else:  # one OpenMP team, as the shipped config.pbtxt serves (README "CPU threads")
        base.update(kv_cache_memory_gb=1.0, cpu_single_openmp_team=True)
        if args.as_shipped:
            base.update(quantization="auto", cpu_compile_decode=True)
    only = set(filter(None, args.only.split(","))) or {"draft", "ngram", "batch"}
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"# speculative decoding: {args.model or args.config} ({'random weights' if dummy else 'real weights'}), "
          f"{base['dtype']}, quantization {base['quantization']}, k={args.k}, greedy; torch {torch.__version__}, "
          f"python {platform.python_version()}, {device_name}, {os.cpu_count()} CPUs, load average {os.getloadavg()}")

    def engine(**spec) -> LLMEngine | EngineProcess:
        if not cuda:
            # Each engine in a process of its own, as tritonserver runs it: two engines in one process have two
            # OpenMP teams, which outnumber the cores and stop spin-waiting, and the draft's small ops pay for
            # it (self-int8, one stream: 1.43-1.50x in one process, 2.20x in processes of their own).
            return EngineProcess(EngineConfig(**base, **spec))
        eng = LLMEngine(EngineConfig(**base, **spec)).start()
        if spec:
            runner = eng.runner
            print(f"# verify steps: CUDA graphs of {runner.verify_width} rows per sequence for batches "
                  f"{runner.verify_batch_sizes}" if runner.verify_batch_sizes else "# verify steps: eager")
        return eng

    def report(name, plain, spec):
        same = "identical" if spec["ids"] == plain["ids"] else "DIFFERENT"
        print(f"{name:<42} output {spec['tok_s']:7.1f} tok/s (plain {plain['tok_s']:7.1f}) "
              f"{spec['tok_s'] / plain['tok_s']:5.2f}x | after the first token {spec['decode_tok_s']:7.1f} "
              f"(plain {plain['decode_tok_s']:7.1f}) {spec['decode_tok_s'] / plain['decode_tok_s']:5.2f}x | mean "
              f"acceptance length {spec['mean_acceptance_length']:.2f}, acceptance {spec['acceptance']:.0%}, output "
              f"{same}, load {os.getloadavg()[0]:.1f}")

    single = [CHAT.format(QUESTIONS[3])]
    batch = [CHAT.format(q) for q in QUESTIONS[:32]]
    workloads = {"chat": (single, args.tokens, True), "quote": ([QUOTE], args.tokens, False),
                 "batch": (batch, args.batch_tokens, False)}
    plain = engine()  # the baseline stays up: each case alternates it with the speculating engine
    run(plain, single, 8, True)  # warm-up

    def compare(name, eng, key):
        prompts, tokens, ignore_eos = workloads[key]
        run(eng, prompts[:1], 8, True)  # warm-up
        rounds = [(run(plain, prompts, tokens, ignore_eos), run(eng, prompts, tokens, ignore_eos))
                  for _ in range(args.batch_rounds if key == "batch" else args.rounds)]
        median = lambda xs: sorted(xs, key=lambda r: r["tok_s"])[len(xs) // 2]  # noqa: E731
        report(name, median([p for p, _ in rounds]), median([s for _, s in rounds]))

    k = dict(num_speculative_tokens=args.k)
    cases = []
    if "ngram" in only:
        cases.append(("ngram, single stream, quoting", dict(speculative_method="ngram", **k), "quote"))
    if "draft" in only and not cuda:
        for model in ("self-int8", "self-int4"):
            cases.append((f"draft {model}, single stream", dict(speculative_method="draft", speculative_model=model,
                                                                  **k), "chat"))
    if "draft" in only and cuda and not dummy:
        if args.draft_model:
            cases.append((f"draft {Path(args.draft_model).name}, single stream",
                          dict(speculative_method="draft", speculative_model=args.draft_model, **k), "chat"))
        else:
            print("# draft: skipped (real weights on a GPU: pass --draft-model to measure a draft)")
    if "batch" in only:
        cases.append(("ngram, 32 in flight, back-off", dict(speculative_method="ngram", **k), "batch"))
        if not cuda:
            cases.append(("draft self-int8, 32 in flight, back-off",
                          dict(speculative_method="draft", speculative_model="self-int8", **k), "batch"))
    for name, spec, key in cases:
        eng = engine(**spec)
        compare(name, eng, key)
        eng.shutdown()
    if "ngram" in only and cuda and dummy:
        eng = engine(speculative_method="ngram", **k)
        with forced_proposals():
            for accept in (False, True):
                with forced_acceptance(accept):
                    compare(f"ngram, k proposals, forced {100 if accept else 0}% acceptance", eng, "quote")
        eng.shutdown()
    if "draft" in only and cuda and dummy:
        eng = engine(speculative_method="draft", speculative_model=draft_folder, **k)
        for accept in (False, True):
            with forced_acceptance(accept):
                compare(f"draft (2 layers), forced {100 if accept else 0}% acceptance", eng, "chat")
        eng.shutdown()
    plain.shutdown()

if __name__ == "__main__":
    main()
