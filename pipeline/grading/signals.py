"""Failure signals in single values: does this tool result say the step failed, does this error text say the LLM
provider failed or a turn/step limit was hit, is this answer a refusal? Pure functions of one value each; the rules
(:mod:`pipeline.grading.rules`) decide what the signals mean for the run. Patterns and their sources are listed in
``docs/grading.md`` ("Signals").

Every function returns the matched words (a short quote for the evidence) or ``None``.
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Longest quote kept in evidence (characters), the Evidence model's limit.
QUOTE_MAX = 500


def quote(value: Any, limit: int = QUOTE_MAX) -> str:
    """``value`` as evidence text: strings as they are, other JSON values as compact JSON; cut to ``limit``
    characters with ``…``."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
        except (TypeError, ValueError):  # circular or otherwise unserializable: never fail on odd input
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _decoded(value: Any) -> Any:
    """A string holding a JSON object -> the object (tool results are often JSON strings on the wire, semconv §2.1
    "Encoding"); one more layer when the decoded value is itself a JSON string (Vercel double-encodes)."""
    for _ in range(2):
        if not isinstance(value, str):
            break
        s = value.strip()
        if not s[:1] in ("{", '"'):
            break
        try:
            value = json.loads(s)
        except ValueError:
            break
    return value


def _words(pattern: re.Pattern[str], text: str | None) -> str | None:
    """The first match of ``pattern`` in ``text``, or ``None`` (also for no text)."""
    m = pattern.search(text) if text else None
    return m.group(0) if m else None


# -- tool results --------------------------------------------------------------------------------------------------

# Keys a structured tool result uses to say it failed. A boolean flag set to False, an error status, or a non-empty
# error field: the conventions of MCP (``isError``), Anthropic (``is_error``), and plain ``{"ok": false}`` /
# ``{"success": false}`` / ``{"status": "error"}`` / ``{"error": "..."}`` results of hand-written tools.
_FALSE_MEANS_FAILED = ("ok", "success", "succeeded", "successful")
_TRUE_MEANS_FAILED = ("isError", "is_error", "failed")
_FAILED_STATUSES = frozenset({"error", "failed", "failure", "fail", "errored"})
_ERROR_KEYS = ("error", "errors", "error_message", "errorMessage")
# Text results that open with an error word followed by punctuation ("Error: ...", "failed - ..."), a Python
# exception line ("ValueError: ..."), or a traceback. "Error rate: 0%" and "no errors found" do not match.
_FAILED_TEXT = re.compile(
    r"^\s*(?:(?:error|failed|failure|exception)\s*[:!\-]|traceback \(most recent call last\)"
    r"|[A-Za-z_][\w.]*(?:Error|Exception):)", re.IGNORECASE)


def tool_result_failure(result: Any) -> str | None:
    """The part of a tool result that says the step failed, or ``None`` when it does not say so.

    ``result``: what the tool returned (any JSON value, or a JSON string). A failure is a dict (also inside a
    ``result`` / ``output`` wrapper one level down, and Vercel's ``{"type": "error-text" | "error-json", ...}``)
    with one of: ``ok`` / ``success`` / ``succeeded`` / ``successful`` = false; ``isError`` / ``is_error`` /
    ``failed`` = true; ``status`` in error, failed, failure, fail, errored; a non-empty ``error`` / ``errors`` /
    ``error_message``; or a text that opens like an error (see ``_FAILED_TEXT``).
    """
    value = _decoded(result)
    if isinstance(value, dict):
        return _dict_failure(value) or next(
            (f for k in ("result", "output") if isinstance(inner := _decoded(value.get(k)), dict)
             and (f := _dict_failure(inner))), None)
    if isinstance(value, str) and _FAILED_TEXT.match(value):
        return quote(value)
    return None


def _dict_failure(d: dict) -> str | None:
    for key in _FALSE_MEANS_FAILED:
        if d.get(key) is False:
            return quote(d)
    for key in _TRUE_MEANS_FAILED:
        if d.get(key) is True:
            return quote(d)
    status = d.get("status")
    if isinstance(status, str) and status.strip().lower() in _FAILED_STATUSES:
        return quote(d)
    kind = d.get("type")
    if isinstance(kind, str) and kind.startswith("error-"):  # Vercel AI SDK v5+ tool-result output
        return quote(d)
    for key in _ERROR_KEYS:
        if d.get(key) not in (None, "", [], {}, False):
            return quote(d)
    return None


# -- error texts ---------------------------------------------------------------------------------------------------

# LLM provider failures: HTTP 5xx, 429 (rate limit), 401/403 (auth) as the clients word them ("Error code: 500",
# pydantic-ai "status_code: 500", "HTTP 503"), the OpenAI/Anthropic SDK exception names, the providers' own error
# words, and Claude Code's api_error / api_retries_exhausted events (semconv §2.7, §4). A 400 (bad request, context
# length) is the agent's own request and is not a provider error.
_PROVIDER = re.compile(
    r"(?:error[ _]code|status[ _]?code|status|http)\W{0,3}(?:5\d\d|429|401|403)\b"
    r"|^(?:5\d\d|429|401|403)\b"
    r"|\b(?:InternalServerError|RateLimitError|AuthenticationError|PermissionDeniedError|APIConnectionError"
    r"|APITimeoutError|ServiceUnavailableError|OverloadedError|ServerError|APIConnectionTimeoutError)\b"
    r"|\b(?:rate[ _-]?limit(?:ed)?|overloaded|server_error|insufficient_quota|invalid_api_key|incorrect api key"
    r"|service unavailable|bad gateway|gateway time-?out)\b"
    r"|\bclaude_code\.api_(?:error|retries_exhausted)\b",
    re.IGNORECASE)


def provider_failure(text: str | None) -> str | None:
    """The words of ``text`` (an LLM call's error type and message) that mark an LLM provider failure."""
    return _words(_PROVIDER, text)


# Turn / step / request limits of agent frameworks: OpenAI Agents "Max turns (N) exceeded" (MaxTurnsExceeded),
# Pydantic AI UsageLimitExceeded ("would exceed the request_limit of N"), LangGraph GraphRecursionError
# ("Recursion limit of N reached"), LangChain "Agent stopped due to iteration limit or time limit", smolagents
# "Reached max steps", and the plain wordings.
_LIMIT = re.compile(
    r"\bmax(?:imum)?[ _-]?(?:turns?|iterations?|steps?|tool[ _]calls?)\b(?:\s*\(\d+\))?\s*(?:exceeded|reached|hit)"
    r"|\b(?:turn|step|iteration|recursion|request)[ _]limit\b"
    r"|\bMaxTurnsExceeded\b|\bUsageLimitExceeded\b|\bGraphRecursionError\b"
    r"|\breached (?:the )?max(?:imum)? (?:number of )?(?:turns|steps|iterations)\b"
    r"|\btoo many (?:turns|steps|iterations|tool calls)\b",
    re.IGNORECASE)


def limit_hit(text: str | None) -> str | None:
    """The words of ``text`` (an error, or the final output) that say a turn/step/iteration limit stopped the run."""
    return _words(_LIMIT, text)


# -- answers -------------------------------------------------------------------------------------------------------

# A refusal or a give-up in the agent's own final answer: "I'm sorry, but ...", "I can't help with ...", "I am
# unable to complete ...", "I give up". The subject must be the agent (I / we) and the verb one of doing the task,
# so "you can't go wrong" or "I can't wait to see it" are not refusals.
_SUBJECT = r"\b(?:I|we)"
_NEGATION = (r"(?:\s+can(?:no|['’])t|\s+cannot|\s+can not|\s+could(?: not|n['’]t)|\s+won['’]t|\s+will not"
             r"|(?:\s+am|['’]m|\s+are|['’]re|\s+was|\s+were)\s+(?:unable|not able) to)")
_TASK_VERB = (r"\s+(?:\w+\s+){0,3}?(?:help|assist|complete|fulfil+|comply|provide|perform|finish|proceed|continue"
              r"|do (?:that|this|it))\b")
_REFUSAL = re.compile(
    _SUBJECT + _NEGATION + _TASK_VERB
    + r"|(?:\b(?:I|we)(?:['’]m|['’]re|\s+am|\s+are)?\s+|^)sorry,? but\b"
    r"|\bunable to (?:complete|finish|fulfil+) (?:the|this|your) (?:task|request)\b"
    r"|\b(?:I|we)(?: have to| must|['’]ll| will)? give up\b|\bgiving up\b",
    re.IGNORECASE)

#: Finish reasons that mean the provider refused or filtered the answer (GenAI ``content_filter``, Anthropic
#: ``refusal``, Vercel ``content-filter``; semconv §4 soft signals).
REFUSAL_FINISH_REASONS = frozenset({"content_filter", "content-filter", "refusal"})
#: Finish reasons that mean the answer was cut at the token limit.
TRUNCATED_FINISH_REASONS = frozenset({"length", "max_tokens", "max_output_tokens"})


#: A refusal opens the answer: only its first characters are searched, so a long, helpful answer with a caveat
#: further on ("... I cannot help with anything else") is not taken for one.
REFUSAL_WINDOW = 200


def refusal(text: str | None) -> str | None:
    """The words in the first :data:`REFUSAL_WINDOW` characters of an answer that refuse or give up on the task,
    or ``None``."""
    return _words(_REFUSAL, text[:REFUSAL_WINDOW] if text else text)


# Words an answer uses when it reports a failure honestly ("the weather service failed", "I couldn't reach ...").
_ADMITS_FAILURE = re.compile(
    r"\b(?:fail(?:s|ed|ure|ing)?|errors?|unable|could(?: not|n['’]t)|can(?:not|['’]t)|unavailable"
    r"|not available|sorry|unfortunately|went wrong|did not work|didn['’]t work)\b", re.IGNORECASE)


def admits_failure(text: str | None) -> str | None:
    """The words of an answer that report a failure to the user (so it does not claim success), or ``None``."""
    return _words(_ADMITS_FAILURE, text)
