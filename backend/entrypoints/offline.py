"""`kvtriton generate "prompt"` without --url: the engine in this process, streamed to the terminal.

Offline inference in vLLM's sense: no server, same engine, same sampling
options as the client variant (kvtriton.client.cli_args).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("in-process engine (used when --url is not given)")
    g.add_argument("--model-path", default="default",
                   help='HF model folder, or "default" for SmolLM2-135M-Instruct (default)')
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    g.add_argument("--dtype", default="auto", help="auto | float32 | float16 | bfloat16")


def run(args: argparse.Namespace, sampling: dict) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        SamplingParams.from_dict(sampling)  # a bad option fails before the model loads
        # One request of the user's own: the server's time bound does not apply.
        engine = LLMEngine(EngineConfig(model=args.model_path, device=args.device, dtype=args.dtype,
                                        max_request_time_s=0.0))
        params = SamplingParams.from_dict(sampling, engine.sampling_defaults)  # the model's where unset, as served
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"kvtriton generate: error: {exc}", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.raw:  # --chat, the default: the prompt as one user message, as the server renders `messages`
        if not engine.tokenizer.has_chat_template:
            print(f"kvtriton generate: error: {args.model_path} has no chat template; --raw sends the prompt as is",
                  file=sys.stderr)
            return 2
        tokenizer = engine.tokenizer
        prompt = tokenizer.encode_chat_prompt(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    engine.start()
    try:
        stream = engine.add_request("cli", prompt, params)
        outputs = []
        for out in stream:
            outputs.append(out)
            if not args.json:
                sys.stdout.write(out.text)
                sys.stdout.flush()
    except ValueError as exc:
        print(f"kvtriton generate: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        engine.abort("cli")
        return 130
    finally:
        engine.shutdown(timeout_s=1)
    last = outputs[-1]
    if args.json:
        ttft = (last.first_token_time or last.time) - last.arrival_time
        print(json.dumps({"text": "".join(o.text for o in outputs), "num_input_tokens": last.num_prompt_tokens,
                          "num_output_tokens": last.num_output_tokens, "finish_reason": last.finish_reason,
                          "ttft_s": ttft, "latency_s": last.time - last.arrival_time}))
    else:
        sys.stdout.write("\n")
    return 0
