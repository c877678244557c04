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
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from sinks.kafka_security import KafkaSecurityFields

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


class ServeSettings(BaseSettings, KafkaSecurityFields):
    """Everything ``serve`` can be told; ``trace-source serve --help`` documents each field. The ``kafka_*`` security
    fields (TLS, SASL) come from :class:`sinks.kafka_security.KafkaSecurityFields`."""

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
    idle_timeout_s: float = Field(
        60.0, gt=0, description="Longest a connection may go without a complete request: from connecting, or from "
                                "the previous answer, until the next request's headers are in (idle keep-alive "
                                "connections and slow headers alike; gRPC: idle connections and the TLS/HTTP2 "
                                "handshake).")
    read_timeout_s: float = Field(
        60.0, gt=0, description="OTLP/HTTP: deadline for reading a request body once its headers are in; a slower "
                                "client gets 408 and is disconnected.")
    max_connections: int = Field(
        4096, ge=0, description="Open connections per server (OTLP/HTTP, OTLP/gRPC); more are closed on arrival and "
                                "the exporters retry. 0 = no limit.")

    auth_tokens: dict[str, str] = Field(
        default_factory=dict, description="Bearer tokens -> source ids (TOKEN=SOURCE,... or JSON). Empty = no auth.")
    auth_tokens_file: Path | None = Field(
        None, description="YAML/JSON file mapping bearer tokens to source ids (merged with auth_tokens).")
    source_id: str = Field("default", description="Source id recorded when authentication is off.")

    tls_cert_file: Path | None = Field(
        None, description="PEM server certificate (chain, leaf first) for OTLP/HTTP and OTLP/gRPC; with tls_key_file "
                          "both serve TLS only (https://, gRPC with TLS).")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file (unencrypted).")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA certificates client certificates must chain to: set = mTLS, a client without a "
                          "valid certificate is refused during the handshake.")
    tls_min_version: Literal["1.2", "1.3"] = Field("1.2", description="Lowest TLS version accepted.")
    ops_port: int | None = Field(
        None, ge=0, le=65535, description="Also serve /healthz, /readyz and /metrics on this port, plain HTTP "
                                          "without TLS or auth (for kubelet probes and Prometheus when the OTLP "
                                          "port requires client certificates). Unset = off.")
    tls_reload_interval_s: float = Field(
        10.0, ge=0, description="How often the TLS files are checked for changes (cert-manager rotation); changed "
                                "files are used for new connections. 0 = never.")

    cors_allowed_origins: list[str] = Field(
        default_factory=list, description="Allowed CORS origins (patterns like https://*.example.com). Empty = off.")

    local_log_fsync: bool = Field(True, description="fsync the embedded log on every commit (power-loss safe).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "console"] = Field("json", description="Log format.")
    shutdown_grace_s: float = Field(10.0, ge=0, description="Time to drain in-flight requests on SIGTERM.")
    workers: int | None = Field(None, ge=1, description=(
        "Receiver processes sharing the ports (SO_REUSEPORT), each with its own Kafka producer (default: the CPUs "
        "available to the container). Kafka only: the embedded log always runs one process."))

    @model_validator(mode="after")
    def _tls_complete(self) -> "ServeSettings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together (server certificate and its key)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
        return self

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


class KafkaClientSettings(BaseSettings, KafkaSecurityFields):
    """Just the Kafka security settings, for the commands that only read Kafka (``tail``, ``traces``, ``topics``):
    flags, then ``TRACE_SOURCE_KAFKA_*`` environment variables, then defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", populate_by_name=True)
