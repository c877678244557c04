"""The Helm chart under ``helm/trace-source``: rendered with the real ``helm`` binary and checked.

``helm`` is looked up at ``~/.cache/trace-source/bin/helm`` (where ``make test`` installs it), then on ``PATH``. When
there is none the tests fail with :data:`NO_HELM_HELP`; they never skip. Core objects are validated against the
Kubernetes 1.31 OpenAPI schemas with ``kubernetes-validate`` (strict: unknown fields are errors); the CRD objects
(KEDA ScaledObject, ServiceMonitor) are checked structurally, the ScaledObject against a strict subset of its CRD
schema (:data:`SCALED_OBJECT_SCHEMA`).

Components: the receiver (Deployment + Service), the assembler consumer group (StatefulSet for stable
``--group-instance-id`` values, headless metrics Service, PDB, optional HPA *or* KEDA ScaledObject, ServiceMonitor),
and the loop's stage workers (grade, seed, reproduce, fix): one Deployment = one consumer group each, with the same
optional objects, configured through ``TRACE_SOURCE_<NAME>`` env vars that :class:`LoopSettings` reads.
"""

from __future__ import annotations

import ast
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

from pipeline.loop_settings import STAGE_FIELDS, LoopSettings, fields_for
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
# The Postgres Secret every render gets unless a test says otherwise: the grade stage is on by default and needs it.
DB_SECRET = "trace-source-db"
# The loop's stages (`trace-source worker <stage>`) and the objects the chart names after them.
STAGES = ("grade", "seed", "reproduce", "fix")
STAGE_OBJECTS = {"grade": "ts-trace-source-grader", "seed": "ts-trace-source-seeder",
                 "reproduce": "ts-trace-source-reproducer", "fix": "ts-trace-source-fixer"}
GRADER = STAGE_OBJECTS["grade"]

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
                 "auth_tokens", "shutdown_grace_s", "kafka_partitions", "kafka_replication_factor", "workers"}
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
             database: str | None = DB_SECRET, chart: Path = CHART,
             check: bool = True) -> subprocess.CompletedProcess[str] | list[dict[str, Any]]:
    """``helm template`` the chart; the rendered objects, or the finished process when ``check`` is False.

    ``bootstrap`` and ``database`` (loop.database.existingSecret) are set with ``--set`` (which beats a values file),
    unless ``values`` is given or they are None.
    """
    args = ["template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", str(values)]
    else:
        if bootstrap is not None:
            args += ["--set", f"kafka.bootstrapServers={bootstrap}"]
        if database is not None:
            args += ["--set", f"loop.database.existingSecret={database}"]
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
    (container,) = named(objects, "Deployment", RECEIVER)["spec"]["template"]["spec"]["containers"]
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
                        "--set", f"kafka.bootstrapServers={BOOTSTRAP}",
                        "--set", f"loop.database.existingSecret={DB_SECRET}", *values)
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
    assert kinds == [("Deployment", GRADER), ("Deployment", RECEIVER), ("PodDisruptionBudget", ASSEMBLER),
                     ("PodDisruptionBudget", GRADER), ("Service", ASSEMBLER), ("Service", GRADER),
                     ("Service", RECEIVER), ("ServiceAccount", "ts-trace-source"), ("StatefulSet", ASSEMBLER)]
    for o in objects:
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


def test_env_ports_and_command_are_wired(helm, monkeypatch):
    objects = template(helm)
    deployment = named(objects, "Deployment", RECEIVER)
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
    assert env["TRACE_SOURCE_WORKERS"] == "1"  # not the app's default (the node's CPUs when the pod has no limit)
    assert "TRACE_SOURCE_AUTH_TOKENS" not in env
    assert all(isinstance(v, str) for v in env.values())  # env values must be strings for the API server
    # Every TRACE_SOURCE_* name the chart sets is a real serve setting.
    names = {n.removeprefix("TRACE_SOURCE_").lower() for n in env}
    assert names <= set(ServeSettings.model_fields)
    # The app accepts the env and reads what the chart meant.
    settings = settings_from_env(env, monkeypatch)
    assert (settings.host, settings.port, settings.grpc_port, settings.grpc_enabled) == ("0.0.0.0", 4319, 4317, True)
    assert settings.kafka_bootstrap_servers == BOOTSTRAP and settings.shutdown_grace_s == 10.0
    assert settings.workers == 1

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
    pod = named(objects, "Deployment", RECEIVER)["spec"]["template"]["spec"]
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
    workers = [(ASSEMBLER, "metrics")] + [(name, "metrics") for name in STAGE_OBJECTS.values()]
    assert len(by_kind(objects, "ServiceMonitor")) == 6  # one per component: receiver, assembler, four stages
    for name, port in [(RECEIVER, "otlp-http")] + workers:
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
    renders = [template(helm), template(helm, values=ALL_ON_VALUES),
               template(helm, "receiver.ports.otlp-grpc.enabled=false", "receiver.preStopSleepSeconds=0",
                        "serviceAccount.create=false", "topics.create=true"),
               template(helm, "assembler.autoscaling.enabled=true",
                        "assembler.autoscaling.targetMemoryUtilizationPercentage=80",
                        "assembler.staticMembership=false", "assembler.podDisruptionBudget.maxUnavailable=null",
                        "assembler.podDisruptionBudget.minAvailable=50%", "artifacts.existingClaim=shared")]
    checked = set()
    for objects in renders:
        checked |= validate_core_objects(objects)
    assert checked == {"Deployment", "StatefulSet", "Service", "ServiceAccount", "HorizontalPodAutoscaler",
                       "PodDisruptionBudget", "Job"}


def validate_core_objects(objects: list[dict[str, Any]]) -> set[str]:
    """Validate every core object strictly against the Kubernetes OpenAPI schemas; the kinds validated."""
    try:
        import kubernetes_validate
    except ImportError:  # pragma: no cover - a setup problem, reported as a failure
        pytest.fail("kubernetes-validate is missing: pip install kubernetes-validate (it is in the `test` extra)",
                    pytrace=False)
    checked = set()
    for o in objects:
        if o["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
            continue  # CRDs: checked structurally (ServiceMonitor) and against SCALED_OBJECT_SCHEMA
        try:
            kubernetes_validate.validate(o, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{o['kind']} {o['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked.add(o["kind"])
    return checked


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


async def test_worker_serves_the_probed_endpoints():
    """The probe paths are the workers' own (the assembler's and every stage's server, pipeline.health): /healthz once
    its server runs, /readyz 503 until the consumer started."""
    import aiohttp

    from pipeline.health import start_health_server
    from pipeline.metrics import AssemblerMetrics

    class FakeAssembler:
        started = asyncio.Event()

    runner, port = await start_health_server(AssemblerMetrics().registry, FakeAssembler.started.is_set, "127.0.0.1", 0)
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
    assert sorted(o["metadata"]["name"] for o in by_kind(objects, "ServiceMonitor")) == [GRADER, RECEIVER]
    # Its switches are inert while it is off (no exclusivity failure either).
    objects = template(helm, "assembler.enabled=false", "assembler.autoscaling.enabled=true",
                       "assembler.keda.enabled=true")
    assert not of_component(objects, "assembler")
    assert named(objects, "Deployment", RECEIVER)

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
        for so in by_kind(objects, "ScaledObject"):
            jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    so = named(renders[0], "ScaledObject", ASSEMBLER)
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


# --------------------------------------------------------------------------- the loop's stage workers

# LoopSettings fields the chart sets on every stage worker from dedicated values (loop.*, kafka.*, the stage's
# metrics address and shutdown grace, the artifacts mount, the scratch volume).
LOOP_CHART_SET = {"consumer_group", "kafka_bootstrap_servers", "state_dir", "artifact_dir", "execution_policy",
                  "allow_external_execution", "repo", "traces_topic", "grades_topic", "seeds_topic",
                  "reproductions_topic", "fixes_topic", "dlq_topic", "shutdown_grace_s", "metrics_host",
                  "metrics_port"}
# Fields naming the variables that hold credentials: left at their defaults, the variables the chart fills from
# Secrets (loop.database, loop.judge.apiKeySecret, loop.forge.tokenSecret).
LOOP_SECRET_VARS = {"database_url_env": "TRACE_SOURCE_DATABASE_URL", "judge_api_key_env": "TRACE_SOURCE_JUDGE_API_KEY",
                    "forge_token_env": "TRACE_SOURCE_FORGE_TOKEN"}
# Not offered: claim-checked envelopes are always read from the one artifact store; a Deployment's pod names change
# on every restart, so a static group.instance.id from them would not survive one.
LOOP_NOT_OFFERED = {"envelope_store_dir", "group_instance_id"}
LOOP_REPOSITORY = "https://git.example.com/acme/support-agent.git"


def enable_stage(stage: str) -> list[str]:
    """--set arguments that enable ``stage`` with what it needs besides the database Secret."""
    args = [f"stages.{stage}.enabled=true"]
    if stage != "grade":
        args += [f"loop.repository={LOOP_REPOSITORY}", "artifacts.existingClaim=shared"]
    return args


def stage_container(objects: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    (container,) = named(objects, "Deployment", STAGE_OBJECTS[stage])["spec"]["template"]["spec"]["containers"]
    return container


def loop_settings_from_env(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> LoopSettings:
    """What ``trace-source worker <stage>`` makes of the rendered env (flags unset, so env and defaults). A variable
    from a Secret gets the placeholder ``secret:<name>/<key>``."""
    for name in os.environ:
        if name.startswith("TRACE_SOURCE_"):
            monkeypatch.delenv(name)
    for e in container["env"]:
        if "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            monkeypatch.setenv(e["name"], f"secret:{ref['name']}/{ref['key']}")
    return LoopSettings()


def product_stage(stage: str) -> tuple[str, str]:
    """(consumer group, the LoopSettings field of its input topic) as ``pipeline/stages/<stage>.py`` defines them,
    read from its source: the chart must agree with the product without importing every stage's dependencies."""
    tree = ast.parse((REPO / "pipeline" / "stages" / f"{stage}.py").read_text())
    group = input_field = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == "GROUP_ID":
                group = node.value.value
            if (isinstance(target, ast.Attribute) and target.attr == "input_topic"
                    and isinstance(node.value, ast.Attribute)):
                input_field = node.value.attr
    assert group and input_field, f"pipeline/stages/{stage}.py: GROUP_ID or input_topic not found"
    return group, input_field


def assert_env_is_worker_settings(container: dict[str, Any], stage: str) -> None:
    """Every TRACE_SOURCE_* variable is a `worker <stage>` setting (a flag of its --help) or a variable one of them
    names; no variable is set twice; every value is a string or a Secret reference."""
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), f"duplicate env vars: {names}"
    help_text = CliRunner().invoke(main, ["worker", stage, "--help"], terminal_width=200).output
    fields = set(fields_for(stage=stage))
    for e in container["env"]:
        assert isinstance(e.get("value", ""), str)
        if not e["name"].startswith("TRACE_SOURCE_") or e["name"] in LOOP_SECRET_VARS.values():
            continue
        field = e["name"].removeprefix("TRACE_SOURCE_").lower()
        assert field in fields, f"{e['name']} is not a `worker {stage}` setting"
        assert "--" + field.replace("_", "-") in help_text, f"{field} missing from `worker {stage} --help`"


def test_grade_stage_is_on_by_default_with_the_database_secret(helm, monkeypatch):
    objects = template(helm)
    deployment = named(objects, "Deployment", GRADER)
    assert deployment["spec"]["replicas"] == 2
    assert not [o for o in objects if o["metadata"]["name"] in set(STAGE_OBJECTS.values()) - {GRADER}]
    c = stage_container(objects, "grade")
    assert c["command"] == ["trace-source"] and c["args"] == ["worker", "grade"]
    assert c["image"] == receiver_container(objects)["image"]
    raw = {e["name"]: e for e in c["env"]}
    # The database URL only by reference, from the Secret, in the variable the worker reads by default.
    assert raw["TRACE_SOURCE_DATABASE_URL"] == {
        "name": "TRACE_SOURCE_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": DB_SECRET, "key": "url"}}}
    assert not {"TRACE_SOURCE_JUDGE_API_KEY", "TRACE_SOURCE_FORGE_TOKEN", "TRACE_SOURCE_OTLP_ENDPOINT"} & set(raw)
    assert_env_is_worker_settings(c, "grade")

    settings = loop_settings_from_env(c, monkeypatch)
    assert settings.database_url() == f"secret:{DB_SECRET}/url"
    assert settings.kafka_bootstrap_servers == BOOTSTRAP
    assert (settings.execution_policy, settings.allow_external_execution, settings.repo) == ("fix", False, None)
    assert (settings.traces_topic, settings.grades_topic, settings.dlq_topic) == (
        "trace-source.traces", "trace-source.grades", "trace-source.dlq")
    assert (settings.metrics_host, settings.metrics_port, settings.shutdown_grace_s) == ("0.0.0.0", 9465, 30.0)
    # Claim-checked envelopes are read from the store the assembler writes them to; the state dir and HOME are on
    # the scratch volume, not on the read-only root filesystem.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assembler_mounts = {m["name"]: m["mountPath"] for m in assembler_container(objects)["volumeMounts"]}
    assert str(settings.artifact_root) == str(settings.envelope_root) == mounts["artifacts"] == assembler_mounts[
        "artifacts"]
    assert str(settings.state_dir).startswith(mounts["scratch"] + "/")
    assert raw["HOME"]["value"] == mounts["scratch"] and mounts["tmp"] == "/tmp"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True

    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("metrics", 9465)]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s

    # Its metrics Service and PDB select exactly its pods.
    service = named(objects, "Service", GRADER)
    assert service["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", 9465, "metrics")]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector == named(objects, "PodDisruptionBudget", GRADER)["spec"][
        "selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for other in (named(objects, "Deployment", RECEIVER), one(objects, "StatefulSet")):
        assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()


def test_stage_without_database_secret_fails_with_the_message(helm):
    for extra in ((), ("loop.database.existingSecret=",)):
        proc = template(helm, *extra, database=None, check=False)
        assert proc.returncode != 0, proc.stdout
        assert "loop.database.existingSecret is required while stages.grade is enabled" in proc.stderr, proc.stderr
        assert "kubectl create secret generic" in proc.stderr and "stages.grade.enabled=false" in proc.stderr
    proc = template(helm, "stages.grade.enabled=false", *enable_stage("seed"), "loop.executionPolicy=reproduce",
                    database=None, check=False)
    assert proc.returncode != 0
    assert "loop.database.existingSecret is required while stages.seed is enabled" in proc.stderr, proc.stderr

    # With every stage off nothing needs the database, and nothing of the stages is rendered.
    objects = template(helm, "stages.grade.enabled=false", database=None)
    assert not [o for component in ("grader", "seeder", "reproducer", "fixer")
                for o in of_component(objects, component)]
    assert {o["metadata"]["name"] for o in by_kind(objects, "Deployment")} == {RECEIVER}


def test_stage_requirements_fail_rendering(helm):
    cases = [
        ((*enable_stage("reproduce"), "loop.executionPolicy=grade"),
         "stages.reproduce is enabled but loop.executionPolicy=grade never reaches the reproduce phase"),
        ((*enable_stage("fix"), "loop.executionPolicy=reproduce"),
         "stages.fix is enabled but loop.executionPolicy=reproduce never reaches the fix phase"),
        (("stages.seed.enabled=true", "artifacts.existingClaim=shared"), "stages.seed needs loop.repository"),
        (("stages.reproduce.enabled=true", f"loop.repository={LOOP_REPOSITORY}"),
         "stages.reproduce needs artifacts.existingClaim"),
        (("stages.grade.terminationGracePeriodSeconds=30",),
         "stages.grade.terminationGracePeriodSeconds (30) must exceed stages.grade.shutdownGraceSeconds (30)"),
        ((*enable_stage("fix"), "stages.fix.image.repository=acme/runner"),
         "stages.fix.image.repository is set: give stages.fix.image.tag or stages.fix.image.digest too"),
    ]
    for args, message in cases:
        proc = template(helm, *args, check=False)
        assert proc.returncode != 0, f"{args} rendered"
        assert message in proc.stderr, proc.stderr
    # The grade stage journals every import, so it runs under any policy, observe included.
    assert named(template(helm, "loop.executionPolicy=observe"), "Deployment", GRADER)
    objects = template(helm, *enable_stage("seed"), "loop.executionPolicy=reproduce")
    assert named(objects, "Deployment", STAGE_OBJECTS["seed"])


def test_stage_hpa_and_keda_are_mutually_exclusive(helm, monkeypatch):
    for stage in STAGES:
        proc = template(helm, *enable_stage(stage), f"stages.{stage}.autoscaling.enabled=true",
                        f"stages.{stage}.keda.enabled=true", check=False)
        assert proc.returncode != 0, proc.stdout
        assert (f"stages.{stage}.autoscaling.enabled and stages.{stage}.keda.enabled are mutually exclusive"
                in proc.stderr), proc.stderr

    # Chart HPA on the grade Deployment: it owns the replica count; maxReplicas defaults to the partition count.
    objects = template(helm, "stages.grade.autoscaling.enabled=true", "topics.partitions=24")
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["metadata"]["name"] == GRADER
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": GRADER}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 24)
    assert "replicas" not in named(objects, "Deployment", GRADER)["spec"]
    assert not by_kind(objects, "ScaledObject")
    proc = template(helm, "stages.grade.autoscaling.enabled=true", "stages.grade.autoscaling.maxReplicas=1",
                    check=False)
    assert proc.returncode != 0 and "stages.grade.autoscaling: minReplicas (2) exceeds maxReplicas (1" in proc.stderr

    # KEDA on each stage: the lag of the group its pods join, on the topic they read (renamed topics included).
    for stage in STAGES:
        objects = template(helm, *enable_stage(stage), f"stages.{stage}.keda.enabled=true",
                           "loop.executionPolicy=fix", "loop.topics.seeds=acme.seeds", "kafka.tracesTopic=acme.traces")
        assert not by_kind(objects, "HorizontalPodAutoscaler")
        so = named(objects, "ScaledObject", STAGE_OBJECTS[stage])
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                "name": STAGE_OBJECTS[stage]}
        assert "replicas" not in named(objects, "Deployment", STAGE_OBJECTS[stage])["spec"]
        (trigger,) = so["spec"]["triggers"]
        group, input_field = product_stage(stage)
        settings = loop_settings_from_env(stage_container(objects, stage), monkeypatch)
        assert trigger["type"] == "kafka"
        # The chart's default group is the product's own, and the one the trigger measures is the one pods join.
        assert trigger["metadata"]["consumerGroup"] == settings.consumer_group == group
        assert trigger["metadata"]["topic"] == getattr(settings, input_field)
        assert trigger["metadata"]["topic"] == {"grade": "acme.traces", "reproduce": "acme.seeds"}.get(
            stage, LoopSettings.model_fields[input_field].default)
        assert trigger["metadata"]["bootstrapServers"] == settings.kafka_bootstrap_servers
        assert trigger["metadata"]["offsetResetPolicy"] == "earliest"  # the workers' auto_offset_reset
        import jsonschema

        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    assert trigger["metadata"]["topic"] == "trace-source.reproductions"  # fix reads the reproductions
    # Another group (e.g. a second release on the same cluster): the pods and the trigger follow it.
    objects = template(helm, *enable_stage("reproduce"), "stages.reproduce.keda.enabled=true",
                       "stages.reproduce.groupId=acme-reproducer")
    (trigger,) = named(objects, "ScaledObject", STAGE_OBJECTS["reproduce"])["spec"]["triggers"]
    settings = loop_settings_from_env(stage_container(objects, "reproduce"), monkeypatch)
    assert trigger["metadata"]["consumerGroup"] == settings.consumer_group == "acme-reproducer"
    assert env_of(stage_container(objects, "grade"))["TRACE_SOURCE_CONSUMER_GROUP"] == "trace-source-grader"


def test_stage_settings_become_env_vars(helm, monkeypatch, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "kafka": {"bootstrapServers": BOOTSTRAP},
        "artifacts": {"existingClaim": "shared"},
        "loop": {"database": {"existingSecret": DB_SECRET}, "repository": "/srv/agent",
                 "executionPolicy": "reproduce",
                 "settings": {"lease_s": 90, "log_level": "debug", "max_message_bytes": 134217728,
                              "repository": "acme/agent"}},
        "stages": {
            "grade": {"settings": {"log_level": "warning", "judge_model": "gpt-x", "judge_timeout_s": 2.5,
                                   "judge_base_url": "http://judge:8000/v1"}},
            "seed": {"enabled": True, "settings": {"topic_partitions": None, "contract_dir": "archal"}},
            "reproduce": {"enabled": True, "settings": {"attempts": 5, "pass_env": ["OPENAI_API_KEY", "HTTP_PROXY"],
                                                        "otlp_endpoint": "http://collector:4318"}},
        },
    }))
    objects = template(helm, values=values)
    env = {stage: env_of(stage_container(objects, stage)) for stage in ("grade", "seed", "reproduce")}
    for stage in env:
        assert_env_is_worker_settings(stage_container(objects, stage), stage)
        assert env[stage]["TRACE_SOURCE_LEASE_S"] == "90"  # loop-wide
        assert env[stage]["TRACE_SOURCE_MAX_MESSAGE_BYTES"] == "134217728"  # not 1.34217728e+08
        assert env[stage]["TRACE_SOURCE_REPO"] == "/srv/agent"
    assert env["grade"]["TRACE_SOURCE_LOG_LEVEL"] == "warning"  # the stage's own setting wins
    assert env["seed"]["TRACE_SOURCE_LOG_LEVEL"] == "debug"
    assert "TRACE_SOURCE_TOPIC_PARTITIONS" not in env["seed"]  # null = the product's default
    assert env["reproduce"]["TRACE_SOURCE_PASS_ENV"] == "OPENAI_API_KEY,HTTP_PROXY"
    # The chart's default endpoint for the harness yields to the stage's own.
    assert env["reproduce"]["TRACE_SOURCE_OTLP_ENDPOINT"] == "http://collector:4318"
    # Chart defaults of the reproduce stage: one reproduction per poll, and a poll interval longer than it.
    assert env["reproduce"]["TRACE_SOURCE_POLL_MAX_RECORDS"] == "1"
    assert env["reproduce"]["TRACE_SOURCE_MAX_POLL_INTERVAL_S"] == "7200"

    grade = loop_settings_from_env(stage_container(objects, "grade"), monkeypatch)
    assert (grade.lease_s, grade.log_level, grade.judge_model, grade.judge_timeout_s) == (90.0, "warning", "gpt-x", 2.5)
    assert grade.judge_configured() and grade.repository == "acme/agent" and grade.execution_policy == "reproduce"
    seed = loop_settings_from_env(stage_container(objects, "seed"), monkeypatch)
    assert (seed.log_level, seed.contract_dir, seed.topic_partitions, seed.repo) == ("debug", "archal", None,
                                                                                     "/srv/agent")
    reproduce = loop_settings_from_env(stage_container(objects, "reproduce"), monkeypatch)
    assert reproduce.attempts == 5 and reproduce.pass_env_names() == ["OPENAI_API_KEY", "HTTP_PROXY"]
    assert (reproduce.poll_max_records, reproduce.max_poll_interval_s) == (1, 7200.0)
    assert reproduce.max_message_bytes == 134217728 and reproduce.otlp_endpoint == "http://collector:4318"


def test_stage_schema_rejects_unknown_chart_managed_and_other_stages_keys(helm):
    for bad in ("stages.grade.settings.attempts=3", "stages.seed.settings.judge_model=x",
                "stages.reproduce.settings.fix_command=x", "loop.settings.attempts=3", "loop.settings.judge_model=x",
                "stages.fix.settings.forge_token_env=X", "stages.grade.settings.database_url_env=X",
                "stages.grade.settings.judge_api_key_env=X", "stages.grade.settings.group_instance_id=x",
                "stages.grade.settings.envelope_store_dir=/x", "stages.grade.settings.kafka_bootstrap_servers=x",
                "stages.grade.settings.metrics_port=1", "stages.grade.settings.execution_policy=grade",
                "stages.seed.settings.repo=/x", "stages.seed.settings.state_dir=/x",
                "stages.seed.settings.grades_topic=x", "stages.grade.settings.in_process_stages=false",
                "stages.reproduce.settings.attempts=0", "stages.reproduce.settings.work_dir=relative",
                "stages.fix.settings.forge=bitbucket", "stages.grade.settings.no_such_setting=1",
                "stages.grade.unknown=1", "stages.grade.groupId=", "stages.grade.groupId=a group",
                "stages.grade.settings.consumer_group=x", "stages.assemble.enabled=true",
                "stages.grade.replicaCount=two", "stages.grade.keda.lagThreshold=0", "stages.grade.keda.unknown=1",
                "stages.grade.keda.extraTriggerMetadata.consumerGroup=x", "stages.fix.image.digest=latest",
                "stages.fix.image.unknown=x", "stages.grade.podDisruptionBudget.unknown=1", "loop.unknown=1",
                "loop.executionPolicy=everything", "loop.judge.apiKeySecret.unknown=x", "loop.topics.grades=",
                "loop.forge.unknown=x"):
        proc = template(helm, bad, check=False)
        assert proc.returncode != 0, f"{bad} was accepted"
        assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr


def test_schema_stage_settings_cover_every_loop_setting():
    """A new LoopSettings field must be offered under stages.<stage>.settings (and loop.settings when every stage
    has it) or deliberately set or excluded by the chart."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    managed = LOOP_CHART_SET | set(LOOP_SECRET_VARS) | LOOP_NOT_OFFERED
    for stage in STAGES:
        offered = set(schema["$defs"][f"{stage}Settings"]["properties"])
        fields = set(fields_for(stage=stage))
        assert offered | (managed & fields) == fields, f"chart and `worker {stage}` settings disagree"
        assert not offered & managed
    shared = set(schema["$defs"]["loopSharedSettings"]["properties"])
    assert shared == set(fields_for(stage="grade")) - set(STAGE_FIELDS) - managed
    # The variables the chart fills from Secrets are the ones the workers read by default.
    for field, var in LOOP_SECRET_VARS.items():
        assert LoopSettings.model_fields[field].default == var


def test_stage_image_override(helm):
    digest = "sha256:" + "ab" * 32
    objects = template(helm, *enable_stage("reproduce"), *enable_stage("fix"), "stages.seed.enabled=true",
                       "stages.reproduce.image.repository=registry.example.com/acme/runner",
                       "stages.reproduce.image.tag=1.2", "stages.reproduce.image.pullPolicy=Always",
                       "stages.fix.image.repository=registry.example.com/acme/runner",
                       "stages.fix.image.tag=ignored", f"stages.fix.image.digest={digest}")
    chart_image = receiver_container(objects)["image"]
    assert chart_image == "ghcr.io/trace-source/trace-source:0.1.0"
    reproduce = stage_container(objects, "reproduce")
    assert reproduce["image"] == "registry.example.com/acme/runner:1.2"
    assert reproduce["imagePullPolicy"] == "Always"
    fix = stage_container(objects, "fix")
    assert fix["image"] == f"registry.example.com/acme/runner@{digest}"  # the digest wins over the tag
    assert fix["imagePullPolicy"] == "IfNotPresent"  # image.pullPolicy
    for stage in ("grade", "seed"):
        assert stage_container(objects, stage)["image"] == chart_image
    assert assembler_container(objects)["image"] == chart_image
    # The override is the stage's alone; the command stays the product's.
    assert reproduce["args"] == ["worker", "reproduce"] and fix["args"] == ["worker", "fix"]


def test_all_four_stages_render_and_validate(helm, monkeypatch):
    import jsonschema

    objects = template(helm, values=ALL_ON_VALUES)
    assert validate_core_objects(objects) >= {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for so in by_kind(objects, "ScaledObject"):
        jsonschema.validate(so, SCALED_OBJECT_SCHEMA)
    receiver_service = named(objects, "Service", RECEIVER)
    http_port = next(p["port"] for p in receiver_service["spec"]["ports"] if p["name"] == "otlp-http")
    claim = {"name": "artifacts", "persistentVolumeClaim": {"claimName": "trace-source-artifacts"}}
    assembler_volumes = one(objects, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    assert claim in assembler_volumes

    for stage, name in STAGE_OBJECTS.items():
        deployment = named(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        c = stage_container(objects, stage)
        assert c["args"] == ["worker", stage]
        assert_env_is_worker_settings(c, stage)
        settings = loop_settings_from_env(c, monkeypatch)
        assert settings.database_url() == "secret:trace-source-db/url"
        assert (settings.execution_policy, settings.allow_external_execution) == ("fix", True)
        assert settings.repo == "https://git.example.com/acme/support-agent.git"
        assert settings.repository == "acme/support-agent" and settings.lease_s == 120.0
        assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace_s
        # Every stage reads and writes the one shared store (the assembler's claim checks, each other's files).
        assert claim in pod["volumes"]
        # Credentials only where they are used.
        env = env_of(c)
        assert ("TRACE_SOURCE_JUDGE_API_KEY" in env) == (stage == "grade")
        assert ("TRACE_SOURCE_FORGE_TOKEN" in env) == (stage == "fix")
        # Harness attempts (reproduce, and the fix's proof) export their traces to this release's receiver.
        if stage in ("reproduce", "fix"):
            assert settings.otlp_endpoint == f"http://{RECEIVER}.{NAMESPACE}.svc:{http_port}"
            assert settings.shutdown_grace_s >= 600  # long work in progress gets long to finish
            assert settings.poll_max_records == 1
        else:
            assert settings.otlp_endpoint is None
        service = named(objects, "Service", name)
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        assert named(objects, "ServiceMonitor", name)["spec"]["endpoints"][0]["port"] == "metrics"
        assert named(objects, "PodDisruptionBudget", name)["spec"]["selector"] == deployment["spec"]["selector"]
    assert env_of(stage_container(objects, "grade"))["TRACE_SOURCE_JUDGE_API_KEY"] == {
        "secretKeyRef": {"name": "trace-source-judge", "key": "api-key"}}
    assert env_of(stage_container(objects, "fix"))["TRACE_SOURCE_FORGE_TOKEN"] == {
        "secretKeyRef": {"name": "trace-source-forge", "key": "gitea-token"}}
    assert env_of(stage_container(objects, "reproduce"))["TRACE_SOURCE_PASS_ENV"] == (
        "OPENAI_API_KEY,OTEL_EXPORTER_OTLP_HEADERS")
    assert stage_container(objects, "reproduce")["envFrom"] == [{"secretRef": {"name": "support-agent-keys"}}]
    # Scaling as the values file says: KEDA for grade and reproduce, the chart HPA for seed, a fixed count for fix.
    assert sorted(o["metadata"]["name"] for o in by_kind(objects, "ScaledObject")) == sorted(
        [ASSEMBLER, STAGE_OBJECTS["grade"], STAGE_OBJECTS["reproduce"]])
    assert sorted(o["metadata"]["name"] for o in by_kind(objects, "HorizontalPodAutoscaler")) == [
        RECEIVER, STAGE_OBJECTS["seed"]]
    assert named(objects, "Deployment", STAGE_OBJECTS["fix"])["spec"]["replicas"] == 1


def render_notes(helm: str, tmp_path: Path, *set_args: str, values: Path | None = None) -> str:
    """NOTES.txt as `helm install` prints it: a copy of the chart renders it as a ConfigMap (helm template skips
    NOTES.txt)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "notes-under-test.yaml").write_text(
        '{{- define "notesUnderTest" }}\n' + notes + '\n{{- end }}\n'
        'apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes, labels: {}}\n'
        'data: {notes: {{ include "notesUnderTest" . | toJson }}}\n')
    objects = template(helm, *set_args, values=values, chart=chart)
    return named(objects, "ConfigMap", "notes")["data"]["notes"]


def test_notes_mention_the_stages(helm, tmp_path):
    notes = render_notes(helm, tmp_path / "all", values=ALL_ON_VALUES)
    for stage, name in STAGE_OBJECTS.items():
        group, _ = product_stage(stage)
        assert f"{name} (group {group})" in notes
    assert "trace-source.seeds -> trace-source.reproductions" in notes
    assert "image registry.example.com/acme/support-agent-runner:2024.06" in notes
    assert "Build one FROM ghcr.io/trace-source/trace-source:0.1.0" in notes
    assert f"exec deploy/{GRADER} -- trace-source status" in notes
    assert "WARNING: stages.fix is enabled" not in notes

    notes = render_notes(helm, tmp_path / "fix", *enable_stage("fix"), "auth.existingSecret=agents")
    assert "WARNING: stages.fix is enabled but loop.allowExternalExecution is false" in notes
    assert "Receiver authentication is on: give the harness OTEL_EXPORTER_OTLP_HEADERS" in notes
    notes = render_notes(helm, tmp_path / "off", "stages.grade.enabled=false")
    assert "No loop stage is enabled" in notes
