"""Aliases and blue-green promotion (real Ray, MongoDB, S3; Envoy for the REST paths).

A service of its own keeps a model an alias moved away from ("blue") cached for 1 s
unused, so the tests see it stay through the switch and leave afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import ray

import aiohttp

from modelservice_sdk.client import ModelServiceClient, ServiceError
from modelservice_sdk.loader import load_namespace_model
from server.app import ModelServiceApp
from server.embedded.envoy import EnvoyEndpoints
from server.settings import Settings
from tests.conftest import Tenant, make_tenant, own_service
from tests.support import model_files
from tests.support.uploads import upload_fields, upload_model
from tests.test_rest_gateway import _headers, _json, http  # noqa: F401 (http is a fixture)

pytestmark = pytest.mark.integration

NAME = "encoder"


@pytest.fixture
async def alias_app(service_settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[ModelServiceApp, Tenant]]:
    async with own_service(service_settings, tmp_path / "service", "aliases", alias_blue_grace_seconds=1.0) as running:
        yield running


async def _version(client: ModelServiceClient, tenant: Tenant, tmp_path: Path, marker: float, **extra: Any) -> str:
    """A model of NAME whose every weight is `marker` (what a plugin sees tells versions apart)."""
    source = model_files.write_safetensors(tmp_path / f"v{marker}", {"w": np.full(1024, marker, dtype=np.float32)})
    archive = model_files.pack(source, tmp_path / f"v{marker}.tar", compression="")
    fields = upload_fields(tenant.namespace_id, "safetensors", name=NAME, version=str(marker), **extra)
    return (await client.upload_file(archive, fields)).model_id


@ray.remote(num_cpus=0.1)
def _plugin_following(reference: str, namespace_id: str, stop_after_seeing: float, within: float) -> dict[str, Any]:
    """Loads `reference` in a loop; stops once it has seen `stop_after_seeing` for a while."""
    seen: list[float] = []
    failures: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            seen.append(float(load_namespace_model(reference, namespace_id=namespace_id).tensors["w"][0]))
        except Exception as error:  # counted: a gap in the alias would show up here
            failures.append(repr(error))
        if seen[-20:] == [stop_after_seeing] * 20:
            break
        time.sleep(0.01)
    return {"seen": seen, "failures": failures}


def _plugin(app: ModelServiceApp) -> Any:
    return _plugin_following.options(runtime_env={"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}})


async def _model(client: ModelServiceClient, tenant: Tenant, model_id: str) -> Any:
    return (await client.get_model(tenant.namespace_id, model_id)).model


async def test_a_promotion_switches_plugins_from_blue_to_green_without_a_gap_and_blue_leaves_after_its_grace(
    alias_app: tuple[ModelServiceApp, Tenant], tmp_path: Path
) -> None:
    app, tenant = alias_app
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        blue = await _version(client, tenant, tmp_path, 1.0)
        green = await _version(client, tenant, tmp_path, 2.0)
        first = await client.deploy_model(tenant.namespace_id, blue, alias="production")
        assert first.deployment_status == "deployed"
        assert (await client.get_alias(tenant.namespace_id, NAME, "production")).model_id == blue

        following = _plugin(app).remote(f"{NAME}@production", tenant.namespace_id, 2.0, 60.0)
        await asyncio.sleep(1.0)  # the plugin is loading blue by now
        promoted = await client.deploy_model(tenant.namespace_id, green, alias="production")
        result = await following

        assert promoted.deployment_status == "deployed"
        alias = await client.get_alias(tenant.namespace_id, NAME, "production")
        events = [e async for e in client.watch_deployment(tenant.namespace_id, green)]
        green_model, blue_model = await _model(client, tenant, green), await _model(client, tenant, blue)
        for _ in range(100):  # blue leaves once unused for its grace period (1 s here)
            blue_model = await _model(client, tenant, blue)
            if blue_model.deployment_status != "deployed":
                break
            await asyncio.sleep(0.1)

    seen = result["seen"]
    assert result["failures"] == [] and seen[0] == 1.0 and seen[-1] == 2.0
    assert seen == sorted(seen), "a plugin saw blue again after green"  # blue, then green, never a gap
    assert (alias.model_id, alias.previous_model_id, alias.reference) == (green, blue, f"{NAME}@production")
    assert list(green_model.aliases) == ["production"]
    assert f"alias {NAME}@production now resolves to model {green} (was {blue})" in events[-1].message
    assert blue_model.deployment_status == "not_deployed" and "replaced by model" in blue_model.deployment_error
    assert list(blue_model.aliases) == []


async def test_a_failed_green_leaves_the_alias_on_blue(alias_app: tuple[ModelServiceApp, Tenant], tmp_path: Path) -> None:
    app, tenant = alias_app
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        blue = await _version(client, tenant, tmp_path, 1.0)
        broken = await _version(client, tenant, tmp_path, 3.0, num_gpus=1)  # the test cluster has no GPU
        await client.deploy_model(tenant.namespace_id, blue, alias="production")
        failed = await client.deploy_model(tenant.namespace_id, broken, alias="production")
        alias = await client.get_alias(tenant.namespace_id, NAME, "production")
        plugin_sees = (await _plugin(app).remote(f"{NAME}@production", tenant.namespace_id, 1.0, 10.0))["seen"][-1]
    assert failed.deployment_status == "failed" and "INSUFFICIENT_RESOURCES" in failed.message
    assert alias.model_id == blue and plugin_sees == 1.0


async def test_alias_crud_an_aliased_model_cannot_be_deleted_and_a_cached_target_switches_as_an_event(
    alias_app: tuple[ModelServiceApp, Tenant], tmp_path: Path
) -> None:
    app, tenant = alias_app
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        one = await _version(client, tenant, tmp_path, 1.0)
        other_name = (await client.upload_file(
            model_files.pack(model_files.write_safetensors(tmp_path / "x", {"w": np.zeros(4, np.float32)}), tmp_path / "x.tar", compression=""),
            upload_fields(tenant.namespace_id, "safetensors", name="other"),
        )).model_id
        await client.deploy_model(tenant.namespace_id, one)

        with pytest.raises(ServiceError) as wrong_name:
            await client.set_alias(tenant.namespace_id, NAME, "staging", other_name)
        assert wrong_name.value.metadata["field"] == "model_id"
        with pytest.raises(ServiceError) as bad_alias:
            await client.deploy_model(tenant.namespace_id, one, alias="no spaces")
        assert bad_alias.value.metadata["field"] == "alias"

        set_directly = await client.set_alias(tenant.namespace_id, NAME, "staging", one)
        await client.deploy_model(tenant.namespace_id, one, alias="production")  # cached: switches at once
        listed = [(a.model_name, a.alias, a.model_id) for a in (await client.list_aliases(tenant.namespace_id)).aliases]
        events = [e async for e in client.watch_deployment(tenant.namespace_id, one)]

        with pytest.raises(ServiceError) as refused:
            await client.delete_model(tenant.namespace_id, one)
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MODEL_ALIASED")
        await client.delete_alias(tenant.namespace_id, NAME, "staging")
        await client.delete_alias(tenant.namespace_id, NAME, "production")
        with pytest.raises(ServiceError) as gone:
            await client.get_alias(tenant.namespace_id, NAME, "staging")
        assert gone.value.reason == "ALIAS_NOT_FOUND"
        assert (await client.delete_model(tenant.namespace_id, one)).state == "COMPLETED"

        stranger = await make_tenant(app)
        async with ModelServiceClient(app.address, stranger.api_key) as other:
            with pytest.raises(ServiceError) as foreign:
                await other.list_aliases(tenant.namespace_id)
            assert foreign.value.reason == "NAMESPACE_NOT_FOUND"
    assert set_directly.reference == f"{NAME}@staging" and set_directly.previous_model_id == ""
    assert listed == [(NAME, "production", one), (NAME, "staging", one)]
    assert events[-1].state == "aliased" and f"{NAME}@production" in events[-1].message


async def test_aliases_have_rest_paths(
    gateway: EnvoyEndpoints, http: aiohttp.ClientSession, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "onnx", name="ranker")
    url = f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/aliases"
    async with http.put(f"{url}/ranker/production", json={"model_id": model_id}, headers=_headers(tenant)) as response:
        assert response.status == 200
        pointed = await _json(response)
    async with http.get(url, headers=_headers(tenant)) as response:
        listed = await _json(response)
    async with http.get(f"{gateway.base_url}/v1/namespaces/{tenant.namespace_id}/models/{model_id}", headers=_headers(tenant)) as response:
        model = (await _json(response))["model"]
    async with http.delete(f"{url}/ranker/production", headers=_headers(tenant)) as response:
        assert response.status == 200
    async with http.get(f"{url}/ranker/production", headers=_headers(tenant)) as response:
        assert response.status == 404 and (await _json(response))["error"]["code"] == "alias_not_found"
    async with http.get(f"{url}/ranker/production?alias=other", headers=_headers(tenant)) as response:
        assert response.status == 400  # a path field cannot come from the query
    assert (pointed["reference"], pointed["model_id"]) == ("ranker@production", model_id)
    assert [a["reference"] for a in listed["aliases"]] == ["ranker@production"]
    assert model["aliases"] == ["production"]
