"""Who sees and handles which tickets (a ticket outside a caller's scope looks absent), and bad
input of each kind refused with the right status code, with nothing written."""

from __future__ import annotations

import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from civic.common.v1 import types_pb2
from civic.registry.v1 import registry_pb2
from civic.tickets.v1 import tickets_pb2

from services.common.auth import Role
from services.common.mongo import in_unit
from services.tickets import domain
from services.tickets.domain import Status
from services.tickets.main import TicketsService
from tests.registry_fixtures import create_unit, new_household
from tests.tickets.conftest import Pilot, TicketCaller, eventually, rid


async def refused(code: grpc.StatusCode, call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return caught.value


async def get(caller: TicketCaller, ticket_id: str) -> tickets_pb2.Ticket:
    response = await caller.GetTicket(tickets_pb2.GetTicketRequest(ticket_id=ticket_id))
    ticket: tickets_pb2.Ticket = response.ticket
    return ticket


async def acknowledge(caller: TicketCaller, ticket_id: str) -> tickets_pb2.Ticket:
    response = await caller.AcknowledgeTicket(
        tickets_pb2.AcknowledgeTicketRequest(request_id=rid(), ticket_id=ticket_id)
    )
    ticket: tickets_pb2.Ticket = response.ticket
    return ticket


async def test_a_ward_officer_never_sees_another_wards_tickets(pilot: Pilot) -> None:
    city = pilot.city
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    stranger = pilot.caller(Role.WARD_OFFICER, f"{city.district}.other")

    # Outside the caller's scope a ticket looks as if it did not exist.
    await refused(grpc.StatusCode.NOT_FOUND, get(stranger, ticket_id))
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        stranger.ListQueue(tickets_pb2.ListQueueRequest(unit_id=city.ward)),
    )
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        stranger.GetStatistics(tickets_pb2.GetStatisticsRequest(unit_id=city.ward)),
    )
    own = await stranger.ListQueue(tickets_pb2.ListQueueRequest())
    assert ticket_id not in {t.ticket_id for t in own.tickets}
    # Nor may it be acted on: the answer does not tell it exists, nor who handles it.
    await refused(grpc.StatusCode.NOT_FOUND, acknowledge(stranger, ticket_id))

    # Another resident of the same group, even of the same household, sees only their own.
    await refused(grpc.StatusCode.NOT_FOUND, get(pilot.neighbour, ticket_id))
    await refused(
        grpc.StatusCode.PERMISSION_DENIED, pilot.neighbour.ListQueue(tickets_pb2.ListQueueRequest())
    )

    # The group's treasurer keeps its funds and sees no residents' tickets.
    treasurer = pilot.caller(Role.TREASURER, city.group)
    await refused(grpc.StatusCode.NOT_FOUND, get(treasurer, ticket_id))

    # Everyone in scope sees it: the submitter, and officials of the group, ward and above.
    for caller in (pilot.resident, pilot.leader, pilot.ward_officer, pilot.district_officer):
        assert (await get(caller, ticket_id)).ticket_id == ticket_id
    assert (await get(pilot.resident, ticket_id)).status == tickets_pb2.TICKET_STATUS_ROUTED


async def test_a_comment_on_a_ticket_out_of_sight_finds_no_ticket(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """Commenting is acting on the ticket: to a caller who may not see it, it is not there, and
    the refusal does not name the unit that handles it. One who sees it but may not comment (an
    auditor) is told so."""
    ticket_id = (await pilot.routed((await pilot.submit("health")).ticket_id)).ticket_id
    stored = await tickets_service.store.get(ticket_id)

    async def comment(caller: TicketCaller) -> Any:
        return await caller.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text="xin chào")
        )

    stranger = pilot.caller(Role.WARD_OFFICER, f"{pilot.city.district}.other")
    for outsider in (stranger, pilot.neighbour):
        error = await refused(grpc.StatusCode.NOT_FOUND, comment(outsider))
        assert pilot.city.ward not in (error.details() or "")
    await refused(
        grpc.StatusCode.PERMISSION_DENIED, comment(pilot.caller(Role.AUDITOR, pilot.city.ward))
    )
    assert await tickets_service.store.get(ticket_id) == stored


async def test_a_group_leader_may_not_handle_a_ward_ticket_the_district_may(
    pilot: Pilot,
) -> None:
    ticket_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id

    await refused(grpc.StatusCode.PERMISSION_DENIED, acknowledge(pilot.leader, ticket_id))
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        pilot.leader.ResolveTicket(
            tickets_pb2.ResolveTicketRequest(
                request_id=rid(), ticket_id=ticket_id, resolution="xong"
            )
        ),
    )
    # Residents handle nothing, not even their own tickets.
    await refused(grpc.StatusCode.PERMISSION_DENIED, acknowledge(pilot.resident, ticket_id))
    assert (await get(pilot.resident, ticket_id)).status == tickets_pb2.TICKET_STATUS_ROUTED

    # Officials above the assigned unit may act on it, without it leaving the ward.
    acknowledged = await acknowledge(pilot.district_officer, ticket_id)
    assert acknowledged.status == tickets_pb2.TICKET_STATUS_ACKNOWLEDGED
    assert acknowledged.assigned_unit_id == pilot.city.ward

    # A group-level ticket is the group leader's to handle.
    sanitation = (await pilot.routed((await pilot.submit("sanitation")).ticket_id)).ticket_id
    assert (await acknowledge(pilot.leader, sanitation)).assigned_unit_id == pilot.city.group
    other_leader = pilot.caller(Role.GROUP_LEADER, pilot.city.other_group)
    await refused(grpc.StatusCode.NOT_FOUND, get(other_leader, sanitation))


# ---- bad input --------------------------------------------------------------------------------


async def footprint(service: TicketsService) -> tuple[int, ...]:
    """How many documents every collection a command writes holds, once the service is quiet."""
    db = service.db

    async def routed_all() -> bool:
        return await db["tickets"].count_documents({"status": int(Status.SUBMITTED)}) == 0

    await eventually(routed_all)
    return tuple(
        [
            await db[name].count_documents({})
            for name in ("tickets", "outbox", "commands", "routing_rules")
        ]
    )


def submission(**fields: Any) -> tickets_pb2.SubmitTicketRequest:
    request = {
        "request_id": rid(),
        "category": "street-light",
        "description": "Đèn đường hỏng",
    }
    return tickets_pb2.SubmitTicketRequest(**(request | fields))


Call = Callable[[Pilot, str], Awaitable[Any]]


def as_resident(**fields: Any) -> Call:
    return lambda pilot, other_household: pilot.resident.SubmitTicket(submission(**fields))


def as_ward_officer(**fields: Any) -> Call:
    return lambda pilot, other_household: pilot.ward_officer.SubmitTicket(submission(**fields))


BAD_SUBMISSIONS: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("no request id", as_resident(request_id=""), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
    (
        "blank description",
        as_resident(description=" \n "),
        grpc.StatusCode.INVALID_ARGUMENT,
        "description",
    ),
    (
        "description too long",
        as_resident(description="x" * 4001),
        grpc.StatusCode.INVALID_ARGUMENT,
        "description",
    ),
    (
        "unknown category",
        as_resident(category="pothole"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "category",
    ),
    ("no category", as_resident(category=""), grpc.StatusCode.INVALID_ARGUMENT, "category"),
    (
        "latitude out of range",
        as_resident(location=types_pb2.GeoPoint(latitude=91, longitude=108.2)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "location.latitude",
    ),
    (
        "longitude out of range",
        as_resident(location=types_pb2.GeoPoint(latitude=16.07, longitude=-181)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "location.longitude",
    ),
    (
        "a place off the map, as a phone without a fix sends it",
        as_resident(location=types_pb2.GeoPoint(latitude=0, longitude=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "location",
    ),
    (
        "someone else's household",
        lambda pilot, other: pilot.resident.SubmitTicket(submission(household_id=other)),
        grpc.StatusCode.PERMISSION_DENIED,
        "own household",
    ),
    (
        "official naming no group",
        as_ward_officer(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unit_id",
    ),
    (
        "official naming a ward",
        lambda pilot, other: pilot.ward_officer.SubmitTicket(submission(unit_id=pilot.city.ward)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unit_id",
    ),
    (
        "official naming a group misspelt",
        lambda pilot, other: pilot.ward_officer.SubmitTicket(
            submission(unit_id=pilot.city.group.upper())
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unit_id",
    ),
    (
        "official outside their scope",
        lambda pilot, other: pilot.leader.SubmitTicket(submission(unit_id=pilot.city.other_group)),
        grpc.StatusCode.PERMISSION_DENIED,
        "outside your scope",
    ),
    (
        "unknown household",
        as_ward_officer(household_id="hh-does-not-exist"),
        grpc.StatusCode.NOT_FOUND,
        "hh-does-not-exist",
    ),
    (
        "unknown group",
        lambda pilot, other: pilot.ward_officer.SubmitTicket(
            submission(unit_id=f"{pilot.city.ward}.nope")
        ),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
]


@pytest.mark.parametrize(
    ("call", "code", "mentions"),
    [case[1:] for case in BAD_SUBMISSIONS],
    ids=[case[0] for case in BAD_SUBMISSIONS],
)
async def test_a_bad_submission_is_refused_and_writes_nothing(
    pilot: Pilot,
    tickets_service: TicketsService,
    call: Call,
    code: grpc.StatusCode,
    mentions: str,
) -> None:
    other = await new_household(pilot.city.other_leader, pilot.city.other_group)
    before = await footprint(tickets_service)

    error = await refused(code, call(pilot, other.household.household_id))

    assert mentions in (error.details() or "")
    assert await footprint(tickets_service) == before
    in_city = {"origin_unit_id": in_unit(pilot.city.city)}
    assert await tickets_service.db["tickets"].count_documents(in_city) == 0


async def test_an_official_cannot_tell_a_household_out_of_scope_from_one_that_is_not_there(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A household outside the caller's scope is answered as one that does not exist; a caller
    who may not file at all is told that, whichever household it names."""
    other = (await new_household(pilot.city.other_leader, pilot.city.other_group)).household
    await eventually(lambda: tickets_service.store.household(other.household_id))
    missing = "hh-000000000000000000000000"
    before = await footprint(tickets_service)

    async def answer(caller: TicketCaller, household_id: str) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await caller.SubmitTicket(submission(household_id=household_id))
        return caught.value.code(), (caught.value.details() or "").replace(household_id, "…")

    for caller, code in [
        (pilot.leader, grpc.StatusCode.NOT_FOUND),
        (
            pilot.caller(Role.WARD_OFFICER, f"{pilot.city.district}.other"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (pilot.caller(Role.TREASURER, pilot.city.city), grpc.StatusCode.PERMISSION_DENIED),
    ]:
        outside, absent = await answer(caller, other.household_id), await answer(caller, missing)
        assert outside == absent
        assert outside[0] == code, outside
    assert await footprint(tickets_service) == before


async def test_a_filing_for_a_merged_group_lands_only_where_the_caller_may_file(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    """A filing naming a group merged away goes to the group it was merged into; the caller's
    scope must hold that group too, or a merge across wards would let a ward officer file into
    another ward."""
    city, admin = pilot.city, pilot.city.admin
    retired = await create_unit(admin, city.ward, "g19", "Tổ 19", registry_pb2.UNIT_KIND_GROUP)
    ward = await create_unit(admin, city.district, "hc2", "Hải Châu 2", registry_pb2.UNIT_KIND_WARD)
    there = await create_unit(admin, ward, "g1", "Tổ 1", registry_pb2.UNIT_KIND_GROUP)
    await admin.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=retired, target_unit_id=there
        )
    )

    async def merged() -> bool:
        unit = await tickets_service.store.unit(retired)
        return unit is not None and unit.get("merged_into_id") == there

    await eventually(merged)
    before = await footprint(tickets_service)

    for caller in (pilot.ward_officer, pilot.caller(Role.WARD_OFFICER, ward)):
        await refused(
            grpc.StatusCode.PERMISSION_DENIED, caller.SubmitTicket(submission(unit_id=retired))
        )
    assert await footprint(tickets_service) == before
    # Their district holds both groups.
    filed = await pilot.submit(caller=pilot.district_officer, unit_id=retired)
    assert filed.origin_unit_id == there


@pytest.mark.parametrize(
    ("statuses", "overdue_only"),
    [([0], False), ([tickets_pb2.TICKET_STATUS_ROUTED, 99], False), ([99], True)],
    ids=["unspecified", "unknown", "unknown-overdue"],
)
async def test_a_queue_asked_for_an_unknown_status_is_refused(
    pilot: Pilot, statuses: list[tickets_pb2.TicketStatus.ValueType], overdue_only: bool
) -> None:
    """Not an empty queue, which would read as "nothing to do"."""
    error = await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.ward_officer.ListQueue(
            tickets_pb2.ListQueueRequest(statuses=statuses, overdue_only=overdue_only)
        ),
    )
    assert (error.details() or "").startswith("statuses["), error.details()


@pytest.mark.parametrize(
    ("field", "value"),
    [("category", "Street Light"), ("category", "đèn-đường"), ("department", "Urban Order")],
    ids=["category-words", "category-accented", "department-words"],
)
async def test_a_queue_filter_no_ticket_could_match_is_refused(
    pilot: Pilot, field: str, value: str
) -> None:
    """A category or department spelt as none can be is a mistake, not an empty queue, which
    would read as "nothing to do"; the live watch refuses such a department alike."""
    await pilot.routed((await pilot.submit("street-light")).ticket_id)
    listing = tickets_pb2.ListQueueRequest()
    setattr(listing, field, value)
    error = await refused(grpc.StatusCode.INVALID_ARGUMENT, pilot.ward_officer.ListQueue(listing))
    assert (error.details() or "").startswith(field), error.details()
    if field == "department":
        watch = pilot.ward_officer.WatchQueue(tickets_pb2.WatchQueueRequest(department=value))
        error = await refused(grpc.StatusCode.INVALID_ARGUMENT, watch.read())
        assert (error.details() or "").startswith(field), error.details()


async def test_a_queue_of_a_unit_that_does_not_exist_is_refused(pilot: Pilot) -> None:
    """A unit mistyped (group 71 for 17) is not an empty queue, nor a watch that never tells."""
    officer = pilot.ward_officer
    typo = f"{pilot.city.ward}.t71"
    error = await refused(
        grpc.StatusCode.NOT_FOUND, officer.ListQueue(tickets_pb2.ListQueueRequest(unit_id=typo))
    )
    assert typo in (error.details() or "")
    watch = officer.WatchQueue(tickets_pb2.WatchQueueRequest(unit_id=typo))
    await refused(grpc.StatusCode.NOT_FOUND, watch.read())
    malformed = officer.ListQueue(tickets_pb2.ListQueueRequest(unit_id=f"{pilot.city.ward}..t"))
    error = await refused(grpc.StatusCode.INVALID_ARGUMENT, malformed)
    assert (error.details() or "").startswith("unit_id"), error.details()
    # The units that exist answer as before.
    await officer.ListQueue(tickets_pb2.ListQueueRequest(unit_id=pilot.city.group))


async def test_statistics_of_a_unit_that_does_not_exist_are_refused(pilot: Pilot) -> None:
    """A dashboard asking for a mistyped unit is told so, not shown figures of nothing."""
    admin = pilot.admin

    async def statistics(unit_id: str) -> tickets_pb2.GetStatisticsResponse:
        request = tickets_pb2.GetStatisticsRequest(unit_id=unit_id)
        response: tickets_pb2.GetStatisticsResponse = await admin.GetStatistics(request)
        return response

    typo = f"{pilot.city.ward}.t71"
    error = await refused(grpc.StatusCode.NOT_FOUND, statistics(typo))
    assert typo in (error.details() or "")
    for malformed in (f"{pilot.city.ward}..t", pilot.city.ward.upper()):
        error = await refused(grpc.StatusCode.INVALID_ARGUMENT, statistics(malformed))
        assert (error.details() or "").startswith("unit_id"), error.details()
    # The units that exist answer as before, the city's own too.
    for unit_id in (pilot.city.city, pilot.city.ward, pilot.city.group):
        await statistics(unit_id)


@pytest.mark.parametrize("token", ["garbage", "tk-", "zz-000000000000000000000000"])
async def test_a_page_token_no_listing_gave_is_refused(pilot: Pilot, token: str) -> None:
    """Not a page read from wherever the token happens to sort: "garbage" sorts before every
    ticket id, so a queue would start over from its first ticket and "my tickets" look empty."""
    await pilot.routed((await pilot.submit("noise")).ticket_id)
    page = types_pb2.PageRequest(page_size=1, page_token=token)
    for call in (
        pilot.ward_officer.ListQueue(tickets_pb2.ListQueueRequest(page=page)),
        pilot.resident.ListMyTickets(tickets_pb2.ListMyTicketsRequest(page=page)),
    ):
        error = await refused(grpc.StatusCode.INVALID_ARGUMENT, call)
        assert (error.details() or "").startswith("page.page_token"), error.details()


def spoilt_rules(
    pilot: Pilot, caller: TicketCaller, spoil: Callable[[list[tickets_pb2.RoutingRule]], Any]
) -> Callable[[], Awaitable[Any]]:
    """SetRoutingRules with a copy of the rules in force, spoilt by `spoil`."""

    async def call() -> Any:
        current = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
        rules = [tickets_pb2.RoutingRule.FromString(r.SerializeToString()) for r in current.rules]
        spoil(rules)
        return await caller.SetRoutingRules(
            tickets_pb2.SetRoutingRulesRequest(request_id=rid(), rules=rules)
        )

    return call


def drop_slas(rules: list[tickets_pb2.RoutingRule]) -> None:
    del rules[0].slas[:]


def resolve_before_acknowledging(rules: list[tickets_pb2.RoutingRule]) -> None:
    rules[0].slas[0].resolve_within.seconds = 60


def no_level(rules: list[tickets_pb2.RoutingRule]) -> None:
    rules[0].level = tickets_pb2.LEVEL_UNSPECIFIED


def resolve_in_nine_thousand_years(rules: list[tickets_pb2.RoutingRule]) -> None:
    # Its deadline could not even be computed: routing would fail on every ticket after it.
    rules[0].slas[0].resolve_within.seconds = 9000 * 366 * 86_400


def bad_category(rules: list[tickets_pb2.RoutingRule]) -> None:
    rules[0].category = "Street Light"


def two_deadlines_for_one_level(rules: list[tickets_pb2.RoutingRule]) -> None:
    # The second, shorter, would silently replace the first.
    again = tickets_pb2.LevelSla.FromString(rules[0].slas[0].SerializeToString())
    again.acknowledge_within.seconds = 60
    again.resolve_within.seconds = 120
    rules[0].slas.append(again)


def second_deadline(**spoilt: Any) -> Callable[[list[tickets_pb2.RoutingRule]], None]:
    """The first rule gets a second level's deadlines, spoilt by `spoilt`."""

    def spoil(rules: list[tickets_pb2.RoutingRule]) -> None:
        del rules[0].slas[1:]
        fine = tickets_pb2.LevelSla(level=tickets_pb2.LEVEL_CITY)
        fine.acknowledge_within.seconds = 3600
        fine.resolve_within.seconds = 86_400
        for field, seconds in spoilt.items():
            if field == "level":
                fine.level = seconds
            else:
                getattr(fine, field).seconds = seconds
        rules[0].slas.append(fine)

    return spoil


@pytest.mark.parametrize(
    ("spoilt", "field"),
    [
        ({"level": 0}, "rules[0].slas[1].level"),
        ({"acknowledge_within": 0}, "rules[0].slas[1].acknowledge_within"),
        ({"resolve_within": -60}, "rules[0].slas[1].resolve_within"),
        ({"resolve_within": 60}, "rules[0].slas[1].resolve_within"),
        ({"resolve_within": 9000 * 366 * 86_400}, "rules[0].slas[1].resolve_within"),
    ],
    ids=["no-level", "zero", "negative", "before-acknowledging", "too-far"],
)
async def test_a_bad_deadline_in_the_rules_is_named_by_its_place(
    pilot: Pilot, tickets_service: TicketsService, spoilt: dict[str, int], field: str
) -> None:
    """A rule has a deadline per level: the error names which one is wrong, and what in it."""
    before = await footprint(tickets_service)
    error = await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        spoilt_rules(pilot, pilot.admin, second_deadline(**spoilt))(),
    )
    assert (error.details() or "").startswith(f"{field}:"), error.details()
    assert await footprint(tickets_service) == before


async def test_bad_input_on_existing_tickets_is_refused_and_writes_nothing(
    pilot: Pilot, tickets_service: TicketsService
) -> None:
    open_id = (await pilot.routed((await pilot.submit("street-light")).ticket_id)).ticket_id
    resolved_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    await pilot.ward_officer.ResolveTicket(
        tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=resolved_id, resolution="ok")
    )
    stored = {i: await tickets_service.store.get(i) for i in (open_id, resolved_id)}
    before = await footprint(tickets_service)
    officer, resident, admin = pilot.ward_officer, pilot.resident, pilot.admin
    missing = "tk-000000000000000000000000"

    def rate(ticket_id: str, rating: int) -> Callable[[], Awaitable[Any]]:
        return lambda: resident.RateResolution(
            tickets_pb2.RateResolutionRequest(request_id=rid(), ticket_id=ticket_id, rating=rating)
        )

    cases: list[tuple[str, Callable[[], Awaitable[Any]], grpc.StatusCode]] = [
        ("rating 0", rate(resolved_id, 0), grpc.StatusCode.INVALID_ARGUMENT),
        ("rating 6", rate(resolved_id, 6), grpc.StatusCode.INVALID_ARGUMENT),
        ("rating -1", rate(resolved_id, -1), grpc.StatusCode.INVALID_ARGUMENT),
        ("rate unknown", rate(missing, 3), grpc.StatusCode.NOT_FOUND),
        ("get unknown", lambda: get(officer, missing), grpc.StatusCode.NOT_FOUND),
        ("get without id", lambda: get(officer, ""), grpc.StatusCode.INVALID_ARGUMENT),
        (
            "acknowledge unknown",
            lambda: acknowledge(officer, missing),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "support unknown",
            lambda: pilot.neighbour.SupportTicket(
                tickets_pb2.SupportTicketRequest(request_id=rid(), ticket_id=missing)
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "acknowledge without request id",
            lambda: officer.AcknowledgeTicket(
                tickets_pb2.AcknowledgeTicketRequest(ticket_id=open_id)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "resolve without resolution",
            lambda: officer.ResolveTicket(
                tickets_pb2.ResolveTicketRequest(request_id=rid(), ticket_id=open_id)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "escalate without reason",
            lambda: officer.EscalateTicket(
                tickets_pb2.EscalateTicketRequest(request_id=rid(), ticket_id=open_id)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "comment too long",
            lambda: resident.AddComment(
                tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=open_id, text="x" * 2001)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "reopen without reason",
            lambda: resident.ReopenTicket(
                tickets_pb2.ReopenTicketRequest(request_id=rid(), ticket_id=resolved_id)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "queue page size",
            lambda: officer.ListQueue(
                tickets_pb2.ListQueueRequest(page=types_pb2.PageRequest(page_size=-1))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules without deadlines",
            spoilt_rules(pilot, admin, drop_slas),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules naming a category twice",
            spoilt_rules(pilot, admin, lambda rules: rules.append(rules[0])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules with a malformed category",
            spoilt_rules(pilot, admin, bad_category),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules resolving before acknowledging",
            spoilt_rules(pilot, admin, resolve_before_acknowledging),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules with a deadline thousands of years away",
            spoilt_rules(pilot, admin, resolve_in_nine_thousand_years),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules with two deadlines for one level",
            spoilt_rules(pilot, admin, two_deadlines_for_one_level),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules without a level",
            spoilt_rules(pilot, admin, no_level),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "rules set by a ward officer",
            spoilt_rules(pilot, officer, lambda rules: None),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ]
    for name, call, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == code, (name, caught.value.details())

    assert await footprint(tickets_service) == before
    for ticket_id, document in stored.items():
        assert await tickets_service.store.get(ticket_id) == document


@pytest.mark.parametrize("text", ["Đèn hỏng\x00", "Đèn \x1b[2Jhỏng", "Đèn \x93hỏng\x94 rồi"])
async def test_text_with_control_characters_is_refused_and_writes_nothing(
    pilot: Pilot, tickets_service: TicketsService, text: str
) -> None:
    """A NUL, a terminal escape or a C1 control (text from Windows-1252 read as Latin-1) is no
    part of what a resident or official writes: it would reach every screen and export."""
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    stored = await tickets_service.store.get(ticket_id)
    before = await footprint(tickets_service)
    error = await refused(
        grpc.StatusCode.INVALID_ARGUMENT, pilot.resident.SubmitTicket(submission(description=text))
    )
    assert (error.details() or "").startswith("description"), error.details()
    error = await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.resident.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=text)
        ),
    )
    assert (error.details() or "").startswith("text"), error.details()
    assert await footprint(tickets_service) == before
    assert await tickets_service.store.get(ticket_id) == stored


async def test_vietnamese_typed_with_separate_tone_marks_is_measured_by_its_letters(
    pilot: Pilot,
) -> None:
    """A comment of 2,000 letters typed with combining tone marks (as some keyboards send them)
    is within the limit, and kept composed, as the same letters typed precomposed are."""
    ticket_id = (await pilot.routed((await pilot.submit("noise")).ticket_id)).ticket_id
    letters = "ệ" * domain.MAX_COMMENT
    typed = unicodedata.normalize("NFD", letters)
    assert len(typed) > domain.MAX_COMMENT
    commented = await pilot.resident.AddComment(
        tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=typed)
    )
    assert commented.ticket.comments[-1].text == letters
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        pilot.resident.AddComment(
            tickets_pb2.AddCommentRequest(request_id=rid(), ticket_id=ticket_id, text=typed + "ệ")
        ),
    )


@pytest.mark.parametrize(
    "title",
    ["Đèn đường\x0bhỏng", "Đèn đường\nhỏng", "Đèn\x00", "Đ" * (domain.MAX_TITLE + 1)],
    ids=["word-line-break", "newline", "nul", "too-long"],
)
async def test_a_category_title_that_is_not_one_line_of_text_is_refused(
    pilot: Pilot, tickets_service: TicketsService, title: str
) -> None:
    """A title is one line in every resident's list of what they can report: a line break
    pasted from a word processor, a control character or a page of text is refused, naming
    the rule, and the rules stay as they were."""
    before = await footprint(tickets_service)

    def spoil(rules: list[tickets_pb2.RoutingRule]) -> None:
        rules[1].title = title

    error = await refused(
        grpc.StatusCode.INVALID_ARGUMENT, spoilt_rules(pilot, pilot.admin, spoil)()
    )
    assert (error.details() or "").startswith("rules[1].title:"), error.details()
    assert await footprint(tickets_service) == before


async def test_a_category_title_is_kept_composed(pilot: Pilot) -> None:
    current = (await pilot.admin.GetRoutingRules(tickets_pb2.GetRoutingRulesRequest())).rules
    rules = [tickets_pb2.RoutingRule.FromString(r.SerializeToString()) for r in current.rules]
    title = rules[0].title
    rules[0].title = unicodedata.normalize("NFD", title) + "  "
    try:
        saved = await pilot.admin.SetRoutingRules(
            tickets_pb2.SetRoutingRulesRequest(request_id=rid(), rules=rules)
        )
        assert saved.rules.rules[0].title == unicodedata.normalize("NFC", title)
    finally:
        await pilot.admin.SetRoutingRules(
            tickets_pb2.SetRoutingRulesRequest(request_id=rid(), rules=current.rules)
        )
