"""The ledger service in-process beside the registry (which it reads households from)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date
from functools import cached_property
from typing import Any

import pytest
from civic.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from civic.registry.v1 import registry_pb2
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from services.common.auth import Role
from services.common.config import Settings
from services.common.grpc_client import civic_channel
from services.common.wire import local_date
from services.ledger.main import LedgerService
from services.registry.main import RegistryService
from tests.conftest import Clock, token
from tests.registry_fixtures import City, citizen_id, new_household, next_to_registry, person, rid

__all__ = ["rid"]

_NAMED: dict[str, str] = {}


def campaign_name(base: str, request_id: str) -> str:
    """A campaign's name, another for each declaration (a fund refuses the same campaign
    twice), the same for a retry of one (its request_id)."""
    return _NAMED.setdefault(request_id, f"{base} đợt {len(_NAMED) + 1}")


@pytest.fixture(scope="session")
async def ledger_service(
    settings: Settings,
    registry: RegistryService,
    session_clock: Clock,
    span_processor: SimpleSpanProcessor,
) -> AsyncIterator[LedgerService]:
    service = LedgerService(
        next_to_registry(settings, registry),
        clock=session_clock,
        span_processor=span_processor,
    )
    await service.start()
    yield service
    await service.stop()


class LedgerCaller:
    def __init__(self, target: str, bearer: str) -> None:
        self.channel = civic_channel(target, bearer)
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub, name)


@dataclass(eq=False)
class Books:
    """A city from the registry's fixture with households in its group, a fund of the group,
    and ledger callers for each role."""

    city: City
    target: str
    fund_id: str = ""
    households: dict[str, str] = field(default_factory=dict)  # label -> household id
    # Callers are kept: a channel no longer referenced is closed under its pending calls.
    _callers: dict[tuple[Role, str, str], LedgerCaller] = field(default_factory=dict)

    def caller(self, role: Role, scope: str, household_id: str = "") -> LedgerCaller:
        key = (role, scope, household_id)
        if key not in self._callers:
            self._callers[key] = LedgerCaller(self.target, token(role, scope, household_id))
        return self._callers[key]

    @cached_property
    def leader(self) -> LedgerCaller:
        return self.caller(Role.GROUP_LEADER, self.city.group)

    @cached_property
    def treasurer(self) -> LedgerCaller:
        return self.caller(Role.TREASURER, self.city.group)

    @cached_property
    def auditor(self) -> LedgerCaller:
        return self.caller(Role.AUDITOR, self.city.city)

    def resident(self, label: str = "an") -> LedgerCaller:
        return self.caller(Role.RESIDENT, self.city.group, self.households[label])

    async def post(
        self, *postings: tuple[str, int], caller: LedgerCaller | None = None, **kw: Any
    ) -> ledger_pb2.Transaction:
        fields: dict[str, Any] = {"request_id": rid(), "fund_id": self.fund_id} | kw
        response = await (caller or self.treasurer).PostTransaction(
            ledger_pb2.PostTransactionRequest(
                postings=[ledger_pb2.Posting(account=a, amount=n) for a, n in postings], **fields
            )
        )
        transaction: ledger_pb2.Transaction = response.transaction
        return transaction

    async def declare_per_household(self, rate: int, request_id: str = "") -> ledger_pb2.Campaign:
        """The group leader's campaign of `rate` per household of the fund's unit."""
        request_id = request_id or rid()
        response = await self.leader.DeclareCampaign(
            ledger_pb2.DeclareCampaignRequest(
                request_id=request_id,
                fund_id=self.fund_id,
                name=campaign_name("Phí vệ sinh", request_id),
                period="2026",
                basis=ledger_pb2.DUES_BASIS_PER_HOUSEHOLD,
                rate=rate,
            )
        )
        campaign: ledger_pb2.Campaign = response.campaign
        return campaign

    async def reverse(self, transaction_id: str, reason: str) -> ledger_pb2.Transaction:
        """The treasurer's reversal of a transaction of the fund."""
        response = await self.treasurer.ReverseTransaction(
            ledger_pb2.ReverseTransactionRequest(
                request_id=rid(), fund_id=self.fund_id, transaction_id=transaction_id, reason=reason
            )
        )
        reversal: ledger_pb2.Transaction = response.transaction
        return reversal

    async def balances(self, fund_id: str = "", **kw: Any) -> dict[str, int]:
        """The fund's balances (this one's if not named), every page of them."""
        request = ledger_pb2.GetBalancesRequest(fund_id=fund_id or self.fund_id, **kw)
        balances: dict[str, int] = {}
        while True:
            response = await self.auditor.GetBalances(request)
            balances |= {b.account: b.balance for b in response.balances}
            if not response.next_page_token:
                return balances
            request.page.page_token = response.next_page_token

    async def opened_on(self) -> date:
        """The day (in Vietnam) the fund was opened."""
        fund = (await self.auditor.GetFund(ledger_pb2.GetFundRequest(fund_id=self.fund_id))).fund
        return local_date(fund.opened_at.ToDatetime(tzinfo=UTC))

    async def contribute(
        self, amount: int, label: str = "", campaign_id: str = "", **kw: Any
    ) -> ledger_pb2.Transaction:
        fields: dict[str, Any] = {
            "request_id": rid(),
            "fund_id": self.fund_id,
            "household_id": self.households[label] if label else "",
            "campaign_id": campaign_id,
            "amount": amount,
            "method": ledger_pb2.PAYMENT_METHOD_CASH,
            "receipt_number": f"BL-{uuid.uuid4().hex[:8]}",
        } | kw
        response = await self.treasurer.RecordContribution(
            ledger_pb2.RecordContributionRequest(**fields)
        )
        transaction: ledger_pb2.Transaction = response.transaction
        return transaction


async def open_fund(caller: LedgerCaller, unit_id: str, name: str = "Quỹ vì người nghèo") -> str:
    response = await caller.OpenFund(
        ledger_pb2.OpenFundRequest(request_id=rid(), unit_id=unit_id, name=name)
    )
    return str(response.fund.fund_id)


async def war_invalid_member(city: City, household_id: str) -> None:
    details = person("Lê Văn Công", "1950-04-30", registry_pb2.SEX_MALE)
    details.citizen_id = citizen_id("1950-04-30", registry_pb2.SEX_MALE)
    details.relationship = registry_pb2.RELATIONSHIP_PARENT
    details.war_invalid = True
    await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(), household_id=household_id, person=details
        )
    )


@pytest.fixture
async def books(city: City, ledger_service: LedgerService) -> Books:
    """Four households in the group: "an" (head and spouse), "binh" (poor), "cuong" (with a war
    invalid), "dung" (head only); a fund of the group opened by its leader."""
    target = f"127.0.0.1:{ledger_service.port}"
    made = Books(city, target)
    an = await new_household(city.leader, city.group, head_name="Trần Văn An")
    await city.leader.RegisterPerson(
        registry_pb2.RegisterPersonRequest(
            request_id=rid(),
            household_id=an.household.household_id,
            person=person(citizen_id=citizen_id("1990-05-17", registry_pb2.SEX_FEMALE)),
        )
    )
    binh = await new_household(city.leader, city.group, head_name="Phạm Thị Bình", poor=True)
    cuong = await new_household(city.leader, city.group, head_name="Lê Văn Cường")
    await war_invalid_member(city, cuong.household.household_id)
    dung = await new_household(city.leader, city.group, head_name="Hoàng Văn Dũng")
    made.households = {
        "an": an.household.household_id,
        "binh": binh.household.household_id,
        "cuong": cuong.household.household_id,
        "dung": dung.household.household_id,
    }
    made.fund_id = await open_fund(made.leader, city.group)
    return made


__all__ += ["Books", "LedgerCaller", "open_fund"]
