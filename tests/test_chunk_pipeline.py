"""Unit tests: the upload's chunk pipeline keeps order, bounds memory, surfaces failures and
never lets a write outlive it."""

from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from server.core.chunk_pipeline import chunk_pipeline
from server.errors import InvalidArchive


class _SlowWriter:
    """An async stage that takes its time, and records what it got and how much was pending."""

    def __init__(self, delay: float = 0.002) -> None:
        self.written: list[bytes] = []
        self.writing = False
        self.overlapped = False
        self._delay = delay

    async def write(self, chunk: bytes) -> None:
        self.overlapped |= self.writing
        self.writing = True
        await asyncio.sleep(self._delay)
        self.written.append(chunk)
        self.writing = False


async def test_every_stage_sees_every_chunk_in_order() -> None:
    chunks = [bytes([index]) * (1000 + index) for index in range(200)]
    digest, writer = hashlib.sha256(), _SlowWriter(0)
    fed: list[bytes] = []
    async with chunk_pipeline([digest.update, fed.append], writer.write, max_in_flight_bytes=10_000, name="t") as pipeline:
        for chunk in chunks:
            await pipeline.push(chunk)
        await pipeline.finish()
    assert digest.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert fed == chunks and writer.written == chunks
    assert not writer.overlapped  # one write at a time, each after the one before


async def test_the_receiver_goes_on_while_the_stages_work_but_never_past_the_in_flight_bound() -> None:
    release = threading.Event()
    seen_in_flight: list[int] = []

    def blocked_stage(chunk: bytes) -> None:
        release.wait(5)

    writer = _SlowWriter(0)
    async with chunk_pipeline([blocked_stage], writer.write, max_in_flight_bytes=3000, name="t") as pipeline:
        for _ in range(3):  # 3 x 1000 bytes fit: push returns without waiting for the stage
            await asyncio.wait_for(pipeline.push(bytes(1000)), 1)
            seen_in_flight.append(pipeline.in_flight_bytes)
        fourth = asyncio.ensure_future(pipeline.push(bytes(1000)))
        await asyncio.sleep(0.1)
        assert not fourth.done()  # over the bound: the receiver waits for the stage
        release.set()
        await asyncio.wait_for(fourth, 5)
        await pipeline.finish()
    assert seen_in_flight == [1000, 2000, 3000]
    assert pipeline.in_flight_bytes == 0


async def test_a_failing_stage_is_raised_and_no_chunk_after_the_failing_one_is_handed_over() -> None:
    writer = _SlowWriter(0)

    def inspector(chunk: bytes) -> None:
        if chunk == b"bad":
            raise InvalidArchive("not a tar", check="tar_header")

    with pytest.raises(InvalidArchive):
        async with chunk_pipeline([inspector], writer.write, max_in_flight_bytes=1, name="t") as pipeline:
            for chunk in (b"ok", b"bad", b"after", b"more"):
                await pipeline.push(chunk)
            await pipeline.finish()
    assert writer.written == [b"ok", b"bad"]  # nothing after the failing chunk was handed over


async def test_a_failed_write_fails_every_later_write_so_the_stored_bytes_have_no_gap() -> None:
    written: list[bytes] = []

    async def write(chunk: bytes) -> None:
        if chunk == b"2":
            raise ConnectionError("the store went away")
        written.append(chunk)

    with pytest.raises(ConnectionError):
        async with chunk_pipeline([], write, max_in_flight_bytes=100, name="t") as pipeline:
            for chunk in (b"1", b"2", b"3", b"4"):
                await pipeline.push(chunk)
            await pipeline.finish()
    assert written == [b"1"]


async def test_a_cancelled_upload_waits_for_the_write_under_way_before_its_clean_up() -> None:
    writer = _SlowWriter(0.2)
    pushed = asyncio.Event()

    async def upload() -> None:
        async with chunk_pipeline([], writer.write, max_in_flight_bytes=1 << 20, name="t") as pipeline:
            await pipeline.push(b"chunk")
            pushed.set()
            await asyncio.sleep(10)

    task = asyncio.ensure_future(upload())
    await pushed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer.written == [b"chunk"] and not writer.writing  # the clean-up came after the write
