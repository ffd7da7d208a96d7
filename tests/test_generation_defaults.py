"""The checkpoint's generation_config.json sampling as the default of requests that leave it unset (vLLM's
`--generation-config auto`): which keys count, a request's own values win, "none" turns it off, a bad value
fails the load naming the file; and the Triton adapter applies them (fake pb_utils)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.generation_defaults import describe, sampling_defaults
from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.fake_pb_utils import Request
from tests.test_triton_adapter_errors import adapter, text  # noqa: F401 (adapter: a fixture)

LLAMA_32 = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
            "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 2048}


def folder_with(tmp_path, config) -> str:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_sampling_keys_vllm_reads_become_the_defaults(tmp_path):
    folder = folder_with(tmp_path, LLAMA_32)
    assert sampling_defaults(folder, "auto") == {"temperature": 0.6, "top_p": 0.9}  # not max_new_tokens, do_sample
    assert sampling_defaults(folder, "none") == {}
    assert sampling_defaults(tmp_path / "elsewhere", "auto") == {}  # no file: kvtriton's own
    assert "temperature=0.6, top_p=0.9" in describe({"temperature": 0.6, "top_p": 0.9})


def test_a_request_s_own_values_win_and_null_means_the_model_s():
    defaults = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    params = SamplingParams.from_dict({"temperature": 0, "top_p": None}, defaults)
    assert (params.temperature, params.top_p, params.top_k) == (0, 0.9, 20)
    assert SamplingParams.from_dict({}, defaults).temperature == 0.6


def test_a_value_no_request_could_use_fails_the_load_naming_the_file(tmp_path):
    folder = folder_with(tmp_path, {"top_p": 2.0})
    with pytest.raises(ValueError, match=r"generation_config\.json: top_p must be in \(0, 1\], got 2\.0; set "
                                         "generation_config: none"):
        sampling_defaults(folder, "auto")
    with pytest.raises(ValueError, match="generation_config must be one of auto, none"):
        EngineConfig(generation_config="vllm")


def test_the_adapter_fills_what_a_request_leaves_unset(adapter):
    adapter.engine.sampling_defaults = {"temperature": 0.6, "top_p": 0.9}
    adapter.execute([Request("a", text_input=text("Hi")),
                     Request("b", text_input=text("Hi"), temperature=np.array([0.0], dtype=np.float32))])
    (_, unset, _), (_, greedy, _) = adapter.engine.added.values()
    assert (unset.temperature, unset.top_p) == (0.6, 0.9)
    assert (greedy.temperature, greedy.top_p) == (0.0, 0.9)
