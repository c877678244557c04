"""`trace-source tail`: what landed, from the embedded log and from the Kafka topic, as lines and as JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from bench.payloads import make_genai_request
from tests.serve_proc import ServeProcess

PB = {"Content-Type": "application/x-protobuf"}
TRACE_SOURCE = str(Path(sys.executable).with_name("trace-source"))


def _send(serve: ServeProcess, req) -> None:
    resp = requests.post(f"{serve.http_url}/v1/traces", data=req.SerializeToString(), headers=PB)
    assert resp.status_code == 200


def _spans(req):
    return {(sp.trace_id.hex(), sp.span_id.hex(), sp.name) for rs in req.resource_spans for ss in rs.scope_spans
            for sp in ss.spans}


def _tail(*args: str) -> list[str]:
    out = subprocess.run([TRACE_SOURCE, "tail", *args], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()


def test_tail_embedded_log_lines_json_and_limits(tmp_path):
    req = make_genai_request(40, 10, seed=1)
    req.resource_spans[0].scope_spans[0].spans[5].status.code = 2
    req.resource_spans[0].scope_spans[0].spans[5].status.message = "boom"
    with ServeProcess(tmp_path / "state", "--auth-tokens", "tok=agent-7") as serve:
        resp = requests.post(f"{serve.http_url}/v1/traces", data=req.SerializeToString(),
                             headers={**PB, "Authorization": "Bearer tok"})
        assert resp.status_code == 200
        state = str(tmp_path / "state")
        items = [json.loads(line) for line in _tail("--state-dir", state, "--from-beginning", "--json",
                                                    "--idle-timeout", "0.5")]
        assert {(i["traceId"], i["spanId"], i["name"]) for i in items} == _spans(req)
        assert {i["source"] for i in items} == {"agent-7"}
        errors = sum(sp.status.code == 2 for sp in req.resource_spans[0].scope_spans[0].spans)
        assert [i["status"] for i in items].count("ERROR") == errors >= 1
        lines = _tail("--state-dir", state, "--from-beginning", "--max-records", "3")
        assert len(lines) == 3 and all("source=agent-7" in line for line in lines)
        assert any("ERROR (boom)" in line for line in _tail("--state-dir", state, "--from-beginning",
                                                              "--idle-timeout", "0.5"))
        # Without --from-beginning only new data is shown.
        assert _tail("--state-dir", state, "--idle-timeout", "0.5") == []


def test_tail_without_embedded_log_says_what_is_missing(tmp_path):
    out = subprocess.run([TRACE_SOURCE, "tail", "--state-dir", str(tmp_path / "none"), "--idle-timeout", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "no embedded log" in out.stderr


@pytest.mark.kafka
def test_tail_kafka_topic(tmp_path, kafka_bootstrap, kafka_topic):
    req = make_genai_request(30, 10, seed=2)
    with ServeProcess(tmp_path / "state", "--kafka-topic", kafka_topic, kafka_bootstrap=kafka_bootstrap) as serve:
        _send(serve, req)
    items = [json.loads(line) for line in _tail("--kafka-bootstrap-servers", kafka_bootstrap, "--topic", kafka_topic,
                                                "--from-beginning", "--json", "--idle-timeout", "3")]
    assert {(i["traceId"], i["spanId"], i["name"]) for i in items} == _spans(req)
    assert {i["source"] for i in items} == {"default"}
