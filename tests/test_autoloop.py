"""`trace-source autoloop ./traces --repo .` on the example agent repository, end to end with real parts:
production runs' traces are dropped into the watched directory as files — a failing run as its envelope, a passing
run as the OTLP protobuf its exporter sent (length-prefixed, as the Collector's file exporter writes `format:
proto`); the loop (in the background, repo-local state) imports each once, grades the failure, seeds it and
reproduces it with the repository's own harness, whose attempts export their traces to the loop's own receiver and
are graded too; the passing run is graded passed and never reproduced; `--check` validates the setup; `status`
shows the loop; `detach` stops it. The model is the example's local fake (a paid LLM provider cannot run here)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path

import pytest

from assembler_support import wait_for
from example_repo import (FAILING_TASK, PASSING_TASK, fake_model, make_repository, production_run, reproduced,
                          runs_of, worker_env)
from loop_support import phase_events, wait_envelope
from pipeline.sources.autoloop import process_alive, registered
from pipeline.sources.files import file_state
from serve_proc import ServeProcess
from sinks.local_log import LocalLogReader
from sources_support import cli

LOOP = ("--execution-policy", "reproduce", "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS", "--attempts", "3",
        "--trace-wait-s", "90", "--interval-s", "0.3")


@pytest.fixture(scope="module")
def fake():
    with fake_model() as server:
        yield server


def test_autoloop_imports_files_once_and_reproduces_with_the_harness(tmp_path: Path, fake) -> None:
    repo = make_repository(tmp_path)
    marker = tmp_path / "harness-runs"
    env = worker_env(fake, marker)
    # The production run, exported to a trace-source elsewhere; its envelope is the trace file handed over.
    with ServeProcess(tmp_path / "prod", "--execution-policy", "observe", env=env) as prod:
        trace = production_run(repo, fake, prod.http_url, FAILING_TASK)["trace_id"]
        passing = production_run(repo, fake, prod.http_url, PASSING_TASK)["trace_id"]
        for t in (trace, passing):
            wait_envelope(prod, t, lambda e: e.completeness.root_seen)
    watched = tmp_path / "traces"
    watched.mkdir()
    shutil.copy(tmp_path / "prod" / "traces" / f"{trace}.json", watched / f"{trace}.json")
    with LocalLogReader(tmp_path / "prod" / "spans.db") as reader:
        records = [r.value for r in reader.read(0, 10_000, topic="trace-source.spans") if r.key == passing]
    assert records
    (watched / "passing.pb").write_bytes(b"".join(struct.pack(">I", len(v)) + v for v in records))
    state = repo / ".trace-source"

    checked = cli("autoloop", str(watched), "--repo", str(repo), "--check", *LOOP, env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ok    harness smoke test: python count_runs.py exited 0" in checked.stdout
    assert registered(state) == [] and not (state / "runs.jsonl").exists()  # --check started nothing
    smoke_runs = runs_of(marker)
    assert smoke_runs == ["-"]  # the smoke test ran the harness once, without an attempt number

    started = cli("autoloop", str(watched), "--repo", str(repo), *LOOP, env=env)
    assert started.returncode == 0, started.stderr
    [loop] = registered(state)
    assert loop["running"] and loop["watch_dir"] == str(watched.resolve())
    try:
        again = cli("autoloop", str(watched), "--repo", str(repo), *LOOP, env=env)
        assert again.returncode != 0 and "already watches" in again.stderr
        done = wait_for(lambda: reproduced(state, trace), "the reproduction", timeout_s=300)
        wait_for(lambda: phase_events(state, "grade", passing), "the passing run's grade")
        # The same file written again (same content, another mtime): read again, imported nothing.
        path = watched / f"{trace}.json"
        path.write_bytes(path.read_bytes())
        os.utime(path, (time.time() - 30, time.time() - 30))
        state_now = file_state(path)

        def read_again():
            source = json.loads(cli("status", loop["source"], "--json", "--state-dir", str(state)).stdout)
            return source["cursor"]["files"].get(str(path)) == state_now

        wait_for(read_again, "the rewritten file read again")
        summary = cli("status", "--state-dir", str(state))
        assert "Local loops (autoloop)" in summary.stdout and f"running  pid {loop['pid']}" in summary.stdout
    finally:
        detached = cli("detach", str(watched), "--repo", str(repo))
    assert detached.returncode == 0 and "stopped" in detached.stdout, detached.stderr
    assert registered(state) == []
    assert not process_alive(loop["pid"])

    assert done.status == "reproduced", done
    [imported] = phase_events(state, "import", trace)
    # An envelope file keeps the source it was assembled from; the trigger says how it came in.
    assert imported.run.trigger == "autoloop" and imported.run.source.kind == "otlp-http"
    [passing_import] = phase_events(state, "import", passing)
    assert (passing_import.run.source.id, passing_import.run.source.kind) == (loop["source"], "file")
    [graded] = phase_events(state, "grade", trace)
    assert graded.status == "failed" and graded.details["signature"]["tool"] == "lookup_order"
    manifest = json.loads((state / "runs" / trace / "manifest.json").read_text())
    attempts = manifest["attempts"]
    assert [a["n"] for a in attempts] == [1, 2, 3]
    assert all(a["reproduced"] and a["verdict"] == "failed" for a in attempts)  # each attempt's own trace graded
    for a in attempts:
        [own] = phase_events(state, "grade", a["trace_id"])
        assert own.run.trigger == "reproduction" and own.details["reproduction_of"] == trace
    assert runs_of(marker) == ["-", "1", "2", "3"]
    assert [e.status for e in phase_events(state, "grade", passing)] == ["passed"]
    assert not phase_events(state, "seed", passing)
    assert len(phase_events(state, "import", trace)) == 1


def test_a_plain_directory_repository_is_copied_without_its_state_dir(tmp_path: Path) -> None:
    from pipeline.repository import Repository

    repo = tmp_path / "agent"
    (repo / "trace-source").mkdir(parents=True)
    (repo / "trace-source" / "harness.json").write_text("{}")
    state = repo / ".trace-source"
    (state / "work").mkdir(parents=True)
    (state / "runs.jsonl").write_text("")
    copy = Repository(repo, state).working_copy(state / "work" / "attempt-1", None)
    assert (copy / "trace-source" / "harness.json").exists() and not (copy / ".trace-source").exists()
