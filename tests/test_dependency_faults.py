"""Dependencies that stall or go down: callers get UNAVAILABLE naming the dependency within
seconds, health turns NOT_SERVING while it lasts, and everything recovers without a restart.

The service reaches MongoDB and S3 through a fault-injecting TCP proxy (real servers behind
it); the model cache actor is killed through Ray itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelservice.v1 import model_service_pb2 as pb
from modelservice_sdk.client import ModelServiceClient, ServiceError, upload_header
from server.app import ModelServiceApp
from server.settings import Settings
from tests.conftest import Tenant, make_tenant
from tests.support import model_files
from tests.support.faults import FaultyProxy, Mode, faulty_proxy
from tests.support.uploads import upload_fields, upload_model

pytestmark = pytest.mark.integration

TIMEOUT_SECONDS = 1.5
"""Each dependency's time budget in these tests: an outage must be reported about this fast."""


@dataclass
class ProxiedService:
    app: ModelServiceApp
    mongodb: FaultyProxy
    s3: FaultyProxy
    tenant: Tenant


def _through(uri: str, proxy: FaultyProxy) -> str:
    """`uri` with its host and port replaced by the proxy's."""
    parts = urllib.parse.urlsplit(uri)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = (credentials + "@" if credentials else "") + f"127.0.0.1:{proxy.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def proxied(service_settings: Settings, tmp_path: Path) -> AsyncIterator[ProxiedService]:
    mongo_target = urllib.parse.urlsplit(service_settings.mongodb_uri)
    s3_target = urllib.parse.urlsplit(service_settings.s3_endpoint_url)
    assert mongo_target.hostname and mongo_target.port and s3_target.hostname and s3_target.port
    with faulty_proxy(mongo_target.hostname, mongo_target.port) as mongodb, faulty_proxy(
        s3_target.hostname, s3_target.port
    ) as s3:
        settings = Settings(**{
            **service_settings.__dict__,
            "mongodb_uri": _through(service_settings.mongodb_uri, mongodb),
            "s3_endpoint_url": _through(service_settings.s3_endpoint_url, s3),
            "mongodb_database": f"faults_{uuid.uuid4().hex[:8]}",
            "data_dir": tmp_path / "service",
            "mongodb_timeout_seconds": TIMEOUT_SECONDS,
            "s3_timeout_seconds": TIMEOUT_SECONDS,
            "ray_timeout_seconds": 5.0,
            "dependency_check_interval_seconds": 0.3,
        })
        async with ModelServiceApp(settings) as app:
            yield ProxiedService(app, mongodb, s3, await make_tenant(app))


async def _health(app: ModelServiceApp) -> int:
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # aio channel: the stubs type the sync one
        answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        status: int = answer.status
        return status


async def _refused_within(call: Awaitable[object], seconds: float) -> ServiceError:
    """The service's refusal of `call`, which must come within `seconds`."""
    started = time.monotonic()
    with pytest.raises(ServiceError) as raised:
        await call
    took = time.monotonic() - started
    assert took < seconds, took
    return raised.value


async def _wait_for_health(app: ModelServiceApp, status: int, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while await _health(app) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.1)


async def test_a_stalled_metadata_store_answers_unavailable_in_seconds_and_recovers(
    proxied: ProxiedService, tmp_path: Path
) -> None:
    app, tenant = proxied.app, proxied.tenant
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
        proxied.mongodb.set_mode(Mode.STALL)
        refused = await _refused_within(client.get_model(tenant.namespace_id, model_id), 4 * TIMEOUT_SECONDS + 2)
        assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "METADATA_STORE_UNAVAILABLE")
        await _wait_for_health(app, health_pb2.HealthCheckResponse.NOT_SERVING)
        proxied.mongodb.set_mode(Mode.FORWARD)
        await _wait_for_health(app, health_pb2.HealthCheckResponse.SERVING)
        assert (await client.get_model(tenant.namespace_id, model_id)).model.model_id == model_id


async def test_an_archive_store_that_stalls_mid_upload_fails_it_in_seconds_and_leaves_nothing(
    proxied: ProxiedService,
) -> None:
    app, tenant = proxied.app, proxied.tenant
    archive = model_files.tar_member_header("m/big.bin", 1 << 30)

    async def messages() -> AsyncIterator[pb.UploadModelRequest]:
        yield upload_header(upload_fields(tenant.namespace_id, "safetensors", name="stalled"))
        yield pb.UploadModelRequest(chunk=archive)
        for index in range(2000):
            if index == 12:  # two 5 MiB parts are in S3 now
                proxied.s3.set_mode(Mode.STALL)
            yield pb.UploadModelRequest(chunk=bytes(1 << 20))

    async with ModelServiceClient(app.address, tenant.api_key) as client:
        refused = await _refused_within(client.upload_stream(messages()), 6 * TIMEOUT_SECONDS + 5)
    assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "ARCHIVE_STORE_UNAVAILABLE")
    await _wait_for_health(app, health_pb2.HealthCheckResponse.NOT_SERVING)
    proxied.s3.set_mode(Mode.FORWARD)
    await _wait_for_health(app, health_pb2.HealthCheckResponse.SERVING)
    # The abort could not reach S3 while it stalled; the janitor finishes it from our records.
    await app.janitor.sweep()
    assert [p for p in await app.store.list_pending() if p.key.startswith(tenant.namespace_id + "/")] == []
    async with ModelServiceClient(app.address, tenant.api_key) as client:  # the name is free again
        small = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, "gz")

        async def retry() -> AsyncIterator[pb.UploadModelRequest]:
            yield upload_header(upload_fields(tenant.namespace_id, "safetensors", name="stalled"))
            yield pb.UploadModelRequest(chunk=small)

        assert (await client.upload_stream(retry())).success


async def test_an_archive_store_refusing_connections_answers_unavailable_and_recovers(
    proxied: ProxiedService, tmp_path: Path
) -> None:
    app, tenant = proxied.app, proxied.tenant
    proxied.s3.set_mode(Mode.REFUSE)
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        refused = await _refused_within(
            upload_model(client, tenant.namespace_id, tmp_path, "safetensors"), 4 * TIMEOUT_SECONDS + 2
        )
        assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "ARCHIVE_STORE_UNAVAILABLE")
        await _wait_for_health(app, health_pb2.HealthCheckResponse.NOT_SERVING)
        proxied.s3.set_mode(Mode.FORWARD)
        await _wait_for_health(app, health_pb2.HealthCheckResponse.SERVING)
        assert await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
