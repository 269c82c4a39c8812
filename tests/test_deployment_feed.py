"""The shared deployment feed, driven by an in-memory reader that counts its reads: the
number of MongoDB reads does not grow with the number of followers, every follower gets
every event in order, and a failed read reaches each follower."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from server.core.deployment_feed import DeploymentFeed, TaskFeed
from server.core.models import utc_now
from server.persistence.deployments import COMPLETED, RUNNING, DeploymentEvent, DeployTask

POLL_SECONDS = 0.01


class CountingReader:
    """One deployment, advanced by the test; counts every read."""

    def __init__(self) -> None:
        now = utc_now()
        self.task = DeployTask("task", "model", "ns", RUNNING, "download", 0, now, now, False)
        self.events: list[DeploymentEvent] = []
        self.reads = 0
        self.failure: Exception | None = None

    def append(self, state: str, *, finished: bool = False) -> None:
        sequence = len(self.events) + 1
        self.events.append(DeploymentEvent("task", "model", "ns", sequence, state, utc_now()))
        self.task = dataclasses.replace(
            self.task, last_sequence=sequence, state=COMPLETED if finished else self.task.state
        )

    async def get(self, task_id: str) -> DeployTask | None:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        return self.task if task_id == "task" else None

    async def events_after(self, task_id: str, after_sequence: int) -> list[DeploymentEvent]:
        self.reads += 1
        return [event for event in self.events if event.sequence > after_sequence]


async def _follow_to_the_end(feed: DeploymentFeed, sequences: list[int]) -> None:
    async with feed.follow("task") as followed:
        await followed.loaded()
        index = 0
        while True:
            change = followed.next_change()
            while index < len(followed.events):
                event = followed.events[index]
                index += 1
                sequences.append(event.sequence)
                if event.terminal:
                    return
            followed.raise_if_failed()
            await change.wait()


async def _reads_while_followed_by(followers: int) -> tuple[int, list[list[int]]]:
    reader = CountingReader()
    reader.append("queued")
    feed = DeploymentFeed(reader, POLL_SECONDS)
    seen: list[list[int]] = [[] for _ in range(followers)]
    watchers = [asyncio.create_task(_follow_to_the_end(feed, sequences)) for sequences in seen]
    for state in ("downloading", "verifying", "decoding", "caching"):
        await asyncio.sleep(10 * POLL_SECONDS)
        reader.append(state)
    await asyncio.sleep(10 * POLL_SECONDS)
    reader.append("deployed", finished=True)
    await asyncio.gather(*watchers)
    assert feed.followed == 0  # the poller left with the last follower
    return reader.reads, seen


async def test_reads_do_not_grow_with_the_number_of_followers() -> None:
    one_reads, [one_seen] = await _reads_while_followed_by(1)
    many_reads, many_seen = await _reads_while_followed_by(500)
    assert one_seen == [1, 2, 3, 4, 5, 6]
    assert all(seen == one_seen for seen in many_seen)
    # Same poll schedule for both runs; scheduling noise may add a few polls, never 500x.
    assert many_reads < 2 * one_reads + 10, (one_reads, many_reads)


async def test_a_failed_read_reaches_every_follower_and_the_next_follower_starts_afresh() -> None:
    reader = CountingReader()
    reader.append("queued")
    feed = DeploymentFeed(reader, POLL_SECONDS)
    reader.failure = ConnectionError("MongoDB is unavailable")
    for _ in range(2):
        async with feed.follow("task") as followed:
            with pytest.raises(ConnectionError):
                await followed.loaded()
    reader.failure = None
    async with feed.follow("task") as followed:
        await followed.loaded()
        assert [event.state for event in followed.events] == ["queued"]


async def test_an_unknown_task_is_a_finished_feed_without_events() -> None:
    feed = DeploymentFeed(CountingReader(), POLL_SECONDS)
    async with feed.follow("another") as followed:
        await followed.loaded()
        assert (followed.finished, followed.events, followed.task) == (True, [], None)


def test_index_after_finds_the_first_later_event() -> None:
    feed = TaskFeed("task")
    reader = CountingReader()
    for state in ("queued", "downloading", "verifying"):
        reader.append(state)
    feed.publish(events=reader.events, task=reader.task)
    assert [feed.index_after(sequence) for sequence in (0, 1, 3, 9)] == [0, 1, 3, 3]
