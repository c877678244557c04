"""Settings of the loop after the envelope (grade → seed → reproduce → fix), shared by ``serve`` (embedded default,
stages in-process) and every ``trace-source worker <stage>``.

Precedence: command-line flags, then environment variables ``TRACE_SOURCE_<NAME>`` (the same prefix as ``serve``,
so one environment configures the receiver and every worker: e.g. ``TRACE_SOURCE_EXECUTION_POLICY=grade``), then the
YAML file of ``--config`` / ``TRACE_SOURCE_CONFIG`` (keys = field names), then defaults. Durations are seconds.

Credentials are never settings: the database URL and API keys are read from the environment variables *named* by
``database_url_env`` and ``judge_api_key_env``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "TRACE_SOURCE_"

TRACES_TOPIC = "trace-source.traces"
GRADES_TOPIC = "trace-source.grades"
SEEDS_TOPIC = "trace-source.seeds"
REPRODUCTIONS_TOPIC = "trace-source.reproductions"
FIXES_TOPIC = "trace-source.fixes"
DLQ_TOPIC = "trace-source.dlq"


class _YamlFile(PydanticBaseSettingsSource):
    """Keys of the YAML config file named by ``TRACE_SOURCE_CONFIG`` that are fields of this model (the same file
    also holds ``serve``'s own settings)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(ENV_PREFIX + "CONFIG")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must be a YAML mapping of setting: value")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        return {k: v for k, v in data.items() if k in self.settings_cls.model_fields}


class LoopSettings(BaseSettings):
    """Everything the loop's stages can be told; ``trace-source worker grade --help`` documents each field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True)

    # -- where ------------------------------------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...). Unset = the embedded log under state_dir.")
    state_dir: Path = Field(Path(".trace-source"), description=(
        "Embedded data directory: spans.db (the log), ledger.db, runs.jsonl (the journal), grades/, seeds/, "
        "runs/, fixes/."))
    artifact_dir: Path | None = Field(None, description=(
        "Artifact store root for grades/, seeds/, runs/, fixes/ (a shared volume in a cluster). Default: the "
        "state dir."))
    envelope_store_dir: Path | None = Field(None, description=(
        "Where claim-checked envelopes are read from (the assembler's --artifact-dir). Default: artifact_dir "
        "when set (one shared store in a cluster), else <state_dir>/artifacts (the embedded assembler's)."))
    database_url_env: str = Field("TRACE_SOURCE_DATABASE_URL", description=(
        "Name of the environment variable holding the Postgres URL of the ledger and journal "
        "(postgresql://user:pass@host/db). Unset variable = SQLite ledger and runs.jsonl under state_dir, which "
        "only one process per stage may use; with Kafka a Postgres URL is required."))

    # -- what -------------------------------------------------------------------------------------------------------
    execution_policy: Literal["observe", "grade", "reproduce", "fix"] = Field("fix", description=(
        "How far a run goes: observe (import only), grade, reproduce (grade, seed, reproduce), fix (all, the "
        "default; fixing also needs --allow-external-execution)."))
    allow_external_execution: bool = Field(False, description=(
        "Allow the fix stage to run the coding-agent, validation and pull-request commands. Without it a "
        "reproduced failure ends blocked with this reason."))
    repo: str | None = Field(None, description=(
        "The agent's repository — a local path, or a git URL cloned into <state_dir>/repos/ — holding the "
        "contract folder (trace-source/ or archal/): scenario.md success criteria are checked when grading; "
        "seed, reproduce and fix need it."))
    repository: str | None = Field(None, description=(
        "The repository's owner/name, when its origin remote does not say it; a trace whose envelope names "
        "another repository is not reproduced with this one (blocked, with both names)."))
    repo_ref: str = Field("HEAD", description=(
        "Revision reproduced when the trace carries none (resource attribute vcs.ref.head.revision)."))
    contract_dir: str = Field("trace-source", description=(
        "Name of the contract folder at the repository root; when absent, archal/ is read."))

    # -- the judge --------------------------------------------------------------------------------------------------
    judge_model: str | None = Field(None, description=(
        "Model of the optional LLM judge at --judge-base-url (OpenAI-compatible chat completions)."))
    judge_base_url: str | None = Field(None, description="Base URL of the judge's API, e.g. https://api.openai.com/v1.")
    judge_api_key_env: str = Field("TRACE_SOURCE_JUDGE_API_KEY", description=(
        "Name of the environment variable holding the judge's API key."))
    judge_command: str | None = Field(None, description=(
        "A command that reads the envelope JSON on stdin and prints a verdict JSON (instead of the HTTP judge)."))
    judge_timeout_s: float = Field(60.0, gt=0, description="Deadline of one judge call.")

    # -- reproduce --------------------------------------------------------------------------------------------------
    attempts: int = Field(3, ge=1, le=20, description=(
        "Harness runs per reproduction (and per fix proof): all show the failure = reproduced, some = flaky."))
    pass_env: str = Field("", description=(
        "Comma-separated names of environment variables passed to the harness (e.g. OPENAI_API_KEY); nothing "
        "else of the worker's environment is, except PATH, HOME and LANG. Their values are masked in artifacts."))
    otlp_endpoint: str | None = Field(None, description=(
        "OTLP/HTTP endpoint of trace-source given to the harness (OTEL_EXPORTER_OTLP_ENDPOINT), so each attempt's "
        "own trace is graded. The embedded serve sets its own; a reproduce worker must be told the receiver's."))
    trace_wait_s: float = Field(180.0, gt=0, description=(
        "How long after an attempt ends its own graded trace is waited for (assembly quiet period + grading)."))
    work_dir: Path | None = Field(None, description=(
        "Where working copies are made (default: <state_dir>/work). Attempt directories stay there for "
        "inspection until the next reprocess."))

    # -- fix ------------------------------------------------------------------------------------------------------
    fix_command: str | None = Field(None, description=(
        "The coding agent that patches the working copy, run by /bin/sh -c in it, e.g. 'aider --yes --message-file "
        "\"$TRACE_SOURCE_FIX_PROMPT\"' or 'claude -p \"$(cat $TRACE_SOURCE_FIX_PROMPT)\"'. Its environment: PATH, "
        "HOME, LANG, --pass-env and TRACE_SOURCE_FIX_* (docs/loop.md). Runs only with --allow-external-execution."))
    validation_command: str | None = Field(None, description=(
        "The repository's validation (e.g. 'python -m pytest -q'), run by /bin/sh -c in the patched copy; a fix is "
        "proven only when it passes and the reproduction no longer fails. Unset = the reproduction alone proves."))
    max_fix_attempts: int = Field(2, ge=1, le=10, description="Fix attempts before the run ends budget_exhausted.")
    fix_timeout_s: float = Field(1800.0, gt=0, description="Deadline of one fix command run (process group killed).")
    validation_timeout_s: float = Field(1800.0, gt=0, description="Deadline of one validation run.")
    pr_command: str | None = Field(None, description=(
        "Open the pull request with this command (/bin/sh -c, e.g. 'gh pr create --draft --fill') instead of the "
        "forge's REST API; it gets TRACE_SOURCE_FIX_BRANCH, TRACE_SOURCE_PR_TITLE, TRACE_SOURCE_PR_BODY (a file), "
        "TRACE_SOURCE_PR_BASE; the last URL it prints is the pull request."))
    forge: Literal["auto", "github", "gitea"] = Field("auto", description=(
        "The forge's REST API: github, gitea (also Forgejo), or auto (github for github.com remotes, gitea when "
        "--forge-api-url ends with /api/v1)."))
    forge_api_url: str | None = Field(None, description=(
        "Base URL of the forge's API (https://api.github.com for github.com; https://host/api/v1 for Gitea)."))
    forge_token_env: str = Field("TRACE_SOURCE_FORGE_TOKEN", description=(
        "Name of the environment variable holding the forge token (push over HTTPS and the REST API)."))
    push_remote: str = Field("origin", description="Remote of the repository the fix branch is pushed to.")
    base_branch: str | None = Field(None, description=(
        "Branch the pull request targets (default: the forge's default branch). Never pushed to."))
    git_author_name: str = Field("trace-source", description="Author name of fix commits.")
    git_author_email: str = Field("trace-source@users.noreply.localhost", description="Author email of fix commits.")

    # -- topics -----------------------------------------------------------------------------------------------------
    traces_topic: str = Field(TRACES_TOPIC, description="Envelopes (the assembler's output, the grade stage's input).")
    grades_topic: str = Field(GRADES_TOPIC, description="Grade documents (key = trace id).")
    seeds_topic: str = Field(SEEDS_TOPIC, description="Seed results.")
    reproductions_topic: str = Field(REPRODUCTIONS_TOPIC, description="Reproduction results.")
    fixes_topic: str = Field(FIXES_TOPIC, description="Fix results.")
    dlq_topic: str = Field(DLQ_TOPIC, description="Dead-letter topic (input no stage can work on, with the error).")
    create_topics: bool = Field(True, description="Create the stage's output and DLQ topics at start-up if missing.")
    topic_partitions: int | None = Field(None, ge=1, description=(
        "Partitions of created topics (default: as many as the stage's input topic)."))
    replication_factor: int | None = Field(None, ge=1, description="Replication factor of created topics.")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field("zstd", description="Producer codec.")
    max_message_bytes: int = Field(1_048_576, ge=1024, description="Largest record published (bytes).")

    # -- the runner -------------------------------------------------------------------------------------------------
    lease_s: float = Field(60.0, gt=0, description=(
        "Ledger lease of a claimed record, renewed every third of it while the stage works; a worker that dies "
        "holds the record at most this long."))
    max_attempts: int = Field(5, ge=1, description=(
        "Claims of one record (retries after transient errors, take-overs) before it goes to the DLQ."))
    poll_max_records: int = Field(100, ge=1, description="Records read per poll.")
    concurrency: int | None = Field(None, ge=1, le=256, description=(
        "Records one worker works on at once (different traces; one trace's records stay in order). Default: the "
        "stage's own — 8 for grade, 4 for seed, 1 for reproduce and fix, which run the repository's commands."))
    max_poll_interval_s: float = Field(1800.0, gt=0, description=(
        "Kafka: longest time between polls before the consumer leaves its group (long reproductions need more)."))
    shutdown_grace_s: float = Field(30.0, ge=0, description=(
        "On SIGTERM, time given to work in progress before it is cancelled and its claim released."))
    consumer_group: str | None = Field(None, description=(
        "Consumer group id (default: the stage's own: trace-source-grader, -seeder, -reproducer, -fixer). A new "
        "group re-reads the input topic from the start; the ledger makes that a replay of stored results."))
    group_instance_id: str | None = Field(None, description=(
        "Static group membership id (e.g. the pod name): a restarted worker gets its partitions back at once."))
    metrics_host: str = Field("0.0.0.0", description="Address of the worker's /metrics, /healthz, /readyz server.")
    metrics_port: int = Field(9465, ge=0, le=65535, description="Port of the worker's metrics server (0 = any free).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "console"] = Field("json", description="Log format.")
    in_process_stages: bool = Field(True, description=(
        "Embedded serve: run the loop's stages in-process. Off when `trace-source worker <stage>` processes run "
        "against the same state dir instead."))

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFile(settings_cls)

    # -- derived ----------------------------------------------------------------------------------------------------

    @property
    def artifact_root(self) -> Path:
        """Root of grades/, seeds/, runs/, fixes/."""
        return self.artifact_dir if self.artifact_dir is not None else self.state_dir

    @property
    def envelope_root(self) -> Path:
        """Root the claim-check references of envelopes are relative to."""
        if self.envelope_store_dir is not None:
            return self.envelope_store_dir
        return self.artifact_dir if self.artifact_dir is not None else self.state_dir / "artifacts"

    def database_url(self) -> str | None:
        """The ledger/journal database URL from the environment variable named by ``database_url_env``."""
        return os.environ.get(self.database_url_env) or None

    def forge_token(self) -> str | None:
        return os.environ.get(self.forge_token_env) or None

    def judge_api_key(self) -> str | None:
        return os.environ.get(self.judge_api_key_env) or None

    def pass_env_names(self) -> list[str]:
        return [n.strip() for n in self.pass_env.split(",") if n.strip()]

    @property
    def work_root(self) -> Path:
        return self.work_dir if self.work_dir is not None else self.state_dir / "work"

    def judge_configured(self) -> bool:
        return bool(self.judge_command or (self.judge_model and self.judge_base_url))


def config_version(*parts: object) -> str:
    """A stage's config version: the first 16 hex of sha256 over ``parts`` (their ``repr``), so any change of a
    result-changing setting gives new stage keys."""
    return hashlib.sha256("\n".join(repr(p) for p in parts).encode()).hexdigest()[:16]


#: Fields only a stage worker has (``serve`` runs the stages in-process on the embedded log, with its own
#: metrics endpoint and no topics to create).
WORKER_ONLY: frozenset[str] = frozenset({
    "consumer_group", "metrics_host", "metrics_port", "group_instance_id", "create_topics", "topic_partitions",
    "replication_factor", "compression", "max_message_bytes", "max_poll_interval_s"})

#: Fields that concern one stage only: ``worker <stage> --help`` shows them for that stage alone.
_REPRODUCING = ("reproduce", "fix")
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "judge_model": ("grade",), "judge_base_url": ("grade",), "judge_api_key_env": ("grade",),
    "judge_command": ("grade",), "judge_timeout_s": ("grade",),
    "attempts": _REPRODUCING, "pass_env": _REPRODUCING, "otlp_endpoint": _REPRODUCING,
    "trace_wait_s": _REPRODUCING, "work_dir": _REPRODUCING, "repo_ref": _REPRODUCING,
    **{name: ("fix",) for name in (
        "fix_command", "validation_command", "max_fix_attempts", "fix_timeout_s", "validation_timeout_s",
        "pr_command", "forge", "forge_api_url", "forge_token_env", "push_remote", "base_branch", "git_author_name",
        "git_author_email")},
}


#: Fields only the embedded ``serve`` has.
SERVE_ONLY: frozenset[str] = frozenset({"in_process_stages"})


def fields_for(*, stage: str | None = None, serve: bool = False) -> list[str]:
    """Names of the fields a command takes: ``worker <stage>`` (``stage``), or ``serve`` (every stage's)."""
    out = []
    for name in LoopSettings.model_fields:
        if (serve and name in WORKER_ONLY) or (not serve and name in SERVE_ONLY):
            continue
        if not serve and name in STAGE_FIELDS and stage not in STAGE_FIELDS[name]:
            continue
        out.append(name)
    return out
