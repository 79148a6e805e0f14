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
    ],
)
def test_a_value_that_cannot_work_is_refused_naming_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=f"^{variable}: "):
        Settings()


def test_a_brokers_address_is_refused_in_plain_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka:909z")
    with pytest.raises(SettingsError) as refused:
        Settings()
    assert str(refused.value) == (
        "KAFKA_BOOTSTRAP_SERVERS: a broker is host:port, the port a number"
    )
