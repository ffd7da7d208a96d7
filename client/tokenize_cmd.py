"""`kvtriton tokenize "text" --url ...`: how many tokens a prompt is, by the served model's own tokenizer.

The text goes as one user message through the model's chat template (as `kvtriton generate` and `kvtriton
chat` send it), or as is with --raw; nothing is generated (the `llm` model's tokenize task). Prints the
count and the model's context, the ids with --ids, or one JSON object with --json. Exit status: 0, 1 server
unreachable or request rejected (one line on stderr), 2 bad options.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from kvtriton.client.api import LLMClient, user_turn
from kvtriton.client.cli_args import add_connection_arguments, add_template_arguments, run_command
from kvtriton.client.generate_cmd import run_request

PROG = "kvtriton tokenize"
EXAMPLES = """examples:
  kvtriton tokenize "What is the capital of France?" --url localhost:8001         # as a chat: template included
  kvtriton tokenize - --raw --ids --url http://localhost:8000 < prompt.txt         # a file, as is, with its ids
  kvtriton tokenize "Hi" --json --url localhost:8001"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help='the text; "-" reads it from stdin')
    add_template_arguments(parser, "the text")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--ids", action="store_true", help="also print the token ids, one line")
    out.add_argument("--json", action="store_true", help="print one JSON object: count, max_model_len, token_ids")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    def count(prompt: str, client: LLMClient) -> int:
        tokens = client.tokenize(**user_turn(prompt, args.raw))
        if args.json:
            print(json.dumps({"count": tokens.count, "max_model_len": tokens.max_model_len,
                              "token_ids": list(tokens.token_ids)}))
            return 0
        print(f"{tokens.count} tokens (the model's context: {tokens.max_model_len})")
        if args.ids:
            print(" ".join(map(str, tokens.token_ids)))
        return 0

    return run_request(PROG, args, count)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, (__doc__ or "").split("\n")[0], add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
