"""Topic administration for ``trace-source topics create`` and the optional topic creation at ``serve`` start-up."""

from __future__ import annotations

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import NoError, TopicAlreadyExistsError, for_code

from sinks.kafka import CLIENT_ID
from sinks.kafka_security import KafkaSecurity, aiokafka_kwargs, start_or_explain

log = structlog.get_logger(__name__)


async def create_topic(
    bootstrap_servers: str,
    topic: str,
    partitions: int,
    replication_factor: int | None = None,
    config: dict[str, str] | None = None,
    *,
    max_request_size: int | None = None,
    request_timeout_ms: int = 15000,
    security: KafkaSecurity | None = None,
) -> bool:
    """Create ``topic`` unless it exists. Returns True if it was created, False if it already existed.

    ``replication_factor``: defaults to ``min(3, number of brokers)``. ``config``: topic configs (string values),
    e.g. ``{"retention.ms": "86400000"}``. ``max_request_size``: the producer's limit in bytes; when given, the
    topic's ``max.message.bytes`` is set to it so the broker accepts every record the producer sends (an explicit
    ``config["max.message.bytes"]`` wins). An existing topic is left unchanged, whatever its settings.

    Raises ``aiokafka.errors.KafkaError`` if the cluster is unreachable or refuses the request (e.g.
    ``InvalidReplicationFactorError`` when asking for more replicas than brokers);
    ``sinks.kafka_security.KafkaSecurityError`` when ``security`` does not get us in.
    """
    topic_config = dict(config or {})
    if max_request_size is not None:
        topic_config.setdefault("max.message.bytes", str(max_request_size))
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, client_id=CLIENT_ID, request_timeout_ms=request_timeout_ms,
        **aiokafka_kwargs(security),
    )
    await start_or_explain(admin.start, bootstrap_servers, security)
    try:
        if replication_factor is None:
            brokers = (await admin.describe_cluster())["brokers"]
            replication_factor = min(3, len(brokers))
        response = await admin.create_topics(
            [NewTopic(topic, partitions, replication_factor, topic_configs=topic_config)]
        )
    finally:
        await admin.close()
    # topic_errors rows are (topic, error_code[, error_message]) depending on the negotiated version.
    for row in response.topic_errors:
        if row[0] != topic:
            continue
        error_type = for_code(row[1])
        if error_type is TopicAlreadyExistsError:
            log.info("kafka.topic_exists", topic=topic, bootstrap_servers=bootstrap_servers)
            return False
        if error_type is not NoError:
            message = row[2] if len(row) > 2 and row[2] else error_type.__name__
            raise error_type(f"cannot create topic {topic} on {bootstrap_servers}: {message}")
    log.info(
        "kafka.topic_created",
        topic=topic,
        partitions=partitions,
        replication_factor=replication_factor,
        config=topic_config,
        bootstrap_servers=bootstrap_servers,
    )
    return True


async def partition_count(bootstrap_servers: str, topic: str, *, default: int,
                          security: KafkaSecurity | None = None) -> int:
    """Number of partitions of ``topic``, or ``default`` when it does not exist. Raises ``KafkaError``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id=CLIENT_ID, **aiokafka_kwargs(security))
    await start_or_explain(admin.start, bootstrap_servers, security)
    try:
        topics = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = [t for t in topics if t["topic"] == topic and t["partitions"]]
    return len(found[0]["partitions"]) if found else default
