"""The service's handle on the Ray cluster: connect, find or create the model cache.

Outages: every call to the cache has a time budget (RAY_UNAVAILABLE past it). When the
cluster stops answering altogether (its head died), the service stays up: Ray's driver is
told not to exit the process after its default 60 s without the head, health turns
NOT_SERVING, and once the head answers again the service reconnects, recreates the cache
and reconciles (models whose weights died with the cluster are marked not deployed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from server.deploy.cache_actor import CACHE_NAMESPACE, ModelCache, cache_actor_name
from modelservice_sdk.model import ModelNotAvailable
from server.deploy.specs import CacheConfig, CacheSnapshot, DeployOptions, DeployTicket, NodeUsage
from server.dependencies import RayUnavailable, bounded
from server.errors import ModelNotFound
from server.settings import keep_ray_driver_through_head_outages

FAILED_PINGS_BEFORE_RECONNECT = 2
PING_TIMEOUT_SECONDS = 3.0

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
        self._failed_pings = 0
        self._reconnection: asyncio.Task[None] | None = None

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

    async def deploy(self, model_id: str, is_async: bool, options: DeployOptions) -> DeployTicket:
        try:
            ticket: DeployTicket = await self._call(lambda actor: actor.deploy.remote(model_id, is_async, options))
        except ModelNotAvailable as gone:  # deleted between the caller's check and the cache's
            raise ModelNotFound(str(gone), id=model_id, resource="model") from None
        return ticket

    async def undeploy(self, model_id: str) -> str:
        outcome: str = await self._call(lambda actor: actor.undeploy.remote(model_id))
        return outcome

    async def point_alias(self, namespace_id: str, model_name: str, alias: str, model_id: str) -> str:
        message: str = await self._call(lambda actor: actor.point_alias.remote(namespace_id, model_name, alias, model_id))
        return message

    async def delete_alias(self, namespace_id: str, model_name: str, alias: str) -> bool:
        deleted: bool = await self._call(lambda actor: actor.delete_alias.remote(namespace_id, model_name, alias))
        return deleted

    async def metrics_snapshot(self) -> CacheSnapshot:
        snapshot: CacheSnapshot = await self._call(lambda actor: actor.metrics_snapshot.remote())
        return snapshot

    async def cache_status(self) -> list[NodeUsage]:
        nodes: list[NodeUsage] = await self._call(lambda actor: actor.cache_status.remote())
        return nodes

    async def ping(self) -> None:
        """Raises unless the cache actor answers (for the dependency monitor).

        A dead actor is recreated (so a lost cache is noticed within seconds and MongoDB
        made to say so); a cluster that stopped answering is reconnected in the background.
        """
        try:
            await self._call(lambda actor: actor.ping.remote(), timeout=PING_TIMEOUT_SECONDS)
        except RayUnavailable:
            self._failed_pings += 1
            if self._failed_pings >= FAILED_PINGS_BEFORE_RECONNECT and self._owns_connection:
                self._start_reconnection()
            raise
        self._failed_pings = 0

    def _start_reconnection(self) -> None:
        if self._reconnection is None or self._reconnection.done():
            self._reconnection = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Waits for the head to accept connections, then connects anew (a restarted head
        is a new cluster: the old connection cannot be resumed)."""
        import ray

        logger.warning("the Ray cluster at %s stopped answering; reconnecting once it is back", self._address)
        while not await asyncio.to_thread(_accepts_connections, self._address):
            await asyncio.sleep(1.0)
        try:
            await asyncio.to_thread(ray.shutdown)
            self._owns_connection = False
            await asyncio.to_thread(self._connect)
            counts = await self._call(lambda actor: actor.reconcile.remote(), during_reconnection=True)
        except Exception:
            logger.exception("reconnecting to the Ray cluster failed; trying again at the next failed check")
            return
        self._failed_pings = 0
        logger.info("reconnected to the Ray cluster at %s; reconciled: %s", self._address, counts)

    async def stats(self) -> dict[str, int]:
        stats: dict[str, int] = await self._call(lambda actor: actor.stats.remote())
        return stats

    async def close(self) -> None:
        if self._reconnection is not None:
            self._reconnection.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnection
        if self._owns_connection:
            import ray

            await asyncio.to_thread(ray.shutdown)
            self._owns_connection = False

    def _connect(self) -> None:
        keep_ray_driver_through_head_outages()  # before Ray's native code first reads its config
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

    async def _call(
        self, method: Callable[[Any], Awaitable[Any]], *, timeout: float | None = None, during_reconnection: bool = False
    ) -> Any:
        import ray

        if not during_reconnection and self._reconnection is not None and not self._reconnection.done():
            raise RayUnavailable("the Ray cluster is unreachable; the service reconnects once it is back", dependency="ray")
        try:
            return await self._bounded(method(self._actor), timeout)
        except ray.exceptions.RayActorError:
            # The cache died (killed, Ray restarted, node lost): its weights are gone. A new
            # cache starts empty and reconciles MongoDB before serving again.
            logger.warning("model cache %s is gone; starting a new one", self.actor_name)
            async with self._replacing:
                self._actor = await self._bounded(asyncio.to_thread(self._get_or_create_actor))
                await self._bounded(self._actor.reconcile.remote())
            return await self._bounded(method(self._actor))

    async def _bounded(self, call: Awaitable[Any], timeout: float | None = None) -> Any:
        seconds = timeout or self._config_timeout
        return await bounded(
            call, seconds,
            RayUnavailable(f"the Ray cluster did not answer within {seconds:g}s; retry shortly", dependency="ray"),
        )


def _accepts_connections(address: str) -> bool:
    """Whether `host:port` accepts a TCP connection (True for addresses of other forms:
    `auto`, `ray://...`, which ray.init resolves itself)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "/" in address:
        return True
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
        return True
    return False
