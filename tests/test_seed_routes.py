"""The seeds' own route families through the real Envoy: seed 004's deployment and
deletion tasks (`/deploy`, `/deploy/{task_id}`, `/deploy-status/{model_id}`, `/delete`,
`/delete/{task_id}`, `/delete-status/{model_id}`) and seed 003's OpenSearch routes
(`/_plugins/_ml/models/{model_id}/_deploy`, `/_plugins/_ml/tasks/{task_id}`). None names
a namespace: it comes from the key, or from `namespace_id` when the key has several."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from modelservice_sdk.client import ModelServiceClient
from server.app import ModelServiceApp
from server.core.models import Tier
from server.embedded.envoy import EnvoyEndpoints
from tests.conftest import Tenant, make_tenant
from tests.support.uploads import upload_model
from tests.test_rest_gateway import _assert_error, _headers, _json, http  # noqa: F401 (http is a fixture)

pytestmark = pytest.mark.integration


async def _call(http: aiohttp.ClientSession, method: str, url: str, tenant: Tenant, body: Any = None) -> tuple[int, Any]:
    async with http.request(method, url, json=body, headers=_headers(tenant)) as response:
        return response.status, await _json(response)


async def test_seed_004_deploy_answers_its_task_found_by_id_and_by_model_with_the_namespace_from_the_key(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    base = gateway.base_url
    status, deployed = await _call(http, "POST", f"{base}/deploy", tenant, {"model_id": model_id, "config": {"param": "value"}})
    assert status == 200, deployed
    assert set(deployed) == {"task_id", "status", "model_id", "metadata"}
    assert (deployed["status"], deployed["model_id"]) == ("completed", model_id)
    assert deployed["metadata"]["config"] == {"param": "value"}
    assert deployed["metadata"]["namespace_id"] == tenant.namespace_id and deployed["metadata"]["stage"] == "deployed"

    status, by_id = await _call(http, "GET", f"{base}/deploy/{deployed['task_id']}", tenant)
    assert status == 200 and by_id["task_id"] == deployed["task_id"] and by_id["status"] == "completed"
    assert by_id["metadata"]["config"] == {"param": "value"}  # kept on the task
    status, by_model = await _call(http, "GET", f"{base}/deploy-status/{model_id}", tenant)
    assert status == 200 and by_model["task_id"] == deployed["task_id"]

    status, missing = await _call(http, "GET", f"{base}/deploy/{uuid.uuid4().hex}", tenant)
    assert status == 404
    _assert_error(missing, 404, "deploy_task_not_found")
    status, oversized = await _call(http, "POST", f"{base}/deploy", tenant, {"model_id": model_id, "config": {"blob": "x" * 70_000}})
    assert status == 400 and oversized["error"]["details"]["field"] == "config"
    status, never = await _call(http, "GET", f"{base}/deploy-status/not-a-model", tenant)
    assert status == 404
    _assert_error(never, 404, "model_not_found")


async def test_seed_004_delete_is_a_task_found_by_id_and_by_model_and_keeps_its_parameters(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "onnx")
    base = gateway.base_url
    status, deleted = await _call(http, "POST", f"{base}/delete", tenant, {"model_id": model_id, "param": "value"})
    assert status == 200, deleted
    assert (deleted["status"], deleted["model_id"], deleted["metadata"]["params"]) == ("completed", model_id, {"param": "value"})
    assert deleted["metadata"]["stage"] == "done"
    status, by_id = await _call(http, "GET", f"{base}/delete/{deleted['task_id']}", tenant)
    assert status == 200 and by_id == deleted
    status, by_model = await _call(http, "GET", f"{base}/delete-status/{model_id}", tenant)
    assert status == 200 and by_model == deleted

    status, again = await _call(http, "POST", f"{base}/delete", tenant, {"model_id": model_id})
    assert status == 404
    _assert_error(again, 404, "model_not_found")
    status, nameless = await _call(http, "POST", f"{base}/delete", tenant, {"param": "value"})
    assert status == 400 and nameless["error"]["details"]["field"] == "model_id"
    status, missing = await _call(http, "GET", f"{base}/delete/{uuid.uuid4().hex}", tenant)
    assert status == 404
    _assert_error(missing, 404, "delete_task_not_found")


async def test_seed_003_deploy_and_task_answer_in_opensearch_shapes(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient,
    tenant: Tenant, tmp_path: Path,
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", task_type="text_embedding")
    [node] = [n for n in (await client.get_cache_status(tenant.namespace_id)).nodes][:1]
    base = gateway.base_url
    status, started = await _call(
        http, "POST", f"{base}/_plugins/_ml/models/{model_id}/_deploy", tenant, {"node_ids": [node.node_id]}
    )
    assert status == 200 and set(started) == {"task_id", "status"} and started["status"] == "DEPLOYING", started
    for _ in range(200):
        status, task = await _call(http, "GET", f"{base}/_plugins/_ml/tasks/{started['task_id']}", tenant)
        if task.get("state") in ("COMPLETED", "FAILED"):
            break
        await asyncio.sleep(0.1)
    assert status == 200
    assert set(task) == {
        "model_id", "task_type", "function_name", "state", "worker_node", "create_time", "last_update_time",
        "is_async", "error",
    }
    assert (task["model_id"], task["task_type"], task["function_name"], task["state"], task["is_async"]) == (
        model_id, "DEPLOY_MODEL", "TEXT_EMBEDDING", "COMPLETED", True,
    )
    assert task["worker_node"] == [node.node_id]
    # Epoch milliseconds as JSON numbers, as OpenSearch writes them.
    assert isinstance(task["create_time"], int) and isinstance(task["last_update_time"], int)
    assert 1_600_000_000_000 < task["create_time"] <= task["last_update_time"]

    status, cached = await _call(http, "POST", f"{base}/_plugins/_ml/models/{model_id}/_deploy", tenant)
    assert status == 200 and cached["status"] == "COMPLETED"  # no body: deployed already

    deleted = await client.delete_model(tenant.namespace_id, model_id)
    status, deletion = await _call(http, "GET", f"{base}/_plugins/_ml/tasks/{deleted.task_id}", tenant)
    assert status == 200 and (deletion["task_type"], deletion["state"]) == ("DELETE_MODEL", "COMPLETED")
    status, missing = await _call(http, "GET", f"{base}/_plugins/_ml/tasks/{uuid.uuid4().hex}", tenant)
    assert status == 404
    _assert_error(missing, 404, "task_not_found")


async def test_a_key_for_several_namespaces_must_name_one_and_another_namespaces_task_is_404(
    app: ModelServiceApp, gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient,
    tenant: Tenant, tmp_path: Path,
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    second = f"ns-{uuid.uuid4().hex[:10]}"
    await app.tenancy.create_namespace(second, Tier.ENTERPRISE)
    both = Tenant(second, (await app.tenancy.issue_key([tenant.namespace_id, second], label="two")).key)
    base = gateway.base_url

    status, ambiguous = await _call(http, "POST", f"{base}/deploy", both, {"model_id": model_id})
    assert status == 400 and ambiguous["error"]["details"]["field"] == "namespace_id"
    assert "namespace_id" in ambiguous["error"]["message"]
    status, named = await _call(http, "POST", f"{base}/deploy", both, {"model_id": model_id, "namespace_id": tenant.namespace_id})
    assert status == 200 and named["status"] == "completed"
    status, by_query = await _call(http, "GET", f"{base}/deploy/{named['task_id']}?namespace_id={tenant.namespace_id}", both)
    assert status == 200 and by_query["task_id"] == named["task_id"]

    stranger = await make_tenant(app)
    for path in (f"/deploy/{named['task_id']}", f"/deploy-status/{model_id}", f"/_plugins/_ml/tasks/{named['task_id']}"):
        status, hidden = await _call(http, "GET", f"{base}{path}", stranger)
        assert status == 404, (path, hidden)
    status, refused = await _call(http, "GET", f"{base}/deploy/{named['task_id']}?task_id=other", tenant)
    assert status == 400 and refused["error"]["code"] == "path_field_in_query"
