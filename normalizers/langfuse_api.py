"""Langfuse traces as its public REST API returns them (``GET /api/public/traces/{traceId}``: a trace with its
``observations``) and as trace exports hold them -> canonical spans. Pure; the HTTP client is
``pipeline.sources.langfuse``.

Each observation becomes a span carrying Langfuse's own OpenTelemetry attribute names (``langfuse.observation.*``,
``langfuse.trace.*``), so the Langfuse dialect reader builds the agent-run view exactly as for a Langfuse-instrumented
app exporting OTLP: ``GENERATION`` → an LLM call (model, ``usageDetails`` / ``usage`` tokens, input / output
messages), ``TOOL`` → a tool call, ``SPAN`` / ``AGENT`` / ``CHAIN`` / … → spans, ``EVENT`` → a zero-length span;
``level: ERROR`` → span status ``ERROR`` with ``statusMessage`` (and a run error). The trace itself becomes the
root span (name, input, output, session, user, tags, release); observations without a parent hang under it.

Ids: Langfuse trace ids of OpenTelemetry-based SDKs are 32 hex and observation ids 16 hex and are kept; other ids
are hashed deterministically (``normalizers.foreign``) and kept in ``trace_source.source.*`` attributes.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from normalizers.canonical import CanonicalSpan, Scope
from normalizers.foreign import (ATTR_SOURCE_SPAN_ID, ATTR_SOURCE_TRACE_ID, ForeignValueError, is_native_span_id,
                                 is_native_trace_id, span_id_of, time_ns, trace_id_of)

SCOPE = Scope(name="langfuse-sdk", version="api")


class LangfuseShapeError(ValueError):
    """A Langfuse object without what a trace or observation must have (an id, a valid time)."""


def _json_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                                           default=str)


def is_langfuse_trace(doc: Any) -> bool:
    """A trace object as the API returns it: an ``id`` and a ``timestamp``, with ``observations`` (a list)."""
    return isinstance(doc, dict) and "id" in doc and "timestamp" in doc and isinstance(doc.get("observations"), list)


def _usage(o: Mapping[str, Any]) -> dict[str, Any] | None:
    details = o.get("usageDetails")
    if isinstance(details, dict) and details:
        return details
    usage = o.get("usage")
    if isinstance(usage, dict):
        return {k: usage[k] for k in ("input", "output", "total") if isinstance(usage.get(k), (int, float))} or None
    return None


def spans_from_langfuse_trace(trace: Mapping[str, Any], observations: list[Mapping[str, Any]] | None = None,
                              ) -> list[CanonicalSpan]:
    """The canonical spans of one Langfuse trace: its root and one span per observation. ``observations``:
    full observation objects (default: ``trace["observations"]`` when those are objects, not ids). Raises
    :class:`LangfuseShapeError`."""
    raw_id = trace.get("id")
    try:
        trace_id = trace_id_of(raw_id, namespace="langfuse-trace")
        started = time_ns(trace.get("timestamp"), "trace timestamp")
    except ForeignValueError as exc:
        raise LangfuseShapeError(f"Langfuse trace {raw_id!r}: {exc}") from None
    if observations is None:
        observations = [o for o in trace.get("observations") or () if isinstance(o, dict)]
    resource: dict[str, Any] = {"service.name": "langfuse"}
    if trace.get("release"):
        resource["service.version"] = str(trace["release"])
    if trace.get("environment"):
        resource["deployment.environment.name"] = str(trace["environment"])
    root_id = span_id_of(str(raw_id), namespace="langfuse-trace-root")
    ids = {}
    for o in observations:
        try:
            ids[str(o.get("id"))] = span_id_of(o.get("id"), namespace="langfuse-observation")
        except ForeignValueError as exc:
            raise LangfuseShapeError(f"an observation of Langfuse trace {raw_id!r}: {exc}") from None
    spans: list[CanonicalSpan] = []
    for o in observations:
        oid = str(o.get("id"))
        where = f"observation {oid} of Langfuse trace {raw_id}"
        try:
            start = time_ns(o.get("startTime"), f"{where}: startTime") or started
            end = time_ns(o.get("endTime"), f"{where}: endTime")
        except ForeignValueError as exc:
            raise LangfuseShapeError(str(exc)) from None
        obs_type = str(o.get("type") or "SPAN").lower()
        if obs_type == "event" and not end:
            end = start
        attrs: dict[str, Any] = {"langfuse.observation.type": obs_type}
        for key, attr in (("input", "langfuse.observation.input"), ("output", "langfuse.observation.output")):
            if o.get(key) is not None:
                attrs[attr] = _json_text(o[key])
        if o.get("model"):
            attrs["langfuse.observation.model.name"] = str(o["model"])
        if isinstance(o.get("modelParameters"), dict) and o["modelParameters"]:
            attrs["langfuse.observation.model.parameters"] = _json_text(o["modelParameters"])
        if (usage := _usage(o)) is not None:
            attrs["langfuse.observation.usage_details"] = _json_text(usage)
        if isinstance(o.get("costDetails"), dict) and o["costDetails"]:
            attrs["langfuse.observation.cost_details"] = _json_text(o["costDetails"])
        level = str(o.get("level") or "DEFAULT").upper()
        attrs["langfuse.observation.level"] = level
        if o.get("statusMessage"):
            attrs["langfuse.observation.status_message"] = str(o["statusMessage"])
        if isinstance(o.get("metadata"), dict) and o["metadata"]:
            attrs["langfuse.observation.metadata"] = _json_text(o["metadata"])
        if not is_native_span_id(o.get("id")):
            attrs[ATTR_SOURCE_SPAN_ID] = oid
        parent = o.get("parentObservationId")
        spans.append(CanonicalSpan(
            trace_id=trace_id, span_id=ids[oid], parent_span_id=ids.get(str(parent), root_id) if parent else root_id,
            name=str(o.get("name") or obs_type), kind="CLIENT" if obs_type == "generation" else "INTERNAL",
            start_time_unix_nano=start, end_time_unix_nano=end,
            status_code="ERROR" if level == "ERROR" else "UNSET",
            status_message=str(o.get("statusMessage") or "") if level == "ERROR" else "",
            attributes=attrs, resource=resource, scope=SCOPE))
    root_attrs: dict[str, Any] = {"langfuse.observation.type": "span"}
    if trace.get("name"):
        root_attrs["langfuse.trace.name"] = str(trace["name"])
    for key, attr in (("input", "langfuse.trace.input"), ("output", "langfuse.trace.output")):
        if trace.get(key) is not None:
            root_attrs[attr] = _json_text(trace[key])
    for key, attr in (("sessionId", "langfuse.session.id"), ("userId", "langfuse.user.id"),
                      ("release", "langfuse.release"), ("version", "langfuse.version")):
        if trace.get(key):
            root_attrs[attr] = str(trace[key])
    if isinstance(trace.get("tags"), list) and trace["tags"]:
        root_attrs["langfuse.trace.tags"] = [str(t) for t in trace["tags"]]
    if isinstance(trace.get("metadata"), dict) and trace["metadata"]:
        root_attrs["langfuse.trace.metadata"] = _json_text(trace["metadata"])
    if not is_native_trace_id(raw_id):
        root_attrs[ATTR_SOURCE_TRACE_ID] = str(raw_id)
    end = max((s.end_time_unix_nano for s in spans), default=0)
    if isinstance(trace.get("latency"), (int, float)) and trace["latency"] > 0:
        end = max(end, started + int(trace["latency"] * 1e9))
    first = min([started] + [s.start_time_unix_nano for s in spans if s.start_time_unix_nano])
    root = CanonicalSpan(trace_id=trace_id, span_id=root_id, name=str(trace.get("name") or "trace"),
                         kind="INTERNAL", start_time_unix_nano=first, end_time_unix_nano=end or started,
                         attributes=root_attrs, resource=resource, scope=SCOPE)
    return [root, *spans]
