"""The tools of the grading corpus's agents (``tests/test_grading_corpus.py``): the weather tool of the dialect tests
plus the ways a tool misbehaves. Deterministic, no I/O; shared by every corpus agent script so each instrumentation
sees the same failures."""

from __future__ import annotations

import json

from _common import get_weather

#: What the failing-result tool returns: a JSON result that says the step failed (no exception).
FAILED_RESULT = json.dumps({"ok": False, "error": "weather service unavailable (HTTP 503)"})
UNREACHABLE = "weather service unreachable: connection refused"
TIMED_OUT = "weather service timed out"


def raising_weather(city: str) -> str:
    """The tool raises: the run cannot go on."""
    raise ConnectionError(UNREACHABLE)


def failing_result_weather(city: str) -> str:
    """The tool does not raise but its result says it failed."""
    return FAILED_RESULT


class FlakyWeather:
    """Fails its first call with ``error`` (an exception instance to raise), answers afterwards: a transient error
    that a retry recovers."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, city: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise self.error
        return get_weather(city)


__all__ = ["FAILED_RESULT", "FlakyWeather", "TIMED_OUT", "UNREACHABLE", "failing_result_weather", "raising_weather"]
