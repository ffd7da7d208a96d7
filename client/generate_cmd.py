"""`kvtriton generate "prompt" --url ...`: one request to a running server, streamed to stdout.

The integrator's CLI calls `run(args)` only when --url is given (without it, the
engine runs in-process); both variants share `add_sampling_arguments` and
`sampling_from_args`. Exit status: 0 done, 1 server unreachable or request
rejected (one line on stderr), 2 bad options, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence

from kvtriton.client.api import LLMClient, user_turn
from kvtriton.client.cli_args import (
    add_connection_arguments,
    add_sampling_arguments,
    add_template_arguments,
    prompt_and_client,
    run_command,
    sampling_from_args,
    template_hint,
)
from kvtriton.client.errors import LLMClientError

__all__ = ["add_arguments", "run", "add_sampling_arguments", "sampling_from_args", "main", "EXAMPLES"]
PROG = "kvtriton generate"
EXAMPLES = """examples:
  kvtriton generate "What is the capital of France?"                       # in-process, the default model
  kvtriton generate "What is the capital of France?" --url localhost:8001  # a running server, over gRPC
  kvtriton generate "The capital of France is" --raw --max-tokens 8 --url http://localhost:8000
  echo "Write a haiku about GPUs." | kvtriton generate - --json --temperature 0.7 --seed 1 --url localhost:8001"""


def add_arguments(parser: argparse.ArgumentParser, url_required: bool = True) -> None:
    parser.add_argument("prompt", help='the prompt; "-" reads it from stdin')
    add_template_arguments(parser, "the prompt")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (text, token counts, finish_reason, timings) instead of streaming")
    add_connection_arguments(parser, url_required)
    add_sampling_arguments(parser)


def fail(prog: str, message: str, code: int = 1) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def run_request(prog: str, args: argparse.Namespace, request: Callable[[str, LLMClient], int]) -> int:
    """`request(prompt, client)` for a command's prompt argument and --url, its exit status; errors as one line:
    2 for bad options or a malformed prompt (before anything was sent), 1 for the server's or the request's."""
    try:
        prompt, client = prompt_and_client(args)
    except ValueError as e:
        return fail(prog, str(e), 2)
    try:
        with client:
            return request(prompt, client)
    except ValueError as e:
        return fail(prog, str(e), 2)
    except LLMClientError as e:
        return fail(prog, f"{type(e).__name__}: {e}{template_hint(str(e), args.raw)}")


def run(args: argparse.Namespace) -> int:
    def generate(prompt: str, client: LLMClient) -> int:
        try:
            with client.stream(**user_turn(prompt, args.raw), **sampling_from_args(args)) as stream:
                for chunk in stream:
                    if not args.json:
                        sys.stdout.write(chunk.text)
                        sys.stdout.flush()
                completion = stream.completion
        except KeyboardInterrupt:  # the stream's close cancelled the request on the server
            print(file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps({**completion.to_dict(), "url": client.endpoint.url, "model": args.model}))
        else:
            sys.stdout.write("\n")
        return 0

    return run_request(PROG, args, generate)


def stream_demo(grpc_url: str, prompt: str) -> None:
    """`kvtriton serve --demo`: one real streamed chat answer through the server, as a user's client gets it."""
    from kvtriton.client.api import LLMClient

    print(f"\n> {prompt}", flush=True)
    with LLMClient(grpc_url, protocol="grpc") as client:
        with client.stream(**user_turn(prompt), temperature=0.0, max_tokens=128) as stream:
            for chunk in stream:
                print(chunk.text, end="", flush=True)
    print("\n", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, "Generate text with a running kvtriton server.", add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
