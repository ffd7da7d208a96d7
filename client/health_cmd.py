"""`kvtriton health --url ...`: is the model serving? Generates one token through the server.

Triton's own readiness (/v2/health/ready) stays 200 when a model's engine or Python stub has died, so a
probe that only asks Triton cannot see it; this one runs a real 1-token request through the model (the
compose health check and a Kubernetes liveness probe use it). Exit status: 0 healthy (one line on stdout),
1 unhealthy (the reason on stderr), 2 bad options.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from kvtriton.client.cli_args import add_connection_arguments, client_from_args, run_command
from kvtriton.client.errors import LLMClientError

PROG = "kvtriton health"
DEFAULT_TIMEOUT_S = 10.0
PROMPT = "Hi"
EXAMPLES = """examples:
  kvtriton health --url 127.0.0.1:8001                    # exit 0: healthy, 1: not (the reason on stderr)
  kvtriton health --url http://127.0.0.1:8000 --timeout 5 --model llm_int8"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    # A probe answers quickly or not at all: no readiness retries, a short wait for the token.
    parser.set_defaults(timeout=DEFAULT_TIMEOUT_S, connect_retries=0)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        with client_from_args(args) as client:
            completion = client.generate(PROMPT, max_tokens=1, temperature=0.0)
    except LLMClientError as exc:
        print(f"{PROG}: unhealthy: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a probe reports every failure as unhealthy, never with a traceback
        print(f"{PROG}: unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"{PROG}: ok: model {args.model} at {args.url} generated {completion.num_output_tokens} token(s) "
          f"({completion.finish_reason}) in {time.perf_counter() - started:.2f} s", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, __doc__.split("\n")[0], add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
