"""Builds and uploads real model archives for the integration tests."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncio
from collections.abc import AsyncIterator

from modelservice.v1 import model_service_pb2 as pb

from modelservice_sdk.client import ModelServiceClient, ServiceError, UploadFields, upload_header
from tests.support import model_files

FORMATS = ("safetensors", "onnx", "pytorch", "torchscript", "huggingface")
"""Test cases; "torchscript" is uploaded with the public format name "pytorch"."""


def declared_format(case: str) -> str:
    return "pytorch" if case == "torchscript" else case


def build_model_archive(tmp_path: Path, case: str, compression: str = "gz") -> Path:
    source = tmp_path / f"src-{case}"
    if case == "safetensors":
        model_files.write_safetensors(source, model_files.reference_weights())
    elif case == "onnx":
        model_files.write_onnx(source)
    elif case == "pytorch":
        model_files.write_state_dict(source, model_files.tiny_net())
    elif case == "torchscript":
        model_files.write_torchscript(source, model_files.tiny_net())
    elif case == "huggingface":
        model_files.write_huggingface(source, model_files.reference_weights())
    else:
        raise ValueError(case)
    suffix = {"gz": ".tar.gz", "": ".tar", "zst": ".tar.zst"}[compression]
    return model_files.pack(source, tmp_path / f"{case}{suffix}", compression)


def upload_fields(namespace_id: str, case: str, **extra: object) -> UploadFields:
    values: dict[str, object] = {"memory_gb": 0.5}
    values.update(extra)
    return UploadFields(
        namespace_id=namespace_id,
        name=str(values.pop("name", f"{case}-{uuid.uuid4().hex[:6]}")),
        version=str(values.pop("version", "1.0.0")),
        model_format=declared_format(case),
        **values,  # type: ignore[arg-type]
    )


async def upload_model(client: ModelServiceClient, namespace_id: str, tmp_path: Path, case: str, **extra: object) -> str:
    archive = build_model_archive(tmp_path, case)
    response = await client.upload_file(archive, upload_fields(namespace_id, case, **extra))
    return response.model_id


async def upload_refused_before_the_bytes(client: ModelServiceClient, fields: UploadFields) -> ServiceError:
    """Starts an upload that trickles bytes for 5 s; returns the service's refusal, which
    must come before the client needed to send them all."""
    chunks_sent = 0

    async def messages() -> AsyncIterator[pb.UploadModelRequest]:
        nonlocal chunks_sent
        yield upload_header(fields)
        for _ in range(100):
            chunks_sent += 1
            await asyncio.sleep(0.05)
            yield pb.UploadModelRequest(chunk=b"\0" * 1024)

    try:
        await client.upload_stream(messages())
    except ServiceError as refused:
        assert chunks_sent < 100, "the service read the whole upload before refusing it"
        return refused
    raise AssertionError("the upload was accepted")
