"""The ``trace-source`` command line (click). Thin: it parses, launches and observes; the work lives in packages.

``serve``'s flags are generated from :class:`trace_source.settings.ServeSettings`, so ``--help``, the environment
variables and the config-file keys always name the same settings.
"""

from __future__ import annotations

import asyncio
import os
import sys
import types
import typing
from pathlib import Path

import click
from pydantic import ValidationError

from sinks.kafka_security import SECURITY_FIELDS
from trace_source import __version__
from trace_source.settings import ENV_PREFIX, ServeSettings


def _option_for(name: str, field, env: str | None = None) -> click.Option:
    flag = "--" + name.replace("_", "-")
    env = env or ENV_PREFIX + name.upper()
    default = field.get_default(call_default_factory=True)
    shown = "unset" if default in (None, {}, []) else default
    help_text = f"{field.description} [env {env}; default: {shown}]"
    annotation = field.annotation
    if annotation is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_text)
    if typing.get_origin(annotation) is typing.Literal:
        return click.Option([flag, name], type=click.Choice(typing.get_args(annotation)), default=None,
                            help=help_text)
    if typing.get_origin(annotation) is list:
        return click.Option([flag, name], multiple=True, default=None, help=help_text + " (repeatable)")
    if typing.get_origin(annotation) is dict:
        return click.Option([flag, name], default=None, metavar="TOKEN=SOURCE,...", help=help_text)
    base = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        base = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(base) is typing.Literal:  # Optional[Literal[...]]
        return click.Option([flag, name], type=click.Choice(typing.get_args(base)), default=None, help=help_text)
    ptype = {int: int, float: float, Path: click.Path(path_type=Path)}.get(base, str)
    return click.Option([flag, name], type=ptype, default=None, help=help_text)


def _security_last(fields: dict) -> list[str]:
    """Field names with the shared Kafka security fields moved to the end (``--help`` reads better)."""
    return [n for n in fields if n not in SECURITY_FIELDS] + [n for n in SECURITY_FIELDS if n in fields]


def _serve_options(func):
    for name in reversed(_security_last(ServeSettings.model_fields)):
        func.__click_params__ = getattr(func, "__click_params__", [])
        func.__click_params__.append(_option_for(name, ServeSettings.model_fields[name]))
    return func


def _kafka_security_options(func):
    """The Kafka TLS / SASL flags (:class:`sinks.kafka_security.KafkaSecurityFields`) for commands that only read
    or administer Kafka; resolve them with :func:`load_kafka_security`."""
    from sinks.kafka_security import KafkaSecurityFields

    for name in reversed(list(KafkaSecurityFields.model_fields)):
        func.__click_params__ = getattr(func, "__click_params__", [])
        func.__click_params__.append(_option_for(name, KafkaSecurityFields.model_fields[name]))
    return func


def load_kafka_security(flags: dict):
    """:class:`sinks.kafka_security.KafkaSecurity` from the given security flags, ``TRACE_SOURCE_KAFKA_*`` variables
    and defaults; exits with a usage error naming the setting when it cannot work. Removes the flags from ``flags``."""
    from trace_source.settings import KafkaClientSettings

    given = {k: flags.pop(k) for k in SECURITY_FIELDS if k in flags}
    try:
        return KafkaClientSettings(**{k: v for k, v in given.items() if v is not None}).kafka_security()
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from None


def _loop_options(*, stage: str | None = None, serve: bool = False, only: tuple[str, ...] | None = None):
    """Options of :class:`pipeline.loop_settings.LoopSettings` for ``serve`` (fields it does not have already),
    ``worker <stage>``, or just the fields in ``only``."""

    def decorate(func):
        from pipeline.loop_settings import LoopSettings, fields_for

        names = only or fields_for(stage=stage, serve=serve)
        for name in reversed(names):
            if serve and name in ServeSettings.model_fields:
                continue  # the same setting, given once
            func.__click_params__ = getattr(func, "__click_params__", [])
            func.__click_params__.append(_option_for(name, LoopSettings.model_fields[name]))
        return func

    return decorate


def load_loop_settings(flags: dict):
    """:class:`LoopSettings` from the given flags (only those set), env, config file; exits on bad values."""
    from pipeline.loop_settings import LoopSettings

    given = {k: v for k, v in flags.items() if v is not None and v != () and k in LoopSettings.model_fields}
    try:
        return LoopSettings(**given)
    except (ValidationError, ValueError, OSError) as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from None


def load_settings(config: Path | None, flags: dict) -> ServeSettings:
    """Settings from flags (only those given), env, config file; exits with a readable message on bad values."""
    if config is not None:
        os.environ[ENV_PREFIX + "CONFIG"] = str(config)
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return ServeSettings(**given)
    except (ValidationError, ValueError, OSError) as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="trace-source")
def main() -> None:
    """trace-source: an OpenTelemetry-native streaming trace receiver for AI agents.

    Point your agent's OTLP exporter at it (OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4319); every span lands
    durably on Kafka (with --kafka-bootstrap-servers) or in a local durable log under --state-dir.
    """


@main.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"YAML file of settings (keys as the flag names with underscores) [env {ENV_PREFIX}CONFIG].")
@_serve_options
@_loop_options(serve=True)
def serve(config: Path | None, **flags) -> None:
    """Receive OTLP over HTTP (protobuf and JSON) and gRPC, and land every span durably.

    \b
    Endpoints: POST /v1/traces, POST /v1/logs on --port (OTLP/HTTP); TraceService and LogsService
    Export on --grpc-port (OTLP/gRPC); GET /healthz, /readyz and /metrics (Prometheus) on --port;
    POST /v1/envelopes on --port (finished envelopes from `trace-source import/sync --upload`, once per
    Idempotency-Key, bearer tokens as for OTLP).
    A 2xx/OK is sent only after the data is durable (Kafka acks=all, or committed to the local log).
    Embedded default (no broker): the assembler and the loop's stages run in-process — every run is
    graded, and seeded / reproduced / fixed as far as --execution-policy allows; see `trace-source status`.
    With Kafka, run them as `trace-source worker <stage>` instead.
    Precedence: flags > TRACE_SOURCE_* environment variables > --config file > defaults.
    """
    from trace_source.settings import ServeSettings as _Serve

    shared = ("kafka_bootstrap_servers", "state_dir", *SECURITY_FIELDS)
    loop_flags = {k: v for k, v in flags.items() if k not in _Serve.model_fields or k in shared}
    flags = {k: v for k, v in flags.items() if k in _Serve.model_fields}
    settings = load_settings(config, flags)
    loop_settings = load_loop_settings({**loop_flags, "kafka_bootstrap_servers": settings.kafka_bootstrap_servers,
                                        "state_dir": settings.state_dir, "log_level": settings.log_level,
                                        "log_format": settings.log_format})
    from trace_source.logging import configure
    from trace_source.serve import run

    from aiokafka.errors import KafkaError

    from sinks.base import SinkUnavailable

    from pipeline.journal import JournalError
    from pipeline.ledger import LedgerError
    from receiver.tls import TlsConfigError

    from trace_source.workers import supervise, worker_count

    configure(settings.log_level, settings.log_format)
    try:
        workers = worker_count(settings)
        if workers > 1:
            sys.exit(supervise(settings, workers))
        asyncio.run(run(settings, loop_settings=loop_settings))
    except (OSError, TlsConfigError, SinkUnavailable, KafkaError, LedgerError, JournalError) as exc:  # start-up
        raise click.ClickException(f"cannot start: {exc}") from None


@main.command()
@click.option("--kafka-bootstrap-servers", envvar="TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS", default=None,
              help="Read the Kafka topic instead of the embedded log [env TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS].")
@click.option("--topic", envvar="TRACE_SOURCE_KAFKA_TOPIC", default="trace-source.spans", show_default=True,
              help="Topic (or embedded-log topic) to read.")
@click.option("--state-dir", envvar="TRACE_SOURCE_STATE_DIR", type=click.Path(path_type=Path),
              default=Path(".trace-source"), show_default=True, help="Embedded log's directory.")
@click.option("--from-beginning", is_flag=True, help="Start at the oldest record instead of new ones only.")
@click.option("--max-records", type=click.IntRange(min=1), default=None,
              help="Stop after printing this many records (spans / log records).")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=None,
              help="Stop after this many seconds without new data.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per span / log record (OTLP JSON ids).")
@_kafka_security_options
def tail(kafka_bootstrap_servers, topic, state_dir, from_beginning, max_records, idle_timeout, as_json,
         **security_flags) -> None:
    """Print what arrived: one line per span (trace id, span id, name, status, source).

    Reads the embedded log under --state-dir, or the Kafka topic with --kafka-bootstrap-servers. Follows new data
    until interrupted, --max-records or --idle-timeout.
    """
    from aiokafka.errors import KafkaError

    from trace_source.tail import run_tail

    security = load_kafka_security(security_flags)
    try:
        asyncio.run(run_tail(kafka_bootstrap_servers=kafka_bootstrap_servers, topic=topic, state_dir=state_dir,
                             from_beginning=from_beginning, max_records=max_records, idle_timeout=idle_timeout,
                             as_json=as_json, out=sys.stdout, security=security))
    except KeyboardInterrupt:
        pass
    except (FileNotFoundError, KafkaError) as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def topics() -> None:
    """Manage trace-source's Kafka topics."""


@topics.command("create")
@click.option("--kafka-bootstrap-servers", envvar="TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS", required=True,
              help="Kafka bootstrap servers [env TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS].")
@click.option("--topic", envvar="TRACE_SOURCE_KAFKA_TOPIC", default="trace-source.spans", show_default=True)
@click.option("--partitions", envvar="TRACE_SOURCE_KAFKA_PARTITIONS", type=click.IntRange(min=1), default=12,
              show_default=True, help="Partition count (assembler consumers scale up to this).")
@click.option("--replication-factor", envvar="TRACE_SOURCE_KAFKA_REPLICATION_FACTOR", type=click.IntRange(min=1),
              default=None, help="Replication factor [default: min(3, brokers)].")
@click.option("--max-message-bytes", type=click.IntRange(min=1024), default=1_114_112, show_default=True,
              help="Topic max.message.bytes.")
@_kafka_security_options
def topics_create(kafka_bootstrap_servers, topic, partitions, replication_factor, max_message_bytes,
                  **security_flags) -> None:
    """Create the spans topic with the given partition count (no-op if it exists)."""
    from aiokafka.errors import KafkaError

    from sinks.kafka_admin import create_topic

    security = load_kafka_security(security_flags)
    try:
        created = asyncio.run(create_topic(kafka_bootstrap_servers, topic, partitions, replication_factor,
                                           max_request_size=max_message_bytes, security=security))
    except KafkaError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{'created' if created else 'exists'}: {topic}")


# ---------------------------------------------------------------------------------------------------------------
# Assembler: `worker assemble` and `traces` (pipeline/, trace_source/traces.py)
# ---------------------------------------------------------------------------------------------------------------

def _assembler_options(func):
    from pipeline.settings import AssemblerSettings, env_names

    for name in reversed(_security_last(AssemblerSettings.model_fields)):
        if name == "in_process":  # a setting of the embedded serve (env only), not of the worker
            continue
        func.__click_params__ = getattr(func, "__click_params__", [])
        func.__click_params__.append(_option_for(name, AssemblerSettings.model_fields[name],
                                                 env=" / ".join(env_names(name))))
    return func


@main.group()
def worker() -> None:
    """Pipeline stages as long-running consumer-group workers (one StatefulSet per stage in a cluster)."""


@worker.command("assemble")
@_assembler_options
def worker_assemble(**flags) -> None:
    """Assemble spans into trace upload envelopes (consumer group trace-source-assembler).

    \b
    Reads --input-topic, buffers spans and GenAI log records per trace, drops duplicate spans, and closes a
    trace when its root ended and it was quiet for --quiet-period-s, at --max-wait-s, or when
    --max-buffered-bytes forces the oldest out. Envelopes go to --traces-topic (key = trace id, header
    idempotency-key; bigger than --max-message-bytes: stored under --artifact-dir with a reference on the
    topic); undecodable input to --dlq-topic. Offsets are committed at the low-watermark of open traces, so a
    crash or rebalance replays them. Without Kafka it assembles the embedded log under --state-dir into
    <state-dir>/traces/<trace_id>.json (run serve with TRACE_SOURCE_ASSEMBLER_IN_PROCESS=false then).
    Serves /metrics, /healthz, /readyz on --metrics-port.
    """
    from pydantic import ValidationError

    from pipeline.settings import AssemblerSettings

    try:
        settings = AssemblerSettings(**{k: v for k, v in flags.items() if v is not None})
    except (ValidationError, ValueError) as exc:
        raise click.UsageError(f"invalid settings:\n{exc}") from None
    from aiokafka.errors import KafkaError

    from pipeline.worker import run_worker
    from trace_source.logging import configure

    configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(run_worker(settings))
    except (OSError, KafkaError) as exc:  # start-up failures: broker unreachable, no embedded log, port taken
        raise click.ClickException(f"cannot start: {exc}") from None


def _register_stage_workers() -> None:
    """``worker <stage>`` for every registered loop stage (pipeline.stages.STAGES)."""
    from pipeline.stages import STAGES

    for name, module_name in STAGES.items():
        _add_stage_worker(name, module_name)


def _add_stage_worker(name: str, module_name: str) -> None:
    import importlib.util

    spec = importlib.util.find_spec(module_name)
    doc = ""
    if spec is not None and spec.origin:
        import ast

        import re

        doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
        doc = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")  # reST roles read badly in a terminal

    @_loop_options(stage=name)
    def command(**flags) -> None:
        settings = load_loop_settings(flags)
        from aiokafka.errors import KafkaError

        from pipeline.journal import JournalError
        from pipeline.ledger import LedgerError
        from pipeline.stage_worker import SettingsError, run_stage_worker
        from trace_source.logging import configure

        configure(settings.log_level, settings.log_format)
        try:
            asyncio.run(run_stage_worker(name, settings))
        except SettingsError as exc:
            raise click.UsageError(str(exc)) from None
        except (OSError, KafkaError, LedgerError, JournalError) as exc:  # broker, database, no embedded log, port
            raise click.ClickException(f"cannot start: {exc}") from None

    summary = doc.split("\n\n")[0].replace("\n", " ") if doc else f"The {name} stage."
    rest = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
    command.__doc__ = (f"{summary}\n\n{rest}\n\nWith --kafka-bootstrap-servers it is a consumer-group member and "
                       "needs the Postgres ledger (--database-url-env); without, it works on the embedded log "
                       "under --state-dir (then start serve with --no-in-process-stages: one consumer per stage). "
                       "Serves /metrics, /healthz, /readyz on --metrics-port.")
    worker.command(name)(command)


@main.group()
def contract() -> None:
    """The repository contract the loop reproduces and fixes with (trace-source/ or archal/ folder)."""


@contract.command("check")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The agent repository's root.")
@click.option("--contract-dir", default="trace-source", show_default=True,
              help="Contract folder name (archal/ is read when it is absent).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def contract_check(repo: Path, contract_dir: str, as_json: bool) -> None:
    """Validate harness.json, scenario.md and seeds/*.json; name every problem (exit 1 on errors).

    Runs nothing: use `trace-source autoloop --check` for a harness smoke test.
    """
    import json as _json

    from pipeline.contract import load_contract

    found = load_contract(repo, contract_dir)
    if as_json:
        click.echo(_json.dumps({"repo": str(repo), "folder": str(found.folder) if found.folder else None,
                                "ok": found.ok, "problems": [{"where": p.where, "what": p.what, "fatal": p.fatal}
                                                             for p in found.problems],
                                "harness": None if found.harness is None else {
                                    "command": list(found.harness.command), "env": sorted(found.harness.env),
                                    "timeout_s": found.harness.timeout_s, "workdir": found.harness.workdir},
                                "seeds": sorted(found.seeds)}, indent=2))
    else:
        if found.folder is not None:
            click.echo(f"contract folder: {found.folder}")
        if found.harness is not None:
            click.echo(f"harness: {' '.join(found.harness.command)} (timeout {found.harness.timeout_s:g} s, "
                       f"env {', '.join(sorted(found.harness.env)) or 'none'})")
        if found.seeds:
            click.echo(f"seed templates: {', '.join(sorted(found.seeds))}")
        for p in found.problems:
            click.echo(str(p))
        click.echo("ok" if found.ok else f"{len(found.fatal())} error(s)")
    if not found.ok:
        raise SystemExit(1)


_STATUS_SOURCE = ("state_dir", "database_url_env", "kafka_bootstrap_servers")


@main.command()
@click.argument("trace", required=False)
@_loop_options(only=("state_dir", "database_url_env"))
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Latest runs shown.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(trace: str | None, limit: int, as_json: bool, **flags) -> None:
    """Where the loop stands, from the journal: counts per phase and the latest runs, or one run.

    \b
    `trace-source status`            imported, graded (failed / passed / inconclusive), later phases,
                                     blocked runs with their reasons, and the latest runs with verdicts.
    `trace-source status TRACE_ID`   one trace's latest run: its phases, artifact paths, stop reason
                                     (a unique prefix of the id is enough).
    `trace-source status SOURCE`     one registered source: validation, cursor, last sync, counts,
                                     rejected items and the last error.
    The summary also lists every registered source (sources.db) and local loop (autoloops.json).
    Reads <state-dir>/runs.jsonl, or the Postgres journal when --database-url-env names a set variable.
    """
    settings = load_loop_settings(flags)
    from pipeline.journal import JournalError
    from trace_source.status import render_run, render_source, render_summary

    try:
        text = (render_source(settings, trace, as_json=as_json) if trace else None) or (
            render_run(settings, trace, as_json=as_json) if trace
            else render_summary(settings, limit=limit, as_json=as_json))
    except LookupError as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None
    except JournalError as exc:  # e.g. the Postgres journal is unreachable
        raise click.ClickException(str(exc)) from None
    click.echo(text, nl=False)


@main.command()
@click.argument("trace")
@click.option("--phase", type=click.Choice(["grade", "seed", "reproduce", "fix"]), default=None,
              help="Phase to re-run [default: the phase the run ended in].")
@click.option("--reason", default="reprocess requested", show_default=True, help="Why (journaled).")
@_loop_options(only=("state_dir", "database_url_env", "kafka_bootstrap_servers", "execution_policy",
                     *SECURITY_FIELDS))
def reprocess(trace: str, phase: str | None, reason: str, **flags) -> None:
    """Re-run a trace's last phase after its blocker was fixed (evidence, mapping, credential, harness, forge).

    Reopens that phase's ledger row on purpose (redelivery alone never does), journals a `reprocess` event,
    and puts the phase's input back on its topic for the running stage (serve, or its worker) to pick up.
    The new run's parent is the old one; --execution-policy overrides the old run's policy.
    """
    explicit = {k: v for k, v in flags.items() if v is not None}
    settings = load_loop_settings(flags)
    from pipeline.journal import JournalError
    from pipeline.ledger import LedgerError
    from pipeline.reprocess import ReprocessError, reprocess as run_reprocess

    try:
        done = asyncio.run(run_reprocess(settings, trace, phase=phase, reason=reason,
                                         policy=explicit.get("execution_policy")))
    except (ReprocessError, LedgerError, JournalError) as exc:  # also an unreachable Postgres ledger / journal
        raise click.ClickException(str(exc)) from None
    click.echo(f"reprocessing {done.trace_id}: phase {done.phase}, new run {done.run.run_id} "
               f"(parent {done.previous_run_id}, policy {done.run.policy}) -> {done.input_topic}")


def _traces_source_options(func):
    options = [
        click.option("--kafka-bootstrap-servers", envvar="TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS", default=None,
                     help="Read the traces topic instead of <state-dir>/traces "
                          "[env TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS]."),
        click.option("--topic", envvar="TRACE_SOURCE_ASSEMBLER_TRACES_TOPIC", default="trace-source.traces",
                     show_default=True, help="Traces topic (Kafka)."),
        click.option("--state-dir", envvar="TRACE_SOURCE_STATE_DIR", type=click.Path(path_type=Path),
                     default=Path(".trace-source"), show_default=True, help="Embedded state directory."),
        click.option("--artifact-dir", envvar="TRACE_SOURCE_ASSEMBLER_ARTIFACT_DIR", type=click.Path(path_type=Path),
                     default=None, help="Artifact store for claim-checked envelopes [default: <state-dir>/artifacts]."),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                     help="Kafka: how long to wait for the topic's end offsets."),
    ]
    for option in reversed(options):
        func = option(func)
    return _kafka_security_options(func)


@main.group(invoke_without_command=True)
@_traces_source_options
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Newest N traces.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per trace (the table's fields).")
@click.pass_context
def traces(ctx, kafka_bootstrap_servers, topic, state_dir, artifact_dir, timeout, limit, as_json,
           **security_flags) -> None:
    """List assembled traces: trace id, agent, task, status, LLM / tool call counts, errors.

    Reads <state-dir>/traces/*.json (embedded), or the traces topic with --kafka-bootstrap-servers (latest
    version per trace). `trace-source traces show TRACE_ID` prints one trace.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(kafka_bootstrap_servers=kafka_bootstrap_servers, topic=topic, state_dir=state_dir,
                   artifact_dir=artifact_dir, timeout=timeout, security_flags=security_flags)
    if ctx.invoked_subcommand is not None:
        return
    from aiokafka.errors import KafkaError

    from trace_source.traces import list_traces

    source = dict(ctx.obj)
    source["security"] = load_kafka_security(source.pop("security_flags"))
    try:
        click.echo(list_traces(limit=limit, as_json=as_json, **source), nl=False)
    except (FileNotFoundError, KafkaError) as exc:
        raise click.ClickException(str(exc)) from None


@traces.command("show")
@click.argument("trace_id")
@_traces_source_options
@click.option("--json", "as_json", is_flag=True, help="The whole envelope as JSON.")
@click.pass_context
def traces_show(ctx, trace_id, as_json, **source) -> None:
    """Show one trace (a unique prefix of its id is enough): summary, LLM and tool calls, errors, span tree."""
    from trace_source.traces import show_trace

    from click.core import ParameterSource

    # Source options may come before `show` (the group's) or after it; explicit ones after it win.
    from aiokafka.errors import KafkaError

    explicit = {k: v for k, v in source.items() if ctx.get_parameter_source(k) not in (None, ParameterSource.DEFAULT)}
    security_flags = {**ctx.obj["security_flags"], **{k: explicit.pop(k) for k in SECURITY_FIELDS if k in explicit}}
    options = {**{k: v for k, v in ctx.obj.items() if k != "security_flags"}, **explicit}
    options["security"] = load_kafka_security(security_flags)
    try:
        click.echo(show_trace(trace_id, as_json=as_json, **options), nl=False)
    except (FileNotFoundError, LookupError, KafkaError) as exc:
        raise click.ClickException(str(exc).strip("'\"")) from None


_register_stage_workers()

from trace_source import sources_cli  # noqa: E402 - the source commands need _option_for above

sources_cli.register(main)


if __name__ == "__main__":  # pragma: no cover
    main()
