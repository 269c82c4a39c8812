"""A small typed gRPC client for modelservice (used by the CLI and the tests)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from modelservice.v1 import model_service_pb2 as pb
from modelservice.v1 import model_service_pb2_grpc as pb_grpc

DEFAULT_CHUNK_BYTES = 1024 * 1024
UPLOAD_QUEUE_DEPTH = 4
"""Messages waiting for the upload's sending thread (memory: this many chunks)."""
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes sent so far, total bytes) as an upload goes."""


class ServiceError(Exception):
    """A failed call, with the service's stable reason and details."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata

    def __str__(self) -> str:
        return f"{self.code.name} {self.reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: Any) -> ServiceError:
        """From a failed call of either grpcio API (both offer the status accessors)."""
        status = _status_details(error.trailing_metadata())
        if status is None:
            return cls(error.code(), error.details() or "", "", {})
        reason, metadata = "", {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
        code = _CODES.get(status.code, error.code())
        return cls(code, status.message, reason, metadata)


async def _hand_over(handoff: queue.Queue[pb.UploadModelRequest | None], item: pb.UploadModelRequest | None, call: Any) -> bool:
    """Queues `item` for the sending thread; False once the call has ended (nobody reads)."""
    while not call.done():
        try:
            handoff.put_nowait(item)
            return True
        except queue.Full:
            with contextlib.suppress(queue.Full):
                await asyncio.to_thread(handoff.put, item, True, 0.05)
                return True
    return False


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def _status_details(trailing_metadata: Any) -> status_pb2.Status | None:
    for key, value in trailing_metadata or ():
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


@dataclass(frozen=True)
class UploadFields:
    """The metadata of an upload (the public API's form fields)."""

    namespace_id: str
    name: str
    version: str
    model_format: str
    framework: str = ""
    task_type: str = ""
    num_cpus: float | None = None
    num_gpus: int | None = None
    memory_gb: float | None = None
    expected_sha256: str = ""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(DEFAULT_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


class ModelServiceClient:
    """`async with ModelServiceClient("127.0.0.1:50051", api_key) as client: ...`"""

    def __init__(self, address: str, api_key: str | None) -> None:
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.ModelServiceStub(self._channel)
        # Uploads go through grpcio's synchronous API, in a thread: its asyncio client can
        # replace the status of a call the service answered before the upload was fully
        # sent (a duplicate, a bad archive) with INTERNAL "Internal error from Core"
        # (grpc/grpc#36066); the synchronous client reports the service's own status.
        self._upload_channel = grpc.insecure_channel(address, options=options)
        self._upload_stub = pb_grpc.ModelServiceStub(self._upload_channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self) -> ModelServiceClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        self._upload_channel.close()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def upload_file(
        self,
        path: Path,
        fields: UploadFields,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: ProgressCallback | None = None,
    ) -> pb.UploadModelResponse:
        """Streams a file; never reads it whole."""
        total = path.stat().st_size

        async def messages() -> AsyncIterator[pb.UploadModelRequest]:
            yield upload_header(fields)
            sent = 0
            with path.open("rb") as handle:
                while block := handle.read(chunk_bytes):
                    sent += len(block)
                    yield pb.UploadModelRequest(chunk=block)
                    if progress is not None:
                        progress(sent, total)

        return await self.upload_stream(messages())

    async def upload_stream(self, messages: AsyncIterator[pb.UploadModelRequest]) -> pb.UploadModelResponse:
        """Sends the messages, and returns (or raises) what the service answered.

        The service may answer before the upload is fully sent (a duplicate name, a bad
        archive): sending stops, and the caller gets the service's status. The messages
        pass to the sending thread through a small queue, so memory stays bounded.
        """
        handoff: queue.Queue[pb.UploadModelRequest | None] = queue.Queue(maxsize=UPLOAD_QUEUE_DEPTH)

        def requests() -> Iterator[pb.UploadModelRequest]:
            while (message := handoff.get()) is not None:
                yield message

        call: Any = self._upload_stub.UploadModel.future(requests(), metadata=self._metadata)
        try:
            async for message in messages:
                if not await _hand_over(handoff, message, call):
                    break  # the service has answered: nothing more to send
            else:
                await _hand_over(handoff, None, call)
            response: pb.UploadModelResponse = await asyncio.to_thread(call.result)
        except grpc.RpcError as error:
            raise ServiceError.from_rpc_error(error) from None
        finally:
            call.cancel()  # a no-op once the call ended; ends it on the caller's failure
            with contextlib.suppress(queue.Full):
                handoff.put_nowait(None)  # releases a sender thread waiting for a message
        return response

    async def get_model(self, namespace_id: str, model_id: str) -> pb.GetModelResponse:
        response: pb.GetModelResponse = await self._unary(
            self.stub.GetModel, pb.GetModelRequest(namespace_id=namespace_id, model_id=model_id)
        )
        return response

    async def list_models(self, namespace_id: str, *, page_size: int = 0, page_token: str = "") -> pb.ListModelsResponse:
        request = pb.ListModelsRequest(namespace_id=namespace_id, page_size=page_size, page_token=page_token)
        response: pb.ListModelsResponse = await self._unary(self.stub.ListModels, request)
        return response

    async def delete_model(self, namespace_id: str, model_id: str, *, wait: bool = True) -> pb.DeleteModelResponse:
        request = pb.DeleteModelRequest(namespace_id=namespace_id, model_id=model_id, wait=wait)
        response: pb.DeleteModelResponse = await self._unary(self.stub.DeleteModel, request)
        return response

    async def get_delete_task(self, namespace_id: str, task_id: str) -> pb.DeleteTask:
        task: pb.DeleteTask = await self._unary(
            self.stub.GetDeleteTask, pb.GetDeleteTaskRequest(namespace_id=namespace_id, task_id=task_id)
        )
        return task

    async def get_model_delete_status(self, namespace_id: str, model_id: str) -> pb.DeleteTask:
        task: pb.DeleteTask = await self._unary(
            self.stub.GetModelDeleteStatus, pb.GetModelDeleteStatusRequest(namespace_id=namespace_id, model_id=model_id)
        )
        return task

    async def undeploy_model(self, namespace_id: str, model_id: str) -> pb.UndeployModelResponse:
        request = pb.UndeployModelRequest(namespace_id=namespace_id, model_id=model_id)
        response: pb.UndeployModelResponse = await self._unary(self.stub.UndeployModel, request)
        return response

    async def deploy_model(
        self,
        namespace_id: str,
        model_id: str,
        *,
        wait: bool = True,
        pin: bool | None = None,
        idle_ttl_seconds: float | None = None,
        node_ids: list[str] | None = None,
        all_nodes: bool = False,
        alias: str = "",
    ) -> pb.DeployModelResponse:
        """Deploys the model; with `alias`, points that alias of its name at it once it is
        deployed (blue-green: until then the alias keeps resolving to the old model)."""
        request = pb.DeployModelRequest(
            namespace_id=namespace_id, model_id=model_id, wait=wait, pin=pin, idle_ttl_seconds=idle_ttl_seconds,
            node_ids=node_ids or [], all_nodes=all_nodes, alias=alias,
        )
        response: pb.DeployModelResponse = await self._unary(self.stub.DeployModel, request)
        return response

    async def set_alias(self, namespace_id: str, model_name: str, alias: str, model_id: str) -> pb.ModelAlias:
        request = pb.SetAliasRequest(namespace_id=namespace_id, model_name=model_name, alias=alias, model_id=model_id)
        answer: pb.ModelAlias = await self._unary(self.stub.SetAlias, request)
        return answer

    async def get_alias(self, namespace_id: str, model_name: str, alias: str) -> pb.ModelAlias:
        request = pb.AliasRequest(namespace_id=namespace_id, model_name=model_name, alias=alias)
        answer: pb.ModelAlias = await self._unary(self.stub.GetAlias, request)
        return answer

    async def list_aliases(self, namespace_id: str) -> pb.ListAliasesResponse:
        answer: pb.ListAliasesResponse = await self._unary(
            self.stub.ListAliases, pb.ListAliasesRequest(namespace_id=namespace_id)
        )
        return answer

    async def delete_alias(self, namespace_id: str, model_name: str, alias: str) -> pb.DeleteAliasResponse:
        request = pb.AliasRequest(namespace_id=namespace_id, model_name=model_name, alias=alias)
        answer: pb.DeleteAliasResponse = await self._unary(self.stub.DeleteAlias, request)
        return answer

    async def get_cache_status(self, namespace_id: str) -> pb.CacheStatus:
        status: pb.CacheStatus = await self._unary(
            self.stub.GetCacheStatus, pb.GetCacheStatusRequest(namespace_id=namespace_id)
        )
        return status

    async def get_deploy_task(self, namespace_id: str, task_id: str) -> pb.DeployTask:
        task: pb.DeployTask = await self._unary(
            self.stub.GetDeployTask, pb.GetDeployTaskRequest(namespace_id=namespace_id, task_id=task_id)
        )
        return task

    async def get_model_deploy_status(self, namespace_id: str, model_id: str) -> pb.DeployTask:
        task: pb.DeployTask = await self._unary(
            self.stub.GetModelDeployStatus,
            pb.GetModelDeployStatusRequest(namespace_id=namespace_id, model_id=model_id),
        )
        return task

    async def watch_deployment(
        self, namespace_id: str, model_id: str, *, after_sequence: int = 0, task_id: str = ""
    ) -> AsyncIterator[pb.DeploymentEvent]:
        """Events of the model's latest deployment (or of `task_id`), until its end."""
        request = pb.WatchDeploymentRequest(
            namespace_id=namespace_id, model_id=model_id, after_sequence=after_sequence, task_id=task_id
        )
        call = self.stub.WatchDeployment(request, metadata=self._metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from None
        finally:
            call.cancel()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from None


def upload_header(fields: UploadFields) -> pb.UploadModelRequest:
    """The first message of an upload: metadata only."""
    header = pb.UploadModelRequest(
        namespace_id=fields.namespace_id,
        name=fields.name,
        version=fields.version,
        model_format=fields.model_format,
        framework=fields.framework,
        task_type=fields.task_type,
        expected_sha256=fields.expected_sha256,
    )
    if fields.num_cpus is not None:
        header.num_cpus = fields.num_cpus
    if fields.num_gpus is not None:
        header.num_gpus = fields.num_gpus
    if fields.memory_gb is not None:
        header.memory_gb = fields.memory_gb
    return header


def message_to_json(message: Any) -> dict[str, Any]:
    """A response as the REST API spells it (snake_case, defaults included)."""
    result: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result
