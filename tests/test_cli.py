"""The `modelservice` command line, run as a real process against the service."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelservice_sdk.client import file_sha256
from server.app import ModelServiceApp
from server.embedded.envoy import EnvoyEndpoints
from server.embedded.processes import executable, free_port
from tests.conftest import Tenant
from tests.support.uploads import build_model_archive

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


async def cli(address: str, api_key: str, *args: str) -> Result:
    # Asynchronously: the service under test runs on this very event loop.
    process = await asyncio.create_subprocess_exec(
        executable("modelservice"), *args,
        env={**os.environ, "MODELSERVICE_ADDRESS": address, "MODELSERVICE_API_KEY": api_key},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(process.communicate(), 180)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


async def cli_upload(address: str, tenant: Tenant, archive: Path, model_format: str, name: str) -> Result:
    """`modelservice upload ... --json` of version 1; asserts it succeeded."""
    uploaded = await cli(
        address, tenant.api_key, "upload", str(archive), "--namespace", tenant.namespace_id, "--name", name,
        "--version", "1", "--format", model_format, "--memory-gb", "0.5", "--json",
    )
    assert uploaded.code == 0, uploaded.err
    return uploaded


async def test_upload_with_progress_then_deploy_watch_get_and_tasks(
    app: ModelServiceApp, tenant: Tenant, tmp_path: Path
) -> None:
    archive = build_model_archive(tmp_path, "huggingface")
    ns = ("--namespace", tenant.namespace_id)

    uploaded = await cli_upload(app.address, tenant, archive, "huggingface", "cli-model")
    body = json.loads(uploaded.out)
    assert body["model_hash"] == file_sha256(archive)
    progress = [line for line in uploaded.err.splitlines() if line.startswith("upload [")]
    assert progress and "100.0%" in progress[-1] and "MiB/s" in progress[-1] and "ETA" in progress[-1]
    model_id = body["model_id"]

    started = await cli(app.address, tenant.api_key, "deploy", model_id, *ns, "--no-wait")
    assert started.code == 0 and started.out.startswith("pending")
    watched = await cli(app.address, tenant.api_key, "watch", model_id, *ns)
    assert watched.code == 0
    states = [line.split()[2] for line in watched.out.splitlines()]
    assert states[-1] == "deployed"

    shown = await cli(app.address, tenant.api_key, "get", model_id, *ns)
    assert shown.code == 0 and "deployed    yes" in shown.out and f'load_namespace_model("{model_id}")' in shown.out
    task = await cli(app.address, tenant.api_key, "tasks", *ns, "--model", model_id, "--json")
    assert json.loads(task.out)["state"] == "COMPLETED"
    again = await cli(app.address, tenant.api_key, "deploy", model_id, *ns)
    assert again.code == 0 and "already cached" in again.out

    listed = await cli(app.address, tenant.api_key, "list", *ns)
    assert listed.code == 0 and model_id in listed.out and "deployed" in listed.out
    undeployed = await cli(app.address, tenant.api_key, "undeploy", model_id, *ns)
    deleted = await cli(app.address, tenant.api_key, "delete", model_id, *ns, "--json")
    assert undeployed.code == 0 and "left the Ray object store" in undeployed.out
    assert deleted.code == 0 and json.loads(deleted.out)["model_id"] == model_id


async def test_the_cli_works_through_envoy_too(gateway: EnvoyEndpoints, tenant: Tenant, tmp_path: Path) -> None:
    archive = build_model_archive(tmp_path, "onnx")
    result = await cli(
        gateway.grpc_address, tenant.api_key, "upload", str(archive), "--namespace", tenant.namespace_id,
        "--name", "via-envoy", "--version", "1", "--format", "onnx",
    )
    assert result.code == 0, result.err
    assert result.out.startswith("uploaded ")


async def test_errors_give_the_reason_and_a_non_zero_exit_code(app: ModelServiceApp, tenant: Tenant) -> None:
    missing = await cli(app.address, tenant.api_key, "get", "nope", "--namespace", tenant.namespace_id)
    wrong_key = await cli(app.address, "msk_wrong", "get", "nope", "--namespace", tenant.namespace_id)
    unreachable = await cli(f"127.0.0.1:{free_port()}", tenant.api_key, "get", "nope", "--namespace", tenant.namespace_id)
    assert (missing.code, wrong_key.code, unreachable.code) == (1, 1, 3)
    assert "MODEL_NOT_FOUND" in missing.err and "UNAUTHENTICATED" in wrong_key.err
    assert "cannot reach modelservice" in unreachable.err


async def test_cache_shows_each_node_and_the_namespaces_cached_models(
    app: ModelServiceApp, tenant: Tenant, tmp_path: Path
) -> None:
    ns = ("--namespace", tenant.namespace_id)
    uploaded = await cli_upload(app.address, tenant, build_model_archive(tmp_path, "safetensors"), "safetensors", "cached")
    model_id = json.loads(uploaded.out)["model_id"]
    assert (await cli(app.address, tenant.api_key, "deploy", model_id, *ns, "--pin")).code == 0
    shown = await cli(app.address, tenant.api_key, "cache", *ns)
    assert shown.code == 0, shown.err
    assert shown.out.startswith("node ") and "budget used" in shown.out
    assert model_id in shown.out and "(pinned)" in shown.out
    assert (await cli(app.address, tenant.api_key, "undeploy", model_id, *ns)).code == 0


async def test_aliases_from_the_command_line_and_a_blue_green_deploy(
    app: ModelServiceApp, tenant: Tenant, tmp_path: Path
) -> None:
    ns = ("--namespace", tenant.namespace_id)
    first = json.loads((await cli_upload(app.address, tenant, build_model_archive(tmp_path, "onnx"), "onnx", "ranker")).out)
    deployed = await cli(app.address, tenant.api_key, "deploy", first["model_id"], *ns, "--alias", "production")
    assert deployed.code == 0, deployed.err
    shown = await cli(app.address, tenant.api_key, "get", first["model_id"], *ns)
    listed = await cli(app.address, tenant.api_key, "alias", "list", *ns)
    refused = await cli(app.address, tenant.api_key, "delete", first["model_id"], *ns)
    usage = await cli(app.address, tenant.api_key, "alias", "set", "no-at-sign", *ns)
    removed = await cli(app.address, tenant.api_key, "alias", "delete", "ranker@production", *ns)
    assert "aliases     ranker@production" in shown.out
    assert listed.out.strip() == f"ranker@production -> {first['model_id']}"
    assert refused.code != 0 and "MODEL_ALIASED" in refused.err
    assert usage.code != 0 and "alias set <name>@<alias> <model_id>" in usage.err
    assert removed.code == 0 and "deleted" in removed.out
