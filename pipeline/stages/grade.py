"""The grade stage: consumer group ``trace-source-grader`` on ``trace-source.traces`` → ``trace-source.grades``.

The entry of the loop: it reads each envelope, launches the run (its launch metadata, :class:`RunInfo`), journals
the import and — unless the policy is ``observe`` — grades it: the deterministic rules
(:mod:`pipeline.grading.rules`), the repository's deterministic success criteria when ``--repo`` is set, and the
optional judge for what the rules cannot decide. Its one side effect is ``grades/<trace_id>/grade.json``.

Every envelope version is its own input (its own idempotency key, so its own stage key): a new version of a trace
is graded again and its grade file replaces the older one — the latest version wins.
"""

from __future__ import annotations


import structlog
from pydantic import ValidationError

from normalizers.envelope import Envelope
from pipeline.artifacts import ArtifactStore
from pipeline.bus import BusRecord
from pipeline.contract import read_scenario
from pipeline.grading.criteria import parse_criteria
from pipeline.grading.judge import apply_judge, build_judge, needs_judge, skipped_report
from pipeline.grading.rules import GRADER_VERSION, grade_envelope
from pipeline.journal import RunInfo, SourceRef, run_id_for, utc_now
from pipeline.loop_settings import LoopSettings, config_version
from pipeline.outputs import ClaimCheckError, resolve_envelope
from pipeline.policy import allows, narrower
from pipeline.stage import (
    HEADER_TRIGGER, RESOURCE_ATTEMPT, RESOURCE_ATTEMPT_ID, RESOURCE_PARENT_RUN_ID, RESOURCE_REPRODUCTION_OF,
    RESOURCE_TRIGGER, EventDraft, Identity, Outcome, PoisonInput, WorkItem, identify_record)

log = structlog.get_logger(__name__)

GROUP_ID = "trace-source-grader"

#: Envelope source kind -> run trigger.
_TRIGGERS = {"otlp-http": "otlp", "otlp-grpc": "otlp", "otlp": "otlp", "file": "import", "upload": "upload",
             "postgres": "sync", "supabase": "sync", "langfuse": "sync"}


class GradeStage:
    """:class:`pipeline.stage.Stage` grading envelopes. ``judge``: a :mod:`pipeline.grading.judge` judge or
    ``None``; ``criteria_text``: the repository's ``scenario.md`` (its success criteria are checked)."""

    name = "grade"
    phase = "grade"
    entry = True
    group_id = GROUP_ID
    default_concurrency = 8

    def __init__(self, settings: LoopSettings, artifacts: ArtifactStore, *, judge=None,
                 criteria_text: str | None = None) -> None:
        self.settings = settings
        self.artifacts = artifacts
        self.judge = judge
        self.input_topic = settings.traces_topic
        self.output_topic = settings.grades_topic
        self.criteria = parse_criteria(criteria_text) if criteria_text else None
        self.config_version = config_version(
            "grade", GRADER_VERSION, criteria_text, judge.describe() if judge is not None else None)

    def identify(self, record: BusRecord) -> Identity:
        return identify_record(record)

    def select(self, record: BusRecord) -> str | None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        close = getattr(self.judge, "close", None)
        if close is not None:
            await close()

    def launch(self, env: Envelope, item: WorkItem) -> RunInfo:
        """The run's launch metadata for an envelope that arrived without it (straight from the assembler)."""
        resource = env.resource
        trigger = item.record.header(HEADER_TRIGGER) or _TRIGGERS.get(env.source.kind, env.source.kind)
        policy = self.settings.execution_policy
        if resource.get(RESOURCE_TRIGGER) == "reproduction":
            # A reproduction's own trace: graded like any run, never seeded or reproduced itself.
            trigger, policy = "reproduction", narrower(policy, "grade")
        parent = resource.get(RESOURCE_PARENT_RUN_ID)
        return RunInfo(run_id=run_id_for(env.idempotency_key, item.generation), policy=policy,
                       source=SourceRef(id=env.source.id, kind=env.source.kind), repository=env.repository,
                       trigger=trigger, parent_run_id=parent if isinstance(parent, str) and parent else None,
                       created_at=utc_now())

    async def work(self, item: WorkItem) -> Outcome:
        rec = item.record
        try:
            # Parsed and graded on the event loop's thread: about a millisecond for a typical run, less than a
            # thread hand-off costs in CPU (a claim-checked envelope reads a file, still a small one).
            env = resolve_envelope(rec.value, rec.headers, self.settings.envelope_root)
        except (ValidationError, ValueError, ClaimCheckError) as exc:
            raise PoisonInput(f"not a valid trace-source envelope: {str(exc)[:500]}") from None
        if env.idempotency_key != item.identity.envelope_key or env.trace_id != item.trace_id:
            raise PoisonInput("the envelope's trace id / idempotency key do not match the record's key / header")
        run = item.identity.run or self.launch(env, item)
        provenance = reproduction_details(env)
        imported = EventDraft("import", "imported", details={
            "envelope_version": env.envelope_version, "spans": len(env.spans), "log_events": len(env.log_events),
            "closed_reason": env.completeness.closed_reason, "agent": env.agent_run.agent_name, **provenance})
        if not allows(run.policy, "grade"):
            return Outcome("done", None, [imported], run)

        grade = grade_envelope(env, criteria=self.criteria)
        if self.judge is not None:
            if needs_judge(grade):
                try:
                    answer: object = await self.judge.assess(env, grade)
                except Exception as exc:  # noqa: BLE001 - a grade never blocks on the judge
                    answer = exc
                grade = apply_judge(grade, answer, judge=self.judge.describe())
            else:
                grade = grade.model_copy(update={"judge": skipped_report(self.judge.describe())})
        document = grade.to_json_bytes()
        paths = [await self.artifacts.write_bytes(ArtifactStore.grade(env.trace_id), document)]
        if grade.reproduce and allows(run.policy, "seed"):
            # The seed and reproduce stages read the envelope they work on from here.
            paths.append(await self.artifacts.write_bytes(ArtifactStore.envelope(env.trace_id),
                                                          env.to_json_bytes()))
        status = grade.verdict
        graded = EventDraft("grade", status, reason=None if status == "passed" else grade.summary,
                            artifacts=paths, details={
                                "verdict": grade.verdict, "category": grade.category, "reproduce": grade.reproduce,
                                "decided_by": grade.decided_by,
                                "signature": grade.signature.model_dump() if grade.signature else None,
                                **provenance})
        return Outcome("done", document, [imported, graded], run)


def reproduction_details(env: Envelope) -> dict[str, object]:
    """For the trace of a reproduction attempt (resource attributes the reproduce stage set): which trace it
    reproduces and which attempt it is; ``{}`` for any other trace."""
    res = env.resource
    if res.get(RESOURCE_TRIGGER) != "reproduction":
        return {}
    return {"reproduction_of": res.get(RESOURCE_REPRODUCTION_OF), "attempt": res.get(RESOURCE_ATTEMPT),
            "attempt_id": res.get(RESOURCE_ATTEMPT_ID)}


def build(settings: LoopSettings, artifacts: ArtifactStore) -> GradeStage:
    """The grade stage from settings: the judge when configured, the scenario's criteria when ``repo`` is set."""
    criteria_text = None
    if settings.repo is not None:
        from pipeline.repository import Repository

        repo = Repository(settings.repo, settings.state_dir, ref=settings.repo_ref)
        criteria_text = read_scenario(repo.prepare(), settings.contract_dir)
    return GradeStage(settings, artifacts, judge=build_judge(settings), criteria_text=criteria_text)
