"""`kvtriton`: one command, subcommands for every way of using the bundle.

  serve        start tritonserver on a model repository (kvtriton.backend.entrypoints.serve)
  generate     one prompt: in-process engine, or a running server with --url
  chat         interactive chat against a running server
  openai       the OpenAI-compatible API in front of a running server
  bench        load generator against a running server
  tokenize     a prompt's token count by the served model's tokenizer (nothing generated)
  health       is a served model answering? one 1-token request (exit 0 / 1)
  build        checkpoint -> ONNX / TensorRT model in a repository (kvtriton.build)
  fetch-model  download and convert the default model into the cache

This dispatcher sits on top of all three parts and is the one module of
kvtriton.client allowed to import kvtriton.backend and kvtriton.build
(tests/test_layers.py checks it). Imports are lazy so that `kvtriton --help`
and each command start fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _start_openai(grpc_url: str, host: str, port: int, **options):
    """`kvtriton serve --openai-port`: the OpenAI frontend beside the server (`options`: make_server's parser
    names); returns its stop()."""
    from kvtriton.client.openai.server import FrontendThread

    return FrontendThread(grpc_url, host, port, **options).start().stop


def _serve(argv: list[str]) -> int:
    from kvtriton.backend.entrypoints.serve import main
    from kvtriton.client.generate_cmd import stream_demo

    return main(argv, demo=stream_demo, openai=_start_openai)


def _fetch_model(argv: list[str]) -> int:
    from kvtriton.backend.models.default_model import main

    return main(argv)


def _generate(argv: list[str]) -> int:
    from kvtriton.backend.entrypoints import offline
    from kvtriton.client import generate_cmd
    from kvtriton.client.cli_args import sampling_from_args

    parser = argparse.ArgumentParser(
        prog="kvtriton generate",
        description="Generate text and stream it: against a server with --url, else with the engine in-process.",
        epilog=generate_cmd.EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    generate_cmd.add_arguments(parser, url_required=False)
    offline.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.url:
        return generate_cmd.run(args)
    return offline.run(args, sampling_from_args(args))


def _command(module: str, prog: str):
    def run(argv: list[str]) -> int:
        import importlib

        from kvtriton.client.cli_args import run_command

        mod = importlib.import_module(module)
        return run_command(prog, (mod.__doc__ or "").split("\n")[0], mod.add_arguments, mod.run, argv, mod.EXAMPLES)
    return run


COMMANDS = {
    "serve": (_serve, "start tritonserver on a model repository and serve until Ctrl-C"),
    "generate": (_generate, "generate text (in-process, or against a server with --url)"),
    "chat": (_command("kvtriton.client.chat_cmd", "kvtriton chat"), "interactive chat against a server"),
    "openai": (_command("kvtriton.client.openai_cmd", "kvtriton openai"),
               "the OpenAI-compatible API (/v1/chat/completions, ...) in front of a running server"),
    "bench": (_command("kvtriton.client.bench_cmd", "kvtriton bench"), "load generator against a server"),
    "tokenize": (_command("kvtriton.client.tokenize_cmd", "kvtriton tokenize"),
                 "how many tokens a prompt is, by the served model's tokenizer (nothing generated)"),
    "health": (_command("kvtriton.client.health_cmd", "kvtriton health"),
               "is a served model answering? one 1-token request (exit 0 healthy, 1 not)"),
    "build": (_command("kvtriton.build.cli", "kvtriton build"), "build an ONNX / TensorRT model into a repository"),
    "fetch-model": (_fetch_model, "download and convert the default model into the cache"),
}


EXAMPLES = """examples:
  kvtriton serve                                              # the llm model on :8000 (HTTP), :8001 (gRPC)
  kvtriton generate "What is the capital of France?" --url localhost:8001
  kvtriton chat --url localhost:8001
  kvtriton bench --url localhost:8001 --concurrency 1,4,16"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: kvtriton <command> [options]\n\ncommands:\n{lines}\n\n{EXAMPLES}\n\n"
              "`kvtriton <command> --help` for each, with examples.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nkvtriton: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
