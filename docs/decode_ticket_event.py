"""Decode Civic ticket events as kcat prints them: one line per event, with its ce_type and the
protobuf message as JSON. See docs/integrators.md.

A stream of records, framed by kcat's format below (the value's length, %S, tells where the binary
value ends, so values may hold any bytes):

    kcat -b BROKER -G GROUP -X auto.offset.reset=earliest civic.tickets.v1 \\
        -f '%k\\t%p\\t%o\\t%S\\t%h\\n%s\\n' | python docs/decode_ticket_event.py

prints `KEY PARTITION:OFFSET CE_TYPE {json}` per record. One record's bare value, with the
ce_type given (read from its headers):

    kcat -b BROKER -C -t civic.tickets.v1 -p 2 -o 17 -c 1 -f '%s' \\
        | python docs/decode_ticket_event.py --type civic.tickets.v1.TicketRouted

It needs the Python code generated from the published protos (proto/civic/...) on its path; in
this repository that is gen/ (`make setup`), elsewhere:

    mkdir -p gen && python -m grpc_tools.protoc -I proto --python_out=gen \\
        proto/civic/common/v1/types.proto proto/civic/tickets/v1/*.proto
    PYTHONPATH=gen python docs/decode_ticket_event.py ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# This repository's generated code, when the script runs from a checkout without it on the path.
sys.path.append(str(Path(__file__).resolve().parent.parent / "gen"))

from civic.tickets.v1 import events_pb2
from google.protobuf import json_format, symbol_database
from google.protobuf.message import Message

TICKET_EVENTS = events_pb2.DESCRIPTOR.package


def decode(ce_type: str, value: bytes) -> Message:
    """The event's message, by its ce_type: the full name of a published protobuf message."""
    try:
        message_class = symbol_database.Default().GetSymbol(ce_type)
    except KeyError:
        raise ValueError(f"unknown ce_type {ce_type!r} (not in {TICKET_EVENTS})") from None
    message: Message = message_class()
    message.ParseFromString(value)
    return message


def as_json(message: Message) -> str:
    return json.dumps(json_format.MessageToDict(message), ensure_ascii=False, sort_keys=True)


def header(headers: str, name: str) -> str:
    """One header's value from kcat's %h (name=value pairs joined by commas)."""
    for pair in headers.split(","):
        key, _, value = pair.partition("=")
        if key == name:
            return value
    return ""


def decode_stream(source: BinaryIO) -> Iterator[str]:
    """One line per record of a kcat stream framed as in this module's docstring."""
    while line := source.readline():
        if not line.strip():
            continue
        key, partition, offset, length, headers = line.rstrip(b"\n").decode().split("\t", 4)
        size = int(length)
        value = source.read(size) if size >= 0 else b""
        if len(value) < size:
            raise ValueError(f"record {partition}:{offset} is cut short")
        source.read(1)  # the newline after the value
        ce_type = header(headers, "ce_type")
        where = f"{key} {partition}:{offset} {ce_type or '-'}"
        if size < 0:
            yield f"{where} null"
        elif not ce_type.startswith(TICKET_EVENTS + "."):
            yield f"{where} ({size} bytes, not a ticket event)"
        else:
            yield f"{where} {as_json(decode(ce_type, value))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--type", help="decode stdin as one bare value of this ce_type")
    args = parser.parse_args(argv)
    if args.type:
        print(f"{args.type} {as_json(decode(args.type, sys.stdin.buffer.read()))}")
        return 0
    for line in decode_stream(sys.stdin.buffer):
        print(line, flush=True)  # as each record arrives: kcat may be following the topic
    return 0


if __name__ == "__main__":
    sys.exit(main())
