"""Removing a model as a delete task: cached weights, stored archive, document, in an
order that is safe to interrupt.

The document is hidden first (no read or deploy sees the model from then on), then each
stage is recorded on the task before it runs. If the replica dies half-way, the janitor
finishes the job under the same task, so the task always ends.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import uuid
from typing import Any, Protocol

from server.archives.stores import ArchiveStore
from server.core.catalog import model_not_found
from server.core.models import StoredModel, utc_now
from server.core.tenancy import TenancyService
from server.deploy.specs import LOADING
from server.errors import DeleteTaskNotFound, ModelAliased, ModelDeploying
from server.persistence.aliases import AliasRepository
from server.persistence.delete_tasks import ARCHIVE, DOCUMENT, UNDEPLOY, DeleteTask, DeleteTaskRepository
from server.persistence.mongo import ModelRepository

logger = logging.getLogger(__name__)


class CacheEviction(Protocol):
    async def undeploy(self, model_id: str) -> str: ...


class DeletionService:
    def __init__(
        self, tenancy: TenancyService, models: ModelRepository, store: ArchiveStore, cache: CacheEviction,
        tasks: DeleteTaskRepository, aliases: AliasRepository,
    ) -> None:
        self._tenancy = tenancy
        self._models = models
        self._store = store
        self._cache = cache
        self._tasks = tasks
        self._aliases = aliases
        self._running: set[asyncio.Task[Any]] = set()

    async def delete(
        self, bearer_token: str | None, namespace_id: str, model_id: str, *, wait: bool = True,
        params: dict[str, Any] | None = None,
    ) -> DeleteTask:
        """Starts the model's delete task; with `wait`, returns it ended (raising
        ModelDeploying if a load is under way), else at once, running."""
        await self._tenancy.authorize(bearer_token, namespace_id)
        for alias in await self._aliases.pointing_at(namespace_id, [model_id]):
            raise ModelAliased(
                f"model {model_id!r} is what alias {alias.reference} resolves to: point the alias at another "
                "model (or delete it) first", model_id=model_id, alias=alias.reference,
            )
        model = await self._models.mark_deleting(namespace_id, model_id, utc_now())
        if model is None:
            raise model_not_found(namespace_id, model_id)
        task = await self._tasks.create(
            uuid.uuid4().hex, model_id, namespace_id, is_async=not wait, now=utc_now(), params=params
        )
        if wait:
            return await self._run(model, task, refuse_while_loading=True)
        running = asyncio.create_task(self._run_logged(model, task))
        self._running.add(running)
        running.add_done_callback(self._running.discard)
        return task

    async def get_task(self, bearer_token: str | None, namespace_id: str, task_id: str) -> DeleteTask:
        await self._tenancy.authorize(bearer_token, namespace_id)
        task = await self._tasks.get(task_id)
        if task is None or task.namespace_id != namespace_id:
            raise DeleteTaskNotFound(
                f"delete task {task_id!r} not found in namespace {namespace_id!r}",
                id=task_id, resource="delete_task", namespace_id=namespace_id,
            )
        return task

    async def latest_task(self, bearer_token: str | None, namespace_id: str, model_id: str) -> DeleteTask:
        await self._tenancy.authorize(bearer_token, namespace_id)
        task = await self._tasks.latest_for_model(model_id, namespace_id)
        if task is None:
            raise DeleteTaskNotFound(
                f"model {model_id!r} has no delete task in namespace {namespace_id!r}",
                model_id=model_id, resource="delete_task",
            )
        return task

    async def finish_stale(self, older_than: datetime.timedelta) -> int:
        """Completes deletions whose replica stopped before the end, under their task."""
        stale = await self._models.stale_deletions(utc_now() - older_than)
        for model in stale:
            task = await self._tasks.unfinished_for_model(model.model_id) or await self._tasks.create(
                uuid.uuid4().hex, model.model_id, model.metadata.namespace_id, is_async=True, now=utc_now(),
            )
            await self._run(model, task, refuse_while_loading=False)
        return len(stale)

    async def _run(self, model: StoredModel, task: DeleteTask, *, refuse_while_loading: bool) -> DeleteTask:
        """The stages; each recorded before it runs, each safe to run again."""
        await self._tasks.set_stage(task.task_id, UNDEPLOY, utc_now())
        if await self._cache.undeploy(model.model_id) == LOADING and refuse_while_loading:
            await self._models.restore_ready(model.model_id)
            refusal = ModelDeploying(
                f"model {model.model_id!r} is being deployed; delete it once the deployment ends",
                model_id=model.model_id,
            )
            await self._tasks.finish(task.task_id, utc_now(), error=f"{UNDEPLOY}: {refusal.reason}: {refusal.message}")
            raise refusal
        await self._tasks.set_stage(task.task_id, ARCHIVE, utc_now())
        await self._store.delete(model.archive_key)
        if model.deploy_form is not None:
            await self._store.delete(model.deploy_form.key)
        await self._tasks.set_stage(task.task_id, DOCUMENT, utc_now())
        await self._models.remove_deleted(model.model_id)
        finished = await self._tasks.finish(task.task_id, utc_now())
        logger.info("deleted model %s (%s), task %s", model.model_id, model.metadata.namespace_id, task.task_id)
        return finished or task

    async def _run_logged(self, model: StoredModel, task: DeleteTask) -> None:
        try:
            await self._run(model, task, refuse_while_loading=True)
        except ModelDeploying:
            pass  # recorded on the task
        except Exception:  # the janitor finishes it once the model's lease runs out
            logger.exception("delete task %s of model %s stopped; the janitor will finish it", task.task_id, model.model_id)
