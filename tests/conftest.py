"""Shared pytest fixtures.

Kafka: tests run against a real broker, never a fake. ``kafka_bootstrap`` is one
broker shared by the whole session (given from outside or started by
``tests/kafka_harness.py``); ``kafka_broker_factory`` starts dedicated brokers that a
test may stop, kill and restart. When no broker can be had the tests fail, with
:data:`NO_KAFKA_HELP` saying how to provide one; they are never skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from kafka_harness import (
    KAFKA_VERSION,
    KafkaBroker,
    KafkaCluster,
    KafkaHarnessError,
    create_topic,
    probe_kafka,
)

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
