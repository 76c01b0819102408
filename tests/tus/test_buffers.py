"""The shared budget for buffered upload bytes (:mod:`dicomproxy.tus.buffers`)."""

from __future__ import annotations

import asyncio

import pytest

from dicomproxy.tus.buffers import BufferBudget


def test_take_within_the_limit_and_give_back() -> None:
    b = BufferBudget(100, wait=1)
    assert b.try_take(60) and b.try_take(40)
    assert b.in_use == 100 and not b.try_take(1)
    b.give_back(40)
    assert b.in_use == 60 and b.try_take(40)
    assert b.peak == 100


def test_a_message_larger_than_the_whole_budget_passes_when_nothing_is_held() -> None:
    b = BufferBudget(10, wait=1)
    assert b.try_take(50) and b.in_use == 50
    assert not b.try_take(1)
    b.give_back(50)
    assert b.in_use == 0


def test_waiters_are_served_in_order_and_nobody_overtakes_them() -> None:
    async def main() -> list[str]:
        b = BufferBudget(100, wait=5)
        assert b.try_take(100)
        order: list[str] = []

        async def want(name: str, n: int) -> None:
            assert await b.take(n)
            order.append(name)

        first = asyncio.create_task(want("first", 80))
        await asyncio.sleep(0)
        second = asyncio.create_task(want("second", 10))
        await asyncio.sleep(0)
        assert not b.try_take(1)  # someone waits: no overtaking, even for one byte
        b.give_back(50)  # 50 free: not enough for the first (80); the second must wait behind it
        await asyncio.sleep(0.01)
        assert order == []
        b.give_back(50)
        await asyncio.gather(first, second)
        return order

    assert asyncio.run(main()) == ["first", "second"]


def test_the_wait_is_bounded() -> None:
    async def main() -> tuple[bool, float, int]:
        b = BufferBudget(10, wait=0.2)
        assert b.try_take(10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok = await b.take(5)
        return ok, loop.time() - t0, len(b._waiters)

    ok, waited, waiters = asyncio.run(main())
    assert ok is False and 0.15 < waited < 2 and waiters == 0


def test_a_cancelled_waiter_leaves_the_line_and_the_next_one_is_served() -> None:
    async def main() -> int:
        b = BufferBudget(10, wait=5)
        assert b.try_take(10)
        big = asyncio.create_task(b.take(10))
        await asyncio.sleep(0)
        small = asyncio.create_task(b.take(2))
        await asyncio.sleep(0)
        b.give_back(5)  # 5 free: the big one (first in line) does not fit, the small one must wait
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert await small  # served as soon as the big one left the line
        return b.in_use

    assert asyncio.run(main()) == 7


def test_granted_but_cancelled_gives_the_bytes_back() -> None:
    async def main() -> int:
        b = BufferBudget(10, wait=5)
        assert b.try_take(10)
        waiter = asyncio.create_task(b.take(4))
        await asyncio.sleep(0)
        b.give_back(10)  # grants the waiter's 4 bytes
        waiter.cancel()  # ... but its task is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return b.in_use

    assert asyncio.run(main()) == 0
