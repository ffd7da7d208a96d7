"""Serve the OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /v1/responses) in front of
a running Triton server.

    kvtriton openai --url localhost:8001 --port 9000

It forwards every request to the `llm` model over Triton's gRPC streaming; `kvtriton serve --openai-port
9000` starts the same frontend beside the server it launches.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Sequence

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.cli_args import add_connection_arguments, run_command
from kvtriton.client.endpoint import Endpoint
from kvtriton.client.generate_cmd import fail
from kvtriton.client.openai.reasoning import REASONING_PARSERS
from kvtriton.client.openai.server import (
    API_KEY_ENV,
    DEFAULT_HOST,
    DEFAULT_PORT,
    FrontendError,
    api_key_from,
    make_server,
)
from kvtriton.client.openai.tool_calls import TOOL_CALL_PARSERS

PROG = "kvtriton openai"
EXAMPLES = """examples:
  kvtriton openai --url localhost:8001 --port 9000                  # in front of a running tritonserver
  kvtriton openai --url localhost:8001 --host 0.0.0.0 --api-key-file key.txt   # clients send the key
  kvtriton openai --url localhost:8001 --tool-call-parser hermes     # a Hermes / Qwen2.5 model: tool_choice "auto"
  curl localhost:9000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 16}'"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    g = parser.add_argument_group("OpenAI API")
    g.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: all)")
    g.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    g.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help=f"file holding the key clients must send as Authorization: Bearer <key> (OpenAI's SDKs do) "
                        f"on every route but /health (default: ${API_KEY_ENV}; without either the API is open)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients pass as `model` (default: the Triton model's name, --model); the "
                        "model's LoRA adapters (its lora_modules) answer to their own names")
    g.add_argument("--tool-call-parser", choices=list(TOOL_CALL_PARSERS), default=None,
                   help="how tool_choice \"auto\" (OpenAI's default when a request has tools) finds tool calls in "
                        "the model's output: hermes, <tool_call>{...}</tool_call> (Hermes, Qwen2.5/3, SmolLM3); "
                        "llama3_json, {\"name\": ..., \"parameters\": ...} (Llama 3.1-3.3); pythonic, [f(a=1), ...] "
                        "(Llama 3.2 and 4); mistral, [TOOL_CALLS]... (Mistral's models). Without it \"auto\" is "
                        "refused; a named function and \"required\" need none")
    g.add_argument("--reasoning-parser", choices=list(REASONING_PARSERS), default=None,
                   help="send a thinking model's <think>...</think> as reasoning_content, apart from the content: "
                        "deepseek_r1 (DeepSeek-R1 and its distills: the output opens in the reasoning), qwen3 "
                        "(reasoning only after a leading <think>)")


async def _probe(url: str, model: str) -> str:
    async with AsyncLLMClient(url, protocol="grpc", model=model, connect_retries=0) as client:
        probe = await client.probe()
    return "ready" if probe.ready else f"not ready yet ({probe.reason}); requests get 503 until it is"


def run(args: argparse.Namespace) -> int:
    try:
        endpoint = Endpoint.parse(args.url, args.protocol)
        if endpoint.protocol != "grpc":
            raise ValueError(f"--url {args.url}: the frontend forwards over Triton's gRPC streaming; pass the gRPC "
                             "address (host:port, Triton's default port 8001)")
        if not 1 <= args.port <= 65535:
            raise ValueError(f"--port {args.port} is not a TCP port; use 1-65535")
        api_key = api_key_from(args.api_key_file)
        server, sock = make_server(endpoint.address, args.host, args.port, model=args.model,
                                   served_model_name=args.served_model_name, timeout_s=args.timeout,
                                   connect_retries=args.connect_retries, tool_call_parser=args.tool_call_parser,
                                   reasoning_parser=args.reasoning_parser, api_key=api_key)
    except ValueError as e:
        return fail(PROG, str(e), 2)
    except FrontendError as e:
        return fail(PROG, str(e))
    name = args.served_model_name or args.model
    access = "API key required" if api_key else f"open: no API key (${API_KEY_ENV} or --api-key-file)"
    print(f"kvtriton openai: http://{args.host}:{args.port}/v1 (model {name!r}; {access}) -> Triton model "
          f"{args.model!r} at {endpoint.url}: {asyncio.run(_probe(endpoint.address, args.model))}\nCtrl-C stops it.",
          flush=True)
    server.run(sockets=[sock])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, (__doc__ or "").split("\n")[0], add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
