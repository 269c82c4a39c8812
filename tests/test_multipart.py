"""Unit tests: the incremental multipart/form-data reader used for REST uploads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.api.multipart import FormReader
from server.errors import InvalidArgument, UploadIncomplete

BOUNDARY = "----modelservice-test"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, bytes, str | None]) -> bytes:
    body = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def sliced(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("slice_bytes", [1, 7, 4096])
async def test_fields_then_the_file_arrive_whatever_the_slicing(slice_bytes: int) -> None:
    payload = bytes(range(256)) * 100 + f"\r\n--{BOUNDARY}-not-the-end".encode()
    body = form(("name", b"bert", None), ("num_cpus", b"2", None), ("file", payload, "m.tar.gz"))
    reader = FormReader(CONTENT_TYPE, sliced(body, slice_bytes))

    fields, file_bytes = await reader.fields_then_file()
    received = b"".join([chunk async for chunk in file_bytes])
    await reader.drain()

    assert fields == {"name": "bert", "num_cpus": "2"}
    assert received == payload


async def test_a_form_without_a_file_part_is_refused() -> None:
    reader = FormReader(CONTENT_TYPE, sliced(form(("name", b"x", None)), 64))
    with pytest.raises(InvalidArgument, match="no 'file' part"):
        await reader.fields_then_file()


async def test_a_form_cut_short_is_incomplete() -> None:
    body = form(("name", b"x", None), ("file", b"0" * 1000, "m.tar"))
    reader = FormReader(CONTENT_TYPE, sliced(body[:-200], 64))
    _, file_bytes = await reader.fields_then_file()
    with pytest.raises(UploadIncomplete):
        async for _ in file_bytes:
            pass


async def test_a_content_type_without_boundary_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="boundary"):
        FormReader("multipart/form-data", sliced(b"", 1))
