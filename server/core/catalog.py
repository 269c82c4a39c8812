"""Reading models: the one authorized lookup that GetModel and deployments share."""

from __future__ import annotations

from server.core.models import StoredModel
from server.core.tenancy import TenancyService
from server.errors import ModelNotFound
from server.persistence.mongo import ModelRepository


class ModelCatalog:
    def __init__(self, tenancy: TenancyService, models: ModelRepository) -> None:
        self._tenancy = tenancy
        self._models = models

    async def get(self, bearer_token: str | None, namespace_id: str, model_id: str) -> StoredModel:
        """The namespace's model; another namespace's answers exactly like a missing one."""
        await self._tenancy.authorize(bearer_token, namespace_id)
        model = await self._models.get(namespace_id, model_id)
        if model is None:
            raise ModelNotFound(
                f"model {model_id!r} not found in namespace {namespace_id!r}",
                id=model_id, resource="model", namespace_id=namespace_id,
            )
        return model
