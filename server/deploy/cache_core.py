"""What the model cache does: owns cached weights, drives their loads, applies the policy.

`server.deploy.cache_actor.ModelCache` is the Ray actor; it creates one `CacheCore` and
hands every call to it. The split keeps the actor's module light: every plugin process
that looks the actor up loads its class, and this module's imports (pymongo, the
decoders) would cost each fresh plugin worker tens of milliseconds.

Why an actor: an object in Ray's store dies with the process that owns it. The load task
is submitted BY the actor, so the actor owns the weights it returns; being detached, it
outlives every service replica (and their restarts). It is also the one place where a
model's load is single-flight for the whole cluster: concurrent deploy requests and
on-demand loads from plugins join the load under way.

Every state change is written to MongoDB (deploy task + numbered event), which is how
service replicas, watchers and waiters follow a deployment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pymongo import AsyncMongoClient

from modelservice_sdk.model import ModelNotAvailable
from server.core.models import BASE_IMAGES, DeploymentInfo, DeploymentStatus, StoredModel, utc_now
from server.deploy.cache_actor import cache_actor_name, plugin_endpoint
from server.deploy.cache_policy import CachePolicy, Placement, Refusal, Resident
from server.deploy.load_task import remote_copy, remote_load
from server.deploy.specs import (
    LOADING,
    NOT_CACHED,
    UNDEPLOYED,
    CacheConfig,
    DeployOptions,
    DeployTicket,
    CacheCounters,
    CacheSnapshot,
    LoadSpec,
    LoadSummary,
    NodeUsage,
    StageTimes,
)
from server.persistence.aliases import AliasRepository
from server.persistence.deployments import DeploymentEvent, DeploymentRepository, DeployTask
from server.persistence.mongo import ModelRepository, connect, database

logger = logging.getLogger(__name__)

CAPACITY_REFRESH_SECONDS = 5.0
IDLE_SWEEP_SECONDS = 1.0
USE_FLUSH_SECONDS = 30.0
"""How often the last use of cached models is written to MongoDB (automatic redeploys
order by it)."""

AUTO_REDEPLOY = "AUTO_REDEPLOY"
AUTO_REDEPLOY_ATTEMPTS = 3
AUTO_REDEPLOY_BACKOFF_SECONDS = 2.0
RETRIED_REASONS = ("LOAD_CRASHED", "LOAD_ERROR", "INTERRUPTED")
"""Failures an automatic redeploy tries again; refusals (no room, a bad archive) it does not."""

@dataclass
class _Load:
    task_id: str
    model_id: str
    namespace_id: str = ""
    sequence: int = 0
    stage: str = "queued"
    worker_node: str = ""
    error: str = ""
    options: DeployOptions = field(default_factory=DeployOptions)
    stage_started: float = field(default_factory=time.time)
    node_id: str = ""
    """The node chosen for the load (where its object-store budget was reserved)."""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None  # held so the event loop cannot drop the task
    aliases: list[str] = field(default_factory=list)
    """Aliases to point at the model once it is deployed (blue-green promotions)."""


@dataclass
class _Entry:
    model_id: str
    copies: dict[str, Any]
    """Node id → ray.ObjectRef of the NamespaceModel whose primary copy is on that node."""
    namespace_id: str
    task_id: str
    info: DeploymentInfo
    """As recorded when the load finished; `deployment_info` adds where the copies are."""
    model_name: str

    @property
    def deployment_info(self) -> DeploymentInfo:
        return dataclasses.replace(self.info, node_ids=tuple(self.copies))

    def ref_for(self, node_id: str | None) -> Any:
        """The copy on the caller's node if there is one (zero-copy), else any."""
        if node_id is not None and node_id in self.copies:
            return self.copies[node_id]
        return next(iter(self.copies.values()))


class CacheCore:
    """The model cache's state and logic; runs inside the `ModelCache` actor."""

    def __init__(self, config: CacheConfig) -> None:
        self._config = config
        self._policy = CachePolicy(config.object_store_budget_fraction)
        self._counters = CacheCounters()
        self._capacities: tuple[float, dict[str, int]] = (0.0, {})
        self._idle_sweeper: asyncio.Task[None] | None = None
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, _Load] = {}
        self._progress: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._loads_started = 0
        self._mongo: AsyncMongoClient[dict[str, Any]] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._replaced: dict[str, str] = {}
        """Models an alias moved away from, and why: they leave after the grace period."""
        self._recorded_use: dict[str, float] = {}
        """Last use of each model as last written to MongoDB."""
        self._models: ModelRepository | None = None
        self._deployments: DeploymentRepository | None = None
        self._aliases: AliasRepository | None = None
        self._alias_targets: dict[tuple[str, str], str] = {}
        """(namespace, "name@alias") → model id. Every alias write goes through this actor,
        so what it holds is current; a new actor reads MongoDB again."""

    # ----- called by the service and by plugins -------------------------------------

    async def configure(self, config: CacheConfig) -> bool:
        """Adopts the settings of the replica that starts now; True if they changed.

        The actor is detached and outlives the service: when the service comes back with
        other settings (the embedded MongoDB on a new port, another scratch directory), the
        cached weights stay and the actor follows the new settings. Loads under way finish
        with the repositories they started with.
        """
        if config == self._config:
            return False
        logger.info("model cache settings changed; reconnecting to MongoDB")
        self._config = config
        old_client, self._mongo = self._mongo, None
        self._models = self._deployments = self._aliases = None
        self._alias_targets.clear()
        if old_client is not None:
            # Closing ends the old client's server sessions: a round trip to the old address,
            # where another program may now listen and never answer. Not on this call's path.
            self._start_background(_close_quietly(old_client, self._config.mongodb_timeout_seconds))
        return True

    async def deploy(self, model_id: str, is_async: bool, options: DeployOptions | None = None) -> DeployTicket:
        """Starts the model's load, joins the one under way, or says it is cached.

        A deploy counts as a use (LRU); its options pin, unpin or set the idle time-out of
        a model already cached.
        """
        options = options or DeployOptions()
        self._start_idle_sweeper()
        entry = self._entries.get(model_id)
        if entry is not None:
            self._policy.set_options(model_id, pinned=options.pin, idle_ttl_seconds=options.idle_ttl_seconds)
            self._policy.touch(model_id, time.time())
            if options.pin is not None:
                await self._record_use(model_id)
            if options.all_nodes:
                # Nodes that joined since (or lost their copy) get one, in the background.
                self._start_background(self._add_missing_copies(model_id, entry))
            if options.alias:  # green is deployed already: switch now, as an event of its deployment
                message = await self._switch_alias(model_id, entry.namespace_id, entry.model_name, options.alias)
                await self._append_event(entry, "aliased", message)
            return DeployTicket(task_id=entry.task_id, cached=True)
        running = self._loading.get(model_id)
        if running is not None:
            if options.alias:
                running.aliases.append(options.alias)
            return DeployTicket(task_id=running.task_id, cached=False)
        # Registered before the first await, so that concurrent calls join this load.
        load = _Load(
            task_id=uuid.uuid4().hex, model_id=model_id, options=options,
            aliases=[options.alias] if options.alias else [],
        )
        self._loading[model_id] = load
        try:
            models, deployments = await self._repositories()
            model = await models.get_any_namespace(model_id)
            if model is None:
                raise ModelNotAvailable(f"model {model_id!r} does not exist")
            load.namespace_id = model.metadata.namespace_id
            await deployments.create(
                load.task_id, model_id, load.namespace_id, is_async, utc_now(), options.config, options.trigger
            )
            await models.set_deployment(model_id, status=DeploymentStatus.PENDING, info=None, now=utc_now())
            queued = "waiting for Ray resources"
            if options.trigger == AUTO_REDEPLOY:
                queued = f"{AUTO_REDEPLOY}: the Ray cluster lost the weights; loading them again; {queued}"
            await self._record(load, "queued", message=queued)
        except BaseException as error:
            load.error = str(error)
            self._loading.pop(model_id, None)
            load.done.set()
            raise
        load.runner = asyncio.create_task(self._run(load, model))
        return DeployTicket(task_id=load.task_id, cached=False)

    async def lookup(
        self, model_id: str, namespace_id: str | None = None, node_id: str | None = None
    ) -> list[Any] | None:
        """`[ref]` of a cached model (a list, so Ray does not resolve the ref), or None.

        `node_id` is the caller's node: the copy there, if any, is the zero-copy one.
        `model_id` may be an alias reference, `name@alias` (then `namespace_id` is needed).
        """
        resolved = await self._resolve(model_id, namespace_id)
        entry = self._entries.get(resolved) if resolved else None
        if entry is None or (namespace_id is not None and entry.namespace_id != namespace_id):
            return None
        # Every plugin load comes through here: the LRU clock costs no extra round trip.
        self._policy.touch(entry.model_id, time.time())
        self._counters.add(self._counters.lookups, "hit")
        return [entry.ref_for(node_id)]

    async def ensure(
        self, model_id: str, namespace_id: str | None = None, node_id: str | None = None
    ) -> list[Any]:
        """On-demand load for plugins: deploys if needed, waits, returns `[ref]`."""
        resolved = await self._resolve(model_id, namespace_id)
        if resolved is None:
            raise ModelNotAvailable(f"alias {model_id!r} not found in namespace {namespace_id!r}")
        model_id = resolved
        if namespace_id is not None:
            models, _ = await self._repositories()
            if await models.get(namespace_id, model_id) is None:
                raise ModelNotAvailable(f"model {model_id!r} not found in namespace {namespace_id!r}")
        ticket = await self.deploy(model_id, is_async=True)  # a use, for the LRU order
        self._counters.add(self._counters.lookups, "hit" if ticket.cached else "miss")
        load = self._loading.get(model_id)
        if not ticket.cached and load is not None:
            await load.done.wait()
        entry = self._entries.get(model_id)
        if entry is None:
            reason = load.error if load is not None else "unknown"
            raise ModelNotAvailable(f"model {model_id!r} could not be loaded: {reason}")
        return [entry.ref_for(node_id)]

    async def touch(self, model_id: str) -> None:
        """A use of a model a plugin process still held (no answer awaited)."""
        if model_id in self._entries:
            self._policy.touch(model_id, time.time())
            self._counters.add(self._counters.lookups, "hit")

    async def point_alias(self, namespace_id: str, model_name: str, alias: str, model_id: str) -> str:
        """SetAlias: points the alias at once (the model need not be deployed)."""
        return await self._switch_alias(model_id, namespace_id, model_name, alias)

    async def delete_alias(self, namespace_id: str, model_name: str, alias: str) -> bool:
        self._alias_targets.pop((namespace_id, f"{model_name}@{alias}"), None)
        return await (await self._alias_repository()).delete(namespace_id, model_name, alias)

    async def report(self, task_id: str, event: dict[str, Any]) -> None:
        """Progress from a load task (awaited by the task, so events keep their order)."""
        queue = self._progress.get(task_id)
        if queue is not None:
            queue.put_nowait(event)

    async def undeploy(self, model_id: str) -> str:
        """Drops the cached weights (Ray frees them once no reader holds them).

        Returns UNDEPLOYED, NOT_CACHED, or LOADING (a load is under way: nothing changed).
        """
        if model_id in self._loading:
            return LOADING
        entry = self._forget(model_id)
        models, _ = await self._repositories()
        await models.set_deployment(model_id, status=DeploymentStatus.NOT_DEPLOYED, info=None, now=utc_now())
        return NOT_CACHED if entry is None else UNDEPLOYED

    async def reconcile(self) -> dict[str, int]:
        """Makes MongoDB agree with this cache: called whenever a service replica starts.

        Deployments recorded as under way that this cache is not running were interrupted
        (the cache or Ray restarted): they are marked failed, never left "deploying".
        Models recorded as deployed whose weights this cache does not hold were lost: they
        are marked not deployed, and load again on demand or on the next deploy.
        """
        models, deployments = await self._repositories()
        running = {load.task_id for load in self._loading.values()}
        interrupted = lost = 0
        for task in await deployments.unfinished():
            if task.task_id in running:
                continue
            try:
                interrupted += await self._close_interrupted(models, deployments, task)
            except Exception:  # one bad record must not stop the others, nor start-up
                logger.exception("could not close interrupted deploy task %s; retried at the next start", task.task_id)
        lost_ids = [model_id for model_id in await models.deployed_model_ids() if model_id not in self._entries]
        again = "they load again automatically" if self._config.auto_redeploy else "they load again on demand"
        for model_id in lost_ids:
            await models.set_deployment(
                model_id, status=DeploymentStatus.NOT_DEPLOYED, info=None, now=utc_now(),
                error=f"the cached weights were lost (the Ray cluster restarted); {again}",
            )
        lost = len(lost_ids)
        if lost_ids and self._config.auto_redeploy:
            self._start_background(self._redeploy(lost_ids))
        if interrupted or lost:
            logger.warning("reconciled: %d interrupted deployments, %d lost models", interrupted, lost)
        return {"interrupted": interrupted, "lost": lost}

    async def _redeploy(self, model_ids: list[str]) -> None:
        """Loads lost models again, one at a time (pinned first, then the most recently
        used), each admitted like any deploy; a load that crashed is tried again a few
        times, a refusal (no room, a bad archive) is not."""
        models, _ = await self._repositories()
        for model_id, pinned in await models.redeploy_order(model_ids):
            for attempt in range(1, AUTO_REDEPLOY_ATTEMPTS + 1):
                try:
                    ticket = await self.deploy(model_id, True, DeployOptions(pin=pinned, trigger=AUTO_REDEPLOY))
                    load = self._loading.get(model_id)
                    if not ticket.cached and load is not None:
                        await load.done.wait()
                    error = "" if model_id in self._entries else (load.error if load is not None else "")
                except Exception as failure:  # MongoDB or Ray unavailable for a moment
                    error = f"LOAD_CRASHED: {failure}"
                if not error or not any(reason in error for reason in RETRIED_REASONS):
                    break
                logger.warning("automatic redeploy of %s failed (attempt %d): %s", model_id, attempt, error)
                await asyncio.sleep(AUTO_REDEPLOY_BACKOFF_SECONDS * attempt)

    async def _resolve(self, reference: str, namespace_id: str | None) -> str | None:
        """The model id a plugin's reference names: itself, or an alias's target (None if
        the alias does not exist)."""
        if "@" not in reference:
            return reference
        if namespace_id is None:
            raise ModelNotAvailable(f"{reference!r} is an alias: load it with namespace_id")
        key = (namespace_id, reference)
        target = self._alias_targets.get(key)
        if target is None:
            model_name, _, alias = reference.rpartition("@")
            found = await (await self._alias_repository()).get(namespace_id, model_name, alias)
            if found is None:
                return None
            target = self._alias_targets[key] = found.model_id
        return target

    async def _switch_alias(self, model_id: str, namespace_id: str, model_name: str, alias: str) -> str:
        """Points the alias at `model_id` in one write; the model it replaces ("blue")
        stays cached for the grace period. Returns what happened, for the event stream."""
        pointed = await (await self._alias_repository()).point(namespace_id, model_name, alias, model_id, utc_now())
        self._alias_targets[(namespace_id, pointed.reference)] = model_id
        if self._replaced.pop(model_id, None) is not None:  # a retiring blue is a target again: it stays
            self._policy.set_options(model_id, pinned=None, idle_ttl_seconds=0.0)
        message = f"alias {pointed.reference} now resolves to model {model_id}"
        blue = pointed.previous_model_id
        if blue and blue != model_id:
            message += f" (was {blue})"
            await self._retire(blue, namespace_id, f"replaced by model {model_id} as {pointed.reference}")
        logger.info("%s", message)
        return message

    async def _retire(self, blue: str, namespace_id: str, why: str) -> None:
        """After a switch: the old target leaves the cache after the grace period (at once
        with 0), unless pinned or still the target of another alias."""
        copies = self._policy.copies(blue)
        if blue not in self._entries or any(copy.pinned for copy in copies):
            return
        if await (await self._alias_repository()).pointing_at(namespace_id, [blue]):
            return
        grace = self._config.alias_blue_grace_seconds
        if grace <= 0:
            for copy in copies:
                await self._unload(copy, "undeployed", why)
            return
        if all(copy.idle_ttl_seconds == 0 or copy.idle_ttl_seconds > grace for copy in copies):
            self._policy.set_options(blue, pinned=None, idle_ttl_seconds=grace)
            self._replaced[blue] = why

    async def _record_use(self, model_id: str) -> None:
        """Keeps the model's pin and last use in MongoDB, for automatic redeploys."""
        copies = self._policy.copies(model_id)
        if not copies:
            return
        models, _ = await self._repositories()
        last_used = max(copy.last_used for copy in copies)
        await models.record_cache_use(model_id, pinned=any(copy.pinned for copy in copies), last_used=last_used)
        self._recorded_use[model_id] = last_used

    async def _close_interrupted(
        self, models: ModelRepository, deployments: DeploymentRepository, task: DeployTask
    ) -> int:
        """Ends a deploy task whose load no longer runs; 1 if it was still open.

        Replays are harmless: the task's mirror is first repaired from its last stored
        event (a crash may have come between the two writes of an event), and a task whose
        last event is terminal only needed that repair.
        """
        task, last = await deployments.repair_task(task)
        if last is not None and last.terminal:
            return 0
        sequence = max(task.last_sequence, last.sequence if last is not None else 0) + 1
        await deployments.append(
            DeploymentEvent(
                task_id=task.task_id, model_id=task.model_id, namespace_id=task.namespace_id,
                sequence=sequence, state="failed", time=utc_now(),
                failed_stage=_stage_name(task.stage), error_reason="INTERRUPTED",
                message="the load was interrupted (the Ray cluster or its model cache restarted); deploy again",
            )
        )
        if task.model_id not in self._entries:
            await models.set_deployment(
                task.model_id, status=DeploymentStatus.FAILED, info=None, now=utc_now(),
                error=f"{_stage_name(task.stage)}: INTERRUPTED: the load was interrupted; deploy again",
            )
        return 1

    async def cache_status(self) -> list[NodeUsage]:
        """The cache node by node: capacity, budget, use, and every resident model."""
        capacities = await self._object_store_capacities()
        residents = self._policy.residents()
        return [
            NodeUsage(
                node_id=node_id,
                capacity_bytes=capacity,
                budget_bytes=self._policy.budget(capacity),
                used_bytes=sum(r.nbytes for r in residents if r.node_id == node_id),
                pinned_bytes=sum(r.nbytes for r in residents if r.node_id == node_id and (r.pinned or r.loading)),
                models=[r for r in residents if r.node_id == node_id],
            )
            for node_id, capacity in capacities.items()
        ]

    async def metrics_snapshot(self) -> CacheSnapshot:
        return CacheSnapshot(counters=self._counters, nodes=await self.cache_status())

    async def stats(self) -> dict[str, int]:
        return {
            "loads_started": self._loads_started,
            "cached_models": len(self._entries),
            "loading_models": len(self._loading),
        }

    # ----- internals -------------------------------------------------------------------

    async def _repositories(self) -> tuple[ModelRepository, DeploymentRepository]:
        if self._models is None or self._deployments is None:
            self._mongo = connect(self._config.mongodb_uri, self._config.mongodb_timeout_seconds)
            db = database(self._mongo, self._config.database)
            self._models = ModelRepository(db)
            self._deployments = DeploymentRepository(db, self._config.deploy_task_retention_seconds)
            self._aliases = AliasRepository(db)
            await self._deployments.ensure_indexes()
        return self._models, self._deployments

    async def _alias_repository(self) -> AliasRepository:
        await self._repositories()
        assert self._aliases is not None
        return self._aliases

    async def _record(self, load: _Load, state: str, **fields: Any) -> None:
        _, deployments = await self._repositories()
        event = DeploymentEvent(
            task_id=load.task_id, model_id=load.model_id, namespace_id=load.namespace_id,
            sequence=load.sequence + 1, state=state, time=utc_now(),
            bytes_done=int(fields.get("bytes_done", 0)), bytes_total=int(fields.get("bytes_total", 0)),
            failed_stage=str(fields.get("failed_stage", "")), error_reason=str(fields.get("error_reason", "")),
            message=str(fields.get("message", "")),
        )
        await deployments.append(event, worker_node=load.worker_node)
        load.sequence = event.sequence
        if state != load.stage:
            now = time.time()
            stage = _stage_name(load.stage)
            self._counters.stage_seconds.setdefault(stage, StageTimes()).observe(now - load.stage_started)
            load.stage_started = now
        load.stage = state

    async def _run(self, load: _Load, model: StoredModel) -> None:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._progress[load.task_id] = queue
        try:
            shortfall = await asyncio.to_thread(_resource_shortfall, model)
            if shortfall:
                await self._fail(load, "schedule", "INSUFFICIENT_RESOURCES", shortfall)
                return
            if not await self._admit(load, model):
                return
            summary, weights_ref = await self._execute(load, model, queue)
            if summary.ok:
                await self._cache(load, model, weights_ref, summary)
            else:
                await self._fail(load, summary.failed_stage, summary.reason, summary.message)
        except Exception as error:  # Ray errors (worker crash, OOM kill) and anything else
            logger.exception("load %s of model %s failed", load.task_id, load.model_id)
            await self._fail(load, _stage_name(load.stage), "LOAD_CRASHED", _crash_message(error))
        finally:
            self._progress.pop(load.task_id, None)
            self._loading.pop(load.model_id, None)
            if load.model_id not in self._entries:
                self._policy.remove(load.model_id)  # the reservation of a load that failed
            load.done.set()

    async def _execute(
        self, load: _Load, model: StoredModel, queue: asyncio.Queue[dict[str, Any]]
    ) -> tuple[LoadSummary, Any]:
        import ray

        config = self._config
        # A compressed archive is deployed from its inflated form (written at upload, with
        # its own digest): no deploy pays decompression again.
        form = model.deploy_form
        spec = LoadSpec(
            task_id=load.task_id, model_id=model.model_id, model_format=model.metadata.model_format.value,
            archive_key=form.key if form else model.archive_key,
            sha256=form.sha256 if form else model.sha256,
            size_bytes=form.size_bytes if form else model.size_bytes,
            store=config.store, max_unpacked_bytes=config.max_unpacked_bytes,
            max_members=config.max_members, scratch_dir=config.scratch_dir,
        )
        resources = model.metadata.resources
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task: Any = ray.remote(remote_load).options(
            num_returns=2, max_retries=0,
            num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, memory=resources.memory_bytes,
            # Soft unless the caller named the nodes: a node short of the model's CPUs or GPUs
            # must not leave the load waiting forever; the accounting follows the node the
            # load really ran on.
            scheduling_strategy=(
                NodeAffinitySchedulingStrategy(load.node_id, soft=not load.options.node_ids)
                if load.node_id else "DEFAULT"
            ),
        )
        weights_ref, summary_ref = task.remote(spec, ray.get_runtime_context().current_actor)
        self._loads_started += 1
        finished = asyncio.ensure_future(asyncio.wrap_future(summary_ref.future()))
        while True:
            next_event = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({next_event, finished}, return_when=asyncio.FIRST_COMPLETED)
            if next_event in done:
                await self._record(load, **next_event.result())
                continue
            next_event.cancel()
            break
        while not queue.empty():
            await self._record(load, **queue.get_nowait())
        summary: LoadSummary = finished.result()
        load.worker_node = summary.node_id
        return summary, weights_ref

    async def _cache(self, load: _Load, model: StoredModel, weights_ref: Any, summary: LoadSummary) -> None:
        models, _ = await self._repositories()
        node_id = summary.node_id or load.node_id
        now = utc_now()
        info = DeploymentInfo(
            ray_cluster_url=self._config.ray_cluster_url,
            ray_deployment_name=cache_actor_name(self._config.database),
            endpoint=plugin_endpoint(load.model_id),
            base_image=BASE_IMAGES[model.metadata.model_format],
            deployed_at=now,
            node_ids=(node_id,),
        )
        entry = _Entry(
            model_id=load.model_id, copies={node_id: weights_ref}, namespace_id=load.namespace_id, task_id=load.task_id, info=info,
            model_name=model.metadata.name,
        )
        self._entries[load.model_id] = entry
        self._policy.loaded(load.model_id, load.node_id, node_id, summary.nbytes)
        message = f"{summary.nbytes} bytes in the object store after {summary.seconds:.2f}s"
        if load.options.all_nodes:
            await self._record(load, "caching", message="copying the weights into every node's object store")
            skipped = await self._copy_to_every_node(load.model_id, entry)
            message += f"; a copy on each of {len(entry.copies)} nodes" + "".join(f"; {note}" for note in skipped)
        self._counters.add(self._counters.loads, "deployed")
        await models.set_deployment(
            load.model_id, status=DeploymentStatus.DEPLOYED,
            info=entry.deployment_info, now=now,
        )
        await self._record_use(load.model_id)
        for alias in load.aliases:  # green is deployed: the aliases switch to it now
            message += "; " + await self._switch_alias(load.model_id, load.namespace_id, entry.model_name, alias)
        await self._record(load, "deployed", message=message)

    async def _add_missing_copies(self, model_id: str, entry: _Entry) -> None:
        """`all_nodes` on a model already cached: copies for the nodes without one."""
        try:
            skipped = await self._copy_to_every_node(model_id, entry)
            if self._entries.get(model_id) is entry:
                models, _ = await self._repositories()
                await models.set_deployment(
                    model_id, status=DeploymentStatus.DEPLOYED, info=entry.deployment_info, now=utc_now()
                )
            for note in skipped:
                logger.warning("model %s: %s", model_id, note)
        except Exception:
            logger.exception("could not copy model %s to every node", model_id)

    async def _copy_to_every_node(self, model_id: str, entry: _Entry) -> list[str]:
        """Puts a copy of the weights, owned by this actor, in the object store of every
        alive node that lacks one (plugins there are zero-copy from their first call).

        Each copy is admitted on its node like a load (its LRU models may be evicted to
        make room); a node that cannot take it is skipped. Returns why nodes were skipped.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        skipped: list[str] = []
        capacities = await self._object_store_capacities()
        for node_id, capacity in capacities.items():
            template = next(iter(self._policy.copies(model_id)), None)
            if node_id in entry.copies or template is None or self._entries.get(model_id) is not entry:
                continue  # already there, or the model was undeployed meanwhile
            decision = self._policy.place(template.nbytes, {node_id: capacity})
            if isinstance(decision, Refusal):
                self._counters.admission_refusals += 1
                skipped.append(f"no copy on node {node_id}: {decision.message}")
                continue
            await self._take_room(
                decision, model_id, template.nbytes, pinned=template.pinned,
                idle_ttl_seconds=template.idle_ttl_seconds, namespace_id=entry.namespace_id,
                reason=f"from node {node_id} to make room for a copy of model {model_id}",
            )
            copy: Any = ray.remote(remote_copy)
            copy_ref, nbytes_ref = copy.options(
                num_returns=2, max_retries=0, num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote([entry.ref_for(None)])
            try:
                # Only the small second result comes here: the copy stays on its node.
                nbytes = await asyncio.wrap_future(nbytes_ref.future())
            except Exception as error:
                self._policy.remove_copy(model_id, node_id)
                logger.warning("no copy of model %s on node %s: %s", model_id, node_id, error)
                skipped.append(f"no copy on node {node_id}: {_crash_message(error)}")
                continue
            if self._entries.get(model_id) is not entry:  # undeployed while copying
                self._policy.remove_copy(model_id, node_id)
                break
            entry.copies[node_id] = copy_ref
            self._policy.loaded(model_id, node_id, node_id, nbytes)
        return skipped

    async def _admit(self, load: _Load, model: StoredModel) -> bool:
        """Finds room in a node's object-store budget, evicting least recently used models
        if needed; fails the load at the schedule stage if no node can ever hold it."""
        needs = model.weights_bytes or 2 * model.size_bytes  # older uploads: a safe bound
        capacities = await self._object_store_capacities()
        if load.options.node_ids:
            capacities = {node: capacity for node, capacity in capacities.items() if node in load.options.node_ids}
        decision = self._policy.place(needs, capacities)
        if isinstance(decision, Refusal):
            self._counters.admission_refusals += 1
            await self._fail(load, "schedule", "INSUFFICIENT_OBJECT_STORE_MEMORY", decision.message)
            return False
        options = load.options
        load.node_id = decision.node_id
        await self._take_room(
            decision, load.model_id, needs,
            pinned=options.default_pin if options.pin is None else options.pin,
            idle_ttl_seconds=options.default_idle_ttl_seconds if options.idle_ttl_seconds is None else options.idle_ttl_seconds,
            namespace_id=load.namespace_id, reason=f"to make room for model {load.model_id}",
        )
        return True

    async def _take_room(
        self, placement: Placement, model_id: str, nbytes: int, *, pinned: bool, idle_ttl_seconds: float,
        namespace_id: str, reason: str,
    ) -> None:
        """Reserves `nbytes` on the placement's node for a load or a copy, evicting what the
        policy chose. The policy is updated before the first await, so that concurrent
        loads plan with this one's room."""
        for victim in placement.evict:
            self._policy.remove_copy(victim.model_id, victim.node_id)
        self._policy.reserve(
            model_id, placement.node_id, nbytes, pinned=pinned, idle_ttl_seconds=idle_ttl_seconds,
            now=time.time(), namespace_id=namespace_id,
        )
        for victim in placement.evict:
            await self._unload(
                victim, "evicted",
                f"evicted {reason}: least recently used, {victim.nbytes} bytes freed; it loads again on demand",
            )

    async def _unload(self, resident: Resident, state: str, message: str) -> None:
        """Drops one copy of a cached model (Ray frees its memory once no plugin still reads
        it). When it was the last copy, the model is no longer deployed: said on the model
        and on its deployment's event stream."""
        self._policy.remove_copy(resident.model_id, resident.node_id)
        entry = self._entries.get(resident.model_id)
        if entry is None or entry.copies.pop(resident.node_id, None) is None:
            return
        logger.info("model %s %s on node %s: %s", resident.model_id, state, resident.node_id, message)
        self._counters.add(self._counters.evictions, "lru" if state == "evicted" else "idle_ttl")
        models, _ = await self._repositories()
        if entry.copies:  # other nodes still hold it: still deployed, on fewer nodes
            await models.set_deployment(
                resident.model_id, status=DeploymentStatus.DEPLOYED, info=entry.deployment_info, now=utc_now()
            )
            return
        self._forget(resident.model_id)
        await models.set_deployment(
            resident.model_id, status=DeploymentStatus.NOT_DEPLOYED, info=None, now=utc_now(), error=f"{state}: {message}"
        )
        await self._append_event(entry, state, message)

    def _forget(self, model_id: str) -> _Entry | None:
        """Drops everything this cache keeps about a model; returns its entry, if cached."""
        self._policy.remove(model_id)
        self._recorded_use.pop(model_id, None)
        self._replaced.pop(model_id, None)
        return self._entries.pop(model_id, None)

    async def _append_event(self, entry: _Entry, state: str, message: str) -> None:
        """An event after a deployment's end (evicted, undeployed, aliased) on its stream."""
        _, deployments = await self._repositories()
        last = await deployments.last_event(entry.task_id)
        await deployments.append(
            DeploymentEvent(
                task_id=entry.task_id, model_id=entry.model_id, namespace_id=entry.namespace_id,
                sequence=(last.sequence if last is not None else 0) + 1, state=state, time=utc_now(), message=message,
            )
        )

    async def _object_store_capacities(self) -> dict[str, int]:
        """Object-store capacity of each alive node, as Ray reports it (cached a few seconds)."""
        fetched_at, capacities = self._capacities
        if time.time() - fetched_at > CAPACITY_REFRESH_SECONDS or not capacities:
            capacities = await asyncio.to_thread(_object_store_capacities)
            self._capacities = (time.time(), capacities)
        return capacities

    def _start_background(self, work: Any) -> None:
        """Runs a coroutine nobody awaits, holding the task so the loop cannot drop it."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_idle_sweeper(self) -> None:
        if self._idle_sweeper is None or self._idle_sweeper.done():
            self._idle_sweeper = asyncio.create_task(self._sweep_idle_models())

    async def _sweep_idle_models(self) -> None:
        last_use_flush = time.monotonic()
        while True:
            await asyncio.sleep(IDLE_SWEEP_SECONDS)
            if time.monotonic() - last_use_flush >= USE_FLUSH_SECONDS:
                last_use_flush = time.monotonic()
                await self._flush_uses()
            for resident in self._policy.idle(time.time()):
                why = f"unused for {resident.idle_ttl_seconds:g} s (idle_ttl_seconds)"
                if resident.model_id in self._replaced:
                    why = f"{self._replaced[resident.model_id]}, then unused for {resident.idle_ttl_seconds:g} s"
                try:
                    await self._unload(resident, "undeployed", f"{why}; it loads again on demand")
                except Exception:
                    logger.exception("could not undeploy idle model %s; retrying", resident.model_id)

    async def _flush_uses(self) -> None:
        """Writes the last use of models used since the previous flush (plugin loads move
        it without a write each)."""
        for model_id in list(self._entries):
            copies = self._policy.copies(model_id)
            if copies and max(copy.last_used for copy in copies) > self._recorded_use.get(model_id, 0.0):
                try:
                    await self._record_use(model_id)
                except Exception:
                    logger.exception("could not record the last use of model %s; retrying later", model_id)

    async def _fail(self, load: _Load, stage: str, reason: str, message: str) -> None:
        self._counters.add(self._counters.loads, "failed")
        load.error = f"{stage}: {reason}: {message}"
        models, _ = await self._repositories()
        if load.model_id not in self._entries:
            await models.set_deployment(
                load.model_id, status=DeploymentStatus.FAILED, info=None, now=utc_now(), error=load.error
            )
        await self._record(load, "failed", failed_stage=stage, error_reason=reason, message=message)


_STAGE_OF_STATE = {"queued": "schedule", "downloading": "download", "verifying": "verify", "decoding": "decode", "caching": "cache"}


async def _close_quietly(client: AsyncMongoClient[dict[str, Any]], timeout_seconds: float) -> None:
    try:
        await asyncio.wait_for(client.close(), timeout_seconds)
    except Exception:  # the client is dropped either way; nothing waits for this
        logger.info("the previous MongoDB client did not close cleanly", exc_info=True)


def _stage_name(state: str) -> str:
    return _STAGE_OF_STATE.get(state, state)


def _object_store_capacities() -> dict[str, int]:
    import ray

    return {
        node["NodeID"]: int(node["Resources"].get("object_store_memory", 0))
        for node in ray.nodes()  # type: ignore[no-untyped-call]
        if node.get("Alive") and node.get("Resources", {}).get("object_store_memory")
    }


def _crash_message(error: Exception) -> str:
    """What a tenant may know of a crashed load: the kind of failure, no host or path."""
    import ray

    if isinstance(error, ray.exceptions.OutOfMemoryError):
        return "the load task was stopped for using more memory than its node had; ask for more memory_gb"
    if isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError)):
        return "the load task's worker or node died; deploy again"
    return "the load task failed unexpectedly; the operator's logs hold the details; deploy again"


def _resource_shortfall(model: StoredModel) -> str:
    """Why the cluster can never run this load, or "" (an infeasible task would wait forever)."""
    import ray

    total: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    wanted = model.metadata.resources
    gaps = []
    if wanted.num_cpus > total.get("CPU", 0):
        gaps.append(f"{wanted.num_cpus} CPUs (cluster has {total.get('CPU', 0):g})")
    if wanted.num_gpus > total.get("GPU", 0):
        gaps.append(f"{wanted.num_gpus} GPUs (cluster has {total.get('GPU', 0):g})")
    if wanted.memory_bytes > total.get("memory", 0):
        gaps.append(f"{wanted.memory_bytes} bytes of memory (cluster has {total.get('memory', 0):.0f})")
    return "" if not gaps else "the model asks for " + ", ".join(gaps)


