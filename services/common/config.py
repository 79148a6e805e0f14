"""Configuration from environment variables, one place for every service."""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from aiokafka.conn import collect_hosts
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Ports each service's gRPC server listens on unless told otherwise.
GRPC_PORTS: dict[str, int] = {
    "registry": 50051,
    "tickets": 50052,
    "notices": 50053,
    "ledger": 50054,
    "gis": 50055,
}


# Development keys: public, so good only for a service nobody else can reach.
DEV_AUTH_SECRET = "civic-dev-signing-key-change-me-in-production"
DEV_DATA_KEY = "civic-dev-data-key-change-me-in-production"


class SettingsError(ValueError):
    """A setting holds a value of the wrong kind; the message, one line, names its variable."""


class Settings(BaseSettings):
    """Where the servers are and how a service behaves.

    When `CIVIC_MONGO_URI`, `KAFKA_BOOTSTRAP_SERVERS` or `CIVIC_S3_ENDPOINT` is set, Civic uses
    that external server and starts none of its own.
    """

    model_config = SettingsConfigDict(env_prefix="CIVIC_", extra="ignore", populate_by_name=True)

    mongo_uri: str = "mongodb://127.0.0.1:27117/?replicaSet=rs0"
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:19092",
        validation_alias="KAFKA_BOOTSTRAP_SERVERS",
    )
    # Databases are named "<prefix>_<service>", so a test run can share a server and not collide.
    database_prefix: str = "civic"
    s3_endpoint: str = "127.0.0.1:18333"
    s3_access_key: str = "civic"
    s3_secret_key: str = "civic-dev-secret"
    s3_secure: bool = False
    # Where phones and browsers reach the store, when not at s3_endpoint (a store inside a
    # private network behind a public name): presigned links are made for this address.
    s3_public_url: str = ""

    # Signing key for bearer tokens; production sets a long random value, of 32 characters at
    # least as HMAC-SHA256 wants (RFC 7518 3.2): a short one is guessed from any token seen.
    auth_secret: str = Field(default=DEV_AUTH_SECRET, min_length=32)
    # Key for encrypting and indexing citizen IDs at rest (32+ characters).
    data_key: str = DEV_DATA_KEY

    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)  # 0: the service's entry in GRPC_PORTS
    # Where the registry's gRPC API is, for services that read it (host:port); empty: this host
    # at the registry's port.
    registry_target: str = ""
    # Where the GIS service's gRPC API is, for the tickets service, which asks it which group a
    # reported place lies in (host:port); empty: this host at the GIS port.
    gis_target: str = ""

    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    # Seconds between outbox sweeps; new events are also relayed as soon as they commit, on
    # whichever instance. Above zero: at zero the relay would query MongoDB without a pause.
    outbox_poll_seconds: float = Field(default=0.5, gt=0)
    kafka_partitions: int = 6

    # Tickets: a new ticket repeats an open one of its category filed within these metres and
    # hours before it, in the unit it goes to (it is linked to it as a duplicate).
    tickets_duplicate_meters: float = Field(default=150, gt=0, le=10_000)
    tickets_duplicate_hours: float = Field(default=72, gt=0, le=24 * 366)

    # Names this process among the service's instances (a pod name in Kubernetes). It must stay
    # the same across restarts of one instance: Kafka static group membership and the outbox
    # relay lease both let a restarted instance take over its own place at once.
    instance_id: str = ""

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _brokers(cls, value: str) -> str:
        # The Kafka client fails on a port that is no number (`kafka:909z`, `kafka:`) only
        # when it connects, with a traceback of its own.
        try:
            collect_hosts(value)
        except ValueError:
            raise ValueError("a broker is host:port, the port a number") from None
        return value

    @field_validator("s3_public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        # Without a scheme ("files.danang.example") every link would be "://..." and lead
        # nowhere, found only when a phone tries one.
        if value:
            parts = urlsplit(value)
            try:
                reachable = parts.scheme in ("http", "https") and bool(parts.hostname)
                reachable = reachable and parts.port != 0
            except ValueError:  # a port that is no number
                reachable = False
            if not reachable:
                raise ValueError(
                    "must be an http:// or https:// address, e.g. https://files.city.vn"
                )
            if parts.query or parts.fragment:
                raise ValueError("must be an address without ? or #")
        return value

    def __init__(self, **values: Any) -> None:
        # Every command and service reads its settings first: a bad value names the variable
        # to fix, in a line a command can print, instead of pydantic's report of field paths.
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise SettingsError(_problems(error)) from None
        if not _loopback(self.grpc_host):
            # Anyone can mint a city admin's token with the published development key.
            for field, development in (
                ("auth_secret", DEV_AUTH_SECRET),
                ("data_key", DEV_DATA_KEY),
            ):
                if getattr(self, field) == development:
                    raise SettingsError(
                        f"{env_name(field)}: the development key is public; set a secret of "
                        f"your own to listen on {self.grpc_host}"
                    )

    def instance_for(self, service: str) -> str:
        if self.instance_id:
            return self.instance_id
        return f"{socket.gethostname()}-{service}-{self.port_for(service)}"

    def consumer_group(self, service: str, purpose: str) -> str:
        """Consumer groups belong to one deployment, like its databases."""
        return f"{self.database_prefix}.{service}.{purpose}"

    def port_for(self, service: str) -> int:
        return self.grpc_port or GRPC_PORTS[service]

    def registry(self) -> str:
        return self.registry_target or f"{self.grpc_host}:{GRPC_PORTS['registry']}"

    def gis(self) -> str:
        return self.gis_target or f"{self.grpc_host}:{GRPC_PORTS['gis']}"

    def database_for(self, service: str) -> str:
        return f"{self.database_prefix}_{service}"


def env_name(field: str) -> str:
    """The environment variable a Settings field is read from."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, str):
        return alias
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _problems(error: ValidationError) -> str:
    problems = []
    for problem in error.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        name = env_name(field) if field in Settings.model_fields else field
        # A validator's own message, without pydantic's "Value error, " before it.
        error_of_ours = (problem.get("ctx") or {}).get("error")
        message = str(error_of_ours) if problem["type"] == "value_error" else problem["msg"]
        problems.append(f"{name}: {message}")
    return "; ".join(problems)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
