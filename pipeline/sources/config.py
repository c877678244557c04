"""What a registered source is configured with, per provider (pydantic models; ``trace-source connect <provider>
--help`` documents every field, generated from these). Stored in the registry as JSON.

Credentials are never configuration: a database URL or an API key is named by the environment variable that holds
it (``database_url_env``, ``public_key_env``, ``secret_key_env``) or by a secret reference
(``database_url_secret_ref``: ``env:VAR`` or ``file:/path``, e.g. a mounted Kubernetes Secret); a value that
looks like a credential itself is refused (:func:`check_secret_ref`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_REPOSITORY = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+$"
SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
_IDENT = r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$"


class SecretError(ValueError):
    """A credential setting that is missing, unreadable, or given in plaintext."""


def check_secret_ref(ref: str) -> str:
    """Validate a secret reference: ``env:NAME`` or ``file:/absolute/path``. Raises :class:`SecretError` for
    anything else, and says so when the value looks like a plaintext credential (a URL with a password, a
    ``password=`` pair, a key-shaped token) — it must not be stored in the registry."""
    text = ref.strip()
    if re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]*:[^@/\s]*@", text) or re.search(r"(?i)\b(password|pwd)\s*=", text) \
            or re.match(r"^(sk|pk|rk)-[A-Za-z0-9_-]{8,}$", text) or re.match(r"^eyJ[A-Za-z0-9_-]{10,}", text):
        raise SecretError("the secret reference looks like a plaintext credential; it is refused and not stored. "
                          "Give env:VARIABLE or file:/path/to/secret instead")
    if re.match(r"^env:[A-Za-z_][A-Za-z0-9_]*$", text) or re.match(r"^file:/\S+$", text):
        return text
    raise SecretError(f"secret reference {text[:40]!r} is not env:VARIABLE or file:/absolute/path")


def resolve_secret(env: str | None, ref: str | None, what: str) -> str:
    """The credential named by ``env`` (an environment variable) or ``ref`` (a secret reference). Raises
    :class:`SecretError` naming what is missing (never the value)."""
    if ref:
        check_secret_ref(ref)
        if ref.startswith("env:"):
            env = ref[4:]
        else:
            path = Path(ref[5:])
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise SecretError(f"{what}: cannot read the secret file {path}: {exc.strerror or exc}") from None
            if not value:
                raise SecretError(f"{what}: the secret file {path} is empty")
            return value
    if not env:
        raise SecretError(f"{what}: no environment variable or secret reference configured")
    value = os.environ.get(env)
    if not value:
        raise SecretError(f"missing auth: {what}: the environment variable {env} is not set")
    return value


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repository: str | None = Field(None, pattern=_REPOSITORY, description=(
        "The agent's repository (owner/name) set on every envelope of this source (else read from resource "
        "attributes vcs.repository.*)."))
    interval_s: float = Field(30.0, gt=0, description="`watch`: seconds between two pulls.")


class FilesConfig(_Base):
    """A directory of trace files (OTLP JSON / JSON lines / protobuf, envelopes, Langfuse exports)."""

    path: Path = Field(description="The directory (read recursively) or file.")
    settle_s: float = Field(1.0, ge=0, description=(
        "A file changed less than this many seconds ago is left for the next pull (a writer may still be at it)."))

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()


class PostgresConfig(_Base):
    """A trace table with a child span table in Postgres (Supabase: the same with its defaults)."""

    database_url_env: str | None = Field("DATABASE_URL", description=(
        "Name of the environment variable holding the database URL (postgresql://user:password@host/db). Use a "
        "read-only role: `test` reports one that can write."))
    database_url_secret_ref: str | None = Field(None, description=(
        "Instead of --database-url-env: a secret reference, env:VARIABLE or file:/path (e.g. a mounted "
        "Kubernetes Secret). A plaintext URL or password is refused."))
    sslmode: SslMode | None = Field(None, description=(
        "libpq sslmode added to the URL when it has none (Supabase: require)."))
    db_schema: str = Field("public", pattern=r"^[A-Za-z_][A-Za-z0-9_$]*$", description="Schema of both tables.")
    trace_table: str = Field("ai_traces", pattern=_IDENT, description="The trace table (one row per agent run).")
    span_table: str = Field("ai_spans", pattern=_IDENT, description="The child span table (one row per step).")
    trace_id_column: str = Field("id", pattern=_IDENT, description="Trace table: the trace id.")
    span_id_column: str = Field("id", pattern=_IDENT, description="Span table: the span id.")
    span_trace_id_column: str = Field("trace_id", pattern=_IDENT, description="Span table: the trace id it belongs to.")
    parent_span_id_column: str | None = Field("parent_span_id", description=(
        "Span table: the parent span's id (empty: none; a span without one hangs under the trace)."))
    updated_at_column: str = Field("updated_at", pattern=_IDENT, description=(
        "Trace table: last change time; the cursor of --cursor-mode updated_at_id (the app must bump it when a "
        "trace or its spans change)."))
    created_at_column: str = Field("created_at", pattern=_IDENT, description=(
        "Trace table: creation time; the cursor of --cursor-mode created_at_id (append-only tables)."))
    cursor_mode: Literal["updated_at_id", "created_at_id"] = Field("updated_at_id", description=(
        "Keyset pagination on (updated_at, id) — re-imports a trace updated after import as a new envelope "
        "version — or on (created_at, id) for append-only tables."))
    trace_name_column: str | None = Field("name", description="Trace table: the run's name (agent or workflow).")
    trace_status_column: str | None = Field("status", description=(
        "Trace table: the run's status (error-like values: error, failed, timeout... -> ERROR)."))
    trace_start_column: str | None = Field(None, description="Trace table: start time (default: first span's).")
    trace_end_column: str | None = Field(None, description="Trace table: end time (default: last span's).")
    trace_input_column: str | None = Field(None, description="Trace table: the run's input (text or JSON).")
    trace_output_column: str | None = Field(None, description="Trace table: the run's output (text or JSON).")
    trace_attributes_column: str | None = Field(None, description="Trace table: a JSON column of attributes.")
    span_name_column: str | None = Field("name", description="Span table: the step's name.")
    span_kind_column: str | None = Field(None, description="Span table: OTLP span kind (client, server, internal...).")
    span_start_column: str | None = Field("start_time", description=(
        "Span table: start time (timestamp, ISO text, or epoch s/ms/µs/ns)."))
    span_end_column: str | None = Field("end_time", description="Span table: end time.")
    span_status_column: str | None = Field("status", description="Span table: status (error-like values -> ERROR).")
    span_status_message_column: str | None = Field(None, description="Span table: the error message.")
    span_attributes_column: str | None = Field("attributes", description=(
        "Span table: a JSON column of attributes (GenAI gen_ai.*, OpenInference, Langfuse keys are understood)."))
    span_input_column: str | None = Field(None, description="Span table: the step's input (text or JSON).")
    span_output_column: str | None = Field(None, description="Span table: the step's output (text or JSON).")
    source_workspace_id: str | None = Field(None, description="Filter: only traces of this workspace id.")
    workspace_id_column: str = Field("workspace_id", pattern=_IDENT, description="Trace table: workspace id column.")
    source_agent_id: str | None = Field(None, description="Filter: only traces of this agent id.")
    agent_id_column: str = Field("agent_id", pattern=_IDENT, description="Trace table: agent id column.")
    source_status: list[str] = Field(default_factory=list, description=(
        "Filter: only traces whose status column holds one of these values (repeatable)."))
    source_trace_group: str | None = Field(None, description="Filter: only traces of this trace group.")
    trace_group_column: str = Field("trace_group", pattern=_IDENT, description="Trace table: trace group column.")
    source_limit: int | None = Field(None, ge=1, description="At most this many traces per sync (the cursor moves on).")
    page_size: int = Field(200, ge=1, le=10000, description="Traces read per page (one query each).")

    @field_validator("parent_span_id_column", "trace_name_column", "trace_status_column", "trace_start_column",
                     "trace_end_column", "trace_input_column", "trace_output_column", "trace_attributes_column",
                     "span_name_column", "span_kind_column", "span_start_column", "span_end_column",
                     "span_status_column", "span_status_message_column", "span_attributes_column",
                     "span_input_column", "span_output_column", mode="before")
    @classmethod
    def _optional_column(cls, v):
        if v in ("", None):
            return None
        if not re.match(_IDENT, str(v)):
            raise ValueError(f"{v!r} is not a column name")
        return v

    @field_validator("database_url_secret_ref")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        return check_secret_ref(v) if v else v

    @model_validator(mode="after")
    def _one_credential(self) -> "PostgresConfig":
        if self.database_url_secret_ref:
            self.database_url_env = None
        return self


class SupabaseConfig(PostgresConfig):
    """Supabase: Postgres through the pooler URL, TLS required."""

    database_url_env: str | None = Field("SUPABASE_DB_URL", description=(
        "Name of the environment variable holding the Supabase connection string (the pooler URL from the "
        "project's Connect dialog, postgresql://postgres.<ref>:<password>@<region>.pooler.supabase.com:6543/"
        "postgres). Use a read-only role: `test` reports one that can write."))
    sslmode: SslMode | None = Field("require", description="libpq sslmode added to the URL when it has none.")


class LangfuseConfig(_Base):
    """Langfuse's public REST API (cloud or self-hosted)."""

    base_url: str = Field("https://cloud.langfuse.com", pattern=r"^https?://", description=(
        "Langfuse's base URL (https://cloud.langfuse.com, https://us.cloud.langfuse.com, or self-hosted)."))
    public_key_env: str = Field("LANGFUSE_PUBLIC_KEY", description=(
        "Name of the environment variable holding the project's public key (Basic auth user)."))
    secret_key_env: str = Field("LANGFUSE_SECRET_KEY", description=(
        "Name of the environment variable holding the project's secret key (Basic auth password)."))
    page_size: int = Field(50, ge=1, le=100, description="Traces per page of GET /api/public/traces.")
    lookback_s: float = Field(900.0, ge=0, description=(
        "List again the traces of this many seconds before the cursor: Langfuse's REST API can show a trace about "
        "ten minutes late, and a trace can still get observations. Listed traces whose entry did not change are "
        "not fetched again; fetched ones whose content did not change are not imported again."))
    source_limit: int | None = Field(None, ge=1, description="At most this many traces per sync.")
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one API request.")


class OtlpConfig(_Base):
    """A push source: an agent exporting OTLP to `trace-source serve` (listed in `status`; nothing to pull — `serve`
    is its continuous path, with a bearer token mapped to this name: --auth-tokens TOKEN=NAME)."""


CONFIGS: dict[str, type[_Base]] = {"files": FilesConfig, "postgres": PostgresConfig, "supabase": SupabaseConfig,
                                   "langfuse": LangfuseConfig, "otlp": OtlpConfig}
#: Envelope ``source.kind`` per provider.
KINDS = {"files": "file", "postgres": "postgres", "supabase": "supabase", "langfuse": "langfuse", "otlp": "otlp-http"}
