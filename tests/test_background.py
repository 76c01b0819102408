"""dicomproxy/background.py: a component's one task, started once, cancelled and awaited at stop."""

from __future__ import annotations

import asyncio

from dicomproxy.background import BackgroundTask


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
