"""A local OpenAI-compatible chat model that answers a coding agent with a given fix — a fake of a paid, remote
model service, for the fix stage's tests. The coding agent itself (``aider``, see ``tests/coding_agent.py``) is the
real CLI from PyPI; only the model behind it is scripted.

:class:`FakeCoder` serves ``POST /v1/chat/completions`` (plain JSON, and server-sent events for ``stream: true``)
on ``127.0.0.1`` at a free port, from a thread. Given ``edits`` — ``{file path: (search text, replacement)}`` —
the first answer of a conversation is those edits in aider's *diff* edit format, the SEARCH/REPLACE blocks that
aider parses (``aider/coders/editblock_coder.py``, ``find_original_update_blocks``) and applies (the SEARCH part
must match whole lines of the file exactly)::

    path/to/file.py
    ```
    <<<<<<< SEARCH
    the exact lines to find
    =======
    the lines that replace them
    >>>>>>> REPLACE
    ```

Aider, working in a git repository, first adds the files an answer names to the chat and says so ("I added these
files to the chat: …"); that turn gets the edits again. Any other request whose conversation already holds the
answer (aider reports a failed match, or asks to fix lint errors) gets a short answer with no edit, so the agent
stops. Every request body is kept in :attr:`FakeCoder.requests`; every answer
reports usage :data:`USAGE` (prompt, completion tokens).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from local_http import LocalHTTPServer, QuietHandler

#: (prompt_tokens, completion_tokens) every answer reports.
USAGE = (1200, 80)
DONE_TEXT = "The change above is complete; nothing more to edit."
#: How aider's reply starts when it added files the answer mentioned to the chat (``aider/prompts.py``,
#: ``added_files``).
ADDED_FILES = "I added these files to the chat"
FENCE = "```"


def edit_blocks(edits: dict[str, tuple[str, str]]) -> str:
    """``edits`` as aider SEARCH/REPLACE blocks (one per file; each part ends with a newline, as aider's
    whole-line matching needs)."""
    parts = ["Here is the fix."]
    for path, (search, replacement) in edits.items():
        search = search if search.endswith("\n") else search + "\n"
        replacement = replacement if replacement.endswith("\n") or not replacement else replacement + "\n"
        parts.append(f"{path}\n{FENCE}\n<<<<<<< SEARCH\n{search}=======\n{replacement}>>>>>>> REPLACE\n{FENCE}")
    return "\n\n".join(parts) + "\n"


class FakeCoder(LocalHTTPServer):
    """The fake model server; see the module docstring. ``base_url`` is the OpenAI API base (``…/v1``)."""

    thread_name = "fake-coder"

    def __init__(self, edits: dict[str, tuple[str, str]]) -> None:
        self.edits = dict(edits)
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _handler_class(self) -> type[_Handler]:
        return _Handler

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, body: dict[str, Any]) -> str:
        """The text answer to a chat request: the edits for a conversation's first turn, else :data:`DONE_TEXT`."""
        with self._lock:
            self.requests.append(body)
        edits = edit_blocks(self.edits)
        messages = body.get("messages") or []
        # Aider's prompt carries example exchanges (assistant messages with SEARCH/REPLACE blocks of their own), so
        # "already answered" means: our own answer is in the conversation — unless aider came back to say it added
        # the files the answer named to the chat (it does so, in a git repository, before applying any edit; the
        # model is expected to send the edits again).
        answered = any(m.get("role") == "assistant" and _text(m).strip() == edits.strip() for m in messages)
        users = [_text(m) for m in messages if m.get("role") == "user"]
        if users and users[-1].startswith(ADDED_FILES):
            answered = False
        return DONE_TEXT if answered else edits


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


class _Handler(QuietHandler):
    fake: FakeCoder

    def do_GET(self) -> None:  # noqa: N802 - model listing some clients ask for
        if self.path.rstrip("/").endswith("/models"):
            self.send_json(200, {"object": "list", "data": [{"id": "fake-coder", "object": "model"}]})
        else:
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self.send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        text = self.fake.answer(body)
        model, created, cid = body.get("model", "fake-coder"), int(time.time()), f"chatcmpl-{time.time_ns()}"
        usage = {"prompt_tokens": USAGE[0], "completion_tokens": USAGE[1], "total_tokens": sum(USAGE)}
        if not body.get("stream"):
            self.send_json(200, {"id": cid, "object": "chat.completion", "created": created, "model": model,
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": usage})
            return

        def event(delta: dict[str, Any], finish: str | None = None, with_usage: bool = False) -> bytes:
            chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if with_usage:
                chunk["usage"] = usage
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        lines = text.splitlines(keepends=True)
        self.wfile.write(event({"role": "assistant", "content": ""}))
        for line in lines:
            self.wfile.write(event({"content": line}))
        self.wfile.write(event({}, "stop", with_usage=True))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
