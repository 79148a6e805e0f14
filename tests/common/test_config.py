"""Settings from the environment: a value that cannot work is refused, naming its variable."""

from __future__ import annotations

import pytest

from services.common.config import Settings, SettingsError


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        # A relay that sweeps without a pause queries MongoDB in a tight loop.
        ("CIVIC_OUTBOX_POLL_SECONDS", "0"),
        ("CIVIC_OUTBOX_POLL_SECONDS", "-1"),
        # No port to listen on, which would be reported as one in use.
        ("CIVIC_GRPC_PORT", "-1"),
        ("CIVIC_GRPC_PORT", "70000"),
        # A broker's port that is no number, which the Kafka client finds only as it connects.
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka:909z"),
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka:"),
        # The store's public address without a scheme: every link would lead nowhere.
        ("CIVIC_S3_PUBLIC_URL", "files.danang.example"),
        ("CIVIC_S3_PUBLIC_URL", "ftp://files.danang.example"),
        ("CIVIC_S3_PUBLIC_URL", "https://files.danang.example:90x"),
        ("CIVIC_S3_PUBLIC_URL", "https://files.danang.example/?bucket=1"),
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        Settings()


def test_the_stores_public_address_may_be_a_path_of_the_citys_site(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CIVIC_S3_PUBLIC_URL", "https://danang.gov.vn:8443/files/")
    assert Settings().s3_public_url == "https://danang.gov.vn:8443/files/"


def test_a_brokers_address_is_refused_in_plain_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:909z")
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value) == (
        "KAFKA_BOOTSTRAP_SERVERS: a broker is host:port, the port a number"
    )
