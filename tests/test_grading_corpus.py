"""Grading quality on real instrumentation: a labeled corpus of agent runs, graded by the rules.

Real agents with real instrumentation packages and real OTLP exporters (``tests/dialect_agents/corpus_*.py``) run
the labeled scenarios against the scriptable fake model (``tests/fake_llm.py``) and export into one
``trace-source serve`` (embedded default, ``--execution-policy grade``, rules only). ``serve`` assembles each run and
its grade stage writes ``<state_dir>/grades/<trace_id>/grade.json``; every verdict and category of those grade
documents is asserted, and each must be byte-identical to :func:`pipeline.grading.rules.grade_envelope` of the
assembled envelope (``<state_dir>/traces/<trace_id>.json``). The test prints the corpus table and the precision and
recall of ``failed``.

Instrumentations: ``otel-genai`` (``opentelemetry-instrumentation-openai-v2`` + ``opentelemetry-util-genai`` agent
and tool spans, semconv latest mode), ``pydantic-ai`` (Pydantic AI's own agent loop, tool retries, usage limits and
instrumentation) and ``openinference`` (``openinference-instrumentation-openai`` + ``OITracer`` agent/tool spans).

The ``local_root`` run is exported under a context extracted from a ``traceparent`` carrier (W3C propagator), so
its top span has a remote parent: its trace must close on quiet (not at the maximum wait, which is set far above
the quiet period here) and be graded as a complete run. The ``crashed_mid_run`` run never ends its own top span:
its trace closes at the maximum wait without a root and is graded ``inconclusive`` / ``partial_trace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from agent_process import AgentOutput, run_agent_script
from fake_llm import FakeLLM
from loop_support import phase_events, poll, wait_envelope
from normalizers.envelope import Envelope
from pipeline.grading.model import Grade
from pipeline.grading.rules import grade_envelope
from pipeline.journal import JournalEvent
from serve_proc import ServeProcess

AGENTS_DIR = Path(__file__).resolve().parent / "dialect_agents"
LANDING_TIMEOUT_S = 60
QUIET_PERIOD_S = 1
MAX_WAIT_S = 15  # far above the quiet period: a trace closed at max-wait shows in closed_reason

#: Instrumentation -> agent script.
AGENTS = {"otel-genai": "corpus_otel_genai.py", "pydantic-ai": "corpus_pydantic_ai.py",
          "openinference": "corpus_openinference.py"}
#: The scenarios every instrumentation runs (the others are run where the framework has the mechanism).
_ALL = ("otel-genai", "pydantic-ai", "openinference")
_TWO = ("otel-genai", "pydantic-ai")


@dataclass(frozen=True)
class Label:
    """The expected grade of one scenario run by one instrumentation."""

    instrumentation: str
    scenario: str
    verdict: str
    category: str
    tool: str | None = None  # the failing tool the signature must name


CORPUS = [
    *(Label(i, "success", "passed", "none") for i in _ALL),
    *(Label(i, "success_no_tools", "passed", "none") for i in _TWO),
    *(Label(i, "recovered", "passed", "none") for i in _ALL),
    Label("otel-genai", "local_root", "passed", "none"),
    *(Label(i, "tool_raised", "failed", "tool_error", "get_weather") for i in _ALL),
    *(Label(i, "false_success", "failed", "false_success", "get_weather") for i in _ALL),
    Label("otel-genai", "loop", "failed", "turn_limit", "get_weather"),
    Label("pydantic-ai", "turn_limit", "failed", "turn_limit"),
    *(Label(i, "refusal", "failed", "gave_up") for i in _ALL),
    *(Label(i, "provider_error", "failed", "provider_error") for i in _ALL),
    Label("otel-genai", "crashed_mid_run", "inconclusive", "partial_trace"),
]


@dataclass
class Graded:
    label: Label
    envelope: Envelope
    grade: Grade  # the grade stage's own document
    journal: list[JournalEvent]  # the trace's grade events in runs.jsonl


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Graded]:
    """Run every corpus agent once; wait for each scenario's envelope and the grade stage's grade of it."""
    state = tmp_path_factory.mktemp("corpus") / "state"
    env = {"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": str(QUIET_PERIOD_S),
           "TRACE_SOURCE_ASSEMBLER_MAX_WAIT_S": str(MAX_WAIT_S)}
    with FakeLLM() as fake, ServeProcess(state, "--execution-policy", "grade", env=env) as serve:
        reports = {i: run_agent_script(("python", str(AGENTS_DIR / script)), serve, fake.base_url,
                                       model=f"gpt-fake-corpus-{i}", error_model=f"gpt-fake-error-corpus-{i}",
                                       label=f"corpus {i}")
                   for i, script in AGENTS.items()}
        graded = []
        for label in CORPUS:
            envelope = landed_envelope(serve, reports[label.instrumentation], label)
            graded.append(Graded(label, envelope, *stage_grade(serve, envelope)))
    print_table(graded)
    return graded


def landed_envelope(serve: ServeProcess, report: AgentOutput, label: Label) -> Envelope:
    """The envelope of ``label``'s run once it holds every span the agent ended."""
    sc = report.scenarios[label.scenario]
    assert len(sc["trace_ids"]) == 1, f"{label}: expected one trace, got {sc['trace_ids']}"
    assert set(report.span_exports) == {"SUCCESS"}, report.span_exports
    span_ids = {s["span_id"] for s in sc["spans"]}
    return wait_envelope(serve, sc["trace_ids"][0], lambda env: span_ids <= {s.span_id for s in env.spans},
                         LANDING_TIMEOUT_S)


def stage_grade(serve: ServeProcess, envelope: Envelope) -> tuple[Grade, list[JournalEvent]]:
    """The grade stage's ``grades/<trace_id>/grade.json`` for this envelope version (its key) — checked to be what
    the rules give for the envelope, byte for byte — and the trace's grade events in the journal, once the one for
    this key is there (the stage writes the file before the runner journals it)."""
    path = serve.state_dir / "grades" / envelope.trace_id / "grade.json"

    def read() -> tuple[Grade, list[JournalEvent]] | None:
        grade = Grade.model_validate_json(path.read_bytes())
        events = phase_events(serve.state_dir, "grade", envelope.trace_id)
        if grade.envelope_key != envelope.idempotency_key or not any(
                e.envelope_key == grade.envelope_key for e in events):
            return None
        return grade, events

    grade, events = poll(read, f"grade of trace {envelope.trace_id}", serve, LANDING_TIMEOUT_S)
    assert grade.to_json_bytes() == grade_envelope(envelope).to_json_bytes()
    return grade, events


def precision_recall(graded: list[Graded]) -> tuple[float, float]:
    """Precision and recall of the ``failed`` verdict over the corpus."""
    tp = sum(1 for g in graded if g.grade.verdict == "failed" and g.label.verdict == "failed")
    predicted = sum(1 for g in graded if g.grade.verdict == "failed")
    actual = sum(1 for g in graded if g.label.verdict == "failed")
    return (tp / predicted if predicted else 1.0), (tp / actual if actual else 1.0)


def print_table(graded: list[Graded]) -> None:
    print("\nscenario          instrumentation  expected                      got")
    for g in graded:
        lab = g.label
        print(f"{lab.scenario:17} {lab.instrumentation:16} {lab.verdict + '/' + lab.category:29} "
              f"{g.grade.verdict}/{g.grade.category}")
    precision, recall = precision_recall(graded)
    print(f"failed: precision {precision:.2f}, recall {recall:.2f} over {len(graded)} runs")


def _describe(g: Graded) -> str:
    return (f"{g.label}\ngrade: {g.grade.model_dump_json(indent=1)}\n"
            f"run view: {g.envelope.agent_run.model_dump_json(indent=1)[:5000]}")


@pytest.mark.parametrize("label", CORPUS, ids=lambda lab: f"{lab.instrumentation}-{lab.scenario}")
def test_verdict_and_category(label: Label, corpus: list[Graded]) -> None:
    g = next(g for g in corpus if g.label == label)
    grade = g.grade
    assert (grade.verdict, grade.category) == (label.verdict, label.category), _describe(g)
    assert grade.envelope_key == g.envelope.idempotency_key and grade.trace_id == g.envelope.trace_id
    span_ids = {s.span_id for s in g.envelope.spans}
    if grade.verdict == "failed":
        # Every failed verdict quotes the trace: evidence on spans of this trace, and a signature.
        assert grade.evidence and all(e.span_id in span_ids for e in grade.evidence), _describe(g)
        assert grade.signature is not None and grade.signature.category == label.category, _describe(g)
        if label.tool is not None:
            assert grade.signature.tool == label.tool, _describe(g)
        assert grade.reproduce is (label.category != "provider_error")
    else:
        assert grade.signature is None and not grade.reproduce
    assert grade.summary, _describe(g)
    if label.category != "partial_trace":  # a trace without its root may miss the task
        assert grade.task and "weather in Paris" in grade.task, _describe(g)
    # The journal holds one grade event for this envelope, with the verdict.
    [event] = g.journal
    assert (event.envelope_key, event.status, event.details["category"]) == (
        grade.envelope_key, grade.verdict, grade.category)


def test_recovered_runs_saw_a_real_tool_failure(corpus: list[Graded]) -> None:
    """The recovered runs are a near miss, not an easy pass: a tool call failed on the wire and was retried."""
    for g in corpus:
        if g.label.scenario == "recovered":
            assert g.grade.details["tool_failures"] == 1 and g.grade.details["recovered_tool_failures"] == 1, \
                _describe(g)
            assert "recovered" in g.grade.summary


def test_local_root_closes_on_quiet_and_is_complete(corpus: list[Graded]) -> None:
    g = next(g for g in corpus if g.label.scenario == "local_root")
    c = g.envelope.completeness
    assert c.root_seen and c.root_is_local and c.closed_reason == "root-ended-and-quiet", c
    root = next(s for s in g.envelope.spans if s.span_id == g.grade.details["root_span_id"])
    assert root.parent_span_id and root.parent_is_remote is True
    assert g.grade.details["partial"] is False


def test_a_run_without_its_root_closes_at_max_wait_and_is_partial(corpus: list[Graded]) -> None:
    g = next(g for g in corpus if g.label.scenario == "crashed_mid_run")
    c = g.envelope.completeness
    assert not c.root_seen and c.closed_reason == "max-wait", c
    assert g.grade.details["partial"] is True and g.grade.evidence[0].name == "completeness"


def test_precision_and_recall_of_failed(corpus: list[Graded]) -> None:
    precision, recall = precision_recall(corpus)
    assert (precision, recall) == (1.0, 1.0)
