"""Deployments as the API sees them: deploy (wait or not), tasks, and watching.

The load itself runs on Ray, driven by the model cache actor; this service authorizes,
asks the cluster to deploy, and follows the deployment through MongoDB, so any replica
answers for a deployment started by any other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from server.core import quotas
from server.core.aliases import validate_alias
from server.core.catalog import ModelCatalog
from server.core.deployment_feed import DeploymentFeed
from server.core.models import DeploymentStatus, utc_now
from server.core.tenancy import TenancyService
from server.deploy.specs import LOADING, UNDEPLOYED, DeployOptions, DeployTicket, NodeUsage
from server.errors import DeployTaskNotFound, InvalidArgument, ModelDeploying
from server.persistence.deployments import COMPLETED, DeploymentEvent, DeploymentRepository, DeployTask

HEARTBEAT = "heartbeat"
MAX_CONFIG_JSON_BYTES = 64 * 1024
"""A deploy's free-form config is a record on its task, not a payload store."""


class ModelCluster(Protocol):
    """What the service needs from the compute cluster."""

    async def deploy(self, model_id: str, is_async: bool, options: DeployOptions) -> DeployTicket: ...

    async def undeploy(self, model_id: str) -> str: ...

    async def cache_status(self) -> list[NodeUsage]: ...


@dataclass(frozen=True)
class UndeployOutcome:
    model_id: str
    namespace_id: str
    was_cached: bool
    message: str


@dataclass(frozen=True)
class DeployOutcome:
    model_id: str
    namespace_id: str
    status: DeploymentStatus
    cached: bool
    message: str
    task_id: str

    @property
    def success(self) -> bool:
        return self.status is not DeploymentStatus.FAILED


@dataclass(frozen=True)
class WatchTiming:
    poll_seconds: float
    heartbeat_seconds: float


class DeploymentService:
    def __init__(
        self,
        tenancy: TenancyService,
        catalog: ModelCatalog,
        deployments: DeploymentRepository,
        cluster: ModelCluster,
        timing: WatchTiming,
    ) -> None:
        self._tenancy = tenancy
        self._catalog = catalog
        self._deployments = deployments
        self._cluster = cluster
        self._timing = timing
        self._feed = DeploymentFeed(deployments, timing.poll_seconds)

    async def deploy(
        self, bearer_token: str | None, namespace_id: str, model_id: str, wait: bool, options: DeployOptions
    ) -> DeployOutcome:
        namespace, model = await self._catalog.get_with_namespace(bearer_token, namespace_id, model_id)
        if namespace.quotas.max_deployed_bytes and model.deployment_status not in (
            DeploymentStatus.DEPLOYED, DeploymentStatus.PENDING,
        ):
            usage = await self._catalog.usage(namespace_id)
            quotas.check_deploy(namespace, usage, model.weights_bytes)
        if options.alias:
            validate_alias(options.alias)
        if options.config and len(json.dumps(options.config)) > MAX_CONFIG_JSON_BYTES:
            raise InvalidArgument(
                f"config is larger than {MAX_CONFIG_JSON_BYTES} bytes as JSON", field="config",
                limit=MAX_CONFIG_JSON_BYTES,
            )
        if options.idle_ttl_seconds is not None and not (
            math.isfinite(options.idle_ttl_seconds) and options.idle_ttl_seconds >= 0
        ):
            raise InvalidArgument("idle_ttl_seconds must be a number of seconds, 0 or more", field="idle_ttl_seconds")
        if options.node_ids:
            alive = {node.node_id for node in await self._cluster.cache_status()}
            unknown = [node_id for node_id in options.node_ids if node_id not in alive]
            if unknown:
                raise InvalidArgument(
                    f"node {unknown[0]!r} is not an alive Ray node with an object store", field="node_ids", node_id=unknown[0]
                )
        options = dataclasses.replace(
            options,
            default_pin=namespace.deploy_defaults.pin,
            default_idle_ttl_seconds=namespace.deploy_defaults.idle_ttl_seconds,
        )
        ticket = await self._cluster.deploy(model.model_id, is_async=not wait, options=options)
        if ticket.cached:
            return DeployOutcome(
                model_id, namespace_id, DeploymentStatus.DEPLOYED, True,
                "the model is already in the Ray object store", ticket.task_id,
            )
        if not wait:
            return DeployOutcome(
                model_id, namespace_id, DeploymentStatus.PENDING, False,
                f"deployment {ticket.task_id} is under way; follow it with WatchDeployment or GetDeployTask",
                ticket.task_id,
            )
        task = await self._wait_until_finished(ticket.task_id)
        if task.state == COMPLETED:
            return DeployOutcome(
                model_id, namespace_id, DeploymentStatus.DEPLOYED, False,
                "the weights are loaded into the Ray object store", task.task_id,
            )
        return DeployOutcome(
            model_id, namespace_id, DeploymentStatus.FAILED, False,
            f"deployment failed at {task.error}", task.task_id,
        )

    async def undeploy(self, bearer_token: str | None, namespace_id: str, model_id: str) -> UndeployOutcome:
        await self._catalog.get(bearer_token, namespace_id, model_id)
        outcome = await self._cluster.undeploy(model_id)
        if outcome == LOADING:
            raise ModelDeploying(
                f"model {model_id!r} is being deployed; undeploy it once the deployment ends", model_id=model_id
            )
        if outcome == UNDEPLOYED:
            return UndeployOutcome(model_id, namespace_id, True, "the weights left the Ray object store")
        return UndeployOutcome(model_id, namespace_id, False, "the model was not in the Ray object store")

    async def get_task(self, bearer_token: str | None, namespace_id: str, task_id: str) -> DeployTask:
        await self._tenancy.authorize(bearer_token, namespace_id)
        task = await self._deployments.get(task_id)
        if task is None or task.namespace_id != namespace_id:
            raise DeployTaskNotFound(
                f"deploy task {task_id!r} not found in namespace {namespace_id!r}",
                id=task_id, resource="deploy_task", namespace_id=namespace_id,
            )
        return task

    async def latest_task(self, bearer_token: str | None, namespace_id: str, model_id: str) -> DeployTask:
        await self._catalog.get(bearer_token, namespace_id, model_id)
        task = await self._deployments.latest_for_model(model_id)
        if task is None:
            raise DeployTaskNotFound(
                f"model {model_id!r} was never deployed", model_id=model_id, resource="deploy_task"
            )
        return task

    async def watch(
        self, bearer_token: str | None, namespace_id: str, model_id: str, after_sequence: int, task_id: str = ""
    ) -> AsyncIterator[DeploymentEvent]:
        """The current state (or what followed `after_sequence`), then each change, then ends.

        Heartbeats (state "heartbeat", the last sequence number) keep idle streams alive.
        """
        if task_id:
            task = await self.get_task(bearer_token, namespace_id, task_id)
            if task.model_id != model_id:
                raise DeployTaskNotFound(f"deploy task {task_id!r} is not a deployment of model {model_id!r}", id=task_id)
        else:
            task = await self.latest_task(bearer_token, namespace_id, model_id)
        async with self._feed.follow(task.task_id) as feed:
            await feed.loaded()
            cursor = after_sequence
            if after_sequence <= 0 and feed.events:
                current = feed.events[-1]
                yield current
                if current.terminal:
                    return
                cursor = current.sequence
            index = feed.index_after(cursor)
            while True:
                change = feed.next_change()
                while index < len(feed.events):
                    event = feed.events[index]
                    index += 1
                    yield event
                    cursor = event.sequence
                    if event.terminal:
                        return
                feed.raise_if_failed()
                if feed.finished:
                    return  # resumed after the end: nothing left to send
                try:
                    await asyncio.wait_for(change.wait(), self._timing.heartbeat_seconds)
                except TimeoutError:
                    yield _heartbeat(task, cursor)

    async def cache_status(self, bearer_token: str | None, namespace_id: str) -> list[NodeUsage]:
        """Every node's totals, and the namespace's own models only."""
        await self._tenancy.authorize(bearer_token, namespace_id)
        return [
            dataclasses.replace(node, models=[m for m in node.models if m.namespace_id == namespace_id])
            for node in await self._cluster.cache_status()
        ]

    async def _wait_until_finished(self, task_id: str) -> DeployTask:
        """Follows the deployment's shared feed (no reads of its own) until the task ends."""
        async with self._feed.follow(task_id) as feed:
            while True:
                change = feed.next_change()
                feed.raise_if_failed()
                if feed.task is not None and feed.task.finished:
                    return feed.task
                if feed.finished:  # the task vanished (deleted with its model)
                    raise DeployTaskNotFound(f"deploy task {task_id!r} no longer exists", id=task_id)
                await change.wait()


def _heartbeat(task: DeployTask, sequence: int) -> DeploymentEvent:
    return DeploymentEvent(
        task_id=task.task_id, model_id=task.model_id, namespace_id=task.namespace_id,
        sequence=sequence, state=HEARTBEAT, time=utc_now(),
    )
