"""The model cache manages object-store memory (real Ray, MongoDB and S3): admission with
the numbers, LRU eviction that spares recently used and pinned models, reload on demand,
idle time-outs. A service of its own gives its models a small budget (10% of the test
cluster's 1 GiB object store, about 102 MiB)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray
from prometheus_client.utils import floatToGoString

from modelservice_sdk.client import ModelServiceClient, ServiceError
from modelservice_sdk.loader import load_namespace_model
from server.app import ModelServiceApp
from server.settings import Settings
from tests.conftest import Tenant, make_tenant, own_service
from tests.support import model_files
from tests.support.uploads import upload_fields
from tests.test_admin import admin

pytestmark = pytest.mark.integration

MIB = 1 << 20


@pytest.fixture
async def small_cache(service_settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[ModelServiceApp, Tenant]]:
    async with own_service(service_settings, tmp_path / "service", "cache", object_store_budget_fraction=0.1) as running:
        yield running


async def _upload(client: ModelServiceClient, tenant: Tenant, tmp_path: Path, name: str, mib: int) -> str:
    weights = {"w": np.random.default_rng(mib).standard_normal(mib * MIB // 4, dtype=np.float32)}
    source = model_files.write_safetensors(tmp_path / name, weights)
    archive = model_files.pack(source, tmp_path / f"{name}.tar", compression="")
    uploaded = await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors", name=name))
    return uploaded.model_id


@ray.remote(num_cpus=0.1)
def _plugin_load(model_id: str) -> int:
    return int(load_namespace_model(model_id).tensors["w"].nbytes)


async def _status(client: ModelServiceClient, tenant: Tenant, model_id: str) -> tuple[str, str]:
    model = (await client.get_model(tenant.namespace_id, model_id)).model
    return model.deployment_status, model.deployment_error


async def test_lru_eviction_admission_pins_and_reload_on_demand(
    small_cache: tuple[ModelServiceApp, Tenant], tmp_path: Path
) -> None:
    app, tenant = small_cache
    plugin: Any = _plugin_load.options(runtime_env={"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}})
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        a, b, c, d = [await _upload(client, tenant, tmp_path, name, 30) for name in "abcd"]
        weights_bytes = (await client.get_model(tenant.namespace_id, a)).model.weights_bytes
        assert weights_bytes == 30 * MIB  # known from the upload, before any load
        for model_id in (a, b, c):
            assert (await client.deploy_model(tenant.namespace_id, model_id)).deployment_status == "deployed"
        assert await plugin.remote(a) == 30 * MIB  # a plugin used "a": "b" is now the least recently used

        # "d" (pinned) needs room: the least recently used model leaves, nothing else.
        deployed = await client.deploy_model(tenant.namespace_id, d, pin=True)
        assert deployed.deployment_status == "deployed"
        status, error = await _status(client, tenant, b)
        assert status == "not_deployed" and error.startswith("evicted:") and f"{30 * MIB} bytes freed" in error
        assert [(await _status(client, tenant, m))[0] for m in (a, c, d)] == ["deployed"] * 3
        events = [e async for e in client.watch_deployment(tenant.namespace_id, b)]
        assert events[-1].state == "evicted" and events[-1].terminal

        # 80 MiB would fit the budget, but not beside 30 pinned MiB: refused at once, with the numbers.
        big = await _upload(client, tenant, tmp_path, "big", 80)
        refused = await client.deploy_model(tenant.namespace_id, big)
        assert refused.deployment_status == "failed"
        assert "schedule: INSUFFICIENT_OBJECT_STORE_MEMORY" in refused.message and f"needs {80 * MIB} bytes" in refused.message
        assert f"{30 * MIB} of which are pinned" in refused.message
        task = await client.get_model_deploy_status(tenant.namespace_id, big)
        assert task.state == "FAILED" and "INSUFFICIENT_OBJECT_STORE_MEMORY" in task.error

        # The evicted model loads again on demand; the pinned one stays through it.
        assert await plugin.remote(b) == 30 * MIB
        assert (await _status(client, tenant, b))[0] == "deployed"
        assert (await _status(client, tenant, d))[0] == "deployed"
        assert (await _status(client, tenant, c))[0] == "not_deployed"  # now the least recently used

        # What the cache holds, node by node (this test cluster has one node).
        [node] = (await client.get_cache_status(tenant.namespace_id)).nodes
        assert node.budget_bytes == int(node.capacity_bytes * 0.1)
        assert node.used_bytes == 90 * MIB and node.pinned_bytes == 30 * MIB
        assert [(m.model_id, m.bytes, m.pinned) for m in node.models] == [
            (a, 30 * MIB, False), (d, 30 * MIB, True), (b, 30 * MIB, False),
        ]  # least recently used first
        await _expect_metrics(app, [
            'modelservice_model_evictions_total{reason="lru"} 2.0',
            "modelservice_admission_refusals_total 1.0",
            'modelservice_cache_lookups_total{result="miss"} 1.0',
            f'modelservice_object_store_resident_bytes{{node="{node.node_id}"}} {floatToGoString(90 * MIB)}',  # type: ignore[no-untyped-call]
            'modelservice_model_load_stage_seconds_count{stage="download"}',
        ])
        other = await make_tenant(app)
        async with ModelServiceClient(app.address, other.api_key) as stranger:
            [seen_by_other] = (await stranger.get_cache_status(other.namespace_id)).nodes
        assert seen_by_other.used_bytes == node.used_bytes and list(seen_by_other.models) == []


@pytest.mark.parametrize("set_by", ["request", "namespace_default"])
async def test_an_idle_model_is_undeployed_after_its_time_out(
    small_cache: tuple[ModelServiceApp, Tenant], tmp_path: Path, set_by: str
) -> None:
    app, tenant = small_cache
    if set_by == "namespace_default":
        code, shown, err = await admin(app, "set-deploy-defaults", tenant.namespace_id, "--idle-ttl", "1")
        assert code == 0 and shown["deploy_defaults"] == {"pin": False, "idle_ttl_seconds": 1.0}, err
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        model_id = await _upload(client, tenant, tmp_path, "idle", 1)
        ttl = 1.0 if set_by == "request" else None
        assert (await client.deploy_model(tenant.namespace_id, model_id, idle_ttl_seconds=ttl)).deployment_status == "deployed"
        for _ in range(100):
            status, error = await _status(client, tenant, model_id)
            if status != "deployed":
                break
            await asyncio.sleep(0.1)
    assert status == "not_deployed" and error.startswith("undeployed:") and "idle_ttl_seconds" in error


async def _expect_metrics(app: ModelServiceApp, expected: list[str], within: float = 10.0) -> None:
    """Scrapes /metrics until every expected line (or line start) shows up."""
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5) as answer:
            return str(answer.read().decode())

    for _ in range(int(within / 0.25)):
        lines = (await asyncio.to_thread(scrape)).splitlines()
        missing = [e for e in expected if not any(line.startswith(e) for line in lines)]
        if not missing:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"/metrics never showed {missing}")


async def test_node_ids_place_the_load_and_an_unknown_node_is_refused_by_name(
    small_cache: tuple[ModelServiceApp, Tenant], tmp_path: Path
) -> None:
    app, tenant = small_cache
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        [node] = (await client.get_cache_status(tenant.namespace_id)).nodes
        model_id = await _upload(client, tenant, tmp_path, "placed", 1)
        with pytest.raises(ServiceError) as refused:
            await client.deploy_model(tenant.namespace_id, model_id, node_ids=["f" * 56])
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert refused.value.metadata == {"field": "node_ids", "node_id": "f" * 56}
        deployed = await client.deploy_model(tenant.namespace_id, model_id, node_ids=[node.node_id])
        assert deployed.deployment_status == "deployed"
        model = (await client.get_model(tenant.namespace_id, model_id)).model
        task = await client.get_model_deploy_status(tenant.namespace_id, model_id)
    assert list(model.deployment_info.node_ids) == [node.node_id] and list(task.worker_node) == [node.node_id]
