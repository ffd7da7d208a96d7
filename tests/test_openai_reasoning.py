"""--reasoning-parser through the OpenAI frontend and a real tritonserver, driven by the official `openai`
package. The default model writes no <think>, so deepseek_r1 (whose models open in the reasoning) sends all
of its answer as reasoning_content, and qwen3 all as content; streamed and whole alike. Default model, CPU."""

from __future__ import annotations

import openai
import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.openai.server import FrontendThread

from tests.test_openai_api import client, frontend  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow]

ASK = dict(model="llm", messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
           max_tokens=12)


@pytest.fixture(scope="module", params=["deepseek_r1", "qwen3"])
def reasoning_client(llm_server, request):
    thread = FrontendThread(llm_server.grpc_url, "127.0.0.1", free_ports(1)[0], reasoning_parser=request.param).start()
    with openai.OpenAI(base_url=thread.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield request.param, c
    thread.stop()


def test_reasoning_content_streamed_and_whole(client, reasoning_client):
    parser, reasoning = reasoning_client
    plain = client.chat.completions.create(**ASK).choices[0].message.content
    whole = reasoning.chat.completions.create(**ASK).choices[0].message
    chunks = list(reasoning.chat.completions.create(**ASK, stream=True))
    streamed = ["".join(getattr(c.choices[0].delta, key, None) or "" for c in chunks)
                for key in ("reasoning_content", "content")]
    if parser == "deepseek_r1":
        assert (whole.reasoning_content, whole.content) == (plain, None) and streamed == [plain, ""]
    else:
        assert (getattr(whole, "reasoning_content", None), whole.content) == (None, plain) and streamed == ["", plain]
