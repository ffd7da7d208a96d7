"""The `llm` model's tasks besides generation: "tokenize" and "detokenize" (the request's `task` input).

vLLM's /tokenize and /detokenize on Triton's transports: a client that must know a prompt's length in
tokens before sending it (to fit a context window, to count usage) asks the server, whose tokenizer and chat
template are the model's own, instead of keeping a copy in step with them. Such a request never reaches the
engine: it is answered at once, on the caller's thread, with one final response:

  tokenize    text_input, messages (+ tools, chat_template_kwargs) or input_ids -> token_ids, exactly what a
              generation of that prompt starts from (a rendered chat without added special tokens), its count
              as num_input_tokens, and max_model_len, the context they must fit in;
  detokenize  input_ids -> text_output, their text with special tokens (as vLLM's /detokenize).
"""

from __future__ import annotations

import numpy as np

from kvtriton.backend.engine.admission import Admission
from kvtriton.backend.triton.request import Prompt, RequestError


def answer(pb_utils, admission: Admission, task: str, prompt: Prompt):
    """The final response of a tokenize or detokenize request; RequestError or ValueError name what is wrong."""
    if task == "tokenize":
        ids = admission.tokenize(prompt.value, prompt.chat)
        text, extra = "", {"token_ids": np.array(ids, dtype=np.int32),
                           "max_model_len": np.array([admission.limits.max_model_len], dtype=np.uint32)}
    elif isinstance(prompt.value, list):
        ids = prompt.value
        text, extra = admission.detokenize(ids), {}
    else:
        raise RequestError("task detokenize takes input_ids, the token ids to decode")
    outputs = {"text_output": np.array([text.encode("utf-8")], dtype=np.object_),
               "num_input_tokens": np.array([len(ids)], dtype=np.uint32),
               "num_output_tokens": np.array([0], dtype=np.uint32),
               "finish_reason": np.array([b""], dtype=np.object_), **extra}
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in outputs.items()])
