"""CLI commands of the trace sources: ``import``, ``connect``, ``test``, ``sync``, ``watch`` (thin: parse, call
``pipeline.sources``, print). Registered on the main group by :func:`register`."""

from __future__ import annotations

import asyncio
import json
import os
from contextlib import asynccontextmanager
from pathlib import Path

import click

STATE_DIR_HELP = "State directory: the source registry (sources.db) and, embedded, the log the loop reads."


def _state_dir_option(func):
    func = click.option("--registry-url-env", "registry_url_env", default="TRACE_SOURCE_DATABASE_URL",
                        show_default=True,
                        help="Name of the environment variable holding the cluster's Postgres URL (the ledger's and "
                             "journal's): when it is set, the source registry lives there (tables sources, "
                             "source_state, imported, rejected) instead of <state-dir>/sources.db.")(func)
    return click.option("--state-dir", envvar="TRACE_SOURCE_STATE_DIR", type=click.Path(path_type=Path),
                        default=Path(".trace-source"), show_default=True,
                        help=STATE_DIR_HELP + " [env TRACE_SOURCE_STATE_DIR]")(func)


def _destination_options(func):
    options = [
        click.option("--kafka-bootstrap-servers", envvar="TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS", default=None,
                     help="Publish envelopes to the traces topic on this Kafka cluster instead of the embedded log "
                          "[env TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS]."),
        click.option("--upload", is_flag=True, help="Send each envelope to a running receiver's POST /v1/envelopes "
                     "(Idempotency-Key = the envelope key; retried on 429/503 honouring Retry-After) instead."),
        click.option("--endpoint", default="http://localhost:4319", show_default=True,
                     help="With --upload: the receiver's base URL (trace-source serve's --port)."),
        click.option("--token-env", default="TRACE_SOURCE_UPLOAD_TOKEN", show_default=True,
                     help="With --upload: name of the environment variable holding the bearer token (unset "
                          "variable: no token is sent)."),
    ]
    from trace_source.cli import _kafka_security_options  # the same --kafka-* security flags as tail and topics

    func = _kafka_security_options(func)
    for option in reversed(options):
        func = option(func)
    return func


@asynccontextmanager
async def open_destination(state_dir: Path, kafka: str | None, upload: bool, endpoint: str, token_env: str,
                           security_flags: dict | None = None):
    """The importer's destination for the flags of :func:`_destination_options` (``security_flags``: the Kafka
    TLS / SASL flags, resolved with ``TRACE_SOURCE_KAFKA_*`` variables)."""
    from pipeline.sources.importer import SinkDestination, UploadDestination

    if upload:
        from pipeline.sources.upload import UploadClient

        async with UploadClient(endpoint, os.environ.get(token_env) or None) as client:
            yield UploadDestination(client)
        return
    from sinks.envelopes import open_envelope_sink

    from trace_source.cli import load_kafka_security

    security = load_kafka_security(dict(security_flags or {})) if kafka else None
    sink = open_envelope_sink(state_dir=state_dir, kafka_bootstrap_servers=kafka, security=security)
    await sink.start()
    try:
        yield SinkDestination(sink)
    finally:
        await sink.stop()


def _store(state_dir: Path, registry_url_env: str = "TRACE_SOURCE_DATABASE_URL"):
    from pipeline.sources.store import SourceStoreError, open_source_store

    try:
        return open_source_store(state_dir, os.environ.get(registry_url_env) or None)
    except SourceStoreError as exc:
        raise click.ClickException(str(exc)) from None


def _print_results(results, rejected, as_json: bool, *, preview: bool = False, where: str = "") -> None:
    rows = []
    for r in results:
        env = r.envelope
        rows.append({"trace_id": r.trace_id, "status": r.status, "item": r.item, "idempotency_key": r.key,
                     "envelope_version": r.version, "reason": r.reason,
                     "agent": env.agent_run.agent_name if env else None,
                     "task": env.agent_run.task_input if env else None,
                     "errors": len(env.agent_run.errors) if env else None,
                     "spans": len(env.spans) if env else None,
                     "source": env.source.model_dump() if env else None})
    bad = [{"item": i, "error": k, "reason": why} for i, k, why in rejected]
    if as_json:
        click.echo(json.dumps({"traces": rows, "rejected": bad, "destination": where}, indent=2))
        return
    if rows:
        click.echo(f"{'TRACE ID':32}  {'STATUS':9}  {'V':>2}  {'AGENT':16}  {'ERRORS':>6}  TASK")
        for r in rows:
            task = " ".join((r["task"] or "-").split())
            click.echo(f"{r['trace_id']:32}  {r['status']:9}  {r['envelope_version'] or '-':>2}  "
                       f"{(r['agent'] or '-')[:16]:16}  {r['errors'] if r['errors'] is not None else '-':>6}  "
                       f"{task[:60]}")
    for b in bad:
        click.echo(f"error: {b['item']}: {b['error']}: {b['reason']}", err=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no traces"
    click.echo(("would import: " if preview else "") + summary + (f", {len(bad)} rejected" if bad else "")
               + (f" -> {where}" if where and not preview else ""))


def _quiet_logs() -> None:
    """One-shot commands print their results on stdout; warnings (a blocked source) go to stderr as JSON."""
    from trace_source.logging import configure

    configure("warning", "json")


def register(main: click.Group) -> None:
    """Add the source commands (and autoloop / detach) to ``main``."""
    register_autoloop(main)

    @main.command("import")
    @click.argument("path", type=click.Path(exists=True, path_type=Path))
    @click.option("--preview", is_flag=True, help="Print what would be imported (runs, agents, tasks, errors) and "
                  "import nothing.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one object: traces, rejected).")
    @click.option("--source", "source_name", default="files", show_default=True,
                  help="Source id recorded on the envelopes (source.kind is 'file').")
    @click.option("--repository", default=None, help="The agent's repository (owner/repo) set on every envelope.")
    @_destination_options
    @_state_dir_option
    def import_(path: Path, preview: bool, as_json: bool, source_name: str, repository: str | None,
                kafka_bootstrap_servers, upload, endpoint, token_env, state_dir: Path, registry_url_env: str,
                **security_flags) -> None:
        """Import trace files: a file, or a directory (read recursively).

        \b
        Formats, recognized by content: OTLP JSON (TracesData / ExportTraceServiceRequest / LogsData, one
        document or JSON lines as the Collector's file exporter writes them), OTLP protobuf (one message, or
        the Collector's length-prefixed proto stream), trace-source envelopes, Langfuse trace exports.
        Each trace becomes one envelope on trace-source.traces (embedded: <state-dir>/spans.db and
        <state-dir>/traces/) that the loop grades — or, with --upload, is sent to a receiver. A trace
        already imported with the same content is skipped; new content is a new envelope version. Unknown
        or broken files are reported by name with the reason (adapter mismatch / broken file) and the rest
        is imported; exit code 1 when any file was rejected or an upload failed.
        """
        from normalizers.envelope import Source
        from pipeline.sources.files import list_trace_files, merge_reads, read_trace_file
        from pipeline.sources.importer import Importer
        from pipeline.sources.upload import UploadError
        from sinks.base import SinkUnavailable

        _quiet_logs()
        files = list_trace_files(path)
        reads = [read_trace_file(f) for f in files]
        rejected = [(str(r.path), r.kind, r.error) for r in reads if r.error]
        traces = merge_reads(reads)
        store = _store(state_dir, registry_url_env)

        async def run():
            results = []
            if preview:
                importer = Importer(store, Source(id=source_name, kind="file"), None, trigger="import",
                                    repository=repository)
                return [await importer.run(t) for t in traces], ""
            async with open_destination(state_dir, kafka_bootstrap_servers, upload, endpoint, token_env,
                                        security_flags) as dest:
                importer = Importer(store, Source(id=source_name, kind="file"), dest, trigger="import",
                                    repository=repository)
                for t in traces:
                    results.append(await importer.run(t))
                return results, dest.describe()

        try:
            results, where = asyncio.run(run())
        except UploadError as exc:
            raise click.ClickException(f"upload failed — {exc}") from None
        except SinkUnavailable as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            store.close()
        rejected += [(r.item, r.kind or "bad shape", r.reason or "") for r in results if r.status == "rejected"]
        _print_results([r for r in results if r.status != "rejected"], rejected, as_json, preview=preview,
                       where=where)
        if rejected:
            raise SystemExit(1)

    @main.group()
    def connect() -> None:
        """Register a trace source in the registry (<state-dir>/sources.db, or Postgres: --registry-url-env).

        Credentials are never stored: name the environment variable that holds them (or a secret
        reference). Then: `trace-source test NAME`, `sync NAME`, `watch NAME`; `status` lists sources.
        """

    from pipeline.sources.config import CONFIGS

    for provider, model in CONFIGS.items():
        _add_connect(connect, provider, model)

    @main.command("test")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_state_dir_option
    def test_cmd(name: str, as_json: bool, state_dir: Path, registry_url_env: str) -> None:
        """Validate a registered source: reachable, credential (read-only where it can tell), mapping against
        the real columns, one page read and normalized — every problem named. Exit 1 when it is not usable."""
        from pipeline.sources.store import SourceNotFound
        from pipeline.sources.sync import test_source

        _quiet_logs()
        store = _store(state_dir, registry_url_env)
        try:
            checks = asyncio.run(test_source(store, name))
        except SourceNotFound as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        finally:
            store.close()
        ok = all(c.ok or not c.fatal for c in checks)
        if as_json:
            click.echo(json.dumps({"source": name, "ok": ok, "checks": [
                {"check": c.what, "ok": c.ok, "detail": c.detail, "fatal": c.fatal} for c in checks]}, indent=2))
        else:
            for c in checks:
                mark = "ok  " if c.ok else ("FAIL" if c.fatal else "warn")
                click.echo(f"{mark}  {c.what}: {c.detail}")
            click.echo(f"{name}: {'valid' if ok else 'invalid'}")
        if not ok:
            raise SystemExit(1)

    @main.command("sync")
    @click.argument("name")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_destination_options
    @_state_dir_option
    def sync_cmd(name: str, as_json: bool, kafka_bootstrap_servers, upload, endpoint, token_env,
                 state_dir: Path, registry_url_env: str, **security_flags) -> None:
        """Pull a registered source once, from its stored cursor, into the loop (or --upload).

        Imports every new or changed trace (a trace updated after import becomes a new envelope version),
        records rejected items, moves the cursor page by page. A source that cannot be read is marked
        blocked with the error (exit 1); `trace-source status` shows it.
        """
        from pipeline.sources.readers import SourceError
        from pipeline.sources.store import SourceNotFound
        from pipeline.sources.sync import sync_once
        from pipeline.sources.upload import UploadError
        from sinks.base import SinkUnavailable

        _quiet_logs()
        store = _store(state_dir, registry_url_env)

        async def run():
            async with open_destination(state_dir, kafka_bootstrap_servers, upload, endpoint, token_env,
                                        security_flags) as dest:
                return await sync_once(store, name, dest), dest.describe()

        try:
            result, where = asyncio.run(run())
        except (SourceNotFound, SourceError) as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        except (UploadError, SinkUnavailable) as exc:
            raise click.ClickException(f"{name}: {exc}") from None
        finally:
            store.close()
        _print_results([r for r in result.results if r.status != "rejected"], result.rejected, as_json,
                       where=where)
        if result.error:
            click.echo(f"{name}: blocked — {result.error}", err=True)
            raise SystemExit(1)

    @main.command("watch")
    @click.argument("name")
    @click.option("--interval-s", type=click.FloatRange(min=0.05), default=None,
                  help="Seconds between pulls [default: the source's --interval-s, 30].")
    @_destination_options
    @_state_dir_option
    def watch_cmd(name: str, interval_s, kafka_bootstrap_servers, upload, endpoint, token_env,
                  state_dir: Path, registry_url_env: str, **security_flags) -> None:
        """Keep pulling a registered source every --interval-s until SIGTERM / Ctrl-C.

        Each pull is a `sync`. Killed at any point, a restart re-reads at most the page it was in and
        imports nothing twice. Push sources (OTLP) are not watched: `trace-source serve` is their path.
        """
        import signal

        from pipeline.sources.readers import SourceError
        from pipeline.sources.store import SourceNotFound
        from pipeline.sources.sync import watch
        from trace_source.logging import configure

        configure("info", "json")
        store = _store(state_dir, registry_url_env)
        from pipeline.sources.sync import PUSH_PROVIDERS, push_error

        try:
            if store.get(name).provider in PUSH_PROVIDERS:
                raise click.ClickException(str(push_error(name)))
        except SourceNotFound as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        except click.ClickException:
            store.close()
            raise

        async def run():
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            async with open_destination(state_dir, kafka_bootstrap_servers, upload, endpoint, token_env,
                                        security_flags) as dest:
                from pipeline.sources.sync import log

                log.info("watching", source=name, destination=dest.describe())
                await watch(store, name, dest, stop, interval_s=interval_s)

        try:
            asyncio.run(run())
        except (SourceNotFound, SourceError) as exc:
            raise click.ClickException(str(exc).strip("'\"")) from None
        finally:
            store.close()


def _add_connect(group: click.Group, provider: str, model) -> None:
    from trace_source.cli import _option_for

    def command(name: str, state_dir: Path, registry_url_env: str, **flags) -> None:
        from pydantic import ValidationError

        given = {k: v for k, v in flags.items() if v is not None and v != ()}
        try:
            config = model(**given)
        except (ValidationError, ValueError) as exc:
            raise click.UsageError(f"invalid {provider} source:\n{exc}") from None
        store = _store(state_dir, registry_url_env)
        try:
            new = store.register(name, provider, config.model_dump(mode="json"))
        finally:
            store.close()
        click.echo(f"{'registered' if new else 'updated'} {provider} source {name!r} in {store.path}; "
                   f"next: trace-source test {name}")

    command.__click_params__ = []
    for field_name, field in reversed(list(model.model_fields.items())):
        option = _option_for(field_name, field, env="-")
        option.help = option.help.replace(" [env -; ", " [")
        command.__click_params__.append(option)
    command = click.option("--name", required=True, help="The source's name: its id on every envelope and in "
                           "status.")(command)
    command = _state_dir_option(command)
    doc = (model.__doc__ or "").strip()
    command.__doc__ = f"{doc}\n\nRegisters the source under --name (re-registering keeps its cursor)."
    group.command(provider)(command)


#: LoopSettings fields autoloop does not take as flags (it sets them itself, or they concern a cluster).
_AUTOLOOP_SKIP = {"kafka_bootstrap_servers", "state_dir", "repo", "database_url_env", "artifact_dir",
                  "envelope_store_dir", "otlp_endpoint", "in_process_stages", "traces_topic", "grades_topic",
                  "seeds_topic", "reproductions_topic", "fixes_topic", "dlq_topic", "lease_s", "max_attempts",
                  "poll_max_records", "shutdown_grace_s", "work_dir"}


def register_autoloop(main: click.Group) -> None:
    from pipeline.loop_settings import fields_for
    from trace_source.cli import _loop_options, load_loop_settings

    names = tuple(n for n in fields_for(serve=True) if n not in _AUTOLOOP_SKIP)

    @main.command("autoloop")
    @click.argument("watch_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--repo", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="The agent's repository (its trace-source/ or archal/ contract folder); local path.")
    @click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                  help="Where the loop keeps its state and artifacts [default: <repo>/.trace-source].")
    @click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
                  help="OTLP/HTTP port of the loop's receiver (0 = a free one; the reproduction harness exports "
                       "there).")
    @click.option("--interval-s", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
                  help="Seconds between two scans of WATCH_DIR.")
    @click.option("--foreground", is_flag=True, help="Stay attached (logs on stderr) instead of running in the "
                  "background with logs under <state-dir>/logs/.")
    @click.option("--check", "check_only", is_flag=True, help="Validate the setup and start nothing: the "
                  "repository, the contract, a harness smoke test with a trivial task, the policy.")
    @_loop_options(only=names)
    def autoloop_cmd(watch_dir: Path, repo: Path, state_dir: Path | None, port: int, interval_s: float,
                     foreground: bool, check_only: bool, **flags) -> None:
        """The local loop: watch WATCH_DIR for trace files and run every phase with repo-local artifacts.

        \b
        WATCH_DIR holds one trace file per run (OTLP JSON or protobuf as the SDK and Collector file
        exporters write them, JSON lines, or trace-source envelopes). Each new file is imported once
        (by envelope key; a changed file is a new envelope version) and graded, seeded, reproduced with
        the repository's harness and fixed as far as --execution-policy allows — the same loop `serve`
        runs, with its OTLP receiver on --port so each reproduction's own trace is graded too.
        Background by default: registered in <state-dir>/autoloops.json with its pid, logs in
        <state-dir>/logs/. `trace-source detach WATCH_DIR --repo REPO` stops it; `trace-source status
        --state-dir <repo>/.trace-source` and `reprocess` work on its state.
        """
        import subprocess
        import sys
        import time

        from pipeline.sources import autoloop as al
        from trace_source.settings import ServeSettings

        state = (state_dir or al.default_state_dir(repo)).resolve()
        loop_settings = load_loop_settings({**flags, "state_dir": state, "repo": str(repo.resolve())})
        if check_only:
            report = asyncio.run(al.check_setup(watch_dir, loop_settings))
            for what, ok, detail in report.lines:
                click.echo(f"{'ok  ' if ok else 'FAIL'}  {what}: {detail}")
            click.echo("ready" if report.ok else "not ready")
            raise SystemExit(0 if report.ok else 1)
        if not watch_dir.is_dir():
            raise click.UsageError(f"{watch_dir} is not a directory")
        existing = al.find(state, watch_dir)
        if existing is not None and existing["running"] and existing["pid"] != os.getpid():
            raise click.ClickException(f"an autoloop already watches {watch_dir.resolve()} (pid {existing['pid']}, "
                                       f"OTLP {existing.get('otlp_endpoint')}); stop it with `trace-source detach "
                                       f"{watch_dir} --repo {repo}`")
        if foreground:
            from trace_source.logging import configure

            configure(loop_settings.log_level, loop_settings.log_format)
            serve_settings = ServeSettings(port=port, grpc_enabled=False, state_dir=state,
                                           log_level=loop_settings.log_level, log_format=loop_settings.log_format)
            asyncio.run(al.run_autoloop(watch_dir, serve_settings, loop_settings, interval_s=interval_s,
                                        log_path=os.environ.get("TRACE_SOURCE_AUTOLOOP_LOG")))
            return
        logs = state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{al.source_name(watch_dir)}.log"
        argv = [sys.executable, "-m", "trace_source.cli", *sys.argv[1:], "--foreground"]
        with open(log_path, "ab") as out:
            child = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
                                     env={**os.environ, "TRACE_SOURCE_AUTOLOOP_LOG": str(log_path)})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            entry = al.find(state, watch_dir)
            if entry is not None and entry["pid"] == child.pid:
                click.echo(f"autoloop running in the background (pid {child.pid}): {entry['watch_dir']} -> "
                           f"{state}; OTLP {entry['otlp_endpoint']}; log {log_path}\n"
                           f"stop it with: trace-source detach {watch_dir} --repo {repo}")
                return
            if child.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                raise click.ClickException(f"the autoloop exited with {child.returncode}:\n{tail}")
            time.sleep(0.1)
        child.terminate()
        raise click.ClickException(f"the autoloop did not start within 60 s; see {log_path}")

    @main.command("detach")
    @click.argument("watch_dir", type=click.Path(file_okay=False, path_type=Path))
    @click.option("--repo", type=click.Path(file_okay=False, path_type=Path), required=True,
                  help="The repository the autoloop was started with.")
    @click.option("--state-dir", type=click.Path(path_type=Path), default=None,
                  help="Its state dir, when not the default <repo>/.trace-source.")
    @click.option("--timeout-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
                  help="How long to wait after SIGTERM before SIGKILL.")
    def detach_cmd(watch_dir: Path, repo: Path, state_dir: Path | None, timeout_s: float) -> None:
        """Stop the autoloop watching WATCH_DIR: SIGTERM (it finishes what is in flight) and unregister it."""
        from pipeline.sources import autoloop as al

        state = (state_dir or al.default_state_dir(repo)).resolve()
        try:
            entry = al.detach(state, watch_dir, timeout_s=timeout_s)
        except al.DetachError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"{'stopped' if entry['was_running'] else 'removed (was not running)'}: autoloop pid "
                   f"{entry['pid']} on {entry['watch_dir']}")
