"""Streaming archive inspection: does this upload hold what its declared format needs?

The upload pipeline feeds every chunk here as it arrives (in a worker thread: inflating
is CPU work). The inspector detects the compression from the magic bytes (.tar.gz, .tar.zst
or plain .tar), inflates with bounded output per step, walks the tar members and keeps
only the few bytes that prove the format (a safetensors header, a config.json, the first
bytes of an ONNX or PyTorch file). Memory stays small whatever the archive's size.
"""

from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import zstandard

from server.archives.formats import FormatEvidence, check_format
from server.archives.tar_stream import MemberHandler, TarMember, TarStreamReader
from server.core.models import ModelFormat
from server.errors import InvalidArchive

_INFLATE_STEP = 4 * 1024 * 1024
_RATIO_GRACE_BYTES = 64 * 1024 * 1024
_SNIFF_BYTES = 262  # the ustar magic sits at offset 257


class Compression(enum.StrEnum):
    GZIP = "gzip"
    ZSTD = "zstd"
    NONE = "none"


@dataclass(frozen=True)
class InspectionLimits:
    max_unpacked_bytes: int
    max_compression_ratio: float
    max_members: int


@dataclass
class ArchiveReport:
    """What the inspector found, once the archive read to its end."""

    compression: Compression
    member_count: int
    unpacked_bytes: int
    files: list[str] = field(default_factory=list)
    weight_files: list[str] = field(default_factory=list)


class _Inflater(Protocol):
    def feed(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


class ArchiveInspector:
    """Push-style inspector: `feed` every chunk in order, then `finish` for the verdict."""

    def __init__(self, declared_format: ModelFormat, limits: InspectionLimits) -> None:
        self._format = declared_format
        self._limits = limits
        self._evidence = FormatEvidence(declared_format)
        self._tar = TarStreamReader(
            _EvidenceCollector(self._evidence),
            max_members=limits.max_members,
            max_member_bytes=limits.max_unpacked_bytes,
            on_unpacked_bytes=self._count_unpacked,
        )
        self._sniffed = bytearray()
        self._inflater: _Inflater | None = None
        self._compression: Compression | None = None
        self._packed_bytes = 0
        self._unpacked_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self._packed_bytes += len(chunk)
        if self._inflater is None:
            self._sniffed += chunk
            if len(self._sniffed) < _SNIFF_BYTES:
                return
            head, self._sniffed = bytes(self._sniffed), bytearray()
            self._start(head)
            assert self._inflater is not None
            self._inflater.feed(head)
            return
        self._inflater.feed(chunk)

    def finish(self) -> ArchiveReport:
        if self._inflater is None:
            if not self._sniffed:
                raise InvalidArchive("the upload holds no archive bytes", check="empty")
            head, self._sniffed = bytes(self._sniffed), bytearray()
            self._start(head)
            assert self._inflater is not None
            self._inflater.feed(head)
        self._inflater.finish()
        self._tar.finish()
        check_format(self._evidence)
        assert self._compression is not None
        return ArchiveReport(
            compression=self._compression,
            member_count=self._tar.member_count,
            unpacked_bytes=self._unpacked_bytes,
            files=self._evidence.file_paths,
            weight_files=self._evidence.weight_paths,
        )

    def _start(self, head: bytes) -> None:
        if head.startswith(b"\x1f\x8b"):
            self._compression = Compression.GZIP
            self._inflater = _GzipInflater(self._tar.feed)
        elif head.startswith(b"\x28\xb5\x2f\xfd"):
            self._compression = Compression.ZSTD
            self._inflater = _ZstdInflater(self._tar.feed)
        elif head[257:262] == b"ustar" or len(head) >= 512:
            # Old v7 tars have no magic; the header checksum decides.
            self._compression = Compression.NONE
            self._inflater = _Passthrough(self._tar.feed)
        else:
            raise InvalidArchive(
                "the upload is not a .tar.gz, .tar.zst or .tar archive", check="compression"
            )

    def _count_unpacked(self, count: int) -> None:
        self._unpacked_bytes += count
        if self._unpacked_bytes > self._limits.max_unpacked_bytes:
            raise InvalidArchive(
                f"the archive unpacks to more than {self._limits.max_unpacked_bytes} bytes",
                check="unpacked_size", limit=self._limits.max_unpacked_bytes,
            )
        if (
            self._unpacked_bytes > _RATIO_GRACE_BYTES
            and self._unpacked_bytes > self._limits.max_compression_ratio * self._packed_bytes
        ):
            raise InvalidArchive(
                "the archive expands more than "
                f"{self._limits.max_compression_ratio:g}x (a decompression bomb?)",
                check="compression_ratio", limit=self._limits.max_compression_ratio,
            )


class _Passthrough:
    def __init__(self, sink: _Sink) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        self._sink(data)

    def finish(self) -> None:
        return


class _Sink(Protocol):
    def __call__(self, data: bytes | memoryview, /) -> None: ...


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


class _EvidenceCollector(MemberHandler):
    def __init__(self, evidence: FormatEvidence) -> None:
        self._evidence = evidence

    def on_member_start(self, member: TarMember) -> None:
        self._evidence.start_member(member)

    def on_member_data(self, data: memoryview) -> None:
        self._evidence.member_data(data)

    def on_member_end(self) -> None:
        self._evidence.end_member()
