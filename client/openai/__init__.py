"""The OpenAI-compatible frontend: an ASGI app (FastAPI on uvicorn) in front of the `llm` model on Triton.

protocol.py   the request and response bodies (pydantic), and a request's sampling parameters
errors.py     OpenAIError and the mapping from kvtriton.client's errors to OpenAI's error shape
serving.py    one request's choices as Triton requests (AsyncLLMClient over gRPC streaming), as
              a response body or as server-sent events
responses_protocol.py, responses.py
              the Responses API (/v1/responses): its bodies, a request as a chat completion, and the chat's
              output as the response's items, whole or as OpenAI's events
served_models.py
              the names a request's `model` may be: the served model, and its LoRA adapters (lora_name)
app.py        the routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /health
server.py     uvicorn, in the foreground (`kvtriton openai`) or in a thread (`kvtriton serve --openai-port`)
"""
