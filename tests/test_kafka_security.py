"""Kafka client security with real parts: a broker started by the harness with a SASL_SSL listener (SCRAM users
created at format time, PLAIN, OAUTHBEARER), an SSL listener that requires client certificates and a SASL_PLAINTEXT
listener; certificates made by ``tests/tls_support.py``.

* ``topics create``, ``serve`` (real OTel exporters, HTTP and gRPC), ``worker assemble``, ``tail`` and ``traces``
  each work through a secured listener, every SASL mechanism and mTLS among them; the password is never on a
  command line.
* A wrong password, an untrusted broker certificate, a missing or untrusted client certificate and a certificate
  for another host fail at start-up without retries, with a message naming the cause and the setting.
* While running: a password rotated on the broker turns ``/readyz`` false with the reason; restoring it brings the
  receiver back and spans land again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from assembler_support import WorkerProcess, read_topic_sync, wait_for
from interop_support import (assert_each_span_exactly_once, count_spans_at_least_once, landed_kafka,
                              make_agent_traces, span_exporter)
from kafka_harness import SecureListeners, create_topic
from serve_proc import ServeProcess
from sinks.kafka_security import KafkaSecurity, KafkaSecurityError, diagnose
from trace_source.cli import main

pytestmark = pytest.mark.kafka

_BIN = Path(sys.executable).with_name("trace-source")
PASSWORD_ENV = "TRACE_SOURCE_KAFKA_SASL_PASSWORD"


def sasl_args(secure, mechanism: str = "SCRAM-SHA-512", user: str | None = None) -> list[str]:
    return ["--kafka-bootstrap-servers", secure.cluster.listener_bootstrap("SASL_SSL"),
            "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", mechanism,
            "--kafka-sasl-username", user or secure.user, "--kafka-ssl-ca-file", str(secure.pki.ca)]


def mtls_args(secure, client=None, ca: Path | None = None) -> list[str]:
    client = client or secure.pki.client
    return ["--kafka-bootstrap-servers", secure.cluster.listener_bootstrap("SSL"),
            "--kafka-security-protocol", "SSL", "--kafka-ssl-ca-file", str(ca or secure.pki.ca),
            "--kafka-ssl-cert-file", str(client.cert), "--kafka-ssl-key-file", str(client.key)]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_SOURCE_")}
    return subprocess.run([str(_BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})})


def unsecured_jws(subject: str) -> str:
    """An OAUTHBEARER token Kafka's unsecured validator accepts (``alg: none``; what a test identity provider
    would sign)."""
    def part(d: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    now = int(time.time())
    return f"{part({'alg': 'none'})}.{part({'sub': subject, 'iat': now, 'exp': now + 3600})}."


def send_traces(serve: ServeProcess, transport: str, n: int) -> dict[str, str]:
    provider = TracerProvider(resource=Resource.create({"service.name": f"secure-{transport}"}))
    provider.add_span_processor(SimpleSpanProcessor(span_exporter(serve, transport)))
    try:
        return make_agent_traces(provider, ("kafka.security", "1"), n)
    finally:
        provider.shutdown()


# --------------------------------------------------------------------------- settings and flags


def test_secrets_are_never_flags_and_help_names_their_variables() -> None:
    runner = CliRunner()
    for command in (["serve"], ["worker", "assemble"], ["worker", "grade"], ["tail"], ["traces"],
                    ["topics", "create"]):
        text = runner.invoke(main, [*command, "--help"]).output
        assert "--kafka-security-protocol" in text and "--kafka-ssl-ca-file" in text, command
        assert "--kafka-sasl-password-file" in text and PASSWORD_ENV in text, command
        assert "--kafka-sasl-password " not in text and "--kafka-sasl-password=" not in text, command
        assert "--no-kafka-ssl-check-hostname" in text, command
    assembler_help = runner.invoke(main, ["worker", "assemble", "--help"]).output
    # the assembler reads its own prefixed variable and the shared one
    assert "TRACE_SOURCE_ASSEMBLER_KAFKA_SECURITY_PROTOCOL / TRACE_SOURCE_KAFKA_SECURITY_PROTOCOL" in \
        " ".join(assembler_help.split())


def test_incomplete_security_settings_are_refused_naming_what_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["tail", "--kafka-bootstrap-servers", "127.0.0.1:1",
                                  "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "alice"],
                           env={PASSWORD_ENV: None})
    assert result.exit_code == 2
    assert f"needs a password: none in ${PASSWORD_ENV}" in result.output
    result = runner.invoke(main, ["tail", "--kafka-bootstrap-servers", "127.0.0.1:1",
                                  "--kafka-security-protocol", "SSL", "--kafka-ssl-cert-file", str(tmp_path / "c")])
    assert result.exit_code == 2 and "kafka_ssl_cert_file and kafka_ssl_key_file go together" in result.output
    result = runner.invoke(main, ["tail", "--kafka-bootstrap-servers", "127.0.0.1:1",
                                  "--kafka-ssl-ca-file", str(tmp_path / "ca.pem")])
    assert result.exit_code == 2 and "kafka_security_protocol is PLAINTEXT" in result.output


# --------------------------------------------------------------------------- the whole path, secured


async def test_every_component_works_through_secured_listeners(secure_kafka, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:8]
    spans_topic, traces_topic = f"spans-{suffix}", f"traces-{suffix}"
    (tmp_path / "bob.password").write_text(secure_kafka.plain_password + "\n")
    token_file = tmp_path / "token"
    token_file.write_text(unsecured_jws("carol"))
    env = {PASSWORD_ENV: secure_kafka.password}

    # topics create: SASL_SSL with PLAIN, the password from a file (a mounted Secret)
    created = await asyncio.to_thread(
        run_cli, "topics", "create", "--topic", spans_topic, "--partitions", "2",
        *sasl_args(secure_kafka, "PLAIN", secure_kafka.plain_user),
        "--kafka-sasl-password-file", str(tmp_path / "bob.password"))
    assert created.returncode == 0, created.stderr
    assert created.stdout.splitlines()[-1] == f"created: {spans_topic}"

    # serve: SASL_SSL with SCRAM-SHA-512, the password from the environment; real exporters over HTTP and gRPC
    serve = ServeProcess(tmp_path / "serve", "--kafka-topic", spans_topic, *sasl_args(secure_kafka), env=env)
    worker = WorkerProcess(tmp_path / "worker.log", state_dir=tmp_path / "worker", input_topic=spans_topic,
                           traces_topic=traces_topic, dlq_topic=f"dlq-{suffix}", group_id=f"asm-{suffix}",
                           quiet_period_s=1, commit_interval_s=0.2)
    # worker assemble: SSL with a client certificate (mTLS listener)
    worker.argv += mtls_args(secure_kafka)
    with serve:
        cmdline = Path(f"/proc/{serve.proc.pid}/cmdline").read_bytes()
        assert secure_kafka.password.encode() not in cmdline  # ps never shows the secret
        assert requests.get(f"{serve.http_url}/readyz", timeout=10).status_code == 200
        sent = {**await asyncio.to_thread(send_traces, serve, "http", 2),
                **await asyncio.to_thread(send_traces, serve, "grpc", 2)}
        # read back through the PLAINTEXT listener: the spans are on the topic, each once
        assert_each_span_exactly_once(await landed_kafka(secure_kafka.plaintext, spans_topic), sent)

        try:
            await asyncio.to_thread(worker.start)
            await asyncio.to_thread(
                wait_for, lambda: {r.key.decode() for r in read_topic_sync(secure_kafka.plaintext, traces_topic)}
                == set(sent.values()), "one envelope per trace via the mTLS assembler")
        finally:
            worker.stop()

        # tail: SASL_SSL with SCRAM-SHA-256
        tail = await asyncio.to_thread(
            run_cli, "tail", "--topic", spans_topic, "--from-beginning", "--idle-timeout", "3", "--json",
            *sasl_args(secure_kafka, "SCRAM-SHA-256"), env=env)
        assert tail.returncode == 0, tail.stderr
        assert {json.loads(line)["spanId"] for line in tail.stdout.splitlines()} == set(sent)

        # traces: SASL_SSL with OAUTHBEARER (token file)
        listed = await asyncio.to_thread(
            run_cli, "traces", "--topic", traces_topic, "--json", "--kafka-bootstrap-servers",
            secure_kafka.cluster.listener_bootstrap("SASL_SSL"), "--kafka-security-protocol", "SASL_SSL",
            "--kafka-sasl-mechanism", "OAUTHBEARER", "--kafka-sasl-oauth-token-file", str(token_file),
            "--kafka-ssl-ca-file", str(secure_kafka.pki.ca))
        assert listed.returncode == 0, listed.stderr
        assert {json.loads(line)["trace_id"] for line in listed.stdout.splitlines()} == set(sent.values())

        # tail over SASL_PLAINTEXT (SCRAM without TLS) as well
        plain = await asyncio.to_thread(
            run_cli, "tail", "--topic", spans_topic, "--from-beginning", "--max-records", "1",
            "--kafka-bootstrap-servers", secure_kafka.cluster.listener_bootstrap("SASL_PLAINTEXT"),
            "--kafka-security-protocol", "SASL_PLAINTEXT", "--kafka-sasl-mechanism", "SCRAM-SHA-512",
            "--kafka-sasl-username", secure_kafka.user, env=env)
        assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 1, plain.stderr


def test_imports_and_uploads_reach_the_traces_topic_through_secured_listeners(secure_kafka, tmp_path: Path) -> None:
    """`import --kafka-bootstrap-servers` (SASL_SSL, SCRAM) and a SASL_SSL `serve`'s `POST /v1/envelopes` put their
    envelopes on the traces topic; read back through the PLAINTEXT listener, each once."""
    from collections import Counter

    from sinks.kafka_admin import create_topic as create_kafka_topic
    from sources_support import TRACES_TOPIC, js_otlp_files, read_topic

    asyncio.run(create_kafka_topic(secure_kafka.plaintext, TRACES_TOPIC, 2, 1))
    env = {PASSWORD_ENV: secure_kafka.password}
    files = js_otlp_files(tmp_path / "a", [{"fail": True}, {"fail": False}], "json")
    imported = run_cli("import", str(tmp_path / "a"), "--json", "--state-dir", str(tmp_path / "client"),
                       *sasl_args(secure_kafka), env=env)
    assert imported.returncode == 0, imported.stderr
    assert {r["status"] for r in json.loads(imported.stdout)["traces"]} == {"imported"}

    uploads = js_otlp_files(tmp_path / "b", [{"fail": True}], "protobuf")
    with ServeProcess(tmp_path / "serve", "--kafka-create-topics", "--execution-policy", "observe",
                      *sasl_args(secure_kafka), env=env) as serve:
        up = run_cli("import", str(tmp_path / "b"), "--upload", "--endpoint", serve.http_url, "--json",
                     "--state-dir", str(tmp_path / "uploader"))
        assert up.returncode == 0, up.stderr + serve.log_tail()
        assert [r["status"] for r in json.loads(up.stdout)["traces"]] == ["imported"]
    wanted = set(files["traces"]) | set(uploads["traces"])
    records = asyncio.run(read_topic(secure_kafka.plaintext, wanted))
    assert Counter(k for k, _ in records) == {t: 1 for t in wanted}


# --------------------------------------------------------------------------- refusals fail fast and clearly


def start_failure(tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> str:
    """Run ``serve`` expecting it to exit at start-up; returns its output. It must not have retried."""
    proc = ServeProcess(tmp_path / name, *args, env=env)
    with pytest.raises(RuntimeError) as excinfo:
        proc.start(timeout_s=60)
    assert not [e for e in proc.events() if e.get("event") == "kafka.start_retry"], "retried a permanent refusal"
    return str(excinfo.value)


def test_wrong_password_fails_fast_with_a_clear_message(secure_kafka, tmp_path: Path) -> None:
    env = {PASSWORD_ENV: "not-the-password"}
    expected = f"SASL authentication as {secure_kafka.user} with SCRAM-SHA-512 failed at 127.0.0.1:"
    out = start_failure(tmp_path, "serve", sasl_args(secure_kafka), env)
    assert "cannot start" in out and expected in out and f"${PASSWORD_ENV}" in out
    assert "not-the-password" not in out
    for command in (["topics", "create", "--topic", "never-created"], ["tail", "--idle-timeout", "1"],
                    ["traces"]):
        result = run_cli(*command, *sasl_args(secure_kafka), env=env)
        assert result.returncode != 0 and expected in result.stderr, (command, result.stderr)
    worker = WorkerProcess(tmp_path / "worker.log", state_dir=tmp_path / "w", input_topic="spans-none",
                           env=env)
    worker.argv += sasl_args(secure_kafka)
    with pytest.raises(RuntimeError) as excinfo:
        worker.start()
    assert expected in str(excinfo.value)


def test_untrusted_certificates_fail_fast_with_a_clear_message(secure_kafka, tmp_path: Path) -> None:
    pki = secure_kafka.pki
    env = {PASSWORD_ENV: secure_kafka.password}
    # the broker's certificate does not chain to the CA we were given
    out = start_failure(tmp_path, "serve-ca", [*sasl_args(secure_kafka)[:-1], str(pki.other_ca)], env)
    assert f"is not trusted by --kafka-ssl-ca-file {pki.other_ca}" in out and "certificate verify failed" in out
    # mTLS listener: no client certificate at all, then one from an unrelated CA
    no_cert = mtls_args(secure_kafka)[:6]
    out = start_failure(tmp_path, "serve-nocert", no_cert, {})
    assert "requires a client certificate" in out
    out = start_failure(tmp_path, "serve-othercert", mtls_args(secure_kafka, client=pki.other_client), {})
    assert "does not accept the client certificate" in out
    # a SASL_SSL client on the SASL_PLAINTEXT listener's port, and a PLAINTEXT client on the SSL listener's port:
    # protocol mismatches, named as such
    wrong_port = ["--kafka-bootstrap-servers", secure_kafka.cluster.listener_bootstrap("SASL_PLAINTEXT"),
                  *sasl_args(secure_kafka)[2:]]
    out = start_failure(tmp_path, "serve-mismatch", wrong_port, env)
    assert "it probably does not speak TLS" in out
    out = start_failure(tmp_path, "serve-mismatch-2",
                        ["--kafka-bootstrap-servers", secure_kafka.cluster.listener_bootstrap("SSL")], {})
    assert "the listener probably expects another security protocol" in out


async def test_hostname_verification_is_on_by_default(pki, tmp_path: Path) -> None:
    """A TLS server (standing in for a broker) whose certificate is signed by the trusted CA but names another
    host: refused for the name mismatch, unless hostname verification is turned off."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.wrong_host.cert, pki.wrong_host.key)

    async def close(reader, writer):
        writer.close()

    server = await asyncio.start_server(close, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        checked = KafkaSecurity(security_protocol="SSL", ssl_ca_file=pki.ca)
        problem = await diagnose(f"127.0.0.1:{port}", checked, timeout_s=5)
        assert isinstance(problem, KafkaSecurityError)
        assert "does not name that host" in str(problem) and "127.0.0.1" in str(problem)
        unchecked = KafkaSecurity(security_protocol="SSL", ssl_ca_file=pki.ca, ssl_check_hostname=False)
        problem = await diagnose(f"127.0.0.1:{port}", unchecked, timeout_s=5)
        assert problem is None or "does not name that host" not in str(problem)
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- while running


async def test_rotated_password_turns_readiness_false_with_the_reason(kafka_broker_factory, pki,
                                                                      tmp_path: Path) -> None:
    cluster = await asyncio.to_thread(kafka_broker_factory, secure=SecureListeners(
        keystore_pem=pki.server.pem, truststore_pem=pki.ca, scram_users={"alice": "first"}))
    topic = f"spans-{uuid.uuid4().hex[:8]}"
    await create_topic(cluster.bootstrap_servers, topic, partitions=1)
    args = ["--kafka-topic", topic, "--kafka-bootstrap-servers", cluster.listener_bootstrap("SASL_SSL"),
            "--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-username", "alice",
            "--kafka-ssl-ca-file", str(pki.ca)]
    with ServeProcess(tmp_path / "serve", *args, env={PASSWORD_ENV: "first"}) as serve:
        assert requests.get(f"{serve.http_url}/readyz", timeout=10).status_code == 200
        # the secret is rotated on the broker but not (yet) in the receiver's Secret; connections are re-made
        await asyncio.to_thread(cluster.set_scram_password, "alice", "second",
                                ("SCRAM-SHA-512",))
        await asyncio.to_thread(cluster.stop_node, 0)
        await asyncio.to_thread(cluster.start_node, 0)

        def refused() -> bool:
            r = requests.get(f"{serve.http_url}/readyz", timeout=10)
            return r.status_code == 503 and "SASL authentication as alice" in r.json().get("reason", "")
        await asyncio.to_thread(wait_for, refused, "/readyz 503 naming the refused password")

        # the broker takes the old password again: the receiver comes back on its own and data lands
        await asyncio.to_thread(cluster.set_scram_password, "alice", "first",
                                ("SCRAM-SHA-512",))
        await asyncio.to_thread(wait_for, lambda: requests.get(f"{serve.http_url}/readyz", timeout=10)
                                .status_code == 200, "/readyz 200 again")
        sent = await asyncio.to_thread(send_traces, serve, "http", 1)
    count_spans_at_least_once(await landed_kafka(cluster.bootstrap_servers, topic), sent)
