"""The composition root: builds every client and service once and owns their lifetimes.

`ModelServiceApp` is used by the launcher and by the tests alike (with other settings);
leaving its context stops the gRPC server gracefully and then closes the clients in
reverse order of creation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from types import TracebackType
from typing import Any

import aioboto3
import grpc
from botocore.config import Config as BotocoreConfig
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from modelservice.v1 import model_service_pb2, model_service_pb2_grpc
from pymongo import AsyncMongoClient

from server.api.error_mapping import ErrorMappingInterceptor
from server.api.servicer import ModelServiceServicer
from server.archives.inspector import InspectionLimits
from server.archives.stores import ArchiveStore, LocalArchiveStore, S3ArchiveStore
from server.core.aliases import AliasService
from server.core.catalog import ModelCatalog
from server.core.deletion import DeletionService
from server.core.deployments import DeploymentService, WatchTiming
from server.core.tenancy import TenancyService
from server.core.janitor import Janitor
from server.core.uploads import UploadLimits, UploadService
from server.dependencies import ARCHIVE_STORE, METADATA_STORE, RAY, DependencyMonitor
from server.metrics import CacheMetrics, serve_metrics
from server.deploy.cluster import RayModelCluster
from server.deploy.specs import CacheConfig, StoreConfig
from server.embedded.processes import embedded_mongodb, ensure_ray_head
from server.persistence.aliases import AliasRepository
from server.persistence.delete_tasks import DeleteTaskRepository
from server.persistence.deployments import DeploymentRepository
from server.persistence.mongo import ModelRepository, TenancyRepository, connect, database
from server.settings import Settings

logger = logging.getLogger(__name__)

SERVICE_NAME = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
ANSWER_FLUSH_SECONDS = 0.5
"""After the last call ended, how long the server stays up for answers to leave."""


class ModelServiceApp:
    """The running service. `async with ModelServiceApp(settings) as app:` serves on `app.port`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = contextlib.AsyncExitStack()
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._interceptor = ErrorMappingInterceptor()
        self._draining = False
        self.port = 0
        self.metrics_port = 0
        self.mongodb_uri = ""
        # Built in start(); public so tools (admin, tests) reuse the same services.
        self.tenancy: TenancyService
        self.uploads: UploadService
        self.catalog: ModelCatalog
        self.deletions: DeletionService
        self.deployments: DeploymentService
        self.cluster: RayModelCluster
        self.janitor: Janitor
        self.store: ArchiveStore
        self.dependencies: DependencyMonitor
        self.metrics: CacheMetrics

    async def __aenter__(self) -> ModelServiceApp:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _start(self) -> None:
        settings = self.settings
        self.mongodb_uri = settings.mongodb_uri or await self._stack.enter_async_context(
            embedded_mongodb(settings.data_dir / "mongodb")
        )
        mongo: AsyncMongoClient[dict[str, Any]] = connect(self.mongodb_uri, settings.mongodb_timeout_seconds)
        self._stack.push_async_callback(mongo.close)
        db = database(mongo, settings.mongodb_database)
        models = ModelRepository(db)
        tenancy_repository = TenancyRepository(db)
        deployment_repository = DeploymentRepository(db, settings.deploy_task_retention_seconds)
        delete_tasks = DeleteTaskRepository(db, datetime.timedelta(seconds=settings.deploy_task_retention_seconds))
        alias_repository = AliasRepository(db)
        await models.ensure_indexes()
        await tenancy_repository.ensure_indexes()
        await deployment_repository.ensure_indexes()
        await delete_tasks.ensure_indexes()
        await alias_repository.ensure_indexes()

        self.store = await self._open_store()
        self.tenancy = TenancyService(tenancy_repository)
        self.uploads = UploadService(
            self.tenancy,
            models,
            self.store,
            UploadLimits(
                max_archive_bytes=settings.max_archive_bytes,
                inspection=InspectionLimits(
                    max_unpacked_bytes=settings.max_unpacked_bytes,
                    max_compression_ratio=settings.max_compression_ratio,
                    max_members=settings.max_archive_members,
                ),
                lease_seconds=settings.upload_lease_seconds,
            ),
        )
        self.cluster = await self._start_cluster()
        self.catalog = ModelCatalog(self.tenancy, models)
        self.deletions = DeletionService(self.tenancy, models, self.store, self.cluster, delete_tasks, alias_repository)
        self.aliases = AliasService(self.tenancy, self.catalog, alias_repository, self.cluster)
        self.janitor = Janitor(models, self.store, self.deletions, settings.upload_lease_seconds)
        janitor_task = asyncio.create_task(self.janitor.run_forever(settings.janitor_interval_seconds))
        self._stack.push_async_callback(_cancel, janitor_task)
        self.deployments = DeploymentService(
            self.tenancy,
            self.catalog,
            deployment_repository,
            self.cluster,
            WatchTiming(poll_seconds=settings.watch_poll_seconds, heartbeat_seconds=settings.watch_heartbeat_seconds),
        )

        await self._start_grpc(ModelServiceServicer(
                self.tenancy, self.uploads, self.catalog, self.deployments, self.deletions, self.aliases
            ))
        probe_budget = settings.dependency_probe_timeout_seconds
        self.dependencies = DependencyMonitor(
            {
                METADATA_STORE: (lambda: db.command("ping"), min(probe_budget, settings.mongodb_timeout_seconds)),
                ARCHIVE_STORE: (self.store.probe, min(probe_budget, settings.s3_timeout_seconds)),
                # Generous for Ray: a probe after the cache died also recreates it.
                RAY: (self.cluster.ping, 3 * settings.ray_timeout_seconds),
            },
            self._on_dependencies_changed,
            interval_seconds=settings.dependency_check_interval_seconds,
        )
        monitor_task = asyncio.create_task(self.dependencies.run_forever())
        self._stack.push_async_callback(_cancel, monitor_task)
        self._start_metrics()

    def _start_metrics(self) -> None:
        settings = self.settings
        if settings.metrics_port < 0:
            return
        self.metrics = CacheMetrics(self.cluster.metrics_snapshot)
        refresher = asyncio.create_task(self.metrics.refresh_forever(settings.dependency_check_interval_seconds))
        self._stack.push_async_callback(_cancel, refresher)
        stop, self.metrics_port = serve_metrics(self.metrics, settings.metrics_host, settings.metrics_port)
        self._stack.callback(stop)
        logger.info("Prometheus metrics on http://%s:%d/metrics", settings.metrics_host, self.metrics_port)

    async def _on_dependencies_changed(self, all_up: bool, down: list[str]) -> None:
        """Health follows the dependencies, except while draining (then it stays NOT_SERVING)."""
        if self._health is None or self._draining:
            return
        status = health_pb2.HealthCheckResponse.SERVING if all_up else health_pb2.HealthCheckResponse.NOT_SERVING
        if not all_up:
            logger.warning("health NOT_SERVING: unreachable: %s", ", ".join(down))
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def _start_cluster(self) -> RayModelCluster:
        settings = self.settings
        address = settings.ray_address or await asyncio.to_thread(
            ensure_ray_head,
            settings.data_dir / "ray",
            object_store_bytes=settings.ray_object_store_bytes,
            num_cpus=settings.ray_num_cpus,
        )
        scratch = (settings.data_dir / "scratch").resolve()
        scratch.mkdir(parents=True, exist_ok=True)
        cluster = RayModelCluster(
            address,
            CacheConfig(
                mongodb_uri=self.mongodb_uri,
                database=settings.mongodb_database,
                mongodb_timeout_seconds=settings.mongodb_timeout_seconds,
                store=StoreConfig.from_settings(settings),
                ray_cluster_url=settings.ray_cluster_url or f"ray://{address}",
                max_unpacked_bytes=settings.max_unpacked_bytes,
                max_members=settings.max_archive_members,
                scratch_dir=str(scratch),
                deploy_task_retention_seconds=settings.deploy_task_retention_seconds,
                object_store_budget_fraction=settings.object_store_budget_fraction,
                auto_redeploy=settings.auto_redeploy,
                alias_blue_grace_seconds=settings.alias_blue_grace_seconds,
            ),
            call_timeout_seconds=settings.ray_timeout_seconds,
        )
        await cluster.start()
        self._stack.push_async_callback(cluster.close)
        return cluster

    async def _open_store(self) -> ArchiveStore:
        settings = self.settings
        if not settings.s3_bucket:
            return LocalArchiveStore(settings.data_dir / "archives")
        session = aioboto3.Session()
        client = await self._stack.enter_async_context(
            session.client(
                "s3",
                endpoint_url=settings.s3_endpoint_url or None,
                region_name=settings.s3_region,
                config=BotocoreConfig(
                    connect_timeout=min(5.0, settings.s3_timeout_seconds),
                    read_timeout=settings.s3_timeout_seconds,
                    retries={"max_attempts": 2, "mode": "standard"},
                ),
            )
        )
        store = S3ArchiveStore(
            client,
            settings.s3_bucket,
            prefix=settings.s3_prefix,
            part_bytes=settings.multipart_part_bytes,
            parts_in_flight=settings.multipart_parts_in_flight,
            request_timeout_seconds=settings.s3_timeout_seconds,
        )
        await store.ensure_bucket(settings.s3_region)
        return store

    async def _start_grpc(self, servicer: ModelServiceServicer) -> None:
        settings = self.settings
        limit = settings.grpc_max_message_bytes
        server = grpc.aio.server(
            interceptors=[self._interceptor],
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ],
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(servicer, server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
        if self.port == 0:
            raise OSError(f"could not bind {settings.grpc_host}:{settings.grpc_port}")
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("modelservice listening on %s:%d", settings.grpc_host, self.port)

    @property
    def address(self) -> str:
        return f"{self.settings.grpc_host}:{self.port}"

    async def begin_draining(self) -> None:
        """Health turns NOT_SERVING: Envoy (and any load balancer) stops sending new calls."""
        self._draining = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()

    async def stop(self) -> None:
        """Drains first, then in-flight RPCs get the grace period, then clients close.

        The server is stopped only once our calls have ended and their answers had a moment
        to leave: stopping it while the last answer is still in the transport can reach the
        client as CANCELLED.
        """
        if self._server is not None:
            await self.begin_draining()
            finished = await self._interceptor.calls.wait_idle(self.settings.shutdown_grace_seconds)
            if finished:
                await asyncio.sleep(ANSWER_FLUSH_SECONDS)
            else:
                logger.warning("%d calls still under way after the grace period; cancelling them", self._interceptor.calls.count)
            await self._server.stop(ANSWER_FLUSH_SECONDS)
            self._server = None
        await self._stack.aclose()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
