"""Real Apache Kafka (KRaft) brokers for tests, assembled from Maven Central jars.

Why this exists: the project's tests talk to a *real* broker, never a fake, but the
machines that run them have no Docker and no access to the Apache download mirrors;
they do have Java 17, Maven and Maven Central. Kafka's broker is an ordinary Maven
artifact (``org.apache.kafka:kafka_2.13``), so Maven can assemble a runnable classpath
and we start ``kafka.Kafka`` directly with a generated ``server.properties``.

Pieces:

* :func:`ensure_kafka_jars` fetches the jars once into a cache outside git.
* :class:`KafkaCluster` runs 1..N combined broker+controller nodes on loopback, with
  per-node stop/start/kill for fault tests; :class:`KafkaBroker` is the one-node case.
* :func:`probe_kafka` checks that a broker answers; :func:`create_topic` makes a topic
  and raises the broker's error (the test brokers never auto-create topics).
* :class:`SecureListeners` adds SASL_SSL, SSL (client authentication required) and
  SASL_PLAINTEXT listeners next to the PLAINTEXT one, with SCRAM users created when the
  storage is formatted; :meth:`KafkaCluster.listener_bootstrap` gives their addresses.
* ``python tests/kafka_harness.py --fetch`` / ``--run [--nodes 3]`` for developers.

The core classes do not depend on pytest; ``tests/conftest.py`` wraps them in fixtures.
All methods are synchronous (they block while a JVM starts or stops). From an async
test, call them through ``await asyncio.to_thread(...)`` so aiokafka clients running
on the event loop keep working meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

KAFKA_VERSION = "3.9.2"
"""Last 3.x line: KRaft-ready and still serving every old protocol version aiokafka sends."""

SCALA_BINARY_VERSION = "2.13"

# kafka_2.13 declares reload4j only as compileOnly, so without an slf4j binding the
# broker would log nothing (and parts of it import org.apache.log4j directly).
_SLF4J_BINDING = ("org.slf4j", "slf4j-reload4j", "1.7.36")
_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.10.0"

_MARKER = ".complete"
_LOG4J_CONFIG = Path(__file__).resolve().parent / "kafka" / "log4j.properties"

# Small heap so three nodes fit next to the tests. SerialGC plus C1-only JIT cut the
# start of a single node from ~4.4 s to ~2.0 s and of three nodes from ~8.4 s to ~4.9 s
# on a 2-core machine (median of 3-4 runs, jars cached); test brokers never run long
# enough to profit from C2 or a parallel collector.
JVM_OPTIONS: tuple[str, ...] = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)

HOST = "127.0.0.1"

# Seconds KafkaCluster.stop() lets nodes shut down cleanly before SIGKILL (see there).
_TEARDOWN_GRACE = 2.0


class KafkaHarnessError(RuntimeError):
    """The harness could not fetch, format, start or stop a broker."""


# --------------------------------------------------------------------------- jars


def kafka_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Directory holding ``libs/`` for *version*; outside the git checkout on purpose.

    ``$TRACE_SOURCE_KAFKA_CACHE`` replaces the root (``~/.cache/trace-source/kafka``,
    honouring ``$XDG_CACHE_HOME``) so CI can point it at a cached volume.
    """
    root = os.environ.get("TRACE_SOURCE_KAFKA_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        base = Path(xdg).expanduser() / "trace-source" / "kafka"
    return base / version


def ensure_kafka_jars(version: str = KAFKA_VERSION) -> Path:
    """Return the directory of Kafka broker jars for *version*, fetching them if needed.

    Maven resolves ``kafka_2.13:<version>`` plus an slf4j binding and copies the whole
    runtime classpath into ``<cache>/<version>/libs``. A marker file written after a
    successful copy makes later calls (and later test runs) return immediately. An
    exclusive ``fcntl`` lock serialises concurrent callers (e.g. pytest-xdist workers);
    a half-finished copy from a crashed run has no marker and is simply redone.
    """
    version_dir = kafka_cache_dir(version)
    libs = version_dir / "libs"
    if (libs / _MARKER).is_file():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaHarnessError(
            "Maven (`mvn`) is not on PATH; it is needed once to fetch the Kafka "
            f"{version} jars from Maven Central into {libs}"
        )
    version_dir.mkdir(parents=True, exist_ok=True)
    with open(version_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _MARKER).is_file():  # another process finished while we waited
            return libs
        shutil.rmtree(libs, ignore_errors=True)
        pom = version_dir / "pom.xml"
        pom.write_text(_pom_xml(version))
        cmd = [
            mvn, "-q", "-B", "-f", str(pom),
            f"{_DEPENDENCY_PLUGIN}:copy-dependencies",
            f"-DoutputDirectory={libs}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        broker_jar = libs / f"kafka_{SCALA_BINARY_VERSION}-{version}.jar"
        if proc.returncode != 0 or not broker_jar.is_file():
            output = (proc.stdout + proc.stderr).strip()
            raise KafkaHarnessError(
                f"fetching Kafka {version} jars with Maven failed "
                f"(exit {proc.returncode}): {' '.join(cmd)}\n{_tail(output, 40)}"
            )
        jars = sorted(p.name for p in libs.glob("*.jar"))
        (libs / _MARKER).write_text("\n".join(jars) + "\n")
    return libs


def _pom_xml(version: str) -> str:
    group, artifact, binding_version = _SLF4J_BINDING
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.trace-source</groupId>
  <artifactId>kafka-test-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_{SCALA_BINARY_VERSION}</artifactId>
      <version>{version}</version>
    </dependency>
    <dependency>
      <groupId>{group}</groupId>
      <artifactId>{artifact}</artifactId>
      <version>{binding_version}</version>
    </dependency>
  </dependencies>
</project>
"""


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaHarnessError("`java` (17 or newer) is not on PATH and JAVA_HOME is unset")
    return java


# --------------------------------------------------------------------------- nodes


def _free_ports(count: int) -> list[int]:
    """Ask the kernel for *count* distinct free loopback ports.

    All sockets stay open until every port is chosen so none is handed out twice.
    Another process could still grab a port before the JVM binds it; that shows up as
    a clear start failure (the bind error is in the log tail), not as a hang.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def _random_kafka_uuid() -> str:
    """A Kafka ``Uuid`` string: 22 chars of unpadded base64url.

    Like Kafka's own ``Uuid.randomUuid()`` it never starts with ``-``, which the
    command-line parser of ``StorageTool`` would take for an option.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class SecureListeners:
    """Listeners with TLS and SASL next to the PLAINTEXT one (which the harness itself, the
    controllers and the brokers among themselves keep using).

    * ``SASL_SSL``: SCRAM-SHA-256, SCRAM-SHA-512 (users in ``scram_users``, created by
      ``kafka-storage format --add-scram``), PLAIN (``plain_users``) and OAUTHBEARER (Kafka's
      *unsecured* JWS validator: any ``alg: none`` token with ``sub``, ``iat`` and ``exp``).
    * ``SSL``: TLS with ``ssl.client.auth=required``; client certificates must chain to
      ``truststore_pem``.
    * ``SASL_PLAINTEXT``: the same SASL mechanisms without TLS.

    ``keystore_pem``: the broker's private key and certificate chain in one PEM file
    (``ssl.keystore.type=PEM``, key unencrypted); ``truststore_pem``: CA certificates the
    SSL listener trusts for client certificates.
    """

    keystore_pem: Path
    truststore_pem: Path
    scram_users: Mapping[str, str] = field(default_factory=dict)
    plain_users: Mapping[str, str] = field(default_factory=dict)

    LISTENERS = ("SASL_SSL", "SSL", "SASL_PLAINTEXT")
    MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER")

    def properties(self, host: str, ports: Mapping[str, int]) -> dict[str, str]:
        """Broker properties for these listeners (``ports``: listener name -> port)."""
        props = {
            "sasl.enabled.mechanisms": ",".join(self.MECHANISMS),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore_pem),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.truststore_pem),
            "listener.name.ssl.ssl.client.auth": "required",
        }
        plain = " ".join(f'user_{u}="{p}"' for u, p in self.plain_users.items())
        for name in ("sasl_ssl", "sasl_plaintext"):
            prefix = f"listener.name.{name}"
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            props[f"{prefix}.scram-sha-256.sasl.jaas.config"] = scram
            props[f"{prefix}.scram-sha-512.sasl.jaas.config"] = scram
            props[f"{prefix}.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain};"
            )
            props[f"{prefix}.oauthbearer.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required "
                'unsecuredLoginStringClaim_sub="broker";'
            )
        return props

    def format_args(self) -> list[str]:
        """``kafka-storage format`` arguments creating the SCRAM users (both mechanisms)."""
        args = []
        for user, password in self.scram_users.items():
            for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
                args += ["--add-scram", f"{mechanism}=[name={user},password={password}]"]
        return args


class _Node:
    """One combined broker+controller JVM; its ports and directories survive restarts."""

    def __init__(
        self,
        node_id: int,
        root: Path,
        broker_port: int,
        controller_port: int,
        extra_ports: Mapping[str, int] | None = None,
    ):
        self.node_id = node_id
        self.broker_port = broker_port
        self.controller_port = controller_port
        self.extra_ports = dict(extra_ports or {})  # listener name -> port
        self.dir = root / f"node-{node_id}"
        self.data_dir = self.dir / "data"
        self.logs_dir = self.dir / "logs"
        self.config = self.dir / "server.properties"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.broker_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def java_command(self, libs: Path, main_class: str, *args: str) -> list[str]:
        return [
            _java(),
            *JVM_OPTIONS,
            f"-Dlog4j.configuration={_LOG4J_CONFIG.as_uri()}",
            f"-Dkafka.logs.dir={self.logs_dir}",
            "-cp",
            f"{libs}/*",
            main_class,
            *args,
        ]

    def launch(self, libs: Path) -> None:
        """Start the JVM in its own session so a Ctrl-C aimed at pytest doesn't reach it."""
        with open(self.logs_dir / "stdout.log", "ab") as out:
            self.process = subprocess.Popen(
                self.java_command(libs, "kafka.Kafka", str(self.config)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> None:
        """Wait for the JVM to exit, SIGKILLing it once *timeout* has passed."""
        if self.process is None:
            return
        try:
            self.process.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        """The broker's ERROR lines and the last *lines* of its logs, for error messages.

        The ERROR lines come first because a failed start ends in a long tail of
        orderly shutdown messages that buries the actual cause.
        """
        parts = []
        for name in ("server.log", "stdout.log"):
            path = self.logs_dir / name
            text = path.read_text(errors="replace") if path.is_file() else ""
            if not text.strip():
                continue
            errors = [line for line in text.splitlines() if "] ERROR " in line][-10:]
            if errors:
                parts.append(f"--- ERROR lines of {path} ---\n" + "\n".join(errors))
            parts.append(f"--- {path} (last {lines} lines) ---\n{_tail(text, lines)}")
        return "\n".join(parts) or f"(no output in {self.logs_dir})"


class KafkaCluster:
    """N combined broker+controller KRaft nodes on loopback, for tests and benchmarks.

    Every node gets two free ports (client and controller) and its own data and log
    directory under one temp directory. A static ``controller.quorum.voters`` list is
    used, so all nodes are formatted the same way and any node can be stopped and
    started again with the same identity, ports and data ("broker down, then back").
    Methods take a 0-based node *index*; node *index* has Kafka ``node.id`` index + 1.

    Topic defaults follow the node count: replication factor ``min(nodes, 3)`` and
    ``min.insync.replicas`` one less (at least 1), applied to the internal offsets and
    transaction topics too. Those internal topics get one partition each because their
    default of 50 makes the first consumer-group join slow on a small machine.
    ``overrides`` adds or replaces broker properties; ``secure`` adds TLS/SASL listeners
    (:class:`SecureListeners`).
    """

    def __init__(
        self,
        nodes: int = 1,
        *,
        version: str = KAFKA_VERSION,
        startup_timeout: float = 120.0,
        shutdown_timeout: float = 30.0,
        overrides: Mapping[str, str] | None = None,
        secure: SecureListeners | None = None,
    ):
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.node_count = nodes
        self.version = version
        self.startup_timeout = startup_timeout
        self.shutdown_timeout = shutdown_timeout
        self.overrides = dict(overrides or {})
        self.secure = secure
        self.replication_factor = min(nodes, 3)
        self.min_insync_replicas = max(1, self.replication_factor - 1)
        self._libs: Path | None = None
        self._root: Path | None = None
        self._nodes: list[_Node] = []

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Fetch jars if needed, format fresh storage, start every node, wait until ready."""
        if self._nodes:
            raise KafkaHarnessError("cluster already started")
        self._libs = ensure_kafka_jars(self.version)
        self._root = Path(tempfile.mkdtemp(prefix="trace-source-kafka-"))
        extra = SecureListeners.LISTENERS if self.secure else ()
        per_node = 2 + len(extra)
        ports = _free_ports(per_node * self.node_count)
        self._nodes = []
        for i in range(self.node_count):
            mine = ports[per_node * i : per_node * (i + 1)]
            self._nodes.append(
                _Node(i + 1, self._root, mine[0], mine[1], dict(zip(extra, mine[2:])))
            )
        _live_clusters.add(self)
        try:
            self._format_all()
            for node in self._nodes:
                node.launch(self._libs)
            self._wait_ready(self._nodes, time.monotonic() + self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node and delete the cluster's data.

        All nodes get SIGTERM at once: stopped one by one, the last node's broker would
        wait for a controller quorum that is already gone. Nodes still running after
        ``_TEARDOWN_GRACE`` seconds get SIGKILL. That is expected for the Raft leader of
        a multi-node cluster, which spends a hard-coded 5 s waiting for resignation
        acknowledgements from followers that have already exited; a clean exit buys
        nothing for data deleted right afterwards.
        """
        for node in self._nodes:
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + min(_TEARDOWN_GRACE, self.shutdown_timeout)
        for node in self._nodes:
            node.wait(deadline - time.monotonic())
        self._nodes = []
        _live_clusters.discard(self)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None

    def stop_node(self, index: int) -> None:
        """Gracefully stop node *index* (0-based); its data and ports are kept."""
        node = self._node(index)
        node.signal(signal.SIGTERM)
        node.wait(self.shutdown_timeout)

    def kill_node(self, index: int) -> None:
        """SIGKILL node *index* (0-based): a crash, no controlled shutdown."""
        node = self._node(index)
        node.signal(signal.SIGKILL)
        node.wait(self.shutdown_timeout)

    def start_node(self, index: int) -> None:
        """Start node *index* (0-based) again with its old data and ports; wait until it serves."""
        node = self._node(index)
        if node.running:
            raise KafkaHarnessError(f"node {index} is already running")
        assert self._libs is not None
        node.launch(self._libs)
        self._wait_ready([node], time.monotonic() + self.startup_timeout)

    def freeze_node(self, index: int) -> None:
        """SIGSTOP node *index* (0-based): its sockets stay open but it answers nothing, as a network partition
        or a long GC pause looks to clients. :meth:`thaw_node` resumes it."""
        self._node(index).signal(signal.SIGSTOP)

    def thaw_node(self, index: int) -> None:
        """SIGCONT node *index* (0-based) after :meth:`freeze_node`; harmless on a node that is not frozen."""
        self._node(index).signal(signal.SIGCONT)

    def ensure_running(self, index: int) -> None:
        """Node *index* serving again, whatever an earlier test did to it: thawed if running, else started."""
        if self._node(index).running:
            self.thaw_node(index)
        else:
            self.start_node(index)

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- addresses

    @property
    def bootstrap_servers(self) -> str:
        """Comma-separated ``host:port`` of every node's client listener."""
        if not self._nodes:
            raise KafkaHarnessError("cluster is not started")
        return ",".join(node.address for node in self._nodes)

    def listener_bootstrap(self, listener: str) -> str:
        """Comma-separated ``host:port`` of every node's *listener* (``SASL_SSL``, ``SSL``,
        ``SASL_PLAINTEXT``; needs ``secure``), e.g. for a client using that protocol."""
        if not self._nodes:
            raise KafkaHarnessError("cluster is not started")
        if listener not in self._nodes[0].extra_ports:
            raise KafkaHarnessError(f"no {listener} listener (start the cluster with secure=...)")
        return ",".join(f"{HOST}:{node.extra_ports[listener]}" for node in self._nodes)

    def run_tool(self, main_class: str, *args: str, timeout: float = 120.0) -> str:
        """Run one of Kafka's command-line tools (e.g. ``kafka.admin.ConfigCommand``) from the
        broker's class path; returns its output, raises :class:`KafkaHarnessError` on failure."""
        if not self._nodes or self._libs is None:
            raise KafkaHarnessError("cluster is not started")
        node = self._nodes[0]
        proc = subprocess.run(
            node.java_command(self._libs, main_class, *args),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise KafkaHarnessError(f"{main_class} {' '.join(args)} failed:\n{_tail(output, 30)}")
        return output

    def set_scram_password(
        self, user: str, password: str, mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "SCRAM-SHA-512")
    ) -> None:
        """Change (or create) *user*'s SCRAM credentials for *mechanisms* on the running
        cluster, through the PLAINTEXT listener (one tool run per mechanism: Kafka refuses
        two changes of one user in a request). Existing connections stay authenticated."""
        for mechanism in mechanisms:
            self.run_tool(
                "kafka.admin.ConfigCommand", "--bootstrap-server", self.bootstrap_servers,
                "--alter", "--add-config", f"{mechanism}=[iterations=4096,password={password}]",
                "--entity-type", "users", "--entity-name", user,
            )  # fmt: skip

    def node_address(self, index: int) -> str:
        """``host:port`` of node *index* (0-based), e.g. to check a client's failover."""
        return self._node(index).address

    def log_path(self, index: int) -> Path:
        """The broker log (``server.log``) of node *index*, for debugging a failed test."""
        return self._node(index).logs_dir / "server.log"

    # ----------------------------------------------------------------- internals

    def _node(self, index: int) -> _Node:
        if not self._nodes:
            raise KafkaHarnessError("cluster is not started")
        return self._nodes[index]

    def _properties(self, node: _Node) -> dict[str, str]:
        voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self._nodes)
        rf, min_isr = str(self.replication_factor), str(self.min_insync_replicas)
        extra = "".join(f",{name}://{HOST}:{port}" for name, port in node.extra_ports.items())
        protocols = "".join(f",{name}:{name}" for name in node.extra_ports)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://{HOST}:{node.broker_port},CONTROLLER://{HOST}:{node.controller_port}"
                + extra
            ),
            "advertised.listeners": f"PLAINTEXT://{node.address}{extra}",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": (
                f"CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT{protocols}"
            ),
            "log.dirs": str(node.data_dir),
            "num.partitions": "3",
            "default.replication.factor": rf,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "message.max.bytes": "16777216",
            "num.recovery.threads.per.data.dir": "1",
            # A node restarted after SIGKILL cannot register until the controller has
            # expired its old session (DUPLICATE_BROKER_REGISTRATION until then), and a
            # killed node keeps leading its partitions until then too; the defaults
            # (2 s / 9 s) would make every crash test wait 9 s twice.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
        }
        if self.secure is not None:
            props.update(self.secure.properties(HOST, node.extra_ports))
        props.update(self.overrides)
        return props

    def _format_all(self) -> None:
        """Write configs and run ``StorageTool format`` for all nodes in parallel.

        Formatting writes ``meta.properties`` and the bootstrap metadata checkpoint; it
        is a JVM start of its own, hence parallel. No ``--standalone`` or
        ``--initial-controllers`` because the quorum is the static voters list.
        """
        assert self._libs is not None
        cluster_id = _random_kafka_uuid()
        procs = []
        for node in self._nodes:
            node.logs_dir.mkdir(parents=True)
            node.config.write_text(
                "".join(f"{k}={v}\n" for k, v in self._properties(node).items())
            )
            cmd = node.java_command(
                self._libs, "kafka.tools.StorageTool",
                "format", "-t", cluster_id, "-c", str(node.config),
                *(self.secure.format_args() if self.secure else ()),
            )  # fmt: skip
            procs.append(
                subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
            )
        for node, proc in zip(self._nodes, procs):
            output, _ = proc.communicate()
            if proc.returncode != 0:
                raise KafkaHarnessError(
                    f"formatting storage of Kafka node {node.node_id} failed "
                    f"(exit {proc.returncode}):\n{_tail(output, 40)}"
                )

    def _wait_ready(self, nodes: list[_Node], deadline: float) -> None:
        """Block until each of *nodes* accepts TCP and serves metadata listing itself.

        Only the node's own metadata listing itself shows that the node is a full
        cluster member again; the port alone could even belong to another process.
        The TCP poll first is cheap and spares one aiokafka connection-error log line
        per retry while the JVM boots. The aiokafka probe runs on a private event loop
        in a worker thread, so this works whether or not the caller runs a loop.
        """
        for node in nodes:
            while not _port_open(node.broker_port):
                self._check_alive(node)
                if time.monotonic() > deadline:
                    self._timeout(node, "its client port to accept TCP connections")
                time.sleep(0.1)
        for node in nodes:
            while True:
                self._check_alive(node)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._timeout(node, "a metadata response listing the node")
                ids = _run_on_private_loop(_broker_ids(node.address, remaining))
                if ids and node.node_id in ids:
                    break
                time.sleep(0.2)

    def _check_alive(self, node: _Node) -> None:
        if not node.running:
            code = node.process.returncode if node.process else None
            raise KafkaHarnessError(
                f"Kafka node {node.node_id} exited (code {code}) while starting\n"
                f"{node.log_tail()}"
            )

    def _timeout(self, node: _Node, what: str) -> None:
        raise KafkaHarnessError(
            f"Kafka node {node.node_id} ({node.address}) not ready after "
            f"{self.startup_timeout:.0f}s: waited for {what}\n{node.log_tail()}"
        )


class KafkaBroker(KafkaCluster):
    """A single combined broker+controller node (replication factor 1).

    Takes the same keyword arguments as :class:`KafkaCluster`; its node index is 0.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(1, **kwargs)


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


async def _broker_ids(bootstrap_servers: str, timeout: float) -> set[int] | None:
    """Node ids of the live brokers in the metadata of the first server that answers.

    A bootstrap client rather than an admin client: the admin client sends its requests
    to any known broker, and the other brokers of a cluster still list a SIGKILLed
    node until the controller has expired its session. Only the node's own answer
    tells that the node itself is back.
    """
    from aiokafka.client import AIOKafkaClient  # keep `--fetch` free of aiokafka

    request_timeout_ms = int(min(max(timeout, 1.0), 10.0) * 1000)
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=request_timeout_ms
    )
    try:
        await client.bootstrap()
    except Exception:
        return None
    finally:
        await client.close()
    return {broker.nodeId for broker in client.cluster.brokers()}


def probe_kafka(bootstrap_servers: str, timeout: float = 30.0) -> set[int]:
    """Return the broker ids of the cluster at *bootstrap_servers*, retrying until *timeout*.

    Used to check a broker handed in from outside (``TRACE_SOURCE_TEST_KAFKA_BOOTSTRAP``)
    before tests run, so a typo fails once with a clear message instead of as a
    connection error deep inside every test.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        ids = _run_on_private_loop(_broker_ids(bootstrap_servers, remaining))
        if ids:
            return ids
        if remaining <= 0:
            raise KafkaHarnessError(
                f"no Kafka broker answered a metadata request at {bootstrap_servers} "
                f"within {timeout:.0f}s"
            )
        time.sleep(0.5)


async def create_topic(
    bootstrap_servers: str,
    name: str,
    *,
    partitions: int = 3,
    replication_factor: int = 1,
    configs: Mapping[str, str] | None = None,
) -> None:
    """Create topic *name*, raising the broker's error (aiokafka only returns it).

    The test brokers run with ``auto.create.topics.enable=false`` so that a typo in a
    topic name fails loudly; tests create their topics with this instead.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        topic = NewTopic(name, partitions, replication_factor, topic_configs=dict(configs or {}))
        response = await admin.create_topics([topic])
    finally:
        await admin.close()
    for topic_name, error_code, *message in response.topic_errors:
        if error_code:
            raise for_code(error_code)(f"creating topic {topic_name!r}: {message}")


def _run_on_private_loop(coro: Coroutine[Any, Any, T]) -> T:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


# Clusters still running when the interpreter exits (a test crashed, Ctrl-C) would
# leave orphan JVMs holding 512 MB each; stop them on the way out.
_live_clusters: set[KafkaCluster] = set()


@atexit.register
def _stop_leftover_clusters() -> None:
    for cluster in list(_live_clusters):
        cluster.stop()


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--fetch", action="store_true", help="only fetch the jars into the cache")
    action.add_argument("--run", action="store_true", help="run a broker until Ctrl-C / SIGTERM")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes for --run")
    parser.add_argument("--version", default=KAFKA_VERSION, help="Kafka version")
    args = parser.parse_args(argv)

    if args.fetch:
        print(ensure_kafka_jars(args.version))
        return 0

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    began = time.monotonic()
    with KafkaCluster(args.nodes, version=args.version) as cluster:
        print(f"ready after {time.monotonic() - began:.1f}s", file=sys.stderr)
        for i in range(args.nodes):
            address, log = cluster.node_address(i), cluster.log_path(i)
            print(f"node {i}: {address}  log: {log}", file=sys.stderr)
        print(cluster.bootstrap_servers, flush=True)
        stop.wait()
        print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
