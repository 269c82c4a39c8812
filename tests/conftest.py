"""Shared fixtures: real MongoDB (nx-27017 or MODELSERVICE_TEST_MONGODB_URI), real S3
(moto's server or MODELSERVICE_TEST_S3_ENDPOINT_URL), and the service on a free port."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
from moto.server import ThreadedMotoServer

from modelservice_sdk.client import ModelServiceClient
from server.app import ModelServiceApp
from server.core.models import Tier
from server.embedded.envoy import EnvoyEndpoints, envoy_proxy, wait_until_routing
from server.embedded.processes import embedded_mongodb, ray_head
from server.settings import GIB, MIB, Settings

# Small parts so that a test archive of tens of MiB spans many parts.
TEST_PART_BYTES = 5 * MIB
TEST_PARTS_IN_FLIGHT = 2


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modelservice")


@pytest.fixture(scope="session")
async def mongodb_uri(session_dir: Path) -> AsyncIterator[str]:
    given = os.environ.get("MODELSERVICE_TEST_MONGODB_URI")
    if given:
        yield given
        return
    async with embedded_mongodb(session_dir / "mongodb") as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    given = os.environ.get("MODELSERVICE_TEST_S3_ENDPOINT_URL")
    if given:
        yield given
        return
    for variable, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        os.environ.setdefault(variable, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def ray_address(s3_endpoint: str, session_dir: Path) -> Iterator[str]:
    """A Ray head of its own (MODELSERVICE_TEST_RAY_ADDRESS selects an existing cluster).

    Started after the S3 fixture so that its workers inherit the S3 credentials.
    """
    given = os.environ.get("MODELSERVICE_TEST_RAY_ADDRESS")
    if given:
        yield given
        return
    with ray_head(session_dir / "ray", object_store_bytes=1 * GIB, num_cpus=4, env=dict(os.environ)) as address:
        yield address


@pytest.fixture(scope="session")
def ray_driver(ray_address: str) -> Iterator[None]:
    """This process's one connection to the test cluster, for the whole session.

    The services tests start in-process then find Ray connected and leave the connection
    alone: connecting and disconnecting a Ray driver many times in one process is not
    something Ray supports well (it has crashed the process in CoreWorkerMemoryStore).
    """
    ray.init(address=ray_address, namespace="modelservice", log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def service_settings(
    mongodb_uri: str, s3_endpoint: str, ray_address: str, session_dir: Path, ray_driver: None
) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(
        grpc_port=0,
        mongodb_uri=mongodb_uri,
        mongodb_database=f"modelservice_test_{run}",
        s3_bucket=f"modelservice-test-{run}",
        s3_endpoint_url=s3_endpoint,
        ray_address=ray_address,
        watch_poll_seconds=0.05,
        watch_heartbeat_seconds=1.0,
        data_dir=session_dir / "service",
        multipart_part_bytes=TEST_PART_BYTES,
        multipart_parts_in_flight=TEST_PARTS_IN_FLIGHT,
        shutdown_grace_seconds=2.0,
        metrics_port=0,
        dependency_check_interval_seconds=0.5,
        auto_redeploy=False,  # tests/test_restarts.py turns it on where it is the subject
    )


@pytest.fixture(scope="session")
async def app(service_settings: Settings) -> AsyncIterator[ModelServiceApp]:
    async with ModelServiceApp(service_settings) as running:
        yield running


@dataclass(frozen=True)
class Tenant:
    namespace_id: str
    api_key: str


async def make_tenant(app: ModelServiceApp, tier: Tier = Tier.ENTERPRISE) -> Tenant:
    namespace_id = f"ns-{uuid.uuid4().hex[:10]}"
    await app.tenancy.create_namespace(namespace_id, tier)
    issued = await app.tenancy.issue_key([namespace_id], label="test")
    return Tenant(namespace_id=namespace_id, api_key=issued.key)


@contextlib.asynccontextmanager
async def own_service(
    service_settings: Settings, data_dir: Path, database_prefix: str, **overrides: Any
) -> AsyncIterator[tuple[ModelServiceApp, Tenant]]:
    """A service of its own on the session's servers (its own database, hence its own
    model cache actor, killed at the end so its weights leave the object store)."""
    settings = Settings(**{
        **service_settings.__dict__,
        "mongodb_database": f"{database_prefix}_{uuid.uuid4().hex[:8]}",
        "data_dir": data_dir,
        **overrides,
    })
    async with ModelServiceApp(settings) as app:
        yield app, await make_tenant(app)
        ray.kill(ray.get_actor(app.cluster.actor_name, namespace="modelservice"))


@pytest.fixture
async def tenant(app: ModelServiceApp) -> Tenant:
    return await make_tenant(app)


@pytest.fixture
async def client(app: ModelServiceApp, tenant: Tenant) -> AsyncIterator[ModelServiceClient]:
    async with ModelServiceClient(app.address, tenant.api_key) as connected:
        yield connected


@pytest.fixture(scope="session")
async def gateway(app: ModelServiceApp, session_dir: Path) -> AsyncIterator[EnvoyEndpoints]:
    """The real Envoy in front of the session's service, healthy and routing."""
    with envoy_proxy(session_dir / "envoy", backend_host="127.0.0.1", backend_port=app.port) as endpoints:
        await wait_until_routing(endpoints)
        yield endpoints

