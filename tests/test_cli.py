"""The `kvtriton` command itself: every command's --help ends with examples, and `kvtriton generate` in-process
applies the model's chat template unless --raw (tiny random models; the server variant: test_client_cli.py)."""

from __future__ import annotations

import json
import re

import pytest

from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.client import cli

from tests.tiny_model import make_tiny_model


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_commands_help_ends_with_examples_of_that_command(command, capsys):
    text = _help(capsys, command)
    assert "\nexamples:\n" in text, text
    examples = text.split("\nexamples:\n", 1)[1]
    assert re.search(rf"^  kvtriton {command}\b", examples, re.M), examples


def test_top_level_help_lists_commands_and_examples(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in cli.COMMANDS) and "\nexamples:\n  kvtriton " in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def _generate(capsys, model, *args: str) -> tuple[int, dict | None, str]:
    code = cli.main(["generate", "What is the capital of France?", "--model-path", str(model), "--device", "cpu",
                     "--max-tokens", "2", "--temperature", "0", "--json", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_in_process_generate_applies_the_chat_template_unless_raw(tiny, capsys):
    tokenizer = Tokenizer.from_pretrained(tiny)
    question = "What is the capital of France?"
    code, templated, _ = _generate(capsys, tiny)
    assert code == 0
    assert templated["num_input_tokens"] == len(tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": question}])))
    code, raw, _ = _generate(capsys, tiny, "--raw")
    assert code == 0 and raw["num_input_tokens"] == len(tokenizer.encode(question)) < templated["num_input_tokens"]


def _without_chat_template(folder):
    model = make_tiny_model(folder)
    config = json.loads((model / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_in_process_generate_on_a_model_without_a_chat_template_says_to_use_raw(tmp_path, capsys):
    model = _without_chat_template(tmp_path / "base")
    capsys.readouterr()  # the tiny model's save progress

    code, _, err = _generate(capsys, model)
    assert code == 2
    assert err.strip() == f"kvtriton generate: error: {model} has no chat template; --raw sends the prompt as is"
    code, raw, _ = _generate(capsys, model, "--raw")
    assert code == 0 and raw["num_output_tokens"] >= 1


def test_the_servers_no_template_error_gets_the_raw_hint(tmp_path):
    """Over --url the server's error comes back as text; the client adds the hint when it names the template."""
    from kvtriton.client.cli_args import template_hint

    model = _without_chat_template(tmp_path / "base")
    with pytest.raises(ValueError) as rejected:  # what the server answers a `messages` request with
        Tokenizer.from_pretrained(model).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert template_hint(str(rejected.value), raw=False) == "; --raw sends the text as is"
    assert template_hint(str(rejected.value), raw=True) == ""
    assert template_hint("temperature must be >= 0, got -1.0", raw=False) == ""
