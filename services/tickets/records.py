"""Ticket and rule documents to and from gRPC messages and domain values."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from civic.tickets.v1 import events_pb2, tickets_pb2

from services.common.cloudevents import type_name
from services.common.errors import InvalidArgument
from services.common.mongo import Document
from services.common.wire import duration, point_message, span, timestamp
from services.tickets.domain import (
    LONGEST_DEADLINE,
    OPEN,
    Level,
    Rule,
    Sla,
    Status,
    Submitter,
    check_title,
    missed,
)


def new_ticket(
    ticket_id: str,
    *,
    category: str,
    description: str,
    unit_id: str,
    household_id: str,
    location: Document | None,
    located_at_home: bool,
    origin_from: str,
    submitter: str,
    submitter_role: str,
    now: datetime,
    trace: dict[str, str],
) -> Document:
    """A ticket as filed: submitted, not yet routed. `origin_from` says how its group was found:
    "location" (the group whose boundary holds the place reported), "household" (the
    household's) or "unit" (the one an official named, or a resident's own). `trace` is the
    filing's trace context: what the service later does of itself (the deadline sweep)
    continues it."""
    return {
        "_id": ticket_id,
        "category": category,
        "description": description,
        "status": int(Status.SUBMITTED),
        "origin_unit_id": unit_id,
        "origin_from": origin_from,
        "household_id": household_id or None,
        "location": location,
        "located_at_home": located_at_home,
        "submitter": submitter,
        "submitter_role": submitter_role,
        "photos": [],
        "comments": [],
        "supporters": [],
        "duplicates": [],
        "duplicate_of": None,
        "escalations": 0,
        "submitted_at": now,
        "resolved_at": None,
        "next_deadline": None,
        "last_change": type_name(events_pb2.TicketSubmitted()),
        "trace": trace,
    }


def submitter_of(doc: Document) -> Submitter:
    return Submitter(doc["submitter"], doc.get("submitter_role", ""), doc.get("household_id") or "")


def overdue(doc: Document, now: datetime) -> bool:
    """Whether the ticket is late on its own account. A linked duplicate never is: the sweep
    leaves it to its primary (see TicketStore.due), so its own deadlines hold nobody, and
    showing its primary's lateness would count the cluster's once per ticket. The cluster is
    late once, on the primary, which the same queue lists and the statistics count."""
    return (
        doc["status"] in OPEN
        and not doc.get("duplicate_of")
        and missed(doc.get("next_deadline"), now)
    )


def ticket_message(
    doc: Document, now: datetime, photo_url: Callable[[str], str] | None = None
) -> tickets_pb2.Ticket:
    return tickets_pb2.Ticket(
        ticket_id=doc["_id"],
        category=doc["category"],
        description=doc["description"],
        status=doc["status"],
        origin_unit_id=doc["origin_unit_id"],
        household_id=doc.get("household_id") or "",
        location=point_message(doc.get("location")),
        assigned_unit_id=doc.get("assigned_unit_id") or "",
        assigned_level=doc.get("assigned_level") or 0,  # type: ignore[arg-type]
        department=doc.get("department") or "",
        rule_version=doc.get("rule_version") or 0,
        submitter=doc["submitter"],
        photos=[
            tickets_pb2.Photo(
                object_key=p["key"],
                content_type=p["content_type"],
                size_bytes=p["size"],
                url=photo_url(p["key"]) if photo_url else "",
            )
            for p in doc.get("photos", [])
        ],
        comments=[
            tickets_pb2.Comment(
                author=c["author"], author_role=c["role"], text=c["text"], at=timestamp(c["at"])
            )
            for c in doc.get("comments", [])
        ],
        duplicate_of=doc.get("duplicate_of") or "",
        duplicates=doc.get("duplicates", []),
        supporters=len(doc.get("supporters", [])),
        resolution=doc.get("resolution", ""),
        rejection_reason=doc.get("rejection_reason", ""),
        rating=doc.get("rating", 0),
        escalations=doc.get("escalations", 0),
        submitted_at=timestamp(doc["submitted_at"]),
        acknowledge_by=timestamp(doc.get("acknowledge_by")),
        resolve_by=timestamp(doc.get("resolve_by")),
        resolved_at=timestamp(doc.get("resolved_at")),
        overdue=overdue(doc, now),
        withdrawn=bool(doc.get("withdrawn")),
    )


# ---- routing rules ------------------------------------------------------------------------


def rule_from_message(index: int, rule: tickets_pb2.RoutingRule) -> Rule:
    if rule.level not in tickets_pb2.Level.values() or rule.level == 0:
        raise InvalidArgument(f"rules[{index}].level", "is required")
    slas: dict[Level, Sla] = {}
    for position, sla in enumerate(rule.slas):
        where = f"rules[{index}].slas[{position}]"
        level = Level(sla.level) if sla.level in tickets_pb2.Level.values() and sla.level else None
        if level is None:
            raise InvalidArgument(f"{where}.level", "is required")
        # Two deadlines for one level: which was meant cannot be told, and keeping the last
        # would silently drop the other.
        if level in slas:
            raise InvalidArgument(f"{where}.level", f"{level.name} has deadlines already")
        slas[level] = Sla(
            span(f"{where}.acknowledge_within", sla.acknowledge_within, longest=LONGEST_DEADLINE),
            span(f"{where}.resolve_within", sla.resolve_within, longest=LONGEST_DEADLINE),
        )
    title = check_title(f"rules[{index}].title", rule.title)
    return Rule(rule.category, title, Level(rule.level), rule.department, slas)


def rule_document(rule: Rule) -> Document:
    return {
        "category": rule.category,
        "title": rule.title,
        "level": int(rule.level),
        "department": rule.department,
        "slas": {
            str(int(level)): {
                "acknowledge_s": sla.acknowledge_within.total_seconds(),
                "resolve_s": sla.resolve_within.total_seconds(),
            }
            for level, sla in rule.slas.items()
        },
    }


def rules_document(
    version: int, rules: list[Rule], reopen_within: timedelta, at: datetime, by: str
) -> Document:
    return {
        "_id": f"rules-{version}",
        "version": version,
        "rules": [rule_document(rule) for rule in rules],
        "reopen_within_s": reopen_within.total_seconds(),
        "changed_at": at,
        "changed_by": by,
    }


def rule_from_document(doc: Document) -> Rule:
    return Rule(
        doc["category"],
        doc["title"],
        Level(doc["level"]),
        doc["department"],
        {
            Level(int(level)): Sla(
                timedelta(seconds=sla["acknowledge_s"]), timedelta(seconds=sla["resolve_s"])
            )
            for level, sla in doc["slas"].items()
        },
    )


def rule_for(rules_doc: Document, category: str) -> Rule:
    """The rule for a category in a rules version; a category withdrawn after a ticket was filed
    goes to the ward's general desk with the first rule's deadlines."""
    for stored in rules_doc["rules"]:
        if stored["category"] == category:
            return rule_from_document(stored)
    first = rule_from_document(rules_doc["rules"][0])
    return Rule(category, category, Level.WARD, "", first.slas)


def rules_message(doc: Document) -> tickets_pb2.RoutingRules:
    return tickets_pb2.RoutingRules(
        version=doc["version"],
        rules=[
            tickets_pb2.RoutingRule(
                category=rule.category,
                title=rule.title,
                level=int(rule.level),  # type: ignore[arg-type]
                department=rule.department,
                slas=[
                    tickets_pb2.LevelSla(
                        level=int(level),  # type: ignore[arg-type]
                        acknowledge_within=duration(sla.acknowledge_within),
                        resolve_within=duration(sla.resolve_within),
                    )
                    for level, sla in rule.slas.items()
                ],
            )
            for rule in map(rule_from_document, doc["rules"])
        ],
        reopen_within=duration(timedelta(seconds=doc["reopen_within_s"])),
        changed_at=timestamp(doc["changed_at"]),
        changed_by=doc["changed_by"],
    )
