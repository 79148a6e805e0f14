"""Emergencies: delivered before any other notice waiting for delivery, and sent again to the
households that have not opened them once the set time has passed (a clock the test moves)."""

from __future__ import annotations

from datetime import timedelta

import grpc
from civic.notices.v1 import notices_pb2
from civic.registry.v1 import registry_pb2
from google.protobuf.duration_pb2 import Duration

from tests.conftest import Clock
from tests.notices.conftest import Town, events_pb2, eventually, refused, rid


def minutes(value: int) -> Duration:
    span = Duration()
    span.FromTimedelta(timedelta(minutes=value))
    return span


async def test_an_unopened_emergency_is_sent_again(town: Town, clock: Clock) -> None:
    notice = await town.publish(
        town.admin,
        unit_id=town.city.ward,
        priority=notices_pb2.PRIORITY_EMERGENCY,
        title="Cảnh báo bão số 6",
        resend_after=minutes(10),
    )
    assert notice.resend_after.ToTimedelta() == timedelta(minutes=10)
    await town.delivered(notice.notice_id)
    reader = town.households[town.city.group][0]
    await town.open(reader, notice.notice_id)
    unopened = sorted(set(town.everyone) - {reader})

    clock.advance(minutes=5)
    await town.service.deliverer.run_once()
    assert await town.events(notice.notice_id, events_pb2.NoticeResent) == []

    clock.advance(minutes=6)
    resent = await eventually(
        lambda: town.events(notice.notice_id, events_pb2.NoticeResent), what="re-send"
    )
    assert sorted(h for e in resent for h in e.household_ids) == unopened
    for household in unopened:
        (mine,) = await town.inbox(household)
        assert mine.resent_count == 1
    (read,) = await town.inbox(reader)
    assert read.resent_count == 0
    not_reached = await town.admin.ListNotReached(
        notices_pb2.ListNotReachedRequest(notice_id=notice.notice_id)
    )
    assert {h.resent_count for h in not_reached.households} == {1}

    # Each round goes to the households still not opened (a retracted one: test_revisions).
    await town.open(unopened[0], notice.notice_id)
    clock.advance(minutes=11)

    async def second_round() -> bool:
        return len(await town.events(notice.notice_id, events_pb2.NoticeResent)) == 2

    await eventually(second_round, what="second re-send")
    resent = await town.events(notice.notice_id, events_pb2.NoticeResent)
    assert sorted(resent[1].household_ids) == unopened[1:]


async def test_emergencies_are_delivered_before_waiting_notices(town: Town, clock: Clock) -> None:
    deliverer = town.service.deliverer
    await deliverer.stop()
    try:
        normal = await town.publish(title="Lịch thu gom rác")
        emergency = await town.publish(
            priority=notices_pb2.PRIORITY_EMERGENCY, title="Cúp nước khẩn cấp"
        )
        store = town.service.store
        # Every batch goes to the most urgent notice being delivered: the emergency's first.
        while (await store.get(emergency.notice_id) or {}).get("fanout_pending"):
            assert (await store.next_fanout() or {})["_id"] == emergency.notice_id
            await deliverer.fan_out_batch()
        emergency_done = await store.get(emergency.notice_id)
        normal_now = await store.get(normal.notice_id)
        assert emergency_done is not None and normal_now is not None
        assert emergency_done["fanout"]["complete"]
        assert normal_now["fanout"]["delivered"] == 0
    finally:
        deliverer.start()
    await town.delivered(normal.notice_id)


async def test_resend_after_is_for_emergencies_and_bounded(town: Town) -> None:
    await refused(
        grpc.StatusCode.INVALID_ARGUMENT,
        town.publish(resend_after=minutes(10)),
        "resend_after",
    )
    for value in (0, 60 * 24 * 3):
        await refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            town.publish(priority=notices_pb2.PRIORITY_EMERGENCY, resend_after=minutes(value)),
            "resend_after",
        )


async def test_an_unopened_emergency_is_sent_again_to_a_household_back_in_its_unit(
    town: Town, clock: Clock
) -> None:
    """The household is left without residents (its record withdrawn, no more re-sends), then
    someone moves in again: it has its record back, and re-sends with it."""
    household = town.households[town.city.group][0]
    notice = await town.publish(
        town.leader,
        unit_id=town.city.group,
        priority=notices_pb2.PRIORITY_EMERGENCY,
        title="Cảnh báo ngập",
        resend_after=minutes(10),
    )
    await town.delivered(notice.notice_id)
    await town.empty(household)
    newcomer = registry_pb2.PersonDetails(
        full_name="Đỗ Thị Lan",
        birth_date="1990-02-03",
        sex=registry_pb2.SEX_FEMALE,
        relationship=registry_pb2.RELATIONSHIP_HEAD,
    )
    await town.city.ward_officer.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=household, person=newcomer
        )
    )

    async def back() -> bool:
        return notice.notice_id in [n.notice.notice_id for n in await town.inbox(household)]

    await eventually(back, what="the notice back in the household's inbox")
    clock.advance(minutes=11)

    async def resent_to() -> list[str]:
        events = await town.events(notice.notice_id, events_pb2.NoticeResent)
        return [h for e in events for h in e.household_ids]

    assert household in await eventually(resent_to, what="re-send")
