"""The public REST API through the real Envoy: paths, JSON shapes, errors, streaming."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelservice_sdk.client import ModelServiceClient, file_sha256
from server.app import ModelServiceApp
from server.core.models import Tier
from server.embedded.envoy import EnvoyEndpoints, envoy_proxy
from server.embedded.processes import free_port
from server.embedded.envoy import wait_until_routing
from tests.conftest import TEST_PART_BYTES, TEST_PARTS_IN_FLIGHT, Tenant, make_tenant
from tests.support import model_files
from tests.support.openapi import schema_errors
from tests.support.ray_load import hold_one_cpu
from tests.support.uploads import build_model_archive, upload_model

pytestmark = pytest.mark.integration

ERROR_SHAPE_KEYS = {"success", "status", "error"}


def _headers(tenant: Tenant | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.api_key}"} if tenant else {}


def _form(archive: Path, **fields: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():  # fields first, as the service requires
        form.add_field(name, value)
    form.add_field("file", archive.open("rb"), filename=archive.name, content_type="application/gzip")
    return form


async def _json(response: aiohttp.ClientResponse) -> Any:
    return json.loads(await response.read())


def _assert_error(body: Any, status: int, code: str) -> None:
    assert set(body) == ERROR_SHAPE_KEYS, body
    assert body["success"] is False and body["status"] == status
    assert body["error"]["code"] == code
    assert body["error"]["message"] and body["error"]["type"]
    assert isinstance(body["error"]["details"], dict)
    assert schema_errors("get_model", "ErrorResponse", body) == []


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def test_multipart_upload_get_and_deploy_match_the_public_api(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "safetensors")
    models_url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models"
    form = _form(
        archive, name="bert", version="1.0.0", model_format="safetensors", framework="sentence-transformers",
        task_type="embedding", num_cpus="1", num_gpus="0", memory_gb="0.5",
    )

    async with http.post(models_url, data=form, headers=_headers(tenant)) as response:
        assert response.status == 200
        uploaded = await _json(response)
    assert schema_errors("upload_model", "ModelUploadResponse", uploaded) == []
    assert uploaded["deployment_status"] == "not_deployed" and uploaded["success"] is True
    assert uploaded["model_hash"] == file_sha256(archive)
    model_id = uploaded["model_id"]

    async with http.get(f"{models_url}/{model_id}", headers=_headers(tenant)) as response:
        assert response.status == 200
        detail = await _json(response)
    assert schema_errors("get_model", "ModelDetailResponse", detail) == []
    model = detail["model"]
    assert (model["model_format"], model["deployed"], model["framework"]) == ("safetensors", False, "sentence-transformers")
    assert model["resource_requirements"] == {"num_cpus": 1, "num_gpus": 0, "memory": 536870912}

    async with http.post(f"{models_url}/{model_id}/deploy", headers=_headers(tenant)) as response:
        assert response.status == 200
        deployed = await _json(response)
    assert schema_errors("deploy_model", "ModelDeployResponse", deployed) == []
    assert (deployed["deployment_status"], deployed["cached"], deployed["success"]) == ("deployed", False, True)

    async with http.get(f"{models_url}/{model_id}", headers=_headers(tenant)) as response:
        after = (await _json(response))["model"]
    assert schema_errors("get_model", "CustomModelDocument", after) == []
    assert after["deployed"] is True and after["deployment_info"]["endpoint"] == f'load_namespace_model("{model_id}")'

    async with http.get(
        f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/deploy_tasks/{deployed['task_id']}", headers=_headers(tenant)
    ) as response:
        task = await _json(response)
    async with http.get(f"{models_url}/{model_id}/deploy_status", headers=_headers(tenant)) as response:
        status = await _json(response)
    assert task == status
    assert (task["state"], task["task_type"], task["model_id"], task["is_async"]) == ("COMPLETED", "DEPLOY_MODEL", model_id, False)

    async with http.get(models_url, params={"page_size": "10"}, headers=_headers(tenant)) as response:
        listed = await _json(response)
    assert [m["model_id"] for m in listed["models"]] == [model_id] and listed["next_page_token"] == ""
    assert schema_errors("get_model", "CustomModelDocument", listed["models"][0]) == []
    async with http.post(f"{models_url}/{model_id}/undeploy", headers=_headers(tenant)) as response:
        assert (await _json(response))["was_cached"] is True
    async with http.delete(f"{models_url}/{model_id}", headers=_headers(tenant)) as response:
        assert response.status == 200 and (await _json(response))["success"] is True
    async with http.get(f"{models_url}/{model_id}", headers=_headers(tenant)) as response:
        assert response.status == 404


async def test_raw_archive_body_with_metadata_in_the_query_uploads(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "onnx")
    url = (
        f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models"
        f"?name=raw&version=2&model_format=onnx&memory_gb=0.5&expected_sha256={file_sha256(archive)}"
    )
    async with http.post(url, data=archive.read_bytes(), headers={**_headers(tenant), "Content-Type": "application/gzip"}) as response:
        assert response.status == 200, await response.text()
        body = await _json(response)
    assert body["model_hash"] == file_sha256(archive)


async def test_a_multipart_upload_many_times_the_buffer_budget_streams_with_bounded_buffering(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant, tmp_path: Path
) -> None:
    budget = (TEST_PARTS_IN_FLIGHT + 1) * TEST_PART_BYTES
    weights = model_files.reference_weights(scale=144 * 1024)
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "big", weights), tmp_path / "big.tar", "")
    assert archive.stat().st_size > 4 * budget
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models"
    form = _form(archive, name="big-rest", version="1", model_format="safetensors")

    async with http.post(url, data=form, headers=_headers(tenant)) as response:
        assert response.status == 200, await response.text()
        body = await _json(response)

    assert body["model_hash"] == file_sha256(archive) and body["size_bytes"] == archive.stat().st_size
    stats = next(s for s in app.uploads.recent_uploads if s.model_id == body["model_id"])
    assert 0 < stats.peak_buffered_bytes <= budget


@pytest.mark.parametrize(("accept", "framing"), [("text/event-stream", "sse"), ("application/json", "ndjson")])
async def test_watch_streams_events_as_they_happen(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient,
    tenant: Tenant, tmp_path: Path, accept: str, framing: str,
) -> None:
    # The model needs all 4 CPUs of the test cluster; one is held for a few seconds, so the
    # deployment sits queued while the watcher must already have its first event.
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", num_cpus=4.0)
    holder = await hold_one_cpu(4.0, tmp_path)
    pending = await client.deploy_model(tenant.namespace_id, model_id, wait=False)
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models/{model_id}/deployment/watch"

    events: list[dict[str, Any]] = []
    first_seen_while_running = None
    async with http.get(url, params={"task_id": pending.task_id}, headers={**_headers(tenant), "Accept": accept}) as response:
        assert response.status == 200
        if framing == "sse":
            assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.content:
            text = line.decode().strip()
            if not text:
                continue
            if framing == "sse":
                assert text.startswith("data: ")
                text = text.removeprefix("data: ")
            events.append(json.loads(text))
            if first_seen_while_running is None:
                task = await client.get_deploy_task(tenant.namespace_id, pending.task_id)
                first_seen_while_running = task.state != "COMPLETED"
    await holder

    assert first_seen_while_running is True  # delivered incrementally, not all at the end
    changes = [e for e in events if e["state"] != "heartbeat"]
    assert changes[0]["state"] == "queued" and changes[-1]["state"] == "deployed" and changes[-1]["terminal"] is True
    assert [e["sequence"] for e in changes] == list(range(changes[0]["sequence"], changes[-1]["sequence"] + 1))


async def test_error_statuses_and_bodies_have_the_public_shape(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant, tmp_path: Path
) -> None:
    base = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models"
    async with http.get(f"{base}/missing") as response:
        _assert_error(await _json(response), 401, "unauthenticated")
        assert response.status == 401
    async with http.get(f"{base}/missing", headers=_headers(tenant)) as response:
        body = await _json(response)
        assert response.status == 404
        _assert_error(body, 404, "model_not_found")
        assert body["error"]["type"] == "NotFoundError" and body["error"]["details"]["id"] == "missing"
    async with http.get(f"{gateway.base_url}/v1/namespaces/ns_123/models/x", headers=_headers(tenant)) as response:
        body = await _json(response)
        assert response.status == 404
        _assert_error(body, 404, "namespace_not_found")
        assert body["error"]["details"] == {"id": "ns_123", "resource": "namespace"}  # the public example
    limited = await make_tenant(app, Tier.PRO)
    archive = build_model_archive(tmp_path, "safetensors")
    async with http.post(
        f"{gateway.base_url}/v1/namespaces/{limited.namespace_id}/models",
        data=_form(archive, name="m", version="1", model_format="safetensors"), headers=_headers(limited),
    ) as response:
        assert response.status == 403
        _assert_error(await _json(response), 403, "custom_models_not_supported")
    for expected_status, code in ((200, None), (409, "model_already_exists")):
        async with http.post(
            base, data=_form(archive, name="dup", version="1", model_format="safetensors", memory_gb="0.5"), headers=_headers(tenant)
        ) as response:
            assert response.status == expected_status
            if code:
                _assert_error(await _json(response), 409, code)
    async with http.post(
        base, data=_form(archive, name="bad", version="1", model_format="keras"), headers=_headers(tenant)
    ) as response:
        body = await _json(response)
        assert response.status == 400
        _assert_error(body, 400, "invalid_argument")
        assert body["error"]["details"]["field"] == "model_format"
    file_first = aiohttp.FormData()
    file_first.add_field("file", archive.open("rb"), filename=archive.name)
    file_first.add_field("name", "late")
    async with http.post(base, data=file_first, headers=_headers(tenant)) as response:
        body = await _json(response)
        assert response.status == 400 and "before the file" in body["error"]["message"]
    async with http.get(f"{base}/x?no_such_parameter=1", headers=_headers(tenant)) as response:
        assert response.status == 400
        body = await _json(response)
        assert set(body) == ERROR_SHAPE_KEYS and body["status"] == 400 and body["success"] is False


async def test_errors_envoy_makes_itself_have_the_public_shape(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    nothing_listens = free_port()
    with envoy_proxy(tmp_path / "envoy", backend_host="127.0.0.1", backend_port=nothing_listens) as lonely:
        async with http.get(f"{lonely.base_url}/v1/namespaces/a/models/b") as response:
            body = await _json(response)
    assert response.status == 503
    assert body["success"] is False and body["status"] == 503 and body["error"]["code"] == "no_healthy_upstream"
    assert schema_errors("get_model", "ErrorResponse", body) == []


async def test_a_query_parameter_cannot_reach_another_namespaces_model(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient,
    tenant: Tenant, tmp_path: Path,
) -> None:
    victim = await make_tenant(app)
    async with ModelServiceClient(app.address, victim.api_key) as victim_client:
        victim_model = await upload_model(victim_client, victim.namespace_id, tmp_path, "safetensors")
    # The attacker's own namespace in the path, the victim's in the query (which the
    # transcoder would let win): refused before it reaches the service.
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models/{victim_model}"
    for field, value in (("namespace_id", victim.namespace_id), ("model_id", victim_model), ("namespace%5Fid", "x")):
        async with http.get(f"{url}?{field}={value}", headers=_headers(tenant)) as response:
            body = await _json(response)
        assert response.status == 400, field
        _assert_error(body, 400, "path_field_in_query")
    async with http.post(
        f"{url}/deploy", json={"namespace_id": victim.namespace_id}, headers=_headers(tenant)
    ) as response:
        assert response.status in (400, 404)
        assert (await _json(response))["success"] is False


@pytest.mark.parametrize(
    "path",
    ["/v1/nope", "//v1/namespaces/a/models", "/v1/namespaces/%2E%2E/models/x/..", "/V1/namespaces/a/models/b",
     "/modelservice.v1.ModelService/GetModel", "/"],
)
async def test_a_path_outside_the_api_answers_404_in_the_public_shape(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant, path: str
) -> None:
    async with http.get(gateway.base_url + path, headers=_headers(tenant)) as response:
        body = await _json(response)
    assert response.status == 404, body
    _assert_error(body, 404, "route_not_found")


async def test_a_path_that_is_not_utf8_is_a_400_in_the_public_shape_without_internals(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.base_url}/v1/namespaces/%FF%FE/models/x") as response:
        body = await _json(response)
    assert response.status == 400, body
    _assert_error(body, 400, "malformed_request")
    assert "proto" not in body["error"]["message"].lower()


async def test_headers_too_large_answer_431_in_the_public_shape(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models/{'x' * 65536}"
    async with http.get(url, headers=_headers(tenant)) as response:
        body = await _json(response)
    assert response.status == 431
    assert body["success"] is False and body["status"] == 431
    assert body["error"]["code"] == "request_headers_too_large"


async def test_native_grpc_works_through_the_same_envoy_port(
    gateway: EnvoyEndpoints, tenant: Tenant, tmp_path: Path
) -> None:
    async with ModelServiceClient(gateway.grpc_address, tenant.api_key) as through_envoy:
        model_id = await upload_model(through_envoy, tenant.namespace_id, tmp_path, "onnx")
        got = await through_envoy.get_model(tenant.namespace_id, model_id)
    assert got.model.model_format == "onnx"


async def test_envoy_stops_routing_to_a_draining_replica(
    app: ModelServiceApp, http: aiohttp.ClientSession, tenant: Tenant, tmp_path: Path
) -> None:
    async with ModelServiceApp(app.settings) as replica:
        with envoy_proxy(tmp_path / "envoy", backend_host="127.0.0.1", backend_port=replica.port) as edge:
            await wait_until_routing(edge)
            url = f"{edge.base_url}/v1/namespaces/{tenant.namespace_id}/models/none"
            async with http.get(url, headers=_headers(tenant)) as response:
                assert response.status == 404  # served by the replica

            await replica.begin_draining()

            for _ in range(100):  # checks every 2 s; two failed in a row take it out
                async with http.get(url, headers=_headers(tenant)) as response:
                    if response.status == 503:
                        body = await _json(response)
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("Envoy kept routing to a replica whose health is NOT_SERVING")
    assert body["error"]["code"] == "no_healthy_upstream" and body["status"] == 503


async def test_a_failed_deployment_answers_500_with_the_deploy_response_as_body(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient,
    tenant: Tenant, tmp_path: Path,
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", num_gpus=2)
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models/{model_id}/deploy"
    async with http.post(url, headers=_headers(tenant)) as response:
        body = await _json(response)
    assert response.status == 500  # the public API's "Deployment failed"
    assert schema_errors("deploy_model", "ModelDeployResponse", body) == []
    assert (body["success"], body["deployment_status"]) == (False, "failed")
    assert "schedule: INSUFFICIENT_RESOURCES" in body["message"]
    assert "x-modelservice-http-status" not in response.headers


async def test_the_cache_status_has_a_rest_path(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/cache"
    async with http.get(url, headers=_headers(tenant)) as response:
        body = await _json(response)
    assert response.status == 200 and body["success"] is True
    [node] = body["nodes"]
    assert node["capacity_bytes"] > 0 and node["budget_bytes"] > 0 and node["models"] == []
