"""Kafka topics and S3 buckets the platform needs; infra provisions them, services use them."""

from __future__ import annotations

from dataclasses import dataclass

FOREVER = -1


@dataclass(frozen=True)
class Topic:
    name: str
    retention_ms: int  # FOREVER keeps every event (auditors replay the ledger from the start)


# One topic per service; its events are keyed by aggregate id so order holds per aggregate.
TOPICS: tuple[Topic, ...] = (
    Topic("civic.registry.v1", retention_ms=FOREVER),
    Topic("civic.tickets.v1", retention_ms=FOREVER),
    Topic("civic.notices.v1", retention_ms=30 * 24 * 3600 * 1000),
    Topic("civic.ledger.v1", retention_ms=FOREVER),
    Topic("civic.gis.v1", retention_ms=30 * 24 * 3600 * 1000),
)

BUCKETS: tuple[str, ...] = (
    "civic-attachments",  # notices
    "civic-photos",  # tickets
    "civic-statements",  # ledger: exported statements, expense receipt images
    "civic-imports",  # CSV files uploaded for onboarding
    "civic-maps",  # GeoJSON and DXF drawings uploaded for the map
)
