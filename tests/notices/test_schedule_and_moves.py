"""Time and movement: a notice scheduled for later is published when a clock the test moves
forward reaches its time, and expires; households moving into a live notice's unit receive it,
households moving out (or left empty) stop seeing it, and a group merged away keeps its
notices."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import grpc
from civic.common.v1 import types_pb2
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import events_pb2 as registry_events
from civic.registry.v1 import registry_pb2
from google.protobuf.message import Message

from services.common.auth import Role
from services.common.mongo import Session, in_transaction
from services.notices.events import Reconciler
from tests.batches import deliveries
from tests.conftest import Clock
from tests.notices.conftest import (
    Town,
    events_pb2,
    eventually,
    merge_group_away,
    refused,
    rid,
    stamp,
)


async def state_of(town: Town, notice_id: str) -> int:
    got = await town.admin.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id))
    return int(got.notice.state)


async def test_a_scheduled_notice_is_published_at_its_time_and_expires(
    town: Town, clock: Clock
) -> None:
    household = town.households[town.city.group][0]
    notice = await town.publish(
        publish_at=stamp(clock() + timedelta(hours=2)),
        expires_at=stamp(clock() + timedelta(days=1)),
    )
    assert notice.state == notices_pb2.NOTICE_STATE_SCHEDULED
    assert [e.notice_id for e in await town.events(notice.notice_id, events_pb2.NoticeScheduled)]
    clock.advance(hours=1)
    await town.service.deliverer.run_once()
    assert await state_of(town, notice.notice_id) == notices_pb2.NOTICE_STATE_SCHEDULED
    assert await town.inbox(household) == []

    clock.advance(hours=1, minutes=1)
    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == 5
    assert await state_of(town, notice.notice_id) == notices_pb2.NOTICE_STATE_PUBLISHED
    assert len(await town.events(notice.notice_id, events_pb2.NoticePublished)) == 1
    assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]

    clock.advance(days=1)

    async def expired() -> bool:
        return await state_of(town, notice.notice_id) == notices_pb2.NOTICE_STATE_EXPIRED

    await eventually(expired, what="expiry")
    assert await town.inbox(household) == []
    kept = await town.inbox(household, include_expired=True)
    assert [n.notice.state for n in kept] == [notices_pb2.NOTICE_STATE_EXPIRED]
    await eventually(
        lambda: town.events(notice.notice_id, events_pb2.NoticeExpired), what="NoticeExpired"
    )
    # A household arriving after expiry does not get it.
    late = await town.add_household(town.city.group)
    assert await town.inbox(late, include_expired=True) == []


async def test_a_scheduled_notice_whose_time_up_passed_unsent_expires_unpublished(
    town: Town, clock: Clock
) -> None:
    """The service was down from before its publish_at until after its expiry."""
    household = town.households[town.city.group][0]
    deliverer = town.service.deliverer
    await deliverer.stop()
    try:
        notice = await town.publish(
            publish_at=stamp(clock() + timedelta(hours=1)),
            expires_at=stamp(clock() + timedelta(hours=2)),
        )
        clock.advance(hours=3)
        assert await state_of(town, notice.notice_id) == notices_pb2.NOTICE_STATE_EXPIRED
        await deliverer.run_once()
        await deliverer.run_once()
    finally:
        deliverer.start()
    got = await town.admin.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice.notice_id))
    assert got.notice.state == notices_pb2.NOTICE_STATE_EXPIRED
    assert not got.notice.HasField("published_at")
    assert await town.events(notice.notice_id, events_pb2.NoticePublished) == []
    assert len(await town.events(notice.notice_id, events_pb2.NoticeExpired)) == 1
    assert await town.inbox(household, include_expired=True) == []


async def test_households_moving_in_and_out_after_publication(town: Town, clock: Clock) -> None:
    city = town.city
    group_notice = await town.publish(town.leader, unit_id=city.group, title="Tổ 17 họp")
    other_notice = await town.publish(town.other_leader, unit_id=city.other_group, title="Tổ 18")
    for notice in (group_notice, other_notice):
        await town.delivered(notice.notice_id)

    # A new household in the group after publication receives the group's notice.
    newcomer = await town.add_household(city.group)

    async def in_inbox(household: str, notice_id: str) -> bool:
        return notice_id in [n.notice.notice_id for n in await town.inbox(household)]

    await eventually(lambda: in_inbox(newcomer, group_notice.notice_id), what="move-in")
    late = await town.events(group_notice.notice_id, events_pb2.NoticeDelivered)
    assert [(e.household_ids, e.late) for e in late if e.late] == [([newcomer], True)]
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=group_notice.notice_id))
    assert reach.total.delivered == 4

    # The group merges into the other one: its households, who moved on paper only, keep the
    # first notice, counted in the group they are in now, and receive the second's.
    await city.admin.MergeGroups(
        registry_pb2.MergeGroupsRequest(
            request_id=rid(), source_unit_id=city.group, target_unit_id=city.other_group
        )
    )
    moved = town.households[city.group]

    async def switched() -> bool:
        for household in moved:
            ids = [n.notice.notice_id for n in await town.inbox(household)]
            if group_notice.notice_id not in ids or other_notice.notice_id not in ids:
                return False
        return True

    await eventually(switched, what="the merged households' notices")
    assert await town.events(group_notice.notice_id, events_pb2.NoticeWithdrawn) == []

    async def counted_where_they_are() -> bool:
        reach = await town.admin.GetReach(
            notices_pb2.GetReachRequest(notice_id=group_notice.notice_id)
        )
        return {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {
            city.other_group: len(moved)
        }

    await eventually(counted_where_they_are, what="the group notice's reach after the merge")
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=other_notice.notice_id))
    assert reach.total.delivered == 2 + len(moved)
    # The other group's own households do not get the merged group's notice.
    for household in town.households[city.other_group]:
        assert not await in_inbox(household, group_notice.notice_id)


async def test_a_household_whose_last_resident_leaves_stops_seeing_notices(town: Town) -> None:
    household = town.households[town.city.other_group][0]
    notice = await town.publish()
    await town.delivered(notice.notice_id)
    await town.empty(household)
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert reach.total.delivered == 4


async def test_a_notice_scheduled_for_a_group_merged_away_reaches_its_households(
    town: Town, clock: Clock
) -> None:
    """The group merges into the other one before the notice's time: the notice reaches the
    households that were in it, where they are now, and not the other group's own."""
    city = town.city
    staying = list(town.households[city.other_group])
    notice = await town.publish(
        town.leader, unit_id=city.group, publish_at=stamp(clock() + timedelta(hours=2))
    )
    leaving = await merge_group_away(town)

    clock.advance(hours=2, minutes=1)
    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == len(leaving)
    assert {g.unit_id: g.delivered for g in reach.groups} == {city.other_group: len(leaving)}
    for household in leaving:
        assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]
    for household in staying:
        assert await town.inbox(household) == []
    delivered = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert sorted(h for e in delivered for h in e.household_ids) == sorted(leaving)
    (published,) = await town.events(notice.notice_id, events_pb2.NoticePublished)
    assert (published.unit_id, list(published.merged_into_unit_ids)) == (
        city.group,
        [city.other_group],
    )


async def reconciled(town: Town, messages: Sequence[Message]) -> None:
    """Registry events handed to the service's registry consumer directly, in this order, as
    one fetch: its transaction, its events staged as the consumer stages them."""
    service = town.service
    reconciler = Reconciler(service.store, service.host.outbox, service.clock)

    async def fetch(session: Session) -> None:
        emitted = await reconciler.reconcile(deliveries(list(messages)), session)
        await service.host.outbox.stage(session, emitted)

    await in_transaction(service.client, fetch)


async def test_a_merged_households_move_seen_before_the_merge_withdraws_nothing(
    town: Town,
) -> None:
    """MergeGroups publishes GroupsMerged, keyed by the group, and each household's
    HouseholdMoved, keyed by the household: on different partitions, either may come first.
    A household whose move by the merge is seen before the merge itself never looks as if it
    moved house: it keeps the group's notice all along, and nothing is withdrawn or delivered
    again."""
    city = town.city
    notice = await town.publish(town.leader, unit_id=city.group)
    await town.delivered(notice.notice_id)
    leaving = list(town.households[city.group])
    moves = [
        registry_events.HouseholdMoved(
            household_id=household,
            from_unit_id=city.group,
            to_unit_id=city.other_group,
            by_merge=True,
        )
        for household in leaving
    ]
    merge = registry_events.GroupsMerged(
        source_unit_id=city.group, target_unit_id=city.other_group, household_ids=leaving
    )

    await reconciled(town, moves[:1])
    assert [n.notice.notice_id for n in await town.inbox(leaving[0])] == [notice.notice_id]
    await reconciled(town, [merge, *moves[1:]])
    await reconciled(town, [merge, *moves])  # redelivered: changes nothing

    assert await town.events(notice.notice_id, events_pb2.NoticeWithdrawn) == []
    delivered = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert [e.household_ids for e in delivered if e.late] == []
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {
        city.other_group: len(leaving)
    }
    for household in leaving:
        assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]


async def test_chained_merges_seen_out_of_order_withdraw_nothing(town: Town) -> None:
    """The group merges into the other one, which later merges into a third. The second
    merge's events (GroupsMerged keyed by its group, on another partition than the first's) may
    be applied before the first's: the households keep the first group's notice all along, in
    the group they are in now. One that then moves house stops seeing it, and a merge's event
    redelivered late does not bring it back."""
    city = town.city
    first, second, third = city.group, city.other_group, f"{city.ward}.chain-c"
    elsewhere = f"{city.ward}.chain-d"
    notice = await town.publish(town.leader, unit_id=first)
    await town.delivered(notice.notice_id)
    leaving = list(town.households[first])

    def moves(source: str, target: str) -> list[Message]:
        return [
            registry_events.HouseholdMoved(
                household_id=household, from_unit_id=source, to_unit_id=target, by_merge=True
            )
            for household in leaving
        ]

    into_second = registry_events.GroupsMerged(
        source_unit_id=first, target_unit_id=second, household_ids=leaving
    )
    into_third = registry_events.GroupsMerged(
        source_unit_id=second,
        target_unit_id=third,
        household_ids=leaving + list(town.households[second]),
    )
    for fetch in (moves(first, second), [into_third], moves(second, third), [into_second]):
        await reconciled(town, fetch)
        assert await town.events(notice.notice_id, events_pb2.NoticeWithdrawn) == []
    await reconciled(town, [into_second, into_third])  # redelivered: changes nothing

    assert await town.events(notice.notice_id, events_pb2.NoticeWithdrawn) == []
    delivered = await town.events(notice.notice_id, events_pb2.NoticeDelivered)
    assert [e.household_ids for e in delivered if e.late] == []
    reach = await town.admin.GetReach(notices_pb2.GetReachRequest(notice_id=notice.notice_id))
    assert {g.unit_id: g.delivered for g in reach.groups if g.delivered} == {third: len(leaving)}
    for household in leaving:
        assert [n.notice.notice_id for n in await town.inbox(household)] == [notice.notice_id]

    mover = leaving[0]
    move_house = registry_events.HouseholdMoved(
        household_id=mover, from_unit_id=third, to_unit_id=elsewhere
    )
    await reconciled(town, [move_house])
    await reconciled(town, [into_third, into_second])  # late again, after the move
    withdrawn = await town.events(notice.notice_id, events_pb2.NoticeWithdrawn)
    assert [e.household_id for e in withdrawn] == [mover]
    assert await town.inbox(mover) == []


async def test_the_group_merged_into_sees_the_merged_groups_notice_and_its_reach(
    town: Town,
) -> None:
    """The merged households are the surviving group's residents now: its leader sees the
    notice they received, its reach in the group and the doors to knock on, read-only; and an
    official asking for the reach in the surviving group (outside the notice's unit) counts
    them there."""
    city = town.city
    notice = await town.publish(town.leader, unit_id=city.group)
    await town.delivered(notice.notice_id)
    leaving = await merge_group_away(town)

    async def moved() -> bool:
        return await town.service.store.deliveries.count_documents(
            {"notice_id": notice.notice_id, "unit_id": city.other_group, "withdrawn_at": None}
        ) == len(leaving)

    await eventually(moved, what="the merged households' records in their present group")
    await town.open(leaving[0], notice.notice_id)

    got = await town.other_leader.GetNotice(
        notices_pb2.GetNoticeRequest(notice_id=notice.notice_id)
    )
    assert got.notice.notice_id == notice.notice_id
    for caller, asked in ((town.other_leader, ""), (town.admin, city.other_group)):
        reach = await caller.GetReach(
            notices_pb2.GetReachRequest(notice_id=notice.notice_id, unit_id=asked)
        )
        assert (reach.total.unit_id, reach.total.delivered, reach.total.opened) == (
            city.other_group,
            len(leaving),
            1,
        )
        assert [g.unit_id for g in reach.groups] == [city.other_group]
    unopened = await town.other_leader.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)
    )
    assert sorted(h.household_id for h in unopened.households) == sorted(leaving[1:])
    # Seeing is not managing: the notice stays its publisher's.
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.other_leader.RetractNotice(
            notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=notice.notice_id, reason="không phải của tổ"
            )
        ),
    )
    # A group leader elsewhere still does not see it.
    stranger = town.caller(Role.GROUP_LEADER, f"{city.ward}.elsewhere")
    await refused(
        grpc.StatusCode.NOT_FOUND,
        stranger.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice.notice_id)),
    )


async def test_the_group_merged_into_lists_the_merged_groups_notices(town: Town) -> None:
    """The surviving group's listing holds the notices to the group merged into it, live and
    past, among its own: newest first, page by page, each once; still read-only for its
    leader."""
    city = town.city
    retracted = await town.publish(town.leader, unit_id=city.group)
    await town.leader.RetractNotice(
        notices_pb2.RetractNoticeRequest(
            request_id=rid(), notice_id=retracted.notice_id, reason="nhầm ngày"
        )
    )
    own = await town.publish(town.other_leader, unit_id=city.other_group)
    live = await town.publish(town.leader, unit_id=city.group)
    await merge_group_away(town)
    since = await town.publish(town.other_leader, unit_id=city.other_group)

    listed: list[str] = []
    token = ""
    while True:
        page = await town.other_leader.ListNotices(
            notices_pb2.ListNoticesRequest(
                page=types_pb2.PageRequest(page_size=1, page_token=token)
            )
        )
        listed += [n.notice_id for n in page.notices]
        if not (token := page.next_page_token):
            break
    assert listed == [n.notice_id for n in (since, live, own, retracted)]
    await refused(
        grpc.StatusCode.PERMISSION_DENIED,
        town.other_leader.RetractNotice(
            notices_pb2.RetractNoticeRequest(
                request_id=rid(), notice_id=live.notice_id, reason="không phải của tổ"
            )
        ),
    )


async def test_reach_over_a_group_merged_away_counts_its_households_where_they_are(
    town: Town,
) -> None:
    """A ward's notice: asked for the group merged away, the reach is that of the group its
    households are in now, for an official whose scope holds it."""
    city = town.city
    notice = await town.publish()
    await town.delivered(notice.notice_id)
    await merge_group_away(town)
    everyone = len(town.everyone)

    async def counted() -> bool:
        reach = await town.ward_officer.GetReach(
            notices_pb2.GetReachRequest(notice_id=notice.notice_id, unit_id=city.group)
        )
        return reach.total.unit_id == city.group and [
            (g.unit_id, g.delivered) for g in reach.groups if g.delivered
        ] == [(city.other_group, everyone)]

    await eventually(counted, what="the merged group's reach where its households are")
    unopened = await town.ward_officer.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id, unit_id=city.group)
    )
    assert len(unopened.households) == everyone


def merge_events(source: str, target: str, households: list[str]) -> list[Message]:
    """What the registry publishes for a merge: GroupsMerged, and each household's move by it."""
    return [
        registry_events.GroupsMerged(
            source_unit_id=source, target_unit_id=target, household_ids=households
        ),
        *(
            registry_events.HouseholdMoved(
                household_id=h, from_unit_id=source, to_unit_id=target, by_merge=True
            )
            for h in households
        ),
    ]


async def test_a_delivery_whose_marker_is_in_a_group_merged_back_into_its_unit_goes_on(
    town: Town,
) -> None:
    """A ward's notice, while its first delivery runs: a group of the ward merged into a group
    of another ward, where the delivery's marker then stands, which is merged in turn into a
    group of the ward. No group of the ward is merged away any longer, and the delivery goes on
    past the marker to every household."""
    city = town.city
    first = city.group
    outside = f"{city.district}.hc0.g01"  # another ward's, before the ward's groups in order
    back_in = f"{city.ward}.g99"
    leaving = list(town.households[first])
    deliverer = town.service.deliverer
    batch_size = deliverer.batch_size
    await deliverer.stop()
    try:
        notice = await town.publish()
        await reconciled(
            town,
            merge_events(first, outside, leaving),
        )
        deliverer.batch_size = 1
        assert await deliverer.fan_out_batch()
        doc = await town.service.store.get(notice.notice_id)
        assert doc is not None and doc["fanout"]["after"]["unit"] == outside
        await reconciled(
            town,
            merge_events(outside, back_in, leaving),
        )
        while await deliverer.fan_out_batch():
            pass
    finally:
        deliverer.batch_size = batch_size
        deliverer.start()
    reach = await town.delivered(notice.notice_id)
    assert reach.total.delivered == len(town.everyone)


async def test_a_group_merged_across_wards_lists_what_its_old_ward_sent_it(town: Town) -> None:
    """A group merged into a group of another ward keeps its old ward's notices (GetNotice shows
    them to the leader there): the listing there holds them too, and no other ward's."""
    city = town.city
    outside = f"{city.district}.hc0.g01"
    ward_wide = await town.publish()  # to the town's ward, the group among its households
    other_ward = f"{city.district}.hc9"
    await reconciled(town, merge_events(city.group, outside, list(town.households[city.group])))
    leader_there = town.caller(Role.GROUP_LEADER, outside)

    got = await leader_there.GetNotice(notices_pb2.GetNoticeRequest(notice_id=ward_wide.notice_id))
    assert got.notice.notice_id == ward_wide.notice_id
    listed = await leader_there.ListNotices(notices_pb2.ListNoticesRequest())
    assert ward_wide.notice_id in [n.notice_id for n in listed.notices]
    # A notice of the district, over both wards, is not the merge's doing: listed as ever (not).
    district_officer = town.caller(Role.DISTRICT_OFFICER, city.district)
    district_wide = await town.publish(district_officer, unit_id=city.district)
    elsewhere = town.caller(Role.WARD_OFFICER, other_ward)
    listed = await leader_there.ListNotices(notices_pb2.ListNoticesRequest())
    assert district_wide.notice_id not in [n.notice_id for n in listed.notices]
    listed = await elsewhere.ListNotices(notices_pb2.ListNoticesRequest())
    assert ward_wide.notice_id not in [n.notice_id for n in listed.notices]


async def test_a_notice_published_now_names_where_its_groups_merged_away_went(
    town: Town,
) -> None:
    """As one published at its time does: its event names the group outside its unit that a
    group of it was merged into."""
    city = town.city
    outside = f"{city.district}.hc0.g01"
    leaving = list(town.households[city.group])
    await reconciled(
        town,
        [
            registry_events.GroupsMerged(
                source_unit_id=city.group, target_unit_id=outside, household_ids=leaving
            )
        ],
    )
    notice = await town.publish()
    (published,) = await town.events(notice.notice_id, events_pb2.NoticePublished)
    assert list(published.merged_into_unit_ids) == [outside]
