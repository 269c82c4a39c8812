"""UploadModel and GetModel end to end over real gRPC, nx-27017 and moto's S3 server."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aioboto3
import grpc
import pytest
from modelservice.v1 import model_service_pb2 as pb

from modelservice_sdk.client import (
    ModelServiceClient,
    ServiceError,
    UploadFields,
    file_sha256,
    message_to_json,
    upload_header,
)
from server.app import ModelServiceApp
from server.core.models import Tier
from tests.conftest import TEST_PART_BYTES, TEST_PARTS_IN_FLIGHT, Tenant, make_tenant
from tests.support import model_files
from tests.support.uploads import build_model_archive, upload_refused_before_the_bytes

pytestmark = pytest.mark.integration


def _fields(tenant: Tenant, model_format: str, **extra: object) -> UploadFields:
    return UploadFields(
        namespace_id=tenant.namespace_id,
        name=str(extra.pop("name", f"model-{model_format}")),
        version=str(extra.pop("version", "1.0.0")),
        model_format=model_format,
        **extra,  # type: ignore[arg-type]
    )


async def _s3_objects_and_uploads(app: ModelServiceApp, namespace_id: str) -> tuple[list[str], list[str]]:
    settings = app.settings
    async with aioboto3.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region
    ) as s3:
        prefix = f"{settings.s3_prefix}{namespace_id}/"
        listed = await s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix)
        uploads = await s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=prefix)
    return [o["Key"] for o in listed.get("Contents", [])], [u["Key"] for u in uploads.get("Uploads", [])]


@pytest.mark.parametrize(
    ("model_format", "declared", "compression"),
    [
        ("safetensors", "safetensors", "gz"),
        ("onnx", "onnx", ""),
        ("pytorch", "pytorch", "zst"),
        ("torchscript", "pytorch", "gz"),
        ("huggingface", "huggingface", "gz"),
    ],
)
async def test_upload_then_get_returns_every_seed_field_and_the_sha256(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path, model_format: str, declared: str, compression: str
) -> None:
    archive = build_model_archive(tmp_path, model_format, compression)
    fields = _fields(tenant, declared, framework="torch", task_type="embedding", num_cpus=2.5, num_gpus=0, memory_gb=1.5)

    uploaded = await client.upload_file(archive, fields, chunk_bytes=4096)

    assert uploaded.success is True
    assert uploaded.deployment_status == "not_deployed"
    assert uploaded.model_hash == file_sha256(archive)
    assert uploaded.size_bytes == archive.stat().st_size
    assert uploaded.model_archive_url.startswith("s3://")
    assert uploaded.endpoint == f"/v1/namespaces/{tenant.namespace_id}/models/{uploaded.model_id}"

    got = message_to_json(await client.get_model(tenant.namespace_id, uploaded.model_id))
    model = got["model"]
    assert got["success"] is True
    assert model["model_id"] == uploaded.model_id
    assert model["namespace_id"] == tenant.namespace_id
    assert (model["name"], model["version"], model["model_format"]) == (fields.name, "1.0.0", declared)
    assert model["model_hash"] == file_sha256(archive)
    assert model["model_archive_url"] == uploaded.model_archive_url
    assert model["deployed"] is False
    assert (model["framework"], model["task_type"]) == ("torch", "embedding")
    assert model["resource_requirements"] == {"num_cpus": 2.5, "num_gpus": 0, "memory": 1.5 * 1024**3}
    assert model["created_at"].endswith("Z") and model["updated_at"].endswith("Z")


async def test_duplicate_name_and_version_fails_before_any_byte_with_already_exists(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "safetensors", "gz")
    await client.upload_file(archive, _fields(tenant, "safetensors", name="dup"))
    refused = await upload_refused_before_the_bytes(client, _fields(tenant, "safetensors", name="dup"))
    assert refused.code is grpc.StatusCode.ALREADY_EXISTS
    assert refused.reason == "MODEL_ALREADY_EXISTS"
    assert refused.metadata == {"namespace_id": tenant.namespace_id, "name": "dup", "version": "1.0.0"}


async def test_checksum_mismatch_is_rejected_and_leaves_nothing(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "safetensors", "gz")
    wrong = hashlib.sha256(b"something else").hexdigest()

    with pytest.raises(ServiceError) as raised:
        await client.upload_file(archive, _fields(tenant, "safetensors", expected_sha256=wrong))

    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason == "CHECKSUM_MISMATCH"
    assert raised.value.metadata["expected_sha256"] == wrong
    assert raised.value.metadata["actual_sha256"] == file_sha256(archive)
    assert await _s3_objects_and_uploads(app, tenant.namespace_id) == ([], [])
    # The name is free again: nothing half-made holds it.
    await client.upload_file(archive, _fields(tenant, "safetensors", expected_sha256=file_sha256(archive)))


@pytest.mark.parametrize(
    ("declared", "members", "expected_fragment"),
    [
        ("safetensors", {"model/readme.txt": b"hello"}, "no .safetensors file"),
        ("safetensors", {"model/model.safetensors": b"\x10\0\0\0\0\0\0\0{not json}      "}, "not valid JSON"),
        ("onnx", {"model/model.onnx": b"definitely not onnx"}, "not an ONNX model"),
        ("huggingface", {"model/model.safetensors": model_files.safetensors_bytes()}, "no config.json"),
        ("huggingface", {"model/config.json": b"{}"}, "no weights"),
        ("safetensors", {"/abs/model.safetensors": model_files.safetensors_bytes()}, "absolute path"),
        ("safetensors", {"../up/model.safetensors": model_files.safetensors_bytes()}, "'..'"),
    ],
)
async def test_archive_without_the_declared_format_is_invalid_archive(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path,
    declared: str, members: dict[str, bytes], expected_fragment: str,
) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(model_files.tar_bytes(members, "gz"))

    with pytest.raises(ServiceError) as raised:
        await client.upload_file(archive, _fields(tenant, declared))

    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason == "INVALID_ARCHIVE"
    assert expected_fragment in raised.value.message
    assert await _s3_objects_and_uploads(app, tenant.namespace_id) == ([], [])


async def test_not_an_archive_at_all_is_invalid_archive(client: ModelServiceClient, tenant: Tenant, tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a tar" * 40)
    with pytest.raises(ServiceError) as raised:
        await client.upload_file(junk, _fields(tenant, "safetensors"))
    assert raised.value.reason == "INVALID_ARCHIVE"


async def test_cancel_mid_stream_leaves_no_document_and_no_multipart_upload(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant
) -> None:
    sent_enough = asyncio.Event()

    async def messages() -> AsyncIterator[pb.UploadModelRequest]:
        yield upload_header(_fields(tenant, "safetensors", name="cancelled"))
        # One member of 10 GiB: a well-formed archive for as long as the stream lasts.
        yield pb.UploadModelRequest(chunk=model_files.tar_member_header("m/big.bin", 10 << 30))
        for index in range(10_000):
            yield pb.UploadModelRequest(chunk=bytes(1024 * 1024))
            if index == 12:  # more than two 5 MiB parts: a multipart upload is under way
                sent_enough.set()
            await asyncio.sleep(0.01)

    call = client.stub.UploadModel(messages(), metadata=client.metadata)
    await asyncio.wait_for(sent_enough.wait(), 30)
    await asyncio.sleep(0.5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def cleaned_up() -> bool:
        objects, uploads = await _s3_objects_and_uploads(app, tenant.namespace_id)
        return objects == [] and uploads == []

    for _ in range(100):
        if await cleaned_up():
            break
        await asyncio.sleep(0.1)
    assert await cleaned_up()
    # The reservation is gone too: the same name and version upload fine now.
    small = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, "gz")

    async def retry() -> AsyncIterator[pb.UploadModelRequest]:
        yield upload_header(_fields(tenant, "safetensors", name="cancelled"))
        yield pb.UploadModelRequest(chunk=small)

    assert (await client.upload_stream(retry())).success


async def test_archive_many_times_the_buffer_budget_streams_with_bounded_buffering(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path, app: ModelServiceApp
) -> None:
    budget = (TEST_PARTS_IN_FLIGHT + 1) * TEST_PART_BYTES
    weights = model_files.reference_weights(scale=144 * 1024)  # encoder.weight: 72 MiB of float32
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "big", weights), tmp_path / "big.tar", "")
    assert archive.stat().st_size > 4 * budget

    uploaded = await client.upload_file(archive, _fields(tenant, "safetensors", name="big"))

    assert uploaded.model_hash == file_sha256(archive)
    stats = next(s for s in app.uploads.recent_uploads if s.model_id == uploaded.model_id)
    assert stats.size_bytes == archive.stat().st_size
    assert 0 < stats.peak_buffered_bytes <= budget


@pytest.mark.parametrize("tier", [Tier.FREE, Tier.PRO])
async def test_tier_without_custom_models_is_permission_denied(app: ModelServiceApp, tmp_path: Path, tier: Tier) -> None:
    limited = await make_tenant(app, tier)
    archive = build_model_archive(tmp_path, "safetensors", "gz")
    async with ModelServiceClient(app.address, limited.api_key) as limited_client:
        with pytest.raises(ServiceError) as raised:
            await limited_client.upload_file(archive, _fields(limited, "safetensors"))
    assert raised.value.code is grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.reason == "CUSTOM_MODELS_NOT_SUPPORTED"
    assert raised.value.metadata["tier"] == tier.value


@pytest.mark.parametrize("api_key", [None, "msk_unknown_key"])
async def test_missing_or_unknown_key_is_unauthenticated(app: ModelServiceApp, tenant: Tenant, api_key: str | None) -> None:
    async with ModelServiceClient(app.address, api_key) as anonymous:
        with pytest.raises(ServiceError) as raised:
            await anonymous.get_model(tenant.namespace_id, "whatever")
    assert raised.value.code is grpc.StatusCode.UNAUTHENTICATED
    assert raised.value.reason == "UNAUTHENTICATED"


async def test_other_namespaces_model_answers_like_a_missing_one(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    uploaded = await client.upload_file(build_model_archive(tmp_path, "onnx", "gz"), _fields(tenant, "onnx"))
    stranger = await make_tenant(app)
    async with ModelServiceClient(app.address, stranger.api_key) as stranger_client:
        # With the stranger's own namespace: the model does not exist there.
        with pytest.raises(ServiceError) as in_own:
            await stranger_client.get_model(stranger.namespace_id, uploaded.model_id)
        # With the owner's namespace: the stranger's key does not reach it.
        with pytest.raises(ServiceError) as in_foreign:
            await stranger_client.get_model(tenant.namespace_id, uploaded.model_id)
    with pytest.raises(ServiceError) as unknown:
        await client.get_model(tenant.namespace_id, "0" * 32)
    assert in_own.value.code is unknown.value.code is grpc.StatusCode.NOT_FOUND
    assert in_own.value.reason == unknown.value.reason == "MODEL_NOT_FOUND"
    assert in_foreign.value.code is grpc.StatusCode.NOT_FOUND
    assert in_foreign.value.reason == "NAMESPACE_NOT_FOUND"


async def test_unknown_namespace_is_namespace_not_found(app: ModelServiceApp) -> None:
    issued_for = await make_tenant(app)
    async with ModelServiceClient(app.address, issued_for.api_key) as scoped:
        with pytest.raises(ServiceError) as raised:
            await scoped.get_model("no-such-namespace", "x")
    assert raised.value.reason == "NAMESPACE_NOT_FOUND"
    assert raised.value.metadata == {"id": "no-such-namespace", "resource": "namespace"}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"model_format": "tensorflow"}, "model_format"),
        ({"num_cpus": 0.05}, "num_cpus"),
        ({"num_cpus": 65.0}, "num_cpus"),
        ({"num_gpus": 9}, "num_gpus"),
        ({"memory_gb": 0.0}, "memory_gb"),
        ({"name": "../etc"}, "name"),
        ({"version": ""}, "version"),
        ({"expected_sha256": "abc"}, "expected_sha256"),
    ],
)
async def test_bad_metadata_is_rejected_before_bytes_with_the_field_named(
    client: ModelServiceClient, tenant: Tenant, override: dict[str, object], field: str
) -> None:
    values: dict[str, object] = {"name": "m", "version": "1", "model_format": "safetensors"}
    values.update(override)
    fields = UploadFields(namespace_id=tenant.namespace_id, **values)  # type: ignore[arg-type]

    async def messages() -> AsyncIterator[pb.UploadModelRequest]:
        yield upload_header(fields)

    with pytest.raises(ServiceError) as raised:
        await client.upload_stream(messages())
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.reason == "INVALID_ARGUMENT"
    assert raised.value.metadata["field"] == field


async def test_the_janitor_clears_what_a_replica_that_died_mid_upload_left(
    app: ModelServiceApp, tenant: Tenant, tmp_path: Path
) -> None:
    # What a replica leaves when it dies mid-upload of a compressed archive: a reservation
    # whose lease is no longer renewed, an incomplete multipart upload of the archive with
    # a part in it, and its deploy form (the inflated tar) either still incomplete too or
    # already completed before the replica died.
    from server.core.models import utc_now
    from server.core.validation import UploadDeclaration, validate_declaration
    from server.persistence.mongo import ModelRepository, database

    mongo = _mongo_client(app)
    models = ModelRepository(database(mongo, app.settings.mongodb_database))
    metadata = validate_declaration(
        UploadDeclaration(namespace_id=tenant.namespace_id, name="orphan", version="1", model_format="onnx")
    )
    key = f"{tenant.namespace_id}/orphan-model/archive"
    long_ago = utc_now() - datetime.timedelta(hours=1)
    await models.reserve("orphan-model", metadata, key, lease_expires_at=long_ago, now=long_ago)
    await models.record_upload_id("orphan-model", await _orphan_multipart_upload(app, key))
    await _orphan_multipart_upload(app, key + ".tar")
    completed_form = f"{tenant.namespace_id}/orphan-model-2/archive.tar"
    second = validate_declaration(
        UploadDeclaration(namespace_id=tenant.namespace_id, name="orphan", version="2", model_format="onnx")
    )
    await models.reserve("orphan-model-2", second, completed_form.removesuffix(".tar"), lease_expires_at=long_ago, now=long_ago)
    await _completed_object(app, completed_form)
    objects, uploads = await _s3_objects_and_uploads(app, tenant.namespace_id)
    assert sorted(uploads) == [app.settings.s3_prefix + key, app.settings.s3_prefix + key + ".tar"]
    assert objects == [app.settings.s3_prefix + completed_form]

    cleared = await app.janitor.sweep()
    await mongo.close()

    assert cleared >= 2
    assert await _s3_objects_and_uploads(app, tenant.namespace_id) == ([], [])
    async with ModelServiceClient(app.address, tenant.api_key) as owner:
        again = model_files.tar_bytes({"m/model.onnx": model_files.write_onnx(tmp_path)[0].read_bytes()}, "gz")

        async def retry() -> AsyncIterator[pb.UploadModelRequest]:
            yield upload_header(_fields(tenant, "onnx", name="orphan", version="1"))
            yield pb.UploadModelRequest(chunk=again)

        assert (await owner.upload_stream(retry())).success  # the name is free again


async def test_the_janitor_decides_from_our_records_not_from_the_stores_clock(
    app: ModelServiceApp, tenant: Tenant
) -> None:
    # moto reports every multipart upload as initiated in 2010: a clock-based janitor
    # would abort the live one. Ours keeps the upload of a live reservation, aborts the one
    # of an expired reservation even though its id was never recorded (a replica killed
    # between opening the upload and recording it), and leaves alone an upload it holds no
    # record of (another deployment sharing the bucket may own it).
    from server.core.models import utc_now
    from server.core.validation import UploadDeclaration, validate_declaration
    from server.persistence.mongo import ModelRepository, database

    mongo = _mongo_client(app)
    models = ModelRepository(database(mongo, app.settings.mongodb_database))

    def metadata(name: str) -> Any:
        return validate_declaration(
            UploadDeclaration(namespace_id=tenant.namespace_id, name=name, version="1", model_format="onnx")
        )

    keys = {name: f"{tenant.namespace_id}/{name}-model/archive" for name in ("live", "unrecorded", "foreign")}
    await models.reserve("live-model", metadata("live"), keys["live"], utc_now() + datetime.timedelta(minutes=5), utc_now())
    await models.record_upload_id("live-model", await _orphan_multipart_upload(app, keys["live"]))
    long_ago = utc_now() - datetime.timedelta(hours=1)
    await models.reserve("unrecorded-model", metadata("unrecorded"), keys["unrecorded"], long_ago, long_ago)
    await _orphan_multipart_upload(app, keys["unrecorded"])
    foreign_upload = await _orphan_multipart_upload(app, keys["foreign"])
    try:
        await app.janitor.sweep()
        assert sorted((await _s3_objects_and_uploads(app, tenant.namespace_id))[1]) == [
            app.settings.s3_prefix + keys["foreign"], app.settings.s3_prefix + keys["live"],
        ]
    finally:
        await models.release("live-model")
        for pending in await app.store.list_pending(keys["live"]):
            await app.store.abort_pending(pending.key, pending.upload_id)
        await app.store.abort_pending(keys["foreign"], foreign_upload)
        await mongo.close()
    assert await _s3_objects_and_uploads(app, tenant.namespace_id) == ([], [])


async def test_a_live_upload_keeps_its_reservation_while_a_part_stalls(app: ModelServiceApp, tenant: Tenant) -> None:
    from server.archives.inspector import InspectionLimits
    from server.archives.stores import ArchiveStore, ArchiveWriter, PendingUpload
    from server.core.janitor import Janitor
    from server.core.uploads import UploadLimits, UploadService
    from server.core.validation import UploadDeclaration
    from server.persistence.mongo import ModelRepository, database

    part_stalled = asyncio.Event()

    class StallingWriter:
        upload_id = "stalling"
        peak_buffered_bytes = 0

        async def write(self, data: bytes) -> None:
            part_stalled.set()
            await asyncio.sleep(2.0)  # a part PUT that takes many lease periods

        async def complete(self) -> None:
            return

        async def abort(self) -> None:
            return

    class StallingStore:
        def url_for(self, key: str) -> str:
            return f"stall://{key}"

        async def open_writer(self, key: str) -> ArchiveWriter:
            return StallingWriter()

        async def delete(self, key: str) -> None:
            return

        async def abort_pending(self, key: str, upload_id: str) -> None:
            return

        async def list_pending(self, key: str = "") -> list[PendingUpload]:
            return []

        async def probe(self) -> None:
            return

    mongo = _mongo_client(app)
    models = ModelRepository(database(mongo, app.settings.mongodb_database))
    store: ArchiveStore = StallingStore()
    lease = 0.3
    uploads = UploadService(
        app.tenancy, models, store,
        UploadLimits(max_archive_bytes=1 << 30, inspection=InspectionLimits(1 << 30, 200.0, 100), lease_seconds=lease),
    )
    janitor = Janitor(models, store, app.deletions, lease_seconds=lease)
    archive = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, "gz")

    async def declaration() -> tuple[UploadDeclaration, AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield archive

        return UploadDeclaration(tenant.namespace_id, "stalled", "1", "safetensors"), chunks()

    upload = asyncio.create_task(uploads.upload(tenant.api_key, tenant.namespace_id, declaration))
    await part_stalled.wait()
    await asyncio.sleep(3 * lease)  # the lease has been renewed several times by now
    assert await janitor.sweep() == 0
    uploaded = await upload
    await mongo.close()
    assert uploaded.metadata.name == "stalled"


async def _orphan_multipart_upload(app: ModelServiceApp, key: str) -> str:
    """A multipart upload with one part, as a replica that died mid-upload leaves it."""
    settings = app.settings
    object_key = settings.s3_prefix + key
    async with aioboto3.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region
    ) as s3:
        upload_id: str = (await s3.create_multipart_upload(Bucket=settings.s3_bucket, Key=object_key))["UploadId"]
        await s3.upload_part(
            Bucket=settings.s3_bucket, Key=object_key, UploadId=upload_id, PartNumber=1, Body=bytes(TEST_PART_BYTES)
        )
    return upload_id


async def _completed_object(app: ModelServiceApp, key: str) -> None:
    settings = app.settings
    async with aioboto3.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region
    ) as s3:
        await s3.put_object(Bucket=settings.s3_bucket, Key=settings.s3_prefix + key, Body=b"inflated tar")


def _mongo_client(app: ModelServiceApp) -> Any:
    from pymongo import AsyncMongoClient

    return AsyncMongoClient(app.mongodb_uri, tz_aware=True)


async def test_reflection_lists_the_service_for_generic_grpc_clients(app: ModelServiceApp) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(app.address) as channel:
        stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)  # type: ignore[arg-type]  # aio channel
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    names = {service.name for service in responses[0].list_services_response.service}
    assert {"modelservice.v1.ModelService", "grpc.health.v1.Health"} <= names


async def test_concurrent_duplicate_uploads_surface_already_exists_through_the_client(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    # A 24 MiB archive: the service answers the duplicates long before they are sent.
    weights = model_files.reference_weights(scale=48 * 1024)
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "m", weights), tmp_path / "m.tar")
    fields = _fields(tenant, "safetensors", name="raced")
    outcomes = await asyncio.gather(*(client.upload_file(archive, fields) for _ in range(20)), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(outcomes) - len(failures) == 1
    assert {(f.code, f.reason) for f in failures if isinstance(f, ServiceError)} == {
        (grpc.StatusCode.ALREADY_EXISTS, "MODEL_ALREADY_EXISTS")
    }, failures
    assert all(isinstance(f, ServiceError) for f in failures)


async def test_an_upload_whose_opening_timed_out_leaves_no_multipart_upload_behind(app: ModelServiceApp, tenant: Tenant) -> None:
    """The store opened the multipart upload but its answer never came back: the failed
    upload aborts what is pending under its key, then releases its reservation."""
    from server.archives.inspector import InspectionLimits
    from server.archives.stores import ArchiveWriter, PendingUpload
    from server.core.uploads import UploadLimits, UploadService
    from server.core.validation import UploadDeclaration
    from server.errors import ModelServiceError
    from server.persistence.mongo import ModelRepository, database

    class AnswerLostStore:
        def __init__(self) -> None:
            self.pending: list[PendingUpload] = []

        def url_for(self, key: str) -> str:
            return f"lost://{key}"

        async def open_writer(self, key: str) -> ArchiveWriter:
            self.pending.append(PendingUpload(key=key, upload_id="opened-on-the-store-side"))
            raise TimeoutError("the store's answer never came")

        async def delete(self, key: str) -> None:
            return

        async def abort_pending(self, key: str, upload_id: str) -> None:
            self.pending = [p for p in self.pending if (p.key, p.upload_id) != (key, upload_id)]

        async def list_pending(self, key: str = "") -> list[PendingUpload]:
            return [p for p in self.pending if p.key.startswith(key)]

        async def probe(self) -> None:
            return

    mongo = _mongo_client(app)
    models = ModelRepository(database(mongo, app.settings.mongodb_database))
    store = AnswerLostStore()
    uploads = UploadService(
        app.tenancy, models, store,
        UploadLimits(max_archive_bytes=1 << 30, inspection=InspectionLimits(1 << 30, 200.0, 100), lease_seconds=60),
    )

    async def declaration() -> tuple[UploadDeclaration, AsyncIterator[bytes]]:
        async def chunks() -> AsyncIterator[bytes]:
            yield b""

        return UploadDeclaration(tenant.namespace_id, "answer-lost", "1", "safetensors"), chunks()

    with pytest.raises((TimeoutError, ModelServiceError)):
        await uploads.upload(tenant.api_key, tenant.namespace_id, declaration)
    reservation = await mongo[app.settings.mongodb_database]["models"].find_one(
        {"namespace_id": tenant.namespace_id, "name": "answer-lost"}
    )
    await mongo.close()
    assert store.pending == [] and reservation is None
