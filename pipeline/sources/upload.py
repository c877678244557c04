"""The client side of ``POST /v1/envelopes`` (``import --upload``, ``sync --upload``): one request per envelope
with ``Idempotency-Key: <envelope key>`` and the bearer token, retried with exponential backoff on 429 / 503 and
connection errors, honouring ``Retry-After`` (seconds or an HTTP date, RFC 9110 §10.2.3).

Failures are raised as :class:`UploadError` whose ``kind`` names the class the seed system reports: ``missing
auth`` (the receiver wants a token and none was given), ``receiver auth failure`` (the token was refused),
``upload rejected`` (the receiver's schema validation refused the envelope), ``bad idempotency key``,
``receiver unavailable`` (retries exhausted, or the receiver cannot be reached).
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from datetime import datetime, timezone

import aiohttp

from normalizers.envelope import Envelope

PATH = "/v1/envelopes"


class UploadError(Exception):
    """An upload that failed for good; ``kind`` is the failure class (see the module docstring)."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status


@dataclass(frozen=True)
class Uploaded:
    """The receiver's answer: ``created`` false when the key was accepted before (``result`` is then the original
    one)."""

    created: bool
    result: dict


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class UploadClient:
    """Uploads envelopes to ``endpoint`` (the receiver's base URL, e.g. ``http://localhost:4319``; a URL ending in
    ``/v1/envelopes`` is used as it is). ``token``: the bearer token (``None`` = send none). ``max_attempts``:
    tries per envelope on 429 / 503 / connection errors; backoff starts at ``backoff_s`` and doubles up to
    ``max_backoff_s`` (with jitter), unless ``Retry-After`` says otherwise (capped at ``max_backoff_s`` × 4)."""

    def __init__(self, endpoint: str, token: str | None, *, max_attempts: int = 8, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, timeout_s: float = 60.0) -> None:
        endpoint = endpoint.rstrip("/")
        self.url = endpoint if endpoint.endswith(PATH) else endpoint + PATH
        self.token = token
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> UploadClient:
        self._session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def upload(self, envelope: Envelope, *, body: bytes | None = None) -> Uploaded:
        """Upload one envelope (``body``: its JSON, default ``envelope.to_json_bytes()``). Raises
        :class:`UploadError`."""
        assert self._session is not None, "use `async with UploadClient(...)`"
        headers = {"Content-Type": "application/json", "Idempotency-Key": envelope.idempotency_key}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = body if body is not None else envelope.to_json_bytes()
        delay = self.backoff_s
        for attempt in range(1, self.max_attempts + 1):
            wait: float | None = None
            try:
                async with self._session.post(self.url, data=data, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status in (200, 201):
                        return Uploaded(created=resp.status == 201, result=_json(text))
                    if resp.status in (429, 502, 503, 504):
                        wait = retry_after_s(resp.headers.get("Retry-After"))
                        problem = f"HTTP {resp.status}: {_message(text)}"
                    else:
                        raise self._failure(resp.status, text)
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                problem = f"cannot reach {self.url}: {exc or type(exc).__name__}"
            if attempt == self.max_attempts:
                raise UploadError("receiver unavailable", f"{problem} (gave up after {attempt} attempts)")
            pause = min(wait, self.max_backoff_s * 4) if wait is not None else delay * (0.5 + random.random() / 2)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")

    def _failure(self, status: int, text: str) -> UploadError:
        doc = _json(text)
        message = _message(text)
        if status == 401:
            if not self.token:
                return UploadError("missing auth", f"the receiver at {self.url} requires a bearer token and none "
                                   "was given (--token-env names the variable that holds it)", status)
            return UploadError("receiver auth failure", f"the receiver at {self.url} refused the token: {message}",
                               status)
        if status == 403:
            return UploadError("receiver auth failure", message, status)
        kind = doc.get("error") if isinstance(doc, dict) else None
        if status == 400 and kind == "bad idempotency key":
            return UploadError("bad idempotency key", message, status)
        if status in (400, 413, 415, 422):
            return UploadError("upload rejected", f"HTTP {status}: {message}", status)
        if status == 404:
            return UploadError("upload rejected", f"{self.url} answered 404: not a trace-source receiver with "
                               "envelope uploads (check --endpoint)", status)
        return UploadError("upload rejected", f"HTTP {status}: {message}", status)


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _message(text: str) -> str:
    doc = _json(text)
    if isinstance(doc, dict) and doc.get("message"):
        return str(doc["message"])
    return text.strip()[:500] or "(empty body)"
