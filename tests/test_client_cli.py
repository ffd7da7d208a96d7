"""`kvtriton generate` and `kvtriton chat` (the --url variants) against a real tritonserver."""

from __future__ import annotations

import io
import json
import select
import signal
import subprocess
import sys
import time
from unittest.mock import ANY

import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client import chat_cmd, generate_cmd
from kvtriton.client.api import LLMClient

from tests.test_client_api import LONG, assert_nothing_running, metric, wait_idle

pytestmark = [pytest.mark.server, pytest.mark.slow]


def cli(module: str, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"kvtriton.client.{module}", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_generate_streams_text_and_json_agrees(llm_server, protocol, capsys):
    url = llm_server.http_url if protocol == "http" else llm_server.grpc_url
    common = ["The capital of France is", "--raw", "--url", url, "--protocol", protocol, "--max-tokens", "8",
              "--temperature", "0"]
    assert generate_cmd.main(common) == 0
    streamed = capsys.readouterr().out
    assert generate_cmd.main([*common, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert streamed == result["text"] + "\n" and "Paris" in result["text"]
    assert result["num_output_tokens"] >= 1 and result["finish_reason"] in ("stop", "length")
    assert result["num_input_tokens"] == 5 and 0 < result["ttft_s"] <= result["latency_s"]


def _generate_json(capsys, *args: str) -> dict:
    assert generate_cmd.main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_applies_the_chat_template_by_default_and_raw_sends_the_text_as_is(llm_server, default_model_folder,
                                                                                   capsys):
    from kvtriton.backend.engine.tokenizer import Tokenizer

    question = "What is the capital of France?"
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    templated = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
    common = [question, "--url", llm_server.grpc_url, "--max-tokens", "12", "--temperature", "0"]

    answer = _generate_json(capsys, *common)
    assert "Paris" in answer["text"] and answer["num_input_tokens"] == len(templated)
    assert _generate_json(capsys, *common, "--chat") == {**answer, "ttft_s": ANY, "latency_s": ANY}
    # The raw question is a complete text to the instruct model: it ends at once (what `generate` did before).
    raw = _generate_json(capsys, *common, "--raw")
    assert raw["num_input_tokens"] == len(tokenizer.encode(question)) < len(templated)
    assert raw["text"] == "" and raw["finish_reason"] == "stop"


def test_generate_chat_and_raw_together_is_a_usage_error():
    done = cli("generate_cmd", "Hi", "--chat", "--raw", "--url", "127.0.0.1:1")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr


def test_generate_without_a_server_fails_fast_with_one_clear_line():
    port = free_ports(1)[0]
    started = time.monotonic()
    done = cli("generate_cmd", "Hi", "--url", f"127.0.0.1:{port}", "--connect-retries", "1")
    assert time.monotonic() - started < 10  # interpreter start + 2 probes
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvtriton generate: error: ServerUnavailableError"), done.stderr
    assert f"127.0.0.1:{port}" in lines[0]


def test_generate_rejected_request_exits_nonzero_with_the_server_message(llm_server):
    done = cli("generate_cmd", "Hi", "--url", llm_server.http_url, "--temperature", "-1")
    assert done.returncode == 1
    assert done.stderr.strip() == "kvtriton generate: error: InvalidRequestError: temperature must be >= 0, got -1.0"


def test_generate_bad_url_is_a_usage_error():
    done = cli("generate_cmd", "Hi", "--url", "http://127.0.0.1:1", "--protocol", "grpc")
    assert done.returncode == 2 and "protocol is grpc" in done.stderr


def test_chat_keeps_history_across_turns(llm_server, monkeypatch, capsys):
    sent = []
    original = LLMClient.stream

    def spy(self, prompt=None, *, messages=None, **sampling):  # records what goes to the real server
        sent.append([dict(m) for m in messages])
        return original(self, prompt, messages=messages, **sampling)

    monkeypatch.setattr(LLMClient, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n\nAnd of Germany?\n/reset\nHi\n"))
    assert chat_cmd.main(["--url", llm_server.grpc_url, "--max-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(sent) == 3  # the empty line sent nothing
    first_answer = out[0]
    assert "Paris" in first_answer
    assert sent[0] == [{"role": "user", "content": "What is the capital of France?"}]
    assert sent[1] == [*sent[0], {"role": "assistant", "content": first_answer},
                       {"role": "user", "content": "And of Germany?"}]
    assert "(conversation cleared)" in out
    assert sent[2] == [{"role": "user", "content": "Hi"}]


def test_chat_ctrl_c_cancels_the_answer_and_returns_to_the_prompt(llm_server):
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtriton.client.chat_cmd", "--url", llm_server.grpc_url,
         "--max-tokens", str(LONG["max_tokens"]), "--ignore-eos"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background (`make test &`) runs with SIGINT ignored, which the chat would
        # inherit (Python then installs no KeyboardInterrupt handler): give it the terminal's default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_idle(llm_server)  # so that only this chat's answer moves the token counter
        before = metric(llm_server, "kvtriton_generation_tokens_total")
        proc.stdin.write("Count to one thousand.\n")
        proc.stdin.flush()
        # The answer is streaming once the chat has printed some of it: only then is the client inside its
        # stream, where Ctrl-C cancels. (The server's token counter alone was not enough: a late metrics flush
        # could move it before the chat had sent anything, and a Ctrl-C that lands while tritonclient is still
        # opening the stream leaves the request uncancelled.)
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.read(1), "the chat printed no answer"
        proc.send_signal(signal.SIGINT)
        assert_nothing_running(llm_server, before)
        out, err = proc.communicate("/reset\n", timeout=30)  # still at the prompt; EOF then exits
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "(answer cancelled)" in out and out.index("(answer cancelled)") < out.index("(conversation cleared)")


def test_chat_without_a_server_exits_nonzero():
    port = free_ports(1)[0]
    done = cli("chat_cmd", "--url", f"127.0.0.1:{port}", "--connect-retries", "0", stdin="Hi\n")
    assert done.returncode == 1 and f"127.0.0.1:{port}" in done.stderr


def test_chat_template_kwargs_must_be_a_json_object(capsys):
    for bad in ("[1]", "{oops"):
        with pytest.raises(SystemExit) as info:
            chat_cmd.main(["--url", "127.0.0.1:9", "--chat-template-kwargs", bad])
        assert info.value.code == 2 and "--chat-template-kwargs" in capsys.readouterr().err


def test_tokenize_counts_a_prompt_as_the_server_does(llm_server, capsys):
    """The chat template's tokens count by default (what `kvtriton generate` sends); --raw counts the text."""
    from kvtriton.client.tokenize_cmd import main as tokenize_main

    assert tokenize_main(["What is the capital of France?", "--url", llm_server.grpc_url, "--json"]) == 0
    chat = json.loads(capsys.readouterr().out)
    assert tokenize_main(["What is the capital of France?", "--raw", "--ids", "--url", llm_server.http_url]) == 0
    count_line, ids_line = capsys.readouterr().out.splitlines()
    assert count_line.startswith(f"{len(ids_line.split())} tokens (the model's context: {chat['max_model_len']})")
    assert chat["count"] == len(chat["token_ids"]) > len(ids_line.split())  # the template's tokens too
