"""The service's dependencies (MongoDB, the archive store, Ray): what their failures mean
to a caller, and a monitor that tells the load balancer when one is unreachable.

A dependency that is down or stalled must not look like a bug of ours (INTERNAL) nor hang
the caller: every call to it has a bounded time (settings), and its failures become
UNAVAILABLE with a reason naming it. `translate` is that one mapping, used by the API's
error mapping for anything the core did not already translate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from server.errors import ErrorKind, ModelServiceError

logger = logging.getLogger(__name__)


class MetadataStoreUnavailable(ModelServiceError):
    reason = "METADATA_STORE_UNAVAILABLE"
    kind = ErrorKind.UNAVAILABLE


class ArchiveStoreUnavailable(ModelServiceError):
    reason = "ARCHIVE_STORE_UNAVAILABLE"
    kind = ErrorKind.UNAVAILABLE


class RayUnavailable(ModelServiceError):
    reason = "RAY_UNAVAILABLE"
    kind = ErrorKind.UNAVAILABLE


METADATA_STORE, ARCHIVE_STORE, RAY = "metadata store (MongoDB)", "archive store (S3)", "Ray cluster"


def translate(error: BaseException) -> ModelServiceError | None:
    """The UNAVAILABLE error a dependency's failure means, or None if it is not one."""
    import botocore.exceptions
    import pymongo.errors

    if isinstance(error, (pymongo.errors.ConnectionFailure, pymongo.errors.ExecutionTimeout, pymongo.errors.WTimeoutError)):
        return MetadataStoreUnavailable(
            f"the {METADATA_STORE} is unreachable or too slow; retry shortly", dependency="mongodb"
        )
    if isinstance(error, pymongo.errors.PyMongoError) and getattr(error, "timeout", False):
        return MetadataStoreUnavailable(f"the {METADATA_STORE} did not answer in time; retry shortly", dependency="mongodb")
    if isinstance(
        error,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.HTTPClientError,
        ),
    ):
        return ArchiveStoreUnavailable(f"the {ARCHIVE_STORE} is unreachable or too slow; retry shortly", dependency="s3")
    if isinstance(error, botocore.exceptions.ClientError):
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or status == 0:
            return ArchiveStoreUnavailable(f"the {ARCHIVE_STORE} answered with an error ({status}); retry shortly", dependency="s3")
    try:
        import ray.exceptions
    except ImportError:  # pragma: no cover - ray is a dependency of the service
        return None
    if isinstance(error, (ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError)):
        return RayUnavailable(f"the {RAY} is unreachable; retry shortly", dependency="ray")
    return None


async def bounded(call: Awaitable[object], seconds: float, unavailable: ModelServiceError) -> object:
    """`call`, or `unavailable` raised once it has taken more than `seconds`."""
    try:
        return await asyncio.wait_for(call, seconds)
    except TimeoutError:
        raise unavailable from None


Probe = Callable[[], Awaitable[object]]
"""Raises (or takes too long) unless its dependency answers."""


class DependencyMonitor:
    """Probes each dependency on a timer and reports whether all of them answer.

    `on_change(all_up, down)` is called when the verdict changes (and once at the first
    round): the app turns gRPC health NOT_SERVING while anything is down, so that Envoy
    and load balancers route around the replica, and SERVING again once all answer.
    A probe that fails or takes longer than its time budget counts as down.
    """

    def __init__(
        self,
        probes: Mapping[str, tuple[Probe, float]],
        on_change: Callable[[bool, list[str]], Awaitable[None]],
        *,
        interval_seconds: float,
    ) -> None:
        self._probes = dict(probes)
        self._on_change = on_change
        self._interval = interval_seconds
        self.down: list[str] = []
        self._reported: bool | None = None

    async def check_once(self) -> list[str]:
        """Probes every dependency at once; returns the names of those that failed."""
        names = list(self._probes)
        outcomes = await asyncio.gather(
            *(asyncio.wait_for(probe(), budget) for probe, budget in (self._probes[name] for name in names)),
            return_exceptions=True,
        )
        down = [name for name, outcome in zip(names, outcomes) if isinstance(outcome, BaseException)]
        for name, outcome in zip(names, outcomes):
            if isinstance(outcome, BaseException) and name not in self.down:
                logger.warning("dependency %s is unreachable: %r", name, outcome)
        for name in self.down:
            if name not in down:
                logger.info("dependency %s answers again", name)
        self.down = down
        all_up = not down
        if all_up is not self._reported:
            self._reported = all_up
            await self._on_change(all_up, down)
        return down

    async def run_forever(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:
                logger.exception("dependency check failed; retrying next interval")
            await asyncio.sleep(self._interval)
