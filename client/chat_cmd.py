"""`kvtriton chat --url ...`: a REPL over a running server, the conversation sent as `messages`.

The server applies the model's chat template; the client keeps the history:
every turn sends all earlier user and assistant messages. Ctrl-C during an
answer cancels that request on the server and forgets the unanswered turn;
Ctrl-C or Ctrl-D at the prompt exits. `/reset` clears the history, `/exit`
leaves. Reads plain lines when stdin is not a terminal (scripts, tests).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence, TextIO

from kvtriton.client.api import LLMClient
from kvtriton.client.cli_args import (
    add_connection_arguments,
    add_sampling_arguments,
    client_from_args,
    run_command,
    sampling_from_args,
)
from kvtriton.client.errors import LLMClientError, ServerError, ServerUnavailableError
from kvtriton.client.generate_cmd import fail

PROG = "kvtriton chat"
EXAMPLES = """examples:
  kvtriton chat --url localhost:8001
  kvtriton chat --url http://localhost:8000 --system "Answer in one sentence." --temperature 0.7
  kvtriton chat --url localhost:8001 --chat-template-kwargs '{"enable_thinking": false}'
  printf 'Hi!\nWhat did I just say?\n' | kvtriton chat --url localhost:8001 --max-tokens 64"""
PROMPT = ">>> "
COMMANDS = {"/reset": "forget the conversation", "/exit": "leave (or Ctrl-D)", "/help": "this list"}


class ChatSession:
    """The conversation: a system message (optional) and alternating user/assistant turns."""

    def __init__(self, client: LLMClient, sampling: dict[str, Any], system: str | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        self.client, self.sampling, self.chat_template_kwargs = client, sampling, chat_template_kwargs
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, out: TextIO) -> str:
        """Stream the answer to `out`; the turn joins the history only once fully answered."""
        turn = {"role": "user", "content": text}
        with self.client.stream(messages=[*self.system, *self.history, turn],
                                chat_template_kwargs=self.chat_template_kwargs, **self.sampling) as stream:
            for chunk in stream:
                out.write(chunk.text)
                out.flush()
        answer = stream.completion.text
        self.history += [turn, {"role": "assistant", "content": answer}]
        return answer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", help="system message that starts every conversation")
    parser.add_argument("--chat-template-kwargs", type=_json_object, default=None, metavar="JSON",
                        help='more chat-template variables, e.g. \'{"enable_thinking": false}\' (Qwen3)')
    add_connection_arguments(parser)
    add_sampling_arguments(parser)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _read_line(interactive: bool) -> str | None:
    """The next user line; None at end of input (Ctrl-D or a closed pipe)."""
    if interactive:
        try:
            return input(PROMPT)
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def run(args: argparse.Namespace) -> int:
    try:
        client = client_from_args(args)
        client.wait_ready()
    except ValueError as e:
        return fail(PROG, str(e), 2)
    except ServerUnavailableError as e:
        return fail(PROG, str(e))
    session = ChatSession(client, sampling_from_args(args), args.system, args.chat_template_kwargs)
    interactive = sys.stdin.isatty()
    if interactive:
        adapter = f" (LoRA adapter {args.lora})" if args.lora else ""
        print(f"kvtriton chat with {args.model}{adapter} at {client.endpoint.url}; /help lists commands, Ctrl-D "
              "exits.")
    status = 0
    with client:
        while True:
            try:
                line = _read_line(interactive)
            except KeyboardInterrupt:
                print()
                return status
            if line is None or line.strip() == "/exit":
                return status
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                session.reset()
                print("(conversation cleared)", flush=True)
                continue
            if text == "/help":
                print("\n".join(f"{c:8} {h}" for c, h in COMMANDS.items()), flush=True)
                continue
            try:
                session.ask(text, sys.stdout)
                print(flush=True)
            except KeyboardInterrupt:
                print("\n(answer cancelled)", flush=True)
            except ServerUnavailableError as e:
                print(flush=True)
                return fail(PROG, str(e))
            except (ServerError, LLMClientError, ValueError) as e:
                # The server keeps the rest of the conversation; this turn is dropped.
                print(flush=True)
                fail(PROG, f"{type(e).__name__}: {e}")
                status = 1


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, "Chat with a running kvtriton server.", add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
