"""The Helm chart under ``helm/trace-source``: rendered with the real ``helm`` binary and checked.

``helm`` is looked up at ``~/.cache/trace-source/bin/helm`` (where ``make test`` installs it), then on ``PATH``. When
there is none the tests fail with :data:`NO_HELM_HELP`; they never skip. Core objects are validated against the
Kubernetes 1.31 OpenAPI schemas with ``kubernetes-validate`` (strict: unknown fields are errors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from trace_source.cli import main
from trace_source.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "trace-source"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "ts", "tracing"
RECEIVER = "ts-trace-source-receiver"
BOOTSTRAP = "kafka:9092"

HELM_VERSION = "v3.21.4"
HELM_BIN = Path.home() / ".cache" / "trace-source" / "bin" / "helm"
NO_HELM_HELP = f"""\
No helm binary for the chart tests (looked for {HELM_BIN} and `helm` on PATH).
Install it (Go 1.26 builds it from the Go module proxy in a few minutes; `make test` does this):
  GOBIN={HELM_BIN.parent} go install helm.sh/helm/v3/cmd/helm@{HELM_VERSION}
or put any Helm 3.x/4.x `helm` on PATH."""

# ServeSettings fields the chart sets from dedicated values, and those that only matter for the embedded local log
# (which the chart does not offer). Every other field must be accepted under receiver.settings.
CHART_MANAGED = {"host", "port", "grpc_port", "grpc_enabled", "kafka_bootstrap_servers", "kafka_topic",
                 "auth_tokens", "shutdown_grace_s", "kafka_partitions", "kafka_replication_factor"}
NOT_OFFERED = {"state_dir", "local_log_fsync", "auth_tokens_file", "kafka_create_topics"}


@pytest.fixture(scope="module")
def helm() -> str:
    if HELM_BIN.is_file() and os.access(HELM_BIN, os.X_OK):
        return str(HELM_BIN)
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail(NO_HELM_HELP, pytrace=False)


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=120, check=False)


def template(helm: str, *set_args: str, values: Path | None = None, bootstrap: str | None = BOOTSTRAP,
             check: bool = True) -> subprocess.CompletedProcess[str] | list[dict[str, Any]]:
    """``helm template`` the chart; the rendered objects, or the finished process when ``check`` is False.

    ``bootstrap`` is set with ``--set`` (which beats a values file), unless ``values`` is given or it is None.
    """
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", str(values)]
    elif bootstrap is not None:
        args += ["--set", f"kafka.bootstrapServers={bootstrap}"]
    for s in set_args:
        args += ["--set", s]
    proc = run_helm(helm, *args)
    if not check:
        return proc
    assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def receiver_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def settings_from_env(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """What the app makes of the rendered env vars, parsed the way ``serve`` parses its environment."""
    for name in os.environ:
        if name.startswith("TRACE_SOURCE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if isinstance(value, str):
            monkeypatch.setenv(name, value)
    return ServeSettings()


# --------------------------------------------------------------------------- required values and lint


def test_render_without_bootstrap_servers_fails_clearly(helm):
    for extra in ((), ("kafka.bootstrapServers=",), ("kafka.bootstrapServers=  ",)):
        proc = template(helm, *extra, bootstrap=None, check=False)
        assert proc.returncode != 0, proc.stdout
        assert "kafka.bootstrapServers is required" in proc.stderr, proc.stderr
        assert "embedded local log is for a single machine" in proc.stderr


def test_lint_strict_passes(helm):
    for values in ([], ["--values", str(ALL_ON_VALUES)]):
        proc = run_helm(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART),
                        "--set", f"kafka.bootstrapServers={BOOTSTRAP}", *values)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


def test_schema_rejects_unknown_and_chart_managed_keys(helm):
    for bad in ("unknownTopLevel=1", "receiver.settings.port=1234", "receiver.settings.kafka_bootstrap_servers=x",
                "receiver.settings.no_such_setting=1", "receiver.replicaCount=two"):
        proc = template(helm, bad, check=False)
        assert proc.returncode != 0, f"{bad} was accepted"
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_schema_settings_cover_every_serve_setting():
    """A new ServeSettings field must be offered under receiver.settings or deliberately set/excluded by the chart."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = set(schema["properties"]["receiver"]["properties"]["settings"]["properties"])
    fields = set(ServeSettings.model_fields)
    assert offered | CHART_MANAGED | NOT_OFFERED == fields, "chart and ServeSettings disagree"
    assert not offered & (CHART_MANAGED | NOT_OFFERED)


# --------------------------------------------------------------------------- receiver Deployment and Service


def test_default_render_objects(helm):
    objects = template(helm)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["Deployment", "Service", "ServiceAccount"]
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_env_ports_and_command_are_wired(helm, monkeypatch):
    objects = template(helm)
    deployment = one(objects, "Deployment")
    assert deployment["metadata"]["name"] == RECEIVER
    assert deployment["spec"]["replicas"] == 2
    c = receiver_container(objects)
    assert c["image"] == "ghcr.io/trace-source/trace-source:0.1.0"
    assert c["command"] == ["trace-source"] and c["args"] == ["serve"]
    env = env_of(c)
    assert env["TRACE_SOURCE_HOST"] == "0.0.0.0"
    assert env["TRACE_SOURCE_PORT"] == "4319"
    assert env["TRACE_SOURCE_GRPC_PORT"] == "4317"
    assert env["TRACE_SOURCE_GRPC_ENABLED"] == "true"
    assert env["TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP
    assert env["TRACE_SOURCE_KAFKA_TOPIC"] == "trace-source.spans"
    assert env["TRACE_SOURCE_SHUTDOWN_GRACE_S"] == "10"
    assert "TRACE_SOURCE_AUTH_TOKENS" not in env
    assert all(isinstance(v, str) for v in env.values())  # env values must be strings for the API server
    # Every TRACE_SOURCE_* name the chart sets is a real serve setting.
    names = {n.removeprefix("TRACE_SOURCE_").lower() for n in env}
    assert names <= set(ServeSettings.model_fields)
    # The app accepts the env and reads what the chart meant.
    settings = settings_from_env(env, monkeypatch)
    assert (settings.host, settings.port, settings.grpc_port, settings.grpc_enabled) == ("0.0.0.0", 4319, 4317, True)
    assert settings.kafka_bootstrap_servers == BOOTSTRAP and settings.shutdown_grace_s == 10.0

    assert {(p["name"], p["containerPort"]) for p in c["ports"]} == {("otlp-http", 4319), ("otlp-grpc", 4317)}
    service = one(objects, "Service")
    assert service["metadata"]["name"] == RECEIVER
    assert {(p["name"], p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]} == {
        ("otlp-http", 4319, "otlp-http", "http"), ("otlp-grpc", 4317, "otlp-grpc", "grpc")}
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_settings_and_ports_follow_values(helm, monkeypatch):
    objects = template(helm, values=ALL_ON_VALUES)
    env = env_of(receiver_container(objects))
    settings = settings_from_env(env, monkeypatch)
    assert settings.cors_allowed_origins == ["https://a.example.com", "https://*.example.org"]
    assert (settings.max_inflight_bytes, settings.sink_timeout_s, settings.log_level) == (268435456, 2.5, "debug")
    assert env["TRACE_SOURCE_LOG_LEVEL"] == "debug"
    assert env["TRACE_SOURCE_MAX_RECORD_BYTES"] == "4000000"
    assert env["TRACE_SOURCE_MAX_INFLIGHT_BYTES"] == "268435456"  # not 2.68435456e+08
    assert env["TRACE_SOURCE_SINK_TIMEOUT_S"] == "2.5"
    assert env["TRACE_SOURCE_CORS_ALLOWED_ORIGINS"] == "https://a.example.com,https://*.example.org"
    assert env["TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka-0.kafka:9092,kafka-1.kafka:9092"

    objects = template(helm, "receiver.ports.otlp-grpc.enabled=false", "receiver.ports.otlp-http.containerPort=8080",
                       "receiver.ports.otlp-http.servicePort=80")
    c = receiver_container(objects)
    env = env_of(c)
    assert env["TRACE_SOURCE_GRPC_ENABLED"] == "false" and env["TRACE_SOURCE_PORT"] == "8080"
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("otlp-http", 8080)]
    assert [(p["name"], p["port"]) for p in one(objects, "Service")["spec"]["ports"]] == [("otlp-http", 80)]


def test_auth_tokens_come_from_existing_secret(helm):
    env = env_of(receiver_container(template(helm, "auth.existingSecret=agents", "auth.key=tok")))
    assert env["TRACE_SOURCE_AUTH_TOKENS"] == {"secretKeyRef": {"name": "agents", "key": "tok"}}


def test_probes_security_and_shutdown(helm):
    objects = template(helm)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    c = receiver_container(objects)
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "otlp-http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "otlp-http"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False
    assert c["resources"]["limits"]["memory"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(env_of(c)["TRACE_SOURCE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace

    proc = template(helm, "receiver.terminationGracePeriodSeconds=12", check=False)
    assert proc.returncode != 0 and "must exceed" in proc.stderr, proc.stderr
    c = receiver_container(template(helm, "receiver.preStopSleepSeconds=0"))
    assert "lifecycle" not in c


# --------------------------------------------------------------------------- optional objects


def test_hpa_and_pdb_only_when_enabled(helm):
    objects = template(helm)
    assert not by_kind(objects, "HorizontalPodAutoscaler") and not by_kind(objects, "PodDisruptionBudget")

    objects = template(helm, "receiver.autoscaling.enabled=true")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RECEIVER}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(objects, "Deployment")["spec"]  # the HPA owns the replica count
    assert not by_kind(objects, "PodDisruptionBudget")

    objects = template(helm, "receiver.podDisruptionBudget.enabled=true")
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not by_kind(objects, "HorizontalPodAutoscaler")

    objects = template(helm, "receiver.podDisruptionBudget.enabled=true",
                       "receiver.podDisruptionBudget.minAvailable=null",
                       "receiver.podDisruptionBudget.maxUnavailable=25%")
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": "25%", "selector": pdb["spec"]["selector"]}
    proc = template(helm, "receiver.podDisruptionBudget.enabled=true", "receiver.podDisruptionBudget.maxUnavailable=1",
                    check=False)
    assert proc.returncode != 0 and "exactly one of minAvailable and maxUnavailable" in proc.stderr


def test_service_monitor_and_topics_job(helm):
    objects = template(helm, values=ALL_ON_VALUES)
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= one(objects, "Service")["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in one(objects, "Service")["spec"]["ports"]}

    job = one(objects, "Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    # The chart's ServiceAccount does not exist yet when a pre-install hook runs.
    assert "serviceAccountName" not in pod
    (c,) = pod["containers"]
    assert c["command"] == ["trace-source"]
    assert c["args"] == ["topics", "create", "--partitions", "24", "--replication-factor", "3",
                         "--max-message-bytes", str(4_000_000 + 65536)]
    env = env_of(c)
    assert env["TRACE_SOURCE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert env["TRACE_SOURCE_KAFKA_TOPIC"] == "trace-source.spans"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    # The CLI knows these flags.
    result = CliRunner().invoke(main, ["topics", "create", "--help"])
    for flag in c["args"][2::2]:
        assert flag in result.output

    objects = template(helm)
    assert not by_kind(objects, "Job") and not by_kind(objects, "ServiceMonitor")
    args = one(template(helm, "topics.create=true"), "Job")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["topics", "create", "--partitions", "12"]


def test_rendered_core_objects_validate_against_kubernetes_schemas(helm):
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - a setup problem, reported as a failure
        pytest.fail("kubernetes-validate is missing: pip install kubernetes-validate (it is in the `test` extra)",
                    pytrace=False)
    renders = [template(helm), template(helm, values=ALL_ON_VALUES),
               template(helm, "receiver.ports.otlp-grpc.enabled=false", "receiver.preStopSleepSeconds=0",
                        "serviceAccount.create=false", "topics.create=true")]
    checked = set()
    for objects in renders:
        for o in objects:
            if o["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # CRD, checked structurally in test_service_monitor_and_topics_job
            try:
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked.add(o["kind"])
    assert checked == {"Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                       "Job"}
