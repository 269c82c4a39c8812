"""Turns an UploadModel request stream into the declared metadata and a stream of bytes.

gRPC clients send metadata first and `chunk` bytes after; over REST, Envoy sends
the path and query parameters with the first `http_body` slice and only body bytes after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from modelservice.v1 import model_service_pb2 as pb

from server.api.converters import declaration_from_request
from server.core.validation import UploadDeclaration
from server.errors import InvalidArgument, UploadIncomplete

_METADATA_FIELDS = ("namespace_id", "name", "version", "model_format")


async def split_upload_stream(
    requests: AsyncIterator[pb.UploadModelRequest],
) -> tuple[UploadDeclaration, AsyncIterator[bytes]]:
    first = await anext(aiter(requests), None)
    if first is None:
        raise UploadIncomplete("the upload stream ended before its metadata message")
    declaration = declaration_from_request(first)
    return declaration, _archive_bytes(first, requests)


async def _archive_bytes(
    first: pb.UploadModelRequest, requests: AsyncIterator[pb.UploadModelRequest]
) -> AsyncIterator[bytes]:
    for data in (first.chunk, first.http_body.data):
        if data:
            yield data
    async for message in requests:
        for field in _METADATA_FIELDS:
            if getattr(message, field):
                raise InvalidArgument(
                    f"{field} may only be set in the first message of an upload", field=field
                )
        if message.chunk:
            yield message.chunk
        elif message.http_body.data:
            yield message.http_body.data
