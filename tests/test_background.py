"""dicomproxy/background.py: a component's one task, started once, cancelled and awaited at stop."""

from __future__ import annotations

import asyncio

from dicomproxy.background import BackgroundTask, every


async def test_started_once_and_over_when_stop_returns() -> None:
    runs: list[str] = []
    ended = asyncio.Event()

    async def body() -> None:
        runs.append("run")
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()

    task = BackgroundTask("test-body")
    task.start(body)
    task.start(body)  # already running: not a second one
    await asyncio.sleep(0)
    assert task.running and runs == ["run"]
    await task.stop()
    assert ended.is_set() and not task.running  # the body's finally ran before stop() returned
    await task.stop()  # stopping twice is fine
    task.start(body)  # and it may start again
    await asyncio.sleep(0)
    assert runs == ["run", "run"]
    await task.stop()


async def test_every_outlives_a_failing_round_and_ends_when_cancelled_mid_round() -> None:
    rounds: list[int] = []
    failures: list[Exception] = []
    third = asyncio.Event()
    ended = asyncio.Event()

    async def round_() -> None:
        rounds.append(len(rounds) + 1)
        if len(rounds) == 1:
            raise RuntimeError("peer away")
        if len(rounds) == 3:
            third.set()
            try:
                await asyncio.Event().wait()  # stop() lands in the middle of this round
            finally:
                ended.set()

    def failed(e: Exception) -> None:
        failures.append(e)

    task = BackgroundTask("test-every")
    task.start(lambda: every(0.01, round_, failed))
    await asyncio.wait_for(third.wait(), 5)
    assert rounds == [1, 2, 3]  # the failing first round did not end the loop
    assert [str(e) for e in failures] == ["peer away"]
    await task.stop()
    assert ended.is_set() and not task.running
