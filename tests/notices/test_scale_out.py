"""Scale-out: two notices instances side by side in one registry-view group split the registry's
events between them; one is killed mid-load and restarted as the same instance, and every
household arriving under a live notice is counted and reached exactly once — nothing twice,
nothing lost."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

from civic.notices.v1 import events_pb2, notices_pb2

from services.common.auth import Role
from services.common.cloudevents import type_name
from services.common.config import Settings
from services.notices.main import NAME
from tests.conftest import token
from tests.kafka_reader import eventually
from tests.notices.conftest import NoticeCaller, rid
from tests.registry_fixtures import new_city, new_household, numbered
from tests.scale_out import Deployment, committed_events

HOUSEHOLDS = 60
DELIVERED = type_name(events_pb2.NoticeDelivered())


async def test_two_instances_split_the_registry_events_and_a_killed_one_reaches_each_household_once(
    settings: Settings, tmp_path: Path
) -> None:
    async with Deployment(settings, tmp_path) as deployment:
        registry = await deployment.start("registry", "registry-0")
        notices = await deployment.side_by_side(NAME)
        city = await new_city(registry.target, "c" + uuid.uuid4().hex[:8])
        await deployment.knows_units(NAME, city.ward)
        officer = NoticeCaller(notices.first.target, token(Role.WARD_OFFICER, city.ward))
        published = await officer.PublishNotice(
            notices_pb2.PublishNoticeRequest(
                request_id=rid(),
                title="Lịch cắt nước",
                body="Thứ Năm, 8 giờ đến 16 giờ.",
                priority=notices_pb2.PRIORITY_NORMAL,
                unit_id=city.ward,
            )
        )
        notice_id = published.notice.notice_id

        async def first_delivery_done() -> bool:
            got = await officer.GetNotice(notices_pb2.GetNoticeRequest(notice_id=notice_id))
            return bool(got.notice.delivery_complete)

        # The ward has no households yet: each one that arrives is reached by the registry-view
        # consumer, late, and by nothing else.
        await eventually(first_delivery_done, what="the first delivery, to nobody")
        await officer.channel.close()

        leader = city.leader
        await notices.under_load(
            HOUSEHOLDS,
            lambda number: new_household(
                leader, city.group, head_name=numbered("Phạm Thị Số", number)
            ),
        )
        await leader.channel.close()

        from_registry = await committed_events(deployment.db("registry"))
        group = deployment.group(NAME, "registry-view")
        by_instance = await notices.handled(group, [event["_id"] for event in from_registry])

        households = await deployment.db("registry")["households"].distinct("_id")
        assert len(households) == HOUSEHOLDS
        view = deployment.db(NAME)["households"]
        # The view has every household on the topic: other deployments' too.
        ours = view.find({"_id": {"$in": households}})
        residents = {household["_id"]: household.get("residents") async for household in ours}
        # A head's PersonRegistered applied twice would count two residents, lost none.
        assert residents == dict.fromkeys(households, 1)

        reached = Counter[str]()
        for event in await committed_events(deployment.db(NAME)):
            if event["type"] == DELIVERED:
                delivered = events_pb2.NoticeDelivered.FromString(bytes(event["data"]))
                assert delivered.late and delivered.notice_id == notice_id
                reached.update(delivered.household_ids)
        assert reached == Counter(households), "a household reached twice or not at all"
        deliveries = deployment.db(NAME)["deliveries"]
        assert await deliveries.count_documents({"notice_id": notice_id}) == HOUSEHOLDS
        assert set(by_instance) == set(notices.instances), by_instance
