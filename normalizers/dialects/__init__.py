"""Dialect registry: which agent-telemetry dialects a span or log record speaks, and the readers that turn them
into per-span drafts (:class:`~normalizers.dialects._base.SpanView`) and trace-wide log facts
(:class:`~normalizers.dialects._base.LogFacts`) for :func:`normalizers.agent_run.build_agent_run`.

Every dialect module has ``NAME``, ``detect(span_or_event, ctx=None) -> bool``, ``span_kind(ctx)`` (the span's
:class:`~normalizers.dialects._base.SpanView` kind, or ``None`` when the dialect has no opinion) and
``extract_span(ctx, view)``;
:mod:`~normalizers.dialects.genai` and :mod:`~normalizers.dialects.claude_code` also read log records with
``extract_logs(events, views, facts)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from normalizers.canonical import CanonicalLogEvent, CanonicalSpan
from normalizers.dialects import claude_code, genai, langfuse, openinference, openllmetry, pydantic_ai, vercel
from normalizers.dialects._base import LogFacts, SpanCtx, SpanView


class Dialect(NamedTuple):
    name: str
    detect: Callable[..., bool]
    span_kind: Callable[[SpanCtx], str | None]
    extract_span: Callable[[SpanCtx, SpanView], None]


# Detection order of semconv §3, which is also the reader precedence on a span: dialect-specific keys win over
# the shared gen_ai.* keys (§3 "Hazards"), so the GenAI reader runs last on every recognized span.
SPAN_DIALECTS: tuple[Dialect, ...] = (
    Dialect(langfuse.NAME, langfuse.detect, langfuse.span_kind, langfuse.extract_span),
    Dialect(openinference.NAME, openinference.detect, openinference.span_kind, openinference.extract_span),
    Dialect(openllmetry.NAME, openllmetry.detect, openllmetry.span_kind, openllmetry.extract_span),
    Dialect(vercel.NAME, vercel.detect, vercel.span_kind, vercel.extract_span),
    Dialect(pydantic_ai.NAME, pydantic_ai.detect, pydantic_ai.span_kind, pydantic_ai.extract_span),
    Dialect(pydantic_ai.LOGFIRE_NAME, pydantic_ai.detect_logfire, pydantic_ai.span_kind, pydantic_ai.extract_span),
    Dialect(claude_code.NAME, claude_code.detect, claude_code.span_kind, claude_code.extract_span),
)
GENAI = Dialect(genai.NAME, genai.detect, genai.span_kind, genai.extract_span)
DIALECT_NAMES: tuple[str, ...] = tuple(d.name for d in SPAN_DIALECTS) + (GENAI.name,)


def detect_dialects(item: CanonicalSpan | CanonicalLogEvent) -> list[str]:
    """Names of the dialects ``item`` speaks. ``otel-genai`` is named only when nothing more specific matched
    (semconv §3 rule 8); for log records only GenAI and Claude Code apply."""
    if isinstance(item, CanonicalLogEvent):
        if claude_code.detect(item):
            return [claude_code.NAME]
        return [genai.NAME] if genai.detect(item) else []
    ctx = SpanCtx(item)
    return _span_names(item, ctx, [d for d in SPAN_DIALECTS if d.detect(item, ctx)])


def _span_names(span: CanonicalSpan, ctx: SpanCtx, matched: list[Dialect]) -> list[str]:
    return [d.name for d in matched] or ([genai.NAME] if genai.detect(span, ctx) else [])


#: What the span ``detect`` functions may read (tests/test_dialects.py checks it): the span's name, its scope's name,
#: its attribute keys, and the value of the ``operation.name`` attribute (Vercel). Spans of one kind repeat these,
#: so :func:`read_span` remembers the detection per key (bounded).
_DETECTED: dict[tuple, tuple[tuple[Dialect, ...], tuple[str, ...], tuple[Callable, ...]]] = {}
_DETECTED_MAX = 4096


def detection_key(span: CanonicalSpan) -> tuple:
    """Everything the span detectors read; equal keys, equal detection."""
    a = span.attributes
    op = a.get("operation.name")
    return type(span), span.name, span.scope.name, tuple(a), type(op), op


def _detect(span: CanonicalSpan, ctx: SpanCtx) -> tuple[tuple[Dialect, ...], tuple[str, ...], tuple[Callable, ...]]:
    """The readers of a span in precedence order (the matching span dialects, then GenAI), the dialect names to
    report, and the distinct ``extract_span`` functions to run (Pydantic AI and Logfire share one), remembered per
    :func:`detection_key`."""
    key = detection_key(span)
    try:
        hit = _DETECTED.get(key)
    except TypeError:  # an unhashable operation.name value: no memo
        key, hit = None, None
    if hit is None:
        matched = [d for d in SPAN_DIALECTS if d.detect(span, ctx)]
        readers = (*matched, GENAI)
        hit = (readers, tuple(_span_names(span, ctx, matched)),
               tuple(dict.fromkeys(d.extract_span for d in readers)))
        if key is not None:
            if len(_DETECTED) >= _DETECTED_MAX:
                _DETECTED.clear()
            _DETECTED[key] = hit
    return hit


def read_span(span: CanonicalSpan) -> SpanView | None:
    """Run the matching readers on one span, in precedence order; ``None`` for a span no dialect recognizes."""
    ctx = SpanCtx(span)
    readers, names, extractors = _detect(span, ctx)
    if not names:
        return None
    # The kind is settled before any reader runs, so a dialect that only adds keys to GenAI-typed spans (Pydantic
    # AI v3+, Langfuse on OTel spans) still knows whether it is looking at an LLM call, a tool or a run.
    kind = next((k for d in readers if (k := d.span_kind(ctx))), None)
    view = SpanView(span=span, dialects=list(names), kind=kind)
    for extract in extractors:
        extract(ctx, view)
    return view


def read_logs(events: list[CanonicalLogEvent], views: dict[str, SpanView]) -> LogFacts:
    """Route log records to the GenAI and Claude Code readers; ``views`` (span id -> view) lets them join spans.
    Records of no known dialect are ignored here (they stay in the envelope's log list)."""
    facts = LogFacts()
    by_dialect: dict[str, list[CanonicalLogEvent]] = {genai.NAME: [], claude_code.NAME: []}
    for ev in events:
        names = detect_dialects(ev)
        if names:
            by_dialect[names[0]].append(ev)
            facts.saw(names[0])
    # Stable sort: records with equal timestamps keep their arrival order.
    genai.extract_logs(sorted(by_dialect[genai.NAME], key=lambda e: e.time_unix_nano), views, facts)
    claude_code.extract_logs(by_dialect[claude_code.NAME], views, facts)
    return facts
