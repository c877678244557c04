"""Settings of the assembler (``trace-source worker assemble``, and in-process in the embedded ``serve``).

Precedence: command-line flags, then environment variables ``TRACE_SOURCE_ASSEMBLER_<NAME>`` (e.g.
``TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S=2``), then defaults. A few settings shared with ``serve`` also read
``serve``'s variable (named in :data:`SHARED_ENV`), so one environment configures both. Sizes are bytes,
durations seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sinks.kafka_security import SECURITY_FIELDS, KafkaSecurityFields

ENV_PREFIX = "TRACE_SOURCE_ASSEMBLER_"
MiB = 1024 * 1024

#: Settings that also read ``serve``'s environment variable (second choice, after the assembler's own).
SHARED_ENV = {
    "kafka_bootstrap_servers": "TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS",
    "state_dir": "TRACE_SOURCE_STATE_DIR",
    "input_topic": "TRACE_SOURCE_KAFKA_TOPIC",
    "log_level": "TRACE_SOURCE_LOG_LEVEL",
    "log_format": "TRACE_SOURCE_LOG_FORMAT",
    # Kafka TLS / SASL: the same variables as serve's and every worker's (read by _SharedSecurityEnv).
    **{name: "TRACE_SOURCE_" + name.upper() for name in SECURITY_FIELDS},
}


def env_names(name: str) -> list[str]:
    """Environment variables read for setting ``name``, in priority order (for ``--help``)."""
    return [ENV_PREFIX + name.upper(), *([SHARED_ENV[name]] if name in SHARED_ENV else [])]


def _shared(name: str):
    return AliasChoices(name, ENV_PREFIX + name.upper(), SHARED_ENV[name])


class _SharedSecurityEnv(PydanticBaseSettingsSource):
    """``TRACE_SOURCE_KAFKA_<...>`` for the Kafka security fields, below the assembler's own variables, so one set of
    variables (or one Kubernetes Secret) configures the receiver, the assembler and the stage workers."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {name: os.environ[env] for name in SECURITY_FIELDS
                if (env := SHARED_ENV[name]) in os.environ}


class AssemblerSettings(BaseSettings, KafkaSecurityFields):
    """Everything the assembler can be told; ``trace-source worker assemble --help`` documents each field. The
    ``kafka_*`` security fields (TLS, SASL) come from :class:`sinks.kafka_security.KafkaSecurityFields`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True)

    kafka_bootstrap_servers: str | None = Field(
        None, validation_alias=_shared("kafka_bootstrap_servers"),
        description="Kafka bootstrap servers (host:port,...). Unset = the embedded log under state_dir.")
    state_dir: Path = Field(Path(".trace-source"), validation_alias=_shared("state_dir"),
                            description="Embedded data directory: spans.db, traces/<trace_id>.json, dlq/, artifacts/.")
    input_topic: str = Field("trace-source.spans", validation_alias=_shared("input_topic"),
                             description="Topic of per-trace OTLP batches to assemble (serve's --kafka-topic).")
    traces_topic: str = Field("trace-source.traces", description="Topic the envelopes are published to.")
    dlq_topic: str = Field("trace-source.dlq", description="Topic for undecodable input (error + original bytes).")
    traces_index_topic: str = Field(
        "trace-source.traces-index", description="Kafka: compacted topic indexing the envelopes per trace id, read "
                                                 "on partition assignment so that late data after a restart or "
                                                 "rebalance still becomes version N+1 of the whole trace. Empty = "
                                                 "off.")
    group_id: str = Field("trace-source-assembler", description="Consumer group id.")
    group_instance_id: str | None = Field(
        None, description="Static group membership id (e.g. the StatefulSet pod name): a restarted worker gets its "
                          "partitions back at once instead of after the session timeout.")

    quiet_period_s: float = Field(
        5.0, gt=0, description="Close a trace once its root span has ended and no new data came for this long.")
    prompt_quiet_period_s: float = Field(
        30.0, gt=0, description="Close a trace rebuilt from log records without a trace id (Claude Code events "
                                "keyed by session.id + prompt.id: no spans, so no root) once no new data came for "
                                "this long.")
    max_wait_s: float = Field(300.0, gt=0, description="Close a trace this long after its first data, whatever else.")
    max_buffered_bytes: int = Field(
        256 * MiB, ge=1, description="Memory bound: OTLP bytes of open traces; above it the oldest is closed early.")
    closed_traces_remembered: int = Field(
        10_000, ge=0, description="Recently closed trace ids kept (version, span ids) to version late spans.")
    retained_bytes: int = Field(
        64 * MiB, ge=0, description="OTLP bytes of recently closed traces kept so a late span's new envelope "
                                    "version holds the whole trace.")
    commit_interval_s: float = Field(1.0, gt=0, description="How often the low-watermark offsets are committed.")
    poll_max_records: int = Field(500, ge=1, description="Records read per poll.")
    tick_s: float = Field(0.2, gt=0, description="Longest wait for input before close rules are checked again.")

    max_message_bytes: int = Field(
        1_048_576, ge=1024,
        description="Largest envelope record put on the traces topic; bigger ones go to the artifact store and "
                    "the topic gets a reference (claim check).")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "zstd", description="Producer compression codec for envelopes.")
    artifact_dir: Path | None = Field(
        None, description="Artifact store directory for claim-checked envelopes (default: <state_dir>/artifacts).")
    create_topics: bool = Field(True, description="Create the traces and DLQ topics at start-up if missing.")
    topic_partitions: int | None = Field(
        None, ge=1, description="Partitions of created topics (default: as many as the input topic).")
    replication_factor: int | None = Field(
        None, ge=1, description="Replication factor of created topics (default: min(3, brokers)).")
    redaction: bool = Field(True, description="Mask secrets in envelopes (normalizers.redact defaults).")

    metrics_host: str = Field("0.0.0.0", description="Address of the worker's /metrics, /healthz, /readyz server.")
    metrics_port: int = Field(9464, ge=0, le=65535, description="Port of the worker's metrics server (0 = any free).")
    in_process: bool = Field(True, description="Run the assembler inside the embedded `serve` (no broker).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_shared("log_level"), description="Log level.")
    log_format: Literal["json", "console"] = Field(
        "json", validation_alias=_shared("log_format"), description="Log format.")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _SharedSecurityEnv(settings_cls)

    @property
    def artifact_root(self) -> Path:
        """The artifact store directory in effect."""
        return self.artifact_dir if self.artifact_dir is not None else self.state_dir / "artifacts"
