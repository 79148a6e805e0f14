"""docker-compose.yml agrees with the code: service ports, commands, settings and real images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.config import GRPC_PORTS, Settings, env_name

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# Variables Civic reads; the broker's own KAFKA_* settings live only in the kafka service.
CIVIC_VAR = re.compile(r"^(CIVIC_|KAFKA_|OTEL_)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    # safe_load resolves the YAML anchors and `<<` merges, as docker compose does.
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


def civic_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services built from this repository's Dockerfile."""
    return {name: svc for name, svc in services.items() if "build" in svc}


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the ["KEY=value", ...] form
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def port_pairs(service: dict[str, Any]) -> list[tuple[int | None, int]]:
    """(published, container) for each `ports` entry, and (None, port) for each `expose`."""
    pairs: list[tuple[int | None, int]] = []
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            published = entry.get("published")
            pairs.append((int(published) if published else None, int(entry["target"])))
        else:
            parts = str(entry).split("/")[0].split(":")  # [ip:][published:]target[/proto]
            pairs.append((int(parts[-2]) if len(parts) > 1 else None, int(parts[-1])))
    pairs += [(None, int(str(p).split("/")[0])) for p in service.get("expose") or []]
    return pairs


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def settings_env_names() -> set[str]:
    """The variable each Settings field is read from (its validation_alias, else prefix+NAME)."""
    return {env_name(field).upper() for field in Settings.model_fields}


def image_name(service: dict[str, Any]) -> tuple[str, str]:
    """(repository, tag) of a service's image."""
    repository, _, tag = str(service["image"]).rpartition(":")
    return repository, tag


def test_every_service_with_a_main_is_in_compose(services: dict[str, dict[str, Any]]) -> None:
    mains = sorted(p.parent.name for p in (ROOT / "services").glob("*/main.py"))
    for name in mains:
        assert name in services, f"services/{name}/main.py has no compose service"
        svc = services[name]
        assert command(svc)[-2:] == ["-m", f"services.{name}.main"], f"{name}: {command(svc)}"
        assert (GRPC_PORTS[name], GRPC_PORTS[name]) in port_pairs(svc), f"{name} port"


def test_every_civic_service_in_compose_listens_on_its_grpc_port(
    services: dict[str, dict[str, Any]],
) -> None:
    # The reverse direction: compose runs no service under a wrong name or port.
    runners = {
        name: svc
        for name, svc in civic_services(services).items()
        if any(part.startswith("services.") for part in command(svc))
    }
    assert "registry" in runners
    for name, svc in runners.items():
        assert name in GRPC_PORTS, f"compose service {name} is not in GRPC_PORTS"
        assert f"services.{name}.main" in command(svc), f"{name}: {command(svc)}"
        assert port_pairs(svc) == [(GRPC_PORTS[name], GRPC_PORTS[name])], f"{name} ports"
        assert (ROOT / "services" / name).is_dir(), f"no package services/{name}"


def test_every_civic_variable_in_compose_is_a_setting(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    known = settings_env_names()
    used = {
        (name, var)
        for name, svc in civic_services(services).items()
        for var in environment(svc)
        if CIVIC_VAR.match(var)
    }
    assert used, "the Civic services get no configuration"
    unknown = sorted(f"{name}: {var}" for name, var in used if var.upper() not in known)
    assert unknown == [], f"not Settings fields: {unknown}"
    # The shared block (x-civic-env) is what later services reuse: it must be clean too.
    shared = {k for k in compose.get("x-civic-env", {}) if CIVIC_VAR.match(k)}
    assert shared and {k.upper() for k in shared} <= known


def test_compose_environment_configures_settings(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment(services["registry"])
    for var in [*settings_env_names(), "CIVIC_KAFKA_PARTITIONS"]:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        # As compose sets it when the variable is not given: `${VAR:-default}` is its default.
        monkeypatch.setenv(var, re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value))
    settings = Settings()
    assert settings.mongo_uri == "mongodb://mongo:27017/?replicaSet=rs0"
    assert settings.kafka_bootstrap_servers == "kafka:9092"
    assert settings.s3_endpoint == "minio:9000"
    assert settings.s3_public_url == "http://localhost:9000"
    assert settings.otel_exporter_otlp_endpoint == "http://otel-collector:4317"
    assert settings.grpc_host == "0.0.0.0"
    assert settings.port_for("registry") == GRPC_PORTS["registry"]
    # Secrets are required from the environment, never a default baked into the file.
    for var in ("CIVIC_AUTH_SECRET", "CIVIC_DATA_KEY", "CIVIC_S3_SECRET_KEY"):
        assert env[var].startswith(f"${{{var}:?"), f"{var} must be required: {env[var]}"


def test_servers_use_the_real_images(services: dict[str, dict[str, Any]]) -> None:
    kafka, mongo, minio = (image_name(services[n]) for n in ("kafka", "mongo", "minio"))
    assert kafka[0] == "apache/kafka"
    assert mongo[0] == "mongo" and mongo[1].split(".")[0] == "7"
    # MinIO's own images; Docker Hub's minio/minio was withdrawn, quay.io still serves them.
    assert minio[0] in ("minio/minio", "quay.io/minio/minio")
    assert image_name(services["mongo-init"])[0] == "mongo"
    for repository, tag in (kafka, mongo, minio):
        assert tag and tag != "latest", f"{repository} must be pinned"


def test_servers_are_set_up_as_the_services_expect(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["registry"])
    # Mongo: a replica set named as in the URI, initiated with the host the services use.
    replica_set = env["CIVIC_MONGO_URI"].split("replicaSet=")[1]
    assert ["--replSet", replica_set] == command(services["mongo"])[0:2]
    init = " ".join(command(services["mongo-init"]))
    assert f'_id: "{replica_set}"' in init and 'host: "mongo:27017"' in init
    # Kafka: KRaft, advertising the address the services bootstrap from.
    kafka_env = environment(services["kafka"])
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert f"://{env['KAFKA_BOOTSTRAP_SERVERS']}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    # MinIO: its root credentials are the ones the services sign with.
    minio_env = environment(services["minio"])
    assert minio_env["MINIO_ROOT_USER"] == env["CIVIC_S3_ACCESS_KEY"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == env["CIVIC_S3_SECRET_KEY"]
    assert env["CIVIC_S3_ENDPOINT"] == "minio:9000"
    # Presigned links are for phones and browsers: signed for a published address of MinIO.
    public = env["CIVIC_S3_PUBLIC_URL"].split(":-", 1)[-1].rstrip("}")
    assert public.startswith(("http://", "https://")) and "minio" not in public
    assert "9000:9000" in " ".join(str(p) for p in services["minio"]["ports"])
    # OpenTelemetry: the collector's OTLP gRPC receiver is where the services export.
    collector = yaml.safe_load((ROOT / "infra" / "otel-collector.yaml").read_text())
    grpc = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc.endswith(":4317") and env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4317")
    volumes = " ".join(services["otel-collector"]["volumes"])
    assert "./infra/otel-collector.yaml:" in volumes
    # Traces go on to Jaeger, whose UI is published.
    jaeger = collector["exporters"]["otlp/jaeger"]["endpoint"]
    assert jaeger.split(":")[0] in services and jaeger.endswith(":4317")
    assert "otlp/jaeger" in collector["service"]["pipelines"]["traces"]["exporters"]
    assert "16686:16686" in " ".join(str(p) for p in services["jaeger"]["ports"])


def test_registry_waits_for_its_servers(services: dict[str, dict[str, Any]]) -> None:
    deps = depends_on(services["registry"])
    for server in ("mongo", "kafka", "minio"):
        assert deps.get(server) == "service_healthy", f"registry must wait for {server}"
        check = services[server].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{server} needs a healthcheck"
    assert deps.get("mongo-init") == "service_completed_successfully"
    assert deps.get("provision") == "service_completed_successfully"


def test_services_that_call_the_registry_wait_for_it(services: dict[str, dict[str, Any]]) -> None:
    # A service calls the registry's gRPC API when its wiring asks where the registry is.
    callers = sorted(
        path.parent.name
        for path in (ROOT / "services").glob("*/main.py")
        if "settings.registry()" in path.read_text()
    )
    assert "ledger" in callers
    registry = depends_on(services["registry"])
    for name in callers:
        deps = depends_on(services[name])
        assert deps.get("registry") == "service_healthy", f"{name} must wait for the registry"
        # Listing the registry keeps what every Civic service waits for.
        assert {k: v for k, v in deps.items() if k != "registry"} == registry, name


def test_provision_runs_once_from_the_civic_image(services: dict[str, dict[str, Any]]) -> None:
    provision = services["provision"]
    assert command(provision)[-2:] == ["-m", "infra.provision"]
    assert provision["image"] == services["registry"]["image"]
    assert provision.get("restart") == "no"
    assert {"kafka", "minio"} <= set(depends_on(provision))
