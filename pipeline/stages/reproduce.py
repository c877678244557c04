"""The reproduce stage: consumer group ``trace-source-reproducer`` on ``trace-source.seeds`` (seeded traces only)
→ ``trace-source.reproductions``.

It runs the repository's own headless harness ``--attempts`` times (3 by default), each in a fresh isolated working
copy at the trace's revision (resource attribute ``vcs.ref.head.revision``) or ``--repo-ref``, with ``AGENT_TASK``,
the seed's path, only the contract's ``env`` plus ``--pass-env`` variables, a timeout that kills the process group,
and the ``OTEL_EXPORTER_OTLP_*`` variables pointing at trace-source — so each attempt's own trace is assembled and
graded by the same grader. An attempt reproduces when that grade shows the original failure's signature. Status:
``reproduced`` / ``flaky`` / ``not_reproduced`` / ``blocked`` with the reason; artifacts ``runs/<trace_id>/
manifest.json``, ``stdout.json``, ``stderr.log`` (secrets masked). Attempts survive a worker crash: the next
worker adopts a running or finished attempt instead of starting it again.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import ArtifactStore
from pipeline.bus import BusRecord
from pipeline.grading.model import FailureSignature
from pipeline.journal import open_journal
from pipeline.loop_settings import LoopSettings, config_version
from pipeline.repository import RepositoryError
from pipeline.reproducer import Reproducer
from pipeline.reproduction import classify
from pipeline.stage import EventDraft, Identity, Outcome, WorkItem, identify_record
from pipeline.stages.seed import RepoContext, blocked, load_graded_envelope, parse_json

GROUP_ID = "trace-source-reproducer"
REPRODUCTION_SCHEMA_VERSION = "trace-source.reproduction/v1"


class ReproduceStage:
    """:class:`pipeline.stage.Stage` reproducing seeded failures with the repository's harness."""

    name = "reproduce"
    phase = "reproduce"
    entry = False
    group_id = GROUP_ID
    default_concurrency = 1

    def __init__(self, settings: LoopSettings, artifacts: ArtifactStore) -> None:
        self.settings = settings
        self.artifacts = artifacts
        self.repo = RepoContext(settings)
        self.input_topic = settings.seeds_topic
        self.output_topic = settings.reproductions_topic
        # As for seeding, settings that only unblock a run (--repo, --pass-env, the OTLP endpoint) are not in the key.
        self.config_version = config_version("reproduce", 1, settings.attempts, settings.contract_dir,
                                             settings.repo_ref)
        self.journal = open_journal(settings.database_url(), settings.state_dir)

    def identify(self, record: BusRecord) -> Identity:
        return identify_record(record)

    def select(self, record: BusRecord) -> str | None:
        seed = parse_json(record, "seed result")
        return None if seed.get("status") == "seeded" else f"seed {seed.get('status')}: nothing to reproduce"

    async def start(self) -> None:
        await self.journal.start()

    async def close(self) -> None:
        await self.journal.close()

    async def work(self, item: WorkItem) -> Outcome:
        seed = parse_json(item.record, "seed result")
        trace_id = item.trace_id
        base: dict[str, Any] = {"schema_version": REPRODUCTION_SCHEMA_VERSION, "trace_id": trace_id,
                                "envelope_key": item.identity.envelope_key}
        env = await load_graded_envelope(self.artifacts, item)
        if env is None:
            return Outcome("done", None, [EventDraft("reproduce", "superseded",
                                                     reason="a newer envelope version of the trace was graded")])
        if problem := await self.repo.problem(env.repository):
            return blocked("reproduce", problem, base)
        if not self.settings.otlp_endpoint:
            return blocked("reproduce", "no OTLP endpoint for the harness: start the reproduce worker with "
                                        "--otlp-endpoint http://<trace-source receiver>:4319", base)
        contract = await self.repo.contract()
        harness = contract.harness
        assert harness is not None and self.repo.repository is not None
        repository = self.repo.repository
        try:
            commit = await asyncio.to_thread(repository.resolve, seed.get("revision"))
        except RepositoryError as exc:
            return blocked("reproduce", str(exc), base)

        async def checkout(dest: Path) -> None:
            await repository.aworking_copy(dest, commit)

        run = item.identity.run
        assert run is not None
        seed_path = (self.settings.artifact_root / seed["seed"]).resolve()
        scenario_path = (self.settings.artifact_root / seed["scenario"]).resolve()
        original = FailureSignature.model_validate(seed["signature"]) if seed.get("signature") else None
        prefix = f"{item.stage_key[:12]}-g{item.generation}"
        reproducer = Reproducer(self.journal, otlp_endpoint=self.settings.otlp_endpoint,
                                pass_env=self.settings.pass_env_names(), trace_wait_s=self.settings.trace_wait_s)
        result = await reproducer.run(
            harness=harness, checkout=checkout, work_dir=self.settings.work_root / "reproduce" / f"{trace_id}-{prefix}",
            attempts=self.settings.attempts, attempt_prefix=prefix, run_id=run.run_id, trace_id=trace_id,
            task=seed.get("task") or "", original=original,
            extra_env={"TRACE_SOURCE_SEED_PATH": str(seed_path), "TRACE_SOURCE_SCENARIO_PATH": str(scenario_path)})
        status, reason = classify(result.attempts, harness.timeout_s)
        run_dir = ArtifactStore.run_dir(trace_id)
        stdout_path = await self.artifacts.write_json(f"{run_dir}/stdout.json", result.stdout)
        stderr_path = await self.artifacts.write_text(f"{run_dir}/stderr.log", result.stderr)
        manifest = {
            **base, "status": status, "reason": reason, "phase": "reproduce",
            "command": list(harness.command), "setup": list(harness.setup) if harness.setup else None,
            "workdir": harness.workdir, "timeout_s": harness.timeout_s, "repository": repository.describe(),
            "revision": commit, "attempts_planned": self.settings.attempts,
            "original": {"category": seed.get("category"), "signature": seed.get("signature")},
            "attempts": [a.as_dict() for a in result.attempts],
            "reproduced": sum(1 for a in result.attempts if a.reproduced),
            "graded": sum(1 for a in result.attempts if a.reproduced is not None),
            "evidence": [{"attempt": a.n, "trace_id": a.trace_id, "verdict": a.verdict, "category": a.category,
                          "summary": a.summary} for a in result.attempts if a.trace_id],
            "outputs": {"stdout": stdout_path, "stderr": stderr_path},
            "seed": seed.get("seed"), "scenario": seed.get("scenario"), "signature": seed.get("signature"),
            "task": seed.get("task")}
        manifest_path = await self.artifacts.write_json(f"{run_dir}/manifest.json", manifest)
        manifest["outputs"]["manifest"] = manifest_path
        event = EventDraft("reproduce", status, reason=reason, artifacts=[manifest_path, stdout_path, stderr_path],
                           details={"attempts": len(result.attempts), "reproduced": manifest["reproduced"],
                                    "graded": manifest["graded"],
                                    "attempt_traces": [a.trace_id for a in result.attempts]})
        return Outcome("blocked" if status == "blocked" else "done", json.dumps(manifest).encode(), [event])


def build(settings: LoopSettings, artifacts: ArtifactStore) -> ReproduceStage:
    return ReproduceStage(settings, artifacts)
