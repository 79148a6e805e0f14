"""The real server images through testcontainers, for machines WITH a Docker engine.

Tests prefer these where Docker exists (the same images as docker-compose.yml) and fall back to
infra.local's PyPI-packaged servers elsewhere. Topics and buckets are created as for the local
servers (infra.provision): no service creates them, and a broker's own defaults (auto-created
topics, its retention) are not what the platform runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import pymongo
from pymongo.errors import OperationFailure

from infra.local import Endpoints, InfraError
from infra.provision import provision
from services.common.config import Settings

# The images docker-compose.yml runs. testcontainers' Kafka module drives Confluent's start
# scripts, so it needs Confluent's image of Apache Kafka; 7.6 is Apache Kafka 3.6 in KRaft mode.
KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
MONGO_IMAGE = "mongo:7"
# Docker Hub no longer serves minio/minio; MinIO's own registry still does.
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"

MONGO_PORT = 27017
REPLICA_SET = "rs0"
START_TIMEOUT_S = 60


def docker_available() -> bool:
    """Whether a Docker engine answers; fast, and never raises."""
    try:
        from testcontainers.core.docker_client import DockerClient

        # Without an engine this fails at once (no socket) or after the short timeout.
        return bool(DockerClient(timeout=3).client.ping())
    except Exception:  # no testcontainers, no engine, no permission: all mean "no Docker"
        return False


def start_containers() -> tuple[Endpoints, Callable[[], None]]:
    """Start Kafka (KRaft), MongoDB (single-node replica set) and MinIO; return their endpoints
    and a function that removes the containers again."""
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.minio import MinioContainer
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    settings = Settings()
    started: list[Any] = []

    def stop() -> None:
        for container in reversed(started):
            with contextlib.suppress(Exception):  # stop the others even if one is gone
                container.stop()
        started.clear()

    try:
        kafka = KafkaContainer(KAFKA_IMAGE).with_kraft()
        kafka.start(timeout=START_TIMEOUT_S)
        started.append(kafka)

        # testcontainers' MongoDbContainer enables authentication, which a replica set only
        # accepts with a key file; a plain container with --replSet is simpler and closer to
        # docker-compose.yml.
        mongo = (
            DockerContainer(MONGO_IMAGE)
            .with_command(["--replSet", REPLICA_SET, "--bind_ip_all"])
            .with_exposed_ports(MONGO_PORT)
            .waiting_for(
                LogMessageWaitStrategy("Waiting for connections").with_startup_timeout(
                    START_TIMEOUT_S
                )
            )
        )
        mongo.start()
        started.append(mongo)
        mongo_host = mongo.get_container_host_ip()
        mongo_port = int(mongo.get_exposed_port(MONGO_PORT))
        _initiate_replica_set(mongo_host, mongo_port)

        minio = MinioContainer(
            MINIO_IMAGE, access_key=settings.s3_access_key, secret_key=settings.s3_secret_key
        )
        # Current MinIO releases read the root credentials from these (the MINIO_ACCESS_KEY
        # pair testcontainers sets is the pre-2021 spelling).
        minio.with_env("MINIO_ROOT_USER", settings.s3_access_key)
        minio.with_env("MINIO_ROOT_PASSWORD", settings.s3_secret_key)
        minio.start()
        started.append(minio)
        minio_config = minio.get_config()
        endpoints = Endpoints(
            # The member is known by its in-container address, which the host cannot reach; a
            # direct connection to the mapped port still gives transactions and change streams.
            mongo_uri=f"mongodb://{mongo_host}:{mongo_port}/?directConnection=true",
            kafka_bootstrap_servers=kafka.get_bootstrap_server(),
            s3_endpoint=str(minio_config["endpoint"]),
            s3_access_key=settings.s3_access_key,
            s3_secret_key=settings.s3_secret_key,
        )
        # Called from synchronous set-up (a session fixture), with no event loop running.
        asyncio.run(provision(endpoints, settings.kafka_partitions))
    except BaseException:
        stop()
        raise
    return endpoints, stop


def _initiate_replica_set(host: str, port: int) -> None:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        host, port, directConnection=True, serverSelectionTimeoutMS=10_000
    )
    try:
        # The member's host is as the container sees itself; clients connect directly (above).
        config = {"_id": REPLICA_SET, "members": [{"_id": 0, "host": f"localhost:{MONGO_PORT}"}]}
        try:
            client.admin.command("replSetInitiate", config)
        except OperationFailure as exc:
            if exc.code != 23:  # AlreadyInitialized
                raise
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.admin.command("hello").get("isWritablePrimary"):
            if time.monotonic() > deadline:
                raise InfraError(f"mongo container on {host}:{port} did not become primary")
            time.sleep(0.1)
    finally:
        client.close()
