"""The loop in the embedded default: real OTel SDK exporters → `trace-source serve` (no broker) → assembler → the
in-process stages → `<state_dir>/grades/`, `runs.jsonl`; `kill -9` of serve while grading; the execution policy;
`trace-source status` and `trace-source reprocess` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from assembler_support import wait_for
from loop_support import emit_runs, journal, phase_events
from serve_proc import ServeProcess

_BIN = Path(sys.executable).with_name("trace-source")
FAST = {"TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S": "0.5", "TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S": "0.2"}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_BIN), *args], capture_output=True, text=True, timeout=120)


def ledger_rows(state: Path) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(state / "ledger.db") as conn:
        return conn.execute("SELECT stage, trace_id, envelope_key, state, attempts, generation FROM stage_runs"
                            ).fetchall()


def test_graded_once_per_envelope_across_a_kill_9_of_serve(tmp_path):
    state = tmp_path / "state"
    n = 40
    failing = [i % 4 == 0 for i in range(n)]
    serve = ServeProcess(state, "--execution-policy", "grade", env=FAST).start()
    try:
        ids = emit_runs(serve.http_url, failing)
        wait_for(lambda: len(phase_events(state, "grade")) >= 5, "the first grades")
    finally:
        serve.kill()  # kill -9: mid-way through grading (and maybe assembling)
    with ServeProcess(state, "--execution-policy", "grade", env=FAST):
        wait_for(lambda: {e.trace_id for e in phase_events(state, "grade")} >= set(ids), f"{n} grades", 120)
    grades = phase_events(state, "grade")
    per_key = Counter(e.envelope_key for e in grades)
    assert set(per_key.values()) == {1}, "a graded event was journaled twice"
    assert len({e.trace_id for e in grades}) == n
    verdicts = {e.trace_id: e.status for e in grades}
    assert [verdicts[t] for t in ids] == ["failed" if f else "passed" for f in failing]
    rows = [r for r in ledger_rows(state) if r[0] == "grade"]
    assert len(rows) == len(per_key) and {r[3] for r in rows} == {"done"}
    for t in ids:
        doc = json.loads((state / "grades" / t / "grade.json").read_text())
        assert doc["trace_id"] == t and doc["verdict"] == verdicts[t]
    imported = Counter(e.envelope_key for e in phase_events(state, "import"))
    assert set(imported.values()) == {1} and set(imported) == set(per_key)


def test_observe_imports_only_and_status_shows_the_loop(tmp_path):
    state = tmp_path / "state"
    with ServeProcess(state, "--execution-policy", "observe", env=FAST) as serve:
        ids = emit_runs(serve.http_url, [True, False])
        wait_for(lambda: len(phase_events(state, "import")) == 2, "two imports")
    assert phase_events(state, "grade") == [] and not (state / "grades").exists()
    assert {e.run.policy for e in journal(state)} == {"observe"}
    out = cli("status", "--state-dir", str(state), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["traces"] == 2 and doc["phases"] == {"import": {"imported": 2}}
    assert {r["trace_id"] for r in doc["runs"]} == set(ids)


def test_a_blocked_run_is_reported_and_reprocessed_after_the_blocker_is_fixed(tmp_path):
    state = tmp_path / "state"
    repo = tmp_path / "repo"
    with ServeProcess(state, env=FAST) as serve:  # default policy fix, no --repo: seeding cannot start
        [failed, passed] = emit_runs(serve.http_url, [True, False])
        wait_for(lambda: phase_events(state, "seed", failed) and phase_events(state, "grade", passed),
                 "the failed run blocked at seed")
    [blocked] = phase_events(state, "seed", failed)
    assert blocked.status == "blocked" and "no repository contract" in blocked.reason
    assert phase_events(state, "seed", passed) == []  # a passed run is never seeded

    text = cli("status", "--state-dir", str(state)).stdout
    assert "blocked" in text and "no repository contract" in text and failed in text
    one = cli("status", "--state-dir", str(state), failed[:10])
    assert one.returncode == 0 and "stopped   at seed: blocked" in one.stdout
    assert f"grades/{failed}/grade.json" in one.stdout

    # Fix the blocker (a repository with a contract — here an incomplete one, so the new run shows a new reason),
    # then reprocess while serve runs with it.
    (repo / "trace-source").mkdir(parents=True)
    (repo / "trace-source" / "harness.json").write_text('{"command": ["python", "-m", "agent"]}')
    with ServeProcess(state, "--repo", str(repo), env=FAST):
        done = cli("reprocess", failed[:12], "--state-dir", str(state), "--reason", "repository configured")
        assert done.returncode == 0, done.stderr
        assert "phase seed" in done.stdout
        wait_for(lambda: len(phase_events(state, "seed", failed)) == 2, "the reprocessed seed phase")
    first, second = phase_events(state, "seed", failed)
    assert second.run.trigger == "reprocess" and second.run.parent_run_id == first.run.run_id
    assert "repository contract invalid" in second.reason and "scenario.md" in second.reason
    [request] = phase_events(state, "reprocess", failed)
    assert request.reason == "repository configured" and request.details["phase"] == "seed"
    seed_rows = [r for r in ledger_rows(state) if r[0] == "seed"]
    assert [(r[3], r[5]) for r in seed_rows] == [("blocked", 1)]  # the same row, reopened once on purpose
    assert len(phase_events(state, "grade", failed)) == 1  # earlier phases are not repeated
    again = cli("reprocess", "0" * 12, "--state-dir", str(state))
    assert again.returncode != 0 and "no run of a trace" in again.stderr
