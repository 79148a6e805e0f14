"""GIS benchmark: nearest hydrants among 100,000 buildings and 5,000 hydrants, and a bounding
box of 10,000 features returned as GeoJSON, both through gRPC, next to the raw MongoDB query.

    .venv/bin/python bench/gis.py [--buildings 100000] [--hydrants 5000] [--lookups 2000]

Starts its own servers (LocalStack in a temporary directory on free ports; an external server
named by CIVIC_MONGO_URI / KAFKA_BOOTSTRAP_SERVERS / CIVIC_S3_ENDPOINT is used instead) and, in
this process, the GIS service as in production (gRPC server, outbox relay, registry consumer).
The ward's unit is written into the service's registry view directly (no registry runs); the
map is loaded through ImportLayer, 10,000 GeoJSON features a request: a grid of 8 m x 8 m
buildings 10 m apart over about 3.2 km x 3.2 km, and hydrants at random inside it.

  nearest  NearestHydrants (limit 3, within 1 km) from random points, one call at a time, over
           gRPC from a client in a process of its own (as a ward app is); the floor is the same
           $near find through pymongo from that process on the same run.
  bbox     ListFeatures for a 1 km x 1 km box holding 10,000 buildings, one page of 10,000,
           the FeatureCollection text in the answer, from the same client process; the floor is
           the same find (same index, by hint as the service gives it) through pymongo, joined
           into the same text.

The last line of output is one JSON object with the figures; "targets_met" is true when the
nearest-hydrant p99 is under 5 ms and the 10,000-feature box under 300 ms (median of runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import statistics
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from civic.common.v1 import types_pb2
from civic.gis.v1 import gis_pb2, gis_pb2_grpc
from pymongo import AsyncMongoClient

from infra.benchmark import Measure, run_on_own_servers, say
from infra.local import Endpoints, isolated_settings
from services.common.auth import Role, mint_token
from services.common.mongo import Document
from services.common.runtime import run_async
from services.gis.domain import Layer
from services.gis.main import GisService
from services.gis.records import collection_text
from services.gis.store import GEO_INDEX

TARGET_P99_MS = 5.0
TARGET_BBOX_MS = 300.0
# The grid's south-west corner, in Đà Nẵng.
LON0, LAT0 = 108.15, 16.02
SPACING_M = 10.0
HOUSE_M = 8.0
M_PER_DEG_LAT = 111_320.0
M_PER_DEG_LON = M_PER_DEG_LAT * math.cos(math.radians(LAT0))
IMPORT_CHUNK = 10_000
WARD = "bench.hc.hc1"


def at(east_m: float, north_m: float) -> list[float]:
    return [round(LON0 + east_m / M_PER_DEG_LON, 7), round(LAT0 + north_m / M_PER_DEG_LAT, 7)]


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Figures:
    load_average: float = 0.0
    import_seconds: float = 0.0
    features: int = 0
    nearest_ms: list[float] = field(default_factory=list)
    nearest_raw_ms: list[float] = field(default_factory=list)
    bbox_ms: list[float] = field(default_factory=list)
    bbox_raw_ms: list[float] = field(default_factory=list)
    bbox_count: int = 0
    bbox_bytes: int = 0


def buildings(count: int) -> tuple[list[dict[str, Any]], int]:
    """A square grid of houses; returns them and the grid's side (houses per row)."""
    side = math.ceil(math.sqrt(count))
    houses = []
    for n in range(count):
        i, j = n % side, n // side
        x, y = i * SPACING_M, j * SPACING_M
        corners = [(x, y), (x + HOUSE_M, y), (x + HOUSE_M, y + HOUSE_M), (x, y + HOUSE_M), (x, y)]
        houses.append(
            {
                "type": "Feature",
                "id": f"b{n}",
                "geometry": {"type": "Polygon", "coordinates": [[at(*c) for c in corners]]},
                "properties": {"storeys": 1 + n % 5},
            }
        )
    return houses, side


def hydrants(count: int, extent_m: float, rng: random.Random) -> list[dict[str, Any]]:
    return [
        {
            "type": "Feature",
            "id": f"h{n}",
            "geometry": {
                "type": "Point",
                "coordinates": at(rng.uniform(0, extent_m), rng.uniform(0, extent_m)),
            },
            "properties": {"kind": "hydrant", "name": f"TCH-{n:04d}"},
        }
        for n in range(count)
    ]


class Client:
    """A gRPC client of the GIS service with a ward officer's token; large answers allowed."""

    def __init__(self, target: str, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 256 * 1024 * 1024)]
        )
        self.stub = gis_pb2_grpc.GisServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def import_layer(self, layer: int, features: list[dict[str, Any]]) -> None:
        for start in range(0, len(features), IMPORT_CHUNK):
            chunk = features[start : start + IMPORT_CHUNK]
            answer = await self.stub.ImportLayer(
                gis_pb2.ImportLayerRequest(
                    request_id=str(uuid.uuid4()),
                    unit_id=WARD,
                    layer=layer,  # type: ignore[arg-type]
                    format=gis_pb2.SOURCE_FORMAT_GEOJSON,
                    content=json.dumps({"type": "FeatureCollection", "features": chunk}).encode(),
                ),
                metadata=self.metadata,
                timeout=600,
            )
            if answer.rejected or answer.created != len(chunk):
                raise SystemExit(f"import refused features: {answer.rejected[:3]}")


@dataclass(frozen=True)
class Probe:
    """What the client process needs: where to call, as whom, and the raw database."""

    target: str
    token: str
    mongo_uri: str
    database: str


def nearest_request(lon: float, lat: float) -> gis_pb2.NearestHydrantsRequest:
    return gis_pb2.NearestHydrantsRequest(
        point=types_pb2.GeoPoint(longitude=lon, latitude=lat), limit=3
    )


def near_query(lon: float, lat: float) -> Document:
    near = {"type": "Point", "coordinates": [lon, lat]}
    return {
        "layer": Layer.HYDRANT.key,
        "geometry": {"$near": {"$geometry": near, "$maxDistance": 1000.0}},
    }


def measure_nearest(probe: Probe, points: list[list[float]]) -> tuple[list[float], list[float]]:
    """In the client process: each point through gRPC, then the same $near find raw (ms)."""
    return run_async(_nearest(probe, points))


async def _nearest(probe: Probe, points: list[list[float]]) -> tuple[list[float], list[float]]:
    client = Client(probe.target, probe.token)
    for lon, lat in points[:50]:  # warm-up
        await client.stub.NearestHydrants(nearest_request(lon, lat), metadata=client.metadata)
    through_grpc = []
    for lon, lat in points:
        begun = time.perf_counter()
        answer = await client.stub.NearestHydrants(
            nearest_request(lon, lat), metadata=client.metadata
        )
        through_grpc.append((time.perf_counter() - begun) * 1000)
        if not answer.hydrants:
            raise SystemExit("NearestHydrants found nothing")
    await client.channel.close()
    raw: AsyncMongoClient[Document] = AsyncMongoClient(probe.mongo_uri, tz_aware=True)
    features = raw[probe.database]["features"]
    direct = []
    for lon, lat in points:
        begun = time.perf_counter()
        found = features.find(near_query(lon, lat), {"geometry": 1, "properties": 1})
        await found.limit(3).to_list()
        direct.append((time.perf_counter() - begun) * 1000)
    await raw.close()
    return through_grpc, direct


# Milliseconds through gRPC, milliseconds raw, the answer's feature count and GeoJSON size.
BboxFigures = tuple[list[float], list[float], int, int]


def measure_bbox(probe: Probe, box: list[float], runs: int) -> BboxFigures:
    """In the client process: ListFeatures of the box, then the same find raw."""
    result: BboxFigures = run_async(_bbox(probe, box, runs))
    return result


async def _bbox(probe: Probe, box: list[float], runs: int) -> BboxFigures:
    west, south, east, north = box
    client = Client(probe.target, probe.token)
    through_grpc, count, size = [], 0, 0
    for _ in range(runs):
        begun = time.perf_counter()
        listed = await client.stub.ListFeatures(
            gis_pb2.ListFeaturesRequest(
                bbox=gis_pb2.BoundingBox(west=west, south=south, east=east, north=north),
                layers=[gis_pb2.LAYER_BUILDING],
                page=types_pb2.PageRequest(page_size=10_000),
            ),
            metadata=client.metadata,
        )
        through_grpc.append((time.perf_counter() - begun) * 1000)
        count, size = listed.count, len(listed.geojson)
    await client.channel.close()
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    query = {
        "layer": {"$in": [Layer.BUILDING.key]},
        "geometry": {"$geoIntersects": {"$geometry": {"type": "Polygon", "coordinates": [ring]}}},
    }
    raw: AsyncMongoClient[Document] = AsyncMongoClient(probe.mongo_uri, tz_aware=True)
    features = raw[probe.database]["features"]
    direct = []
    for _ in range(runs):
        begun = time.perf_counter()
        found = features.find(query, {"geojson": 1}).hint(GEO_INDEX).sort("_id", 1)
        collection_text(doc["geojson"] for doc in await found.limit(10_000).to_list())
        direct.append((time.perf_counter() - begun) * 1000)
    await raw.close()
    return through_grpc, direct, count, size


def warm_up_child() -> None:
    """Imports of the client process, before anything is timed."""


def measure(options: argparse.Namespace) -> Measure[Figures]:
    async def run(endpoints: Endpoints, pool: ProcessPoolExecutor, workdir: Path) -> Figures:
        settings = isolated_settings(endpoints, "bench")
        service = GisService(settings)
        figures = Figures(load_average=os.getloadavg()[0])
        rng = random.Random(7)
        loop = asyncio.get_running_loop()
        try:
            await service.start()
            logging.getLogger("faststream.access.kafka").setLevel(logging.WARNING)
            for unit_id, kind in (("bench", 1), ("bench.hc", 2), (WARD, 3)):
                await service.store.units.insert_one(
                    {"_id": unit_id, "kind": kind, "name": unit_id, "active": True}
                )
            token = mint_token(
                settings.auth_secret, subject="bench", role=Role.WARD_OFFICER, scope=WARD
            )
            target = f"127.0.0.1:{service.port}"
            client = Client(target, token)
            houses, side = buildings(options.buildings)
            extent = side * SPACING_M
            say(f"importing {len(houses):,} buildings and {options.hydrants:,} hydrants")
            started = time.perf_counter()
            await client.import_layer(gis_pb2.LAYER_BUILDING, houses)
            await client.import_layer(
                gis_pb2.LAYER_HYDRANT, hydrants(options.hydrants, extent, rng)
            )
            figures.import_seconds = time.perf_counter() - started
            figures.features = len(houses) + options.hydrants
            await client.channel.close()
            probe = Probe(target, token, settings.mongo_uri, settings.database_for("gis"))

            say(f"nearest hydrants: {options.lookups:,} calls, then the raw $near find")
            points = [
                at(rng.uniform(0, extent), rng.uniform(0, extent)) for _ in range(options.lookups)
            ]
            figures.nearest_ms, figures.nearest_raw_ms = await loop.run_in_executor(
                pool, measure_nearest, probe, points
            )

            # A 100 x 100 block of the grid: 10,000 houses.
            lo, hi = side // 2 - 50, side // 2 + 50
            west, south = at(lo * SPACING_M - 1, lo * SPACING_M - 1)
            east, north = at(hi * SPACING_M - 1, hi * SPACING_M - 1)
            say(f"bbox of 10,000 buildings: {options.bbox_runs} runs each way")
            (
                figures.bbox_ms,
                figures.bbox_raw_ms,
                figures.bbox_count,
                figures.bbox_bytes,
            ) = await loop.run_in_executor(
                pool, measure_bbox, probe, [west, south, east, north], options.bbox_runs
            )
            return figures
        finally:
            await service.stop()

    return run


def summary(options: argparse.Namespace, f: Figures) -> dict[str, Any]:
    p50, p99 = percentile(f.nearest_ms, 0.50), percentile(f.nearest_ms, 0.99)
    bbox = statistics.median(f.bbox_ms)
    return {
        "buildings": options.buildings,
        "hydrants": options.hydrants,
        "load_average": round(f.load_average, 2),
        "import_features_per_s": round(f.features / f.import_seconds),
        "nearest_calls": len(f.nearest_ms),
        "nearest_p50_ms": round(p50, 2),
        "nearest_p99_ms": round(p99, 2),
        "nearest_raw_p50_ms": round(percentile(f.nearest_raw_ms, 0.50), 2),
        "nearest_raw_p99_ms": round(percentile(f.nearest_raw_ms, 0.99), 2),
        "bbox_features": f.bbox_count,
        "bbox_geojson_bytes": f.bbox_bytes,
        "bbox_median_ms": round(bbox, 1),
        "bbox_max_ms": round(max(f.bbox_ms), 1),
        "bbox_raw_median_ms": round(statistics.median(f.bbox_raw_ms), 1),
        "targets": {"nearest_p99_ms": TARGET_P99_MS, "bbox_10000_ms": TARGET_BBOX_MS},
        "targets_met": p99 < TARGET_P99_MS and bbox < TARGET_BBOX_MS and f.bbox_count == 10_000,
    }


def report(s: dict[str, Any]) -> None:
    met = {True: "met", False: "NOT met"}
    print(
        f"\nGIS benchmark: {s['buildings']:,} buildings, {s['hydrants']:,} hydrants; "
        f"{os.cpu_count()} CPUs, load average {s['load_average']:.1f} at the start\n"
    )
    rate = s["import_features_per_s"]
    print(f"  import (ImportLayer, GeoJSON, 10,000 a request): {rate:,} features/s")
    print(f"\n{'nearest 3 hydrants, one call at a time':<44}{'p50 ms':>9}{'p99 ms':>9}")
    p50, p99 = s["nearest_p50_ms"], s["nearest_p99_ms"]
    print(f"  {'NearestHydrants through gRPC':<42}{p50:>9.2f}{p99:>9.2f}")
    print(
        f"  {'raw $near find through pymongo (floor)':<42}"
        f"{s['nearest_raw_p50_ms']:>9.2f}{s['nearest_raw_p99_ms']:>9.2f}"
    )
    print(f"\n{'a 1 km box of buildings as GeoJSON':<44}{'median ms':>11}{'max ms':>9}")
    print(
        f"  {'ListFeatures through gRPC':<42}{s['bbox_median_ms']:>11.1f}{s['bbox_max_ms']:>9.1f}"
        f"   {s['bbox_features']:,} features, {s['bbox_geojson_bytes'] / 1e6:.1f} MB"
    )
    print(f"  {'raw find + GeoJSON text (floor)':<42}{s['bbox_raw_median_ms']:>11.1f}")
    nearest_ok = s["nearest_p99_ms"] < TARGET_P99_MS
    bbox_ok = s["bbox_median_ms"] < TARGET_BBOX_MS and s["bbox_features"] == 10_000
    print(
        f"\ntargets: nearest p99 < {TARGET_P99_MS:g} ms {met[nearest_ok]}; "
        f"10,000 features < {TARGET_BBOX_MS:g} ms {met[bbox_ok]}"
    )
    print(json.dumps(s))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--buildings", type=int, default=100_000)
    parser.add_argument("--hydrants", type=int, default=5_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--bbox-runs", type=int, default=10)
    options = parser.parse_args(argv)
    figures = run_on_own_servers(measure(options), warm_up_child)
    report(summary(options, figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
