"""Command-line options shared by `kvtriton generate`, `chat` and `bench`.

`add_sampling_arguments` / `sampling_from_args` are also the in-process
generate path's, so the two variants accept exactly the same sampling options.
Options left unset are not sent: the server's defaults apply.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvtriton.client.api import DEFAULT_CONNECT_RETRIES, DEFAULT_MODEL, DEFAULT_TIMEOUT_S, AsyncLLMClient, LLMClient
from kvtriton.client.endpoint import PROTOCOLS

# option dest -> contract sampling key
_SAMPLING_OPTIONS = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "seed": "seed", "stop": "stop", "ignore_eos": "ignore_eos", "min_tokens": "min_tokens",
    "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "priority": "priority", "lora": "lora_name",
}


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset: the server's default)")
    g.add_argument("--max-tokens", type=int, help="most tokens to generate")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, help="0 or -1 = off")
    g.add_argument("--min-p", type=float)
    g.add_argument("--seed", type=int, help="per-request seed: the same seed gives the same sample")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_const", const=True, help="keep generating past end-of-sequence")
    g.add_argument("--min-tokens", type=int, help="generate at least this many tokens before any stop")
    g.add_argument("--repetition-penalty", type=float, help="1 = off")
    g.add_argument("--presence-penalty", type=float, help="0 = off, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, help="0 = off, in [-2, 2]")
    g.add_argument("--priority", type=int,
                   help="lower runs sooner, on a server with scheduling_policy priority (others accept only 0)")
    g.add_argument("--lora", metavar="NAME",
                   help="generate with this LoRA adapter of the model (a name in its lora_modules); unset: the base "
                        "model")


def sampling_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keyword arguments the user set (the contract's names)."""
    return {key: getattr(args, dest) for dest, key in _SAMPLING_OPTIONS.items()
            if getattr(args, dest, None) is not None}


def add_template_arguments(parser, what: str) -> None:
    """--chat (the default) / --raw: whether `what` goes as one user message through the model's chat template.
    `parser`: an ArgumentParser or one of its argument groups."""
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--chat", dest="raw", action="store_false", default=False,
                   help=f"send {what} as one user message: the model's chat template wraps it, as an instruct "
                        "model expects (the default)")
    g.add_argument("--raw", dest="raw", action="store_true", default=False,
                   help=f"send {what} as is, without the chat template (a base model, or text already in the "
                        "template's format)")


def template_hint(error: str, raw: bool) -> str:
    """What to add to an error about a model without a chat template, when the template was asked for."""
    return "; --raw sends the text as is" if not raw and "chat template" in error else ""


def add_connection_arguments(parser: argparse.ArgumentParser, url_required: bool = True) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--url", required=url_required,
                   help="Triton server: host:port (gRPC, Triton's default port 8001) or http://host:port (HTTP, 8000)")
    g.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="default: from the URL's scheme, else grpc")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"longest wait for the next response of a request (default {DEFAULT_TIMEOUT_S:g} s)")
    g.add_argument("--connect-retries", type=int, default=DEFAULT_CONNECT_RETRIES, metavar="N",
                   help=f"readiness retries with backoff before giving up (default {DEFAULT_CONNECT_RETRIES}, "
                        "about 6 s; 0 = fail at once)")


def run_command(prog: str, description: str, add_arguments, run, argv=None, examples: str | None = None) -> int:
    """Parse argv for one command (its add_arguments) and run it: each command's `main`, and `kvtriton <cmd>`.
    `examples` ends its --help."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def client_from_args(args: argparse.Namespace) -> LLMClient:
    return LLMClient(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout,
                     connect_retries=args.connect_retries)


def prompt_and_client(args: argparse.Namespace) -> tuple[str, LLMClient]:
    """The `prompt` argument ("-": stdin) and the client for --url; ValueError for a bad --url / --protocol."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    return prompt, client_from_args(args)


def async_client_from_args(args: argparse.Namespace) -> AsyncLLMClient:
    return AsyncLLMClient(args.url, protocol=args.protocol, model=args.model, timeout_s=args.timeout,
                          connect_retries=args.connect_retries)
