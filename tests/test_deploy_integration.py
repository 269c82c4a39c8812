"""DeployModel, WatchDeployment, deploy tasks and load_namespace_model against real Ray,
nx-27017 and moto's S3 server."""

from __future__ import annotations

import asyncio
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import aioboto3
import grpc
import numpy as np
import pytest
import ray
import torch

from modelservice_sdk.client import ModelServiceClient, ServiceError, file_sha256, message_to_json
from modelservice_sdk.loader import load_namespace_model
from modelservice_sdk.model import ModelNotAvailable
from server.app import ModelServiceApp
from server.deploy.cache_actor import CACHE_NAMESPACE
from server.settings import Settings
from tests.conftest import Tenant, make_tenant, own_service
from tests.support import model_files
from tests.support.ray_load import hold_one_cpu
from tests.support.uploads import FORMATS, build_model_archive, upload_fields, upload_model

pytestmark = pytest.mark.integration

def plugin_env(app: ModelServiceApp) -> dict[str, Any]:
    """How a plugin is pointed at a service deployment whose database is not the default."""
    return {"env_vars": {"MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database}}


PROBE_INPUT = np.random.default_rng(7).standard_normal((3, 8), dtype=np.float32)


def _expected_tensors(case: str) -> dict[str, np.ndarray]:
    if case in ("safetensors", "huggingface"):
        return model_files.reference_weights()
    if case == "onnx":
        return model_files.write_onnx(Path("/nonexistent-unused"), save=False)[1]
    return {k: v.numpy() for k, v in model_files.tiny_net().state_dict().items()}


def _expected_output(case: str, tmp_path: Path) -> np.ndarray | None:
    if case == "onnx":
        import onnxruntime

        path, _ = model_files.write_onnx(tmp_path / "reference")
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        output: np.ndarray = np.asarray(session.run(None, {"x": PROBE_INPUT})[0])
        return output
    if case in ("torchscript", "pytorch"):
        with torch.no_grad():
            result: np.ndarray = model_files.tiny_net()(torch.from_numpy(PROBE_INPUT)).numpy()
            return result
    return None


@ray.remote(num_cpus=0.5)
def _inspect_in_ray_task(model_id: str, expected: dict[str, np.ndarray], probe: np.ndarray) -> dict[str, Any]:
    """Runs in a Ray worker: loads the model as a plugin would and reports what it saw."""
    model = load_namespace_model(model_id)
    report: dict[str, Any] = {
        "kind": model.kind,
        "names": sorted(model.tensors),
        "equal": all(np.array_equal(model.tensors[k], v) for k, v in expected.items() if k in model.tensors),
        "read_only": all(not a.flags.writeable for a in model.tensors.values()),
        "views": all(not a.flags.owndata for a in model.tensors.values()),
        "files": sorted(model.files),
    }
    state = model.torch_state_dict()
    report["torch_shares_memory"] = all(
        state[k].data_ptr() == model.tensors[k].__array_interface__["data"][0] for k in model.tensors if k not in model.tensor_dtypes
    )
    if model.kind == "onnx":
        report["output"] = model.onnx_session().run(None, {"x": probe})[0]
    elif model.kind == "torchscript":
        with torch.no_grad():
            report["output"] = model.torchscript_module()(torch.from_numpy(probe)).numpy()
    elif model.kind == "state_dict":
        net = model_files.TinyNet()
        net.load_state_dict(state)
        with torch.no_grad():
            report["output"] = net.eval()(torch.from_numpy(probe)).numpy()
    return report


@pytest.mark.parametrize("case", FORMATS)
async def test_deploy_then_load_in_a_ray_task_gives_the_original_weights_zero_copy(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path, case: str
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, case)

    deployed = await client.deploy_model(tenant.namespace_id, model_id)

    assert (deployed.success, deployed.deployment_status, deployed.cached) == (True, "deployed", False)
    assert deployed.model_id == model_id and deployed.namespace_id == tenant.namespace_id and deployed.task_id
    expected = _expected_tensors(case)
    report = await _inspect_in_ray_task.options(runtime_env=plugin_env(app)).remote(model_id, expected, PROBE_INPUT)
    assert report["names"] == sorted(expected)
    assert report["equal"] and report["read_only"] and report["views"]
    assert report["torch_shares_memory"]
    reference_output = _expected_output(case, tmp_path)
    if reference_output is not None:
        np.testing.assert_allclose(report["output"], reference_output, rtol=1e-5, atol=1e-6)
    if case == "huggingface":
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(report["files"])
    assert report["kind"] == {"pytorch": "state_dict"}.get(case, case)

    model = message_to_json(await client.get_model(tenant.namespace_id, model_id))["model"]
    assert (model["deployed"], model["deployment_status"], model["deployment_error"]) == (True, "deployed", "")
    info = model["deployment_info"]
    assert info["ray_cluster_url"].startswith("ray://127.0.0.1:")
    assert info["ray_deployment_name"].startswith("model-cache-")
    assert info["endpoint"] == f'load_namespace_model("{model_id}")'
    assert info["base_image"] == ("mixpeek/serve-minimal:latest" if case == "onnx" else "mixpeek/serve-gpu:latest")
    assert info["deployed_at"].endswith("Z")


def _mapping_of(address: int) -> str:
    """The file backing the memory at `address` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


@ray.remote(num_cpus=0.5)
def _zero_copy_probe(model_id: str) -> dict[str, Any]:
    first = load_namespace_model(model_id).tensors["encoder.weight"]
    second = load_namespace_model(model_id).tensors["encoder.weight"]
    address = first.__array_interface__["data"][0]
    return {
        "same_address": address == second.__array_interface__["data"][0],
        "mapping": _mapping_of(address),
        "writeable": first.flags.writeable,
        "nbytes": first.nbytes,
    }


async def test_weights_come_from_shared_object_store_memory_not_copies(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    # Big enough (16 MiB) that Ray keeps it in the shared object store rather than inline.
    weights = model_files.reference_weights(scale=32 * 1024)
    archive = model_files.pack(model_files.write_safetensors(tmp_path / "big", weights), tmp_path / "big.tar", "")
    uploaded = await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors"))
    await client.deploy_model(tenant.namespace_id, uploaded.model_id)

    probe = await _zero_copy_probe.options(runtime_env=plugin_env(app)).remote(uploaded.model_id)

    assert probe["nbytes"] == weights["encoder.weight"].nbytes
    assert probe["writeable"] is False
    # Two loads in one process see the same memory, and that memory is a shared mapping
    # of the object store (plasma), not this worker's heap.
    assert probe["same_address"] is True
    assert probe["mapping"].startswith(("/dev/shm", "/tmp")), probe["mapping"]


async def test_deploying_a_deployed_model_answers_cached_without_loading(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    first = await client.deploy_model(tenant.namespace_id, model_id)
    loads_before = (await app.cluster.stats())["loads_started"]

    second = await client.deploy_model(tenant.namespace_id, model_id)

    assert (second.deployment_status, second.cached, second.task_id) == ("deployed", True, first.task_id)
    assert (await app.cluster.stats())["loads_started"] == loads_before


@ray.remote(num_cpus=0.1)
def _load_and_sum(model_id: str) -> float:
    return float(sum(a.sum() for a in load_namespace_model(model_id).tensors.values()))


async def test_concurrent_deploys_and_on_demand_loads_share_one_load(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    loads_before = (await app.cluster.stats())["loads_started"]

    deploys = [client.deploy_model(tenant.namespace_id, model_id) for _ in range(50)]
    plugin_loads = [_load_and_sum.options(runtime_env=plugin_env(app)).remote(model_id) for _ in range(4)]
    responses = await asyncio.gather(*deploys)
    sums = await asyncio.gather(*plugin_loads)

    assert {r.deployment_status for r in responses} == {"deployed"}
    assert len({r.task_id for r in responses}) == 1
    assert (await app.cluster.stats())["loads_started"] == loads_before + 1
    expected_sum = float(sum(a.sum() for a in model_files.reference_weights().values()))
    assert sums == pytest.approx([expected_sum] * 4, rel=1e-5)


async def test_a_model_not_deployed_is_loaded_on_demand_by_a_plugin(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    assert (await client.get_model(tenant.namespace_id, model_id)).model.deployed is False

    total = await _load_and_sum.options(runtime_env=plugin_env(app)).remote(model_id)

    assert total == pytest.approx(float(sum(a.sum() for a in model_files.reference_weights().values())), rel=1e-5)
    assert (await client.get_model(tenant.namespace_id, model_id)).model.deployed is True
    task = await client.get_model_deploy_status(tenant.namespace_id, model_id)
    assert (task.state, task.is_async) == ("COMPLETED", True)


async def test_unknown_and_foreign_models_raise_model_not_available(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    stranger = await make_tenant(app)
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        await asyncio.to_thread(load_namespace_model, "0" * 32, database=app.settings.mongodb_database)
    with pytest.raises(ModelNotAvailable, match="not found in namespace"):
        await asyncio.to_thread(
            load_namespace_model, model_id, namespace_id=stranger.namespace_id, database=app.settings.mongodb_database
        )


async def test_deploy_without_waiting_returns_a_task_then_watch_follows_it_in_order(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "huggingface")

    pending = await client.deploy_model(tenant.namespace_id, model_id, wait=False)
    events = [e async for e in client.watch_deployment(tenant.namespace_id, model_id)]

    assert (pending.success, pending.deployment_status, pending.cached) == (True, "pending", False)
    changes = [e for e in events if e.state != "heartbeat"]
    sequences = [e.sequence for e in changes]
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    assert changes[-1].state == "deployed" and changes[-1].terminal
    assert all(e.task_id == pending.task_id for e in events)
    order = ["queued", "downloading", "verifying", "decoding", "caching", "deployed"]
    assert [order.index(e.state) for e in changes] == sorted(order.index(e.state) for e in changes)

    # A new watcher of a finished deployment gets its current state and the stream ends.
    replay = [e async for e in client.watch_deployment(tenant.namespace_id, model_id)]
    assert [(e.sequence, e.state) for e in replay] == [(changes[-1].sequence, "deployed")]
    # A watcher resuming after any event gets exactly what followed it.
    for seen in changes[:-1]:
        resumed = [
            e async for e in client.watch_deployment(
                tenant.namespace_id, model_id, after_sequence=seen.sequence, task_id=pending.task_id
            )
        ]
        assert [(e.sequence, e.state) for e in resumed] == [
            (e.sequence, e.state) for e in changes if e.sequence > seen.sequence
        ]

    task = await client.get_deploy_task(tenant.namespace_id, pending.task_id)
    assert (task.state, task.task_type, task.model_id, task.stage) == ("COMPLETED", "DEPLOY_MODEL", model_id, "deployed")
    assert task.worker_node and task.is_async is True
    assert task.last_update_time.ToDatetime() >= task.create_time.ToDatetime()


async def test_a_watcher_on_a_second_service_instance_follows_a_deployment_started_on_the_first(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "onnx")
    async with ModelServiceApp(app.settings) as second, ModelServiceClient(second.address, tenant.api_key) as other:
        pending = await client.deploy_model(tenant.namespace_id, model_id, wait=False)
        events = [e async for e in other.watch_deployment(tenant.namespace_id, model_id, task_id=pending.task_id)]
    assert events[-1].state == "deployed"
    assert all(e.task_id == pending.task_id for e in events)


async def test_an_idle_watch_stream_gets_heartbeats(app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path) -> None:
    # The model needs all 4 CPUs of the test cluster and one is held: the deployment sits
    # queued, and the watch stream is idle.
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", num_cpus=4.0)
    blocker = await hold_one_cpu(3.0, tmp_path)
    pending = await client.deploy_model(tenant.namespace_id, model_id, wait=False)
    seen: list[str] = []
    async for event in client.watch_deployment(tenant.namespace_id, model_id, task_id=pending.task_id):
        seen.append(event.state)
        if event.state == "heartbeat":
            break
    assert seen[0] == "queued" and "heartbeat" in seen
    await blocker
    final = [e async for e in client.watch_deployment(tenant.namespace_id, model_id, task_id=pending.task_id, after_sequence=1)]
    assert final[-1].state == "deployed"


async def _replace_stored_archive(
    app: ModelServiceApp, namespace_id: str, model_id: str, data: bytes, name: str = "archive"
) -> None:
    settings = app.settings
    async with aioboto3.Session().client("s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region) as s3:
        key = f"{settings.s3_prefix}{namespace_id}/{model_id}/{name}"
        await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=data)


@pytest.mark.parametrize(
    ("compression", "deployed_object"),
    [("", "archive"), ("gz", "archive.tar")],  # a .tar.gz deploys from its inflated form
)
async def test_a_tampered_archive_fails_at_the_verify_stage(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path, compression: str,
    deployed_object: str,
) -> None:
    archive = build_model_archive(tmp_path, "safetensors", compression=compression)
    model_id = (await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors"))).model_id
    other = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes(seed=1)}, "")
    await _replace_stored_archive(app, tenant.namespace_id, model_id, other, deployed_object)

    failed = await client.deploy_model(tenant.namespace_id, model_id)

    assert (failed.success, failed.deployment_status, failed.cached) == (False, "failed", False)
    assert "verify" in failed.message and "CHECKSUM_MISMATCH" in failed.message
    last = [e async for e in client.watch_deployment(tenant.namespace_id, model_id)][-1]
    assert (last.state, last.failed_stage, last.error_reason, last.terminal) == ("failed", "verify", "CHECKSUM_MISMATCH", True)
    model = (await client.get_model(tenant.namespace_id, model_id)).model
    assert (model.deployed, model.deployment_status) == (False, "failed")
    assert model.deployment_error.startswith("verify: CHECKSUM_MISMATCH: ")
    task = await client.get_model_deploy_status(tenant.namespace_id, model_id)
    assert task.state == "FAILED" and task.error.startswith("verify: CHECKSUM_MISMATCH")


@pytest.mark.parametrize(
    ("case", "compression"),
    [("safetensors", ""), ("huggingface", "gz"), ("onnx", "")],
    ids=["safetensors-tar", "huggingface-tar.gz", "onnx-tar"],
)
async def test_a_deploy_from_the_local_store_unpacks_the_mapped_archive_in_place_and_still_verifies_it(
    service_settings: Settings, tmp_path: Path, case: str, compression: str
) -> None:
    """The embedded default keeps archives as files: a deploy maps the file instead of
    streaming it, keeps the weights where they lie in the tar, and still checks the digest
    before anything is parsed."""
    async with own_service(service_settings, tmp_path / "service", "local", s3_bucket="") as (app, tenant):
        async with ModelServiceClient(app.address, tenant.api_key) as client:
            archive = build_model_archive(tmp_path, case, compression=compression)
            model_id = (await client.upload_file(archive, upload_fields(tenant.namespace_id, case))).model_id
            deployed = await client.deploy_model(tenant.namespace_id, model_id)
            expected = _expected_tensors(case)
            report = await _inspect_in_ray_task.options(runtime_env=plugin_env(app)).remote(model_id, expected, PROBE_INPUT)

            tampered_id = (await client.upload_file(archive, upload_fields(tenant.namespace_id, case))).model_id
            stored = app.settings.data_dir / "archives" / tenant.namespace_id / tampered_id / ("archive.tar" if compression else "archive")
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
            failed = await client.deploy_model(tenant.namespace_id, tampered_id)
    assert deployed.deployment_status == "deployed"
    assert report["names"] == sorted(expected)
    assert report["equal"] and report["read_only"] and report["views"]
    reference_output = _expected_output(case, tmp_path)
    if reference_output is not None:
        np.testing.assert_allclose(report["output"], reference_output, rtol=1e-5, atol=1e-6)
    assert failed.deployment_status == "failed" and "verify" in failed.message and "CHECKSUM_MISMATCH" in failed.message


def _corrupt_torch_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02not really a pickle")
    return buffer.getvalue()


class _Gadget:
    """A class torch.load(weights_only=True) refuses to construct."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (print, ("this would run on the server",))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_corrupt_torch_zip(), "CORRUPT_WEIGHTS"),
        (pickle.dumps({"weight": _Gadget()}, protocol=2), "UNSAFE_PICKLE"),
    ],
)
async def test_undecodable_pytorch_weights_fail_at_the_decode_stage(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path, payload: bytes, reason: str
) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(model_files.tar_bytes({"m/model.pt": payload}, "gz"))
    uploaded = await client.upload_file(archive, upload_fields(tenant.namespace_id, "pytorch"))

    failed = await client.deploy_model(tenant.namespace_id, uploaded.model_id)

    assert failed.deployment_status == "failed"
    last = [e async for e in client.watch_deployment(tenant.namespace_id, uploaded.model_id)][-1]
    assert (last.failed_stage, last.error_reason) == ("decode", reason)


async def test_a_model_needing_gpus_the_cluster_lacks_fails_at_scheduling_instead_of_hanging(
    client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors", num_gpus=2)
    failed = await client.deploy_model(tenant.namespace_id, model_id)
    assert failed.deployment_status == "failed" and "INSUFFICIENT_RESOURCES" in failed.message
    assert "GPUs" in failed.message


async def test_deploy_errors_carry_reasons(app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant) -> None:
    with pytest.raises(ServiceError) as unknown_model:
        await client.deploy_model(tenant.namespace_id, "0" * 32)
    with pytest.raises(ServiceError) as unknown_task:
        await client.get_deploy_task(tenant.namespace_id, "nope")
    assert (unknown_model.value.code, unknown_model.value.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert (unknown_task.value.code, unknown_task.value.reason) == (grpc.StatusCode.NOT_FOUND, "DEPLOY_TASK_NOT_FOUND")


def test_the_cache_actor_lives_in_the_service_namespace(app: ModelServiceApp) -> None:
    actor = ray.get_actor(app.cluster.actor_name, namespace=CACHE_NAMESPACE)
    stats: Any = ray.get(actor.stats.remote())
    assert set(stats) == {"loads_started", "cached_models", "loading_models"}


async def test_a_killed_model_cache_is_noticed_recreated_and_loads_on_demand(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    assert (await client.deploy_model(tenant.namespace_id, model_id)).deployment_status == "deployed"

    ray.kill(ray.get_actor(app.cluster.actor_name, namespace=CACHE_NAMESPACE))

    # The service's dependency monitor notices within seconds: GetModel stops claiming the
    # weights that died with the cache.
    for _ in range(200):
        model = (await client.get_model(tenant.namespace_id, model_id)).model
        if model.deployment_status != "deployed":
            break
        await asyncio.sleep(0.1)
    assert (model.deployment_status, model.deployed) == ("not_deployed", False)
    assert "lost" in model.deployment_error
    # A plugin's next load brings the weights back, on demand, through the new cache.
    total = await _load_and_sum.options(runtime_env=plugin_env(app)).remote(model_id)
    assert total == pytest.approx(float(sum(a.sum() for a in model_files.reference_weights().values())), rel=1e-5)
    assert (await client.get_model(tenant.namespace_id, model_id)).model.deployed is True


@ray.remote(num_cpus=0.1)
def _repeat_loads_in_one_process(model_id: str) -> dict[str, Any]:
    import gc

    from modelservice_sdk import loader

    first = load_namespace_model(model_id)
    second = load_namespace_model(model_id)  # served by this process: no round trip

    def held() -> bool:
        return any(key[1] == model_id for key in list(loader._held.keys()))

    held_while_used, same_object = held(), first is second
    del first, second
    gc.collect()  # the deserialized model may sit in a reference cycle until a collection
    return {"same_object": same_object, "held_while_used": held_while_used, "held_after": held()}


async def test_a_repeat_load_in_one_process_reuses_the_model_and_holds_nothing_once_let_go(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    model_id = await upload_model(client, tenant.namespace_id, tmp_path, "safetensors")
    assert (await client.deploy_model(tenant.namespace_id, model_id)).deployment_status == "deployed"
    report = await _repeat_loads_in_one_process.options(runtime_env=plugin_env(app)).remote(model_id)
    assert report == {"same_object": True, "held_while_used": True, "held_after": False}
    # Nothing in the plugin's process pins the weights: an undeploy frees them as before.
    assert (await client.undeploy_model(tenant.namespace_id, model_id)).was_cached


async def test_a_compressed_archive_is_kept_inflated_beside_it_and_deployed_from_that(
    app: ModelServiceApp, client: ModelServiceClient, tenant: Tenant, tmp_path: Path
) -> None:
    """Gzip is paid once, at upload: the inflated tar is stored with its own digest, counted
    in the namespace's storage, and every deploy reads it; model_hash still describes the
    archive that was uploaded."""
    import gzip

    from tests.test_upload_integration import _s3_objects_and_uploads

    archive = build_model_archive(tmp_path, "safetensors", compression="gz")
    inflated = gzip.decompress(archive.read_bytes())
    model_id = (await client.upload_file(archive, upload_fields(tenant.namespace_id, "safetensors"))).model_id
    objects, _ = await _s3_objects_and_uploads(app, tenant.namespace_id)
    usage = await app.catalog.usage(tenant.namespace_id)
    deployed = await client.deploy_model(tenant.namespace_id, model_id)
    events = [e async for e in client.watch_deployment(tenant.namespace_id, model_id, task_id=deployed.task_id, after_sequence=1)]
    model = (await client.get_model(tenant.namespace_id, model_id)).model
    total = await _load_and_sum.options(runtime_env=plugin_env(app)).remote(model_id)

    plain = build_model_archive(tmp_path / "plain", "onnx", compression="")
    plain_id = (await client.upload_file(plain, upload_fields(tenant.namespace_id, "onnx"))).model_id
    plain_objects, _ = await _s3_objects_and_uploads(app, tenant.namespace_id)

    assert sorted(k.rsplit("/", 1)[1] for k in objects if model_id in k) == ["archive", "archive.tar"]
    assert usage.archive_bytes == archive.stat().st_size + len(inflated)
    assert deployed.deployment_status == "deployed" and model.model_hash == file_sha256(archive)
    assert {int(e.bytes_total) for e in events if e.state == "downloading"} == {len(inflated)}
    assert total == pytest.approx(float(sum(a.sum() for a in model_files.reference_weights().values())), rel=1e-5)
    assert [k.rsplit("/", 1)[1] for k in plain_objects if plain_id in k] == ["archive"]  # nothing to inflate
