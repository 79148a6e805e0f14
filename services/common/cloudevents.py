"""CloudEvents 1.0 in Kafka binary mode: metadata in `ce_*` headers, the protobuf message as the
record value. `ce_type` is the message's full protobuf name, so any reader holding the published
protos can decode any event, however old."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from google.protobuf import symbol_database
from google.protobuf.message import Message

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/protobuf"


@dataclass(frozen=True)
class CloudEvent:
    id: str
    type: str
    source: str
    time: datetime
    data: bytes
    subject: str = ""
    # Who caused the event (a token subject), as the `actor` extension attribute.
    actor: str = ""
    # Further headers carried along, e.g. the W3C trace context.
    extensions: Mapping[str, str] = field(default_factory=dict)

    def kafka_headers(self) -> dict[str, str]:
        headers = {
            "ce_specversion": SPEC_VERSION,
            "ce_id": self.id,
            "ce_type": self.type,
            "ce_source": self.source,
            "ce_time": self.time.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "content-type": CONTENT_TYPE,
            **self.extensions,
        }
        if self.subject:
            headers["ce_subject"] = self.subject
        if self.actor:
            headers["ce_actor"] = self.actor
        return headers

    @classmethod
    def from_kafka(
        cls, headers: Iterable[tuple[str, bytes | str | None]], value: bytes
    ) -> CloudEvent:
        # Only the headers read here are decoded: another producer's binary header is no concern
        # of ours. A `ce_*` value that is not UTF-8 raises ValueError (UnicodeDecodeError); one
        # without a value (Kafka allows null) is as good as missing.
        decoded = {
            key: raw.decode() if isinstance(raw, bytes) else raw
            for key, raw in headers
            if raw is not None and (key.startswith("ce_") or key in ("traceparent", "tracestate"))
        }
        # Empty is missing (the spec requires non-empty strings): events with an empty id would
        # all share one processed marker, and every one after the first be skipped unlogged.
        missing = [
            name
            for name in ("ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time")
            if not decoded.get(name)
        ]
        if missing:
            raise ValueError(f"not a CloudEvent: missing headers {', '.join(missing)}")
        return cls(
            id=decoded["ce_id"],
            type=decoded["ce_type"],
            source=decoded["ce_source"],
            time=datetime.fromisoformat(decoded["ce_time"].replace("Z", "+00:00")),
            data=value,
            subject=decoded.get("ce_subject", ""),
            actor=decoded.get("ce_actor", ""),
            extensions={k: v for k, v in decoded.items() if k in ("traceparent", "tracestate")},
        )

    def message(self) -> Message:
        """The event's data as its protobuf message (its module must have been imported)."""
        return decode(self.type, self.data)


def type_name(message: Message) -> str:
    return message.DESCRIPTOR.full_name


def decode(type_name: str, data: bytes) -> Message:
    message_class = symbol_database.Default().GetSymbol(type_name)
    message: Message = message_class()
    message.ParseFromString(data)
    return message
