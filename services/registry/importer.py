"""Bulk onboarding of a ward: rows of persons with their households, applied in batches.

A bad row is reported and skipped, never stops the import. Households are matched by the group
that issued their household book number and that number, persons by citizen ID (or, without one,
by the row that imported them, or by name and birth date in their household), so running the
same file twice changes nothing the second time, even for people who moved house in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from civic.registry.v1 import events_pb2, registry_pb2
from pymongo import AsyncMongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError

from services.common.auth import Principal
from services.common.errors import DomainError, FailedPrecondition, InvalidArgument
from services.common.mongo import Document, Session, in_any_unit, in_transaction
from services.common.outbox import Outbox
from services.common.registry_view import group_now
from services.common.wire import point_document
from services.registry import domain, events
from services.registry.records import PersonCodec, housing_document
from services.registry.store import PERSON_NAME_INDEX, RESIDENT, RegistryStore, new_id

RESIDENCE_KINDS = frozenset(registry_pb2.ResidenceKind.values())
MOVED_OUT = registry_pb2.PERSON_STATUS_MOVED_OUT
MAX_ERRORS = 10_000
DUPLICATE_KEY = 11000  # MongoDB's error code
BATCH_ROWS = 2_000
# Initial metadata of an ImportPersons call the registry has begun to apply. A failure after it
# may follow committed batches; a failure without it (a refused token) imported nothing.
STARTED_HEADER = "x-civic-import-started"


@dataclass
class Report:
    rows: int = 0
    households_created: int = 0
    persons_created: int = 0
    persons_unchanged: int = 0
    citizen_ids_added: int = 0
    errors: list[registry_pb2.ImportRowError] = field(default_factory=list)
    # Households this run brought in: someone in one of them is where the file says they live now.
    households_brought_in: set[str] = field(default_factory=set)

    def error(self, row: int, field_name: str, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(
                registry_pb2.ImportRowError(row_number=row, field=field_name, message=message)
            )

    def message(self) -> registry_pb2.ImportPersonsResponse:
        return registry_pb2.ImportPersonsResponse(
            rows=self.rows,
            households_created=self.households_created,
            persons_created=self.persons_created,
            persons_unchanged=self.persons_unchanged,
            citizen_ids_added=self.citizen_ids_added,
            errors=self.errors,
        )


class Importer:
    def __init__(
        self,
        store: RegistryStore,
        client: AsyncMongoClient[Document],
        outbox: Outbox,
        persons: PersonCodec,
        clock: Callable[[], datetime],
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.persons = persons
        self.clock = clock
        self._client = client

    async def run(
        self, caller: Principal, requests: AsyncIterator[registry_pb2.ImportPersonsRequest]
    ) -> registry_pb2.ImportPersonsResponse:
        report = Report()
        # unit id -> the group its households are in now, and "" when usable, else why not
        groups: dict[str, tuple[str, str]] = {}
        pending: list[registry_pb2.ImportRow] = []
        # One transaction per BATCH_ROWS rows, whatever size of chunk the client sends.
        async for request in requests:
            pending.extend(request.rows)
            while len(pending) >= BATCH_ROWS:
                batch, pending = pending[:BATCH_ROWS], pending[BATCH_ROWS:]
                await self._apply(caller, batch, groups, report)
        if pending:
            await self._apply(caller, pending, groups, report)
        return report.message()

    async def _group_of(
        self, caller: Principal, unit_id: str, groups: dict[str, tuple[str, str]]
    ) -> tuple[str, str]:
        """The group a row's households are in now, and "" or why the row cannot be imported.
        A file written before its group was merged away still imports: its book numbers are
        matched as that group issued them (a merge keeps that), and new households go to the
        group it was merged into, whose residents they are now."""
        if unit_id not in groups:
            now, unit = await group_now(unit_id, await self.store.unit(unit_id), self.store.unit)
            problem = ""
            if not caller.is_official or not caller.covers(now):
                problem = "is outside your scope"
                if now != unit_id:
                    problem = f"was merged into {now}, outside your scope"
            elif unit is None:
                problem = "names no known unit"
            elif unit["kind"] != domain.UnitKind.GROUP:
                problem = "is not a residential group or village"
            elif not unit["active"]:
                problem = f"was merged into {unit['merged_into_id']}"
            groups[unit_id] = (now, problem)
        return groups[unit_id]

    async def _apply(
        self,
        caller: Principal,
        rows: list[registry_pb2.ImportRow],
        groups: dict[str, tuple[str, str]],
        report: Report,
    ) -> None:
        report.rows += len(rows)
        now = self.clock()
        today = domain.local_date(now)

        # 1. Households: the existing ones, and new ones from the first row that names them.
        usable: list[registry_pb2.ImportRow] = []
        group_now: dict[str, str] = {}  # the group each usable row's new household goes to
        for row in rows:
            group_now[row.unit_id], problem = await self._group_of(caller, row.unit_id, groups)
            if problem:
                report.error(row.row_number, "unit_id", f"{row.unit_id or '(empty)'} {problem}")
            elif not row.household_ref.strip():
                report.error(row.row_number, "household_ref", "is required")
            else:
                usable.append(row)
        keys = {(row.unit_id, row.household_ref.strip()) for row in usable}
        # Book numbers are matched in the group that issued them (a merge keeps that).
        existing = await self.store.households.find(
            {
                "ref_unit_id": {"$in": list({unit for unit, _ in keys})},
                "external_ref": {"$in": list({ref for _, ref in keys})},
            }
        ).to_list()
        households = {
            (h["ref_unit_id"], h["external_ref"]): h
            for h in existing
            if (h["ref_unit_id"], h["external_ref"]) in keys
        }
        new_households: dict[tuple[str, str], Document] = {}
        rows_with_household: list[tuple[registry_pb2.ImportRow, Document]] = []
        for row in usable:
            key = (row.unit_id, row.household_ref.strip())
            household = households.get(key) or new_households.get(key)
            if household is None:
                try:
                    household = self._household(row, group_now[row.unit_id], now)
                except InvalidArgument as error:
                    report.error(row.row_number, error.field, error.problem)
                    continue
                new_households[key] = household
            rows_with_household.append((row, household))

        # 2. Persons: build and validate, then drop those already registered.
        candidates: list[tuple[int, Document]] = []
        for row, household in rows_with_household:
            try:
                person = self.persons.document(row.person, household, today=today, field="person")
            except InvalidArgument as error:
                report.error(row.row_number, error.field, error.problem)
                continue
            if not person["cid_hash"]:
                person["import_key"] = import_key(row, person)
            candidates.append((row.row_number, person))
        known_cids = {
            p["cid_hash"]: p
            async for p in self.store.persons.find(
                {"cid_hash": {"$in": [p["cid_hash"] for _, p in candidates if p["cid_hash"]]}},
                {"household_id": 1, "name_folded": 1, "birth_date": 1, "cid_hash": 1, "status": 1},
            )
        }
        # Someone without a citizen ID whom this file brought in before, wherever in the ward
        # they live now: found by the (unit, name) index, not one of their own (an index costs
        # time on every person a city's import writes).
        cidless = [p for _, p in candidates if "import_key" in p]
        imported_before: set[str] = set()
        if cidless:
            wards = sorted({p["unit_id"].rpartition(".")[0] or p["unit_id"] for p in cidless})
            async for p in self.store.persons.find(
                {
                    "unit_id": in_any_unit(wards),
                    "name_folded": {"$in": sorted({p["name_folded"] for p in cidless})},
                    "import_key": {"$in": [p["import_key"] for p in cidless]},
                },
                {"import_key": 1},
                # Named: the (unit, status, birth date) index also leads with the unit, and
                # a planner's trial on a small register may pick it and read a whole ward.
            ).hint(PERSON_NAME_INDEX):
                imported_before.add(p["import_key"])
        # Whoever the household has had, living there or not: a second run of a file must not
        # bring back someone who has died or moved out since the first.
        on_record = await self.store.persons.find(
            {"household_id": {"$in": [h["_id"] for h in households.values()]}},
            {
                "household_id": 1,
                "unit_id": 1,
                "name_folded": 1,
                "birth_date": 1,
                "sex": 1,
                "relationship": 1,
                "cid_hash": 1,
                "import_key": 1,
            },
        ).to_list()
        known_names: dict[tuple[str, str, str], Document] = {
            (p["household_id"], p["name_folded"], p["birth_date"]): p for p in on_record
        }
        # Their name or birth date corrected since the file brought them in: the file still
        # names them as it did, and they are still the person it brought in.
        imported_before.update(p["import_key"] for p in on_record if p.get("import_key"))
        new_by_id = {h["_id"]: h for h in new_households.values()}
        existing_by_id = {h["_id"]: h for h in households.values()}
        headed: list[Document] = []  # existing households that get a head from this file
        new_persons: list[Document] = []
        new_rows: list[int] = []
        # Registered before without a citizen ID, given theirs now: (on record, as this row has it).
        identified: list[tuple[Document, Document]] = []
        # Who moved away and lives in a household this file brings in: the same person again.
        returning: set[str] = set()
        for row_number, person in candidates:
            cid_hash = person["cid_hash"]
            same = known_cids.get(cid_hash) if cid_hash else None
            name_key = (person["household_id"], person["name_folded"], person["birth_date"])
            brought_in = (
                person["household_id"] in new_by_id
                or person["household_id"] in report.households_brought_in
            )
            if same is not None and brought_in and same.get("status") != RESIDENT:
                # Not a file written before they left (its household would be on record): the
                # file of where they live now, as RegisterPerson would have them back.
                problem = returning_problem(same, person)
                if problem:
                    report.error(row_number, "person.citizen_id", problem)
                    continue
                person["_id"] = same["_id"]
                returning.add(person["_id"])
                same = None
            if same is not None:
                # The same person, though they may have moved since the file was written.
                if same["name_folded"] == person["name_folded"]:
                    report.persons_unchanged += 1
                else:
                    report.error(
                        row_number, "person.citizen_id", "is already registered to another person"
                    )
                continue
            known = known_names.get(name_key)
            if cid_hash and known is not None:
                # The same person registered before: the ID is theirs, not a second record's.
                if known.get("cid_hash"):
                    report.error(
                        row_number,
                        "person.citizen_id",
                        "the household has a person of this name and birth date with another",
                    )
                elif known["sex"] != person["sex"]:
                    report.error(row_number, "person.sex", "differs from the person on record")
                else:
                    identified.append((known, person))
                    new_rows.append(row_number)
                    known_cids[cid_hash] = known
                continue
            if not cid_hash and (known is not None or person["import_key"] in imported_before):
                report.persons_unchanged += 1
                continue
            if person["relationship"] == registry_pb2.RELATIONSHIP_HEAD:
                household = (
                    new_by_id.get(person["household_id"]) or existing_by_id[person["household_id"]]
                )
                if household.get("head_person_id"):
                    report.error(
                        row_number, "person.relationship", "the household already has a head"
                    )
                    continue
                household["head_person_id"] = person["_id"]
                if household["_id"] in existing_by_id:
                    headed.append(household)
            if cid_hash:
                known_cids[cid_hash] = person
            else:
                imported_before.add(person["import_key"])
            known_names[name_key] = person
            new_persons.append(person)
            new_rows.append(row_number)

        # 3. One transaction: households, persons and their events.
        # A new household whose every row failed is not created.
        housed = {p["household_id"] for p in new_persons}
        created = [h for h in new_households.values() if h["_id"] in housed]
        staged = [events.household_created(self.outbox, h) for h in created]
        staged += [
            events.person_registered(self.outbox, p, events_pb2.REGISTRATION_REASON_IMPORT)
            for p in new_persons
        ]
        staged += [events.household_updated(self.outbox, h, ["head_person_id"]) for h in headed]
        staged += [
            events.person_updated(self.outbox, known, ["citizen_id"]) for known, _ in identified
        ]

        async def work(session: Session) -> None:
            # The group was checked when the import first named it; a merge since (an import
            # runs for minutes) would leave these behind.
            for unit_id in sorted({p["unit_id"] for p in new_persons}):
                await self.store.require_active_group(unit_id, session)
            for household in headed:
                named = await self.store.households.update_one(
                    {"_id": household["_id"], "head_person_id": {"$in": ["", None]}},
                    {"$set": {"head_person_id": household["head_person_id"]}},
                    session=session,
                )
                if not named.matched_count:
                    raise FailedPrecondition(f"household {household['_id']} got a head meanwhile")
            if created:
                await self.store.households.insert_many(created, ordered=False, session=session)
            fresh = [p for p in new_persons if p["_id"] not in returning]
            if fresh:
                await self.store.persons.insert_many(fresh, ordered=False, session=session)
            for person in new_persons:
                if person["_id"] in returning:
                    back = await self.store.persons.replace_one(
                        {"_id": person["_id"], "status": MOVED_OUT}, person, session=session
                    )
                    if not back.matched_count:
                        raise FailedPrecondition(f"person {person['_id']} came back meanwhile")
            for known, person in identified:
                given = await self.store.persons.update_one(
                    {"_id": known["_id"], "cid_hash": {"$in": ["", None]}},
                    {"$set": {key: person[key] for key in ("cid_hash", "cid_sealed")}},
                    session=session,
                )
                if not given.matched_count:
                    raise FailedPrecondition(f"person {known['_id']} got a citizen ID meanwhile")
            await self.outbox.stage(session, staged)

        if not staged:
            return
        try:
            await in_transaction(self._client, work)
        except (DuplicateKeyError, BulkWriteError) as error:
            # A concurrent import wrote some of these first; nothing of this batch was written.
            # (In a transaction, insert_many fails with BulkWriteError.)
            if not _duplicate_keys_only(error):
                raise
            for row_number in new_rows:
                report.error(row_number, "", "conflicted with a concurrent import; run it again")
            return
        except DomainError as error:
            for row_number in new_rows:
                report.error(row_number, "", error.message)
            return
        self.outbox.committed()
        report.households_brought_in.update(h["_id"] for h in created)
        report.households_created += len(created)
        report.persons_created += len(new_persons)
        report.citizen_ids_added += len(identified)

    def _household(self, row: registry_pb2.ImportRow, group: str, now: datetime) -> Document:
        kind = row.residence_kind or registry_pb2.RESIDENCE_KIND_PERMANENT
        if kind not in RESIDENCE_KINDS:
            raise InvalidArgument("residence_kind", "is not a known value")
        return {
            "_id": new_id("hh"),
            "unit_id": group,
            "address": domain.normalize_name("address", row.address),
            "housing": housing_document(row.housing),
            "residence_kind": kind,
            "location": point_document("location", row.location)
            if row.HasField("location")
            else None,
            "external_ref": row.household_ref.strip(),
            # The group that issued the book number, which a merge does not change.
            "ref_unit_id": row.unit_id,
            "head_person_id": "",
            "active": True,
            "marked_absent": False,
            "last_verified_at": None,
            "last_activity_at": now,
            "created_at": now,
        }


def returning_problem(known: Document, person: Document) -> str:
    """Why a row cannot bring back the person on record under its citizen ID who no longer
    lives here, as RegisterPerson would: "" when it can."""
    if known["status"] != MOVED_OUT:
        return "belongs to a person registered as deceased"
    if (known["name_folded"], known["birth_date"]) != (person["name_folded"], person["birth_date"]):
        # A mistyped ID must not hand one person's record, and its history, to another.
        return "belongs to a person who moved away, on record under another name or birth date"
    return ""


def import_key(row: registry_pb2.ImportRow, person: Document) -> str:
    """What names a person without a citizen ID in an import file: the household book number in
    its issuing group, the name and the birth date. Kept on the person, so that running the file
    again finds them even after they moved."""
    return "|".join(
        (row.unit_id, row.household_ref.strip(), person["name_folded"], person["birth_date"])
    )


def _duplicate_keys_only(error: DuplicateKeyError | BulkWriteError) -> bool:
    if isinstance(error, DuplicateKeyError):
        return True
    return all(e.get("code") == DUPLICATE_KEY for e in error.details.get("writeErrors", []))
