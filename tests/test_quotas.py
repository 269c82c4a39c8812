"""Per-namespace quotas (real MongoDB, S3, Ray, and the admin command): models, stored
archive bytes and deployed bytes are refused with QUOTA_EXCEEDED, the limit and the usage,
before the work starts, and leave nothing half-made."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from modelservice_sdk.client import ModelServiceClient, ServiceError
from server.app import ModelServiceApp
from tests.conftest import Tenant
from tests.support import model_files
from tests.support.uploads import build_model_archive, upload_fields, upload_model, upload_refused_before_the_bytes
from tests.test_admin import admin
from tests.test_upload_integration import _s3_objects_and_uploads

pytestmark = pytest.mark.integration


async def _set_quota(app: ModelServiceApp, tenant: Tenant, *flags: str) -> dict[str, object]:
    code, shown, err = await admin(app, "set-quota", tenant.namespace_id, *flags)
    assert code == 0, err
    assert isinstance(shown, dict)
    return shown


async def test_the_model_count_quota_refuses_before_any_byte_flows(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    shown = await _set_quota(app, tenant, "--max-models", "1")
    assert shown["quotas"] == {"max_archive_bytes": 0, "max_models": 1, "max_deployed_bytes": 0}
    usage = shown["usage"]
    assert isinstance(usage, dict) and usage["models"] == 1 and usage["archive_bytes"] > 0 and usage["deployed_bytes"] == 0
    refused = await upload_refused_before_the_bytes(
        client, upload_fields(tenant.namespace_id, "safetensors", name="second")
    )
    assert (refused.code, refused.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert refused.metadata == {"namespace_id": tenant.namespace_id, "quota": "max_models", "limit": "1", "usage": "1"}
    assert len((await client.list_models(tenant.namespace_id)).models) == 1


async def test_the_storage_quota_stops_an_upload_that_outgrows_it_and_keeps_nothing(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    weights = model_files.reference_weights(scale=4 * 1024)  # about 2 MiB
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "m", weights), tmp_path / "m.tar", compression="")
    await _set_quota(app, tenant, "--max-archive-bytes", str(1 << 20))
    with pytest.raises(ServiceError) as refused:
        await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors", name="too-big"))
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert refused.value.metadata["quota"] == "max_archive_bytes" and refused.value.metadata["limit"] == str(1 << 20)
    assert (await client.list_models(tenant.namespace_id)).models == []
    assert [p for p in await app.store.list_pending() if p.key.startswith(tenant.namespace_id + "/")] == []
    small = build_model_archive(tmp_path, "safetensors")  # a few KiB: within the quota
    assert (await client.upload_file(small, upload_fields(tenant.namespace_id, "safetensors"))).success


async def test_the_deployed_bytes_quota_refuses_a_deploy_that_would_exceed_it(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    first = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", name="first")
    second = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", name="second")
    weights_bytes = int((await client.get_model(tenant.namespace_id, first)).model.weights_bytes)
    await _set_quota(app, tenant, "--max-deployed-bytes", str(weights_bytes))
    assert (await client.deploy_model(tenant.namespace_id, first)).deployment_status == "deployed"
    assert (await client.deploy_model(tenant.namespace_id, first)).cached  # already counted: fine
    with pytest.raises(ServiceError) as refused:
        await client.deploy_model(tenant.namespace_id, second)
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert refused.value.metadata == {
        "namespace_id": tenant.namespace_id, "quota": "max_deployed_bytes",
        "limit": str(weights_bytes), "usage": str(2 * weights_bytes),
    }
    assert (await client.get_model(tenant.namespace_id, second)).model.deployment_status == "not_deployed"
    _, shown, _ = await admin(app, "show-quota", tenant.namespace_id)
    assert shown["usage"]["deployed_bytes"] == weights_bytes
    await client.undeploy_model(tenant.namespace_id, first)


async def test_the_storage_quota_counts_a_compressed_uploads_inflated_form_too(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    # Zeros compress about 1000x: the .tar.gz is a few KiB, its inflated deploy form 4 MiB.
    weights = {"zeros": np.zeros(1 << 20, dtype=np.float32)}
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "m", weights), tmp_path / "m.tar.gz", compression="gz")
    assert archive.stat().st_size < 1 << 20
    await _set_quota(app, tenant, "--max-archive-bytes", str(1 << 20))
    with pytest.raises(ServiceError) as refused:
        await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors", name="inflates"))
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "QUOTA_EXCEEDED")
    assert refused.value.metadata["quota"] == "max_archive_bytes"
    assert (await client.list_models(tenant.namespace_id)).models == []
    objects, uploads = await _s3_objects_and_uploads(app, tenant.namespace_id)
    assert (objects, uploads) == ([], [])  # neither the archive nor its deploy form
