"""CloudEvents in Kafka binary mode: headers out, the same event back, and the data decoded by its
type name alone. Pure unit tests: no servers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from civic.registry.v1 import events_pb2, registry_pb2

from services.common.cloudevents import CloudEvent, decode, type_name

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BIRTH = events_pb2.PersonRegistered(
    person_id="p-1",
    household_id="hh-1",
    unit_id="dn.hc.hc1.g17",
    reason=events_pb2.REGISTRATION_REASON_BIRTH,
    birth_date="2026-01-02",
    sex=registry_pb2.SEX_FEMALE,
)


def event(**changes: object) -> CloudEvent:
    fields: dict[str, object] = {
        "id": "6741a1b2c3d4e5f601234567",
        "type": type_name(BIRTH),
        "source": "/civic/registry",
        "time": datetime(2026, 11, 23, 4, 5, 6, 789012, tzinfo=UTC),
        "data": BIRTH.SerializeToString(),
        "subject": "hh-1",
        "actor": "group_leader@dn.hc.hc1.g17",
        "extensions": {"traceparent": TRACEPARENT, "tracestate": "civic=1"},
    }
    fields.update(changes)
    return CloudEvent(**fields)  # type: ignore[arg-type]


def as_record_headers(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    """As aiokafka hands them to a consumer: a list of (name, bytes)."""
    return [(name, value.encode()) for name, value in headers.items()]


def test_kafka_headers_carry_the_cloudevents_attributes() -> None:
    headers = event().kafka_headers()

    assert headers == {
        "ce_specversion": "1.0",
        "ce_id": "6741a1b2c3d4e5f601234567",
        "ce_type": "civic.registry.v1.PersonRegistered",
        "ce_source": "/civic/registry",
        "ce_time": "2026-11-23T04:05:06.789012Z",
        "content-type": "application/protobuf",
        "ce_subject": "hh-1",
        "ce_actor": "group_leader@dn.hc.hc1.g17",
        "traceparent": TRACEPARENT,
        "tracestate": "civic=1",
    }


def test_time_is_written_in_utc_whatever_the_zone() -> None:
    saigon = timezone(timedelta(hours=7))
    headers = event(time=datetime(2026, 11, 23, 11, 5, 6, tzinfo=saigon)).kafka_headers()

    assert headers["ce_time"] == "2026-11-23T04:05:06Z"


def test_optional_attributes_are_left_out_when_empty() -> None:
    headers = event(subject="", actor="", extensions={}).kafka_headers()

    assert set(headers) == {
        "ce_specversion",
        "ce_id",
        "ce_type",
        "ce_source",
        "ce_time",
        "content-type",
    }


def test_round_trip_through_kafka_headers() -> None:
    sent = event()

    received = CloudEvent.from_kafka(as_record_headers(sent.kafka_headers()), sent.data)

    assert received == sent
    assert received.time.tzinfo is not None


def test_round_trip_accepts_text_headers_and_keeps_only_trace_extensions() -> None:
    sent = event(subject="", actor="")
    headers = [*sent.kafka_headers().items(), ("x-unrelated", "ignored")]

    received = CloudEvent.from_kafka(headers, sent.data)

    assert received == sent
    assert dict(received.extensions) == {"traceparent": TRACEPARENT, "tracestate": "civic=1"}


def test_missing_headers_are_named() -> None:
    headers = event().kafka_headers()
    del headers["ce_id"], headers["ce_time"]

    with pytest.raises(ValueError, match=r"missing headers ce_id, ce_time$"):
        CloudEvent.from_kafka(as_record_headers(headers), b"")


def test_an_empty_attribute_is_missing() -> None:
    """Two other producers' events with an empty id are not one event to skip repeats of."""
    headers = event().kafka_headers() | {"ce_id": "", "ce_source": ""}

    with pytest.raises(ValueError, match=r"missing headers ce_id, ce_source$"):
        CloudEvent.from_kafka(as_record_headers(headers), b"")


def test_a_header_without_a_value_is_missing() -> None:
    headers: list[tuple[str, bytes | None]] = [
        (name, None if name in ("ce_time", "ce_subject") else value)
        for name, value in as_record_headers(event().kafka_headers())
    ]

    with pytest.raises(ValueError, match=r"missing headers ce_time$"):
        CloudEvent.from_kafka(headers, b"")
    received = CloudEvent.from_kafka(
        [h for h in headers if h[0] != "ce_time"] + [("ce_time", b"2026-11-23T04:05:06Z")], b""
    )
    assert received.subject == ""


def test_a_plain_kafka_record_is_not_a_cloud_event() -> None:
    with pytest.raises(ValueError) as error:
        CloudEvent.from_kafka([("content-type", b"application/protobuf")], b"{}")

    for name in ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time"):
        assert name in str(error.value)


def test_decode_by_type_name() -> None:
    decoded = decode("civic.registry.v1.PersonRegistered", BIRTH.SerializeToString())

    assert isinstance(decoded, events_pb2.PersonRegistered)
    assert decoded == BIRTH


def test_message_decodes_the_event_data_by_its_type() -> None:
    created = events_pb2.HouseholdCreated(household_id="hh-1", unit_id="dn.hc.hc1.g17")
    received = CloudEvent.from_kafka(
        as_record_headers(
            event(type=type_name(created), data=created.SerializeToString()).kafka_headers()
        ),
        created.SerializeToString(),
    )

    message = received.message()

    assert isinstance(message, events_pb2.HouseholdCreated)
    assert message == created


def test_decode_of_an_unknown_type_fails() -> None:
    with pytest.raises(KeyError):
        decode("civic.registry.v1.NoSuchEvent", b"")
