"""Streaming archive inspection: does this upload hold what its declared format needs?

The upload pipeline feeds every chunk here as it arrives (in a worker thread: inflating
is CPU work). The inspector detects the compression from the magic bytes (.tar.gz, .tar.zst
or plain .tar), inflates with bounded output per step, walks the tar members and keeps
only the few bytes that prove the format (a safetensors header, a config.json, the first
bytes of an ONNX or PyTorch file). Memory stays small whatever the archive's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.archives.compression import (
    SNIFF_BYTES,
    Compression,
    Inflater,
    detect_compression,
    make_inflater,
)
from server.archives.formats import FormatEvidence, check_format
from server.archives.tar_stream import MemberHandler, TarMember, TarStreamReader
from server.core.models import ModelFormat
from server.errors import InvalidArchive

_RATIO_GRACE_BYTES = 64 * 1024 * 1024


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
    file_count: int = 0
    weight_files: list[str] = field(default_factory=list)
    weights_bytes: int = 0
    """What the deployed model will take in the object store (exact for safetensors,
    an upper bound for the other formats)."""


class ArchiveInspector:
    """Push-style inspector: `feed` every chunk in order, then `finish` for the verdict."""

    def __init__(
        self, declared_format: ModelFormat, limits: InspectionLimits,
        on_inflated: Callable[[bytes], None] | None = None,
    ) -> None:
        """`on_inflated`, for a compressed archive, receives the inflated tar bytes as the
        inspector has read them (in order, at most 4 MiB at a time)."""
        self._on_inflated = on_inflated
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
        self._inflater: Inflater | None = None
        self._compression: Compression | None = None
        self._packed_bytes = 0
        self._unpacked_bytes = 0

    def feed(self, chunk: bytes) -> None:
        self._packed_bytes += len(chunk)
        if self._inflater is None:
            self._sniffed += chunk
            if len(self._sniffed) < SNIFF_BYTES:
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
            file_count=self._evidence.file_count,
            weight_files=self._evidence.weight_paths,
            weights_bytes=self._evidence.object_store_bytes,
        )

    def _start(self, head: bytes) -> None:
        self._compression = detect_compression(head)
        sink = self._tar.feed
        if self._on_inflated is not None and self._compression is not Compression.NONE:
            on_inflated = self._on_inflated

            def sink(data: bytes | memoryview) -> None:
                self._tar.feed(data)  # inspected first: nothing unread is passed on
                on_inflated(bytes(data))

        self._inflater = make_inflater(self._compression, sink)

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


class _EvidenceCollector(MemberHandler):
    def __init__(self, evidence: FormatEvidence) -> None:
        self._evidence = evidence

    def on_member_start(self, member: TarMember) -> None:
        self._evidence.start_member(member)

    def on_member_data(self, data: memoryview) -> None:
        self._evidence.member_data(data)

    def on_member_end(self) -> None:
        self._evidence.end_member()
