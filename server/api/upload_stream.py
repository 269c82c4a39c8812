"""Turns an UploadModel request stream into the declared metadata and a stream of bytes.

gRPC clients send metadata first and `chunk` bytes after. Over REST, Envoy sends the path
and query parameters with the first `http_body` slice and only body bytes after; the body
is either the public API's multipart form (fields, then the `file` part) or the raw
archive with its metadata in query parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from modelservice.v1 import model_service_pb2 as pb

from server.api.converters import declaration_from_request
from server.api.multipart import FormReader, is_multipart
from server.core.validation import UploadDeclaration
from server.errors import InvalidArgument, UploadIncomplete

_METADATA_FIELDS = ("namespace_id", "name", "version", "model_format")


DeclarationReader = Callable[[], Awaitable[tuple[UploadDeclaration, AsyncIterator[bytes]]]]


@dataclass(frozen=True)
class OpenedUpload:
    """An upload whose first message was read: its namespace is known, its form is not.

    The namespace is enough to authorize the caller; only then does `read_declaration`
    parse the multipart form (if any), so an unauthenticated caller cannot make the
    service parse anything of its body.
    """

    namespace_id: str
    read_declaration: DeclarationReader


async def open_upload_stream(requests: AsyncIterator[pb.UploadModelRequest]) -> OpenedUpload:
    first = await anext(aiter(requests), None)
    if first is None:
        raise UploadIncomplete("the upload stream ended before its metadata message")
    declaration = declaration_from_request(first)

    async def read_declaration() -> tuple[UploadDeclaration, AsyncIterator[bytes]]:
        if is_multipart(first.http_body.content_type):
            form = FormReader(first.http_body.content_type, _archive_bytes(first, requests))
            fields, file_bytes = await form.fields_then_file()
            return _with_form_fields(declaration, fields), _then_drain(file_bytes, form)
        return declaration, _archive_bytes(first, requests)

    return OpenedUpload(namespace_id=declaration.namespace_id, read_declaration=read_declaration)


_NUMERIC_FIELDS = ("num_cpus", "num_gpus", "memory_gb")
_TEXT_FIELDS = ("name", "version", "model_format", "framework", "task_type", "expected_sha256")


_REQUIRED_FIELDS = ("name", "version", "model_format")


def _with_form_fields(declaration: UploadDeclaration, fields: dict[str, str]) -> UploadDeclaration:
    """Form fields complete the declaration; the namespace always comes from the path."""
    missing = [name for name in _REQUIRED_FIELDS if name not in fields and not getattr(declaration, name)]
    if missing:
        raise InvalidArgument(
            f"the form reached its 'file' part without {', '.join(missing)}: send the fields before "
            "the file (with curl, put -F file=@... last)",
            field=missing[0],
        )
    changes: dict[str, object] = {name: fields[name].strip() for name in _TEXT_FIELDS if name in fields}
    for name in _NUMERIC_FIELDS:
        if fields.get(name, "").strip():
            try:
                changes[name] = float(fields[name])
            except ValueError:
                raise InvalidArgument(f"{name} must be a number", field=name) from None
    return dataclasses.replace(declaration, **changes)  # type: ignore[arg-type]


async def _then_drain(file_bytes: AsyncIterator[bytes], form: FormReader) -> AsyncIterator[bytes]:
    async for chunk in file_bytes:
        yield chunk
    await form.drain()


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
        # Each read of a bytes field copies it: read once.
        data = message.chunk or message.http_body.data
        if data:
            yield data
