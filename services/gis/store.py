"""Map layers in MongoDB (GeoJSON in WGS84, 2dsphere-indexed), and the service's own view of
the registry: units, household points and the few facts about persons that counts need."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, GEOSPHERE, IndexModel, ReplaceOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from services.common.commands import REMEMBERED_FOR, ensure_command_indexes
from services.common.mongo import Document, Session, in_unit
from services.common.outbox import ensure_outbox_indexes
from services.common.paging import after_token, next_token
from services.common.registry_view import staying
from services.common.runtime import cancel_and_wait
from services.gis.domain import MAX_MERGES, RENTER_KINDS, Layer, feature_id
from services.gis.geometry import distance_m
from services.gis.nearby import Placed, PointGrid

log = logging.getLogger(__name__)

# What a listing returns of a feature (no bookkeeping fields).
SHOWN = {"layer": 1, "unit_id": 1, "geometry": 1, "properties": 1}
GEO_INDEX = "layer_1_geometry_2dsphere"
NEAREST_SHOWN = {"geometry": 1, "properties": 1, "source_unit": 1}
# MongoDB reckons $near on a sphere of 6,378.1 km: within 0.7% of the geodesic anywhere.
SPHERE_SLACK = 1.01
# MongoDB's codes for a geometry it cannot use: a query's (BadValue), a document's geo keys.
GEOMETRY_REFUSED = (2, 16755)


class GeometryRefused(Exception):
    """MongoDB refused some documents' geometry: their ids, each with MongoDB's reason."""

    def __init__(self, reasons: dict[str, str]) -> None:
        super().__init__(f"MongoDB refused the geometry of {len(reasons)} features")
        self.reasons = reasons


def refusal_reason(message: str) -> str:
    """MongoDB's reason for refusing a geometry, without the document and the positions it
    quotes (a polygon may have 50,000)."""
    if message.startswith("Can't extract geo keys"):
        message = message.split("}  ", 1)[-1]
    return re.sub(r"\[ \[.*?\] \] ?", "", message)[:300]


def refused_geometry(error: OperationFailure) -> str | None:
    """MongoDB's reason, if the error is its refusal of a query's geometry."""
    if error.code not in GEOMETRY_REFUSED:
        return None
    return refusal_reason(str((error.details or {}).get("errmsg", error)))


class GisStore:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self.db = db
        self.features = db["features"]
        self.units = db["units"]  # projected from civic.registry.v1
        self.persons = db["persons"]  # projected from civic.registry.v1: no names
        # Which request each import's id was first written for (see claim_import).
        self.import_claims = db["import_claims"]
        self.hydrants = HydrantMirror(self.features)

    async def ensure_indexes(self) -> None:
        await self.features.create_indexes(
            [
                # Layer first: a nearest-hydrant search never wades through buildings.
                IndexModel([("layer", ASCENDING), ("geometry", GEOSPHERE)], name=GEO_INDEX),
                IndexModel([("layer", ASCENDING), ("unit_id", ASCENDING)]),
                IndexModel([("source_unit", ASCENDING), ("layer", ASCENDING)]),
            ]
        )
        # The groups merged into a unit whose outline is drawn again.
        await self.units.create_index("merged_into_id")
        await self.persons.create_indexes(
            [IndexModel([("unit_id", ASCENDING)]), IndexModel([("household_id", ASCENDING)])]
        )
        await self.import_claims.create_index(
            "at", expireAfterSeconds=int(REMEMBERED_FOR.total_seconds())
        )
        await ensure_outbox_indexes(self.db)
        await ensure_command_indexes(self.db)

    # ---- writing layers ----------------------------------------------------------------------

    async def upsert(
        self, docs: Sequence[Document], session: Session
    ) -> tuple[list[str], list[str], list[str]]:
        """(created, updated, unchanged) ids; a document whose content hash is the stored one,
        from the same drawing, is not written again (a boundary another unit's drawing gave is
        taken over, so that drawing's replace no longer removes it). GeometryRefused names the
        documents whose geometry MongoDB refused: nothing is written then."""
        shown = {"hash": 1, "source_unit": 1, "source_id": 1}
        stored = {
            doc["_id"]: (doc.get("hash"), doc.get("source_unit"), doc.get("source_id"))
            async for doc in self.features.find(
                {"_id": {"$in": [d["_id"] for d in docs]}}, shown, session=session
            )
        }
        created, updated, unchanged, writes = [], [], [], []
        for doc in docs:
            if doc["_id"] not in stored:
                created.append(doc["_id"])
            elif stored[doc["_id"]] != (doc["hash"], doc["source_unit"], doc["source_id"]):
                updated.append(doc["_id"])
            else:
                unchanged.append(doc["_id"])
                continue
            writes.append(ReplaceOne({"_id": doc["_id"]}, doc, upsert=True))
        if writes:
            try:
                await self.features.bulk_write(writes, ordered=False, session=session)
            except BulkWriteError as error:
                refused = {
                    e["op"]["q"]["_id"]: refusal_reason(str(e.get("errmsg", "")))
                    for e in error.details.get("writeErrors", [])
                    if e.get("code") in GEOMETRY_REFUSED
                }
                if refused:
                    raise GeometryRefused(refused) from error
                raise
        return created, updated, unchanged

    async def claim_import(self, import_id: str, fingerprint: str) -> bool:
        """Whether the import may write under this id: its first request, or that request
        again (a retry, at once or after a failure part way), but no other. An import records
        its answer only once written, in several transactions: two requests under one id
        sent together would both write before either recorded."""
        try:
            await self.import_claims.insert_one(
                # Kept as long as the command's record, by the same (real) clock.
                {"_id": import_id, "fingerprint": fingerprint, "at": datetime.now(UTC)}
            )
        except DuplicateKeyError:
            claim = await self.import_claims.find_one({"_id": import_id})
            return claim is None or claim["fingerprint"] == fingerprint
        return True

    async def displaced(self, boundaries: Sequence[Document], session: Session) -> list[Document]:
        """The boundaries these take the place of: any other boundary of the units they bound
        (one stored under an id from its drawing, as ids were made before) or of the groups
        merged into them (the outline drawn after a merge is the merged groups' too), and what
        the same outline of the same drawing bounded when it named another unit."""
        if not boundaries:
            return []
        bounded = {doc["unit_id"] for doc in boundaries}
        bounded |= await self.merged_into(bounded, session)
        # The same outline: of the same unit's drawing (or of one stored before boundaries kept
        # their drawing), under the same handle or id.
        outlines: dict[tuple[str, str], list[str]] = {}
        for doc in boundaries:
            drawing = doc.get("drawing", "")
            outlines.setdefault((doc["source_unit"], drawing), []).append(doc["source_id"])
        query = {
            "layer": Layer.BOUNDARY.key,
            "_id": {"$nin": [doc["_id"] for doc in boundaries]},
            "$or": [
                {"unit_id": {"$in": sorted(bounded)}},
                *(
                    {
                        "source_unit": unit,
                        "source_id": {"$in": ids},
                        "drawing": {"$in": [drawing, None] if drawing else [None]},
                    }
                    for (unit, drawing), ids in outlines.items()
                ),
            ],
        }
        return await self.features.find(query, {"unit_id": 1}, session=session).to_list()

    async def merged_into(self, unit_ids: set[str], session: Session | None = None) -> set[str]:
        """The groups the registry merged into these units, and those merged into them in
        turn."""
        found: set[str] = set()
        wanted = unit_ids
        for _ in range(MAX_MERGES):
            wanted = {
                doc["_id"]
                async for doc in self.units.find(
                    {"merged_into_id": {"$in": sorted(wanted)}, "active": False},
                    {"_id": 1},
                    session=session,
                )
            } - found
            if not wanted:
                break
            found |= wanted
        return found

    async def undrawn(
        self, layer: Layer, docs: Sequence[Document], session: Session
    ) -> list[Document]:
        """What these drawings' features were stored as before features kept their drawing:
        under their unit, layer and handle alone. (A boundary's id is its unit's.)"""
        if layer is Layer.BOUNDARY:
            return []
        ids = [
            feature_id(layer, doc["source_unit"], doc["source_id"])
            for doc in docs
            if doc.get("drawing")
        ]
        if not ids:
            return []
        query = {"_id": {"$in": ids}, "drawing": {"$exists": False}}
        return await self.features.find(query, {"unit_id": 1}, session=session).to_list()

    async def stale(self, layer: Layer, source_unit: str, keep: set[str]) -> list[Document]:
        """Features an import into source_unit made earlier that the new one no longer has."""
        docs = await self.features.find(
            {"layer": layer.key, "source_unit": source_unit}, {"unit_id": 1}
        ).to_list()
        return [doc for doc in docs if doc["_id"] not in keep]

    async def remove(self, ids: list[str], session: Session) -> None:
        if ids:
            await self.features.delete_many({"_id": {"$in": ids}}, session=session)

    # ---- reading layers ----------------------------------------------------------------------

    async def boundary(self, unit_id: str) -> Document | None:
        return await self.features.find_one({"layer": Layer.BOUNDARY.key, "unit_id": unit_id})

    async def nearest_boundary(self, unit_id: str) -> Document | None:
        """The unit's boundary, or failing that its nearest ancestor's."""
        parts = unit_id.split(".")
        candidates = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
        found = {
            doc["unit_id"]: doc
            async for doc in self.features.find(
                {"layer": Layer.BOUNDARY.key, "unit_id": {"$in": candidates}}
            )
        }
        return next((found[c] for c in candidates if c in found), None)

    async def boundaries_crossing(self, outlines: Sequence[Document]) -> list[Document]:
        """Every boundary that meets one of these outlines."""
        if not outlines:
            return []
        query = {
            "layer": Layer.BOUNDARY.key,
            "$or": [{"geometry": {"$geoIntersects": {"$geometry": o}}} for o in outlines],
        }
        shown = {"unit_id": 1, "geometry": 1, "source_unit": 1, "source_id": 1, "drawing": 1}
        return await self.features.find(query, shown).to_list()

    async def containing(self, point: Document) -> list[Document]:
        return await self.features.find(
            {"layer": Layer.BOUNDARY.key, "geometry": {"$geoIntersects": {"$geometry": point}}},
            {"unit_id": 1, "properties": 1},
        ).to_list()

    async def page(
        self, query: Document, token: str, size: int, shown: Document | None = None
    ) -> tuple[list[Document], str]:
        """A page of features in id order. `query` must select by geometry: the planner is told
        to use the layer's geometry index (left to itself it may walk the ids in order and test
        each feature, several times slower for a box of thousands)."""
        items = (
            await self.features.find(after_token(query, token), shown or SHOWN)
            .hint(GEO_INDEX)
            .sort("_id", ASCENDING)
            .limit(size)
            .to_list()
        )
        return items, next_token(items, size)

    async def all(self, query: Document, limit: int = 50_000) -> list[Document]:
        return await self.features.find(query, SHOWN).limit(limit).to_list()

    async def nearest(
        self, layer: Layer, point: Document, limit: int, max_distance_m: float
    ) -> list[Document]:
        """The nearest features of a layer by the geodesic, nearest first, each with its
        `distance_m`. Hydrants come from memory (while it follows the layer); otherwise from a
        find with $near, read only as far as it can still give one of the nearest (an
        aggregation's $geoNear reads every feature within max_distance_m first)."""
        position = (point["coordinates"][0], point["coordinates"][1])
        if layer is Layer.HYDRANT and self.hydrants.following:
            found = self.hydrants.grid.nearest(position, limit, max_distance_m, distance_m)
            return [placed.doc | {"distance_m": metres} for metres, placed in found]
        # $near ranks and limits on its sphere: a little wider, then by the geodesic, as the
        # grid does (a point 100 m north is 100.6 m away on MongoDB's sphere at 16°N).
        near = {"$geometry": point, "$maxDistance": max_distance_m * SPHERE_SLACK}
        ranked: list[tuple[float, str, Document]] = []
        async with self.features.find(
            {"layer": layer.key, "geometry": {"$near": near}}, NEAREST_SHOWN
        ) as cursor:
            async for doc in cursor:
                lon, lat = doc["geometry"]["coordinates"]
                metres = distance_m(position, (lon, lat))
                # Farther on the sphere from here on: none after this one can be nearer than
                # the nearest `limit` so far.
                if len(ranked) >= limit and metres > ranked[limit - 1][0] * SPHERE_SLACK**2:
                    break
                if metres <= max_distance_m:
                    bisect.insort(ranked, (metres, doc["_id"], doc), key=lambda r: r[:2])
        return [doc | {"distance_m": metres} for metres, _, doc in ranked[:limit]]

    # ---- the registry's facts ----------------------------------------------------------------

    async def unit(self, unit_id: str) -> Document | None:
        return await self.units.find_one({"_id": unit_id})

    async def units_by_id(self, unit_ids: set[str]) -> dict[str, Document]:
        return {
            doc["_id"]: doc
            async for doc in self.units.find(
                {"_id": {"$in": sorted(unit_ids)}}, {"active": 1, "merged_into_id": 1}
            )
        }

    async def units_named(self, unit_ids: list[str]) -> dict[str, str]:
        return {
            doc["_id"]: doc.get("name", "")
            async for doc in self.units.find({"_id": {"$in": unit_ids}}, {"name": 1})
        }

    async def units_now(self, unit_ids: list[str]) -> dict[str, tuple[str, str]]:
        """Each known unit as (id, name) of the unit it is now: a group the registry merged
        away is the group it went into, followed through merges in turn. One read while none
        of them was merged."""
        shown = {"name": 1, "active": 1, "merged_into_id": 1}
        known: dict[str, Document] = {}
        looked: set[str] = set()
        wanted = set(unit_ids)
        for _ in range(MAX_MERGES + 1):
            if not wanted:
                break
            looked |= wanted
            async for doc in self.units.find({"_id": {"$in": sorted(wanted)}}, shown):
                known[doc["_id"]] = doc
            wanted = {
                doc["merged_into_id"]
                for doc in known.values()
                if not doc.get("active", True) and doc.get("merged_into_id")
            } - looked
        now: dict[str, tuple[str, str]] = {}
        for unit_id in unit_ids:
            if unit_id not in known:
                continue
            unit = known[unit_id]
            for _ in range(MAX_MERGES):
                merged = unit.get("merged_into_id")
                if unit.get("active", True) or merged not in known:
                    break
                unit = known[merged]
            now[unit_id] = (unit["_id"], unit.get("name", ""))
        return now

    async def groups_in(self, unit_id: str) -> list[Document]:
        return await self.units.find(
            {"_id": in_unit(unit_id), "kind": 4, "active": True}, {"name": 1}
        ).to_list()

    async def counts(self, unit_id: str, elderly_born_by: str, today: str) -> dict[str, Document]:
        """Per unit: population, elderly and renters of the persons living there on `today`
        (ISO): not a guest whose temporary stay has ended or is yet to begin."""
        rows = await self.persons.aggregate(
            [
                {"$match": {"unit_id": in_unit(unit_id), "active": True} | staying(today)},
                {
                    "$group": {
                        "_id": "$unit_id",
                        "population": {"$sum": 1},
                        "elderly": {
                            "$sum": {
                                "$cond": [
                                    {
                                        "$and": [
                                            {"$gt": ["$birth_date", ""]},
                                            {"$lte": ["$birth_date", elderly_born_by]},
                                        ]
                                    },
                                    1,
                                    0,
                                ]
                            }
                        },
                        "renters": {
                            "$sum": {
                                "$cond": [{"$in": ["$residence_kind", list(RENTER_KINDS)]}, 1, 0]
                            }
                        },
                    }
                },
            ]
        )
        found = {row["_id"]: row async for row in rows}
        households = await self.features.aggregate(
            [
                {"$match": {"layer": Layer.HOUSEHOLD.key, "unit_id": in_unit(unit_id)}},
                {"$group": {"_id": "$unit_id", "households": {"$sum": 1}}},
            ]
        )
        async for row in households:
            found.setdefault(row["_id"], {"_id": row["_id"]})["households"] = row["households"]
        return found

    async def put_unit(self, unit: Document, session: Session) -> None:
        await self.units.replace_one({"_id": unit["_id"]}, unit, upsert=True, session=session)

    async def household(self, household_id: str, session: Session | None = None) -> Any:
        return await self.features.find_one({"_id": f"household-{household_id}"}, session=session)


class HydrantMirror:
    """The hydrant layer in memory, kept equal to MongoDB's: loaded at start, then changed by
    every insert, replacement and deletion a change stream reports (whichever instance made
    it); this instance's own imports are applied at once with `reload`, so their callers read
    their own writes."""

    def __init__(self, features: AsyncCollection[Document]) -> None:
        self.grid = PointGrid()
        self._features = features
        self._task: asyncio.Task[None] | None = None
        self.following = False
        # For each reload under way, the hydrants the change stream changed meanwhile.
        self._reloading: list[set[str]] = []

    async def start(self) -> None:
        # Watch first, then load: nothing that changes in between is missed (replaying a change
        # the load already saw puts the same point again).
        stream = await self._watch()
        await self._load()
        self._task = asyncio.create_task(self._follow(stream), name="hydrant-mirror")

    async def stop(self) -> None:
        self.following = False
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def reload(self, source_unit: str) -> None:
        """The hydrants an import into source_unit left, at once. One the change stream changed
        while they were read keeps the stream's word: another writer's, committed after the
        read, would otherwise be dropped, and no later change would bring it back (the stream
        goes on to the same end whichever it had)."""
        changed: set[str] = set()
        self._reloading.append(changed)
        try:
            query = {"layer": Layer.HYDRANT.key, "source_unit": source_unit}
            placed = [_placed(doc) async for doc in self._features.find(query, NEAREST_SHOWN)]
        finally:
            self._reloading.remove(changed)
        self.grid.replace_unit(source_unit, placed, keep=changed)

    async def _watch(self) -> Any:
        match = {"$or": [{"fullDocument.layer": Layer.HYDRANT.key}, {"operationType": "delete"}]}
        return await self._features.watch([{"$match": match}], full_document="updateLookup")

    async def _load(self) -> None:
        """Every hydrant, in a new grid."""
        query = {"layer": Layer.HYDRANT.key}
        placed = [_placed(doc) async for doc in self._features.find(query, NEAREST_SHOWN)]
        self.grid = PointGrid()
        for point in placed:
            self.grid.put(point)

    async def _follow(self, stream: Any) -> None:
        while True:
            self.following = True
            try:
                async with stream:
                    async for change in stream:
                        feature_id = change["documentKey"]["_id"]
                        if change["operationType"] == "delete":
                            self.grid.remove(feature_id)
                        elif change.get("fullDocument"):
                            self.grid.put(_placed(change["fullDocument"]))
                        for changed in self._reloading:
                            changed.add(feature_id)
                log.warning("hydrant mirror's change stream ended; reopening")
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("hydrant mirror lost its change stream; reloading")
            # Answer from MongoDB until the mirror is whole again.
            self.following = False
            stream = await self._reopen()

    async def _reopen(self) -> Any:
        """A new change stream and a fresh load, retried every second: a closed stream is never
        iterated again (it would end at once, and the loop would spin)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                stream = await self._watch()
            except Exception:
                log.warning("hydrant mirror cannot watch MongoDB yet", exc_info=True)
                continue
            try:
                await self._load()
            except Exception:
                log.warning("hydrant mirror cannot load the hydrants yet", exc_info=True)
                with contextlib.suppress(Exception):
                    await stream.close()
                continue
            return stream


def _placed(doc: Document) -> Placed:
    lon, lat = doc["geometry"]["coordinates"]
    shown = {"_id": doc["_id"], "geometry": doc["geometry"], "properties": doc["properties"]}
    return Placed(doc["_id"], doc.get("source_unit", ""), (lon, lat), shown)
