"""Create the Kafka topics and S3 buckets the platform needs; safe to run any number of times.

`python -m infra.provision` reads the servers from the environment (CIVIC_*,
KAFKA_BOOTSTRAP_SERVERS; see services.common.config) and is the one-shot `provision` service in
docker-compose.yml.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, for_code
from minio import Minio
from minio.error import S3Error

from infra.local import Endpoints, InfraError, command_logging
from services.common.config import Settings, SettingsError
from services.common.topology import BUCKETS, TOPICS, Topic

log = logging.getLogger(__name__)

# A broker in a fresh compose project may need a moment after its port opens.
CONNECT_TIMEOUT_S = 30.0
REPLICATION_FACTOR = 1  # single-broker deployments (local, compose); a cluster provisions its own

_ALREADY_EXISTS = 36  # TOPIC_ALREADY_EXISTS
# Codes a broker may answer when it refuses per-topic configs at creation.
_CONFIG_REFUSED = {35, 40, 42, 44}  # UNSUPPORTED_VERSION, INVALID_CONFIG, INVALID_REQUEST, POLICY
_BUCKET_EXISTS = {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}
_TOPIC_OWN_CONFIG = 1  # DescribeConfigs' config source DYNAMIC_TOPIC_CONFIG: set on the topic


async def provision(endpoints: Endpoints, partitions: int) -> None:
    """Create every topic in TOPICS and every bucket in BUCKETS that does not exist yet."""
    await asyncio.gather(
        _create_topics(endpoints.kafka_bootstrap_servers, partitions),
        asyncio.to_thread(_create_buckets, endpoints),
    )


async def _create_topics(bootstrap_servers: str, partitions: int) -> None:
    admin = await _connected_admin(bootstrap_servers)
    try:
        refused, existing = await _create(admin, TOPICS, partitions, with_configs=True)
        await _keep_retention(admin, existing)
        if refused:
            # Checked: noida-db 0.2.3 accepts retention.ms at creation and reports it back in
            # DescribeConfigs, so this path is for brokers with a stricter creation policy.
            # The topics then get the broker's default retention; say so loudly.
            log.warning(
                "broker refused topic configs for %s; created them with broker defaults",
                ", ".join(t.name for t in refused),
            )
            await _create(admin, refused, partitions, with_configs=False)
    except KafkaError as exc:
        raise InfraError(f"creating Kafka topics on {bootstrap_servers}: {exc!r}") from None
    finally:
        await admin.close()


async def _connected_admin(bootstrap_servers: str) -> AIOKafkaAdminClient:
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while True:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=10_000)
        try:
            await admin.start()
            return admin
        except KafkaError as exc:
            await admin.close()
            if time.monotonic() > deadline:
                raise InfraError(f"Kafka not reachable at {bootstrap_servers}: {exc!r}") from None
        await asyncio.sleep(0.2)


async def _create(
    admin: AIOKafkaAdminClient, topics: tuple[Topic, ...], partitions: int, *, with_configs: bool
) -> tuple[tuple[Topic, ...], tuple[Topic, ...]]:
    """Create the topics; return those whose configs the broker refused, and those that
    existed already."""
    new = [
        NewTopic(
            name=t.name,
            num_partitions=partitions,
            replication_factor=REPLICATION_FACTOR,
            topic_configs={"retention.ms": str(t.retention_ms)} if with_configs else {},
        )
        for t in topics
    ]
    response: Any = await admin.create_topics(new)
    by_name = {t.name: t for t in topics}
    refused: list[Topic] = []
    existing: list[Topic] = []
    # An existing topic keeps its partition count: adding partitions would move keys to other
    # partitions and break per-aggregate ordering, so that stays a deliberate manual step.
    for name, code, *rest in response.topic_errors:
        if code == _ALREADY_EXISTS:
            existing.append(by_name[name])
            continue
        if code == 0:
            continue
        if with_configs and code in _CONFIG_REFUSED:
            refused.append(by_name[name])
            continue
        message = rest[0] if rest and rest[0] else for_code(code).__name__
        raise InfraError(f"creating Kafka topic {name}: {message} (error {code})")
    return tuple(refused), tuple(existing)


async def _keep_retention(admin: AIOKafkaAdminClient, topics: tuple[Topic, ...]) -> None:
    """Topics that existed already (created by a broker's auto-creation with its default
    retention, often a week, or by hand) get the retention they need: the ledger's events are
    the auditors' books, kept for ever. The topic's other settings of its own are kept."""
    if not topics:
        return
    described: dict[str, list[Any]] = {}
    for response in await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t.name) for t in topics]
    ):
        for code, _message, _type, name, entries in response.resources:
            if code == 0:
                described[name] = entries
    changes = []
    for topic in topics:
        entries = described.get(topic.name, [])
        kept = {e[0]: e[1] for e in entries if e[3] == _TOPIC_OWN_CONFIG and e[1] is not None}
        found = next((e[1] for e in entries if e[0] == "retention.ms"), None)
        if found is None or found == str(topic.retention_ms):
            continue
        log.warning(
            "topic %s kept events for retention.ms=%s; setting it to %s",
            topic.name,
            found,
            topic.retention_ms,
        )
        kept["retention.ms"] = str(topic.retention_ms)
        changes.append(ConfigResource(ConfigResourceType.TOPIC, topic.name, configs=kept))
    if not changes:
        return
    for altered in await admin.alter_configs(changes):
        for code, message, _type, name in altered.resources:
            if code:
                reason = message or for_code(code).__name__
                raise InfraError(
                    f"topic {name} keeps events for less than it must, and the broker refused "
                    f"to change it ({reason}): set its retention.ms by hand"
                )


def _create_buckets(endpoints: Endpoints) -> None:
    client = Minio(
        endpoints.s3_endpoint,
        access_key=endpoints.s3_access_key,
        secret_key=endpoints.s3_secret_key,
        secure=endpoints.s3_secure,
    )
    for bucket in BUCKETS:
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code not in _BUCKET_EXISTS:  # lost a race with another provisioner: fine
                where = f"{bucket} on {endpoints.s3_endpoint}"
                raise InfraError(f"creating bucket {where}: {exc.code}") from None
        except Exception as exc:  # urllib3 connection errors and the like
            raise InfraError(f"S3 at {endpoints.s3_endpoint}: {exc!r}") from None


def main() -> int:
    command_logging()
    try:
        settings = Settings()
        endpoints = Endpoints.from_settings(settings)
        asyncio.run(provision(endpoints, settings.kafka_partitions))
    except (InfraError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{len(TOPICS)} topics on {endpoints.kafka_bootstrap_servers} (new ones with "
        f"{settings.kafka_partitions} partitions) and {len(BUCKETS)} buckets on "
        f"{endpoints.s3_endpoint} are in place"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
