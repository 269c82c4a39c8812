"""ListModels, UndeployModel and DeleteModel against the real parts."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from modelservice_sdk.client import ModelServiceClient, ServiceError
from server.app import ModelServiceApp
from tests.conftest import Tenant, make_tenant
from tests.support.ray_load import hold_one_cpu
from tests.support.uploads import build_model_archive, upload_fields, upload_model
from tests.test_upload_integration import _s3_objects_and_uploads

pytestmark = pytest.mark.integration


async def test_list_pages_through_the_namespaces_models_only(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    uploaded = sorted([await upload_model(client, tenant.namespace_id, tmp_path, "onnx") for _ in range(3)])
    stranger = await make_tenant(app)
    async with ModelServiceClient(app.address, stranger.api_key) as other:
        await upload_model(other, stranger.namespace_id, tmp_path, "onnx")

    first = await client.list_models(tenant.namespace_id, page_size=2)
    second = await client.list_models(tenant.namespace_id, page_size=2, page_token=first.next_page_token)

    assert [m.model_id for m in first.models] == uploaded[:2] and first.next_page_token
    assert [m.model_id for m in second.models] == uploaded[2:] and second.next_page_token == ""
    with pytest.raises(ServiceError) as too_big:
        await client.list_models(tenant.namespace_id, page_size=501)
    assert too_big.value.metadata["field"] == "page_size"


async def test_undeploy_drops_the_weights_and_a_plugin_load_brings_them_back(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    await client.deploy_model(tenant.namespace_id, model_id)

    dropped = await client.undeploy_model(tenant.namespace_id, model_id)
    model = (await client.get_model(tenant.namespace_id, model_id)).model
    again = await client.undeploy_model(tenant.namespace_id, model_id)
    loads_before = (await app.cluster.stats())["loads_started"]
    redeployed = await client.deploy_model(tenant.namespace_id, model_id)

    assert (dropped.was_cached, dropped.deployment_status) == (True, "not_deployed")
    assert (model.deployed, model.deployment_status) == (False, "not_deployed")
    assert again.was_cached is False
    assert (redeployed.deployment_status, redeployed.cached) == ("deployed", False)
    assert (await app.cluster.stats())["loads_started"] == loads_before + 1


async def test_delete_removes_document_archive_and_cached_weights_and_frees_the_name(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "safetensors")
    fields = upload_fields(tenant.namespace_id, "safetensors", name="short-lived")
    model_id = (await client.upload_file(archive, fields)).model_id
    await client.deploy_model(tenant.namespace_id, model_id)
    cached_before = (await app.cluster.stats())["cached_models"]

    deleted = await client.delete_model(tenant.namespace_id, model_id)

    assert deleted.success and deleted.model_id == model_id
    with pytest.raises(ServiceError) as gone:
        await client.get_model(tenant.namespace_id, model_id)
    assert gone.value.reason == "MODEL_NOT_FOUND"
    assert (await app.cluster.stats())["cached_models"] == cached_before - 1
    objects, _ = await _s3_objects_and_uploads(app, tenant.namespace_id)
    assert not any(model_id in key for key in objects)
    with pytest.raises(ServiceError) as twice:
        await client.delete_model(tenant.namespace_id, model_id)
    assert twice.value.code is grpc.StatusCode.NOT_FOUND
    assert (await client.upload_file(archive, fields)).success  # same name and version again


async def test_a_model_being_deployed_can_be_neither_deleted_nor_undeployed(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", num_cpus=4.0)
    holder = await hold_one_cpu(3.0, tmp_path)
    await client.deploy_model(tenant.namespace_id, model_id, wait=False)

    with pytest.raises(ServiceError) as deleting:
        await client.delete_model(tenant.namespace_id, model_id)
    with pytest.raises(ServiceError) as undeploying:
        await client.undeploy_model(tenant.namespace_id, model_id)
    assert deleting.value.code is grpc.StatusCode.FAILED_PRECONDITION
    assert deleting.value.reason == undeploying.value.reason == "MODEL_DEPLOYING"
    # Refused, and nothing changed: the deployment goes on and the model stays.
    await holder
    events = [e async for e in client.watch_deployment(tenant.namespace_id, model_id)]
    assert events[-1].state == "deployed"
    assert (await client.delete_model(tenant.namespace_id, model_id)).success


async def test_a_deletion_is_a_task_found_by_id_and_by_model_and_only_by_its_namespace(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    deleted = await client.delete_model(tenant.namespace_id, model_id)
    assert (deleted.state, len(deleted.task_id)) == ("COMPLETED", 32)

    by_id = await client.get_delete_task(tenant.namespace_id, deleted.task_id)
    by_model = await client.get_model_delete_status(tenant.namespace_id, model_id)
    assert by_id == by_model
    assert (by_id.task_type, by_id.state, by_id.stage, by_id.model_id, by_id.is_async) == (
        "DELETE_MODEL", "COMPLETED", "done", model_id, False,
    )
    stranger = await make_tenant(app)
    async with ModelServiceClient(app.address, stranger.api_key) as other:
        for lookup in (
            other.get_delete_task(stranger.namespace_id, deleted.task_id),
            other.get_model_delete_status(stranger.namespace_id, model_id),
        ):
            with pytest.raises(ServiceError) as hidden:
                await lookup
            assert (hidden.value.code, hidden.value.reason) == (grpc.StatusCode.NOT_FOUND, "DELETE_TASK_NOT_FOUND")


async def test_a_deletion_without_waiting_answers_at_once_and_its_task_ends(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "onnx")
    started = await client.delete_model(tenant.namespace_id, model_id, wait=False)
    assert started.state in ("CREATED", "RUNNING")
    for _ in range(100):
        task = await client.get_delete_task(tenant.namespace_id, started.task_id)
        if task.state == "COMPLETED":
            break
        await asyncio.sleep(0.05)
    assert (task.state, task.is_async) == ("COMPLETED", True)
    with pytest.raises(ServiceError) as gone:
        await client.get_model(tenant.namespace_id, model_id)
    assert gone.value.reason == "MODEL_NOT_FOUND"


async def test_a_deletion_whose_replica_died_mid_way_is_finished_by_the_janitor_under_its_task(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    """What a replica leaves when it dies after hiding the model, opening the task and
    starting the archive stage: the janitor ends that same task."""
    import datetime

    from server.core.janitor import Janitor
    from server.core.models import utc_now
    from server.persistence.delete_tasks import ARCHIVE, DeleteTaskRepository
    from server.persistence.mongo import ModelRepository, database
    from tests.test_upload_integration import _mongo_client

    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    await client.deploy_model(tenant.namespace_id, model_id)
    mongo = _mongo_client(app)
    db = database(mongo, app.settings.mongodb_database)
    models = ModelRepository(db)
    tasks = DeleteTaskRepository(db, datetime.timedelta(days=1))
    long_ago = utc_now() - datetime.timedelta(hours=1)
    assert await models.mark_deleting(tenant.namespace_id, model_id, long_ago) is not None
    task = await tasks.create("f" * 32, model_id, tenant.namespace_id, is_async=False, now=long_ago)
    await tasks.set_stage(task.task_id, ARCHIVE, long_ago)
    assert (await client.get_model_delete_status(tenant.namespace_id, model_id)).stage == ARCHIVE

    await Janitor(models, app.store, app.deletions, lease_seconds=60).sweep()
    await mongo.close()

    finished = await client.get_delete_task(tenant.namespace_id, task.task_id)
    assert (finished.state, finished.stage) == ("COMPLETED", "done")
    with pytest.raises(ServiceError) as gone:
        await client.get_model(tenant.namespace_id, model_id)
    assert gone.value.reason == "MODEL_NOT_FOUND"
    objects, _ = await _s3_objects_and_uploads(app, tenant.namespace_id)
    assert not any(model_id in key for key in objects)
    assert (await app.cluster.undeploy(model_id)) == "not_cached"  # the weights went too
