"""Plumbing shared by the dialect readers: a per-span context (memoized JSON decoding, key-prefix index), the
per-span draft that readers fill (:class:`SpanView`), the log-event accumulator (:class:`LogFacts`) and value
coercion. Nothing here knows any dialect's keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import from_json as _from_json

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan

_MISSING = object()


def loads(text: str) -> Any:
    """``json.loads(text)``, faster: pydantic-core's JSON parser where it accepts the text, else ``json.loads`` (for
    its result or its error). Where the fast parser succeeds it gives what ``json.loads`` gives (same types, floats,
    big ints, ``NaN``/``Infinity``, last duplicate key wins); what it refuses that ``json.loads`` takes (lone
    surrogates, nesting deeper than 200) goes to ``json.loads``. ``tests/test_dialects.py`` checks the two agree."""
    try:
        return _from_json(text)
    except (ValueError, TypeError):
        return json.loads(text)


def decode_json(value: Any) -> Any:
    """A string holding a JSON object or array -> the decoded value; anything else (including malformed JSON and
    JSON scalars such as ``"42"``, which are more likely plain text) is returned unchanged."""
    if isinstance(value, str):
        s = value.lstrip()
        if s[:1] in ("{", "["):
            try:
                return loads(s)
            except ValueError:
                return value
    return value


def log_name(ev: CanonicalLogEvent) -> str:
    """A log record's event name: ``event_name`` (OTLP ≥1.5) or the ``event.name`` attribute of older SDKs.
    ``canonical`` already merges them for OTLP input; records built from other sources may carry only one."""
    return ev.event_name or to_str(ev.attributes.get("event.name")) or ""


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def present(value: Any) -> bool:
    """Whether a value carries information (``None``, ``""`` and empty containers do not)."""
    if value is None:
        return False
    t = type(value)
    if t is str or t is list or t is dict:
        return bool(value)
    if t is int or t is float or t is bool:
        return True
    return value != "" and value != [] and value != {}


def to_int(value: Any) -> int | None:
    """Token counts and similar: int, integral float or decimal string -> ``int``; anything else -> ``None``."""
    t = type(value)
    if t is int:
        return value
    if value is None or t is bool:
        return None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def to_str(value: Any) -> str | None:
    """Scalar -> ``str`` (``None``/``""`` -> ``None``); containers -> compact JSON."""
    if type(value) is str:
        return value or None
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (list, dict)):
        return compact_json(value)
    return str(value)


def str_list(value: Any) -> list[str]:
    """A string array attribute, a JSON-string array, or a single string -> ``list[str]``."""
    value = decode_json(value)
    if isinstance(value, list):
        return [s for v in value if (s := to_str(v))]
    s = to_str(value)
    return [s] if s else []


def put(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``d[key]`` unless it already holds information: readers run in precedence order, first writer wins."""
    if value is None:
        return
    t = type(value)
    if t is str or t is list or t is dict:  # present(value), inlined for the common types
        if not value:
            return
    elif not (t is int or t is float or t is bool) and not present(value):
        return
    current = d.get(key)
    if current is None or not present(current):
        d[key] = value


class SpanCtx:
    """One span's attributes with memoized JSON decoding (several readers may look at the same JSON-string key)
    and a lazily built index of dotted key prefixes for cheap "any key under ``x.y``" tests."""

    __slots__ = ("span", "attrs", "_json", "_prefixes")

    def __init__(self, span: CanonicalSpan) -> None:
        self.span = span
        self.attrs = span.attributes
        self._json: dict[str, Any] = {}
        self._prefixes: frozenset[str] | None = None

    def json(self, key: str) -> Any:
        """``decode_json(attrs[key])``, decoded once per span; ``None`` when absent."""
        v = self._json.get(key, _MISSING)
        if v is _MISSING:
            v = self._json[key] = decode_json(self.attrs.get(key))
        return v

    def first(self, *keys: str) -> Any:
        """The first of ``keys`` whose value carries information, else ``None``."""
        for k in keys:
            v = self.attrs.get(k)
            if present(v):
                return v
        return None

    def has_prefix(self, prefix: str) -> bool:
        """Whether some key starts with ``prefix + "."`` (``prefix`` is whole dotted segments, no trailing dot)."""
        if self._prefixes is None:
            self._prefixes = key_prefixes(tuple(self.attrs))
        return prefix in self._prefixes


# Spans of one kind carry the same keys: their prefix sets are remembered (bounded) by key tuple.
_PREFIX_SETS: dict[tuple[str, ...], frozenset[str]] = {}
_PREFIX_SETS_MAX = 4096


def key_prefixes(keys: tuple[str, ...]) -> frozenset[str]:
    """Every dotted prefix (whole segments, no trailing dot) of ``keys``: ``a.b.c`` -> ``a``, ``a.b``."""
    pre = _PREFIX_SETS.get(keys)
    if pre is None:
        found: set[str] = set()
        for k in keys:
            i = k.find(".")
            while i != -1:
                found.add(k[:i])
                i = k.find(".", i + 1)
        pre = frozenset(found)
        if len(_PREFIX_SETS) >= _PREFIX_SETS_MAX:
            _PREFIX_SETS.clear()
        _PREFIX_SETS[keys] = pre
    return pre


@dataclass(slots=True)
class SpanView:
    """What the readers found on one span. Fields are written first-writer-wins (:func:`put`, :meth:`set`),
    readers run in precedence order (dialect-specific keys before shared ``gen_ai.*`` keys, semconv §3 "Hazards").

    ``kind``: ``llm``, ``tool``, ``agent``, ``workflow``, ``chain``, ``task``, ``embedding``, ``retriever`` or a
    dialect-specific other kind. ``llm`` / ``tool`` map :class:`~normalizers.agent_run.LlmCall` /
    :class:`~normalizers.agent_run.ToolCall` field names to values (messages as normalized dicts).
    ``run_input`` / ``run_output``: the span's own input/output already reduced to text, used when it is the run's
    root. ``trace_input`` / ``trace_output``: explicitly trace-level values (Langfuse ``langfuse.trace.*``).
    ``aggregate_usage``: usage totals that already sum child calls (used only when no call reports tokens).
    ``errors``: dicts with :class:`~normalizers.agent_run.RunError` fields, ``source="attribute"`` ones come from
    dialect readers. ``fatal``: a dialect says an error on this span fails the run (semconv §4 "Hard failure").
    """

    span: CanonicalSpan
    dialects: list[str]
    kind: str | None = None
    llm: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=dict)
    agent_name: str | None = None
    workflow_name: str | None = None
    run_input: str | None = None
    run_output: str | None = None
    trace_input: str | None = None
    trace_output: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    aggregate_usage: dict[str, Any] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    fatal: bool = False

    def set(self, name: str, value: Any) -> None:
        """First-writer-wins assignment of a scalar field; non-string values are stringified."""
        if value is not None and present(value) and getattr(self, name) is None:
            setattr(self, name, value if isinstance(value, str) else to_str(value))

    def add_error(self, type_: Any = None, message: Any = None) -> None:
        """Record a dialect-specific error attribute (``RunError.source="attribute"``)."""
        self.errors.append({"span_id": self.span.span_id, "source": "attribute",
                            "type": to_str(type_), "message": to_str(message)})


@dataclass(slots=True)
class LogFacts:
    """What log-event readers found for the whole trace.

    ``llm``: LLM-call field dicts keyed by the span id they belong to, or by a synthetic ``"log:N"`` key for calls
    seen only in logs with no usable span (their ``span_id`` field holds whatever id the record carried).
    ``tools``: ToolCall field dicts (``span_id`` = the record's span id). ``errors``: RunError dicts.
    ``task_input`` / ``final_output`` / ``agent_name`` / ``session_id`` / ``user_id``: run-level fallbacks used
    when no span provides them. ``dialects``: dialects seen in log records, first-seen order.
    """

    llm: dict[str, dict[str, Any]] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    task_input: str | None = None
    final_output: str | None = None
    agent_name: str | None = None
    session_id: str | None = None
    user_id: str | None = None
    dialects: list[str] = field(default_factory=list)

    def set(self, name: str, value: Any) -> None:
        if present(value) and getattr(self, name) is None:
            setattr(self, name, to_str(value))

    def saw(self, dialect: str) -> None:
        if dialect not in self.dialects:
            self.dialects.append(dialect)
