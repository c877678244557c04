"""A local stand-in for the model: an OpenAI-compatible ``POST /v1/chat/completions`` server (non-streaming) that
answers the support agent deterministically.

It exists only because a paid LLM provider cannot be called from this example's tests and walkthrough. The agent
itself is real (the OpenAI Python SDK and its OpenTelemetry instrumentation talk to this server exactly as they
would to api.openai.com); point ``OPENAI_BASE_URL`` at a real provider instead and nothing else changes.

    python fake_model.py --port 8787        # then OPENAI_BASE_URL=http://127.0.0.1:8787/v1

Tests start it in a thread: ``with FakeModel() as fm: fm.base_url`` (a free port).

How it answers (from the request alone, like a model: no state between requests):

1. It reads the order id from the customer's message as written (``a-1002``, ``#A1003``, ``B-2001``) and asks for
   ``lookup_order`` with it — copied verbatim, like a sloppy but plausible model would. With ``temperature > 0`` it
   emulates sampling from the request's ``seed``: an even seed makes it tidy the id (upper case, no ``#``), an odd
   or missing seed copies it verbatim.
2. After a successful lookup: when the customer asks for a refund (``refund``, ``money back``) it asks for
   ``refund_order`` with the order's id and full total; otherwise it answers with the order's status.
3. After a successful refund it confirms it with the amount and refund id.
4. After a tool error it apologises, quoting the error, and stops (no retry): the run then ends without the task
   done. Without an order id in the message it asks for one.

Every request is kept in :attr:`FakeModel.requests` (decoded bodies) for tests.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ORDER_ID = re.compile(r"#?\b[A-Za-z]-?\d{4}\b")
REFUND_WORDS = ("refund", "money back")


def _text(content: Any) -> str:
    """Message content as text (a string, or a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _tool_call(name: str, arguments: dict[str, Any], turn: int) -> dict[str, Any]:
    return {"id": f"call_{name}_{turn}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


def decide(body: dict[str, Any]) -> dict[str, Any]:
    """The assistant message (``{"role": "assistant", "content": ..., "tool_calls": [...]}``) for one request."""
    messages = body.get("messages") or []
    task = next((_text(m.get("content")) for m in messages if m.get("role") == "user"), "")
    turn = sum(1 for m in messages if m.get("role") == "assistant") + 1
    found = ORDER_ID.search(task)
    if found is None:
        return {"role": "assistant", "content": "Could you give me your order number (for example A-1001)?"}
    order_id = found.group(0)
    seed = body.get("seed")
    if (body.get("temperature") or 0) > 0 and isinstance(seed, int) and seed % 2 == 0:
        order_id = order_id.lstrip("#").upper()
    results = [m for m in messages if m.get("role") == "tool"]
    if not results:
        return {"role": "assistant", "content": None, "tool_calls": [_tool_call("lookup_order", {
            "order_id": order_id}, turn)]}

    called = {c["id"]: c["function"]["name"] for m in messages if m.get("role") == "assistant"
              for c in m.get("tool_calls") or []}
    last = results[-1]
    tool = called.get(last.get("tool_call_id"), "")
    try:
        result = json.loads(_text(last.get("content")))
    except ValueError:
        result = {"error": "unreadable tool result", "message": _text(last.get("content"))}
    if not isinstance(result, dict) or "error" in result:
        message = result.get("message", result.get("error")) if isinstance(result, dict) else result
        return {"role": "assistant", "content": f"I'm sorry, I couldn't do that for order {order_id}: {message}. "
                                                "Could you check the order number?"}
    if tool == "lookup_order":
        if any(w in task.lower() for w in REFUND_WORDS):
            return {"role": "assistant", "content": None, "tool_calls": [_tool_call("refund_order", {
                "order_id": result["order_id"], "amount": result["total"]}, turn)]}
        return {"role": "assistant", "content": f"Your order {result['order_id']} ({result['item']}) is "
                                                f"{result['status']}."}
    return {"role": "assistant", "content": f"Done: I refunded ${result['amount']:.2f} for order "
                                            f"{result['order_id']} (refund {result['refund_id']})."}


def completion(body: dict[str, Any], completion_id: str) -> dict[str, Any]:
    """A ``chat.completion`` object around :func:`decide`'s message, with rough token counts."""
    message = decide(body)
    prompt_tokens = max(1, len(json.dumps(body.get("messages") or [])) // 4)
    completion_tokens = max(1, len(json.dumps(message)) // 4)
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model") or "fake-model", "system_fingerprint": "fp_support_fake",
        "choices": [{"index": 0, "message": {"refusal": None, **message}, "logprobs": None,
                     "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class FakeModel:
    """The server on ``127.0.0.1:<port>`` (0 = a free one), served from a daemon thread."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(_Handler):
            fake = owner

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def next_id(self, body: dict[str, Any]) -> str:
        with self._lock:
            self.requests.append(body)
            return f"chatcmpl-support-{len(self.requests)}"

    def start(self) -> "FakeModel":
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "FakeModel":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeModel
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep the console quiet
        pass

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?", 1)[0].rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._reply(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._reply(400, {"error": {"message": "the body is not JSON", "type": "invalid_request_error"}})
            return
        if body.get("stream"):
            self._reply(400, {"error": {"message": "this fake model does not stream", "type": "invalid_request_error"}})
            return
        self._reply(200, completion(body, self.fake.next_id(body)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    fake = FakeModel(args.port, args.host)
    print(f"fake model at {fake.base_url} (Ctrl-C to stop)", flush=True)
    try:
        fake.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.server.server_close()


if __name__ == "__main__":
    main()
