"""The seed stage: consumer group ``trace-source-seeder`` on ``trace-source.grades`` (grades with ``reproduce:
true`` only) → ``trace-source.seeds``.

It builds what a reproduction needs from the failed trace and the repository's contract
(``docs/contract.md``): ``seeds/<trace_id>/scenario.md`` (the standing scenario specialised with this run) and
``seeds/<trace_id>/seed.json`` (the seed templates filled from the trace, and the recorded tool calls for replay).
When the trace lacks something the scenario or a template needs, it guesses nothing: the run ends *blocked:
missing evidence* and ``seed.json`` lists each missing item with how to capture it. No repository contract (or an
invalid one) also ends the run blocked, with the exact problem.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from pydantic import ValidationError

from normalizers.envelope import Envelope
from pipeline.artifacts import ArtifactStore
from pipeline.bus import BusRecord
from pipeline.contract import Contract, load_contract
from pipeline.loop_settings import LoopSettings, config_version
from pipeline.repository import Repository, RepositoryError
from pipeline.seeding import build_seed
from pipeline.stage import EventDraft, Identity, Outcome, PoisonInput, TransientError, WorkItem, identify_record

GROUP_ID = "trace-source-seeder"
SEED_SCHEMA_VERSION = "trace-source.seed/v1"


def parse_json(record: BusRecord, what: str) -> dict[str, Any]:
    """The record's JSON object value. Raises :class:`PoisonInput`."""
    try:
        doc = json.loads(record.value)
    except ValueError as exc:
        raise PoisonInput(f"the {what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PoisonInput(f"the {what} is not a JSON object")
    return doc


def blocked(phase: str, reason: str, document: dict[str, Any] | None, artifacts: list[str] | None = None,
            **details: Any) -> Outcome:
    """An outcome that stops the run at ``phase`` with ``reason`` (published so later stages and views see it)."""
    doc = None if document is None else json.dumps({**document, "status": "blocked", "reason": reason}).encode()
    return Outcome("blocked", doc, [EventDraft(phase, "blocked", reason=reason, artifacts=artifacts or [],
                                               details=details)])


async def load_graded_envelope(artifacts: ArtifactStore, item: WorkItem) -> Envelope | None:
    """The graded envelope the grade stage kept for ``item``'s trace (``grades/<trace_id>/envelope.json``);
    ``None`` when a newer version of the trace replaced it (the latest version wins). Raises
    :class:`TransientError` while it is not in the store (a shared volume may lag), :class:`PoisonInput` when it is
    not an envelope."""
    relpath = ArtifactStore.envelope(item.trace_id)
    try:
        data = await artifacts.read_bytes(relpath)
    except FileNotFoundError:
        raise TransientError(f"{relpath} is not in the artifact store (yet)") from None
    try:
        env = Envelope.from_json_bytes(data)
    except ValidationError as exc:
        raise PoisonInput(f"{relpath} is not a valid envelope: {exc}") from None
    return env if env.idempotency_key == item.identity.envelope_key else None


class RepoContext:
    """The repository and its contract, as the seed, reproduce and fix stages check them for a trace."""

    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        self.repository = (Repository(settings.repo, settings.state_dir, ref=settings.repo_ref)
                           if settings.repo else None)
        self._prepared = False

    async def contract(self) -> Contract:
        """The contract, re-read for every trace (a fixed contract is picked up by ``reprocess``). Raises
        :class:`RepositoryError` when the repository is unusable."""
        assert self.repository is not None
        if not self._prepared:
            await asyncio.to_thread(self.repository.prepare)
            self._prepared = True
        return await asyncio.to_thread(load_contract, self.repository.path, self.settings.contract_dir)

    async def problem(self, env_repository: str | None) -> str | None:
        """Why this repository cannot serve a trace of ``env_repository`` (``None`` when it can)."""
        if self.repository is None:
            return ("no repository contract: start the worker (or serve) with --repo PATH|URL, the agent's "
                    "repository holding trace-source/harness.json and scenario.md")
        try:
            contract = await self.contract()
        except RepositoryError as exc:
            return f"repository unusable: {exc}"
        if not contract.ok:
            return "repository contract invalid: " + "; ".join(str(p) for p in contract.fatal())
        ours = self.settings.repository or await asyncio.to_thread(self.repository.identity)
        if env_repository and ours and env_repository.lower() != ours.lower():
            return (f"the trace comes from repository {env_repository}, but --repo is {ours}: run a worker with "
                    "that repository, or set --repository when the remote name is misleading")
        return None


class SeedStage:
    """:class:`pipeline.stage.Stage` seeding reproducible failures."""

    name = "seed"
    phase = "seed"
    entry = False
    group_id = GROUP_ID
    default_concurrency = 4

    def __init__(self, settings: LoopSettings, artifacts: ArtifactStore) -> None:
        self.settings = settings
        self.artifacts = artifacts
        self.repo = RepoContext(settings)
        self.input_topic = settings.grades_topic
        self.output_topic = settings.seeds_topic
        # Where the repository is (--repo) is not part of the key: a run blocked for want of a repository must be
        # re-run under the same key by `reprocess` once one is configured. The contract's content is read anew on
        # every run.
        self.config_version = config_version("seed", 1, settings.contract_dir)

    def identify(self, record: BusRecord) -> Identity:
        return identify_record(record)

    def select(self, record: BusRecord) -> str | None:
        grade = parse_json(record, "grade")
        if grade.get("reproduce") is not True:
            return f"grade {grade.get('verdict')}/{grade.get('category')}: not worth reproducing"
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def work(self, item: WorkItem) -> Outcome:
        grade = parse_json(item.record, "grade")
        base = {"schema_version": SEED_SCHEMA_VERSION, "trace_id": item.trace_id,
                "envelope_key": item.identity.envelope_key}
        env = await load_graded_envelope(self.artifacts, item)
        if env is None:
            return Outcome("done", None, [EventDraft("seed", "superseded",
                                                     reason="a newer envelope version of the trace was graded")])
        if problem := await self.repo.problem(env.repository):
            return blocked("seed", problem, base)
        contract = await self.repo.contract()
        result = build_seed(env, grade, contract.scenario or "", contract.seeds)
        seed_path = f"{ArtifactStore.seed_dir(item.trace_id)}/seed.json"
        if result.missing:
            missing = [m.as_dict() for m in result.missing]
            await self.artifacts.write_json(seed_path, {**base, "status": "blocked", "missing": missing})
            reason = "missing evidence: " + "; ".join(f"{m.item} ({m.where})" for m in result.missing)
            return blocked("seed", reason, {**base, "seed": seed_path, "missing": missing}, [seed_path],
                           missing=len(missing))
        scenario_path = f"{ArtifactStore.seed_dir(item.trace_id)}/scenario.md"
        await self.artifacts.write_text(scenario_path, result.scenario or "")
        await self.artifacts.write_json(seed_path, {**base, "status": "seeded", **(result.seed or {})})
        document = {**base, "status": "seeded", "scenario": scenario_path, "seed": seed_path,
                    "task": env.agent_run.task_input, "revision": env.resource.get("vcs.ref.head.revision"),
                    "signature": grade.get("signature"), "category": grade.get("category")}
        return Outcome("done", json.dumps(document).encode(), [EventDraft(
            "seed", "seeded", artifacts=[scenario_path, seed_path],
            details={"templates": sorted(contract.seeds), "tool_calls": len(env.agent_run.tool_calls)})])


def build(settings: LoopSettings, artifacts: ArtifactStore) -> SeedStage:
    return SeedStage(settings, artifacts)
