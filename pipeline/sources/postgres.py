"""The Postgres / Supabase reader: a trace table with a child span table, read with keyset pagination.

One page = one query on the trace table ordered by ``(cursor column, trace id)`` and strictly after the stored
cursor ``[cursor value, id]`` (``WHERE (c, id) > (%s, %s)``), then one query for those traces' spans. A page boundary
inside a run of equal timestamps therefore loses and repeats nothing, and a crash re-reads one page at most. With
``cursor_mode updated_at_id`` a trace whose ``updated_at`` moved past the cursor is read again; its envelope is a new
version when its spans changed (the importer compares idempotency keys).

Every query runs in a read-only transaction (the session's ``default_transaction_read_only``) whatever the role may
do, with identifiers quoted by ``psycopg.sql``; filter values are query parameters. The cursor is stored as JSON:
``{"mode": "updated_at_id", "value": <ISO time | number | text>, "type": "timestamp"|"number"|"text", "id": "<id>"}``.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from decimal import Decimal
from typing import Any, AsyncIterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from normalizers.foreign import trace_id_of
from normalizers.rows import RowError, RowMapping, spans_from_rows
from pipeline.sources.config import PostgresConfig, SecretError, resolve_secret
from pipeline.sources.importer import PulledTrace
from pipeline.sources.readers import Check, Page, Rejected, SourceError


def mapping_of(config: PostgresConfig) -> RowMapping:
    return RowMapping(
        trace_id=config.trace_id_column, trace_name=config.trace_name_column,
        trace_status=config.trace_status_column, trace_start=config.trace_start_column,
        trace_end=config.trace_end_column, trace_input=config.trace_input_column,
        trace_output=config.trace_output_column, trace_attributes=config.trace_attributes_column,
        span_id=config.span_id_column, span_trace_id=config.span_trace_id_column,
        parent_span_id=config.parent_span_id_column, span_name=config.span_name_column,
        span_kind=config.span_kind_column, span_start=config.span_start_column, span_end=config.span_end_column,
        span_status=config.span_status_column, span_status_message=config.span_status_message_column,
        span_attributes=config.span_attributes_column, span_input=config.span_input_column,
        span_output=config.span_output_column)


def _with_sslmode(url: str, sslmode: str | None) -> str:
    if not sslmode or "sslmode=" in url:
        return url
    if "://" not in url:  # a libpq keyword string
        return f"{url} sslmode={sslmode}"
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["sslmode"] = sslmode
    return urlunsplit(parts._replace(query=urlencode(query)))


def _encode(value: Any) -> tuple[Any, str]:
    if isinstance(value, datetime):
        return value.isoformat(), "timestamp"
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return str(value), "number"
    return str(value), "text"


def _decode(value: Any, kind: str) -> Any:
    if kind == "timestamp":
        return datetime.fromisoformat(value)
    if kind == "number":
        return Decimal(value)
    return value


class PostgresReader:
    """Reads a :class:`PostgresConfig` source (also Supabase). Raises :class:`SourceError` (``missing auth``,
    ``auth``, ``connection``, ``mapping``, ``cursor``, ``filters``)."""

    def __init__(self, config: PostgresConfig) -> None:
        self.config = config
        self.mapping = mapping_of(config)

    # -- connection ---------------------------------------------------------------------------------------------

    def _url(self) -> str:
        try:
            url = resolve_secret(self.config.database_url_env, self.config.database_url_secret_ref, "database URL")
        except SecretError as exc:
            raise SourceError("missing auth", str(exc).removeprefix("missing auth: ")) from None
        return _with_sslmode(url, self.config.sslmode)

    def _connect(self):
        import psycopg

        try:
            conn = psycopg.connect(self._url(), connect_timeout=10, autocommit=False)
        except psycopg.OperationalError as exc:
            text = " ".join(str(exc).split())
            kind = "auth" if "password authentication failed" in text or "no pg_hba.conf entry" in text \
                or "role" in text and "does not exist" in text else "connection"
            raise SourceError(kind, f"cannot connect to the database: {text[:500]}") from None
        conn.read_only = True  # every transaction of this session: SET TRANSACTION READ ONLY
        return conn

    def _table(self, name: str):
        from psycopg import sql

        if "." in name:
            schema, table = name.split(".", 1)
            return sql.Identifier(schema, table)
        return sql.Identifier(self.config.db_schema, name)

    # -- mapping ------------------------------------------------------------------------------------------------

    def _columns(self, conn, table: str) -> dict[str, str]:
        schema, name = (table.split(".", 1) if "." in table else (self.config.db_schema, table))
        rows = conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s "
                            "AND table_name = %s", (schema, name)).fetchall()
        return {r[0]: r[1] for r in rows}

    def _filter_columns(self) -> list[tuple[str, str]]:
        c = self.config
        out = []
        if c.source_workspace_id is not None:
            out.append(("--source-workspace-id", c.workspace_id_column))
        if c.source_agent_id is not None:
            out.append(("--source-agent-id", c.agent_id_column))
        if c.source_trace_group is not None:
            out.append(("--source-trace-group", c.trace_group_column))
        if c.source_status:
            if not c.trace_status_column:
                out.append(("--source-status", "(no --trace-status-column)"))
            else:
                out.append(("--source-status", c.trace_status_column))
        return out

    def _mapping_problems(self, conn) -> list[str]:
        """Every mapped column the real tables lack, named with its flag."""
        c = self.config
        problems = []
        trace_cols = self._columns(conn, c.trace_table)
        span_cols = self._columns(conn, c.span_table)
        if not trace_cols:
            problems.append(f"trace table {c.db_schema}.{c.trace_table} does not exist or is not readable "
                            "(--trace-table, --db-schema)")
        if not span_cols:
            problems.append(f"span table {c.db_schema}.{c.span_table} does not exist or is not readable "
                            "(--span-table)")
        cursor_col = c.updated_at_column if c.cursor_mode == "updated_at_id" else c.created_at_column
        cursor_flag = "--updated-at-column" if c.cursor_mode == "updated_at_id" else "--created-at-column"
        wanted = [(f, getattr(c, f), trace_cols, c.trace_table) for f in PostgresConfig.model_fields
                  if f.startswith("trace_") and f.endswith("_column")]
        wanted += [(f, getattr(c, f), span_cols, c.span_table) for f in PostgresConfig.model_fields
                   if (f.startswith("span_") or f == "parent_span_id_column") and f.endswith("_column")]
        wanted.append((cursor_flag.removeprefix("--").replace("-", "_"), cursor_col, trace_cols, c.trace_table))
        for flag, column in self._filter_columns():
            wanted.append((flag.removeprefix("--").replace("-", "_") + " filter", column, trace_cols, c.trace_table))
        for field, column, cols, table in wanted:
            if column and cols and column not in cols:
                flag = "--" + field.replace("_", "-")
                problems.append(f"{flag}: column {column!r} does not exist in {table} (it has: "
                                f"{', '.join(sorted(cols))})")
        return problems

    # -- reading ------------------------------------------------------------------------------------------------

    def _where(self, cursor: Any):
        from psycopg import sql

        c = self.config
        cursor_col = c.updated_at_column if c.cursor_mode == "updated_at_id" else c.created_at_column
        clauses, params = [], []
        if cursor:
            if cursor.get("mode") != c.cursor_mode:
                raise SourceError("cursor", f"the stored cursor is for --cursor-mode {cursor.get('mode')}, the "
                                  f"source is now {c.cursor_mode}: re-register under a new name to start over")
            clauses.append(sql.SQL("({}, {}::text) > (%s, %s)").format(sql.Identifier(cursor_col),
                                                                     sql.Identifier(c.trace_id_column)))
            params += [_decode(cursor["value"], cursor.get("type", "text")), cursor["id"]]
        for value, column in ((c.source_workspace_id, c.workspace_id_column), (c.source_agent_id, c.agent_id_column),
                              (c.source_trace_group, c.trace_group_column)):
            if value is not None:
                clauses.append(sql.SQL("{}::text = %s").format(sql.Identifier(column)))
                params.append(value)
        if c.source_status and c.trace_status_column:
            clauses.append(sql.SQL("{}::text = ANY(%s)").format(sql.Identifier(c.trace_status_column)))
            params.append(list(c.source_status))
        clauses.append(sql.SQL("{} IS NOT NULL").format(sql.Identifier(cursor_col)))
        return sql.SQL(" AND ").join(clauses), params, cursor_col

    def _page(self, conn, cursor: Any, limit: int) -> tuple[list[dict], list[dict]]:
        import psycopg
        from psycopg import sql
        from psycopg.rows import dict_row

        c = self.config
        where, params, cursor_col = self._where(cursor)
        query = sql.SQL("SELECT * FROM {} WHERE {} ORDER BY {}, {}::text LIMIT %s").format(
            self._table(c.trace_table), where, sql.Identifier(cursor_col), sql.Identifier(c.trace_id_column))
        try:
            with conn.cursor(row_factory=dict_row) as cur:
                traces = cur.execute(query, [*params, limit]).fetchall()
                if not traces:
                    return [], []
                ids = [str(t[c.trace_id_column]) for t in traces]
                spans = cur.execute(sql.SQL("SELECT * FROM {} WHERE {}::text = ANY(%s)").format(
                    self._table(c.span_table), sql.Identifier(c.span_trace_id_column)), [ids]).fetchall()
        except psycopg.errors.UndefinedColumn as exc:
            conn.rollback()
            raise SourceError("mapping", f"{' '.join(str(exc).split())[:400]} — check the column flags with "
                              "`trace-source test`") from None
        except psycopg.errors.UndefinedTable as exc:
            conn.rollback()
            raise SourceError("mapping", f"{' '.join(str(exc).split())[:400]} (--trace-table / --span-table)") \
                from None
        except psycopg.errors.InsufficientPrivilege as exc:
            conn.rollback()
            raise SourceError("auth", f"the role cannot read the tables: {' '.join(str(exc).split())[:300]}") \
                from None
        except psycopg.Error as exc:
            conn.rollback()
            raise SourceError("connection", " ".join(str(exc).split())[:500]) from None
        conn.commit()
        return traces, spans

    def _to_page(self, traces: list[dict], spans: list[dict], cursor_col: str) -> Page:
        c = self.config
        by_trace: dict[str, list[dict]] = {}
        for s in spans:
            by_trace.setdefault(str(s.get(c.span_trace_id_column)), []).append(s)
        out, rejected = [], []
        for t in traces:
            tid = str(t[c.trace_id_column])
            try:
                rows = sorted(by_trace.get(tid, []), key=lambda r: str(r.get(c.span_id_column)))
                canonical = spans_from_rows(t, rows, self.mapping, resource={"service.name": c.trace_table})
                out.append(PulledTrace(trace_id_of(t[c.trace_id_column]), f"{c.trace_table} row {tid}", canonical))
            except (RowError, ValueError) as exc:
                rejected.append(Rejected(f"{c.trace_table} row {tid}", "bad shape", str(exc)))
        last = traces[-1]
        value, kind = _encode(last[cursor_col])
        return Page(out, rejected, {"mode": c.cursor_mode, "value": value, "type": kind,
                                    "id": str(last[c.trace_id_column])})

    async def pages(self, cursor: Any) -> AsyncIterator[Page]:
        c = self.config
        conn = await asyncio.to_thread(self._connect)
        try:
            problems = await asyncio.to_thread(self._mapping_problems, conn)
            if problems:
                raise SourceError("mapping", "; ".join(problems))
            taken = 0
            while True:
                limit = c.page_size if c.source_limit is None else min(c.page_size, c.source_limit - taken)
                if limit <= 0:
                    return
                traces, spans = await asyncio.to_thread(self._page, conn, cursor, limit)
                if not traces:
                    return
                taken += len(traces)
                cursor_col = c.updated_at_column if c.cursor_mode == "updated_at_id" else c.created_at_column
                page = self._to_page(traces, spans, cursor_col)
                cursor = page.cursor
                yield page
                if len(traces) < limit:
                    return
        finally:
            await asyncio.to_thread(conn.close)

    # -- test ---------------------------------------------------------------------------------------------------

    def _check(self) -> list[Check]:
        c = self.config
        try:
            conn = self._connect()
        except SourceError as exc:
            return [Check("reachable", False, str(exc))]
        try:
            checks = [Check("reachable", True, f"connected as {conn.execute('SELECT current_user').fetchone()[0]}")]
            problems = self._mapping_problems(conn)
            checks.append(Check("mapping matches the columns", not problems, "; ".join(problems) or
                                f"{c.trace_table} / {c.span_table}: every mapped column exists"))
            writable = []
            for table in (c.trace_table, c.span_table):
                qualified = table if "." in table else f"{c.db_schema}.{table}"
                try:
                    row = conn.execute("SELECT has_table_privilege(current_user, %s, 'INSERT'), has_table_privilege("
                                       "current_user, %s, 'UPDATE'), has_table_privilege(current_user, %s, 'DELETE')",
                                       (qualified, qualified, qualified)).fetchone()
                except Exception:  # noqa: BLE001 - a missing table is reported by the mapping check
                    conn.rollback()
                    continue
                rights = [r for r, yes in zip(("INSERT", "UPDATE", "DELETE"), row) if yes]
                if rights:
                    writable.append(f"{qualified} ({', '.join(rights)})")
            super_row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
            if super_row and super_row[0]:
                writable.insert(0, "the role is a superuser")
            checks.append(Check("credential read-only", not writable, (
                "the credential can write: " + "; ".join(writable) + ". Use a read-only role (GRANT SELECT only); "
                "trace-source reads in read-only transactions regardless") if writable else
                "SELECT only", fatal=False))
            if problems:
                return checks
            try:
                traces, spans = self._page(conn, None, 1)
            except SourceError as exc:
                return checks + [Check("one page read", False, str(exc))]
            if not traces:
                return checks + [Check("one page read", True, "the trace table has no rows (matching the filters) "
                                       "yet", fatal=False)]
            cursor_col = c.updated_at_column if c.cursor_mode == "updated_at_id" else c.created_at_column
            page = self._to_page(traces, spans, cursor_col)
            if page.rejected:
                return checks + [Check("one page read and normalized", False,
                                       f"{page.rejected[0].item}: {page.rejected[0].reason}")]
            t = page.traces[0]
            return checks + [Check("one page read and normalized", True,
                                   f"trace {t.trace_id}: {len(t.spans) - 1} span row(s)")]
        finally:
            conn.close()

    async def check(self) -> list[Check]:
        return await asyncio.to_thread(self._check)
