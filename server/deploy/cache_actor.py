"""The model cache actor: a detached Ray actor, one per service deployment (metadata database).

This module is deliberately light. A plugin finds the cache with `ray.get_actor`, and Ray
builds the handle from the actor's class, importing this module in every fresh plugin
worker; the cache's real work (`server.deploy.cache_core`, with pymongo, the decoders and
the policy) is imported only inside the actor. Measured on a 2-core machine: importing
the whole cache in a fresh worker took about 75 ms of the plugin's first call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.deploy.specs import CacheConfig, CacheSnapshot, DeployOptions, DeployTicket, NodeUsage

CACHE_NAMESPACE = "modelservice"
"""Ray namespace of the cache actor (detached actors are found by namespace and name)."""


def cache_actor_name(database_name: str) -> str:
    """One cache per metadata database: replicas of one deployment share it."""
    return f"model-cache-{database_name}"


def plugin_endpoint(model_id: str) -> str:
    return f'load_namespace_model("{model_id}")'


class ModelCache:
    """Use through `ray.remote(ModelCache)`; see `server.deploy.cluster`. Each method hands
    the call to the `CacheCore` this actor holds (see there for what each does)."""

    def __init__(self, config: CacheConfig) -> None:
        from server.deploy.cache_core import CacheCore

        self._core = CacheCore(config)

    # ----- called by plugins (`modelservice_sdk.loader`) ------------------------------

    async def lookup(self, model_id: str, namespace_id: str | None = None, node_id: str | None = None) -> list[Any] | None:
        return await self._core.lookup(model_id, namespace_id, node_id)

    async def ensure(self, model_id: str, namespace_id: str | None = None, node_id: str | None = None) -> list[Any]:
        return await self._core.ensure(model_id, namespace_id, node_id)

    async def touch(self, model_id: str) -> None:
        await self._core.touch(model_id)

    # ----- called by the service and by load tasks -----------------------------------

    async def configure(self, config: CacheConfig) -> bool:
        return await self._core.configure(config)

    async def deploy(self, model_id: str, is_async: bool, options: DeployOptions | None = None) -> DeployTicket:
        return await self._core.deploy(model_id, is_async, options)

    async def point_alias(self, namespace_id: str, model_name: str, alias: str, model_id: str) -> str:
        return await self._core.point_alias(namespace_id, model_name, alias, model_id)

    async def delete_alias(self, namespace_id: str, model_name: str, alias: str) -> bool:
        return await self._core.delete_alias(namespace_id, model_name, alias)

    async def report(self, task_id: str, event: dict[str, Any]) -> None:
        await self._core.report(task_id, event)

    async def undeploy(self, model_id: str) -> str:
        return await self._core.undeploy(model_id)

    async def reconcile(self) -> dict[str, int]:
        return await self._core.reconcile()

    async def cache_status(self) -> list[NodeUsage]:
        return await self._core.cache_status()

    async def metrics_snapshot(self) -> CacheSnapshot:
        return await self._core.metrics_snapshot()

    async def ping(self) -> bool:
        """Liveness, for the service's dependency monitor."""
        return True

    async def stats(self) -> dict[str, int]:
        return await self._core.stats()
