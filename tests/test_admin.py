"""The admin command: namespaces, tiers and API keys, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import grpc
import pytest

from modelservice_sdk.client import ModelServiceClient, ServiceError
from server.app import ModelServiceApp
from server.embedded.processes import executable

pytestmark = pytest.mark.integration


async def admin(app: ModelServiceApp, *args: str) -> tuple[int, Any, str]:
    process = await asyncio.create_subprocess_exec(
        executable("modelservice-admin"), *args,
        env={
            **os.environ,
            "MODELSERVICE_MONGODB_URI": app.mongodb_uri,
            "MODELSERVICE_MONGODB_DATABASE": app.settings.mongodb_database,
        },
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, json.loads(out) if process.returncode == 0 else None, err.decode()


async def test_keys_are_issued_scoped_listed_without_secrets_and_revoked(app: ModelServiceApp) -> None:
    namespace = f"admin-{uuid.uuid4().hex[:8]}"
    assert (await admin(app, "create-namespace", namespace, "--tier", "enterprise"))[0] == 0
    code, issued, _ = await admin(app, "create-key", "--namespace", namespace, "--label", "ci")
    assert code == 0 and issued["api_key"].startswith("msk_")

    async with ModelServiceClient(app.address, issued["api_key"]) as client:
        with pytest.raises(ServiceError) as before:
            await client.get_model(namespace, "none")
        assert before.value.reason == "MODEL_NOT_FOUND"  # authenticated and authorized

        _, listed, _ = await admin(app, "list-keys", "--namespace", namespace)
        assert [k["key_id"] for k in listed["keys"]] == [issued["key_id"]]
        assert "api_key" not in json.dumps(listed) and issued["api_key"] not in json.dumps(listed)

        assert (await admin(app, "revoke-key", issued["key_id"]))[0] == 0
        with pytest.raises(ServiceError) as after:
            await client.get_model(namespace, "none")
        assert after.value.code is grpc.StatusCode.UNAUTHENTICATED


async def test_lowering_a_tier_withdraws_custom_models(app: ModelServiceApp) -> None:
    namespace = f"admin-{uuid.uuid4().hex[:8]}"
    await admin(app, "create-namespace", namespace)
    _, issued, _ = await admin(app, "create-key", "--namespace", namespace)
    assert (await admin(app, "set-tier", namespace, "free"))[0] == 0
    async with ModelServiceClient(app.address, issued["api_key"]) as client:
        with pytest.raises(ServiceError) as refused:
            await client.list_models(namespace)
    assert refused.value.reason == "CUSTOM_MODELS_NOT_SUPPORTED"


async def test_admin_errors_exit_non_zero_with_the_reason(app: ModelServiceApp) -> None:
    namespace = f"admin-{uuid.uuid4().hex[:8]}"
    await admin(app, "create-namespace", namespace)
    code, _, err = await admin(app, "create-namespace", namespace)
    assert code == 1 and "NAMESPACE_ALREADY_EXISTS" in err
    code, _, err = await admin(app, "create-key", "--namespace", "no-such-namespace")
    assert code == 1 and "NAMESPACE_NOT_FOUND" in err
