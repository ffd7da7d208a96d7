"""Echo: streams ``text_input`` back word by word, one response per word.

The concatenated ``text_output`` deltas equal the input exactly, so tests can
check that streaming over gRPC and HTTP SSE neither drops nor reorders
responses. Only numpy and pb_utils: the model must load in any stub.
"""

import re

import numpy as np
import triton_python_backend_utils as pb_utils

# Each piece keeps its trailing whitespace, so "".join(pieces) == text.
_PIECE = re.compile(r"\s*\S+\s*|\s+")


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            text_input = pb_utils.get_input_tensor_by_name(request, "text_input")
            text = text_input.as_numpy().reshape(-1)[0].decode("utf-8")
            for piece in _PIECE.findall(text):
                if sender.is_cancelled():
                    break
                output = pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[output]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        # Decoupled: every response went through the sender.
        return None
