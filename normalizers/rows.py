"""Database rows (a trace table with a child span table, as agent apps keep them in Postgres / Supabase) ->
canonical spans. Pure: the rows are plain mappings of column name -> value; the reader in
``pipeline.sources.postgres`` does the I/O.

The trace row becomes the run's root span (``trace_source.row = "trace"``); each span row becomes a span whose
parent is its parent row's span, or the root when it has none (or names a span the trace does not have). Columns
are named by a :class:`RowMapping`. A JSON attributes column keeps its keys as span attributes, so GenAI
(``gen_ai.*``), OpenInference (``openinference.span.kind``, ``llm.*``, ``input.value``) or Langfuse attributes
stored there are read by the same dialect readers as pushed OTLP. Input / output columns become OpenInference
``input.value`` / ``output.value`` (JSON text for structured values) unless the attributes already hold them; a
root holding them is marked ``openinference.span.kind: CHAIN`` (unless its attributes name a kind), so the run's
task input and final output come from the trace row.

Times: the trace row's start / end columns when mapped and set, else the earliest span start / latest span end.
A span without an end time keeps ``0`` (the envelope then shows it unfinished).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from normalizers.canonical import CanonicalSpan, Scope
from normalizers.foreign import (ATTR_SOURCE_SPAN_ID, ATTR_SOURCE_TRACE_ID, ForeignValueError, attribute_value,
                                 flatten_attributes, is_native_span_id, is_native_trace_id, span_id_of,
                                 status_code_of, time_ns, trace_id_of)

SCOPE = Scope(name="trace-source.rows")


class RowError(ValueError):
    """A row that cannot become a span (missing id, a time that is not a time); the message names the row and the
    column."""


@dataclass(frozen=True)
class RowMapping:
    """Column names (``None`` = the table has no such column). Defaults follow the seed system: trace id ``id``,
    span id ``id``, span -> trace ``trace_id``."""

    trace_id: str = "id"
    trace_name: str | None = "name"
    trace_status: str | None = "status"
    trace_start: str | None = None
    trace_end: str | None = None
    trace_input: str | None = None
    trace_output: str | None = None
    trace_attributes: str | None = None
    span_id: str = "id"
    span_trace_id: str = "trace_id"
    parent_span_id: str | None = "parent_span_id"
    span_name: str | None = "name"
    span_kind: str | None = None
    span_start: str | None = "start_time"
    span_end: str | None = "end_time"
    span_status: str | None = "status"
    span_status_message: str | None = None
    span_attributes: str | None = "attributes"
    span_input: str | None = None
    span_output: str | None = None

    def trace_columns(self) -> list[str]:
        return [c for c in (self.trace_id, self.trace_name, self.trace_status, self.trace_start, self.trace_end,
                            self.trace_input, self.trace_output, self.trace_attributes) if c]

    def span_columns(self) -> list[str]:
        return [c for c in (self.span_id, self.span_trace_id, self.parent_span_id, self.span_name, self.span_kind,
                            self.span_start, self.span_end, self.span_status, self.span_status_message,
                            self.span_attributes, self.span_input, self.span_output) if c]


_KINDS = {"internal", "server", "client", "producer", "consumer"}


def _get(row: Mapping[str, Any], column: str | None) -> Any:
    return row.get(column) if column else None


def _time(row: Mapping[str, Any], column: str | None, where: str) -> int:
    try:
        return time_ns(_get(row, column), f"{where} column {column}")
    except ForeignValueError as exc:
        raise RowError(str(exc)) from None


def _io(attrs: dict[str, Any], row: Mapping[str, Any], column: str | None, key: str) -> None:
    value = _get(row, column)
    if value is not None and key not in attrs:
        attrs[key] = attribute_value(value)


def spans_from_rows(trace_row: Mapping[str, Any], span_rows: Sequence[Mapping[str, Any]], mapping: RowMapping, *,
                    resource: Mapping[str, Any] | None = None) -> list[CanonicalSpan]:
    """The canonical spans of one trace: its root from ``trace_row``, one span per row of ``span_rows``.

    ``resource``: resource attributes given to every span (e.g. ``service.name`` of the source). Raises
    :class:`RowError` naming the row and column of the first value that cannot be read.
    """
    try:
        raw_trace_id = trace_row.get(mapping.trace_id)
        trace_id = trace_id_of(raw_trace_id)
    except ForeignValueError as exc:
        raise RowError(f"trace row: column {mapping.trace_id}: {exc}") from None
    res = dict(resource or {})
    root_id = span_id_of(f"{raw_trace_id}", namespace="trace-root")
    children: list[CanonicalSpan] = []
    by_source_id: dict[str, str] = {}
    for i, row in enumerate(span_rows):
        raw_id = row.get(mapping.span_id)
        try:
            span_id = span_id_of(raw_id)
        except ForeignValueError as exc:
            raise RowError(f"span row {i + 1} of trace {raw_trace_id}: column {mapping.span_id}: {exc}") from None
        by_source_id[str(raw_id)] = span_id
    for i, row in enumerate(span_rows):
        where = f"span row {row.get(mapping.span_id)!s} of trace {raw_trace_id}"
        attrs = flatten_attributes(_get(row, mapping.span_attributes))
        _io(attrs, row, mapping.span_input, "input.value")
        _io(attrs, row, mapping.span_output, "output.value")
        raw_id = row.get(mapping.span_id)
        if not is_native_span_id(raw_id):
            attrs.setdefault(ATTR_SOURCE_SPAN_ID, str(raw_id))
        parent_raw = _get(row, mapping.parent_span_id)
        parent = by_source_id.get(str(parent_raw), root_id) if parent_raw not in (None, "") else root_id
        kind = str(_get(row, mapping.span_kind) or "internal").lower().removeprefix("span_kind_")
        status_raw = _get(row, mapping.span_status)
        children.append(CanonicalSpan(
            trace_id=trace_id, span_id=by_source_id[str(raw_id)], parent_span_id=parent,
            name=str(_get(row, mapping.span_name) or "span"), kind=kind.upper() if kind in _KINDS else "INTERNAL",
            start_time_unix_nano=_time(row, mapping.span_start, where),
            end_time_unix_nano=_time(row, mapping.span_end, where), status_code=status_code_of(status_raw),
            status_message=str(_get(row, mapping.span_status_message) or (
                status_raw if status_code_of(status_raw) == "ERROR" and isinstance(status_raw, str) else "")),
            attributes=attrs, resource=res, scope=SCOPE))
    where = f"trace row {raw_trace_id}"
    start = _time(trace_row, mapping.trace_start, where) or min(
        (s.start_time_unix_nano for s in children if s.start_time_unix_nano), default=0)
    end = _time(trace_row, mapping.trace_end, where) or max((s.end_time_unix_nano for s in children), default=0)
    root_attrs = flatten_attributes(_get(trace_row, mapping.trace_attributes))
    _io(root_attrs, trace_row, mapping.trace_input, "input.value")
    _io(root_attrs, trace_row, mapping.trace_output, "output.value")
    if ("input.value" in root_attrs or "output.value" in root_attrs) and "openinference.span.kind" not in root_attrs:
        # The trace row is the run: said the OpenInference way (a CHAIN span with input.value / output.value),
        # so the run view takes its task input and final output from here.
        root_attrs["openinference.span.kind"] = "CHAIN"
    root_attrs["trace_source.row"] = "trace"
    if not is_native_trace_id(raw_trace_id):
        root_attrs.setdefault(ATTR_SOURCE_TRACE_ID, str(raw_trace_id))
    status_raw = _get(trace_row, mapping.trace_status)
    root = CanonicalSpan(
        trace_id=trace_id, span_id=root_id, name=str(_get(trace_row, mapping.trace_name) or "trace"),
        kind="INTERNAL", start_time_unix_nano=start, end_time_unix_nano=end, status_code=status_code_of(status_raw),
        status_message=status_raw if status_code_of(status_raw) == "ERROR" and isinstance(status_raw, str) else "",
        attributes=root_attrs, resource=res, scope=SCOPE)
    return [root, *children]
