"""Ordered, overlapping stages for an upload's chunks: receiving never waits for storing.

Each chunk of an upload goes to three consumers: the sha256, the archive inspector and the
store's writer. Awaiting all three before reading the next chunk left the receiving side
idle while they ran, and them idle while it received. Here each consumer is a stage that
takes the chunks strictly in order (a thread of its own for the CPU work, a chain of tasks
for the async writer), and the receiver only waits once the chunks handed over but not yet
done by every stage reach `max_in_flight_bytes`: memory stays bounded, the cores stay busy.

A stage that fails stops the pipeline: the failure is raised at the next `push` (or at
`finish`), and `close` waits for whatever is still running before the caller aborts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

ThreadStage = Callable[[bytes], object]
"""CPU work on a chunk (runs in the stage's own thread; it should release the GIL)."""
AsyncStage = Callable[[bytes], Awaitable[None]]


@dataclass
class _InFlight:
    size: int
    done: list[asyncio.Future[object]]


class ChunkPipeline:
    def __init__(
        self, thread_stages: list[ThreadStage], async_stage: AsyncStage, *, max_in_flight_bytes: int, name: str
    ) -> None:
        self._thread_stages = [
            (stage, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-{index}"))
            for index, stage in enumerate(thread_stages)
        ]
        self._async_stage = async_stage
        self._max_in_flight_bytes = max_in_flight_bytes
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._in_flight_bytes = 0
        self._last_async: asyncio.Future[object] | None = None
        self._failure: BaseException | None = None

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight_bytes

    async def push(self, chunk: bytes) -> None:
        """Hands `chunk` to every stage; returns at once unless too much is in flight."""
        self._raise_failure()
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[object]] = [
            loop.run_in_executor(executor, stage, chunk) for stage, executor in self._thread_stages
        ]
        self._last_async = asyncio.ensure_future(self._after(self._last_async, chunk))
        done.append(self._last_async)
        for future in done:
            future.add_done_callback(self._note_failure)
        self._in_flight.append(_InFlight(len(chunk), done))
        self._in_flight_bytes += len(chunk)
        while self._in_flight_bytes > self._max_in_flight_bytes:
            await self._settle_oldest()

    async def finish(self) -> None:
        """Waits until every stage has taken every chunk; raises the first failure."""
        while self._in_flight:
            await self._settle_oldest()
        self._raise_failure()

    async def close(self) -> None:
        """Waits for the stages' running work (the caller may abort the writer only once
        nothing writes any more), without raising, and lets the stage threads go."""
        for entry in self._in_flight:
            await asyncio.gather(*entry.done, return_exceptions=True)
        self._in_flight.clear()
        self._in_flight_bytes = 0
        for _, executor in self._thread_stages:
            executor.shutdown(wait=False)

    async def _after(self, previous: asyncio.Future[object] | None, chunk: bytes) -> object:
        """The async stage in order: each call starts once the one before it has ended."""
        if previous is not None:
            await previous  # a failed predecessor fails this one too: nothing is written past a gap
        await self._async_stage(chunk)
        return None

    async def _settle_oldest(self) -> None:
        oldest = self._in_flight.popleft()
        self._in_flight_bytes -= oldest.size
        await asyncio.gather(*oldest.done, return_exceptions=True)
        self._raise_failure()

    def _note_failure(self, future: asyncio.Future[object]) -> None:
        if self._failure is None and not future.cancelled() and future.exception() is not None:
            self._failure = future.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure


@contextlib.asynccontextmanager
async def chunk_pipeline(
    thread_stages: list[ThreadStage], async_stage: AsyncStage, *, max_in_flight_bytes: int, name: str
) -> AsyncIterator[ChunkPipeline]:
    """A pipeline that is closed however the block ends, even when cancelled: the caller's
    clean-up (aborting the writer) must not race a write still under way."""
    pipeline = ChunkPipeline(thread_stages, async_stage, max_in_flight_bytes=max_in_flight_bytes, name=name)
    try:
        yield pipeline
    finally:
        closing = asyncio.ensure_future(pipeline.close())
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
            raise
