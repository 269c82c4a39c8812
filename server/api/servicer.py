"""The ModelService servicer: request -> one core call -> response. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from modelservice.v1 import model_service_pb2 as pb
from modelservice.v1 import model_service_pb2_grpc as pb_grpc

from server.api import converters
from server.api.upload_stream import split_upload_stream
from server.core.uploads import UploadService

Context = grpc.aio.ServicerContext[Any, Any]


class ModelServiceServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, uploads: UploadService) -> None:
        self._uploads = uploads

    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: Context
    ) -> pb.UploadModelResponse:
        declaration, chunks = await split_upload_stream(request_iterator)
        token = converters.bearer_token(context.invocation_metadata())
        result = await self._uploads.upload(token, declaration, chunks)
        return converters.upload_response(result)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        token = converters.bearer_token(context.invocation_metadata())
        model = await self._uploads.get(token, request.namespace_id, request.model_id)
        return pb.GetModelResponse(success=True, model=converters.model_document(model))
