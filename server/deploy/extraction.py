"""Streams an archive from the store into a scratch directory, hashing it on the way.

Runs inside a Ray task; one pass over the bytes, no copy of the archive on disk. The same
tar reader and inflaters as upload inspection are used, so the same hostile-archive rules
apply (no links, no absolute paths, no `..`).

Two threads share the work: one reads the store and hashes (socket reads and sha256 both
release the GIL), the other inflates, parses and writes members, so downloading and
unpacking overlap instead of taking turns.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from server.archives.compression import SNIFF_BYTES, Compression, Inflater, detect_compression, make_inflater
from server.archives.tar_stream import MemberHandler, TarMember, TarStreamReader
from server.deploy.specs import LOCAL_STORE, StoreConfig
from server.errors import InvalidArchive

READ_CHUNK = 8 * 1024 * 1024
_DETECTION_BYTES = 512
"""Enough for `detect_compression`: the magic bytes, and whether a whole tar block is there."""
CHUNKS_IN_FLIGHT = 4
"""Chunks read ahead of the unpacking thread (bounded memory: 4 x 8 MiB)."""


def read_archive(store: StoreConfig, archive_key: str) -> Iterator[bytes]:
    """The stored archive's bytes, in chunks (a synchronous read for Ray workers)."""
    if store.kind == LOCAL_STORE:
        path = Path(store.local_root) / archive_key
        with path.open("rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                yield chunk
        return
    import boto3
    from botocore.config import Config

    client: Any = boto3.client(
        "s3", endpoint_url=store.endpoint_url or None, region_name=store.region or None,
        config=Config(
            connect_timeout=store.timeout_seconds, read_timeout=store.timeout_seconds,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )
    body = client.get_object(Bucket=store.bucket, Key=store.prefix + archive_key)["Body"]
    try:
        yield from body.iter_chunks(READ_CHUNK)
    finally:
        body.close()


IN_MEMORY_SUFFIXES = (".safetensors",)
"""Members kept in memory rather than written to scratch: safetensors weights are decoded
as views on their bytes, so a disk round trip would only add a write and a read (a 1 GiB
write took 2.8 s on the 2-core machines, longer than hashing and caching together)."""


class _DiskWriter(MemberHandler):
    """Writes members under the root, or into memory for weights decoded in place. The tar
    reader has already refused unsafe and duplicate paths; the writer still creates each
    file exclusively (never through an existing file or link), and reports a clash as a
    bad archive, not as a server path.

    With `keep_views` (the archive is a read-only mapping that outlives the load), a
    weights member whose bytes arrive in one piece is kept as a view on the mapping: no
    copy at all.
    """

    def __init__(self, root: Path, *, keep_views: bool = False) -> None:
        self._root = root
        self._keep_views = keep_views
        self._handle: IO[bytes] | None = None
        self._member: TarMember | None = None
        """The in-memory member under way, until its first bytes say whether to copy it."""
        self._buffer: np.ndarray | None = None
        """The in-memory member being filled, as bytes: numpy copies into it without holding
        the GIL (an mmap slice assignment holds it, which stalled the reading thread)."""
        self._filled = 0
        self.in_memory: dict[str, mmap.mmap | memoryview] = {}
        """Relative path → the member's bytes (anonymous memory, or a view on the mapped
        archive; released with the model)."""

    def on_member_start(self, member: TarMember) -> None:
        target = self._root / member.path
        if not member.is_directory and member.path.endswith(IN_MEMORY_SUFFIXES) and member.size > 0:
            self._member = member
            return
        try:
            if member.is_directory:
                target.mkdir(parents=True, exist_ok=True)
                return
            target.parent.mkdir(parents=True, exist_ok=True)
            self._handle = target.open("xb")
        except OSError:
            raise InvalidArchive(
                f"member {member.path!r} clashes with another member of the archive",
                check="member_path", member=member.path,
            ) from None

    def on_member_data(self, data: memoryview) -> None:
        if self._member is not None:
            member, self._member = self._member, None
            if self._keep_views and len(data) == member.size:
                self.in_memory[member.path] = data
                return
            self.in_memory[member.path] = memory = mmap.mmap(-1, member.size)
            self._buffer = np.frombuffer(memory, dtype=np.uint8)
            self._filled = 0
        if self._buffer is not None:
            self._buffer[self._filled : self._filled + len(data)] = np.frombuffer(data, dtype=np.uint8)
            self._filled += len(data)
        elif self._handle is not None:
            self._handle.write(data)

    def on_member_end(self) -> None:
        self._member = None
        self._buffer = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    close = on_member_end  # also closes a member left open by an archive that broke off


@dataclass(frozen=True)
class Extraction:
    sha256: str
    """Digest of every byte read, whether or not the archive could be unpacked."""
    error: InvalidArchive | None
    """Why unpacking stopped early, if it did (the caller decides what that means)."""
    in_memory: dict[str, mmap.mmap | memoryview]
    """Members unpacked into memory instead of the destination (see IN_MEMORY_SUFFIXES)."""


def extract_archive(
    chunks: Iterator[bytes],
    destination: Path,
    *,
    max_unpacked_bytes: int,
    max_members: int,
    on_progress: Callable[[int], None],
) -> Extraction:
    """Unpacks the archive into `destination` while hashing it, in one pass.

    An archive that cannot be unpacked is still read and hashed to its end, so that a
    tampered archive is reported as a digest mismatch rather than as a parse error.
    """
    writer = _DiskWriter(destination)
    hashed = _HashingReader(chunks, on_progress)
    error = _unpack(hashed.chunks(), writer, max_unpacked_bytes=max_unpacked_bytes, max_members=max_members)
    return Extraction(sha256=hashed.hexdigest(), error=error, in_memory=writer.in_memory)


def map_local_archive(store: StoreConfig, archive_key: str) -> mmap.mmap | None:
    """The archive in the local store, mapped read-only (None for S3, and for an empty
    file, which cannot be mapped: those stream)."""
    if store.kind != LOCAL_STORE:
        return None
    with (Path(store.local_root) / archive_key).open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return None
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def extract_mapped_archive(
    mapped: mmap.mmap,
    destination: Path,
    *,
    max_unpacked_bytes: int,
    max_members: int,
    on_progress: Callable[[int], None],
) -> Extraction:
    """Hashes the mapped archive, then unpacks it; an uncompressed tar's weights stay where
    they are in the mapping, so a deploy copies them once, into the object store.

    Stored archives are written once and renamed into place, never changed: the bytes
    decoded are the bytes hashed. A deploy from the local store reads the page cache.
    """
    view = memoryview(mapped)
    digest = hashlib.sha256()
    slices = [view[start : start + READ_CHUNK] for start in range(0, len(view), READ_CHUNK)]
    for done, piece in enumerate(slices, start=1):
        digest.update(piece)  # releases the GIL
        on_progress(min(done * READ_CHUNK, len(view)))
    writer = _DiskWriter(destination, keep_views=True)
    try:
        compression = detect_compression(bytes(view[:_DETECTION_BYTES]))
    except InvalidArchive as failure:
        return Extraction(sha256=digest.hexdigest(), error=failure, in_memory={})
    # An uncompressed tar is fed whole: each member's bytes reach the writer as one slice
    # of the mapping. A compressed one is inflated slice by slice, as when streaming.
    chunks: list[memoryview] = [view] if compression is Compression.NONE else slices
    error = _unpack(chunks, writer, max_unpacked_bytes=max_unpacked_bytes, max_members=max_members)
    return Extraction(sha256=digest.hexdigest(), error=error, in_memory=writer.in_memory)


def _unpack(
    chunks: Iterable[bytes | memoryview], writer: _DiskWriter, *, max_unpacked_bytes: int, max_members: int
) -> InvalidArchive | None:
    """Inflates and unpacks `chunks` into `writer`; returns why it stopped early, if it did.
    The chunks are consumed to their end either way (the hashing reader needs that)."""
    unpacked = 0

    def count(size: int) -> None:
        nonlocal unpacked
        unpacked += size
        if unpacked > max_unpacked_bytes:
            raise InvalidArchive(f"the archive unpacks to more than {max_unpacked_bytes} bytes", check="unpacked_size")

    reader = TarStreamReader(
        writer, max_members=max_members, max_member_bytes=max_unpacked_bytes,
        on_unpacked_bytes=count,
    )
    inflater: Inflater | None = None
    head = bytearray()
    error: InvalidArchive | None = None
    for chunk in chunks:
        if error is not None:
            continue
        try:
            if inflater is None:
                if head or len(chunk) < SNIFF_BYTES:
                    head += chunk
                    if len(head) < SNIFF_BYTES:
                        continue
                    chunk, head = bytes(head), bytearray()
                # The first chunk goes on as it came: a view of the mapped archive stays one.
                inflater = make_inflater(detect_compression(bytes(chunk[:_DETECTION_BYTES])), reader.feed)
            inflater.feed(chunk)
        except InvalidArchive as failure:
            error = failure
    if error is None:
        try:
            if inflater is None:
                inflater = make_inflater(detect_compression(bytes(head)), reader.feed)
                inflater.feed(bytes(head))
            inflater.finish()
            reader.finish()
        except InvalidArchive as failure:
            error = failure
    writer.close()
    return error


class _HashingReader:
    """Reads and hashes `chunks` in a thread of its own, a few chunks ahead of the caller."""

    _END = object()

    def __init__(self, chunks: Iterator[bytes], on_progress: Callable[[int], None]) -> None:
        self._source = chunks
        self._on_progress = on_progress
        self._digest = hashlib.sha256()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=CHUNKS_IN_FLIGHT)
        self._failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="archive-reader", daemon=True)

    def chunks(self) -> Iterator[bytes]:
        """Every chunk, in order; the reader's failure is raised here."""
        self._thread.start()
        try:
            while (item := self._queue.get()) is not self._END:
                assert isinstance(item, bytes)
                yield item
        finally:
            self._stop.set()
            while self._thread.is_alive():  # unblock a reader waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                self._thread.join(timeout=0.05)
        if self._failure is not None:
            raise self._failure

    def hexdigest(self) -> str:
        return self._digest.hexdigest()

    def _read(self) -> None:
        done = 0
        try:
            for chunk in self._source:
                if self._stop.is_set():
                    return
                self._digest.update(chunk)
                done += len(chunk)
                self._on_progress(done)
                self._queue.put(chunk)
        except BaseException as failure:  # handed to the consuming thread
            self._failure = failure
        finally:
            self._queue.put(self._END)
