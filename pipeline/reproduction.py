"""Reproduction, pure: the environment a harness attempt gets, how attempts add up to a status, and keeping
secrets out of what is written down. The reproduce stage (:mod:`pipeline.stages.reproduce`) runs the attempts.

Status (issue "Reproduce graded failures"): an attempt *reproduces* when its own trace is graded ``failed`` with the
original failure's signature (:func:`pipeline.grading.signature.same_failure`) — not merely when the command exits
non-zero. ``reproduced``: every attempt with a graded trace reproduces; ``flaky``: some do; ``not_reproduced``:
none do; ``blocked``: the harness could not start or set up, timed out on every attempt (it may be waiting for
interaction), or exported no trace at all.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from normalizers.redact import Redactor
from pipeline.stage import (RESOURCE_ATTEMPT, RESOURCE_ATTEMPT_ID, RESOURCE_PARENT_RUN_ID, RESOURCE_REPRODUCTION_OF,
                            RESOURCE_TRIGGER)

#: Variables of the worker's own environment every harness gets.
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
#: Variables removed from what the harness would otherwise get, so its traces reach trace-source.
_OTLP_OVERRIDDEN = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT",
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "OTEL_SDK_DISABLED")


def _resource_value(value: str) -> str:
    # OTEL_RESOURCE_ATTRIBUTES is a W3C-baggage-like list: percent-encode what would break it.
    return re.sub(r"[,=%\s;]", lambda m: "%%%02X" % ord(m.group()), value)


def harness_env(worker_env: Mapping[str, str], contract_env: Mapping[str, str], pass_env: list[str], *,
                task: str, attempt: int, attempt_id: str, parent_run_id: str, reproduction_of: str,
                otlp_endpoint: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of one attempt: :data:`BASE_ENV` and ``pass_env`` from the worker, the contract's
    ``env`` defaults, and trace-source's own variables (docs/contract.md "harness.json")."""
    env = {k: worker_env[k] for k in BASE_ENV if k in worker_env}
    env.update(contract_env)
    env.update({k: worker_env[k] for k in pass_env if k in worker_env})
    for name in _OTLP_OVERRIDDEN:
        env.pop(name, None)
    ours = {RESOURCE_TRIGGER: "reproduction", RESOURCE_PARENT_RUN_ID: parent_run_id,
            RESOURCE_REPRODUCTION_OF: reproduction_of, RESOURCE_ATTEMPT: str(attempt),
            RESOURCE_ATTEMPT_ID: attempt_id}
    existing = [p for p in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
                if p.strip() and p.split("=", 1)[0].strip() not in ours]
    env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(existing + [f"{k}={_resource_value(v)}" for k, v in ours.items()])
    env.update({"AGENT_TASK": task, "TRACE_SOURCE_ATTEMPT": str(attempt),
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint.rstrip("/"),
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    env.update(extra or {})
    return env


class Scrubber:
    """Masks secrets in harness output before it is written: every value of a passed variable (literally), then
    the redaction rules of :mod:`normalizers.redact`."""

    def __init__(self, secret_values: list[str]) -> None:
        self.values = sorted({v for v in secret_values if len(v) >= 4}, key=len, reverse=True)
        self.redactor = Redactor()

    def text(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, "[REDACTED:pass-env]")
        return self.redactor.mask_text(text)[0]

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        return value


@dataclass
class Attempt:
    """One attempt as the manifest records it."""

    n: int
    attempt_id: str
    exit_code: int | None = None
    timed_out: bool = False
    error: str | None = None
    duration_s: float = 0.0
    adopted: bool = False
    trace_id: str | None = None
    verdict: str | None = None
    category: str | None = None
    signature: dict[str, Any] | None = None
    reproduced: bool | None = None
    summary: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def classify(attempts: list[Attempt], timeout_s: float) -> tuple[str, str | None]:
    """``(status, reason)`` of a reproduction from its attempts (see the module docstring)."""
    if not attempts:
        return "blocked", "no attempt was made"
    not_started = [a for a in attempts if a.error is not None and a.exit_code in (None, 126, 127)]
    if len(not_started) == len(attempts):
        return "blocked", f"the harness could not start: {attempts[0].error}"
    if all(a.timed_out for a in attempts):
        return "blocked", (f"the harness timed out on every attempt ({timeout_s:g} s): it must read AGENT_TASK, "
                           "run without prompts or UI, print its answer and exit")
    graded = [a for a in attempts if a.reproduced is not None]
    if not graded:
        return "blocked", ("no attempt's trace reached trace-source: the harness must export OTLP with the "
                           "OTEL_EXPORTER_OTLP_* variables it is given (and flush before it exits)")
    hits = sum(1 for a in graded if a.reproduced)
    if hits == len(graded):
        return "reproduced", None
    if hits:
        return "flaky", f"{hits} of {len(graded)} attempts showed the original failure"
    return "not_reproduced", f"none of {len(graded)} attempts showed the original failure"
