"""The service's handle on the Ray cluster: connect, find or create the model cache."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from server.deploy.cache_actor import CACHE_NAMESPACE, ModelCache, cache_actor_name
from modelservice_sdk.model import ModelNotAvailable
from server.deploy.specs import CacheConfig, DeployTicket
from server.dependencies import RayUnavailable, bounded
from server.errors import ModelNotFound

logger = logging.getLogger(__name__)


class RayModelCluster:
    """Talks to the detached model cache actor; recreates it if the cluster lost it."""

    def __init__(self, address: str, config: CacheConfig, call_timeout_seconds: float = 30.0) -> None:
        self._address = address
        self._config = config
        self._config_timeout = call_timeout_seconds
        self._replacing = asyncio.Lock()
        self._actor: Any = None
        self._owns_connection = False

    @property
    def actor_name(self) -> str:
        return cache_actor_name(self._config.database)

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)
        counts = await self.reconcile()
        logger.info("model cache %s reconciled: %s", self.actor_name, counts)

    async def reconcile(self) -> dict[str, int]:
        """Makes MongoDB agree with the cache (interrupted deployments, lost weights)."""
        counts: dict[str, int] = await self._call(lambda actor: actor.reconcile.remote())
        return counts

    async def deploy(self, model_id: str, is_async: bool) -> DeployTicket:
        try:
            ticket: DeployTicket = await self._call(lambda actor: actor.deploy.remote(model_id, is_async))
        except ModelNotAvailable as gone:  # deleted between the caller's check and the cache's
            raise ModelNotFound(str(gone), id=model_id, resource="model") from None
        return ticket

    async def undeploy(self, model_id: str) -> str:
        outcome: str = await self._call(lambda actor: actor.undeploy.remote(model_id))
        return outcome

    async def ping(self) -> None:
        """Raises unless the cache actor answers; recreates it if it died (for the monitor,
        which so notices a lost cache within seconds and makes MongoDB say so)."""
        await self._call(lambda actor: actor.ping.remote())

    async def stats(self) -> dict[str, int]:
        stats: dict[str, int] = await self._call(lambda actor: actor.stats.remote())
        return stats

    async def close(self) -> None:
        if self._owns_connection:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._owns_connection = False

    def _connect(self) -> None:
        import ray

        if not ray.is_initialized():
            ray.init(
                address=self._address,
                namespace=CACHE_NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
            self._owns_connection = True
        self._actor = self._get_or_create_actor()

    def _get_or_create_actor(self) -> Any:
        """The cache actor, holding this replica's settings (an actor that outlived an
        earlier run may hold stale ones: it is told the current settings)."""
        import ray

        actor = self._create_actor()
        try:
            ray.get(actor.configure.remote(self._config), timeout=self._config_timeout)
        except AttributeError:
            # An actor of an older release of this code, without `configure`: replace it.
            # Its weights go with it; reconcile marks them lost and they load on demand.
            logger.warning("model cache %s predates this release; replacing it", self.actor_name)
            ray.kill(actor)
            actor = self._create_actor()
        return actor

    def _create_actor(self) -> Any:
        import ray

        return (
            ray.remote(ModelCache)
            .options(
                name=self.actor_name,
                namespace=CACHE_NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                num_cpus=0,
                max_concurrency=1000,
                max_restarts=0,
            )
            .remote(self._config)
        )

    async def _call(self, method: Callable[[Any], Awaitable[Any]]) -> Any:
        import ray

        try:
            return await self._bounded(method(self._actor))
        except ray.exceptions.RayActorError:
            # The cache died (killed, Ray restarted, node lost): its weights are gone. A new
            # cache starts empty and reconciles MongoDB before serving again.
            logger.warning("model cache %s is gone; starting a new one", self.actor_name)
            async with self._replacing:
                self._actor = await self._bounded(asyncio.to_thread(self._get_or_create_actor))
                await self._bounded(self._actor.reconcile.remote())
            return await self._bounded(method(self._actor))

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        return await bounded(
            call, self._config_timeout,
            RayUnavailable(f"the Ray cluster did not answer within {self._config_timeout:g}s; retry shortly", dependency="ray"),
        )
