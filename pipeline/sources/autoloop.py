"""The local loop (seed-system.md "Local (file-backed) loop"): ``trace-source autoloop ./traces --repo .``.

One process runs what ``trace-source serve`` runs in its embedded default — the OTLP receiver on a local port, the
assembler and the loop's stages (grade, seed, reproduce, fix as far as the policy allows) — with repo-local state
(``<repo>/.trace-source`` unless ``--state-dir``), plus a watcher that imports the directory's trace files (one per
run: OTLP JSON / JSON lines / protobuf, envelopes) through a registered ``files`` source named
``autoloop-<dir>``. A reproduction's harness exports its own trace back to the receiver (the stages give it
``OTEL_EXPORTER_OTLP_ENDPOINT``), so it is graded by the same grader. A file already imported is never imported
again (same envelope key); a changed file's new content is a new envelope version.

``<state_dir>/autoloops.json`` lists the running loops (watched dir, repo, pid, ports, log); ``detach`` sends the
process SIGTERM and removes it; ``status`` shows them. Updates of the file hold an exclusive ``flock``.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from pipeline.harness import process_alive

log = structlog.get_logger("trace_source.autoloop")

REGISTRY = "autoloops.json"
SMOKE_TASK = "Reply with the single word: ready."


def default_state_dir(repo: str | Path) -> Path:
    return Path(repo).resolve() / ".trace-source"


def source_name(watch_dir: str | Path) -> str:
    """The files source an autoloop registers for its directory: ``autoloop-<dir name>-<hash of its path>``."""
    path = Path(watch_dir).resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", path.name)[:40] or "dir"
    return f"autoloop-{slug}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


# -- the registry of loops ------------------------------------------------------------------------------------------

@contextmanager
def _locked(state_dir: Path):
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{REGISTRY}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = state_dir / REGISTRY
        try:
            loops = json.loads(path.read_text()).get("loops", []) if path.exists() else []
        except ValueError:
            loops = []
        holder = {"loops": loops}
        yield holder
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"loops": holder["loops"]}, indent=2) + "\n")
        os.replace(tmp, path)


def registered(state_dir: str | Path) -> list[dict]:
    """The loops in ``<state_dir>/autoloops.json``, each with ``running`` (its process is alive)."""
    path = Path(state_dir) / REGISTRY
    try:
        loops = json.loads(path.read_text()).get("loops", [])
    except (OSError, ValueError):
        return []
    return [{**entry, "running": process_alive(int(entry.get("pid", 0) or 0))} for entry in loops]


def register(state_dir: Path, entry: dict) -> None:
    with _locked(state_dir) as reg:
        reg["loops"] = [e for e in reg["loops"] if e.get("watch_dir") != entry["watch_dir"]] + [entry]


def unregister(state_dir: Path, watch_dir: str, pid: int | None = None) -> None:
    with _locked(state_dir) as reg:
        reg["loops"] = [e for e in reg["loops"] if not (e.get("watch_dir") == watch_dir and
                                                        (pid is None or e.get("pid") == pid))]


def find(state_dir: Path, watch_dir: str | Path) -> dict | None:
    target = str(Path(watch_dir).resolve())
    return next((e for e in registered(state_dir) if e.get("watch_dir") == target), None)


class DetachError(Exception):
    pass


def detach(state_dir: Path, watch_dir: str | Path, *, timeout_s: float = 30.0) -> dict:
    """Stop the loop watching ``watch_dir`` (SIGTERM, then wait up to ``timeout_s``; SIGKILL after) and remove it
    from the registry. Returns its entry with ``was_running``. Raises :class:`DetachError` when none is registered."""
    entry = find(state_dir, watch_dir)
    if entry is None:
        raise DetachError(f"no autoloop is registered for {Path(watch_dir).resolve()} in {state_dir / REGISTRY}")
    pid = int(entry["pid"])
    was_running = entry["running"]
    if was_running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
    unregister(state_dir, entry["watch_dir"])
    return {**entry, "was_running": was_running}


# -- --check --------------------------------------------------------------------------------------------------------

@dataclass
class CheckReport:
    lines: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, what: str, ok: bool, detail: str) -> None:
        self.lines.append((what, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.lines)


async def check_setup(watch_dir: Path, loop_settings, *, smoke_timeout_s: float = 60.0) -> CheckReport:
    """``autoloop --check``: the repository, the contract, a harness smoke test with a trivial task (run once,
    short timeout: exit code and stderr tail), the policy, the watched directory. Starts no work."""
    from pipeline.contract import load_contract
    from pipeline.harness import run_once
    from pipeline.policy import allows
    from pipeline.reproduction import BASE_ENV
    from pipeline.repository import Repository, RepositoryError

    report = CheckReport()
    report.add("watched directory", watch_dir.is_dir(), str(watch_dir.resolve()) if watch_dir.is_dir()
               else f"{watch_dir} is not a directory")
    repo = Repository(loop_settings.repo, loop_settings.state_dir, ref=loop_settings.repo_ref)
    try:
        path = repo.prepare()
        ident = repo.identity() if repo.is_git else None
        report.add("repository", True, f"{path}" + (f" (git, {ident})" if ident else " (git)" if repo.is_git
                                                    else " (plain directory: reproduced without revisions)"))
    except RepositoryError as exc:
        report.add("repository", False, str(exc))
        return report
    contract = load_contract(path, loop_settings.contract_dir)
    problems = "; ".join(str(p) for p in contract.problems)
    report.add("contract", contract.ok, (f"{contract.folder}" + (f" ({problems})" if problems else ""))
               if contract.folder else f"no {loop_settings.contract_dir}/ or archal/ folder in {path}: "
               "write harness.json and scenario.md (docs/contract.md)")
    policy = loop_settings.execution_policy
    detail = f"{policy}"
    if allows(policy, "fix") and not loop_settings.allow_external_execution:
        detail += " (fix needs --allow-external-execution: reproduced failures will end blocked before fixing)"
    if allows(policy, "fix") and loop_settings.allow_external_execution and not loop_settings.fix_command:
        detail += " (no --fix-command: fixes will end blocked)"
    report.add("policy", True, detail)
    if contract.harness is None:
        report.add("harness smoke test", False, "no valid harness.json to run")
        return report
    if not allows(policy, "reproduce"):
        report.add("harness smoke test", True, f"skipped: policy {policy} never runs the harness")
        return report
    h = contract.harness
    env = {k: os.environ[k] for k in BASE_ENV if k in os.environ}
    env.update(h.env)
    env.update({k: os.environ[k] for k in loop_settings.pass_env_names() if k in os.environ})
    env.update({"AGENT_TASK": SMOKE_TASK, "OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "none",
                "OTEL_LOGS_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
    work = loop_settings.state_dir / "work" / "autoloop-check"
    timeout = min(h.timeout_s, smoke_timeout_s)
    result = await run_once(h.command, cwd=path / h.workdir, env=env, timeout_s=timeout, directory=work / "attempt",
                            setup=h.setup)
    tail = result.stderr.decode(errors="replace").strip().splitlines()[-5:]
    for name in ("result.json", "process.json", "timed_out"):
        (work / "attempt" / name).unlink(missing_ok=True)  # the next --check runs it again
    if result.timed_out:
        report.add("harness smoke test", False, f"{' '.join(h.command)} timed out after {timeout:g} s with "
                   f"AGENT_TASK={SMOKE_TASK!r}; stderr tail: {' | '.join(tail) or '(empty)'}")
    elif result.error and result.exit_code is None:
        report.add("harness smoke test", False, f"{' '.join(h.command)} could not start: {result.error}")
    else:
        report.add("harness smoke test", result.exit_code == 0,
                   f"{' '.join(h.command)} exited {result.exit_code} in {result.duration_s:g} s"
                   + (f"; stderr tail: {' | '.join(tail)}" if tail else ""))
    return report


# -- the loop itself ------------------------------------------------------------------------------------------------

async def run_autoloop(watch_dir: Path, serve_settings, loop_settings, *, interval_s: float = 1.0,
                       stop: asyncio.Event | None = None, log_path: str | None = None) -> None:
    """Run the embedded serve and the directory watcher until ``stop`` or SIGTERM / SIGINT; registered in
    ``autoloops.json`` while it runs."""
    from pipeline.sources.config import FilesConfig
    from pipeline.sources.importer import SinkDestination
    from pipeline.sources.store import SourceStore
    from pipeline.sources.sync import sync_once
    from sinks.base import SinkUnavailable
    from sinks.envelopes import LocalEnvelopeSink
    from trace_source.serve import run as serve

    stop = stop or asyncio.Event()
    state_dir = Path(loop_settings.state_dir)
    watch = str(watch_dir.resolve())
    name = source_name(watch_dir)
    store = SourceStore(state_dir)
    store.register(name, "files", FilesConfig(path=watch_dir, interval_s=interval_s).model_dump(mode="json"))
    ports: asyncio.Future = asyncio.get_running_loop().create_future()

    def serving(http_port: int, grpc_port: int | None) -> None:
        if not ports.done():
            ports.set_result((http_port, grpc_port))

    server = asyncio.create_task(serve(serve_settings, stop, loop_settings=loop_settings, on_serving=serving))
    done, _ = await asyncio.wait({server, ports}, return_when=asyncio.FIRST_COMPLETED)
    if server in done:
        store.close()
        server.result()  # raises the start-up error
        return
    http_port, grpc_port = ports.result()
    host = "127.0.0.1" if serve_settings.host in ("0.0.0.0", "::", "") else serve_settings.host
    entry = {"watch_dir": watch, "repo": str(loop_settings.repo), "state_dir": str(state_dir.resolve()),
             "pid": os.getpid(), "http_port": http_port, "grpc_port": grpc_port,
             "otlp_endpoint": f"http://{host}:{http_port}", "source": name,
             "policy": loop_settings.execution_policy, "log": log_path,
             "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    register(state_dir, entry)
    log.info("autoloop.serving", **entry)
    sink = LocalEnvelopeSink(state_dir)
    try:
        await sink.start()
        destination = SinkDestination(sink)
        while not stop.is_set() and not server.done():
            try:
                result = await sync_once(store, name, destination, trigger="autoloop")
                if result.results or result.rejected:
                    log.info("autoloop.imported", **result.counts(), error=result.error)
            except SinkUnavailable as exc:
                log.warning("autoloop.import_retry", error=str(exc))
            try:
                await asyncio.wait_for(asyncio.shield(stop.wait()), interval_s)
            except TimeoutError:
                pass
    finally:
        stop.set()
        await sink.stop()
        try:
            await server
        finally:
            unregister(state_dir, watch, os.getpid())
            store.close()
            log.info("autoloop.stopped", watch_dir=watch)
