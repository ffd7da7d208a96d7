"""TritonResponseSink: delivers one request's RequestOutputs through Triton's decoupled response sender.

Streaming responses are coalesced: tokens accumulate until `stream_interval`
tokens are pending (or the request ends), so that the per-response cost
(an IPC round trip, ~0.1 ms) does not cap throughput at large batches.
Non-streaming requests get exactly one response, with the whole text.
Called only from the engine thread.
"""

from __future__ import annotations

import json

import numpy as np

from kvtriton.backend.outputs import RequestOutput


class TritonResponseSink:
    def __init__(self, pb_utils, sender, stream: bool, prefix: str, stream_interval: int, want_logprobs: bool):
        self.pb_utils, self.sender = pb_utils, sender
        self.stream, self.prefix = stream, prefix  # prefix: the prompt, when it is echoed (non-streaming)
        self.stream_interval = stream_interval
        self.want_logprobs = want_logprobs
        self._text: list[str] = []
        self._num_tokens = 0
        self._logprobs: list[dict] = []

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()

    def put(self, out: RequestOutput) -> None:
        pb = self.pb_utils
        if out.error is not None:
            self.sender.send(pb.InferenceResponse(error=pb.TritonError(out.error)),
                             flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self._text.append(out.text)
        self._num_tokens += len(out.token_ids)
        if out.logprobs:
            self._logprobs += [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in out.logprobs]
        if not out.finished and (not self.stream or self._num_tokens < self.stream_interval):
            return
        text = "".join(self._text)
        if not self.stream:
            text = self.prefix + text
        response = self._response(text, out)
        self._text, self._num_tokens, self._logprobs = [], 0, []
        self.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.finished else 0)

    def _response(self, text: str, out: RequestOutput):
        pb = self.pb_utils
        tensors = [
            pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("num_input_tokens", np.array([out.num_prompt_tokens], dtype=np.uint32)),
            pb.Tensor("num_output_tokens", np.array([self._num_tokens], dtype=np.uint32)),
            pb.Tensor("finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_)),
            pb.Tensor("logprobs", np.array([json.dumps(self._logprobs).encode() if self.want_logprobs else b""],
                                           dtype=np.object_)),
        ]
        return pb.InferenceResponse(output_tensors=tensors)
