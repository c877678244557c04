"""Pulled and uploaded runs in the cluster shape, on a real Kafka broker: `trace-source import
--kafka-bootstrap-servers` puts each envelope on `trace-source.traces` (key = trace id, headers idempotency-key and trace-source-trigger), and a
Kafka-backed `serve` takes `POST /v1/envelopes` onto the same topic, answering a repeated key with the original
result."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from serve_proc import ServeProcess
from sinks.kafka_admin import create_topic
from sources_support import TRACES_TOPIC as TOPIC
from sources_support import cli, js_otlp_files, read_topic

pytestmark = pytest.mark.kafka


def test_import_and_upload_onto_the_kafka_traces_topic(kafka_bootstrap: str, tmp_path: Path) -> None:
    asyncio.run(create_topic(kafka_bootstrap, TOPIC, 3, 1))
    d = tmp_path / "in"
    js = js_otlp_files(d / "a", [{"fail": True}, {"fail": False}], "json")
    imported = cli("import", str(d / "a"), "--kafka-bootstrap-servers", kafka_bootstrap, "--json",
                   "--state-dir", str(tmp_path / "client"))
    assert imported.returncode == 0, imported.stderr
    rows = json.loads(imported.stdout)["traces"]
    assert {r["status"] for r in rows} == {"imported"} and "kafka" in json.loads(imported.stdout)["destination"]
    again = cli("import", str(d / "a"), "--kafka-bootstrap-servers", kafka_bootstrap, "--json",
                "--state-dir", str(tmp_path / "client"))
    assert {r["status"] for r in json.loads(again.stdout)["traces"]} == {"unchanged"}
    records = asyncio.run(read_topic(kafka_bootstrap, set(js["traces"])))
    assert Counter(k for k, _ in records) == {t: 1 for t in js["traces"]}
    keys = {r["trace_id"]: r["idempotency_key"] for r in rows}
    for trace_id, headers in records:
        assert headers["idempotency-key"] == keys[trace_id] and headers["trace-source-trigger"] == "import"
        assert headers["content-type"] == "application/json" and headers["source-id"] == "files"

    up = js_otlp_files(d / "b", [{"fail": True}], "protobuf")
    with ServeProcess(tmp_path / "serve", "--kafka-create-topics", "--execution-policy", "observe",
                      kafka_bootstrap=kafka_bootstrap) as serve:
        args = ("import", str(d / "b"), "--upload", "--endpoint", serve.http_url, "--json")
        first = cli(*args, "--state-dir", str(tmp_path / "up1"))
        assert first.returncode == 0, first.stderr + serve.log_tail()
        assert [r["status"] for r in json.loads(first.stdout)["traces"]] == ["imported"]
        second = cli(*args, "--state-dir", str(tmp_path / "up2"))
        assert [r["status"] for r in json.loads(second.stdout)["traces"]] == ["duplicate"]
    uploaded = asyncio.run(read_topic(kafka_bootstrap, set(up["traces"])))
    assert [(k, h["trace-source-trigger"]) for k, h in uploaded] == [(up["traces"][0], "upload")]
