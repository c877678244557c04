"""Settings of ``trace-source serve`` (pydantic-settings).

Precedence, highest first: command-line flags, environment variables (``TRACE_SOURCE_<NAME>``, e.g.
``TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS``), the optional YAML config file (``--config`` / ``TRACE_SOURCE_CONFIG``,
keys are the field names below), then the defaults. Sizes are bytes, durations seconds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

MiB = 1024 * 1024
ENV_PREFIX = "TRACE_SOURCE_"


def parse_token_map(value: Any) -> dict[str, str]:
    """Bearer tokens -> source ids from a mapping, a JSON object, or ``"token1=source1,token2=source2"``.

    Raises ``ValueError`` for an entry without ``=`` or with an empty token or source id.
    """
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value).strip()
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    tokens: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        token, sep, source = entry.partition("=")
        if not sep or not token.strip() or not source.strip():
            raise ValueError(f"auth token entry must be TOKEN=SOURCE_ID, got {entry[:4]}…")
        tokens[token.strip()] = source.strip()
    return tokens


class ServeSettings(BaseSettings):
    """Everything ``serve`` can be told; ``trace-source serve --help`` documents each field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", populate_by_name=True)

    host: str = Field("127.0.0.1", description="Address both servers listen on (0.0.0.0 for all interfaces).")
    port: int = Field(4319, ge=0, le=65535, description="OTLP/HTTP port (0 = pick a free port).")
    grpc_port: int = Field(4317, ge=0, le=65535, description="OTLP/gRPC port (0 = pick a free port).")
    grpc_enabled: bool = Field(True, description="Serve OTLP/gRPC as well as OTLP/HTTP.")
    state_dir: Path = Field(Path(".trace-source"), description="Embedded default's data directory.")

    kafka_bootstrap_servers: str | None = Field(
        None, description="Kafka bootstrap servers (host:port,...). Unset = embedded durable log, no broker.")
    kafka_topic: str = Field("trace-source.spans", description="Topic for per-trace OTLP batches.")
    kafka_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "zstd", description="Producer compression codec (aiokafka runs lz4 at level 9, far slower than zstd).")
    kafka_linger_ms: int = Field(5, ge=0, description="Producer linger before sending a batch, ms.")
    kafka_create_topics: bool = Field(False, description="Create the topic at start-up if it does not exist.")
    kafka_partitions: int = Field(12, ge=1, description="Partitions when creating the topic.")
    kafka_replication_factor: int | None = Field(
        None, ge=1, description="Replication factor when creating the topic (default: min(3, brokers)).")
    max_record_bytes: int = Field(
        1_000_000, ge=1024, description="Largest per-trace record; bigger batches are cut between spans.")
    sink_timeout_s: float = Field(5.0, gt=0, description="Deadline for the sink to make a request durable.")

    max_body_bytes: int = Field(64 * MiB, ge=1024, description="Request body cap, after decompression (413).")
    max_inflight_bytes: int = Field(256 * MiB, ge=MiB, description="In-flight byte budget (503 above it).")
    retry_after_s: int = Field(2, ge=1, description="Retry-After / RetryInfo delay sent with 503, seconds.")

    auth_tokens: dict[str, str] = Field(
        default_factory=dict, description="Bearer tokens -> source ids (TOKEN=SOURCE,... or JSON). Empty = no auth.")
    auth_tokens_file: Path | None = Field(
        None, description="YAML/JSON file mapping bearer tokens to source ids (merged with auth_tokens).")
    source_id: str = Field("default", description="Source id recorded when authentication is off.")

    cors_allowed_origins: list[str] = Field(
        default_factory=list, description="Allowed CORS origins (patterns like https://*.example.com). Empty = off.")

    local_log_fsync: bool = Field(True, description="fsync the embedded log on every commit (power-loss safe).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "console"] = Field("json", description="Log format.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time to drain in-flight requests on SIGTERM.")
    workers: int | None = Field(None, ge=1, description=(
        "Receiver processes sharing the ports (SO_REUSEPORT), each with its own Kafka producer (default: the CPUs "
        "available to the container). Kafka only: the embedded log always runs one process."))

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> dict[str, str]:
        return parse_token_map(value)

    @field_validator("cors_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip().startswith("["):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _CommaFriendlyEnv(settings_cls), _YamlFile(settings_cls)

    def token_map(self) -> dict[str, str]:
        """All configured bearer tokens (``auth_tokens`` plus ``auth_tokens_file``). Raises ``ValueError``."""
        tokens = dict(self.auth_tokens)
        if self.auth_tokens_file is not None:
            data = yaml.safe_load(self.auth_tokens_file.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{self.auth_tokens_file}: expected a mapping of token: source_id")
            tokens.update(parse_token_map(data))
        return tokens


class _CommaFriendlyEnv(PydanticBaseSettingsSource):
    """Environment variables read as plain strings, so ``TRACE_SOURCE_AUTH_TOKENS=a=x,b=y`` and
    ``TRACE_SOURCE_CORS_ALLOWED_ORIGINS=https://a,https://b`` work (pydantic-settings would demand JSON)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out = {}
        for name in self.settings_cls.model_fields:
            value = os.environ.get(ENV_PREFIX + name.upper())
            if value is not None:
                out[name] = value
        return out


class _YamlFile(PydanticBaseSettingsSource):
    """The YAML config file named by ``TRACE_SOURCE_CONFIG`` (the CLI's ``--config`` sets it)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC, unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get(ENV_PREFIX + "CONFIG")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config file must be a YAML mapping of setting: value")
        return {str(k).replace("-", "_"): v for k, v in data.items()}
