"""The fix stage: consumer group ``trace-source-fixer`` on ``trace-source.reproductions`` (``reproduced`` /
``flaky`` only) → ``trace-source.fixes``.

The last phase of the loop ("autofix"). Without ``--allow-external-execution`` the run ends *blocked* with that
reason and the context a person needs to fix it by hand. With it, up to ``--max-fix-attempts`` times: a fresh
working copy on the branch ``trace-source/fix-<first 12 hex of the stage key>`` at the revision that reproduced;
``--fix-command`` (any coding-agent CLI) with the failure context in files named by ``TRACE_SOURCE_FIX_*``
variables; no change → the attempt failed; the changes are committed; ``--validation-command`` must pass; the
reproduction is re-run with the patched code the same number of times — the fix is *proven* only when validation
passes and no attempt shows the original failure signature. A proven fix is pushed to that branch (never to the
default or a protected branch) and opened as a **draft** pull request through the forge's REST API (GitHub,
Gitea/Forgejo) or ``--pr-command``; an existing pull request for the branch is reused. When it cannot publish, it
writes ``fixes/<trace_id>/repo.patch``, ``pr-details.md`` and ``status.json`` with the exact blocker and the
commands that finish the job by hand.

Idempotency: every command of an attempt runs at most once (:func:`pipeline.harness.run_once`, adopted after a
worker crash), the commit is found again in the working copy, a push of the same commit is a no-op, and the pull
request is looked up by its head branch before one is created — a restarted or redelivered fix never opens a second
pull request, pushes a second branch or spends a second budget.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import structlog

from normalizers.envelope import repository_from
from pipeline.artifacts import ArtifactStore
from pipeline.bus import BusRecord
from pipeline.forge import ForgeError, detect_forge, git_auth_env, make_forge, push_error
from pipeline.fixing import (FixAttempt, commit_message, fix_prompt, pr_body, pr_title, status_document)
from pipeline.grading.model import FailureSignature
from pipeline.harness import run_once
from pipeline.journal import open_journal
from pipeline.loop_settings import LoopSettings, config_version
from pipeline.repository import Repository, RepositoryError, git, is_url
from pipeline.reproducer import Reproducer
from pipeline.reproduction import BASE_ENV
from pipeline.stage import EventDraft, Identity, Outcome, WorkItem, identify_record
from pipeline.stages.seed import RepoContext, load_graded_envelope, parse_json

log = structlog.get_logger(__name__)

GROUP_ID = "trace-source-fixer"
_URL_IN_TEXT = re.compile(r"https?://\S+")
#: Scratch files coding agents leave in the working copy; excluded from the commit (.git/info/exclude).
_AGENT_SCRATCH = (".aider*", ".claude/", ".codex/", "__pycache__/", "*.pyc", ".pytest_cache/")


class PublishBlocked(Exception):
    """The fix is proven but cannot be published; the message is the exact blocker."""

    def __init__(self, reason: str, how: str) -> None:
        super().__init__(reason)
        self.how = how


class FixStage:
    """:class:`pipeline.stage.Stage` fixing reproduced failures and opening draft pull requests."""

    name = "fix"
    phase = "fix"
    entry = False
    group_id = GROUP_ID
    default_concurrency = 1

    def __init__(self, settings: LoopSettings, artifacts: ArtifactStore) -> None:
        self.settings = settings
        self.artifacts = artifacts
        self.repo = RepoContext(settings)
        self.input_topic = settings.reproductions_topic
        self.output_topic = settings.fixes_topic
        # Only what changes the work itself is in the key: settings that unblock a run (--allow-external-execution,
        # the commands, the forge, the remote) are not, so `reprocess` re-runs a blocked fix under the same key.
        self.config_version = config_version("fix", 1, settings.max_fix_attempts, settings.attempts,
                                             settings.contract_dir)
        self.journal = open_journal(settings.database_url(), settings.state_dir)

    def identify(self, record: BusRecord) -> Identity:
        return identify_record(record)

    def select(self, record: BusRecord) -> str | None:
        status = parse_json(record, "reproduction").get("status")
        return None if status in ("reproduced", "flaky") else f"reproduction {status}: nothing to fix"

    async def start(self) -> None:
        await self.journal.start()

    async def close(self) -> None:
        await self.journal.close()

    # -- the phase --------------------------------------------------------------------------------------------------

    async def work(self, item: WorkItem) -> Outcome:
        manifest = parse_json(item.record, "reproduction")
        trace_id = item.trace_id
        base = {"trace_id": trace_id, "envelope_key": item.identity.envelope_key}
        fix_dir = ArtifactStore.fix_dir(trace_id)
        env = await load_graded_envelope(self.artifacts, item)
        if env is None:
            return Outcome("done", None, [EventDraft("fix", "superseded",
                                                     reason="a newer envelope version of the trace was graded")])
        grade = json.loads(await self.artifacts.read_bytes(ArtifactStore.grade(trace_id)))
        context = self._context_paths(trace_id, manifest)
        if not self.settings.allow_external_execution:
            how = ("Fixing runs a coding agent, the repository's validation and a pull-request command. Restart the "
                   "fix worker (or serve) with --allow-external-execution, then `trace-source reprocess "
                   f"{trace_id}`; or fix it by hand from the context files: " + ", ".join(context.values()))
            return await self._stop(item, base, "blocked", "external execution not allowed (--allow-external-"
                                    "execution is off)", [], how=how, context=context)
        if problem := await self.repo.problem(env.repository):
            return await self._stop(item, base, "blocked", problem, [], context=context)
        if not self.settings.otlp_endpoint:
            return await self._stop(item, base, "blocked", "no OTLP endpoint to prove the fix with: start the fix "
                                    "worker with --otlp-endpoint http://<trace-source receiver>:4319", [],
                                    context=context)
        if not self.settings.fix_command:
            return await self._stop(item, base, "blocked", "no --fix-command: give the coding-agent command line "
                                    "(e.g. aider, claude -p, codex exec)", [], context=context)
        contract = await self.repo.contract()
        repository = self.repo.repository
        assert repository is not None and contract.harness is not None
        try:
            start_commit = await asyncio.to_thread(repository.resolve, manifest.get("revision"))
        except RepositoryError as exc:
            return await self._stop(item, base, "blocked", str(exc), [], context=context)
        branch = f"trace-source/fix-{item.stage_key[:12]}"
        prefix = f"{item.stage_key[:12]}-g{item.generation}"
        work_dir = self._work_dir(trace_id, item.stage_key, item.generation)
        scenario = (self.settings.artifact_root / manifest["scenario"]).read_text() if manifest.get("scenario") \
            else ""
        original = FailureSignature.model_validate(manifest["signature"]) if manifest.get("signature") else None
        run = item.identity.run
        assert run is not None
        reproducer = Reproducer(self.journal, otlp_endpoint=self.settings.otlp_endpoint or "",
                                pass_env=self.settings.pass_env_names(), trace_wait_s=self.settings.trace_wait_s)

        attempts: list[FixAttempt] = []
        # A reprocess after a publishing blocker (no token, no remote, a refused push) publishes the fix already
        # proven by an earlier pass under this stage key instead of spending the budget again.
        proven = self._earlier_proof(trace_id, item)
        reused = proven is not None
        if proven is not None:
            attempts = [proven[0]]
        for n in range(1, self.settings.max_fix_attempts + 1 if not reused else 1):
            attempt, copy = await self._attempt(n, work_dir / f"fix-{n}", repository, start_commit, branch, grade,
                                                manifest, scenario, context, attempts, trace_id)
            attempts.append(attempt)
            if attempt.commit and attempt.outcome == "":
                await self._prove(attempt, copy, reproducer, contract.harness, prefix, run.run_id, trace_id,
                                  manifest, original)
            log.info("fix.attempt", trace_id=trace_id, attempt=n, outcome=attempt.outcome, commit=attempt.commit)
            if attempt.outcome == "proven":
                proven = (attempt, copy)
                break
        await asyncio.to_thread(self._write_outcome, work_dir, attempts, proven)
        events = [] if reused else [EventDraft("fix", f"attempt_{a.outcome}", reason=a.detail, details={
            "attempt": a.n, "commit": a.commit, "usage": a.usage, "reproduction": a.reproduction}) for a in attempts]

        if proven is None:
            last = attempts[-1]
            status = "validation_failed" if last.outcome == "validation_failed" else "budget_exhausted"
            reason = (f"not proven after {len(attempts)} attempt(s): "
                      + "; ".join(f"{a.n}: {a.outcome}" + (f" ({a.detail})" if a.detail else "") for a in attempts))
            with_commit = next((a for a in reversed(attempts) if a.commit), None)
            patch = None
            if with_commit is not None:
                patch = await self._write_patch(trace_id, work_dir / f"fix-{with_commit.n}" / "repo", start_commit)
            return await self._stop(item, base, status, reason, attempts, events=events, patch=patch, context=context)

        attempt, copy = proven
        body = pr_body(trace_id, grade, manifest, attempt, attempts,
                       validation_command=self.settings.validation_command)
        details_path = await self.artifacts.write_text(f"{fix_dir}/pr-details.md", body)
        try:
            pull = await self._publish(repository, copy, attempt, branch, pr_title(trace_id, grade),
                                       self.settings.artifact_root / details_path, work_dir)
        except PublishBlocked as exc:
            patch = await self._write_patch(trace_id, copy, start_commit)
            return await self._stop(item, base, "blocked", f"proven but not published: {exc}", attempts,
                                    events=events, patch=patch, how=exc.how, branch=branch, commit=attempt.commit,
                                    context=context)
        doc = status_document(base, "pr_opened", None, attempts=attempts, branch=branch, commit=attempt.commit,
                              pull_request=pull, files=attempt.files, pr_details=details_path)
        status_path = await self.artifacts.write_json(f"{fix_dir}/status.json", doc)
        events.append(EventDraft("fix", "pr_opened", artifacts=[details_path, status_path], details={
            "pr_url": pull.get("url"), "pr_number": pull.get("number"), "branch": branch, "commit": attempt.commit,
            "draft": pull.get("draft"), "checks": pull.get("checks")}))
        return Outcome("done", json.dumps(doc).encode(), events)

    # -- earlier passes ---------------------------------------------------------------------------------------------

    def _work_dir(self, trace_id: str, stage_key: str, generation: int) -> Path:
        return self.settings.work_root / "fix" / f"{trace_id}-{stage_key[:12]}-g{generation}"

    @staticmethod
    def _write_outcome(work_dir: Path, attempts: list[FixAttempt], proven: tuple[FixAttempt, Path] | None) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        doc = {"attempts": [a.as_dict() for a in attempts],
               "proven": None if proven is None else {"attempt": proven[0].as_dict(), "copy": str(proven[1])}}
        (work_dir / "outcome.json").write_text(json.dumps(doc, indent=2))

    def _earlier_proof(self, trace_id: str, item: WorkItem) -> tuple[FixAttempt, Path] | None:
        """The proven attempt of an earlier generation of this stage key whose working copy is still there."""
        for generation in range(item.generation - 1, -1, -1):
            path = self._work_dir(trace_id, item.stage_key, generation) / "outcome.json"
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("proven") and Path(doc["proven"]["copy"], ".git").exists():
                return FixAttempt(**doc["proven"]["attempt"]), Path(doc["proven"]["copy"])
        return None

    # -- one attempt ------------------------------------------------------------------------------------------------

    def _context_paths(self, trace_id: str, manifest: dict[str, Any]) -> dict[str, str]:
        root = self.settings.artifact_root
        paths = {"grade": root / ArtifactStore.grade(trace_id)}
        if manifest.get("scenario"):
            paths["scenario"] = root / manifest["scenario"]
        if manifest.get("seed"):
            paths["seed"] = root / manifest["seed"]
        if (manifest.get("outputs") or {}).get("manifest"):
            paths["reproduction"] = root / manifest["outputs"]["manifest"]
        else:
            paths["reproduction"] = root / ArtifactStore.run_dir(trace_id) / "manifest.json"
        return {k: str(v.resolve()) for k, v in paths.items()}

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
        env.update({k: os.environ[k] for k in self.settings.pass_env_names() if k in os.environ})
        env.update(extra)
        return env

    async def _attempt(self, n: int, adir: Path, repository: Repository, start_commit: str | None, branch: str,
                       grade: dict[str, Any], manifest: dict[str, Any], scenario: str, context: dict[str, str],
                       previous: list[FixAttempt], trace_id: str) -> tuple[FixAttempt, Path]:
        attempt = FixAttempt(n=n)
        copy = adir / "repo"
        fix_proc = adir / "fix"
        if not (fix_proc / "process.json").exists() and not (fix_proc / "result.json").exists():
            await repository.aworking_copy(copy, start_commit)
            if (copy / ".git").exists():
                await asyncio.to_thread(git, "checkout", "--quiet", "-B", branch, cwd=copy)
                exclude = copy / ".git" / "info" / "exclude"
                exclude.parent.mkdir(parents=True, exist_ok=True)
                with open(exclude, "a") as f:
                    f.write("\n".join(("# trace-source: coding-agent scratch files", *_AGENT_SCRATCH)) + "\n")
        ctx_dir = adir / "context"
        ctx_dir.mkdir(parents=True, exist_ok=True)
        prompt = ctx_dir / "prompt.md"
        prompt.write_text(fix_prompt(grade, manifest, scenario, previous, context))
        previous_file = ctx_dir / "previous.json"
        previous_file.write_text(json.dumps([a.as_dict() for a in previous], indent=2))
        usage_file = adir / "usage.json"
        env = self._env({"TRACE_SOURCE_FIX_PROMPT": str(prompt), "TRACE_SOURCE_FIX_GRADE": context["grade"],
                         "TRACE_SOURCE_FIX_SCENARIO": context.get("scenario", ""),
                         "TRACE_SOURCE_FIX_SEED": context.get("seed", ""),
                         "TRACE_SOURCE_FIX_REPRODUCTION": context["reproduction"],
                         "TRACE_SOURCE_FIX_PREVIOUS": str(previous_file), "TRACE_SOURCE_FIX_USAGE": str(usage_file),
                         "TRACE_SOURCE_FIX_ATTEMPT": str(n), "TRACE_SOURCE_FIX_BRANCH": branch,
                         "TRACE_SOURCE_TRACE_ID": trace_id})
        res = await run_once(["/bin/sh", "-c", self.settings.fix_command or "false"], cwd=copy, env=env,
                             timeout_s=self.settings.fix_timeout_s, directory=fix_proc)
        attempt.fix_exit_code, attempt.fix_timed_out = res.exit_code, res.timed_out
        if usage_file.exists():
            try:
                attempt.usage = json.loads(usage_file.read_text())
            except ValueError:
                attempt.usage = {"unreadable": usage_file.read_text()[:500]}
        if res.timed_out or res.exit_code != 0:
            attempt.outcome = "fix_failed"
            attempt.detail = ("timed out" if res.timed_out else f"exit {res.exit_code}") + ": " + \
                _tail(res.stderr or res.stdout, 400)
            return attempt, copy
        attempt.commit, attempt.files = await asyncio.to_thread(
            self._commit, copy, start_commit, commit_message(trace_id, grade))
        if attempt.commit is None:
            attempt.outcome, attempt.detail = "no_change", "the fix command changed no file"
            return attempt, copy
        if self.settings.validation_command:
            val = await run_once(["/bin/sh", "-c", self.settings.validation_command], cwd=copy,
                                 env=self._env({"TRACE_SOURCE_TRACE_ID": trace_id}),
                                 timeout_s=self.settings.validation_timeout_s, directory=adir / "validation")
            attempt.validation_exit_code = val.exit_code
            attempt.validation_output = _tail(val.stdout + b"\n" + val.stderr, 6000)
            if val.timed_out or val.exit_code != 0:
                attempt.outcome = "validation_failed"
                attempt.detail = f"`{self.settings.validation_command}` " + (
                    "timed out" if val.timed_out else f"exited {val.exit_code}")
        return attempt, copy

    def _commit(self, copy: Path, start_commit: str | None, message: str) -> tuple[str | None, list[str]]:
        """Commit the copy's changes (once: a copy already ahead of ``start_commit`` keeps its commit); returns the
        commit and the changed files, or ``(None, [])`` when nothing changed."""
        if not (copy / ".git").exists():
            raise RepositoryError("fixing needs a git repository (--repo is a plain directory)")
        head = git("rev-parse", "HEAD", cwd=copy).stdout.strip()
        if head == start_commit:
            if not git("status", "--porcelain", "--untracked-files=all", cwd=copy).stdout.strip():
                return None, []
            git("add", "-A", cwd=copy)
            author = {"GIT_AUTHOR_NAME": self.settings.git_author_name,
                      "GIT_AUTHOR_EMAIL": self.settings.git_author_email,
                      "GIT_COMMITTER_NAME": self.settings.git_author_name,
                      "GIT_COMMITTER_EMAIL": self.settings.git_author_email}
            git("commit", "--quiet", "--no-verify", "-m", message, cwd=copy, env=author)
            head = git("rev-parse", "HEAD", cwd=copy).stdout.strip()
        files = git("diff", "--name-only", f"{start_commit}..{head}", cwd=copy).stdout.split()
        return head, files

    async def _prove(self, attempt: FixAttempt, copy: Path, reproducer: Reproducer, harness, prefix: str,
                     run_id: str, trace_id: str, manifest: dict[str, Any], original: FailureSignature | None) -> None:
        async def checkout(dest: Path) -> None:
            def clone() -> None:
                if dest.exists():
                    import shutil

                    shutil.rmtree(dest)
                dest.parent.mkdir(parents=True, exist_ok=True)
                git("clone", "--quiet", "--shared", "--no-checkout", str(copy), str(dest))
                git("checkout", "--quiet", "--detach", attempt.commit or "HEAD", cwd=dest)

            await asyncio.to_thread(clone)

        seed_env = {}
        if manifest.get("seed"):
            seed_env["TRACE_SOURCE_SEED_PATH"] = str((self.settings.artifact_root / manifest["seed"]).resolve())
        if manifest.get("scenario"):
            seed_env["TRACE_SOURCE_SCENARIO_PATH"] = str((self.settings.artifact_root / manifest["scenario"]).resolve())
        result = await reproducer.run(
            harness=harness, checkout=checkout, work_dir=copy.parent / "proof", attempts=self.settings.attempts,
            attempt_prefix=f"{prefix}-f{attempt.n}", run_id=run_id, trace_id=trace_id,
            task=manifest.get("task") or "", original=original, extra_env=seed_env)
        graded = [a for a in result.attempts if a.reproduced is not None]
        failing = [a for a in graded if a.reproduced]
        attempt.reproduction = {"attempts": len(result.attempts), "graded": len(graded), "failing": len(failing),
                                "traces": [a.trace_id for a in result.attempts], "verdicts": [a.verdict for a in
                                                                                             result.attempts]}
        if failing:
            attempt.outcome = "still_failing"
            attempt.detail = f"{len(failing)}/{len(graded)} proof attempts still show the original failure"
        elif not graded:
            attempt.outcome = "unproven"
            attempt.detail = "no proof attempt produced a graded trace"
        else:
            attempt.outcome = "proven"

    # -- publishing -------------------------------------------------------------------------------------------------

    async def _publish(self, repository: Repository, copy: Path, attempt: FixAttempt, branch: str, title: str,
                       body_path: Path, work_dir: Path) -> dict[str, Any]:
        """Push the branch and open (or find) the draft pull request; returns what the forge says about it.
        Raises :class:`PublishBlocked` with the exact blocker."""
        s = self.settings
        remote = await asyncio.to_thread(git, "remote", "get-url", s.push_remote, cwd=repository.path, check=False)
        remote_url = remote.stdout.strip() if remote.returncode == 0 else ""
        if not remote_url:
            raise PublishBlocked(f"no remote {s.push_remote!r} in {repository.describe()}",
                                 f"add the remote, then: git -C {copy} push <remote> HEAD:refs/heads/{branch} and "
                                 f"open a draft pull request from {branch} with the body in {body_path}")
        token = s.forge_token()
        forge = None
        owner_repo = None
        if not s.pr_command:
            owner_repo = repository_from(None, {"vcs.repository.url.full": remote_url})
            try:
                kind, api_url = detect_forge(remote_url, s.forge_api_url, s.forge)
            except ValueError as exc:
                raise PublishBlocked(f"not a supported forge: {exc}", "set --forge-api-url (and --forge) or "
                                     "--pr-command") from None
            if not token:
                raise PublishBlocked(f"forge token missing: set {s.forge_token_env}",
                                     f"export {s.forge_token_env}=<token with pull-request write access>, then "
                                     "`trace-source reprocess`")
            if owner_repo is None:
                raise PublishBlocked(f"cannot tell owner/name from the remote URL {remote_url}",
                                     "use a remote URL of the form https://host/owner/name(.git)")
            forge = make_forge(kind, api_url, token)
        try:
            base = s.base_branch
            if base is None and forge is not None:
                base = await forge.default_branch(owner_repo)
            if base is None:
                head = await asyncio.to_thread(git, "symbolic-ref", "--short", f"refs/remotes/{s.push_remote}/HEAD",
                                               cwd=repository.path, check=False)
                base = head.stdout.strip().split("/", 1)[-1] if head.returncode == 0 else "main"
            if branch == base:
                raise PublishBlocked(f"the fix branch {branch} is the base branch", "set --base-branch")
            await self._push(copy, remote_url, token, attempt.commit or "HEAD", branch)
            if forge is None:
                return await self._pr_command(copy, branch, base, title, body_path, work_dir)
            return await self._pull_request(forge, owner_repo, branch, base, title, body_path.read_text(),
                                            attempt)
        except ForgeError as exc:  # anything the forge refused (the repository, the default branch, the token)
            raise PublishBlocked(f"{exc.kind}: {exc}", "fix what the forge said, then `trace-source reprocess`; or "
                                 "push the branch and open the pull request by hand with pr-details.md") from None
        finally:
            if forge is not None:
                await forge.close()

    async def _push(self, copy: Path, remote_url: str, token: str | None, commit: str, branch: str) -> None:
        # Force: the branch is ours alone (named after the stage key); a reprocessed fix moves it to its new commit.
        target = remote_url if is_url(remote_url) or "://" in remote_url else str(Path(remote_url).resolve())
        proc = await asyncio.to_thread(git, "push", "--quiet", target, f"+{commit}:refs/heads/{branch}", cwd=copy,
                                       check=False, env=git_auth_env(remote_url, token), timeout=600)
        if proc.returncode != 0:
            raise PublishBlocked(str(push_error(remote_url, proc.stderr)),
                                 f"git -C {copy} push <remote> {commit}:refs/heads/{branch}")

    async def _pull_request(self, forge, repo: str, branch: str, base: str, title: str, body: str,
                            attempt: FixAttempt) -> dict[str, Any]:
        try:
            pull = await forge.find_pull(repo, branch)
            if pull is None:
                try:
                    pull = await forge.create_draft_pull(repo, head=branch, base=base, title=title, body=body)
                except ForgeError as exc:
                    if exc.kind != "conflict":
                        raise
                    pull = await forge.find_pull(repo, branch)
                    if pull is None:
                        raise
            pull = await forge.get_pull(repo, pull.number)
            files = sorted(await forge.pull_files(repo, pull.number))
            checks = await forge.check_status(repo, pull.head_sha)
        except ForgeError as exc:
            raise PublishBlocked(f"{exc.kind}: {exc}", f"open a draft pull request from {branch} into {base} by hand "
                                 "with the body in pr-details.md") from None
        problems = []
        if pull.head_sha != attempt.commit:
            problems.append(f"its head is {pull.head_sha[:12]}, not the proven commit {str(attempt.commit)[:12]}")
        if sorted(attempt.files) != files:
            problems.append(f"it changes {files}, the fix changed {sorted(attempt.files)}")
        if not pull.draft:  # e.g. a Gitea whose work-in-progress prefixes are not "WIP:"
            problems.append("the forge does not report it as a draft")
        return {"number": pull.number, "url": pull.url, "head": pull.head_ref, "head_sha": pull.head_sha,
                "base": pull.base_ref, "draft": pull.draft, "state": pull.state, "files": files, "checks": checks,
                "forge": forge.kind, "verified": not problems, "problems": problems}

    async def _pr_command(self, copy: Path, branch: str, base: str, title: str, body_path: Path,
                          work_dir: Path) -> dict[str, Any]:
        env = self._env({"TRACE_SOURCE_FIX_BRANCH": branch, "TRACE_SOURCE_PR_TITLE": title,
                         "TRACE_SOURCE_PR_BODY": str(body_path), "TRACE_SOURCE_PR_BASE": base})
        res = await run_once(["/bin/sh", "-c", self.settings.pr_command or "false"], cwd=copy, env=env,
                             timeout_s=600, directory=work_dir / "pr-command")
        out = res.stdout.decode("utf-8", "replace")
        if res.exit_code != 0:
            raise PublishBlocked(f"--pr-command exited {res.exit_code}: {_tail(res.stderr or res.stdout, 800)}",
                                 f"cd {copy} && {self.settings.pr_command}")
        urls = _URL_IN_TEXT.findall(out)
        return {"url": urls[-1] if urls else None, "head": branch, "base": base, "draft": None,
                "forge": "pr-command", "output": out[-2000:]}

    # -- endings ----------------------------------------------------------------------------------------------------

    async def _write_patch(self, trace_id: str, copy: Path, start_commit: str | None) -> str | None:
        if not (copy / ".git").exists() or start_commit is None:
            return None
        diff = await asyncio.to_thread(git, "diff", "--binary", f"{start_commit}..HEAD", cwd=copy, check=False)
        if not diff.stdout.strip():
            return None
        return await self.artifacts.write_text(f"{ArtifactStore.fix_dir(trace_id)}/repo.patch", diff.stdout)

    async def _stop(self, item: WorkItem, base: dict[str, Any], status: str, reason: str,
                    attempts: list[FixAttempt], *, events: list[EventDraft] | None = None, patch: str | None = None,
                    how: str | None = None, context: dict[str, str] | None = None, **extra: Any) -> Outcome:
        """End the run without a pull request: ``status.json`` (and ``pr-details.md`` with the attempts) say why
        and how to finish by hand; the ledger state is ``blocked`` (``trace-source reprocess`` re-runs it)."""
        fix_dir = ArtifactStore.fix_dir(item.trace_id)
        if how is None and patch is not None:
            how = (f"review {fix_dir}/repo.patch, then `git apply` it on a branch and open a pull request; or fix "
                   f"the blocker and run `trace-source reprocess {item.trace_id}`")
        doc = status_document(base, status, reason, attempts=attempts, patch=patch, how=how, context=context,
                              **extra)
        paths = [await self.artifacts.write_json(f"{fix_dir}/status.json", doc)]
        if attempts:
            lines = [f"# Fix not published — {status}", "", reason, "", "## How to finish by hand", "", how or "-",
                     "", "## Attempts", *[f"- attempt {a.n}: {a.outcome}" + (f" — {a.detail}" if a.detail else "")
                                          for a in attempts]]
            paths.append(await self.artifacts.write_text(f"{fix_dir}/pr-details.md", "\n".join(lines) + "\n"))
        if patch:
            paths.append(patch)
        drafts = list(events or [])
        drafts.append(EventDraft("fix", status, reason=reason, artifacts=paths, details={"how": how}))
        return Outcome("blocked", json.dumps(doc).encode(), drafts)


def _tail(data: bytes, limit: int) -> str:
    return data.decode("utf-8", "replace").strip()[-limit:]


def build(settings: LoopSettings, artifacts: ArtifactStore) -> FixStage:
    return FixStage(settings, artifacts)
