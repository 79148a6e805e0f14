"""Publishing: who may publish where, one delivery record per household of the unit, the
resident's listing (unread first, newest first), and who sees a notice at all."""

from __future__ import annotations

import unicodedata

import grpc
from civic.common.v1 import types_pb2
from civic.notices.v1 import notices_pb2

from services.common.auth import Role
from services.notices.domain import MAX_TITLE
from tests.notices.conftest import Town, events_pb2, refused, unique_title


async def test_a_ward_notice_reaches_every_household_of_the_ward(town: Town) -> None:
    notice = await town.publish(title=unique_title())
    assert notice.state == notices_pb2.NOTICE_STATE_PUBLISHED
    assert notice.publisher.unit_id == town.city.ward
    assert notice.publisher.role == "ward_officer"
    assert notice.revision == 1

    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == 5
    assert {g.unit_id: g.delivered for g in reach.groups} == {
        town.city.group: 3,
        town.city.other_group: 2,
    }
    records = await town.service.store.deliveries.find({"notice_id": notice.notice_id}).to_list()
    assert sorted(r["household_id"] for r in records) == sorted(town.everyone)
    assert {r["_id"] for r in records} == {f"{notice.notice_id}:{h}" for h in town.everyone}

    # Every household is named once over the batches' events (3 households a batch here).
    batches = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert len(batches) >= 2
    named = [h for batch in batches for h in batch.household_ids]
    assert sorted(named) == sorted(town.everyone)
    assert [
        e.households
        for e in await town.events(notice.notice_id, events_pb2.NoticeDeliveryCompleted)
    ] == [5]
    published = await town.events(notice.notice_id, events_pb2.NoticePublished)
    assert [(p.unit_id, p.publisher_role) for p in published] == [(town.city.ward, "ward_officer")]

    for household_id in town.everyone:
        inbox = await town.inbox(household_id)
        assert [n.notice.notice_id for n in inbox] == [notice.notice_id]
        assert not inbox[0].opened
        assert inbox[0].notice.title == notice.title


async def test_a_group_leader_publishes_to_the_group_only(town: Town) -> None:
    city = town.city
    for unit in (city.ward, city.other_group, city.district):
        await refused(grpc.StatusCode.PERMISSION_DENIED, town.publish(town.leader, unit_id=unit))
    notice = await town.publish(town.leader, unit_id=city.group)
    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == 3
    other = town.households[city.other_group][0]
    assert await town.inbox(other) == []
    # Outside the notice's unit it looks like no notice at all.
    await refused(
        grpc.StatusCode.NOT_FOUND,
        town.resident(other).GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice.notice_id)),
    )
    # Residents, auditors and integrators do not publish.
    for role in (Role.RESIDENT, Role.AUDITOR, Role.INTEGRATOR):
        caller = town.caller(role, city.group, town.households[city.group][0])
        await refused(grpc.StatusCode.PERMISSION_DENIED, town.publish(caller, unit_id=city.group))


async def test_residents_list_unread_first_then_newest_first(town: Town) -> None:
    household = town.households[town.city.group][0]
    first = await town.publish(title="Một")
    second = await town.publish(title="Hai")
    third = await town.publish(title="Ba")
    for notice in (first, second, third):
        await town.delivered(notice.notice_id)
    inbox = await town.inbox(household)
    assert [n.notice.title for n in inbox] == ["Ba", "Hai", "Một"]

    opened = await town.open(household, third.notice_id)
    assert opened.opened and opened.opened_revision == 1
    inbox = await town.inbox(household)
    assert [(n.notice.title, n.opened) for n in inbox] == [
        ("Hai", False),
        ("Một", False),
        ("Ba", True),
    ]
    # Page by page, in the same order.
    pages, token = [], ""
    while True:
        response = await town.resident(household).ListMyNotices(
            notices_pb2.ListMyNoticesRequest(
                page=types_pb2.PageRequest(page_size=1, page_token=token)
            )
        )
        pages += [n.notice.title for n in response.notices]
        token = response.next_page_token
        if not token:
            break
    assert pages == ["Hai", "Một", "Ba"]
    # A household's view does not show how the notice was aimed or how far it went.
    got = await town.resident(household).GetNotice(
        notices_pb2.GetNoticeRequest(notice_id=first.notice_id)
    )
    assert got.notice.title == "Một"
    assert not got.notice.HasField("audience") and got.notice.households_delivered == 0


async def test_officials_list_the_notices_of_their_unit(town: Town) -> None:
    group_notice = await town.publish(town.leader, unit_id=town.city.group)
    ward_notice = await town.publish()
    listed = await town.ward_officer.ListNotices(notices_pb2.ListNoticesRequest())
    ids = [n.notice_id for n in listed.notices]
    assert ids[:2] == [ward_notice.notice_id, group_notice.notice_id]
    mine = await town.other_leader.ListNotices(
        notices_pb2.ListNoticesRequest(unit_id=town.city.other_group)
    )
    assert mine.notices == []
    # The ward's notices reach the group's households: its leader finds them on asking, to read
    # their reach in the group; not another group's.
    from_above = await town.other_leader.ListNotices(
        notices_pb2.ListNoticesRequest(unit_id=town.city.other_group, from_above=True)
    )
    assert ward_notice.notice_id in [n.notice_id for n in from_above.notices]
    assert group_notice.notice_id not in [n.notice_id for n in from_above.notices]
    reach = await town.other_leader.GetReach(
        notices_pb2.GetReachRequest(notice_id=ward_notice.notice_id)
    )
    assert reach.total.unit_id == town.city.other_group
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.other_leader.ListNotices(notices_pb2.ListNoticesRequest(unit_id=town.city.ward)),
    )
    # An official of another group sees the ward notice that reaches into it, not the group's.
    for notice_id, code in (
        (ward_notice.notice_id, grpc.StatusCode.OK),
        (group_notice.notice_id, grpc.StatusCode.NOT_FOUND),
    ):
        call = town.other_leader.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id))
        if code is grpc.StatusCode.OK:
            assert (await call).notice.notice_id == notice_id
        else:
            await refused(code, call)


async def test_text_typed_with_combining_marks_is_kept_composed_and_measured_so(
    town: Town,
) -> None:
    """Vietnamese typed with separate tone marks (a keyboard set to compose them, a file named
    on a Mac) reads as the same letters: within a limit as it would be typed precomposed, and
    kept precomposed, as any other device shows it."""
    title = ("Lịch tiêm chủng mở rộng " * 9)[:MAX_TITLE].strip()
    decomposed = unicodedata.normalize("NFD", title)
    assert len(decomposed) > MAX_TITLE
    body = unicodedata.normalize("NFD", "Thứ Bảy, 7 giờ sáng")
    notice = await town.publish(town.leader, unit_id=town.city.group, title=decomposed, body=body)
    assert (notice.title, notice.body) == (title, "Thứ Bảy, 7 giờ sáng")
    assert unicodedata.is_normalized("NFC", notice.revisions[0].title)
