"""`serve --workers N`: N processes on one HTTP and one gRPC port (SO_REUSEPORT), each with its own Kafka producer,
one /metrics view, graceful shutdown of all; the embedded log stays one process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid

import grpc
import psutil
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import TracesData

from bench.payloads import make_genai_request
from tests.assembler_support import read_topic_sync
from tests.serve_proc import _BIN, ServeProcess
from trace_source.settings import ServeSettings
from trace_source.workers import available_cpus, worker_count

PB = {"Content-Type": "application/x-protobuf"}


def _span_ids(req) -> set[bytes]:
    return {sp.span_id for rs in req.resource_spans for ss in rs.scope_spans for sp in ss.spans}


def _topic_span_ids(bootstrap: str, topic: str) -> set[bytes]:
    return {sp.span_id for m in read_topic_sync(bootstrap, topic)
            for rs in TracesData.FromString(m.value).resource_spans for ss in rs.scope_spans for sp in ss.spans}


def _metric(text: str, name: str, labels: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_two_workers_share_the_ports_and_every_acknowledged_span_is_on_kafka(tmp_path, kafka_bootstrap):
    topic = f"workers-{uuid.uuid4().hex[:8]}"
    serve = ServeProcess(tmp_path / "state", "--workers", "2", "--kafka-topic", topic, "--kafka-create-topics",
                         "--kafka-partitions", "3", kafka_bootstrap=kafka_bootstrap)
    with serve:
        ready = next(e for e in serve.events() if e.get("event") == "serving")
        assert ready["workers"] == 2 and len(ready["pids"]) == 2
        assert sorted(e["worker"] for e in serve.events() if e.get("event") == "worker serving") == [0, 1]
        children = {p.pid for p in psutil.Process(serve.proc.pid).children()}
        assert set(ready["pids"]) <= children
        sent: set[bytes] = set()
        for seed in range(12):  # a new connection each time: SO_REUSEPORT spreads connections, not requests
            req = make_genai_request(48, 12, seed)
            r = requests.post(f"{serve.http_url}/v1/traces", data=req.SerializeToString(),
                              headers={**PB, "Connection": "close"}, timeout=30)
            assert r.status_code == 200, r.text
            sent |= _span_ids(req)
        req = make_genai_request(24, 12, 99)
        with grpc.insecure_channel(serve.grpc_target) as channel:
            trace_service_pb2_grpc.TraceServiceStub(channel).Export(req, timeout=30)
        sent |= _span_ids(req)

        # One view: whichever worker answers, the counters are the sum over both processes.
        for _ in range(4):
            text = requests.get(f"{serve.http_url}/metrics", headers={"Connection": "close"}, timeout=10).text
            assert _metric(text, "trace_source_requests_total", 'protocol="http",signal="traces",status="200"') == 12
            assert _metric(text, "trace_source_requests_total", 'protocol="grpc",signal="traces",status="OK"') == 1
            assert _metric(text, "trace_source_items_accepted_total", 'signal="traces"') == len(sent)
        assert serve.stop() == 0  # SIGTERM: both workers drain and exit, then the supervisor
    for pid in ready["pids"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _topic_span_ids(kafka_bootstrap, topic) == sent
    assert [e["exit_codes"] for e in serve.events() if e.get("event") == "stopped" and "workers" in e] == [[0, 0]]


def test_embedded_log_runs_one_process_whatever_workers_says(tmp_path):
    with ServeProcess(tmp_path / "state", "--workers", "3") as serve:
        warning = [e for e in serve.events() if e.get("event") == "workers ignored"]
        assert warning and warning[0]["workers"] == 3
        assert not psutil.Process(serve.proc.pid).children()  # no worker processes (embedded: in-process only)
        r = requests.post(f"{serve.http_url}/v1/traces", data=make_genai_request(12, 12, 1).SerializeToString(),
                          headers=PB, timeout=30)
        assert r.status_code == 200


def test_default_worker_count_is_the_cpus_available_with_kafka_and_one_without():
    assert available_cpus() >= 1
    assert worker_count(ServeSettings(kafka_bootstrap_servers="k:9092")) == available_cpus()
    assert worker_count(ServeSettings(kafka_bootstrap_servers="k:9092", workers=3)) == 3
    assert worker_count(ServeSettings()) == 1


def test_a_worker_that_cannot_start_stops_serve_with_an_error(tmp_path):
    with socket.socket() as s:  # a port where no broker listens
        s.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{s.getsockname()[1]}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.run([str(_BIN), "serve", "--port", "0", "--grpc-port", "0", "--workers", "2",
                               "--kafka-bootstrap-servers", nowhere, "--state-dir", str(tmp_path / "state")],
                              stdout=out, stderr=out, timeout=120,
                              env={k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")})
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert proc.returncode == 1
    failed = {e.get("worker") for e in events if e.get("event") == "worker cannot start"}
    assert failed and failed <= {0, 1}
    assert any(e.get("event") == "worker start failed" for e in events)
    assert not any(e.get("event") == "serving" for e in events)
