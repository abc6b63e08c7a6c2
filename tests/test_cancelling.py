"""A retrying loop stops when cancelled, even if a library call swallowed the cancellation."""

from __future__ import annotations

import asyncio

import pytest

from xml_pipeline.cancelling import raise_if_cancelling


async def test_a_loop_stops_even_when_a_call_swallows_its_cancellation() -> None:
    started = asyncio.Event()

    async def swallowing_call() -> None:
        """What a client library may do when cancelled mid-call: tidy up and return."""
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    async def retrying_loop() -> None:
        while True:
            await swallowing_call()
            raise_if_cancelling()

    task = asyncio.create_task(retrying_loop())
    async with asyncio.timeout(2):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await task


async def test_outside_a_cancellation_it_does_nothing() -> None:
    raise_if_cancelling()
