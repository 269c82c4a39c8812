"""Placement on a two-node Ray cluster (real Ray, MongoDB and S3): a second node joins the
test cluster for this module (its own raylet and 256 MiB object store, on this machine)
and leaves at the end. `node_ids` puts the load where asked, `all_nodes` puts a copy in
both object stores, and plugins on either node get the weights read-only."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from modelservice_sdk.client import ModelServiceClient
from modelservice_sdk.loader import load_namespace_model
from server.app import ModelServiceApp
from server.embedded.processes import ray_worker_node
from server.settings import Settings
from tests.conftest import Tenant, own_service
from tests.support import model_files
from tests.support.uploads import upload_fields

pytestmark = pytest.mark.integration

MIB = 1 << 20
SECOND_NODE = "modelservice_test_second_node"
"""A custom resource only the second node has: tasks that ask for it run there."""


def _alive_nodes() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node["Alive"]]  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def second_node(ray_address: str, ray_driver: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Ray node id of a second node joined to the test cluster (on a given cluster,
    MODELSERVICE_TEST_RAY_ADDRESS, one of its nodes other than the one this driver runs on)."""
    import os

    if os.environ.get("MODELSERVICE_TEST_RAY_ADDRESS"):
        yield _existing_second_node()
        return
    before = {node["NodeID"] for node in _alive_nodes()}
    with ray_worker_node(
        ray_address, tmp_path_factory.mktemp("second-node"), object_store_bytes=256 * MIB, num_cpus=1,
        resources={SECOND_NODE: 1}, env=dict(os.environ),
    ):
        deadline = time.monotonic() + 60
        while True:
            joined = [
                node["NodeID"] for node in _alive_nodes()
                if node["NodeID"] not in before and node["Resources"].get(SECOND_NODE)
            ]
            if joined:
                break
            assert time.monotonic() < deadline, "the second Ray node never joined"
            time.sleep(0.25)
        yield joined[0]


def _existing_second_node() -> str:
    here = ray.get_runtime_context().get_node_id()
    others = [node["NodeID"] for node in _alive_nodes() if node["NodeID"] != here]
    if not others:
        pytest.skip("the given Ray cluster has a single node")
    return str(others[0])


@pytest.fixture
async def two_node_app(
    service_settings: Settings, second_node: str, tmp_path: Path
) -> AsyncIterator[tuple[ModelServiceApp, Tenant]]:
    async with own_service(service_settings, tmp_path / "service", "placement") as running:
        yield running


async def _deployed(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path, name: str, **options: Any
) -> tuple[str, np.ndarray, Any]:
    """Uploads a 4 MiB model, deploys it with `options`: its id, weights and GetModel view."""
    weights = np.random.default_rng(len(name)).standard_normal(4 * MIB // 4, dtype=np.float32)
    source = model_files.write_safetensors(tmp_path / name, {"w": weights})
    archive = model_files.pack(source, tmp_path / f"{name}.tar", compression="")
    model_id = (await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors", name=name))).model_id
    deployed = await client.deploy_model(tenant.namespace_id, model_id, **options)
    assert deployed.deployment_status == "deployed", deployed.message
    return model_id, weights, (await client.get_model(tenant.namespace_id, model_id)).model


@ray.remote(num_cpus=0)
def _plugin(model_id: str) -> tuple[str, bool, np.ndarray]:
    """A plugin: the node it ran on, whether the weights could be written, and the weights."""
    weights = load_namespace_model(model_id).tensors["w"]
    return ray.get_runtime_context().get_node_id(), bool(weights.flags.writeable), np.array(weights)


def _plugin_on(app: ModelServiceApp, node_id: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return _plugin.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        runtime_env={"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}},
    )


async def test_node_ids_load_on_the_asked_node_and_plugins_on_the_other_read_it_read_only(
    two_node_app: tuple[ModelServiceApp, Tenant], second_node: str, tmp_path: Path
) -> None:
    app, tenant = two_node_app
    head = ray.get_runtime_context().get_node_id()  # this driver's node
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        model_id, weights, model = await _deployed(client, tenant, tmp_path, "placed", node_ids=[second_node])
        task = await client.get_model_deploy_status(tenant.namespace_id, model_id)
        status = {node.node_id: [m.model_id for m in node.models] for node in (await client.get_cache_status(tenant.namespace_id)).nodes}
    assert list(model.deployment_info.node_ids) == [second_node] and list(task.worker_node) == [second_node]
    assert (status[second_node], status[head]) == ([model_id], [])
    ran_on, writeable, seen = await _plugin_on(app, head).remote(model_id)
    assert (ran_on, writeable) == (head, False)
    np.testing.assert_array_equal(seen, weights)


async def test_all_nodes_puts_a_copy_in_every_object_store_and_each_plugin_gets_its_nodes_copy(
    two_node_app: tuple[ModelServiceApp, Tenant], second_node: str, tmp_path: Path
) -> None:
    app, tenant = two_node_app
    head = ray.get_runtime_context().get_node_id()  # this driver's node
    async with ModelServiceClient(app.address, tenant.api_key) as client:
        model_id, weights, model = await _deployed(client, tenant, tmp_path, "everywhere", node_ids=[head], all_nodes=True)
        nodes = (await client.get_cache_status(tenant.namespace_id)).nodes
    assert sorted(model.deployment_info.node_ids) == sorted(node.node_id for node in nodes)  # every node
    held = {node.node_id: [(m.model_id, m.bytes) for m in node.models] for node in nodes}
    assert held[head] == held[second_node] == [(model_id, weights.nbytes)]
    # The cache hands each node its own copy: the object a plugin on the second node gets
    # lives in that node's object store (no transfer on its first call).
    cache = ray.get_actor(app.cluster.actor_name, namespace="modelservice")
    for node_id in (head, second_node):
        [ref] = await cache.lookup.remote(model_id, tenant.namespace_id, node_id)
        locations = ray.experimental.get_object_locations([ref])[ref]["node_ids"]
        assert node_id in locations
    for node_id in (head, second_node):
        ran_on, writeable, seen = await _plugin_on(app, node_id).remote(model_id)
        assert (ran_on, writeable) == (node_id, False)
        np.testing.assert_array_equal(seen, weights)
