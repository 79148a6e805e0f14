"""The registry's gRPC servicer: checks the caller and the request, then reads or commands."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any

import grpc
from bson import ObjectId
from bson.errors import InvalidId
from civic.registry.v1 import events_pb2, registry_pb2, registry_pb2_grpc
from google.protobuf.message import Message
from pymongo import AsyncMongoClient

from services.common.auth import Principal, Role, current_purpose, principal
from services.common.commands import CommandRunner, R, Work
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.grpc_server import PURPOSE_HEADER
from services.common.mongo import Document, Session
from services.common.outbox import Outbox
from services.common.paging import ClockedListing, UnitListing, page_size
from services.common.wire import point_document, timestamp
from services.registry import domain, events
from services.registry.importer import STARTED_HEADER, Importer
from services.registry.records import (
    PersonCodec,
    check_enum,
    household_message,
    housing_document,
    unit_message,
)
from services.registry.store import RESIDENT, RegistryStore, new_id

Context = grpc.aio.ServicerContext[Any, Any]
PERSON_DECEASED = registry_pb2.PERSON_STATUS_DECEASED
PERSON_MOVED_OUT = registry_pb2.PERSON_STATUS_MOVED_OUT
# PersonDetails fields UpdatePerson changes, and the person document's fields each one sets.
PERSON_FIELDS = {
    "full_name": ("full_name", "name_folded"),
    "birth_date": ("birth_date",),
    "sex": ("sex",),
    "citizen_id": ("cid_hash", "cid_sealed"),
    "relationship": ("relationship",),
    "education": ("education",),
    "occupation": ("occupation",),
    "contact": ("contact",),
    "war_invalid": ("war_invalid",),
}
# The most households ListHouseholdSummaries is asked for by id.
MAX_SUMMARIES_NAMED = 100
HOUSEHOLD_FIELDS = (
    "address",
    "housing",
    "residence_kind",
    "location",
    "head_person_id",
    "poor",
    "marked_absent",
)


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self,
        store: RegistryStore,
        client: AsyncMongoClient[Document],
        commands: CommandRunner,
        outbox: Outbox,
        vault: domain.CitizenIdVault,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.commands = commands
        self.outbox = outbox
        self.persons = PersonCodec(vault)
        self.clock = clock
        self.importer = Importer(store, client, outbox, self.persons, clock)

    # ---- helpers -------------------------------------------------------------------------

    def today(self) -> date:
        return domain.local_date(self.clock())

    async def _unit(
        self, unit_id: str, field: str = "unit_id", session: Session | None = None
    ) -> Document:
        if not unit_id:
            raise InvalidArgument(field, "is required")
        unit = await self.store.unit(unit_id, session)
        if unit is None:
            raise NotFound(f"unit {unit_id} not found")
        return unit

    async def _group(self, unit_id: str, field: str, session: Session | None = None) -> Document:
        unit = await self._unit(unit_id, field, session)
        if unit["kind"] != domain.UnitKind.GROUP:
            raise InvalidArgument(field, "households belong to a residential group or village")
        if not unit["active"]:
            raise FailedPrecondition(f"group {unit_id} was merged into {unit['merged_into_id']}")
        return unit

    async def _still_standing(self, unit_id: str, page_token: str) -> None:
        """A listing's unit has not been merged away: a retired group holds nobody, and its
        leader's empty list would read as "nothing to do". Asked at the first page only: the
        pages after it read the register as the first did."""
        if page_token:
            return
        unit = await self.store.unit(unit_id)
        if unit is not None and not unit.get("active", True):
            raise FailedPrecondition(
                f"unit_id: group {unit_id} was merged into {unit['merged_into_id']}; "
                "its households are listed there"
            )

    async def _household(
        self, household_id: str, field: str = "household_id", session: Session | None = None
    ) -> Document:
        _required(field, household_id)
        return _found(await self.store.household(household_id, session), household_id)

    async def _resident(self, person_id: str, session: Session) -> Document:
        if not person_id:
            raise InvalidArgument("person_id", "is required")
        person = await self.store.person(person_id, session)
        if person is None:
            raise NotFound(f"person {person_id} not found")
        domain.may_keep(principal(), person["unit_id"], f"person {person_id}")
        if person["status"] != RESIDENT:
            state = registry_pb2.PersonStatus.Name(person["status"]).removeprefix("PERSON_STATUS_")
            raise FailedPrecondition(f"person {person_id} is {state.lower().replace('_', ' ')}")
        return person

    async def _register(self, person: Document, session: Session) -> None:
        """Writes a newly registered person. A citizen ID is one person for life: someone who
        moved away and comes back (to any household) is the same person again, with the same
        id and what they state now, not a second record."""
        known = (
            await self.store.person_by_cid(person["cid_hash"], session)
            if person.get("cid_hash")
            else None
        )
        if known is None:
            await self.store.insert_person(person, session)
        elif known["status"] == PERSON_MOVED_OUT:
            # The same person, as the name and birth date on record say: an ID mistyped must not
            # hand someone else's record, and its history, to whoever is registered now.
            if (known["name_folded"], known["birth_date"]) != (
                person["name_folded"],
                person["birth_date"],
            ):
                raise AlreadyExists(
                    "person.citizen_id: belongs to a person who moved away, on record under "
                    "another name or birth date: check the ID (a change of name is corrected "
                    "with UpdatePerson once they are back)"
                )
            person["_id"] = known["_id"]
            await self.store.replace_person(person, session)
        elif known["status"] == PERSON_DECEASED:
            raise FailedPrecondition("this citizen_id belongs to a person registered as deceased")
        else:
            raise AlreadyExists("a person with this citizen_id is already registered")

    def _log_reads(
        self,
        caller: Principal,
        action: str,
        persons: list[Document],
        households: Iterable[str] = (),
        *,
        shows_citizen_ids: bool = True,
        purpose: str = "",
    ) -> list[Document]:
        """Access-log records for an official's read of these persons' data: one per household
        read, naming each person shown, so a lookup writes one document, not one per member.
        A household's own data (address, housing, place) is personal data too: `households`
        are logged even where no person of theirs is shown. A read that shows no citizen IDs
        at all (`shows_citizen_ids=False`) records none as shown, whoever the caller."""
        if caller.role is Role.RESIDENT:
            return []
        shown: dict[str, list[Document]] = {household_id: [] for household_id in households}
        for person in persons:
            household_id = person["household_id"]
            shown.setdefault(household_id, []).append(
                {
                    "person_id": person["_id"],
                    "citizen_id_shown": shows_citizen_ids
                    and bool(person.get("cid_sealed"))
                    and domain.may_see_citizen_id(caller, household_id),
                }
            )
        # Who, what, when and why: an official states why with each read (x-civic-purpose);
        # a command's answer may go without, its command being why.
        purpose = current_purpose.get().strip() or purpose
        if not purpose:
            raise InvalidArgument(
                PURPOSE_HEADER, "state why you read this personal data (request metadata)"
            )
        now = self.clock()
        return [
            {
                "_id": ObjectId(),
                "household_id": household_id,
                "persons": read,
                "actor": caller.subject,
                "actor_role": caller.role.value,
                "action": action,
                "purpose": purpose,
                "at": now,
            }
            for household_id, read in shown.items()
        ]

    async def _command(
        self, method: str, request: Message, response_type: type[R], work: Work[R]
    ) -> R:
        response = await self.commands.run(method, request, response_type, work)
        await self._log_answer(method, response)
        return response

    async def _log_answer(self, method: str, response: Message) -> None:
        """A command on a person or household already registered answers with their record,
        more than the caller stated (or than it changed: one that changes nothing is answered
        too), so an official's command is a read like any other: logged, its purpose the one
        stated or else the command itself."""
        fields = response.DESCRIPTOR.fields_by_name
        shown = [
            getattr(response, name)
            for name in ("person", "head", "household")
            if name in fields and response.HasField(name)
        ]
        persons: list[Document] = [
            {"_id": p.person_id, "household_id": p.household_id, "cid_sealed": bool(p.citizen_id)}
            for p in shown
            if isinstance(p, registry_pb2.Person) and p.person_id
        ]
        households = [h.household_id for h in shown if isinstance(h, registry_pb2.Household)]
        if persons or households:
            # An answer is kept for the command's retries, so it shows citizen IDs masked to
            # everyone: none was shown in full, whoever the caller.
            entries = self._log_reads(
                principal(),
                method,
                persons,
                households,
                shows_citizen_ids=False,
                purpose=f"answer to {method}",
            )
            await self.store.log_access(entries)

    async def _read_persons(
        self, action: str, persons: list[Document], households: Iterable[str] = ()
    ) -> list[registry_pb2.Person]:
        caller = principal()
        await self.store.log_access(self._log_reads(caller, action, persons, households))
        return [self.persons.message(person, caller) for person in persons]

    # ---- administrative units ------------------------------------------------------------

    async def CreateUnit(
        self, request: registry_pb2.CreateUnitRequest, context: Context
    ) -> registry_pb2.CreateUnitResponse:
        kind = domain.UnitKind(check_enum("kind", request.kind, registry_pb2.UnitKind))
        name = domain.normalize_name("name", request.name)
        unit_id = domain.child_unit_id(request.parent_id, request.code)
        domain.may_manage_units(principal(), request.parent_id or unit_id)

        async def work(session: Session) -> tuple[registry_pb2.CreateUnitResponse, list[Document]]:
            parent_kind = None
            if request.parent_id:
                parent = await self._unit(request.parent_id, "parent_id", session)
                if not parent["active"]:
                    raise FailedPrecondition(f"unit {request.parent_id} is no longer active")
                parent_kind = domain.UnitKind(parent["kind"])
            domain.check_child_kind(parent_kind, kind)
            if await self.store.unit(unit_id, session):
                raise AlreadyExists(f"unit {unit_id} already exists")
            unit = {
                "_id": unit_id,
                "kind": int(kind),
                "name": name,
                "parent_id": request.parent_id,
                "code": request.code,
                "active": True,
                "merged_into_id": "",
                "created_at": self.clock(),
            }
            await self.store.insert_unit(unit, session)
            message = unit_message(unit)
            event = self.outbox.event(events_pb2.UnitCreated(unit=message), key=unit_id)
            return registry_pb2.CreateUnitResponse(unit=message), [event]

        return await self.commands.run("CreateUnit", request, registry_pb2.CreateUnitResponse, work)

    async def RenameUnit(
        self, request: registry_pb2.RenameUnitRequest, context: Context
    ) -> registry_pb2.RenameUnitResponse:
        name = domain.normalize_name("name", request.name)
        if not request.unit_id:
            raise InvalidArgument("unit_id", "is required")
        domain.may_manage_units(principal(), request.unit_id)

        async def work(session: Session) -> tuple[registry_pb2.RenameUnitResponse, list[Document]]:
            unit = await self._unit(request.unit_id, session=session)
            if unit["name"] == name:  # so named already (a retry, say): nothing to tell
                return registry_pb2.RenameUnitResponse(unit=unit_message(unit)), []
            renamed = await self.store.set_unit_fields(unit["_id"], {"name": name}, session)
            event = self.outbox.event(
                events_pb2.UnitRenamed(unit_id=unit["_id"], old_name=unit["name"], new_name=name),
                key=unit["_id"],
            )
            return registry_pb2.RenameUnitResponse(unit=unit_message(renamed)), [event]

        return await self.commands.run("RenameUnit", request, registry_pb2.RenameUnitResponse, work)

    async def MergeGroups(
        self, request: registry_pb2.MergeGroupsRequest, context: Context
    ) -> registry_pb2.MergeGroupsResponse:
        source_id, target_id = request.source_unit_id, request.target_unit_id
        # A missing unit is bad input, not a unit outside the caller's scope.
        _required("source_unit_id", source_id)
        _required("target_unit_id", target_id)
        if source_id == target_id:
            raise InvalidArgument("target_unit_id", "must differ from source_unit_id")
        caller = principal()
        domain.may_manage_units(caller, source_id)
        domain.may_manage_units(caller, target_id)

        async def work(session: Session) -> tuple[registry_pb2.MergeGroupsResponse, list[Document]]:
            await self._group(source_id, "source_unit_id", session)
            target = await self._group(target_id, "target_unit_id", session)
            # Written, not only read: a merge of the target committing meanwhile (into a third
            # group, or into the source) conflicts, so households never land in a retired group.
            await self.store.claim_group(target_id, session)
            moved = await self.store.move_group(source_id, target_id, session)
            await self.store.set_unit_fields(
                source_id, {"active": False, "merged_into_id": target_id}, session
            )
            staged = [
                self.outbox.event(
                    events_pb2.GroupsMerged(
                        source_unit_id=source_id, target_unit_id=target_id, household_ids=moved
                    ),
                    key=source_id,
                )
            ]
            staged += [
                self.outbox.event(
                    events_pb2.HouseholdMoved(
                        household_id=household_id,
                        from_unit_id=source_id,
                        to_unit_id=target_id,
                        by_merge=True,
                    ),
                    key=household_id,
                )
                for household_id in moved
            ]
            response = registry_pb2.MergeGroupsResponse(
                target=unit_message(target), households_moved=len(moved)
            )
            return response, staged

        return await self.commands.run(
            "MergeGroups", request, registry_pb2.MergeGroupsResponse, work
        )

    async def GetUnit(
        self, request: registry_pb2.GetUnitRequest, context: Context
    ) -> registry_pb2.GetUnitResponse:
        # The administrative tree is public knowledge: any signed-in caller may read it.
        principal()
        return registry_pb2.GetUnitResponse(unit=unit_message(await self._unit(request.unit_id)))

    async def ListChildUnits(
        self, request: registry_pb2.ListChildUnitsRequest, context: Context
    ) -> registry_pb2.ListChildUnitsResponse:
        principal()
        await self._unit(request.unit_id)
        children = await self.store.child_units(request.unit_id, request.include_inactive)
        return registry_pb2.ListChildUnitsResponse(units=[unit_message(u) for u in children])

    # ---- households ----------------------------------------------------------------------

    async def CreateHousehold(
        self, request: registry_pb2.CreateHouseholdRequest, context: Context
    ) -> registry_pb2.CreateHouseholdResponse:
        if not request.unit_id:
            raise InvalidArgument("unit_id", "is required")
        domain.may_register(principal(), request.unit_id)
        address = domain.normalize_name("address", request.address)
        kind = check_enum("residence_kind", request.residence_kind, registry_pb2.ResidenceKind)
        if not request.HasField("head"):
            raise InvalidArgument("head", "is required")
        now = self.clock()
        household: Document = {
            "_id": new_id("hh"),
            "unit_id": request.unit_id,
            "address": address,
            "housing": housing_document(request.housing),
            "residence_kind": kind,
            "location": point_document("location", request.location)
            if request.HasField("location")
            else None,
            "external_ref": request.external_ref.strip() or None,
            "ref_unit_id": request.unit_id,  # the group that issued the book number
            "poor": request.poor,
            "active": True,
            "marked_absent": False,
            "last_verified_at": None,
            "last_activity_at": now,
            "created_at": now,
        }
        head = self.persons.document(
            request.head,
            household,
            today=self.today(),
            field="head",
            relationship=registry_pb2.RELATIONSHIP_HEAD,
        )
        household["head_person_id"] = head["_id"]

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.CreateHouseholdResponse, list[Document]]:
            await self._group(request.unit_id, "unit_id", session)
            await self.store.claim_group(request.unit_id, session)
            book_number = household["external_ref"]
            # Said in the request's words: the unique index would name its own fields.
            if book_number and await self.store.household_by_book_number(
                request.unit_id, book_number, session
            ):
                raise AlreadyExists(
                    f"external_ref: book number {book_number} is already a household of "
                    f"{request.unit_id}"
                )
            await self._register(head, session)
            household["head_person_id"] = head["_id"]  # the same person again, if they return
            await self.store.insert_household(household, session)
            staged = [
                events.household_created(self.outbox, household),
                events.person_registered(
                    self.outbox, head, events_pb2.REGISTRATION_REASON_HEAD_OF_NEW_HOUSEHOLD
                ),
            ]
            response = registry_pb2.CreateHouseholdResponse(
                household=household_message(household),
                head=self.persons.message(head, principal(), stored=True),
            )
            return response, staged

        return await self.commands.run(
            "CreateHousehold", request, registry_pb2.CreateHouseholdResponse, work
        )

    async def UpdateHousehold(
        self, request: registry_pb2.UpdateHouseholdRequest, context: Context
    ) -> registry_pb2.UpdateHouseholdResponse:
        fields = domain.fields_to_update(request.update_fields, HOUSEHOLD_FIELDS)
        changes: Document = {}
        if "address" in fields:
            changes["address"] = domain.normalize_name("address", request.address)
        for named in ("housing", "location"):
            # Left out, it would read as all zeros: a form that failed to send it must not wipe
            # the household's floor area and storeys, nor put it off the coast of Africa.
            if named in fields and not request.HasField(named):
                raise InvalidArgument(named, "is required when named in update_fields")
        if "housing" in fields:
            changes["housing"] = housing_document(request.housing)
        if "residence_kind" in fields:
            changes["residence_kind"] = check_enum(
                "residence_kind", request.residence_kind, registry_pb2.ResidenceKind
            )
        if "location" in fields:
            changes["location"] = point_document("location", request.location)
        if "poor" in fields:
            changes["poor"] = request.poor
        if "marked_absent" in fields:
            # The group leader found nobody living there; a verification on the ground clears it.
            changes["marked_absent"] = request.marked_absent

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.UpdateHouseholdResponse, list[Document]]:
            household = await self._household(request.household_id, session=session)
            domain.may_keep(principal(), household["unit_id"], f"household {household['_id']}")
            head_id = household.get("head_person_id")
            if "head_person_id" in fields and request.head_person_id != head_id:
                head = await self.store.person(request.head_person_id, session)
                if (
                    head is None
                    or head["household_id"] != household["_id"]
                    or head["status"] != RESIDENT
                ):
                    raise InvalidArgument("head_person_id", "is not a member of this household")
                changes["head_person_id"] = head["_id"]
                await self.store.update_person(
                    head["_id"], {"relationship": registry_pb2.RELATIONSHIP_HEAD}, session
                )
                # One head: the former head's relationship to the new one is not known until the
                # leader states it (a spouse, a parent...).
                former = await self.store.person(head_id or "", session)
                if (
                    former is not None
                    and former["_id"] != head["_id"]
                    and former["status"] == RESIDENT
                    and former["household_id"] == household["_id"]
                ):
                    await self.store.update_person(
                        former["_id"],
                        {"relationship": registry_pb2.RELATIONSHIP_UNSPECIFIED},
                        session,
                    )
            # A field set to the value it has is no change (a retry under a new request_id, say):
            # nothing to write or publish, and no sign of life in the household.
            changed = [f for f in fields if f in changes and changes[f] != household.get(f)]
            if not changed:
                return registry_pb2.UpdateHouseholdResponse(
                    household=household_message(household)
                ), []
            changes["last_activity_at"] = self.clock()
            updated = await self.store.update_household(household["_id"], changes, session)
            if "residence_kind" in changes:
                await self.store.set_residence_kind(
                    household["_id"], changes["residence_kind"], session
                )
            # Whether a household is certified poor is not published, nor that it changed: the
            # topic is kept for ever. A change of that alone publishes nothing.
            published = [field for field in changed if field != "poor"]
            staged = (
                [events.household_updated(self.outbox, updated, published)] if published else []
            )
            return registry_pb2.UpdateHouseholdResponse(
                household=household_message(updated)
            ), staged

        return await self._command(
            "UpdateHousehold", request, registry_pb2.UpdateHouseholdResponse, work
        )

    async def GetHousehold(
        self, request: registry_pb2.GetHouseholdRequest, context: Context
    ) -> registry_pb2.GetHouseholdResponse:
        _required("household_id", request.household_id)
        # Both read at once: members are shown only once the household's scope is checked.
        found, residents = await self.store.household_with_members(request.household_id)
        household = _found(found, request.household_id)
        _may_read(principal(), household)
        members = await self._read_persons("GetHousehold", residents, [household["_id"]])
        head = next((m for m in members if m.person_id == household.get("head_person_id")), None)
        return registry_pb2.GetHouseholdResponse(
            household=household_message(household), head=head, members=members
        )

    async def GetHouseholdHistory(
        self, request: registry_pb2.GetHouseholdHistoryRequest, context: Context
    ) -> registry_pb2.GetHouseholdHistoryResponse:
        caller = principal()
        household = await self._household(request.household_id)
        _may_read(caller, household)
        history = await self.store.history_of(household["_id"])
        # Births, deaths and moves are personal data: logged, naming each person, before shown.
        named = dict.fromkeys(e["person_id"] for e in history if e.get("person_id"))
        shown = [{"_id": person_id, "household_id": household["_id"]} for person_id in named]
        await self.store.log_access(
            self._log_reads(caller, "GetHouseholdHistory", shown, [household["_id"]])
        )
        entries = [
            registry_pb2.HouseholdHistoryEntry(
                event_id=entry["event_id"],
                event_type=entry["event_type"],
                occurred_at=timestamp(entry["occurred_at"]),
                person_id=entry.get("person_id", ""),
                summary=entry["summary"],
                actor=entry.get("actor", ""),
            )
            for entry in history
        ]
        return registry_pb2.GetHouseholdHistoryResponse(entries=entries)

    async def VerifyHousehold(
        self, request: registry_pb2.VerifyHouseholdRequest, context: Context
    ) -> registry_pb2.VerifyHouseholdResponse:
        caller = principal()

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.VerifyHouseholdResponse, list[Document]]:
            household = await self._household(request.household_id, session=session)
            domain.may_keep(caller, household["unit_id"], f"household {household['_id']}")
            if not household["active"]:
                raise FailedPrecondition(f"household {household['_id']} is no longer active")
            now = self.clock()
            updated = await self.store.update_household(
                household["_id"],
                {
                    "last_verified_at": now,
                    "last_verified_by": caller.subject,
                    "last_activity_at": now,
                    "verification_note": request.note[:500],
                    "marked_absent": False,
                },
                session,
            )
            event = self.outbox.event(
                events_pb2.HouseholdVerified(
                    household_id=household["_id"],
                    unit_id=household["unit_id"],
                    verified_by=caller.subject,
                ),
                key=household["_id"],
            )
            return registry_pb2.VerifyHouseholdResponse(household=household_message(updated)), [
                event
            ]

        return await self._command(
            "VerifyHousehold", request, registry_pb2.VerifyHouseholdResponse, work
        )

    # ---- vital and residence events ------------------------------------------------------

    async def _add_person(
        self,
        method: str,
        request: Any,
        response_type: Any,
        details: registry_pb2.PersonDetails,
        detail_field: str,
        reason: int,
        extra: Document | None = None,
        relationship: int | None = None,
    ) -> Any:
        if not request.HasField(detail_field):
            raise InvalidArgument(detail_field, "is required")
        today = self.today()

        async def work(session: Session) -> tuple[Any, list[Document]]:
            household = await self._household(request.household_id, session=session)
            domain.may_keep(principal(), household["unit_id"], f"household {household['_id']}")
            if not household["active"]:
                raise FailedPrecondition(f"household {household['_id']} is no longer active")
            person = self.persons.document(
                details, household, today=today, field=detail_field, relationship=relationship
            )
            heads = person["relationship"] == registry_pb2.RELATIONSHIP_HEAD
            if heads and household.get("head_person_id"):
                raise FailedPrecondition(
                    "the household already has a head; change it with UpdateHousehold"
                )
            person.update(extra or {})
            await self._register(person, session)
            await self.store.touch_household(household["_id"], self.clock(), session)
            staged = [events.person_registered(self.outbox, person, reason)]
            if heads:  # a household whose head died or left has one again
                updated = await self.store.update_household(
                    household["_id"], {"head_person_id": person["_id"]}, session
                )
                staged.append(events.household_updated(self.outbox, updated, ["head_person_id"]))
            return response_type(
                person=self.persons.message(person, principal(), stored=True)
            ), staged

        # Answered with what the caller stated: no read of anything they did not know.
        return await self.commands.run(method, request, response_type, work)

    async def RegisterPerson(
        self, request: registry_pb2.RegisterPersonRequest, context: Context
    ) -> registry_pb2.RegisterPersonResponse:
        result: registry_pb2.RegisterPersonResponse = await self._add_person(
            "RegisterPerson",
            request,
            registry_pb2.RegisterPersonResponse,
            request.person,
            "person",
            events_pb2.REGISTRATION_REASON_MOVE_IN,
        )
        return result

    async def RegisterBirth(
        self, request: registry_pb2.RegisterBirthRequest, context: Context
    ) -> registry_pb2.RegisterBirthResponse:
        if request.child.relationship == registry_pb2.RELATIONSHIP_HEAD:
            # Else a household without a head would take the newborn for one.
            raise InvalidArgument("child.relationship", "a newborn is not the head of a household")
        result: registry_pb2.RegisterBirthResponse = await self._add_person(
            "RegisterBirth",
            request,
            registry_pb2.RegisterBirthResponse,
            request.child,
            "child",
            events_pb2.REGISTRATION_REASON_BIRTH,
            relationship=request.child.relationship or registry_pb2.RELATIONSHIP_CHILD,
        )
        return result

    async def RegisterTemporaryStay(
        self, request: registry_pb2.RegisterTemporaryStayRequest, context: Context
    ) -> registry_pb2.RegisterTemporaryStayResponse:
        start = domain.parse_date("stay_start", request.stay_start)
        end = domain.parse_date("stay_end", request.stay_end)
        assert start is not None and end is not None
        # A retry gets its first answer, though the stay registered has ended by now.
        stored = await self.commands.answered(
            "RegisterTemporaryStay", request, registry_pb2.RegisterTemporaryStayResponse
        )
        if stored is not None:
            return stored
        born = domain.parse_date("person.birth_date", request.person.birth_date, required=False)
        domain.check_stay(start, end, self.today(), born)
        result: registry_pb2.RegisterTemporaryStayResponse = await self._add_person(
            "RegisterTemporaryStay",
            request,
            registry_pb2.RegisterTemporaryStayResponse,
            request.person,
            "person",
            events_pb2.REGISTRATION_REASON_TEMPORARY_STAY,
            extra={
                "residence_kind": registry_pb2.RESIDENCE_KIND_TEMPORARY,
                "stay_start": start.isoformat(),
                "stay_end": end.isoformat(),
            },
        )
        return result

    async def ExtendTemporaryStay(
        self, request: registry_pb2.ExtendTemporaryStayRequest, context: Context
    ) -> registry_pb2.ExtendTemporaryStayResponse:
        end = domain.parse_date("stay_end", request.stay_end)
        assert end is not None
        today = self.today()

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.ExtendTemporaryStayResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            if not person.get("stay_end"):
                raise FailedPrecondition(f"person {person['_id']} is not on a temporary stay")
            # Its start stays as registered (and was checked against the birth date then); only
            # the guest's last day moves.
            domain.check_extension(date.fromisoformat(person["stay_start"]), end, today)
            if person["stay_end"] == end.isoformat():  # so registered already: nothing to tell
                return registry_pb2.ExtendTemporaryStayResponse(
                    person=self.persons.message(person, principal(), stored=True)
                ), []
            updated = await self.store.update_person(
                person["_id"], {"stay_end": end.isoformat()}, session
            )
            # A stay renewed is a residence event, as its registration was: a sign of life.
            await self.store.touch_household(person["household_id"], self.clock(), session)
            event = events.keyed_by_person(
                self.outbox,
                events_pb2.TemporaryStayExtended(
                    person_id=person["_id"],
                    household_id=person["household_id"],
                    unit_id=person["unit_id"],
                    stay_end=end.isoformat(),
                ),
                person["_id"],
            )
            return registry_pb2.ExtendTemporaryStayResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), [event]

        return await self._command(
            "ExtendTemporaryStay", request, registry_pb2.ExtendTemporaryStayResponse, work
        )

    async def _leave(
        self,
        session: Session,
        person: Document,
        changes: Document,
        message: Any,
    ) -> tuple[Document, list[Document]]:
        """Ends a person's residence in their household (death, moving away or elsewhere)."""
        updated = await self.store.update_person(person["_id"], changes, session)
        staged = [events.keyed_by_person(self.outbox, message, person["_id"])]
        household = await self._household(person["household_id"], session=session)
        now = self.clock()
        if household.get("head_person_id") == person["_id"]:
            household = await self.store.update_household(
                household["_id"], {"head_person_id": "", "last_activity_at": now}, session
            )
            staged.append(events.household_updated(self.outbox, household, ["head_person_id"]))
        else:
            await self.store.touch_household(household["_id"], now, session)
        return updated, staged

    async def RegisterDeath(
        self, request: registry_pb2.RegisterDeathRequest, context: Context
    ) -> registry_pb2.RegisterDeathResponse:
        died = domain.parse_date("death_date", request.death_date)
        assert died is not None
        if died > self.today():
            raise InvalidArgument("death_date", "is in the future")

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.RegisterDeathResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            if died.isoformat() < person["birth_date"]:
                raise InvalidArgument("death_date", "is before the birth date")
            message = events_pb2.PersonDied(
                person_id=person["_id"],
                household_id=person["household_id"],
                unit_id=person["unit_id"],
                death_date=died.isoformat(),
            )
            updated, staged = await self._leave(
                session,
                person,
                {"status": PERSON_DECEASED, "death_date": died.isoformat()},
                message,
            )
            return registry_pb2.RegisterDeathResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), staged

        return await self._command(
            "RegisterDeath", request, registry_pb2.RegisterDeathResponse, work
        )

    async def MoveOut(
        self, request: registry_pb2.MoveOutRequest, context: Context
    ) -> registry_pb2.MoveOutResponse:
        async def work(session: Session) -> tuple[registry_pb2.MoveOutResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            message = events_pb2.PersonMovedOut(
                person_id=person["_id"],
                household_id=person["household_id"],
                unit_id=person["unit_id"],
            )
            updated, staged = await self._leave(
                session,
                person,
                {"status": PERSON_MOVED_OUT, "moved_out_to": request.destination[:200]},
                message,
            )
            return registry_pb2.MoveOutResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), staged

        return await self._command("MoveOut", request, registry_pb2.MoveOutResponse, work)

    async def MovePerson(
        self, request: registry_pb2.MovePersonRequest, context: Context
    ) -> registry_pb2.MovePersonResponse:
        relationship = check_enum("relationship", request.relationship, registry_pb2.Relationship)
        if relationship == registry_pb2.RELATIONSHIP_HEAD:
            raise InvalidArgument(
                "relationship", "move as a member, then make head with UpdateHousehold"
            )

        async def work(session: Session) -> tuple[registry_pb2.MovePersonResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            target = await self._household(request.to_household_id, "to_household_id", session)
            domain.may_keep(principal(), target["unit_id"], f"household {target['_id']}")
            if target["_id"] == person["household_id"]:
                raise FailedPrecondition("the person already lives in that household")
            if not target["active"]:
                raise FailedPrecondition(f"household {target['_id']} is no longer active")
            message = events_pb2.PersonMoved(
                person_id=person["_id"],
                from_household_id=person["household_id"],
                to_household_id=target["_id"],
                from_unit_id=person["unit_id"],
                to_unit_id=target["unit_id"],
            )
            changes = {
                "household_id": target["_id"],
                "unit_id": target["unit_id"],
                "relationship": relationship,
                # Someone on a temporary stay stays temporary wherever they stay: the stay ends on
                # its date, not by a move.
                "residence_kind": person["residence_kind"]
                if person.get("stay_end")
                else target["residence_kind"],
                "renter": target["residence_kind"] == registry_pb2.RESIDENCE_KIND_RENTER,
            }
            # Moving in is evidence that they live there: a mark of absence from where they
            # were does not follow them.
            absent = person.get("marked_absent", False)
            if absent:
                changes |= {"marked_absent": False, "absence_note": ""}
            updated, staged = await self._leave(session, person, changes, message)
            await self.store.touch_household(target["_id"], self.clock(), session)
            if absent:
                # Told as the mark's own event, after the move on the person's partition, so
                # that every consumer (those built before moves cleared it too) clears it.
                staged.append(events.person_marked_absent(self.outbox, updated, absent=False))
            return registry_pb2.MovePersonResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), staged

        return await self._command("MovePerson", request, registry_pb2.MovePersonResponse, work)

    async def MarkPersonAbsent(
        self, request: registry_pb2.MarkPersonAbsentRequest, context: Context
    ) -> registry_pb2.MarkPersonAbsentResponse:
        async def work(
            session: Session,
        ) -> tuple[registry_pb2.MarkPersonAbsentResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            updated = await self.store.update_person(
                person["_id"],
                {"marked_absent": request.absent, "absence_note": request.note[:500]},
                session,
            )
            event = events.person_marked_absent(self.outbox, person, absent=request.absent)
            # Marked as they already were (a retry, say): the note may change, the mark did not.
            unchanged = person.get("marked_absent", False) == request.absent
            return registry_pb2.MarkPersonAbsentResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), [] if unchanged else [event]

        return await self._command(
            "MarkPersonAbsent", request, registry_pb2.MarkPersonAbsentResponse, work
        )

    async def UpdatePerson(
        self, request: registry_pb2.UpdatePersonRequest, context: Context
    ) -> registry_pb2.UpdatePersonResponse:
        fields = domain.fields_to_update(request.update_fields, PERSON_FIELDS)
        if not request.HasField("person"):
            raise InvalidArgument("person", "is required")
        if "citizen_id" in fields and not request.person.citizen_id.strip():
            raise InvalidArgument("person.citizen_id", "is for life: correct it, never remove it")
        today = self.today()

        async def work(
            session: Session,
        ) -> tuple[registry_pb2.UpdatePersonResponse, list[Document]]:
            person = await self._resident(request.person_id, session)
            # The named fields over those on record, checked together as a registration is: a
            # citizen ID against a corrected birth year or sex too.
            stated = self.persons.details(person)
            for name in fields:
                if name == "contact":
                    stated.contact.CopyFrom(request.person.contact)
                else:
                    setattr(stated, name, getattr(request.person, name))
            household = {
                "_id": person["household_id"],
                "unit_id": person["unit_id"],
                "residence_kind": person["residence_kind"],
            }
            try:
                corrected = self.persons.document(
                    stated,
                    household,
                    today=today,
                    field="person",
                    # A former head's relationship may be unknown yet: required only when named.
                    relationship=None
                    if "relationship" in fields
                    else person["relationship"] or registry_pb2.RELATIONSHIP_OTHER_RELATIVE,
                )
            except InvalidArgument as error:
                if error.field == "person.full_name" and "full_name" not in fields:
                    # Registered before names were checked: corrected with this change, or none.
                    raise InvalidArgument(
                        "person.full_name", f"the name on record {error.problem}: correct it too"
                    ) from None
                if error.field != "person.citizen_id" or "citizen_id" in fields:
                    raise
                # The ID on record is not what was asked to change: the correction is wrong.
                named = "birth_date" if "birth_date" in fields else "sex"
                raise InvalidArgument(
                    f"person.{named}", f"the citizen ID on record {error.problem}"
                ) from None
            heads = registry_pb2.RELATIONSHIP_HEAD
            if "relationship" in fields and (corrected["relationship"] == heads) != (
                person["relationship"] == heads
            ):
                raise InvalidArgument(
                    "person.relationship", "the head is changed with UpdateHousehold"
                )
            # Sealed anew each time: a citizen ID is the same one when its hash is.
            same_id = corrected["cid_hash"] == person.get("cid_hash")
            changed = [
                name
                for name in fields
                if not (name == "citizen_id" and same_id)
                and any(corrected[key] != person.get(key) for key in PERSON_FIELDS[name])
            ]
            if not changed:
                return registry_pb2.UpdatePersonResponse(
                    person=self.persons.message(person, principal(), stored=True)
                ), []
            if "citizen_id" in changed:
                holder = await self.store.person_by_cid(corrected["cid_hash"], session)
                if holder is not None:
                    raise AlreadyExists("person.citizen_id: is registered to another person")
            updated = await self.store.update_person(
                person["_id"],
                {key: corrected[key] for name in changed for key in PERSON_FIELDS[name]},
                session,
            )
            # Whether someone is a war invalid is not published (the topic is kept for ever): a
            # change of that alone publishes nothing.
            published = [name for name in changed if name != "war_invalid"]
            staged = [events.person_updated(self.outbox, updated, published)] if published else []
            return registry_pb2.UpdatePersonResponse(
                person=self.persons.message(updated, principal(), stored=True)
            ), staged

        return await self._command("UpdatePerson", request, registry_pb2.UpdatePersonResponse, work)

    # ---- queries -------------------------------------------------------------------------

    async def GetPerson(
        self, request: registry_pb2.GetPersonRequest, context: Context
    ) -> registry_pb2.GetPersonResponse:
        if not request.person_id:
            raise InvalidArgument("person_id", "is required")
        person = await self.store.person(request.person_id)
        if person is None:
            raise NotFound(f"person {request.person_id} not found")
        domain.may_read_household(
            principal(), person["unit_id"], person["household_id"], f"person {person['_id']}"
        )
        [message] = await self._read_persons("GetPerson", [person])
        return registry_pb2.GetPersonResponse(person=message)

    async def FindPersonByCitizenId(
        self, request: registry_pb2.FindPersonByCitizenIdRequest, context: Context
    ) -> registry_pb2.FindPersonByCitizenIdResponse:
        caller = principal()
        domain.may_read_people(caller, caller.scope)
        cid = domain.check_citizen_id(request.citizen_id, None, 0)
        person = await self.store.person_by_cid(self.persons.vault.lookup_hash(cid))
        # Outside the caller's scope looks the same as absent: existence is personal data too.
        if person is None or not caller.covers(person["unit_id"]):
            raise NotFound("no person with this citizen_id in your scope")
        [message] = await self._read_persons("FindPersonByCitizenId", [person])
        return registry_pb2.FindPersonByCitizenIdResponse(person=message)

    async def SearchPersons(
        self, request: registry_pb2.SearchPersonsRequest, context: Context
    ) -> registry_pb2.SearchPersonsResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        domain.may_read_people(caller, unit_id)
        await self._still_standing(unit_id, request.page.page_token)
        as_of = domain.parse_date("as_of", request.as_of, required=False)
        # Who lives here, and ages without as_of, on the first page's day: nobody's stay ends,
        # nor anybody comes of age, between two pages.
        listing = ClockedListing(request.page.page_token, self.clock())
        today = domain.local_date(listing.now)
        as_of = as_of or today
        max_age = request.max_age if request.HasField("max_age") else None
        born_from, born_to = domain.birth_dates_for_ages(request.min_age, max_age, as_of)
        if request.sex and request.sex not in registry_pb2.Sex.values():
            raise InvalidArgument("sex", "is not a known value")
        # Searched as a name is written: bounded, no control characters (nor a NUL in a pattern).
        name = domain.normalize_name("name", request.name) if request.name.strip() else ""
        found, token = await self.store.search_persons(
            unit_id,
            name_folded=domain.fold(name),
            born_from=born_from,
            born_to=born_to,
            sex=request.sex,
            today=today.isoformat(),
            listing=listing,
            size=page_size(request.page.page_size),
        )
        return registry_pb2.SearchPersonsResponse(
            persons=await self._read_persons("SearchPersons", found), next_page_token=token
        )

    async def CountByUnit(
        self, request: registry_pb2.CountByUnitRequest, context: Context
    ) -> registry_pb2.CountByUnitResponse:
        unit = await self._unit(request.unit_id)
        domain.may_count(principal(), unit["_id"])
        by_group = await self.store.counts_by_group(unit["_id"], self.today().isoformat())
        children = await self.store.child_units(unit["_id"], include_inactive=False)
        names = {child["_id"]: child["name"] for child in children}
        totals: dict[str, dict[str, int]] = {child_id: {} for child_id in names}
        total: dict[str, int] = {}
        for group_id, counts in by_group.items():
            child_id = _child_containing(unit["_id"], group_id)
            for bucket in (total, totals.setdefault(child_id, {}) if child_id else None):
                if bucket is None:
                    continue
                for key, value in counts.items():
                    bucket[key] = bucket.get(key, 0) + value

        def message(unit_id: str, name: str, counts: dict[str, int]) -> registry_pb2.UnitCount:
            return registry_pb2.UnitCount(unit_id=unit_id, name=name, **counts)

        return registry_pb2.CountByUnitResponse(
            total=message(unit["_id"], unit["name"], total),
            children=[
                message(child_id, names.get(child_id, ""), counts)
                for child_id, counts in sorted(totals.items())
            ],
        )

    async def ListOverdueVerifications(
        self, request: registry_pb2.ListOverdueVerificationsRequest, context: Context
    ) -> registry_pb2.ListOverdueVerificationsResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        domain.may_register(caller, unit_id)
        await self._still_standing(unit_id, request.page.page_token)
        # Overdue as of the first page's clock, so that the cutoff stays where it was for
        # every page.
        listing = ClockedListing(request.page.page_token, self.clock())
        households, token = await self.store.overdue_households(
            unit_id,
            domain.verified_before(listing.now, request.max_age_days),
            listing,
            page_size(request.page.page_size),
        )
        return registry_pb2.ListOverdueVerificationsResponse(
            households=await self._households_read(caller, "ListOverdueVerifications", households),
            next_page_token=token,
        )

    async def ListHouseholdsWithoutHead(
        self, request: registry_pb2.ListHouseholdsWithoutHeadRequest, context: Context
    ) -> registry_pb2.ListHouseholdsWithoutHeadResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        domain.may_register(caller, unit_id)
        await self._still_standing(unit_id, request.page.page_token)
        households, token = await self.store.headless_households(
            unit_id, UnitListing(request.page.page_token), page_size(request.page.page_size)
        )
        return registry_pb2.ListHouseholdsWithoutHeadResponse(
            households=await self._households_read(caller, "ListHouseholdsWithoutHead", households),
            next_page_token=token,
        )

    async def _households_read(
        self, caller: Principal, action: str, households: list[Document]
    ) -> list[registry_pb2.Household]:
        """Households listed to an official: their own data (address, place), logged."""
        listed = [h["_id"] for h in households]
        await self.store.log_access(self._log_reads(caller, action, [], listed))
        return [household_message(h) for h in households]

    async def ListSuspectedVirtualResidents(
        self, request: registry_pb2.ListSuspectedVirtualResidentsRequest, context: Context
    ) -> registry_pb2.ListSuspectedVirtualResidentsResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        domain.may_register(caller, unit_id)
        await self._still_standing(unit_id, request.page.page_token)
        # Who is suspected, and why, as of the first page: its register and its clock.
        listing = ClockedListing(request.page.page_token, self.clock())
        since = domain.inactive_since(listing.now, request.inactive_days)
        today = domain.local_date(listing.now).isoformat()
        persons, suspect_households, token = await self.store.suspects_page(
            unit_id, since, today, listing, page_size(request.page.page_size)
        )
        messages = await self._read_persons("ListSuspectedVirtualResidents", persons)
        residents = []
        for person, message in zip(persons, messages, strict=True):
            reasons = []
            if person.get("marked_absent"):
                reasons.append(registry_pb2.VIRTUAL_RESIDENT_REASON_MARKED_ABSENT)
            household_absent = suspect_households.get(person["household_id"])
            if household_absent:
                reasons.append(registry_pb2.VIRTUAL_RESIDENT_REASON_HOUSEHOLD_MARKED_ABSENT)
            elif household_absent is False:
                reasons.append(registry_pb2.VIRTUAL_RESIDENT_REASON_NOT_VERIFIED)
            if domain.stay_has_ended(person, today):
                reasons.append(registry_pb2.VIRTUAL_RESIDENT_REASON_STAY_EXPIRED)
            residents.append(registry_pb2.SuspectedVirtualResident(person=message, reasons=reasons))
        return registry_pb2.ListSuspectedVirtualResidentsResponse(
            residents=residents, next_page_token=token
        )

    async def ListLikelyDuplicatePersons(
        self, request: registry_pb2.ListLikelyDuplicatePersonsRequest, context: Context
    ) -> registry_pb2.ListLikelyDuplicatePersonsResponse:
        caller = principal()
        unit_id = request.unit_id or caller.scope
        domain.may_register(caller, unit_id)
        await self._still_standing(unit_id, request.page.page_token)
        paged = request.HasField("page")
        size = page_size(request.page.page_size) if paged else domain.MAX_UNPAGED_DUPLICATES
        groups, token = await self.store.likely_duplicates(
            unit_id, UnitListing(request.page.page_token), size
        )
        if token and not paged:
            # Not a silent first part: a caller that does not page would take it for the whole.
            raise FailedPrecondition(
                f"page: the unit has more than {size} groups of likely duplicates; ask for "
                "them page by page"
            )
        shown = iter(
            await self._read_persons(
                "ListLikelyDuplicatePersons", [person for group in groups for person in group]
            )
        )
        return registry_pb2.ListLikelyDuplicatePersonsResponse(
            duplicates=[
                registry_pb2.LikelyDuplicate(persons=[next(shown) for _ in group])
                for group in groups
            ],
            next_page_token=token,
        )

    async def ListAccessLog(
        self, request: registry_pb2.ListAccessLogRequest, context: Context
    ) -> registry_pb2.ListAccessLogResponse:
        caller = principal()
        household = await self._household(request.household_id)
        if caller.role is Role.AUDITOR:
            if not caller.covers(household["unit_id"]):
                raise NotFound(f"household {household['_id']} not found")
        else:
            caller.require_role(Role.RESIDENT)
            _may_read(caller, household)
        token = request.page.page_token
        # A person's reads are their household's now: made while they lived elsewhere, they
        # are listed here, and no longer where they lived then.
        members = set(await self.store.person_ids_of(household["_id"]))
        try:
            records, next_page = await self.store.access_entries(
                household["_id"], sorted(members), token, page_size(request.page.page_size)
            )
        except InvalidId:
            raise InvalidArgument("page.page_token", "is not a token this service issued") from None

        def ours(record: Document, person: Document) -> bool:
            if person["person_id"]:
                return person["person_id"] in members
            return bool(record["household_id"] == household["_id"])  # the household's own data

        return registry_pb2.ListAccessLogResponse(
            entries=[
                registry_pb2.AccessLogEntry(
                    at=timestamp(record["at"]),
                    actor=record["actor"],
                    actor_role=record["actor_role"],
                    person_id=person["person_id"],
                    action=record["action"],
                    purpose=record["purpose"],
                    citizen_id_shown=person["citizen_id_shown"],
                )
                for record in records
                for person in _persons_read(record)
                if ours(record, person)
            ],
            next_page_token=next_page,
        )

    async def ListHouseholdSummaries(
        self, request: registry_pb2.ListHouseholdSummariesRequest, context: Context
    ) -> registry_pb2.ListHouseholdSummariesResponse:
        caller = principal()
        if not request.unit_id:
            raise InvalidArgument("unit_id", "is required")
        domain.may_list_households(caller, request.unit_id)
        if len(request.household_ids) > MAX_SUMMARIES_NAMED:
            raise InvalidArgument("household_ids", f"at most {MAX_SUMMARIES_NAMED}")
        for i, household_id in enumerate(request.household_ids):
            _required(f"household_ids[{i}]", household_id)
        # Who lives in each household as of the first page's day: one levy's households are
        # all counted by the same day's rule, though its pages are read across midnight.
        listing = ClockedListing(request.page.page_token, self.clock())
        households, next_page = await self.store.households_page(
            request.unit_id, listing, page_size(request.page.page_size), request.household_ids
        )
        today = domain.local_date(listing.now).isoformat()
        summaries, heads = [], []
        for household in households:
            residents = household["residents"]
            head = next((p for p in residents if p["_id"] == household.get("head_person_id")), None)
            if head is not None:
                heads.append(head)
            # A levy counts those who live here, as the census does: not a guest whose stay
            # has ended or is yet to begin.
            living = [p for p in residents if domain.lives_here(p, today)]
            summaries.append(
                registry_pb2.HouseholdSummary(
                    household_id=household["_id"],
                    unit_id=household["unit_id"],
                    head_name=head["full_name"] if head else "",
                    residents=len(living),
                    poor=household.get("poor", False),
                    war_invalid_member=any(p.get("war_invalid") for p in living),
                )
            )
        # The heads' names are personal data read by an official (or for one): logged. A
        # summary holds no citizen ID, so none is recorded as shown.
        await self.store.log_access(
            self._log_reads(
                caller,
                "ListHouseholdSummaries",
                heads,
                [h["_id"] for h in households],
                shows_citizen_ids=False,
            )
        )
        return registry_pb2.ListHouseholdSummariesResponse(
            households=summaries, next_page_token=next_page
        )

    async def ImportPersons(
        self, request_iterator: AsyncIterator[registry_pb2.ImportPersonsRequest], context: Context
    ) -> registry_pb2.ImportPersonsResponse:
        caller = principal()
        domain.may_import(caller)  # before the started header: refused, nothing was imported
        await context.send_initial_metadata(((STARTED_HEADER, "1"),))
        return await self.importer.run(caller, request_iterator)


def _child_containing(parent_id: str, unit_id: str) -> str:
    """The child of parent_id on the path down to unit_id ("" when unit_id is the parent)."""
    if unit_id == parent_id:
        return ""
    rest = unit_id[len(parent_id) + 1 :]
    return f"{parent_id}.{rest.split('.')[0]}"


def _required(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "is required")


def _may_read(caller: Principal, household: Document) -> None:
    domain.may_read_household(
        caller, household["unit_id"], household["_id"], f"household {household['_id']}"
    )


def _found(household: Document | None, household_id: str) -> Document:
    if household is None:
        raise NotFound(f"household {household_id} not found")
    return household


def _persons_read(record: Document) -> list[Document]:
    """The persons an access-log record names; one entry without a person for a read of the
    household's own data only. Records written before reads were grouped name one person each."""
    if record.get("persons"):
        return list(record["persons"])
    return [
        {
            "person_id": record.get("person_id", ""),
            "citizen_id_shown": record.get("citizen_id_shown", False),
        }
    ]
