"""A crash at any point of recording a deployment leaves a state that start-up repairs,
and start-up never fails on data the service wrote itself (real MongoDB and Ray)."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from server.app import ModelServiceApp
from server.persistence.mongo import as_utc_datetime

pytestmark = pytest.mark.integration


@pytest.fixture
async def db(app: ModelServiceApp) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(app.mongodb_uri, tz_aware=True)
    try:
        yield mongo[app.settings.mongodb_database]
    finally:
        await mongo.close()


async def _task_killed_after_event(db: AsyncDatabase[dict[str, Any]], states: list[str], mirrored: int) -> str:
    """What a cache killed between the two writes of an event leaves: every event of
    `states` stored, the task document mirroring only the first `mirrored` of them."""
    task_id = uuid.uuid4().hex
    now = datetime.datetime.now(datetime.UTC)
    common = {"model_id": f"gone-{task_id}", "namespace_id": "crash-test"}
    await db["deploy_tasks"].insert_one({
        "_id": task_id, **common, "task_type": "DEPLOY_MODEL", "state": "RUNNING",
        "stage": states[mirrored - 1], "last_sequence": mirrored, "worker_node": [], "error": "",
        "is_async": True, "create_time": now, "last_update_time": now, "create_epoch": now.timestamp(),
    })
    for sequence, state in enumerate(states, start=1):
        await db["deployment_events"].insert_one({
            "task_id": task_id, **common, "sequence": sequence, "state": state, "time": now,
            "bytes_done": 0, "bytes_total": 0, "failed_stage": "", "error_reason": "", "message": "",
        })
    return task_id


async def test_an_event_stored_without_its_task_mirror_is_closed_once_and_start_up_survives(
    app: ModelServiceApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    task_id = await _task_killed_after_event(db, ["queued", "downloading", "verifying"], mirrored=2)
    await app.cluster.reconcile()
    await app.cluster.reconcile()  # the next start: nothing left to do, no DuplicateKeyError
    task = await db["deploy_tasks"].find_one({"_id": task_id})
    events = [e async for e in db["deployment_events"].find({"task_id": task_id}).sort("sequence", 1)]
    assert task is not None and task["state"] == "FAILED" and task["last_sequence"] == 4
    assert [e["state"] for e in events] == ["queued", "downloading", "verifying", "failed"]
    assert events[-1]["error_reason"] == "INTERRUPTED" and events[-1]["failed_stage"] == "verify"


async def test_a_terminal_event_stored_without_its_mirror_is_only_mirrored(
    app: ModelServiceApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    task_id = await _task_killed_after_event(db, ["queued", "downloading", "deployed"], mirrored=2)
    await app.cluster.reconcile()
    task = await db["deploy_tasks"].find_one({"_id": task_id})
    assert task is not None and (task["state"], task["last_sequence"]) == ("COMPLETED", 3)
    assert await db["deployment_events"].count_documents({"task_id": task_id}) == 3


async def test_finished_tasks_and_events_carry_an_expiry_and_ttl_indexes_exist(
    app: ModelServiceApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    task_id = await _task_killed_after_event(db, ["queued"], mirrored=1)
    await app.cluster.reconcile()
    task = await db["deploy_tasks"].find_one({"_id": task_id})
    failed = await db["deployment_events"].find_one({"task_id": task_id, "state": "failed"})
    retention = datetime.timedelta(seconds=app.settings.deploy_task_retention_seconds)
    assert task is not None and failed is not None
    expires = as_utc_datetime(task["expire_at"]) - as_utc_datetime(failed["time"])
    assert abs((expires - retention).total_seconds()) < 1
    for collection in ("deploy_tasks", "deployment_events"):
        indexes = [index async for index in await db[collection].list_indexes()]
        ttl = [index for index in indexes if list(index["key"]) == ["expire_at"]]
        assert len(ttl) == 1 and ttl[0].get("expireAfterSeconds") == 0, indexes
