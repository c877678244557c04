"""The upload envelope: one assembled trace, as a versioned pydantic v2 model with a published JSON Schema.

An :class:`Envelope` is what the assembler produces per closed trace (topic ``trace-source.traces``, key = trace id,
header ``idempotency-key`` = :attr:`Envelope.idempotency_key`) and what every later stage reads. Field by field
documentation, the idempotency key definition and the versioning rules are in ``docs/envelope.md``; the JSON Schema
generated from these models is committed as ``normalizers/schema/envelope.v1.schema.json`` (regenerate it with
``python -m normalizers.envelope --write-schema``; a test fails when it drifts from the models).

Conventions (shared with ``normalizers.canonical``): ids are lowercase hex ``str``; times are ``int`` unix
nanoseconds; attribute maps are ``dict[str, Any]`` of JSON values. Times exceed 2**53, so JSON consumers outside
Python need an integer-preserving parser (JavaScript: a BigInt-aware ``JSON.parse``).

Pure code: no I/O except the ``--write-schema`` command-line entry point.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from normalizers.agent_run import AgentRun
from normalizers.canonical import CanonicalLogEvent, CanonicalSpan, log_event_identity

#: Value of :attr:`Envelope.schema_version`. The suffix is the major version of the envelope schema; see
#: "Versioning" in ``docs/envelope.md`` for what changes it.
SCHEMA_VERSION = "trace-source.envelope/v1"

#: The committed JSON Schema for :data:`SCHEMA_VERSION`.
SCHEMA_PATH = Path(__file__).with_name("schema") / "envelope.v1.schema.json"

#: Closing reasons of a trace, see :attr:`Completeness.closed_reason`.
ClosedReason = Literal["root-ended-and-quiet", "quiet", "max-wait", "evicted"]

_TRACE_ID = r"^[0-9a-f]{32}$"
_TRACE_ID_RE = re.compile(_TRACE_ID)
_KEY = r"^[0-9a-f]{64}$"
# "owner/name", or deeper paths for hosts with groups ("group/subgroup/name"); no scheme, host or ".git".
_REPOSITORY = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$"
_REPOSITORY_RE = re.compile(_REPOSITORY)
# https://host[:port]/owner/name(.git), ssh://git@host[:port]/owner/name.git, git@host:owner/name.git, host/owner/name;
# with a scheme the authority (with its port) ends at the first "/", without one a ":" ends the host (scp syntax).
_REPO_URL_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://(?:[^@/\s]+@)?[^/\s]+/|(?:[^@/\s]+@)?[^/:\s]+[:/])"
                          r"(?P<path>[^\s?#]+?)(?:\.git)?/?$")


class IdempotencyKeyMismatch(ValueError):
    """An envelope whose ``idempotency_key`` is not :func:`envelope_idempotency_key` of its trace id and spans
    (raised inside :class:`Envelope` validation; ``pydantic.ValidationError.errors()`` carries it as
    ``ctx["error"]``). ``given`` / ``expected``: the two keys."""

    def __init__(self, given: str, expected: str) -> None:
        super().__init__(f"idempotency_key {given!r} does not match the trace id and spans (expected {expected!r})")
        self.given = given
        self.expected = expected


def key_mismatch(exc: Exception) -> IdempotencyKeyMismatch | None:
    """The :class:`IdempotencyKeyMismatch` inside a ``pydantic.ValidationError`` of :class:`Envelope`, if that is
    what failed."""
    errors = getattr(exc, "errors", None)
    for e in (errors() if callable(errors) else ()):
        if isinstance((e.get("ctx") or {}).get("error"), IdempotencyKeyMismatch):
            return e["ctx"]["error"]
    return None


def envelope_idempotency_key(trace_id: str, spans: Iterable[CanonicalSpan],
                             log_events: Iterable[CanonicalLogEvent] = ()) -> str:
    """Envelope-level idempotency key: 64 lowercase hex characters (SHA-256), see DESIGN.md "Idempotency keys".

    The digest covers the trace id and the *set* of ``(span_id, end_time_unix_nano, status_code)`` triples, so span
    order and repeated (identical) spans do not change it, while a span that ends later, changes its status, or is
    added does. Attributes, names and status messages are deliberately left out: redaction rewrites them and must not
    change the key, and a span is not expected to change them without also changing its end time.

    Byte layout hashed (ASCII, every line terminated by ``\\n``, no other separators or padding)::

        <trace_id>\\n
        <span_id> <end_time_unix_nano> <status_code>\\n     one line per distinct triple, sorted

    * ``trace_id``: 32 lowercase hex characters.
    * ``span_id``: the span id as carried by the canonical span (16 lowercase hex characters; ``""`` if absent).
    * ``end_time_unix_nano``: base-10 integer, no sign, no leading zeros (``0`` for a span without an end time).
    * ``status_code``: the OTLP short name, ``UNSET`` / ``OK`` / ``ERROR``.
    * Sorted by span id (byte order), then end time (numerically), then status code (byte order); identical triples
      appear once.
    * A trace without spans (a run rebuilt from log events only) hashes, after the first line, one line per distinct
      log event instead, so a later version with more events gets a new key:
      ``log <span_id> <time_unix_nano> <observed_time_unix_nano> <severity_number> <event_name>\\n``, sorted the same
      way. ``log_events`` is ignored when there are spans, so keys of span traces never depend on log events.

    Example: trace ``4bf92f3577b34da6a3ce929d0e0e4736`` with one span ``00f067aa0ba902b7`` ending at
    ``1700000000000000000`` with status ``OK`` hashes the 73 bytes
    ``b"4bf92f3577b34da6a3ce929d0e0e4736\\n00f067aa0ba902b7 1700000000000000000 OK\\n"``, giving
    ``bcd67bbeb144d6a6782dbfad369bd7708243b5a20e9d868074e4e100ca99bacc``.

    Raises ``ValueError`` when ``trace_id`` is not 32 lowercase hex characters (an uppercase id would silently
    produce a second key for the same trace).
    """
    if not _TRACE_ID_RE.match(trace_id):
        raise ValueError(f"trace id must be 32 lowercase hex characters, got {trace_id!r}")
    triples = sorted({(s.span_id, s.end_time_unix_nano, s.status_code) for s in spans})
    h = hashlib.sha256(f"{trace_id}\n".encode("ascii"))
    for span_id, end, status in triples:
        h.update(f"{span_id} {end} {status}\n".encode())
    if not triples:
        for e in sorted({log_event_identity(e) for e in log_events}):
            h.update(("log %s %d %d %d %s\n" % e).encode())
    return h.hexdigest()


def repository_from(configured: str | None, resource: Mapping[str, Any]) -> str | None:
    """The envelope's ``repository`` (``"owner/name"``) from configuration, else from resource attributes, else None.

    Configuration wins: the operator names the repository per source, and a resource attribute is whatever the
    agent process was started with. Resource attributes read (OTel semantic conventions, ``vcs.*``):
    ``vcs.repository.url.full`` (``https://github.com/owner/name``, ``git@github.com:owner/name.git``; reduced to
    the path), else ``vcs.owner.name`` + ``vcs.repository.name``. A resource value that does not reduce to an
    ``owner/name`` path is ignored (returns None) rather than guessed at; a configured value is returned unchanged
    and checked by :class:`Envelope` validation.
    """
    if configured:
        return configured
    url = resource.get("vcs.repository.url.full")
    if isinstance(url, str) and (m := _REPO_URL_RE.match(url.strip())):
        path = m.group("path").strip("/")
        if _REPOSITORY_RE.match(path):
            return path
    owner, name = resource.get("vcs.owner.name"), resource.get("vcs.repository.name")
    if isinstance(owner, str) and isinstance(name, str) and _REPOSITORY_RE.match(f"{owner}/{name}"):
        return f"{owner}/{name}"
    return None


class Source(BaseModel):
    """Where the trace came from."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description=(
        "Source id: for pushed OTLP data the id the receiver mapped the exporter's bearer token to (or the "
        "configured default when authentication is off); for pulled sources the name the source is registered "
        "under."), examples=["default", "support-agent-prod"])
    kind: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description=(
        "How the trace arrived, a lowercase slug. Known kinds: otlp-http, otlp-grpc, file, langfuse, braintrust, "
        "postgres, supabase. New kinds may appear without a schema version change; consumers must not reject an "
        "unknown kind."), examples=["otlp-http", "otlp-grpc", "file", "langfuse", "postgres"])


class Completeness(BaseModel):
    """How complete the assembled trace is and why the assembler stopped waiting for more spans."""

    model_config = ConfigDict(extra="forbid")

    root_seen: bool = Field(description=(
        "True when a span without a parent (the trace's root) was received. False means the trace was closed "
        "without its root, so the agent-run view may miss the run's input, output and final status. A local root "
        "(see root_is_local) counts as the root."))
    root_is_local: bool = Field(False, description=(
        "True when the trace has no span without a parent but has a *local root*: a span whose parent is remote "
        "(OTLP span flags CONTEXT_HAS_IS_REMOTE and CONTEXT_IS_REMOTE), as when an agent runs behind an API that "
        "propagates traceparent from a caller whose spans go elsewhere. Its parent never arrives; the trace is "
        "closed and graded as complete once the local root ended."))
    closed_reason: ClosedReason = Field(description=(
        "Why the trace was closed: 'root-ended-and-quiet' (the root ended and no span arrived for the quiet "
        "period), 'quiet' (a run of log events only, e.g. a Claude Code prompt, with no root that could end: no "
        "data for the prompt quiet period), 'max-wait' (the maximum wait since the first span passed), 'evicted' "
        "(closed early to bound the assembler's memory)."))


class RedactionReport(BaseModel):
    """What redaction (``normalizers.redact``) did to this envelope's content.

    Counts are occurrences: one masked secret inside a longer string counts 1, a string value masked whole counts 1,
    each dropped attribute counts 1 (its nested values are not counted separately).
    """

    model_config = ConfigDict(extra="forbid")

    masking_applied: bool = Field(False, description=(
        "True when secret masking ran over the spans, log events and agent-run view. False means the content is "
        "as received and may contain secrets."))
    masked: dict[str, int] = Field(default_factory=dict, description=(
        "Masked occurrences per rule name (e.g. 'openai-api-key', 'bearer-token', 'secret-attribute'); rules "
        "that masked nothing are absent. Each occurrence was replaced by '[REDACTED:<rule>]'."))
    dropped_by_allow_list: int = Field(0, ge=0, description=(
        "Attributes removed because their key matched no entry of the configured allow list."))
    dropped_by_deny_list: int = Field(0, ge=0, description=(
        "Attributes removed because their key matched an entry of the configured deny list."))


class Envelope(BaseModel):
    """One assembled trace: its spans, correlated GenAI log events, and the agent-run view built from them.

    Validation (``Envelope(...)``, :meth:`from_json_bytes`) raises ``pydantic.ValidationError`` for a wrong type or
    format, an unknown field, a span of another trace, a duplicate span id, a log event of another trace, or an
    ``idempotency_key`` that is not :func:`envelope_idempotency_key` of the trace id and spans.
    """

    model_config = ConfigDict(extra="forbid", title="trace-source upload envelope")

    schema_version: Literal["trace-source.envelope/v1"] = Field(SCHEMA_VERSION, description=(
        "Envelope schema identifier; the suffix is the major version. A consumer must reject a version it does "
        "not know."))
    idempotency_key: str = Field(pattern=_KEY, description=(
        "SHA-256 (lowercase hex) over the trace id and the sorted set of (span id, end time, status code); see "
        "docs/envelope.md. Equal keys mean the same trace content, so stages skip an envelope whose key they "
        "already processed."))
    envelope_version: int = Field(1, ge=1, description=(
        "1 for the first envelope of a trace; N+1 when spans arriving after the trace was closed make the "
        "assembler emit it again. A higher version supersedes lower ones for the same trace id."))
    trace_id: str = Field(pattern=_TRACE_ID, description="The trace id, 32 lowercase hex characters.")
    source: Source
    repository: str | None = Field(None, pattern=_REPOSITORY, description=(
        "The agent's code repository as 'owner/name' (deeper paths for hosts with groups), from the source's "
        "configuration or the resource attribute vcs.repository.url.full; null when unknown."),
        examples=["acme/support-agent"])
    received_at_unix_nano: int = Field(ge=0, description=(
        "When the first span (or log event) of the trace reached trace-source, unix time in nanoseconds "
        "(for OTLP: the receiver's receive time of the earliest batch)."))
    assembled_at_unix_nano: int = Field(ge=0, description=(
        "When the assembler closed the trace and built this envelope, unix time in nanoseconds."))
    completeness: Completeness
    resource: dict[str, Any] = Field(default_factory=dict, description=(
        "Resource attributes of the process that produced the trace (those of the root span, else of the earliest "
        "span). Each span and log event also carries its own resource."))
    spans: list[CanonicalSpan] = Field(default_factory=list, description=(
        "The trace's spans in canonical form (normalizers.canonical), one per span id, ordered by start time then "
        "span id. Empty only for a trace made of log events alone."))
    log_events: list[CanonicalLogEvent] = Field(default_factory=list, description=(
        "GenAI log events correlated with the trace (same trace id, or no trace id but attributed to it by the "
        "assembler), ordered by time."))
    agent_run: AgentRun = Field(default_factory=AgentRun, description=(
        "The agent-run view derived from spans and log events by the dialect readers (normalizers.agent_run)."))
    redaction: RedactionReport = Field(default_factory=RedactionReport, description=(
        "What redaction masked and dropped before the envelope left the assembler."))

    @model_validator(mode="after")
    def _consistent(self) -> Envelope:
        seen: set[str] = set()
        for s in self.spans:
            if s.trace_id != self.trace_id:
                raise ValueError(f"span {s.span_id!r} belongs to trace {s.trace_id!r}, not {self.trace_id!r}")
            if s.span_id in seen:
                raise ValueError(f"duplicate span id {s.span_id!r}")
            seen.add(s.span_id)
        for e in self.log_events:
            if e.trace_id not in ("", self.trace_id):
                raise ValueError(f"log event belongs to trace {e.trace_id!r}, not {self.trace_id!r}")
        expected = envelope_idempotency_key(self.trace_id, self.spans, self.log_events)
        if self.idempotency_key != expected:
            raise IdempotencyKeyMismatch(self.idempotency_key, expected)
        return self

    def to_json_bytes(self) -> bytes:
        """UTF-8 JSON of the whole envelope (every field, defaults included), as published on the traces topic:
        byte for byte ``model_dump_json().encode()``, written by :func:`model_json_bytes`."""
        return model_json_bytes(self)

    @classmethod
    def from_json_bytes(cls, data: bytes | str) -> Envelope:
        """Parse and validate envelope JSON; raises ``pydantic.ValidationError`` (see the class docstring)."""
        return cls.model_validate_json(data)


def _fields(value: Any) -> dict[str, Any]:
    """orjson's ``default`` hook: a model's field values in declaration order, then its extra fields."""
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__
        return {**value.__dict__, **extra} if extra else value.__dict__
    raise TypeError(type(value).__name__)


def model_json_bytes(model: BaseModel) -> bytes:
    """``model.model_dump_json().encode()`` for the envelope's models, several times faster.

    orjson writes what pydantic's serializer writes for these models (fields in declaration order from
    ``__dict__``, extras after them, compact separators, UTF-8 unescaped, the same float formatting, NaN and
    infinities as ``null``); ``tests/test_envelope.py`` compares the two. Anything orjson does not write the same
    way raises (integers beyond 64 bits, non-string dict keys, sets, bytes, strings with lone surrogates): then
    pydantic serializes, so the result (or the error) is always pydantic's."""
    try:
        return orjson.dumps(model, default=_fields)
    except TypeError:  # orjson.JSONEncodeError included
        return model.model_dump_json().encode()


def envelope_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :class:`Envelope`, as committed in :data:`SCHEMA_PATH`."""
    schema = Envelope.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$comment": (
        f"Generated from normalizers/envelope.py for {SCHEMA_VERSION} by 'python -m normalizers.envelope "
        "--write-schema'; do not edit by hand. Field documentation: docs/envelope.md."), **schema}


def schema_file_text() -> str:
    """:func:`envelope_json_schema` serialized exactly as committed (2-space indent, trailing newline)."""
    return json.dumps(envelope_json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """``python -m normalizers.envelope --write-schema [PATH]``: (re)write the committed JSON Schema."""
    if not argv or argv[0] != "--write-schema" or len(argv) > 2:
        print("usage: python -m normalizers.envelope --write-schema [PATH]", file=sys.stderr)
        return 2
    path = Path(argv[1]) if len(argv) == 2 else SCHEMA_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_file_text(), encoding="utf-8")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
