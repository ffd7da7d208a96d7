"""One HTTP generate / generate_stream request against a served `llm` model, as a careless client may send it
(tests/test_reliability.py, tests/test_speculative_server.py)."""

from __future__ import annotations

import http.client
import json


def http_request(serve, body: dict, stream: bool, disconnect_after=None, timeout=120.0) -> dict:
    """One HTTP generate(_stream) request; disconnect_after=k closes the connection after k events (0: at once)."""
    result = {"chunks": 0, "tokens": 0, "finish_reason": None, "error": None, "cancelled": False}
    conn = http.client.HTTPConnection("127.0.0.1", serve.http_port, timeout=timeout)
    path = "/v2/models/llm/generate_stream" if stream else "/v2/models/llm/generate"
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        if disconnect_after == 0:
            result["cancelled"] = True
            return result
        response = conn.getresponse()
        if not stream:
            payload = json.loads(response.read())
            if response.status != 200 or "error" in payload:
                result["error"] = payload.get("error", str(payload))
            else:
                result["chunks"], result["finish_reason"] = 1, payload["finish_reason"]
                result["tokens"] = payload["num_output_tokens"]
            return result
        for line in response:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                result["error"] = event["error"]
                break
            result["chunks"] += 1
            result["tokens"] += event["num_output_tokens"]
            result["finish_reason"] = event["finish_reason"] or None
            if disconnect_after is not None and result["chunks"] >= disconnect_after:
                result["cancelled"] = True
                break
        else:
            if result["finish_reason"] is None and result["error"] is None:  # how a dropped connection shows
                result["error"] = "the event stream ended without a final response"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result["error"] = f"LOST: {type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return result
