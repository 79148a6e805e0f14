"""Coalescing concurrent operations: shared round trips, results in order, failures to all."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from services.common.batching import Coalescer


class Recorder:
    def __init__(self, delay: float = 0.01, fail_on: str = "") -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.fail_on = fail_on

    async def run(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        await asyncio.sleep(self.delay)
        if self.fail_on in items:
            raise ValueError(f"cannot answer {self.fail_on}")
        return [item.upper() for item in items]


async def test_runs_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_a_lone_request_is_sent_at_once() -> None:
    recorder = Recorder()
    assert await asyncio.wait_for(Coalescer(recorder.run).submit("a"), 1) == "A"
    assert recorder.batches == [["a"]]


async def test_requests_arriving_together_share_one_batch_and_get_their_own_answer() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.run)
    answers = await asyncio.gather(*(coalescer.submit(c) for c in "abcde"))
    assert answers == list("ABCDE")
    assert recorder.batches == [list("abcde")]


async def test_requests_arriving_while_batches_are_in_flight_wait_for_the_next_one() -> None:
    recorder = Recorder(delay=0.05)
    coalescer = Coalescer(recorder.run, max_in_flight=1, max_batch=3)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await asyncio.sleep(0.01)  # "a" is in flight
    later = [asyncio.ensure_future(coalescer.submit(c)) for c in "bcdef"]
    assert await asyncio.gather(first, *later) == list("ABCDEF")
    assert recorder.batches == [["a"], list("bcd"), list("ef")]


async def test_a_failed_batch_fails_each_of_its_callers_and_no_other() -> None:
    recorder = Recorder(delay=0.05, fail_on="b")
    coalescer = Coalescer(recorder.run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await asyncio.sleep(0.01)
    failing = [asyncio.ensure_future(coalescer.submit(c)) for c in "bc"]
    assert await first == "A"
    for future in failing:
        with pytest.raises(ValueError, match="cannot answer b"):
            await future
    assert await coalescer.submit("d") == "D"


async def test_a_caller_that_gave_up_before_its_batch_left_is_not_sent() -> None:
    recorder = Recorder(delay=0.05)
    coalescer = Coalescer(recorder.run, max_in_flight=1)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await asyncio.sleep(0.01)
    abandoned = asyncio.ensure_future(coalescer.submit("b"))
    kept = asyncio.ensure_future(coalescer.submit("c"))
    await asyncio.sleep(0)
    abandoned.cancel()
    assert await first == "A"
    assert await kept == "C"
    assert recorder.batches == [["a"], ["c"]]


async def test_a_batch_answered_with_the_wrong_number_of_results_fails_every_caller() -> None:
    async def one_short(items: list[str]) -> list[str]:
        await asyncio.sleep(0.01)
        return [item.upper() for item in items[1:]]

    coalescer = Coalescer(one_short)
    answers = await asyncio.wait_for(
        asyncio.gather(*(coalescer.submit(c) for c in "abc"), return_exceptions=True), 2
    )
    assert [type(answer) for answer in answers] == [ValueError] * 3
