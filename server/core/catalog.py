"""Reading models: the one authorized lookup that GetModel and deployments share, and listing."""

from __future__ import annotations

from dataclasses import dataclass

from server.core.models import Namespace, NamespaceUsage, StoredModel
from server.core.tenancy import TenancyService
from server.errors import InvalidArgument, ModelNotFound
from server.persistence.mongo import ModelRepository


def model_not_found(namespace_id: str, model_id: str) -> ModelNotFound:
    return ModelNotFound(
        f"model {model_id!r} not found in namespace {namespace_id!r}",
        id=model_id, resource="model", namespace_id=namespace_id,
    )


DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


@dataclass(frozen=True)
class ModelPage:
    models: list[StoredModel]
    next_page_token: str


class ModelCatalog:
    def __init__(self, tenancy: TenancyService, models: ModelRepository) -> None:
        self._tenancy = tenancy
        self._models = models

    async def get(self, bearer_token: str | None, namespace_id: str, model_id: str) -> StoredModel:
        """The namespace's model; another namespace's answers exactly like a missing one."""
        _, model = await self.get_with_namespace(bearer_token, namespace_id, model_id)
        return model

    async def get_with_namespace(
        self, bearer_token: str | None, namespace_id: str, model_id: str
    ) -> tuple[Namespace, StoredModel]:
        """`get`, and the namespace (its quotas and defaults) the authorization read."""
        namespace = await self._tenancy.authorize(bearer_token, namespace_id)
        model = await self._models.get(namespace_id, model_id)
        if model is None:
            raise model_not_found(namespace_id, model_id)
        return namespace, model

    async def usage(self, namespace_id: str) -> NamespaceUsage:
        """What the namespace holds, as its quotas count it (the caller has authorized)."""
        return await self._models.namespace_usage(namespace_id)

    async def page(self, bearer_token: str | None, namespace_id: str, page_size: int, page_token: str) -> ModelPage:
        """A page of the namespace's models in id order; the token is the last id served."""
        await self._tenancy.authorize(bearer_token, namespace_id)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 1 and {MAX_PAGE_SIZE}", field="page_size", maximum=MAX_PAGE_SIZE
            )
        size = page_size or DEFAULT_PAGE_SIZE
        # One more than asked tells whether another page follows.
        models = await self._models.page(namespace_id, page_token, size + 1)
        if len(models) > size:
            return ModelPage(models[:size], models[size - 1].model_id)
        return ModelPage(models, "")
