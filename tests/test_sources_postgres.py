"""Postgres / Supabase table sources against a real Postgres server (tests/postgres_harness.py): a schema shaped like
an agent app's (traces with child spans, OTel GenAI attributes in a jsonb column), a custom schema read through the
mapping flags, hundreds of traces sharing timestamps across page boundaries in both cursor modes, updates to
imported traces, filters, a read-write credential reported by `test`, a wrong column named, rows inserted while
`watch` runs and `watch` killed with SIGKILL and restarted (envelopes counted per key)."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

from langfuse_fake import wait
from normalizers.foreign import trace_id_of
from serve_proc import CliProcess
from sources_support import cli, envelope_file, keys_on_topic

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=timezone.utc)
APP_SCHEMA = """
CREATE TABLE ai_traces (
    id uuid PRIMARY KEY, name text NOT NULL, status text NOT NULL, workspace_id text, agent_id text,
    trace_group text, input text, output text,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
CREATE TABLE ai_spans (
    id uuid PRIMARY KEY, trace_id uuid NOT NULL REFERENCES ai_traces(id), parent_span_id uuid, name text NOT NULL,
    start_time timestamptz, end_time timestamptz, status text, attributes jsonb);
"""


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password)}@{host}"))


def add_run(conn, n: int, *, at: datetime, fail: bool, workspace: str = "w1", agent: str = "support",
            group: str = "g1", status: str | None = None) -> uuid.UUID:
    """One agent run as the app stores it: a trace row, an invoke_agent span and an execute_tool span with OTel
    GenAI attributes in jsonb."""
    tid = uuid.uuid5(uuid.NAMESPACE_URL, f"run-{n}")
    task = f"Where is order C-{n}?"
    conn.execute("INSERT INTO ai_traces VALUES (%s, 'support', %s, %s, %s, %s, %s, %s, %s, %s)",
                 (tid, status or ("error" if fail else "completed"), workspace, agent, group, task,
                  None if fail else "It shipped.", at, at))
    root = uuid.uuid5(tid, "root")
    conn.execute("INSERT INTO ai_spans VALUES (%s, %s, NULL, 'invoke_agent support', %s, %s, %s, %s)", (
        root, tid, at, at + timedelta(seconds=3), "error" if fail else "ok", json.dumps({
            "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "support",
            "gen_ai.input.messages": [{"role": "user", "parts": [{"type": "text", "content": task}]}]})))
    tool = {"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup_order",
            "gen_ai.tool.call.arguments": json.dumps({"order_id": f"C-{n}"})}
    if not fail:
        tool["gen_ai.tool.call.result"] = json.dumps({"status": "shipped"})
    conn.execute("INSERT INTO ai_spans VALUES (%s, %s, %s, 'execute_tool lookup_order', %s, %s, %s, %s)", (
        uuid.uuid5(tid, "tool"), tid, root, at + timedelta(seconds=1), at + timedelta(seconds=2),
        "error" if fail else "ok", json.dumps(tool)))
    return tid


@pytest.fixture
def app_db(postgres_url: str) -> tuple[str, str]:
    """The app's database (superuser URL) and the URL of a read-only role on it (roles are per server: unique)."""
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(APP_SCHEMA)
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'")
        conn.execute(f"GRANT SELECT ON ai_traces, ai_spans TO {role}")
    yield postgres_url, with_user(postgres_url, role, "reader-pw")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"REVOKE ALL ON ai_traces, ai_spans FROM {role}")
        conn.execute(f"DROP ROLE {role}")


def sync(state: Path, name: str, env: dict) -> dict:
    out = cli("sync", name, "--json", "--state-dir", str(state), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("mode", ["updated_at_id", "created_at_id"])
def test_equal_timestamps_across_pages_every_trace_once_and_updates_as_versions(app_db, tmp_path: Path,
                                                                              mode: str) -> None:
    app_db, reader = app_db
    with psycopg.connect(app_db, autocommit=True) as conn:
        # 450 runs on 3 timestamps: every page boundary (100 a page) falls inside a run of equal timestamps.
        ids = [add_run(conn, n, at=T0 + timedelta(seconds=n // 150), fail=n % 5 == 0) for n in range(450)]
    env = {"APP_DB": reader}
    state = tmp_path / "state"
    assert cli("connect", "postgres", "--name", "app", "--database-url-env", "APP_DB", "--cursor-mode", mode,
               "--page-size", "100", "--trace-input-column", "input", "--trace-output-column", "output",
               "--state-dir", str(state)).returncode == 0
    tested = cli("test", "app", "--json", "--state-dir", str(state), env=env)
    assert tested.returncode == 0, tested.stdout
    checks = {c["check"]: c for c in json.loads(tested.stdout)["checks"]}
    assert checks["credential read-only"]["ok"] and checks["mapping matches the columns"]["ok"]

    first = sync(state, "app", env)["traces"]
    expected = {trace_id_of(i) for i in ids}
    assert {r["trace_id"] for r in first} == expected and {r["status"] for r in first} == {"imported"}
    keys = keys_on_topic(state)
    assert len(keys) == 450 and set(keys.values()) == {1}
    env_failed = envelope_file(state, trace_id_of(ids[5]))
    assert env_failed.source.model_dump() == {"id": "app", "kind": "postgres"}
    assert env_failed.agent_run.agent_name == "support" and env_failed.agent_run.task_input == "Where is order C-5?"
    assert [t.name for t in env_failed.agent_run.tool_calls] == ["lookup_order"]
    assert env_failed.completeness.root_seen and env_failed.spans[0].status_code == "ERROR"
    assert sync(state, "app", env)["traces"] == []  # the cursor is past everything

    with psycopg.connect(app_db, autocommit=True) as conn:
        # New runs (their timestamps are now(), after the cursor; two share one).
        late = [add_run(conn, 1000 + n, at=T0 + timedelta(minutes=10, seconds=n // 2), fail=False) for n in range(3)]
        # An imported trace gets one more span and its updated_at moves (as the app does when a run continues).
        target = ids[7]
        conn.execute("INSERT INTO ai_spans VALUES (%s, %s, %s, 'audit', %s, %s, 'ok', '{}')", (
            uuid.uuid4(), target, uuid.uuid5(target, "root"), T0 + timedelta(seconds=2), T0 + timedelta(seconds=2)))
        conn.execute("UPDATE ai_traces SET updated_at = %s WHERE id = %s", (T0 + timedelta(minutes=5), target))
    after = {r["trace_id"]: (r["status"], r["envelope_version"]) for r in sync(state, "app", env)["traces"]}
    want = {trace_id_of(i): ("imported", 1) for i in late}
    if mode == "updated_at_id":  # append-only mode never looks at an old row again
        want[trace_id_of(target)] = ("imported", 2)
    assert after == want
    counts = keys_on_topic(state)
    assert len(counts) == 450 + len(want) and set(counts.values()) == {1}


def test_custom_schema_through_mapping_flags_and_filters(postgres_url: str, tmp_path: Path) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("""
            CREATE SCHEMA agents;
            CREATE TABLE agents.runs (run_key text PRIMARY KEY, workflow text, outcome text, tenant text,
                bot text, cohort text, prompt jsonb, answer jsonb, changed bigint NOT NULL);
            CREATE TABLE agents.steps (step_no integer, run_ref text, parent_step integer, label text,
                began_ms bigint, ended_ms bigint, state text, error_text text, payload jsonb,
                PRIMARY KEY (run_ref, step_no));""")
        for n in range(12):
            key = f"run-{n}"
            conn.execute("INSERT INTO agents.runs VALUES (%s, 'refunds', %s, %s, %s, %s, %s, %s, %s)", (
                key, "failed" if n % 2 else "done", "acme" if n < 8 else "other", "refund-bot" if n % 3 else "x",
                "beta" if n % 4 == 0 else "main", json.dumps({"question": f"Refund order R-{n}"}),
                json.dumps({"answer": "Refunded."}), 1_760_000_000_000 + n))
            base = 1_760_000_000_000 + n * 10_000
            conn.execute("INSERT INTO agents.steps VALUES (%s, %s, NULL, 'agent', %s, %s, %s, NULL, %s)", (
                1, key, base, base + 5000, "failed" if n % 2 else "done",
                json.dumps({"openinference.span.kind": "AGENT"})))
            conn.execute("INSERT INTO agents.steps VALUES (%s, %s, 1, 'refund_tool', %s, %s, %s, %s, %s)", (
                2, key, base + 1000, base + 2000, "failed" if n % 2 else "done",
                "payments API timed out" if n % 2 else None,
                json.dumps({"openinference.span.kind": "TOOL", "tool.name": "refund"})))
    env = {"APP_DB": postgres_url}
    state = tmp_path / "state"
    mapping = ["--db-schema", "agents", "--trace-table", "runs", "--span-table", "steps",
               "--trace-id-column", "run_key", "--span-id-column", "step_no", "--span-trace-id-column", "run_ref",
               "--parent-span-id-column", "parent_step", "--updated-at-column", "changed",
               "--trace-name-column", "workflow", "--trace-status-column", "outcome",
               "--trace-input-column", "prompt", "--trace-output-column", "answer",
               "--span-name-column", "label", "--span-start-column", "began_ms", "--span-end-column", "ended_ms",
               "--span-status-column", "state", "--span-status-message-column", "error_text",
               "--span-attributes-column", "payload", "--workspace-id-column", "tenant", "--agent-id-column", "bot",
               "--trace-group-column", "cohort"]
    filters = ["--source-workspace-id", "acme", "--source-agent-id", "refund-bot", "--source-status", "failed",
               "--source-status", "done", "--source-trace-group", "main"]
    assert cli("connect", "postgres", "--name", "custom", "--database-url-env", "APP_DB", *mapping, *filters,
               "--state-dir", str(state)).returncode == 0
    tested = cli("test", "custom", "--json", "--state-dir", str(state), env=env)
    checks = {c["check"]: c for c in json.loads(tested.stdout)["checks"]}
    assert checks["mapping matches the columns"]["ok"], checks
    # The harness's URL is the superuser's: the credential can write, and `test` says so (a warning).
    assert not checks["credential read-only"]["ok"] and "superuser" in checks["credential read-only"]["detail"]
    assert tested.returncode == 0
    rows = sync(state, "custom", env)["traces"]
    # acme (n < 8), bot refund-bot (n % 3 != 0), cohort main (n % 4 != 0): n in 1, 2, 5, 7
    assert sorted(r["trace_id"] for r in rows) == sorted(trace_id_of(f"run-{n}") for n in (1, 2, 5, 7))
    env5 = envelope_file(state, trace_id_of("run-5"))
    assert env5.agent_run.task_input == "Refund order R-5"
    tool = next(s for s in env5.spans if s.name == "refund_tool")
    assert tool.status_code == "ERROR" and tool.status_message == "payments API timed out"
    assert tool.start_time_unix_nano == (1_760_000_000_000 + 50_000 + 1000) * 1_000_000
    assert [t.name for t in env5.agent_run.tool_calls] == ["refund"]

    # A limit: at most N traces per sync, the cursor moves on.
    assert cli("connect", "postgres", "--name", "limited", "--database-url-env", "APP_DB", *mapping,
               "--source-limit", "5", "--page-size", "2", "--state-dir", str(state)).returncode == 0
    assert [len(sync(state, "limited", env)["traces"]) for _ in range(4)] == [5, 5, 2, 0]

    # A wrong column name is named, with the flag and the columns the table has.
    assert cli("connect", "postgres", "--name", "wrong", "--database-url-env", "APP_DB",
               *[("began_at" if a == "began_ms" else a) for a in mapping], "--state-dir", str(state)).returncode == 0
    bad = cli("test", "wrong", "--state-dir", str(state), env=env)
    assert bad.returncode == 1 and "--span-start-column: column 'began_at' does not exist in steps" in bad.stdout
    synced = cli("sync", "wrong", "--state-dir", str(state), env=env)
    assert synced.returncode == 1 and "blocked — mapping:" in synced.stderr and "began_at" in synced.stderr
    status = json.loads(cli("status", "wrong", "--json", "--state-dir", str(state)).stdout)
    assert status["status"] == "blocked" and "began_at" in status["last_error"]


def test_credentials_by_reference_only(app_db, tmp_path: Path) -> None:
    app_db, reader = app_db
    state = tmp_path / "state"
    plain = cli("connect", "supabase", "--name", "sb", "--database-url-secret-ref", app_db, "--state-dir", str(state))
    assert plain.returncode != 0 and "plaintext credential" in plain.stderr
    assert "reader-pw" not in (state / "sources.db").read_bytes().decode(errors="replace") \
        if (state / "sources.db").exists() else True
    secret = tmp_path / "db-url"
    secret.write_text(reader + "\n")
    ok = cli("connect", "supabase", "--name", "sb", "--database-url-secret-ref", f"file:{secret}",
             "--sslmode", "disable", "--state-dir", str(state))
    assert ok.returncode == 0, ok.stderr
    with psycopg.connect(app_db, autocommit=True) as conn:
        add_run(conn, 1, at=T0, fail=True)
    assert len(sync(state, "sb", {})["traces"]) == 1
    registry = (state / "sources.db").read_bytes()
    assert b"reader-pw" not in registry and str(secret).encode() in registry
    missing = cli("sync", "pg-missing", "--state-dir", str(state))
    assert missing.returncode != 0 and "no source named 'pg-missing'" in missing.stderr
    assert cli("connect", "postgres", "--name", "noenv", "--database-url-env", "NOT_SET_ANYWHERE",
               "--state-dir", str(state)).returncode == 0
    blocked = cli("sync", "noenv", "--state-dir", str(state))
    assert blocked.returncode == 1 and "missing auth" in blocked.stderr and "NOT_SET_ANYWHERE" in blocked.stderr


def test_rows_inserted_while_watch_runs_and_a_sigkill_loses_and_repeats_nothing(app_db, tmp_path: Path) -> None:
    app_db, _ = app_db
    env = {"APP_DB": app_db}
    state = tmp_path / "state"
    assert cli("connect", "postgres", "--name", "live", "--database-url-env", "APP_DB", "--page-size", "20",
               "--state-dir", str(state)).returncode == 0
    with psycopg.connect(app_db, autocommit=True) as conn:
        for n in range(120):
            add_run(conn, n, at=T0 + timedelta(seconds=n // 30), fail=n % 4 == 0)
    watch = CliProcess(tmp_path / "watch.log", ["watch", "live", "--interval-s", "0.2", "--state-dir", str(state)],
                       env=env)
    watch.launch("watching", 30)
    wait(lambda: (state / "spans.db").exists() and sum(keys_on_topic(state).values()) >= 30 or None)
    watch.kill()  # SIGKILL: somewhere inside a page, or between one page's import and its cursor
    assert 30 <= sum(keys_on_topic(state).values()) <= 120
    restarted = CliProcess(tmp_path / "watch.log", ["watch", "live", "--interval-s", "0.2", "--state-dir",
                                                    str(state)], env=env)
    restarted.launch("watching", 30)
    try:
        with psycopg.connect(app_db, autocommit=True) as conn:
            for n in range(120, 160):  # inserted while watch runs
                add_run(conn, n, at=T0 + timedelta(minutes=1, seconds=n % 3), fail=False)
        wait(lambda: len(keys_on_topic(state)) == 160 or None, 180)
    finally:
        restarted.stop()
    counts = keys_on_topic(state)
    assert len(counts) == 160 and set(counts.values()) == {1}, [k for k, v in counts.items() if v > 1]


def test_the_registry_in_postgres_for_the_cluster_shape(app_db, tmp_path: Path) -> None:
    app_db, reader = app_db
    with psycopg.connect(app_db, autocommit=True) as conn:
        ids = [add_run(conn, n, at=T0, fail=n == 0) for n in range(3)]
    # The registry in the cluster's database (the superuser's URL, as the ledger and journal use it); the app's rows
    # read with the read-only role.
    env = {"TRACE_SOURCE_DATABASE_URL": app_db, "APP_DB": reader}
    state = tmp_path / "state"
    assert cli("connect", "postgres", "--name", "shared", "--database-url-env", "APP_DB", "--state-dir", str(state),
               env=env).returncode == 0
    assert {r["trace_id"] for r in sync(state, "shared", env)["traces"]} == {trace_id_of(i) for i in ids}
    assert not (state / "sources.db").exists()
    with psycopg.connect(app_db) as conn:
        assert conn.execute("SELECT name, provider FROM sources").fetchall() == [("shared", "postgres")]
        assert conn.execute("SELECT imported_total, blocked FROM source_state").fetchall() == [(3, 0)]
        assert conn.execute("SELECT count(*) FROM imported WHERE source = 'shared'").fetchone() == (3,)
        assert conn.execute("SELECT version FROM schema_migrations WHERE component = 'sources'").fetchall() == [(1,)]
    listed = json.loads(cli("status", "--json", "--state-dir", str(state), env=env).stdout)
    assert [(s["name"], s["imported_total"]) for s in listed["sources"]] == [("shared", 3)]
    assert sync(state, "shared", env)["traces"] == []  # the cursor is shared state too
