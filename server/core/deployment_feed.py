"""One feed per followed deployment and replica: MongoDB is read once per poll, however
many watchers (and waiting DeployModel calls) follow the deployment.

Why a poller and not a change stream: change streams need a replica set (the embedded
nx-27017 has none), and a deployment's events are few (tens per load), so one small read
per poll interval per followed deployment is cheap. What must not happen is a read per
watcher: a thousand watchers of one deploy made a thousand pollers, and their events
arrived seconds late. Here the feed keeps the deployment's events in memory while anyone
follows it, and wakes every follower when new ones arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from server.persistence.deployments import DeploymentEvent, DeployTask

logger = logging.getLogger(__name__)


class DeploymentReader(Protocol):
    async def get(self, task_id: str) -> DeployTask | None: ...

    async def events_after(self, task_id: str, after_sequence: int) -> list[DeploymentEvent]: ...


class TaskFeed:
    """A deployment's events as one poller reads them; followers read `events` by index."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.events: list[DeploymentEvent] = []
        self.finished = False
        """True once the task ended and every event it will have is in `events`."""
        self.task: DeployTask | None = None
        """The task as last read (None before the first read, or if it does not exist)."""
        self.error: BaseException | None = None
        self._loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self.followers = 0
        self.poller: asyncio.Task[None] | None = None

    def next_change(self) -> asyncio.Event:
        """An event set at the next change: take it BEFORE reading `events`, then wait on it."""
        return self._changed

    async def loaded(self) -> None:
        """Waits for the first read; raises what the reads failed with."""
        await self._loaded.wait()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def publish(
        self, *, events: Sequence[DeploymentEvent] = (), task: DeployTask | None, finished: bool = False,
        error: BaseException | None = None,
    ) -> None:
        self.events.extend(events)
        self.task = task
        self.finished = self.finished or finished
        self.error = error
        self._loaded.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def index_after(self, sequence: int) -> int:
        """Index in `events` of the first event after `sequence`."""
        for index, event in enumerate(self.events):
            if event.sequence > sequence:
                return index
        return len(self.events)


class DeploymentFeed:
    def __init__(self, reader: DeploymentReader, poll_seconds: float) -> None:
        self._reader = reader
        self._poll_seconds = poll_seconds
        self._feeds: dict[str, TaskFeed] = {}

    @property
    def followed(self) -> int:
        """Deployments followed right now (one poller each)."""
        return len(self._feeds)

    @contextlib.asynccontextmanager
    async def follow(self, task_id: str) -> AsyncIterator[TaskFeed]:
        """The deployment's feed while the caller follows it; its poller stops with the
        last follower."""
        feed = self._feeds.get(task_id)
        if feed is None or feed.error is not None:
            feed = TaskFeed(task_id)
            self._feeds[task_id] = feed
            feed.poller = asyncio.create_task(self._poll(feed), name=f"deployment-feed-{task_id}")
        feed.followers += 1
        try:
            yield feed
        finally:
            feed.followers -= 1
            if feed.followers == 0:
                if self._feeds.get(task_id) is feed:
                    del self._feeds[task_id]
                if feed.poller is not None:
                    feed.poller.cancel()

    async def _poll(self, feed: TaskFeed) -> None:
        cursor = 0
        try:
            while True:
                task = await self._reader.get(feed.task_id)
                new: list[DeploymentEvent] = []
                if task is not None and task.last_sequence > cursor:
                    new = await self._reader.events_after(feed.task_id, cursor)
                    cursor = new[-1].sequence if new else cursor
                done = task is None or (task.finished and cursor >= task.last_sequence)
                if new or done or feed.task is None:
                    feed.publish(events=new, task=task, finished=done)
                if done:
                    return
                await asyncio.sleep(self._poll_seconds)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # MongoDB unavailable: every follower hears it
            logger.info("deployment feed %s stopped: %s", feed.task_id, error)
            if self._feeds.get(feed.task_id) is feed:
                del self._feeds[feed.task_id]  # the next follower starts afresh
            feed.publish(task=feed.task, error=error)
