"""Shared pytest fixtures.

Kafka: tests run against a real broker, never a fake. ``kafka_bootstrap`` is one
broker shared by the whole session (given from outside or started by
``tests/kafka_harness.py``); ``kafka_broker_factory`` starts dedicated brokers that a
test may stop, kill and restart. When no broker can be had the tests fail, with
:data:`NO_KAFKA_HELP` saying how to provide one; they are never skipped.

Postgres: likewise real. ``postgres_server_url`` is one server for the whole session
(given from outside or started by ``tests/postgres_harness.py``); ``postgres_url`` is a
fresh, empty database on it for each test. No server: the tests fail with
:data:`NO_POSTGRES_HELP`.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

import postgres_harness
from kafka_harness import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaCluster,
    KafkaHarnessError,
    SecureListeners,
    create_topic,
    probe_kafka,
)
from pipeline.postgres_store import describe_url
from tls_support import Pki, make_pki

if TYPE_CHECKING:
    from fake_github import FakeGitHub
    from forge_harness import GiteaServer

# --------------------------------------------------------------------------- Kafka

KAFKA_BOOTSTRAP_ENV = "TRACE_SOURCE_TEST_KAFKA_BOOTSTRAP"

NO_KAFKA_HELP = f"""\
No Kafka broker for the tests: {{reason}}

Provide one in one of two ways:
  * set {KAFKA_BOOTSTRAP_ENV}=host:port to use a running Kafka broker
    (fault tests that stop brokers still need the second way);
  * install Java 17+ and Maven (`java` and `mvn` on PATH) so tests/kafka_harness.py
    can fetch Apache Kafka {KAFKA_VERSION} from Maven Central and start brokers itself
    (`python tests/kafka_harness.py --fetch` fetches the jars ahead of time)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-iterations", type=int, default=None,
                     help="How many times tests/test_faults.py repeats each fault sequence (default 1, or "
                          "$TRACE_SOURCE_FAULT_ITERATIONS).")


def _or_fail(action: Callable[[], object], context: str = "") -> None:
    """Run *action*; if it cannot get a broker, fail the test with :data:`NO_KAFKA_HELP`."""
    try:
        action()
        return
    except (KafkaHarnessError, OSError) as exc:
        reason = f"{context}{exc}"
    # Outside the except block, so the report shows the help, not a chained traceback.
    pytest.fail(NO_KAFKA_HELP.format(reason=reason), pytrace=False)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port[,...]`` of the session's Kafka broker.

    Uses ``$TRACE_SOURCE_TEST_KAFKA_BOOTSTRAP`` if set (checked to answer first),
    otherwise starts one local single-node broker for the whole session.
    """
    given = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if given:
        _or_fail(lambda: probe_kafka(given), f"{KAFKA_BOOTSTRAP_ENV}={given}: ")
        yield given
        return
    broker = KafkaBroker()
    _or_fail(broker.start)
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for the session (CA, server for 127.0.0.1/::1/localhost, client, an unrelated CA)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class SecureKafka:
    """The session's secured broker: ``cluster`` (its ``listener_bootstrap("SASL_SSL" | "SSL" | "SASL_PLAINTEXT")``),
    the ``pki`` its certificates come from, and the SCRAM ``user``/``password`` (PLAIN: ``plain_user``/
    ``plain_password``)."""

    cluster: KafkaCluster
    pki: Pki
    user: str = "alice"
    password: str = "alice-secret"
    plain_user: str = "bob"
    plain_password: str = "bob-secret"

    @property
    def plaintext(self) -> str:
        return self.cluster.bootstrap_servers


@pytest.fixture(scope="session")
def secure_kafka(pki: Pki) -> Iterator[SecureKafka]:
    """One broker for the session with SASL_SSL (SCRAM users created at format time, PLAIN, OAUTHBEARER), SSL with
    client authentication required, and SASL_PLAINTEXT listeners next to PLAINTEXT; always started by the harness
    (an outside broker cannot be assumed to have them)."""
    fields = SecureKafka.__dataclass_fields__
    cluster = KafkaBroker(secure=SecureListeners(
        keystore_pem=pki.server.pem, truststore_pem=pki.ca,
        scram_users={fields["user"].default: fields["password"].default},
        plain_users={fields["plain_user"].default: fields["plain_password"].default}))
    _or_fail(cluster.start)
    try:
        yield SecureKafka(cluster=cluster, pki=pki)
    finally:
        cluster.stop()


@pytest.fixture
def kafka_broker_factory() -> Iterator[Callable[..., KafkaCluster]]:
    """Start dedicated brokers: ``kafka_broker_factory(nodes=1, **KafkaCluster kwargs)``.

    Returns the started :class:`KafkaCluster`, which the test may stop, kill and
    restart node by node; every cluster is stopped at teardown. Starting blocks for a
    few seconds, so an async test that already runs Kafka clients should call it (and
    the node methods) through ``await asyncio.to_thread(...)``.
    """
    clusters: list[KafkaCluster] = []

    def start(nodes: int = 1, **kwargs: Any) -> KafkaCluster:
        cluster = KafkaCluster(nodes, **kwargs)
        clusters.append(cluster)
        _or_fail(cluster.start)
        return cluster

    yield start
    for cluster in reversed(clusters):
        cluster.stop()


@pytest.fixture
async def kafka_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> str:
    """Name of a fresh topic on ``kafka_bootstrap`` (3 partitions, replication factor 1).

    Another partition count via indirect parametrization:
    ``@pytest.mark.parametrize("kafka_topic", [1], indirect=True)``.
    """
    name = f"test-{uuid.uuid4().hex[:12]}"
    await create_topic(kafka_bootstrap, name, partitions=getattr(request, "param", 3))
    return name


# --------------------------------------------------------------------------- Postgres

DATABASE_URL_ENV = "TRACE_SOURCE_TEST_DATABASE_URL"

NO_POSTGRES_HELP = f"""\
No Postgres server for the tests: {{reason}}

Provide one in one of two ways:
  * set {DATABASE_URL_ENV}=postgresql://user:password@host:port/db to use a running
    server (the user must be allowed to CREATE DATABASE: each test gets its own;
    a test that stops its server still needs the second way);
  * install the server binaries (Debian: `apt-get install postgresql`, which `make test`
    does when it runs as root) so tests/postgres_harness.py can start a server itself
    (it looks in /usr/lib/postgresql/*/bin, `pg_config --bindir` and PATH)."""


def _started_postgres() -> postgres_harness.PostgresServer:
    """A Postgres server started by the harness; fails the test with :data:`NO_POSTGRES_HELP` when it cannot."""
    server = postgres_harness.PostgresServer()
    try:
        server.start()
    except (postgres_harness.PostgresHarnessError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        reason = str(exc)
    else:
        return server
    pytest.fail(NO_POSTGRES_HELP.format(reason=reason), pytrace=False)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """Superuser URL of the session's Postgres server: ``$TRACE_SOURCE_TEST_DATABASE_URL`` if set (checked to
    answer first), otherwise a server started by the harness for the whole session."""
    given = os.environ.get(DATABASE_URL_ENV)
    if given:
        try:
            postgres_harness.probe_postgres(given)
        except (psycopg.Error, OSError) as exc:
            reason = f"{DATABASE_URL_ENV} ({describe_url(given)}): {exc}"
        else:
            yield given
            return
        pytest.fail(NO_POSTGRES_HELP.format(reason=reason), pytrace=False)
    server = _started_postgres()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def postgres_server_factory() -> Iterator[Callable[[], postgres_harness.PostgresServer]]:
    """Start dedicated Postgres servers (for tests that stop one): ``postgres_server_factory()`` returns a started
    :class:`postgres_harness.PostgresServer` (superuser URL: ``.url``); every server is stopped at teardown. Needs the
    server binaries (a server given by URL cannot be stopped)."""
    servers: list[postgres_harness.PostgresServer] = []

    def start() -> postgres_harness.PostgresServer:
        servers.append(_started_postgres())
        return servers[-1]

    yield start
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """``postgresql://`` URL of a fresh, empty database for this test (dropped afterwards), so tests never see each
    other's rows."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres_harness.create_database(postgres_server_url, name)
    yield url
    postgres_harness.drop_database(postgres_server_url, name)


# --------------------------------------------------------------------------- forges

NO_GITEA_HELP = """\
No Gitea for the forge tests: {reason}

`make test` builds it once from the Go module proxy into ~/.cache/trace-source (about 9 minutes the first time);
by hand: `python tests/forge_harness.py --build` (needs Go 1.26+), or set TRACE_SOURCE_TEST_GITEA to a Gitea or
Forgejo binary with its options/ directory beside it."""


@pytest.fixture(scope="session")
def gitea(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GiteaServer]:
    """A real Gitea server for the whole session (``tests/forge_harness.py``): SQLite in a temporary directory,
    on a free loopback port, with an admin and its API token (``gitea.token``). Tests create their own
    repositories (unique names) through its helpers."""
    from forge_harness import GiteaError, GiteaServer

    server = GiteaServer(workdir=tmp_path_factory.mktemp("gitea"))
    try:
        server.start()
    except (GiteaError, OSError) as exc:
        reason = str(exc)
    else:
        try:
            yield server
        finally:
            server.stop()
        return
    pytest.fail(NO_GITEA_HELP.format(reason=reason), pytrace=False)


@pytest.fixture
def fake_github() -> Iterator[FakeGitHub]:
    """The local stand-in for the hosted GitHub REST API (``tests/fake_github.py``), empty; a test adds
    repositories (backed by git repositories on disk) and tokens."""
    from fake_github import FakeGitHub

    with FakeGitHub() as fake:
        yield fake
