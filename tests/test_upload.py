"""Envelope upload: `trace-source import --upload` into a running `serve` (POST /v1/envelopes), with bearer tokens.

Real parts only: the receiver is `trace-source serve` (embedded default, its loop grading what arrives), the
client is the CLI. Checked: every run lands once per key and is graded with trigger `upload`; a repeated upload of
the same directory creates nothing new (the receiver answers the original result); a tampered envelope gets a 400
that names the recomputed key; schema violations, missing auth and a refused token are reported by class; a 503
while the log is locked is retried until it goes through.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import requests

from loop_support import failing_envelope, phase_events, poll
from serve_proc import ServeProcess
from sources_support import BIN, cli, js_otlp_files, keys_on_topic, topic_envelopes

TOKEN = "upload-token-1"
AUTH = ("--auth-tokens", f"{TOKEN}=uploader")


def test_upload_into_serve_once_per_key_graded_and_failures_named(tmp_path: Path) -> None:
    d = tmp_path / "in"
    js = js_otlp_files(d, [{"fail": True}, {"fail": False}, {"fail": True}], "json")
    with ServeProcess(tmp_path / "serve", *AUTH, "--execution-policy", "grade") as serve:
        state = serve.state_dir
        args = ("import", str(d), "--upload", "--endpoint", serve.http_url, "--json")

        no_token = cli(*args, "--state-dir", str(tmp_path / "client0"))
        assert no_token.returncode != 0 and "missing auth" in no_token.stderr, no_token.stderr
        wrong = cli(*args, "--state-dir", str(tmp_path / "client0"), env={"TRACE_SOURCE_UPLOAD_TOKEN": "nope"})
        assert wrong.returncode != 0 and "receiver auth failure" in wrong.stderr, wrong.stderr

        first = cli(*args, "--state-dir", str(tmp_path / "client1"), env={"TRACE_SOURCE_UPLOAD_TOKEN": TOKEN})
        assert first.returncode == 0, first.stderr
        rows = json.loads(first.stdout)["traces"]
        assert sorted(r["trace_id"] for r in rows) == sorted(js["traces"])
        assert {r["status"] for r in rows} == {"imported"}
        keys = keys_on_topic(state)
        assert sorted(keys) == sorted(r["idempotency_key"] for r in rows) and set(keys.values()) == {1}

        # The same directory again from another client (no local memory of the first upload): the receiver
        # answers each key with its original result and writes nothing.
        again = cli(*args, "--state-dir", str(tmp_path / "client2"), env={"TRACE_SOURCE_UPLOAD_TOKEN": TOKEN})
        assert again.returncode == 0, again.stderr
        assert {r["status"] for r in json.loads(again.stdout)["traces"]} == {"duplicate"}
        # And from the first client: it knows it sent them, nothing goes over the wire.
        same = cli(*args, "--state-dir", str(tmp_path / "client1"), env={"TRACE_SOURCE_UPLOAD_TOKEN": TOKEN})
        assert {r["status"] for r in json.loads(same.stdout)["traces"]} == {"unchanged"}
        assert keys_on_topic(state) == keys

        grades = poll(lambda: g if len(g := phase_events(state, "grade")) == 3 else None, "3 grades", serve)
        assert {e.trace_id: e.status for e in grades} == dict(zip(js["traces"], ["failed", "passed", "failed"]))
        imports = phase_events(state, "import")
        assert len(imports) == 3 and {e.run.trigger for e in imports} == {"upload"}
        assert {(e.run.source.id, e.run.source.kind) for e in imports} == {("files", "file")}

        url, headers = f"{serve.http_url}/v1/envelopes", {"Authorization": f"Bearer {TOKEN}"}
        env = failing_envelope(7)
        body = json.loads(env.to_json_bytes())
        # A span changed after the key was computed: the receiver recomputes the key and says so.
        body["spans"][1]["end_time_unix_nano"] += 1
        r = requests.post(url, data=json.dumps(body), headers={**headers, "Content-Type": "application/json",
                                                               "Idempotency-Key": env.idempotency_key}, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "bad idempotency key"
        assert r.json()["given"] == env.idempotency_key and r.json()["expected"] != env.idempotency_key
        # A header that is not the envelope's key.
        r = requests.post(url, data=env.to_json_bytes(), headers={**headers, "Content-Type": "application/json",
                                                                   "Idempotency-Key": "0" * 64}, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "bad idempotency key" and "differs" in r.json()["message"]
        # Not the published schema: the violation is located.
        bad = json.loads(env.to_json_bytes())
        bad["spans"][0]["start_time_unix_nano"] = "yesterday"
        r = requests.post(url, data=json.dumps(bad), headers={**headers, "Content-Type": "application/json",
                                                              "Idempotency-Key": env.idempotency_key}, timeout=30)
        assert r.status_code == 400 and r.json()["error"] == "upload rejected"
        assert r.json()["violations"][0]["location"] == "spans.0.start_time_unix_nano"
        r = requests.post(url, data=env.to_json_bytes(), headers={"Content-Type": "application/json",
                                                                   "Idempotency-Key": env.idempotency_key}, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "receiver auth failure"
        assert keys_on_topic(state) == keys, "a refused upload wrote something"


def test_upload_retries_while_the_receiver_answers_503(tmp_path: Path) -> None:
    d = tmp_path / "in"
    js = js_otlp_files(d, [{"fail": False}], "json")
    with ServeProcess(tmp_path / "serve", "--execution-policy", "observe") as serve:
        # Another process holds the embedded log's write lock: the receiver cannot commit and answers 503 with
        # Retry-After until it is released.
        lock = sqlite3.connect(serve.state_dir / "spans.db", isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        client = subprocess.Popen([str(BIN), "import", str(d), "--upload", "--endpoint", serve.http_url, "--json",
                                   "--state-dir", str(tmp_path / "client")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            poll(lambda: True if any(e.get("event") == "envelope.unavailable" for e in serve.events()) else None,
                 "a 503 answered to the upload", serve)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        out, err = client.communicate(timeout=120)
        assert client.returncode == 0, err
        assert [r["status"] for r in json.loads(out)["traces"]] == ["imported"]
        assert len(keys_on_topic(serve.state_dir)) == 1
        assert [trace_id for trace_id, *_ in topic_envelopes(serve.state_dir)] == js["traces"]
