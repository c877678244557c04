"""A small local OpenAI-compatible chat model for the dialect tests (``tests/test_dialects_real.py``), the grading
corpus (``tests/test_grading_corpus.py``) and the judge tests (``tests/test_grading_judge.py``).

Serves ``POST /v1/chat/completions`` (plain JSON and ``stream: true`` server-sent events) on ``127.0.0.1`` at a free
port, from a thread, so the real OpenAI clients (Python ``openai``, the Vercel AI SDK's ``@ai-sdk/openai``, Pydantic
AI's OpenAI model) and the instrumentation wrapped around them can run a complete tool-using agent turn offline.

The answer is decided from the request alone (no hidden per-client state, so concurrent agents do not disturb each
other), first by the model name:

* model name starting with ``judge-`` -> an LLM *judge* answer (:func:`judge_reply`): ``judge-failed`` /
  ``judge-passed`` a structured verdict JSON (usage :data:`JUDGE_USAGE`), ``judge-garbage`` text that is not JSON,
  ``judge-badschema`` JSON that fails the verdict schema, ``judge-slow`` the ``judge-failed`` answer after
  :data:`JUDGE_SLOW_S` seconds, ``judge-noschema`` HTTP 400 naming ``response_format`` when one is sent (else the
  ``judge-failed`` answer); ``judge-error`` falls under the next rule;
* model name containing ``"error"`` -> HTTP 500 with an OpenAI-style error body (:data:`ERROR_MESSAGE`);
* model name ending in ``+<script>`` -> the scripted agent turn :data:`SCRIPTS` ``[<script>]``:
  ``answer`` (the final answer at once, even with tools offered), ``refuse`` (:data:`REFUSAL`), ``loop`` (always
  another call of the tool with the same arguments), ``retry`` (call the tool again while the latest tool result
  reads like an error — "error" or "retry" in it, at most :data:`MAX_RETRIES` times — then answer);
* otherwise the default turn: the conversation already holds a tool result (a ``role: tool`` message) -> the final
  text answer (:data:`FINAL_ANSWER`, ``finish_reason: stop``, usage :data:`FINAL_USAGE`) — whatever that result
  says; tools are offered -> one call of :data:`TOOL_NAME` with :data:`TOOL_ARGUMENTS` (``finish_reason:
  tool_calls``, usage :data:`TOOL_CALL_USAGE`); otherwise -> the final text answer.

The n-th tool call of a conversation (n = tool results so far + 1) has the id :data:`TOOL_CALL_ID` for n = 1 and
``f"{TOOL_CALL_ID}_{n}"`` after that. Every request is kept in :attr:`FakeLLM.requests` (path, model, stream flag,
decoded body, status returned), so a test can check what the client really sent, e.g. that the tool result went
back to the model.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from local_http import LocalHTTPServer, QuietHandler

TASK = "What's the weather in Paris?"
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = {"city": "Paris"}
TOOL_CALL_ID = "call_weather_paris_1"
TOOL_RESULT = "sunny, 22C"
FINAL_ANSWER = "It is sunny and 22C in Paris."
ERROR_MESSAGE = "fake upstream failure: the model is overloaded"
ERROR_STATUS = 500
REFUSAL = "I'm sorry, but I can't help with that request."
#: Tool calls the ``retry`` script makes at most.
MAX_RETRIES = 3

#: Judge answers: usage (prompt_tokens, completion_tokens), the slow judge's delay, the summary of its verdicts.
JUDGE_USAGE = (321, 45)
JUDGE_SLOW_S = 5.0
JUDGE_SUMMARY = "The fake judge read the run and decided."

#: (prompt_tokens, completion_tokens) of the first response (the tool call) and of the final answer.
TOOL_CALL_USAGE = (42, 17)
FINAL_USAGE = (58, 9)

#: OpenAI "tools" definition of the weather tool, for clients that take raw JSON schemas.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@dataclass
class SeenRequest:
    path: str
    model: str | None
    stream: bool
    body: dict[str, Any]
    status: int
    kind: str = ""  # "tool_call", "final", "error", "bad-request", "judge"
    authorization: str | None = None  # the Authorization header sent


@dataclass
class _Reply:
    kind: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: tuple[int, int] = (0, 0)


def _tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if isinstance(m, dict) and m.get("role") == "tool"]


def _tool_call(n: int, usage: tuple[int, int] = TOOL_CALL_USAGE) -> _Reply:
    """The n-th call (from 1) of the weather tool in a conversation."""
    return _Reply(kind="tool_call", tool_calls=[{
        "id": TOOL_CALL_ID if n == 1 else f"{TOOL_CALL_ID}_{n}", "type": "function",
        "function": {"name": TOOL_NAME, "arguments": json.dumps(TOOL_ARGUMENTS)}}],
        finish_reason="tool_calls", usage=usage)


def _final(text: str = FINAL_ANSWER) -> _Reply:
    return _Reply(kind="final", content=text, finish_reason="stop", usage=FINAL_USAGE)


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _default(body: dict[str, Any], results: list[dict[str, Any]]) -> _Reply:
    return _final() if results or not body.get("tools") else _tool_call(1)


def _retry(body: dict[str, Any], results: list[dict[str, Any]]) -> _Reply:
    if not results:
        return _tool_call(1)
    latest = _content_text(results[-1]).lower()
    if len(results) < MAX_RETRIES and ("error" in latest or "retry" in latest):
        return _tool_call(len(results) + 1)
    return _final()


#: Scripted agent turns, selected by a model name ending in ``+<script>``: (request body, tool results so far) ->
#: reply.
SCRIPTS = {
    "answer": lambda body, results: _final(),
    "refuse": lambda body, results: _final(REFUSAL),
    "loop": lambda body, results: _tool_call(len(results) + 1),
    "retry": _retry,
}


def decide(body: dict[str, Any]) -> _Reply | None:
    """The scripted reply for one chat-completions request body; ``None`` means "fail with HTTP 500"."""
    model = str(body.get("model") or "")
    if "error" in model:
        return None
    results = _tool_results(body.get("messages") or [])
    script = SCRIPTS.get(model.rsplit("+", 1)[1], _default) if "+" in model else _default
    return script(body, results)


def judge_reply(body: dict[str, Any]) -> tuple[int, str | None]:
    """A judge model's (HTTP status, message content); see the module docstring. The verdicts quote the first tool
    call of the run digest the judge was sent (its span id) and answer every success criterion."""
    mode = str(body.get("model") or "").removeprefix("judge-")
    if mode == "noschema":
        if body.get("response_format"):
            return 400, json.dumps({"error": {"message": "response_format is not supported by this model",
                                              "type": "invalid_request_error", "param": "response_format"}})
        mode = "failed"
    if mode == "slow":
        time.sleep(JUDGE_SLOW_S)
        mode = "failed"
    if mode == "garbage":
        return 200, "I think the run failed, but I cannot say more."
    if mode == "badschema":
        return 200, json.dumps({"verdict": "maybe", "summary": ""})
    digest = _judge_digest(body)
    tools = digest.get("tool_calls") or [{}]
    verdict = "passed" if mode == "passed" else "failed"
    return 200, json.dumps({
        "verdict": verdict, "category": "none" if verdict == "passed" else "wrong_output",
        "summary": JUDGE_SUMMARY,
        "evidence": [{"span_id": tools[0].get("span_id") or "", "quote": str(tools[0].get("result") or "-")}],
        "criteria": [{"text": c.get("text", ""), "passed": verdict == "passed", "detail": f"judged {verdict}"}
                     for c in digest.get("success_criteria") or [] if c.get("kind") == "judged"]})


def _judge_digest(body: dict[str, Any]) -> dict[str, Any]:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            try:
                found = json.loads(_content_text(m))
            except ValueError:
                return {}
            return found if isinstance(found, dict) else {}
    return {}


def _usage(usage: tuple[int, int]) -> dict[str, Any]:
    prompt, completion = usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


class FakeLLM(LocalHTTPServer):
    """The fake server. ``with FakeLLM() as llm: llm.base_url`` -> ``http://127.0.0.1:<port>/v1``."""

    thread_name = "fake-llm"

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self._lock = threading.Lock()
        self._counter = 0

    # -- lifecycle --------------------------------------------------------------------------------------

    def _handler_class(self) -> type[_Handler]:
        return _Handler

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, including ``/v1``."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- bookkeeping ------------------------------------------------------------------------------------

    def _record(self, seen: SeenRequest) -> None:
        with self._lock:
            self.requests.append(seen)

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            return f"chatcmpl-fake{self._counter:04d}"

    def seen(self, *, model: str | None = None) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if model is None or r.model == model]


class _Handler(QuietHandler):
    fake: FakeLLM
    protocol_version = "HTTP/1.1"

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        # Retry-After: 0 on a 5xx keeps clients from waiting out a retry delay; they still retry as configured.
        self.send_json(status, payload, {"Retry-After": "0"} if status >= 500 else None)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": []})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self.fake._record(SeenRequest(path, None, False, {}, 400, "bad-request"))
            self._send_json(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        if path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self.fake._record(SeenRequest(path, body.get("model"), False, body, 404, "bad-request"))
            self._send_json(404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}})
            return
        model = str(body.get("model") or "")
        stream = bool(body.get("stream"))
        if model.startswith("judge-") and "error" not in model:
            self._judge(path, model, body)
            return
        reply = decide(body)
        if reply is None:
            self.fake._record(SeenRequest(path, model, stream, body, ERROR_STATUS, "error"))
            self._send_json(ERROR_STATUS, {"error": {"message": ERROR_MESSAGE, "type": "server_error",
                                                     "param": None, "code": "fake_overloaded"}})
            return
        self.fake._record(SeenRequest(path, model, stream, body, 200, reply.kind))
        completion_id = self.fake._next_id()
        created = int(time.time())
        if stream:
            self._stream(completion_id, created, model, reply, body)
        else:
            message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
            if reply.tool_calls:
                message["tool_calls"] = reply.tool_calls
            self._send_json(200, {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": reply.finish_reason}],
                "usage": _usage(reply.usage),
            })

    def _judge(self, path: str, model: str, body: dict[str, Any]) -> None:
        status, content = judge_reply(body)
        self.fake._record(SeenRequest(path, model, False, body, status, "judge", self.headers.get("Authorization")))
        if status != 200:
            self._send_json(status, json.loads(content or "{}"))
            return
        self._send_json(200, {
            "id": self.fake._next_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": _usage(JUDGE_USAGE)})

    def _stream(self, completion_id: str, created: int, model: str, reply: _Reply, body: dict[str, Any]) -> None:
        def chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None,
                  choices: bool = True) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if usage is not None or not choices:
                payload["usage"] = usage
            return b"data: " + json.dumps(payload).encode() + b"\n\n"

        events = [chunk({"role": "assistant", "content": "" if reply.content is not None else None,
                         "refusal": None})]
        if reply.content is not None:
            words = reply.content.split(" ")
            for i, word in enumerate(words):
                events.append(chunk({"content": word + (" " if i < len(words) - 1 else "")}))
        for index, call in enumerate(reply.tool_calls):
            args = call["function"]["arguments"]
            half = len(args) // 2
            events.append(chunk({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                  "function": {"name": call["function"]["name"],
                                                               "arguments": ""}}]}))
            events.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": args[:half]}}]}))
            events.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": args[half:]}}]}))
        events.append(chunk({}, finish=reply.finish_reason))
        # OpenAI sends the usage chunk (empty choices) only with stream_options.include_usage; so does this.
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(chunk({}, usage=_usage(reply.usage), choices=False))
        events.append(b"data: [DONE]\n\n")

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for event in events:
            self.wfile.write(event)
            self.wfile.flush()
