"""Removing a model: cached weights, stored archive, document — in an order that is safe
to interrupt. The document is hidden first (no read or deploy sees the model from then on),
and if the replica dies half-way the janitor finishes the job."""

from __future__ import annotations

import datetime
import logging
from typing import Protocol

from server.archives.stores import ArchiveStore
from server.core.catalog import model_not_found
from server.core.models import StoredModel, utc_now
from server.core.tenancy import TenancyService
from server.deploy.specs import LOADING
from server.errors import ModelDeploying
from server.persistence.mongo import ModelRepository

logger = logging.getLogger(__name__)


class CacheEviction(Protocol):
    async def undeploy(self, model_id: str) -> str: ...


class DeletionService:
    def __init__(
        self, tenancy: TenancyService, models: ModelRepository, store: ArchiveStore, cache: CacheEviction
    ) -> None:
        self._tenancy = tenancy
        self._models = models
        self._store = store
        self._cache = cache

    async def delete(self, bearer_token: str | None, namespace_id: str, model_id: str) -> StoredModel:
        await self._tenancy.authorize(bearer_token, namespace_id)
        model = await self._models.mark_deleting(namespace_id, model_id, utc_now())
        if model is None:
            raise model_not_found(namespace_id, model_id)
        if await self._cache.undeploy(model_id) == LOADING:
            await self._models.restore_ready(model_id)
            raise ModelDeploying(
                f"model {model_id!r} is being deployed; delete it once the deployment ends",
                model_id=model_id,
            )
        await self.finish(model)
        return model

    async def finish(self, model: StoredModel) -> None:
        """The part of a deletion that may be retried: archive, then document."""
        await self._store.delete(model.archive_key)
        await self._models.remove_deleted(model.model_id)
        logger.info("deleted model %s (%s)", model.model_id, model.metadata.namespace_id)

    async def finish_stale(self, older_than: datetime.timedelta) -> int:
        """Completes deletions whose replica stopped before the end."""
        stale = await self._models.stale_deletions(utc_now() - older_than)
        for model in stale:
            await self._cache.undeploy(model.model_id)
            await self.finish(model)
        return len(stale)
