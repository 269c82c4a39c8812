"""One upload, timed, from its own process (so the client does not share the service's CPU
time slice or GIL): `python -m bench.upload_client grpc|rest ADDRESS KEY NAMESPACE FILE NAME`.
Prints {"seconds": ..., "model_id": ...}."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

from modelservice_sdk.client import ModelServiceClient, UploadFields


async def upload(transport: str, address: str, key: str, namespace: str, archive: Path, name: str) -> tuple[float, str]:
    started = time.perf_counter()
    if transport == "grpc":
        async with ModelServiceClient(address, key) as client:
            model_id = (await client.upload_file(archive, UploadFields(namespace, name, "1", "safetensors"))).model_id
    else:
        form = aiohttp.FormData()
        for field, value in (("name", name), ("version", "1"), ("model_format", "safetensors")):
            form.add_field(field, value)
        with archive.open("rb") as handle:
            form.add_field("file", handle, filename=archive.name)
            async with aiohttp.ClientSession() as session, session.post(
                f"http://{address}/v1/namespaces/{namespace}/models", data=form,
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                if response.status != 200:
                    raise SystemExit(f"upload failed: {response.status} {await response.text()}")
                model_id = (await response.json())["model_id"]
    return time.perf_counter() - started, model_id


if __name__ == "__main__":
    transport, address, key, namespace, path, name = sys.argv[1:7]
    seconds, model_id = asyncio.run(upload(transport, address, key, namespace, Path(path), name))
    print(json.dumps({"seconds": seconds, "model_id": model_id}))
