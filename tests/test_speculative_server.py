"""Speculative decoding behind a real tritonserver: the shipped `llm` model with prompt lookup switched on in
config.pbtxt; a request with speculation gives the same greedy text as the same request with it off
(num_speculative_tokens 0), and the speculative metrics count. Default model, CPU."""

from __future__ import annotations

import shutil

import pytest

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters

from tests.conftest import MODEL_REPOSITORY
from tests.test_triton_llm import grpc_stream, metric, post
from tests.triton_fixture import start_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

QUOTE = ("<|im_start|>user\nRepeat this paragraph with one word changed: The river runs past the old mill, under "
         "the stone bridge, and on to the sea, where the fishing boats wait for the morning tide.<|im_end|>\n"
         "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, default_model_folder):
    repo = tmp_path_factory.mktemp("spec_repository")
    shutil.copytree(MODEL_REPOSITORY / "llm", repo / "llm")
    set_parameters(repo / "llm" / "config.pbtxt", {"speculative_method": "ngram", "num_speculative_tokens": "4"})
    server = start_server(repo, timeout_s=300)
    yield server
    server.stop()


def test_speculation_gives_the_same_greedy_text(spec_server):
    texts = []
    for k in (None, 0, 2):
        body = {"text_input": QUOTE, "max_tokens": 64, "temperature": 0, "exclude_input_in_output": True}
        if k is not None:
            body["num_speculative_tokens"] = k
        status, out = post(spec_server, "/v2/models/llm/generate", body)
        assert status == 200, out
        texts.append(out["text_output"])
    assert texts[0] == texts[1] == texts[2] and texts[0]
    # Streamed over gRPC, the tensor input: the same text.
    chunks, error = grpc_stream(spec_server, text_input=QUOTE, max_tokens=64, temperature=0.0, stream=True,
                                num_speculative_tokens=4)
    assert error is None and "".join(c["text"] for c in chunks) == texts[0]
    proposed = metric(spec_server, "kvtriton_spec_decode_proposed_tokens_total")
    accepted = metric(spec_server, "kvtriton_spec_decode_accepted_tokens_total")
    assert proposed and 0 < accepted <= proposed


def test_too_many_speculative_tokens_is_a_clear_error(spec_server):
    status, out = post(spec_server, "/v2/models/llm/generate",
                       {"text_input": "Hi", "max_tokens": 4, "num_speculative_tokens": 9})
    assert status == 400 and "num_speculative_tokens 9 is more than this model allows" in out["error"]
