"""Restarts: of the service during and after a deployment, and of the Ray cluster.

The service runs as a real process here (`python -m server`), killed with SIGKILL or
stopped with SIGTERM, against the same MongoDB and S3 as the other tests.
"""

from __future__ import annotations

import asyncio
import json
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelservice.v1 import model_service_pb2 as pb

from modelservice_sdk.client import ModelServiceClient, ServiceError, upload_header
from server.embedded.processes import free_port, ray_head
from server.settings import GIB, Settings
from tests.support import model_files
from tests.support.service_process import ServiceProcess, service_environment, start_service
from tests.support.uploads import upload_fields, upload_model

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def running_service(environment: dict[str, str], log: Path) -> Iterator[ServiceProcess]:
    service = start_service(environment, log)
    try:
        yield service
    finally:
        service.stop()


@contextlib.asynccontextmanager
async def connected(service: ServiceProcess) -> AsyncIterator[ModelServiceClient]:
    async with ModelServiceClient(service.address, service.api_key) as client:
        yield client


@pytest.fixture
def isolated_settings(service_settings: Settings) -> Settings:
    """Same servers, a database of its own: the dev namespace and key are per test."""
    return Settings(**{**service_settings.__dict__, "mongodb_database": f"restarts_{uuid.uuid4().hex[:8]}"})


async def test_killing_the_service_mid_deployment_neither_loses_nor_sticks_it(
    isolated_settings: Settings, ray_address: str, tmp_path: Path
) -> None:
    environment = service_environment(isolated_settings, tmp_path / "data", ray_address)
    # 48 MiB of weights: the load takes long enough to kill the service while it runs.
    weights = model_files.reference_weights(scale=96 * 1024)
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "big", weights), tmp_path / "big.tar.gz")
    with running_service(environment, tmp_path / "first.log") as first:
        async with connected(first) as client:
            uploaded = await client.upload_file(archive, upload_fields(first.namespace_id, "safetensors"))
            pending = await client.deploy_model(first.namespace_id, uploaded.model_id, wait=False)
        first.kill()
    with running_service(environment, tmp_path / "second.log") as second:
        async with connected(second) as client:
            events = [
                e async for e in client.watch_deployment(second.namespace_id, uploaded.model_id, task_id=pending.task_id)
            ]
            model = (await client.get_model(second.namespace_id, uploaded.model_id)).model
    assert events[-1].state == "deployed"
    assert model.deployed is True


async def test_a_model_deployed_before_a_restart_is_still_cached_after_it(
    isolated_settings: Settings, ray_address: str, tmp_path: Path
) -> None:
    environment = service_environment(isolated_settings, tmp_path / "data", ray_address)
    with running_service(environment, tmp_path / "first.log") as first:
        async with connected(first) as client:
            model_id = await upload_model(client, first.namespace_id, tmp_path, "onnx")
            deployed = await client.deploy_model(first.namespace_id, model_id)
        assert first.terminate() == 0  # graceful: health NOT_SERVING, drain, exit 0
    with running_service(environment, tmp_path / "second.log") as second:
        async with connected(second) as client:
            again = await client.deploy_model(second.namespace_id, model_id)
            model = (await client.get_model(second.namespace_id, model_id)).model
    assert deployed.deployment_status == "deployed"
    assert (again.deployment_status, again.cached, again.task_id) == ("deployed", True, deployed.task_id)
    assert model.deployed is True


async def test_after_a_ray_restart_lost_models_are_marked_and_load_again(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    def own_cluster(name: str) -> contextlib.AbstractContextManager[str]:
        return ray_head(tmp_path / name, object_store_bytes=GIB // 2, num_cpus=2, env=dict(os.environ))

    with own_cluster("ray-a") as first_cluster:
        environment = service_environment(isolated_settings, tmp_path / "data", first_cluster)
        with running_service(environment, tmp_path / "first.log") as first:
            async with connected(first) as client:
                model_id = await upload_model(client, first.namespace_id, tmp_path, "safetensors")
                assert (await client.deploy_model(first.namespace_id, model_id)).deployment_status == "deployed"
    # The cluster is gone, and the cached weights with it.
    with own_cluster("ray-b") as second_cluster:
        environment = service_environment(isolated_settings, tmp_path / "data", second_cluster)
        with running_service(environment, tmp_path / "second.log") as second:
            async with connected(second) as client:
                after_restart = (await client.get_model(second.namespace_id, model_id)).model
                redeployed = await client.deploy_model(second.namespace_id, model_id)
                final = (await client.get_model(second.namespace_id, model_id)).model
    assert after_restart.deployed is False and not after_restart.HasField("deployment_info")
    assert after_restart.deployment_status == "not_deployed" and "lost" in after_restart.deployment_error
    assert (redeployed.deployment_status, redeployed.cached) == ("deployed", False)
    assert final.deployed is True
    assert final.deployment_info.ray_cluster_url == f"ray://{second_cluster}"


async def test_after_a_ray_restart_deployed_models_come_back_by_themselves_pinned_first(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """AUTO_REDEPLOY: the models deployed on the lost cluster load again without a call,
    the pinned one before the more recently used one, each as an asynchronous task."""

    def own_cluster(name: str) -> contextlib.AbstractContextManager[str]:
        return ray_head(tmp_path / name, object_store_bytes=GIB // 2, num_cpus=2, env=dict(os.environ))

    with own_cluster("ray-a") as first_cluster:
        environment = service_environment(isolated_settings, tmp_path / "data", first_cluster)
        environment["MODELSERVICE_AUTO_REDEPLOY"] = "true"
        with running_service(environment, tmp_path / "first.log") as first:
            async with connected(first) as client:
                pinned = await upload_model(client, first.namespace_id, tmp_path, "safetensors", name="pinned")
                recent = await upload_model(client, first.namespace_id, tmp_path, "onnx", name="recent")
                never = await upload_model(client, first.namespace_id, tmp_path, "onnx", name="never-deployed")
                await client.deploy_model(first.namespace_id, pinned, pin=True)
                await client.deploy_model(first.namespace_id, recent)  # used after the pinned one
    with own_cluster("ray-b") as second_cluster:
        environment = service_environment(isolated_settings, tmp_path / "data", second_cluster)
        environment["MODELSERVICE_AUTO_REDEPLOY"] = "true"
        with running_service(environment, tmp_path / "second.log") as second:
            async with connected(second) as client:
                for _ in range(300):
                    states = [(await client.get_model(second.namespace_id, m)).model.deployment_status for m in (pinned, recent)]
                    if states == ["deployed", "deployed"]:
                        break
                    await asyncio.sleep(0.1)
                tasks = [await client.get_model_deploy_status(second.namespace_id, m) for m in (pinned, recent)]
                untouched = (await client.get_model(second.namespace_id, never)).model
                cache = {m.model_id: m.pinned for node in (await client.get_cache_status(second.namespace_id)).nodes for m in node.models}
    assert states == ["deployed", "deployed"]
    assert [(t.reason, t.is_async, t.state) for t in tasks] == [("AUTO_REDEPLOY", True, "COMPLETED")] * 2
    assert tasks[0].create_time.ToDatetime() <= tasks[1].create_time.ToDatetime()  # pinned first
    assert cache == {pinned: True, recent: False}  # the pin came back with it
    assert untouched.deployment_status == "not_deployed"


async def _until_the_service_reserved(settings: Settings, namespace_id: str) -> None:
    """Returns once an upload of the namespace holds a reservation (it is under way in the service)."""
    from pymongo import AsyncMongoClient

    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_uri)
    try:
        for _ in range(300):
            if await mongo[settings.mongodb_database]["models"].find_one({"namespace_id": namespace_id, "state": "uploading"}):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the upload never reached the service")
    finally:
        await mongo.close()


async def test_graceful_shutdown_lets_an_in_flight_upload_finish(
    isolated_settings: Settings, ray_address: str, tmp_path: Path
) -> None:
    environment = service_environment(isolated_settings, tmp_path / "data", ray_address)
    archive = model_files.pack(
        model_files.write_safetensors(tmp_path / "m", model_files.reference_weights()), tmp_path / "m.tar.gz"
    )
    with running_service(environment, tmp_path / "service.log") as service:
        async with connected(service) as client:
            data = archive.read_bytes()
            started = asyncio.Event()

            async def slow_upload() -> AsyncIterator[pb.UploadModelRequest]:
                yield upload_header(upload_fields(service.namespace_id, "safetensors"))
                # About 5 s in all: longer than any abort timer a library may arm on SIGTERM,
                # shorter than the service's grace period (8 s).
                for offset in range(0, len(data), 64):
                    yield pb.UploadModelRequest(chunk=data[offset : offset + 64])
                    started.set()
                    await asyncio.sleep(5 / (len(data) / 64))

            upload = asyncio.create_task(client.upload_stream(slow_upload()))
            await started.wait()
            await _until_the_service_reserved(isolated_settings, service.namespace_id)  # the call is in the service
            exit_code = await asyncio.to_thread(service.terminate)
            uploaded = await upload
    assert exit_code == 0
    assert uploaded.success


async def test_the_embedded_default_starts_again_when_its_mongodb_comes_back_elsewhere(
    isolated_settings: Settings, ray_address: str, tmp_path: Path
) -> None:
    """The README's run command, stopped and started again, with the Ray head (and its
    detached cache actor) surviving: the actor follows the new MongoDB address."""
    import socket

    environment = service_environment(isolated_settings, tmp_path / "data", ray_address)
    environment["MODELSERVICE_MONGODB_URI"] = ""  # the embedded nx-27017
    with running_service(environment, tmp_path / "first.log") as first:
        async with connected(first) as client:
            model_id = await upload_model(client, first.namespace_id, tmp_path, "safetensors")
            deployed = await client.deploy_model(first.namespace_id, model_id)
        assert first.terminate() == 0
    # Another program took the port the embedded MongoDB had: it comes back on another.
    previous_port = int((tmp_path / "data" / "mongodb" / "port").read_text())
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", previous_port))
        squatter.listen()
        with running_service(environment, tmp_path / "second.log") as second:
            async with connected(second) as client:
                again = await client.deploy_model(second.namespace_id, model_id)
                model = (await client.get_model(second.namespace_id, model_id)).model
        assert int((tmp_path / "data" / "mongodb" / "port").read_text()) != previous_port
    assert deployed.deployment_status == "deployed"
    assert (again.deployment_status, again.cached) == ("deployed", True)
    assert model.deployed is True


async def test_the_service_outlives_its_ray_head_and_reconnects_when_it_is_back(
    isolated_settings: Settings, tmp_path: Path
) -> None:
    """The head is down for longer than the 60 s after which Ray's driver would end the
    process by default; the service says so meanwhile and reconnects afterwards."""
    port = free_port()

    def head() -> contextlib.AbstractContextManager[str]:
        return ray_head(tmp_path / "ray", object_store_bytes=GIB // 2, num_cpus=2, env=dict(os.environ), port=port)

    async def health(service: ServiceProcess) -> int:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # aio channel: the stubs type the sync one
            status: int = (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)).status
            return status

    async def wait_for_health(service: ServiceProcess, status: int, within: float) -> float:
        started = time.monotonic()
        while await health(service) != status:
            assert time.monotonic() - started < within, f"health never became {status}"
            await asyncio.sleep(0.5)
        return time.monotonic() - started

    with head() as address:
        environment = service_environment(isolated_settings, tmp_path / "data", address)
        environment["MODELSERVICE_DEPENDENCY_CHECK_INTERVAL_SECONDS"] = "1"
        service = start_service(environment, tmp_path / "service.log")
        async with connected(service) as client:
            lost_id = await upload_model(client, service.namespace_id, tmp_path, "onnx")
            assert (await client.deploy_model(service.namespace_id, lost_id)).deployment_status == "deployed"
    try:
        async with connected(service) as client:
            # The head is gone now (the context ended): the service notices within seconds.
            assert await wait_for_health(service, health_pb2.HealthCheckResponse.NOT_SERVING, within=30) < 30
            model_id = await upload_model(client, service.namespace_id, tmp_path, "safetensors")  # no Ray needed
            with pytest.raises(ServiceError) as unavailable:
                await client.deploy_model(service.namespace_id, model_id)
            assert unavailable.value.reason == "RAY_UNAVAILABLE"
            await asyncio.sleep(65)
            assert service.process.poll() is None, "the service exited while its Ray head was down"
            with head():
                await wait_for_health(service, health_pb2.HealthCheckResponse.SERVING, within=90)
                deployed = await client.deploy_model(service.namespace_id, model_id)
                lost = (await client.get_model(service.namespace_id, lost_id)).model
        assert deployed.deployment_status == "deployed"
        assert (lost.deployment_status, lost.deployed) == ("not_deployed", False) and "lost" in lost.deployment_error
    finally:
        service.stop()


async def test_a_rest_request_sent_the_moment_ready_is_printed_reaches_the_service(
    isolated_settings: Settings, ray_address: str, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from server.embedded.processes import stop_process

    environment = service_environment(isolated_settings, tmp_path / "data", ray_address)
    http_port = free_port()
    environment.update(MODELSERVICE_REST_GATEWAY="true", MODELSERVICE_HTTP_PORT=str(http_port))
    process = subprocess.Popen(
        [sys.executable, "-m", "server"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL, start_new_session=True, text=True,
    )

    def status_right_after_ready() -> int:
        assert process.stdout is not None
        for line in process.stdout:
            if line.strip() == "modelservice is ready":
                break
        else:
            raise AssertionError("the service exited without saying it is ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/namespaces/dev/models/x", timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as refused:
            body = json.loads(refused.read())
            assert body["success"] is False
            return refused.code

    try:
        status = await asyncio.wait_for(asyncio.to_thread(status_right_after_ready), 120)
    finally:
        stop_process(process)
    assert status == 401  # the service itself answered (no API key); Envoy alone would say 503
