"""The Helm chart under ``helm/trace-source``: rendered with the real ``helm`` binary and checked.

``helm`` is looked up at ``~/.cache/trace-source/bin/helm`` (where ``make test`` installs it), then on ``PATH``. When
there is none the tests fail with :data:`NO_HELM_HELP`; they never skip. Core objects are validated against the
Kubernetes 1.31 OpenAPI schemas with ``kubernetes-validate`` (strict: unknown fields are errors); the CRD objects
(KEDA ScaledObject, ServiceMonitor) are checked structurally, the ScaledObject against a strict subset of its CRD
schema (:data:`SCALED_OBJECT_SCHEMA`).

Components: the receiver (Deployment + Service) and the assembler consumer group (StatefulSet for stable
``--group-instance-id`` values, headless metrics Service, PDB, optional HPA *or* KEDA ScaledObject, ServiceMonitor).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pipeline.settings import AssemblerSettings
from trace_source.cli import main
from trace_source.settings import ServeSettings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "trace-source"
ALL_ON_VALUES = CHART / "ci" / "all-on-values.yaml"
KUBE_VERSION = "1.31.0"
RELEASE, NAMESPACE = "ts", "tracing"
RECEIVER = "ts-trace-source-receiver"
ASSEMBLER = "ts-trace-source-assembler"
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

# The same split for AssemblerSettings under assembler.settings: set by the chart from dedicated values, or only
# meaningful for the embedded shape (state_dir: the local log; in_process: a switch of the embedded serve).
ASSEMBLER_CHART_MANAGED = {"kafka_bootstrap_servers", "input_topic", "traces_topic", "dlq_topic", "group_id",
                           "group_instance_id", "metrics_host", "metrics_port", "artifact_dir"}
ASSEMBLER_NOT_OFFERED = {"state_dir", "in_process"}
ASSEMBLER_ENV = "TRACE_SOURCE_ASSEMBLER_"
# Kafka's rule for group.instance.id (the same as for topic names): legal characters and at most 249 of them.
KAFKA_INSTANCE_ID = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")


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


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, got {[o['metadata']['name'] for o in by_kind(objects, kind)]}"
    return found[0]


def of_component(objects: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == component]


def receiver_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def assembler_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"]
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


def expand_downward_api(env_list: list[dict[str, Any]], pod_name: str, namespace: str) -> dict[str, str]:
    """The container env as the kubelet resolves it: downward-API ``fieldRef``s filled in, then ``$(VAR)``
    references expanded from the variables defined *earlier* in the list (Kubernetes' rule)."""
    fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
    out: dict[str, str] = {}
    for e in env_list:
        if "valueFrom" in e:
            ref = e["valueFrom"].get("fieldRef")
            if ref is None:
                continue  # secrets etc.: not needed here
            out[e["name"]] = fields[ref["fieldPath"]]
        else:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), e["value"])
    return out


def assembler_settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> AssemblerSettings:
    """What ``trace-source worker assemble`` makes of the rendered env (flags unset, so env and defaults)."""
    for name in os.environ:
        if name.startswith("TRACE_SOURCE_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AssemblerSettings()


# --------------------------------------------------------------------------- required values and lint


def test_render_without_bootstrap_servers_fails_clearly(helm):
    for extra in ((), ("kafka.bootstrapServers=",), ("kafka.bootstrapServers=  ",)):
        proc = template(helm, *extra, bootstrap=None, check=False)
        assert proc.returncode != 0, proc.stdout
        assert "kafka.bootstrapServers is required" in proc.stderr, proc.stderr
        assert "embedded local log is for a single machine" in proc.stderr


def test_lint_strict_passes(helm):
    for values in ([], ["--values", str(ALL_ON_VALUES)], ["--set", "assembler.autoscaling.enabled=true"],
                   ["--set", "assembler.enabled=false"]):
        proc = run_helm(helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART),
                        "--set", f"kafka.bootstrapServers={BOOTSTRAP}", *values)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout
        # helm lint reports a template's `fail` as [INFO] and still passes: treat it as the failure it is.
        assert "Fail:" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


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
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [("Deployment", RECEIVER), ("PodDisruptionBudget", ASSEMBLER), ("Service", ASSEMBLER),
                     ("Service", RECEIVER), ("ServiceAccount", "ts-trace-source"), ("StatefulSet", ASSEMBLER)]
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
    service = named(objects, "Service", RECEIVER)
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
    assert [(p["name"], p["port"]) for p in named(objects, "Service", RECEIVER)["spec"]["ports"]] == [
        ("otlp-http", 80)]


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
    # The receiver's; the assembler's (PDB on by default) are covered by the assembler tests.
    objects = of_component(template(helm, "assembler.enabled=false"), "receiver")
    assert not by_kind(objects, "HorizontalPodAutoscaler") and not by_kind(objects, "PodDisruptionBudget")

    objects = of_component(template(helm, "receiver.autoscaling.enabled=true"), "receiver")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": RECEIVER}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(objects, "Deployment")["spec"]  # the HPA owns the replica count
    assert not by_kind(objects, "PodDisruptionBudget")

    objects = of_component(template(helm, "receiver.podDisruptionBudget.enabled=true"), "receiver")
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not by_kind(objects, "HorizontalPodAutoscaler")

    objects = template(helm, "receiver.podDisruptionBudget.enabled=true",
                       "receiver.podDisruptionBudget.minAvailable=null",
                       "receiver.podDisruptionBudget.maxUnavailable=25%")
    pdb = named(objects, "PodDisruptionBudget", RECEIVER)
    assert pdb["spec"] == {"maxUnavailable": "25%", "selector": pdb["spec"]["selector"]}
    proc = template(helm, "receiver.podDisruptionBudget.enabled=true", "receiver.podDisruptionBudget.maxUnavailable=1",
                    check=False)
    assert proc.returncode != 0 and "exactly one of minAvailable and maxUnavailable" in proc.stderr


def test_service_monitor_and_topics_job(helm):
    objects = template(helm, values=ALL_ON_VALUES)
    assert len(by_kind(objects, "ServiceMonitor")) == 2  # one per component
    for name, port in ((RECEIVER, "otlp-http"), (ASSEMBLER, "metrics")):
        monitor = named(objects, "ServiceMonitor", name)
        service = named(objects, "Service", name)
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        # The selector picks exactly one of the chart's Services.
        assert [s["metadata"]["name"] for s in by_kind(objects, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()] == [name]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] == port
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

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
                        "serviceAccount.create=false", "topics.create=true"),
               template(helm, "assembler.autoscaling.enabled=true",
                        "assembler.autoscaling.targetMemoryUtilizationPercentage=80",
                        "assembler.staticMembership=false", "assembler.podDisruptionBudget.maxUnavailable=null",
                        "assembler.podDisruptionBudget.minAvailable=50%", "artifacts.existingClaim=shared")]
    checked = set()
    for objects in renders:
        for o in objects:
            if o["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
                continue  # CRDs: checked structurally (ServiceMonitor) and against SCALED_OBJECT_SCHEMA
            try:
                kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked.add(o["kind"])
    assert checked == {"Deployment", "StatefulSet", "Service", "ServiceAccount", "HorizontalPodAutoscaler",
                       "PodDisruptionBudget", "Job"}


# --------------------------------------------------------------------------- assembler consumer group

# A strict subset of KEDA's ScaledObject CRD schema (keda.sh/v1alpha1, config/crd/bases/keda.sh_scaledobjects.yaml):
# the fields the chart sets, with their CRD types; unknown fields are errors, as they would be for the API server's
# structural-schema pruning + strict field validation.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "labels": _STRING_MAP, "annotations": _STRING_MAP}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "minReplicaCount": _INT32, "maxReplicaCount": _INT32, "idleReplicaCount": _INT32,
                "pollingInterval": _INT32, "cooldownPeriod": _INT32, "initialCooldownPeriod": _INT32,
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                      "properties": {"name": {"type": "string"},
                                                                     "behavior": {"type": "object"}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string"}, "name": {"type": "string"}, "metadata": _STRING_MAP,
                        "useCachedMetrics": {"type": "boolean"},
                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                        "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                              "properties": {"name": {"type": "string"},
                                                             "kind": {"type": "string"}}}}}},
            },
        },
    },
}


def test_assembler_statefulset_runs_worker_assemble(helm, monkeypatch):
    objects = template(helm)
    sts = one(objects, "StatefulSet")
    assert sts["metadata"]["name"] == ASSEMBLER
    spec = sts["spec"]
    assert spec["replicas"] == 2
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert "volumeClaimTemplates" not in spec  # no local state: open traces are rebuilt from Kafka
    # The governing Service is the assembler's headless metrics Service, selecting exactly these pods.
    service = named(objects, "Service", spec["serviceName"])
    assert service["metadata"]["name"] == ASSEMBLER
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert spec["selector"]["matchLabels"]["app.kubernetes.io/component"] == "assembler"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    receiver_selector = named(objects, "Service", RECEIVER)["spec"]["selector"]
    assert not receiver_selector.items() <= spec["template"]["metadata"]["labels"].items()

    c = assembler_container(objects)
    assert c["command"] == ["trace-source"] and c["args"] == ["worker", "assemble"]
    assert c["image"] == receiver_container(objects)["image"]
    env = expand_downward_api(c["env"], f"{ASSEMBLER}-0", NAMESPACE)
    assert env[ASSEMBLER_ENV + "KAFKA_BOOTSTRAP_SERVERS"] == BOOTSTRAP
    assert env[ASSEMBLER_ENV + "INPUT_TOPIC"] == "trace-source.spans"
    assert env[ASSEMBLER_ENV + "TRACES_TOPIC"] == "trace-source.traces"
    assert env[ASSEMBLER_ENV + "DLQ_TOPIC"] == "trace-source.dlq"
    assert env[ASSEMBLER_ENV + "GROUP_ID"] == "trace-source-assembler"
    assert env[ASSEMBLER_ENV + "METRICS_PORT"] == "9464"
    # Every TRACE_SOURCE_ASSEMBLER_* variable the chart sets is a real worker setting, i.e. a `worker assemble` flag.
    names = {n.removeprefix(ASSEMBLER_ENV).lower() for n in env if n.startswith(ASSEMBLER_ENV)}
    assert names <= set(AssemblerSettings.model_fields) - ASSEMBLER_NOT_OFFERED
    help_text = CliRunner().invoke(main, ["worker", "assemble", "--help"], terminal_width=200).output
    for name in names:
        assert "--" + name.replace("_", "-") in help_text
    assert not {n for n in env if n.startswith("TRACE_SOURCE_") and not n.startswith(ASSEMBLER_ENV)}

    settings = assembler_settings_from_env(env, monkeypatch)
    assert settings.kafka_bootstrap_servers == BOOTSTRAP
    assert (settings.input_topic, settings.traces_topic, settings.dlq_topic) == (
        "trace-source.spans", "trace-source.traces", "trace-source.dlq")
    assert (settings.group_id, settings.metrics_host, settings.metrics_port) == ("trace-source-assembler", "0.0.0.0",
                                                                                  9464)
    # Claim checks go to the artifacts mount, not to <cwd>/.trace-source on the read-only root filesystem.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert str(settings.artifact_root) == mounts["artifacts"] == "/var/lib/trace-source/artifacts"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["artifacts"]


def test_assembler_settings_and_shared_values_follow_values(helm, monkeypatch):
    objects = template(helm, values=ALL_ON_VALUES)
    c = assembler_container(objects)
    env = expand_downward_api(c["env"], f"{ASSEMBLER}-3", NAMESPACE)
    assert env[ASSEMBLER_ENV + "MAX_BUFFERED_BYTES"] == "134217728"  # not 1.34217728e+08
    assert env[ASSEMBLER_ENV + "QUIET_PERIOD_S"] == "2.5"
    assert env[ASSEMBLER_ENV + "CREATE_TOPICS"] == "false"
    settings = assembler_settings_from_env(env, monkeypatch)
    assert (settings.quiet_period_s, settings.max_wait_s, settings.max_buffered_bytes) == (2.5, 120.0, 134217728)
    assert (settings.max_message_bytes, settings.compression, settings.create_topics) == (2097152, "lz4", False)
    assert settings.log_level == "debug" and settings.redaction is True
    assert settings.kafka_bootstrap_servers == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    volumes = {v["name"]: v for v in one(objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["artifacts"] == {"name": "artifacts",
                                    "persistentVolumeClaim": {"claimName": "trace-source-artifacts"}}

    objects = template(helm, "kafka.topic=spans", "kafka.tracesTopic=traces", "kafka.dlqTopic=dead",
                       "assembler.groupId=asm", "assembler.metricsPort=9100", "artifacts.mountPath=/artifacts")
    c = assembler_container(objects)
    env = expand_downward_api(c["env"], f"{ASSEMBLER}-0", NAMESPACE)
    settings = assembler_settings_from_env(env, monkeypatch)
    assert (settings.input_topic, settings.traces_topic, settings.dlq_topic, settings.group_id) == (
        "spans", "traces", "dead", "asm")
    assert settings.metrics_port == 9100 and str(settings.artifact_root) == "/artifacts"
    assert env_of(receiver_container(objects))["TRACE_SOURCE_KAFKA_TOPIC"] == "spans"  # the receiver writes it
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", 9100)]
    assert [(p["name"], p["port"], p["targetPort"]) for p in named(objects, "Service", ASSEMBLER)["spec"]["ports"]] == [
        ("metrics", 9100, "metrics")]


def test_assembler_group_instance_id_from_pod_name(helm, monkeypatch):
    c = assembler_container(template(helm))
    raw = {e["name"]: e for e in c["env"]}
    assert raw["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert raw["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    order = [e["name"] for e in c["env"]]
    # $(VAR) references only expand from variables defined earlier in the list.
    instance_var = ASSEMBLER_ENV + "GROUP_INSTANCE_ID"
    assert order.index("POD_NAME") < order.index(instance_var)
    assert order.index("POD_NAMESPACE") < order.index(instance_var)

    ids = set()
    for ordinal in range(3):
        pod = f"{ASSEMBLER}-{ordinal}"
        env = expand_downward_api(c["env"], pod, NAMESPACE)
        instance_id = env[instance_var]
        assert instance_id == f"{NAMESPACE}.{pod}"
        assert KAFKA_INSTANCE_ID.match(instance_id)
        assert assembler_settings_from_env(env, monkeypatch).group_instance_id == instance_id
        ids.add(instance_id)
        # A restarted pod keeps its name, hence its id: same partitions, no rebalance.
        assert expand_downward_api(c["env"], pod, NAMESPACE)[instance_var] == instance_id
    assert len(ids) == 3
    assert expand_downward_api(c["env"], f"{ASSEMBLER}-0", "other")[instance_var] not in ids

    # Dynamic membership on request: no instance id, no downward API.
    c = assembler_container(template(helm, "assembler.staticMembership=false"))
    names = {e["name"] for e in c["env"]}
    assert instance_var not in names and "POD_NAME" not in names
    env = expand_downward_api(c["env"], f"{ASSEMBLER}-0", NAMESPACE)
    assert assembler_settings_from_env(env, monkeypatch).group_instance_id is None

    # Pod names must fit: the chart refuses a StatefulSet name too long for its pods' revision label.
    proc = template(helm, "fullnameOverride=" + "x" * 43, check=False)
    assert proc.returncode != 0 and "longer than 52 characters" in proc.stderr, proc.stderr
    sts = one(template(helm, "fullnameOverride=" + "x" * 42), "StatefulSet")
    assert sts["metadata"]["name"] == "x" * 42 + "-assembler"


def test_assembler_probes_shutdown_and_security(helm):
    objects = template(helm)
    pod = one(objects, "StatefulSet")["spec"]["template"]["spec"]
    c = assembler_container(objects)
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {p["name"] for p in c["ports"]} == {"metrics"}
    # Long enough for a drain against a slow broker: the publish in flight (30 s timeout), commit, producer flush.
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert "lifecycle" not in c  # no traffic to drain away from: no preStop sleep
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["resources"]["limits"]["memory"]


async def test_assembler_worker_serves_the_probed_endpoints():
    """The probe paths are the worker's own: /healthz once its server runs, /readyz 503 until the consumer started."""
    import aiohttp

    from pipeline.metrics import AssemblerMetrics
    from pipeline.worker import _metrics_server

    class FakeAssembler:
        started = asyncio.Event()

    runner, port = await _metrics_server(AssemblerMetrics(), FakeAssembler(), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            async def status(path: str) -> int:
                async with http.get(path) as resp:
                    return resp.status

            assert await status("/healthz") == 200
            assert await status("/readyz") == 503
            FakeAssembler.started.set()
            assert await status("/readyz") == 200
            assert await status("/metrics") == 200
    finally:
        await runner.cleanup()


def test_assembler_off_renders_nothing_of_it(helm):
    objects = template(helm, "assembler.enabled=false", "serviceMonitor.enabled=true")
    assert not of_component(objects, "assembler")
    assert not by_kind(objects, "StatefulSet")
    assert [o["metadata"]["name"] for o in by_kind(objects, "ServiceMonitor")] == [RECEIVER]
    # Its switches are inert while it is off (no exclusivity failure either).
    objects = template(helm, "assembler.enabled=false", "assembler.autoscaling.enabled=true",
                       "assembler.keda.enabled=true")
    assert not of_component(objects, "assembler")
    assert one(objects, "Deployment")["metadata"]["name"] == RECEIVER

    objects = template(helm, "assembler.enabled=true", "serviceMonitor.enabled=true")
    assert {o["kind"] for o in of_component(objects, "assembler")} == {
        "StatefulSet", "Service", "PodDisruptionBudget", "ServiceMonitor"}


def test_assembler_pdb(helm):
    objects = template(helm)
    pdb = named(objects, "PodDisruptionBudget", ASSEMBLER)
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == one(objects, "StatefulSet")["spec"]["selector"]["matchLabels"]
    assert not of_component(by_kind(template(helm, "assembler.podDisruptionBudget.enabled=false"),
                                    "PodDisruptionBudget"), "assembler")
    pdb = named(template(helm, "assembler.podDisruptionBudget.maxUnavailable=null",
                         "assembler.podDisruptionBudget.minAvailable=1"), "PodDisruptionBudget", ASSEMBLER)
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    proc = template(helm, "assembler.podDisruptionBudget.minAvailable=1", check=False)
    assert proc.returncode != 0 and "exactly one of minAvailable and maxUnavailable" in proc.stderr


def test_assembler_hpa_and_keda_are_mutually_exclusive(helm):
    proc = template(helm, "assembler.autoscaling.enabled=true", "assembler.keda.enabled=true", check=False)
    assert proc.returncode != 0, proc.stdout
    assert "assembler.autoscaling.enabled and assembler.keda.enabled are mutually exclusive" in proc.stderr

    # Neither: a fixed replica count.
    objects = template(helm)
    assert not by_kind(objects, "HorizontalPodAutoscaler") and not by_kind(objects, "ScaledObject")

    # Chart HPA on the StatefulSet; it owns the replica count; maxReplicas defaults to the partition count.
    objects = template(helm, "assembler.autoscaling.enabled=true", "topics.partitions=24")
    hpa = named(objects, "HorizontalPodAutoscaler", ASSEMBLER)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": ASSEMBLER}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 24)
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300  # rebalances are costly
    assert "replicas" not in one(objects, "StatefulSet")["spec"]
    assert not by_kind(objects, "ScaledObject")
    hpa = one(template(helm, "assembler.autoscaling.enabled=true", "assembler.autoscaling.maxReplicas=6"),
              "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] == 6
    proc = template(helm, "assembler.autoscaling.enabled=true", "assembler.autoscaling.maxReplicas=1", check=False)
    assert proc.returncode != 0 and "exceeds maxReplicas" in proc.stderr

    # KEDA: a ScaledObject on the group's lag, and no chart HPA.
    objects = template(helm, "assembler.keda.enabled=true", "assembler.keda.lagThreshold=2500000",
                       "assembler.groupId=asm", "kafka.topic=spans")
    assert not by_kind(objects, "HorizontalPodAutoscaler")
    assert "replicas" not in one(objects, "StatefulSet")["spec"]
    so = one(objects, "ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["metadata"]["name"] == ASSEMBLER
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": ASSEMBLER}
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 12)
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"] == {
        "bootstrapServers": BOOTSTRAP, "consumerGroup": "asm", "topic": "spans", "lagThreshold": "2500000",
        "offsetResetPolicy": "earliest", "allowIdleConsumers": "false"}
    assert "authenticationRef" not in trigger
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300
    # The group the trigger measures is the group the pods join.
    env = expand_downward_api(assembler_container(objects)["env"], f"{ASSEMBLER}-0", NAMESPACE)
    assert env[ASSEMBLER_ENV + "GROUP_ID"] == trigger["metadata"]["consumerGroup"]
    assert env[ASSEMBLER_ENV + "INPUT_TOPIC"] == trigger["metadata"]["topic"]


def test_scaled_object_matches_crd_schema(helm):
    import jsonschema

    renders = [template(helm, values=ALL_ON_VALUES),
               template(helm, "assembler.keda.enabled=true", "assembler.keda.minReplicaCount=0",
                        "assembler.keda.behavior=null", "assembler.keda.authenticationRef.name=a",
                        "assembler.keda.authenticationRef.kind=ClusterTriggerAuthentication",
                        "assembler.keda.allowIdleConsumers=true", "assembler.keda.extraTriggerMetadata.sasl=plaintext",
                        "assembler.keda.extraTriggerMetadata.partitionLimitation=1-3")]
    for objects in renders:
        so = one(objects, "ScaledObject")
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    so = one(renders[0], "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["metadata"]["lagThreshold"] == "5000" and trigger["metadata"]["activationLagThreshold"] == "10"
    assert trigger["metadata"]["version"] == "3.9.0"
    assert trigger["metadata"]["bootstrapServers"] == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert trigger["authenticationRef"] == {"name": "kafka-auth"}
    (trigger,) = one(renders[1], "ScaledObject")["spec"]["triggers"]
    assert trigger["authenticationRef"] == {"name": "a", "kind": "ClusterTriggerAuthentication"}
    assert (trigger["metadata"]["allowIdleConsumers"], trigger["metadata"]["sasl"]) == ("true", "plaintext")
    assert "advanced" not in one(renders[1], "ScaledObject")["spec"]
    # The subset schema does catch mistakes.
    bad = json.loads(json.dumps(so))
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 5000
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCALED_OBJECT_SCHEMA)


def test_assembler_schema_rejects_unknown_and_chart_managed_keys(helm):
    for bad in ("assembler.unknown=1", "assembler.settings.no_such_setting=1",
                "assembler.settings.group_instance_id=x", "assembler.settings.kafka_bootstrap_servers=x",
                "assembler.settings.input_topic=x", "assembler.settings.metrics_port=1",
                "assembler.settings.artifact_dir=/x", "assembler.settings.state_dir=/x",
                "assembler.settings.in_process=false", "assembler.settings.quiet_period_s=0",
                "assembler.settings.compression=brotli", "assembler.replicaCount=two",
                "assembler.keda.unknown=1", "assembler.keda.lagThreshold=0",
                "assembler.keda.offsetResetPolicy=middle", "assembler.keda.extraTriggerMetadata.topic=x",
                "assembler.keda.extraTriggerMetadata.consumerGroup=x", "assembler.keda.authenticationRef.kind=Trigger",
                "assembler.keda.authenticationRef.kind=TriggerAuthentication", "assembler.autoscaling.unknown=1",
                "assembler.podDisruptionBudget.unknown=1", "assembler.startupProbe.unknown=1",
                "kafka.tracesTopic=", "artifacts.unknown=1", "artifacts.mountPath=relative"):
        proc = template(helm, bad, check=False)
        assert proc.returncode != 0, f"{bad} was accepted"
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_schema_settings_cover_every_assembler_setting():
    """A new AssemblerSettings field must be offered under assembler.settings or deliberately set/excluded."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    offered = set(schema["properties"]["assembler"]["properties"]["settings"]["properties"])
    fields = set(AssemblerSettings.model_fields)
    assert offered | ASSEMBLER_CHART_MANAGED | ASSEMBLER_NOT_OFFERED == fields, "chart and AssemblerSettings disagree"
    assert not offered & (ASSEMBLER_CHART_MANAGED | ASSEMBLER_NOT_OFFERED)


def test_chart_sets_every_chart_managed_assembler_setting(helm):
    env = expand_downward_api(assembler_container(template(helm))["env"], f"{ASSEMBLER}-0", NAMESPACE)
    set_by_chart = {n.removeprefix(ASSEMBLER_ENV).lower() for n in env if n.startswith(ASSEMBLER_ENV)}
    assert set_by_chart == ASSEMBLER_CHART_MANAGED
