"""Archive compression: detection by magic bytes and push-style inflaters.

Inflaters emit their output in bounded slices (at most 4 MiB per step), so a small
compressed chunk that expands hugely never materialises at once.
"""

from __future__ import annotations

import enum
import zlib
from typing import Any, Protocol

import zstandard

from server.errors import InvalidArchive

_INFLATE_STEP = 4 * 1024 * 1024
SNIFF_BYTES = 262  # the ustar magic sits at offset 257


class Compression(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


class Inflater(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class _Sink(Protocol):
    def __call__(self, data: bytes | memoryview, /) -> None: ...


def detect_compression(head: bytes) -> Compression:
    """The compression of an archive from its first SNIFF_BYTES bytes (or all, if shorter)."""
    if head.startswith(b"\x1f\x8b"):
        return Compression.GZIP
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return Compression.ZSTD
    if head[257:262] == b"ustar" or len(head) >= 512:
        # Old v7 tars have no magic; the tar reader's header checksum decides.
        return Compression.NONE
    raise InvalidArchive("the upload is not a .tar.gz, .tar.zst or .tar archive", check="compression")


def make_inflater(compression: Compression, sink: _Sink) -> Inflater:
    if compression is Compression.GZIP:
        return _GzipInflater(sink)
    if compression is Compression.ZSTD:
        return _ZstdInflater(sink)
    return _Passthrough(sink)


class _Passthrough:
    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        self._sink(data)

    def finish(self) -> None:
        return


class _GzipInflater:
    """Inflates gzip (also multi-member) with at most 4 MiB of output per step."""

    def __init__(self, sink: _Sink) -> None:
        self._sink = sink
        self._inflater = zlib.decompressobj(wbits=31)

    def feed(self, data: bytes) -> None:
        pending = data
        while pending:
            try:
                out = self._inflater.decompress(pending, _INFLATE_STEP)
            except zlib.error as error:
                raise InvalidArchive(f"the gzip stream is corrupt: {error}", check="gzip") from None
            if out:
                self._sink(out)
            if self._inflater.eof:
                pending = self._inflater.unused_data
                if pending:
                    self._inflater = zlib.decompressobj(wbits=31)
            else:
                pending = self._inflater.unconsumed_tail

    def finish(self) -> None:
        if not self._inflater.eof:
            raise InvalidArchive("the gzip stream is truncated", check="gzip")


class _ZstdInflater:
    """Inflates zstd through a stream writer whose output arrives in bounded slices."""

    def __init__(self, sink: _Sink) -> None:
        self._writer: Any = zstandard.ZstdDecompressor().stream_writer(
            _CallbackFile(sink),  # type: ignore[arg-type]  # any object with write() will do
            write_size=_INFLATE_STEP,
            write_return_read=True,
        )

    def feed(self, data: bytes) -> None:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as error:
            raise InvalidArchive(f"the zstd stream is corrupt: {error}", check="zstd") from None

    def finish(self) -> None:
        try:
            self._writer.flush()
        except zstandard.ZstdError as error:
            raise InvalidArchive(f"the zstd stream is corrupt: {error}", check="zstd") from None


class _CallbackFile:
    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._sink(data)
        return len(data)


