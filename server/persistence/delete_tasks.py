"""Delete tasks in MongoDB (the public API's deletion task, seed 004).

A deletion runs in stages (undeploy → archive → document); the task records the stage it
is in, so a deletion whose replica died is finished by the janitor under the same task.
Retention: finished tasks carry `expire_at`, and a TTL index removes them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from pymongo import DESCENDING
from pymongo.asynchronous.database import AsyncDatabase

from server.persistence.deployments import COMPLETED, CREATED, FAILED, RUNNING, UNFINISHED
from server.persistence.mongo import Document, as_utc_datetime

TASK_TYPE = "DELETE_MODEL"
#: The stages of a deletion, in order ("done" once finished).
UNDEPLOY, ARCHIVE, DOCUMENT, DONE = "undeploy", "archive", "document", "done"


@dataclass(frozen=True)
class DeleteTask:
    task_id: str
    model_id: str
    namespace_id: str
    state: str
    stage: str
    create_time: datetime.datetime
    last_update_time: datetime.datetime
    is_async: bool
    error: str = ""
    params: dict[str, Any] | None = None
    """Free-form parameters the caller sent with the deletion (kept for the record)."""

    @property
    def finished(self) -> bool:
        return self.state not in UNFINISHED


class DeleteTaskRepository:
    def __init__(self, db: AsyncDatabase[Document], retention: datetime.timedelta) -> None:
        self._tasks = db["delete_tasks"]
        self._retention = retention

    async def ensure_indexes(self) -> None:
        await self._tasks.create_index([("model_id", 1), ("create_epoch", DESCENDING)], name="by_model")
        await self._tasks.create_index("expire_at", expireAfterSeconds=0, name="retention")

    async def create(
        self, task_id: str, model_id: str, namespace_id: str, *, is_async: bool, now: datetime.datetime,
        params: dict[str, Any] | None = None,
    ) -> DeleteTask:
        document = {
            "_id": task_id, "model_id": model_id, "namespace_id": namespace_id, "task_type": TASK_TYPE,
            "state": CREATED, "stage": UNDEPLOY, "error": "", "is_async": is_async,
            "create_time": now, "last_update_time": now, "create_epoch": now.timestamp(),
            "params": params or {},
        }
        await self._tasks.insert_one(document)
        return _task(document)

    async def set_stage(self, task_id: str, stage: str, now: datetime.datetime) -> None:
        await self._tasks.update_one(
            {"_id": task_id, "state": {"$in": list(UNFINISHED)}},
            {"$set": {"state": RUNNING, "stage": stage, "last_update_time": now}},
        )

    async def finish(self, task_id: str, now: datetime.datetime, error: str = "") -> DeleteTask | None:
        """Ends the task (COMPLETED, or FAILED with `error`); returns it as it now stands."""
        await self._tasks.update_one(
            {"_id": task_id, "state": {"$in": list(UNFINISHED)}},
            {"$set": {
                "state": FAILED if error else COMPLETED, "stage": DONE if not error else "", "error": error,
                "last_update_time": now, "expire_at": now + self._retention,
            }},
        )
        return await self.get(task_id)

    async def get(self, task_id: str) -> DeleteTask | None:
        document = await self._tasks.find_one({"_id": task_id})
        return None if document is None else _task(document)

    async def latest_for_model(self, model_id: str, namespace_id: str) -> DeleteTask | None:
        cursor = self._tasks.find({"model_id": model_id, "namespace_id": namespace_id}).sort("create_epoch", DESCENDING).limit(1)
        async for document in cursor:
            return _task(document)
        return None

    async def unfinished_for_model(self, model_id: str) -> DeleteTask | None:
        cursor = self._tasks.find({"model_id": model_id, "state": {"$in": list(UNFINISHED)}}).limit(1)
        async for document in cursor:
            return _task(document)
        return None


def _task(document: Document) -> DeleteTask:
    return DeleteTask(
        task_id=document["_id"],
        model_id=document["model_id"],
        namespace_id=document["namespace_id"],
        state=document["state"],
        stage=document.get("stage", ""),
        create_time=as_utc_datetime(document["create_time"]),
        last_update_time=as_utc_datetime(document["last_update_time"]),
        is_async=bool(document.get("is_async")),
        error=document.get("error") or "",
        params=dict(document.get("params") or {}),
    )


