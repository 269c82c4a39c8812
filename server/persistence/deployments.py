"""Deploy tasks and their events in MongoDB.

Every state change of a deployment is an event document with a per-task sequence number
(unique index), so any replica can replay a deployment to a watcher from any point. The
task document mirrors the latest event (OpenSearch's task shape).

Recording an event takes two writes (the event, then the task's mirror). Both are
idempotent, so a crash between them is repaired by replaying: an event already stored at
its sequence is not an error, and the mirror only ever moves forward (`last_sequence` is
conditioned on being lower). The events are the truth; `repair_task` rebuilds a task's
mirror from its last event.

Retention: finished tasks and every event carry `expire_at`, and TTL indexes remove them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from server.persistence.mongo import Document, as_utc_datetime

TASK_TYPE = "DEPLOY_MODEL"
CREATED, RUNNING, COMPLETED, FAILED = "CREATED", "RUNNING", "COMPLETED", "FAILED"
UNFINISHED = (CREATED, RUNNING)

#: Task state implied by each event state.
TASK_STATE_OF_EVENT = {
    "queued": CREATED,
    "downloading": RUNNING,
    "verifying": RUNNING,
    "decoding": RUNNING,
    "caching": RUNNING,
    "deployed": COMPLETED,
    "failed": FAILED,
    # After the deployment completed: the cache let the weights go (LRU, idle time-out).
    "evicted": COMPLETED,
    "undeployed": COMPLETED,
    # After the deployment completed: an alias moved to the deployed model.
    "aliased": COMPLETED,
}
TERMINAL_EVENT_STATES = ("deployed", "failed", "evicted", "undeployed", "aliased")


@dataclass(frozen=True)
class DeploymentEvent:
    task_id: str
    model_id: str
    namespace_id: str
    sequence: int
    state: str
    time: datetime.datetime
    bytes_done: int = 0
    bytes_total: int = 0
    failed_stage: str = ""
    error_reason: str = ""
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_EVENT_STATES


@dataclass(frozen=True)
class DeployTask:
    task_id: str
    model_id: str
    namespace_id: str
    state: str
    stage: str
    last_sequence: int
    create_time: datetime.datetime
    last_update_time: datetime.datetime
    is_async: bool
    error: str = ""
    worker_node: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    """The deploy request's free-form parameters."""
    trigger: str = ""
    """AUTO_REDEPLOY for a deploy no one asked for ("" for a request)."""

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED


DEFAULT_RETENTION_SECONDS = 7 * 24 * 3600.0


class DeploymentRepository:
    def __init__(self, db: AsyncDatabase[Document], retention_seconds: float = DEFAULT_RETENTION_SECONDS) -> None:
        self._tasks = db["deploy_tasks"]
        self._events = db["deployment_events"]
        self._retention = datetime.timedelta(seconds=retention_seconds)

    async def ensure_indexes(self) -> None:
        await self._events.create_index(
            [("task_id", ASCENDING), ("sequence", ASCENDING)], unique=True, name="unique_task_sequence"
        )
        await self._tasks.create_index([("model_id", ASCENDING), ("create_time", DESCENDING)])
        await self._tasks.create_index([("state", ASCENDING)])
        # Documents without expire_at (unfinished tasks) never expire.
        await self._tasks.create_index("expire_at", expireAfterSeconds=0, name="retention")
        await self._events.create_index("expire_at", expireAfterSeconds=0, name="retention")

    async def create(
        self, task_id: str, model_id: str, namespace_id: str, is_async: bool, now: datetime.datetime,
        config: dict[str, Any] | None = None, trigger: str = "",
    ) -> None:
        await self._tasks.insert_one(
            {
                "_id": task_id,
                "model_id": model_id,
                "namespace_id": namespace_id,
                "task_type": TASK_TYPE,
                "state": CREATED,
                "stage": "queued",
                "last_sequence": 0,
                "worker_node": [],
                "error": "",
                "is_async": is_async,
                "config": config or {},
                "trigger": trigger,
                "create_time": now,
                "last_update_time": now,
                # Epoch seconds as well: what range queries compare (see persistence.mongo).
                "create_epoch": now.timestamp(),
            }
        )

    async def append(self, event: DeploymentEvent, worker_node: str = "") -> None:
        """Records an event and mirrors it on the task document; safe to replay."""
        try:
            await self._events.insert_one(
                {
                    "task_id": event.task_id,
                    "model_id": event.model_id,
                    "namespace_id": event.namespace_id,
                    "sequence": event.sequence,
                    "state": event.state,
                    "time": event.time,
                    "bytes_done": event.bytes_done,
                    "bytes_total": event.bytes_total,
                    "failed_stage": event.failed_stage,
                    "error_reason": event.error_reason,
                    "message": event.message,
                    "expire_at": event.time + self._retention,
                }
            )
        except DuplicateKeyError:
            pass  # recorded by an earlier attempt that died before mirroring it
        await self._mirror(event, worker_node)

    async def _mirror(self, event: DeploymentEvent, worker_node: str = "") -> None:
        update: dict[str, Any] = {
            "state": TASK_STATE_OF_EVENT.get(event.state, RUNNING),
            "stage": event.state,
            "last_sequence": event.sequence,
            "last_update_time": event.time,
        }
        if event.state == "failed":
            update["error"] = f"{event.failed_stage}: {event.error_reason}: {event.message}"
        if event.terminal:
            update["expire_at"] = event.time + self._retention
        if worker_node:
            update["worker_node"] = [worker_node]
        await self._tasks.update_one(
            {"_id": event.task_id, "last_sequence": {"$lt": event.sequence}}, {"$set": update}
        )

    async def repair_task(self, task: DeployTask) -> tuple[DeployTask, DeploymentEvent | None]:
        """Brings a task's mirror up to its last stored event (after a crash between the
        two writes of `append`); returns the task as repaired and its last event."""
        last = await self.last_event(task.task_id)
        if last is None or last.sequence <= task.last_sequence:
            return task, last
        await self._mirror(last)
        repaired = await self.get(task.task_id)
        return (repaired or task), last

    async def get(self, task_id: str) -> DeployTask | None:
        document = await self._tasks.find_one({"_id": task_id})
        return None if document is None else _task(document)

    async def latest_for_model(self, model_id: str) -> DeployTask | None:
        cursor = self._tasks.find({"model_id": model_id}).sort("create_epoch", DESCENDING).limit(1)
        async for document in cursor:
            return _task(document)
        return None

    async def events_after(self, task_id: str, after_sequence: int) -> list[DeploymentEvent]:
        cursor = self._events.find({"task_id": task_id, "sequence": {"$gt": after_sequence}}).sort("sequence", ASCENDING)
        return [_event(document) async for document in cursor]

    async def last_event(self, task_id: str) -> DeploymentEvent | None:
        cursor = self._events.find({"task_id": task_id}).sort("sequence", DESCENDING).limit(1)
        async for document in cursor:
            return _event(document)
        return None

    async def unfinished(self) -> list[DeployTask]:
        cursor = self._tasks.find({"state": {"$in": list(UNFINISHED)}})
        return [_task(document) async for document in cursor]


def _task(document: Document) -> DeployTask:
    return DeployTask(
        task_id=document["_id"],
        model_id=document["model_id"],
        namespace_id=document["namespace_id"],
        state=document["state"],
        stage=document.get("stage", ""),
        last_sequence=int(document.get("last_sequence", 0)),
        create_time=as_utc_datetime(document["create_time"]),
        last_update_time=as_utc_datetime(document["last_update_time"]),
        is_async=bool(document.get("is_async")),
        error=document.get("error") or "",
        worker_node=list(document.get("worker_node") or []),
        config=dict(document.get("config") or {}),
        trigger=document.get("trigger") or "",
    )


def _event(document: Document) -> DeploymentEvent:
    return DeploymentEvent(
        task_id=document["task_id"],
        model_id=document["model_id"],
        namespace_id=document["namespace_id"],
        sequence=int(document["sequence"]),
        state=document["state"],
        time=as_utc_datetime(document["time"]),
        bytes_done=int(document.get("bytes_done") or 0),
        bytes_total=int(document.get("bytes_total") or 0),
        failed_stage=document.get("failed_stage") or "",
        error_reason=document.get("error_reason") or "",
        message=document.get("message") or "",
    )
