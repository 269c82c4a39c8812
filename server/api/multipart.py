"""Incremental `multipart/form-data` reading, for the public API's upload form.

Envoy passes a multipart body through as opaque bytes (one `http_body` slice per message),
so the service parses it here, as it streams: the small form fields are collected, the
`file` part is handed on chunk by chunk and never held whole. The form's fields must come
before the file (as browsers, curl -F in order, and HTTP libraries send them), because the
upload is validated and reserved before any archive byte is accepted.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import InvalidArgument, UploadIncomplete

FILE_FIELD = "file"
MAX_FIELDS_BYTES = 256 * 1024
"""Budget of everything before the file part: field values, names and part headers."""
MAX_FIELDS = 64
MAX_PART_HEADER_BYTES = 8 * 1024


def is_multipart(content_type: str) -> bool:
    return content_type.lower().startswith("multipart/form-data")


class FormReader:
    """Pulls parser events from an async source of body slices."""

    def __init__(self, content_type: str, body: AsyncIterator[bytes]) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise InvalidArgument("the multipart/form-data content type has no boundary", field="content-type")
        self._body = body
        self._events: collections.deque[tuple[str, Any]] = collections.deque()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._finished = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": lambda: self._events.append(("part", None)),
                "on_header_field": lambda d, s, e: self._header_bytes(self._header_name, d[s:e]),
                "on_header_value": lambda d, s, e: self._header_bytes(self._header_value, d[s:e]),
                "on_header_end": self._header_end,
                "on_headers_finished": lambda: self._events.append(("headers_done", None)),
                "on_part_data": lambda d, s, e: self._events.append(("data", bytes(d[s:e]))),
                "on_part_end": lambda: self._events.append(("part_end", None)),
                "on_end": lambda: self._events.append(("end", None)),
            },
        )

    def _header_bytes(self, target: bytearray, data: bytes) -> None:
        target.extend(data)
        if len(self._header_name) + len(self._header_value) > MAX_PART_HEADER_BYTES:
            raise InvalidArgument(
                f"a form part header is longer than {MAX_PART_HEADER_BYTES} bytes",
                field="body", limit=MAX_PART_HEADER_BYTES,
            )

    def _header_end(self) -> None:
        self._events.append(("header", (bytes(self._header_name).lower(), bytes(self._header_value))))
        self._header_name.clear()
        self._header_value.clear()

    async def next_event(self) -> tuple[str, Any]:
        while not self._events:
            if self._finished:
                raise UploadIncomplete("the multipart form ended before its closing boundary")
            chunk = await anext(self._body, None)
            try:
                if chunk is None:
                    self._finished = True
                    self._parser.finalize()
                else:
                    self._parser.write(chunk)
            except InvalidArgument:
                raise
            except Exception:  # python-multipart raises its own parse error types
                raise InvalidArgument("the multipart form is malformed", field="body") from None
        return self._events.popleft()

    async def fields_then_file(self) -> tuple[dict[str, str], AsyncIterator[bytes]]:
        """Reads the form fields up to the `file` part; returns them and the file's bytes."""
        fields: dict[str, str] = {}
        size = 0
        while True:
            kind, _ = await self.next_event()
            if kind == "end":
                raise InvalidArgument("the form has no 'file' part", field=FILE_FIELD)
            if kind != "part":
                continue
            name = await self._part_name()
            if name == FILE_FIELD:
                return fields, self._part_data()
            size += len(name)
            if len(fields) >= MAX_FIELDS:
                raise InvalidArgument(
                    f"the form has more than {MAX_FIELDS} fields before its file", field="body", limit=MAX_FIELDS
                )
            value = bytearray()
            async for data in self._part_data():
                size += len(data)
                if size > MAX_FIELDS_BYTES:
                    raise InvalidArgument(
                        f"the form fields exceed {MAX_FIELDS_BYTES} bytes", field="body", limit=MAX_FIELDS_BYTES
                    )
                value += data
            try:
                fields[name] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArgument(f"form field {name!r} is not UTF-8 text", field=name) from None

    async def _part_name(self) -> str:
        name = ""
        while True:
            kind, value = await self.next_event()
            if kind == "headers_done":
                if not name:
                    raise InvalidArgument("a form part has no name", field="body")
                return name
            if kind == "header" and value[0] == b"content-disposition":
                _, params = parse_options_header(value[1])
                name = params.get(b"name", b"").decode("utf-8", "replace")

    async def _part_data(self) -> AsyncIterator[bytes]:
        while True:
            kind, value = await self.next_event()
            if kind == "data":
                if value:
                    yield value
            elif kind == "part_end":
                return
            elif kind == "end":
                raise UploadIncomplete("the multipart form ended inside a part")

    async def drain(self) -> None:
        """Consumes what follows the file (later fields are ignored)."""
        while (await self.next_event())[0] != "end":
            pass
