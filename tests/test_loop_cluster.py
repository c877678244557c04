"""The loop in the cluster shape, with real parts: a real Kafka broker, a real Postgres (ledger and journal), the
receiver (`serve` on Kafka) and one `trace-source worker` process per stage — assemble, grade, seed, reproduce, fix —
sharing an artifact directory as they would share a volume. The example agent's failing run goes all the way from
its OTLP exporter to a fix pushed to a real git remote and a pull request opened by `--pr-command`; the reproduction
attempts' own traces travel the same way (receiver → Kafka → assembler → grader) and are matched through the
Postgres journal. `trace-source status` reads the loop back from Postgres.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from assembler_support import wait_for
from example_repo import FAILING_TASK, PASSING_TASK, fake_model, git, make_repository, production_run, worker_env
from serve_proc import CliProcess, ServeProcess
from test_loop_fix import FIXER, PR_COMMAND

pytestmark = pytest.mark.kafka
_BIN = Path(sys.executable).with_name("trace-source")


def status(db_url: str, *args: str) -> dict:
    proc = subprocess.run([str(_BIN), "status", "--json", *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TRACE_SOURCE_DATABASE_URL": db_url})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_whole_loop_with_kafka_postgres_and_one_worker_per_stage(tmp_path, kafka_bootstrap, postgres_url):
    run = tmp_path.name[-10:].replace("_", "-")
    t = {k: f"c-{run}-{k}" for k in ("spans", "traces", "grades", "seeds", "reproductions", "fixes", "dlq")}
    repo = make_repository(tmp_path)
    artifacts = tmp_path / "artifacts"  # the volume every worker mounts
    (tmp_path / "fixer.py").write_text(FIXER)
    (tmp_path / "pr.py").write_text(PR_COMMAND)
    with fake_model() as fake:
        env = worker_env(fake, tmp_path / "harness-runs", TRACE_SOURCE_DATABASE_URL=postgres_url, FIXER_MODE="fix",
                         FIXER_RUNS=str(tmp_path / "fixer-runs"), PR_LOG=str(tmp_path / "pr-log"),
                         TRACE_SOURCE_ASSEMBLER_QUIET_PERIOD_S="1", TRACE_SOURCE_ASSEMBLER_COMMIT_INTERVAL_S="0.2")
        serve = ServeProcess(tmp_path / "receiver", "--kafka-topic", t["spans"], "--kafka-create-topics",
                             "--kafka-partitions", "2", env=env, kafka_bootstrap=kafka_bootstrap).start()
        procs = [serve]
        try:
            common = ["--kafka-bootstrap-servers", kafka_bootstrap, "--metrics-port", "0",
                      "--artifact-dir", str(artifacts)]
            own_dir = {name: ["--state-dir", str(tmp_path / f"{name}-state")]
                       for name in ("grade", "seed", "reproduce", "fix")}
            loop = [*common, "--traces-topic", t["traces"], "--grades-topic", t["grades"], "--seeds-topic",
                    t["seeds"], "--reproductions-topic", t["reproductions"], "--fixes-topic", t["fixes"],
                    "--dlq-topic", t["dlq"], "--execution-policy", "fix", "--repo", str(repo)]
            workers = {
                "assemble": ["worker", "assemble", *common, "--input-topic", t["spans"], "--traces-topic",
                             t["traces"], "--dlq-topic", t["dlq"]],
                "grade": ["worker", "grade", *loop, *own_dir["grade"]],
                "seed": ["worker", "seed", *loop, *own_dir["seed"]],
                "reproduce": ["worker", "reproduce", *loop, *own_dir["reproduce"], "--otlp-endpoint", serve.http_url, "--attempts", "2",
                              "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS", "--trace-wait-s", "90"],
                "fix": ["worker", "fix", *loop, *own_dir["fix"], "--otlp-endpoint", serve.http_url, "--attempts", "2",
                        "--pass-env", "OPENAI_BASE_URL,HARNESS_RUNS,FIXER_MODE,FIXER_RUNS,PR_LOG",
                        "--trace-wait-s", "90", "--allow-external-execution",
                        "--fix-command", f"{sys.executable} {tmp_path / 'fixer.py'}",
                        "--validation-command", f"{sys.executable} -m pytest -q -p no:cacheprovider tests",
                        "--pr-command", f"{sys.executable} {tmp_path / 'pr.py'}"],
            }
            for name, argv in workers.items():
                proc = CliProcess(tmp_path / f"{name}.log", argv, env=env)
                proc.launch("assembler.serving" if name == "assemble" else "stage.serving", 90)
                procs.append(proc)

            failing = production_run(repo, fake, serve.http_url, FAILING_TASK)["trace_id"]
            passing = production_run(repo, fake, serve.http_url, PASSING_TASK)["trace_id"]

            def phases(trace: str) -> dict:
                try:
                    found = status(postgres_url, trace)
                except AssertionError:  # not in the journal yet
                    return {}
                return {e["phase"]: e["status"] for e in found["events"]}

            wait_for(lambda: phases(failing).get("fix") == "pr_opened", "the fix's pull request", timeout_s=420)
            wait_for(lambda: phases(passing).get("grade") == "passed", "the passing run's grade")
        finally:
            for proc in reversed(procs):
                proc.stop()

    one = status(postgres_url, failing)
    assert [(e["phase"], e["status"]) for e in one["events"]] == [
        ("import", "imported"), ("grade", "failed"), ("seed", "seeded"), ("reproduce", "reproduced"),
        ("fix", "attempt_proven"), ("fix", "pr_opened")]
    assert one["run"]["trigger"] == "otlp" and one["run"]["policy"] == "fix"
    manifest = json.loads((artifacts / "runs" / failing / "manifest.json").read_text())
    assert [a["reproduced"] for a in manifest["attempts"]] == [True, True]
    assert all(a["trace_id"] for a in manifest["attempts"])  # each attempt's own trace came back through Kafka
    branch = [e for e in one["events"] if e["status"] == "pr_opened"][0]["details"]["branch"]
    assert git("rev-parse", "--verify", branch, cwd=tmp_path / "origin.git").strip()
    assert len((tmp_path / "pr-log").read_text().splitlines()) == 1
    summary = status(postgres_url)
    assert summary["phases"]["grade"]["failed"] >= 1 and summary["phases"]["fix"] == {"pr_opened": 1}
    assert "Postgres" in summary["journal"]
