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


async def provision(endpoints: Endpoints, partitions: int) -> None:
    """Create every topic in TOPICS and every bucket in BUCKETS that does not exist yet."""
    await asyncio.gather(
        _create_topics(endpoints.kafka_bootstrap_servers, partitions),
        asyncio.to_thread(_create_buckets, endpoints),
    )


async def _create_topics(bootstrap_servers: str, partitions: int) -> None:
    admin = await _connected_admin(bootstrap_servers)
    try:
        refused = await _create(admin, TOPICS, partitions, with_configs=True)
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
) -> tuple[Topic, ...]:
    """Create the topics; return those whose configs the broker refused."""
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
    # An existing topic keeps its partition count: adding partitions would move keys to other
    # partitions and break per-aggregate ordering, so that stays a deliberate manual step.
    for name, code, *rest in response.topic_errors:
        if code in (0, _ALREADY_EXISTS):
            continue
        if with_configs and code in _CONFIG_REFUSED:
            refused.append(by_name[name])
            continue
        message = rest[0] if rest and rest[0] else for_code(code).__name__
        raise InfraError(f"creating Kafka topic {name}: {message} (error {code})")
    return tuple(refused)


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
