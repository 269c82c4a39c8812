"""Archive stores: where uploaded archives live. S3 (multipart) or a local directory.

Both stream: a writer takes chunks as they arrive and never holds more than its buffer
budget, and every writer can be aborted so that a failed or cancelled upload leaves no
bytes (and, on S3, no billable incomplete multipart upload) behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import uuid
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from server.dependencies import ArchiveStoreUnavailable, bounded
from server.errors import InvalidArgument

S3_MIN_PART_BYTES = 5 * 1024 * 1024


@dataclass(frozen=True)
class PendingUpload:
    """An upload a store started and never completed or aborted (for the janitor)."""

    key: str
    upload_id: str


class ArchiveWriter(Protocol):
    """One archive being written. Call `complete` or `abort` exactly once."""

    @property
    def upload_id(self) -> str: ...

    @property
    def peak_buffered_bytes(self) -> int:
        """Most archive bytes this writer held in memory at once."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def complete(self) -> None: ...

    async def abort(self) -> None: ...


class ArchiveStore(Protocol):
    """Where archives are kept. Keys are relative paths chosen by the service."""

    def url_for(self, key: str) -> str: ...

    async def open_writer(self, key: str) -> ArchiveWriter: ...

    async def delete(self, key: str) -> None: ...

    async def abort_pending(self, key: str, upload_id: str) -> None: ...

    async def list_pending(self, key: str = "") -> list[PendingUpload]:
        """Incomplete uploads; only those of `key` when it is given."""
        ...

    async def probe(self) -> None:
        """Raises unless the store answers (for the dependency monitor)."""
        ...


class S3ArchiveStore:
    """Archives in an S3 bucket, written with multipart uploads of bounded memory."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str,
        part_bytes: int,
        parts_in_flight: int,
        request_timeout_seconds: float = 30.0,
    ) -> None:
        if part_bytes < S3_MIN_PART_BYTES:
            raise InvalidArgument(f"S3 parts must be at least {S3_MIN_PART_BYTES} bytes")
        self._client = client
        self._bucket = bucket
        self._prefix = prefix
        self._part_bytes = part_bytes
        self._parts_in_flight = max(1, parts_in_flight)
        self._timeout = request_timeout_seconds

    async def _request(self, call: Awaitable[Any]) -> Any:
        """One S3 request, bounded in time whatever the client's own timeouts do (a PUT
        whose peer stopped reading blocks on the write, where read timeouts do not apply)."""
        return await bounded(
            call, self._timeout,
            ArchiveStoreUnavailable(f"the archive store did not answer within {self._timeout:g}s; retry shortly", dependency="s3"),
        )

    async def probe(self) -> None:
        await self._request(self._client.head_bucket(Bucket=self._bucket))

    @property
    def bucket(self) -> str:
        return self._bucket

    def object_key(self, key: str) -> str:
        return self._prefix + key

    def url_for(self, key: str) -> str:
        return f"s3://{self._bucket}/{self.object_key(key)}"

    async def ensure_bucket(self, region: str) -> None:
        """Creates the bucket if it does not exist (convenient for development stores)."""
        try:
            await self._client.head_bucket(Bucket=self._bucket)
        except self._client.exceptions.ClientError:
            if region and region != "us-east-1":  # us-east-1 refuses an explicit constraint
                await self._client.create_bucket(
                    Bucket=self._bucket, CreateBucketConfiguration={"LocationConstraint": region}
                )
            else:
                await self._client.create_bucket(Bucket=self._bucket)

    async def open_writer(self, key: str) -> ArchiveWriter:
        created = await self._request(self._client.create_multipart_upload(Bucket=self._bucket, Key=self.object_key(key)))
        return _S3MultipartWriter(
            self._client,
            self._bucket,
            self.object_key(key),
            created["UploadId"],
            part_bytes=self._part_bytes,
            parts_in_flight=self._parts_in_flight,
            request=self._request,
        )

    async def delete(self, key: str) -> None:
        await self._request(self._client.delete_object(Bucket=self._bucket, Key=self.object_key(key)))

    async def abort_pending(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(self._client.exceptions.NoSuchUpload):
            await self._request(
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self.object_key(key), UploadId=upload_id)
            )

    async def list_pending(self, key: str = "") -> list[PendingUpload]:
        pending: list[PendingUpload] = []
        paginator = self._client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix + key):
            for upload in page.get("Uploads", []):
                found = upload["Key"].removeprefix(self._prefix)
                if not key or found == key:
                    pending.append(PendingUpload(key=found, upload_id=upload["UploadId"]))
        return pending


class _S3MultipartWriter:
    """Cuts the stream into parts; at most `parts_in_flight` upload at once.

    Memory held: the part being filled (at most one part) plus the parts in flight, so
    at most (parts_in_flight + 1) x part_bytes whatever the archive's size. A writer
    that has a full part and no free slot waits, which slows the client (backpressure).
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        object_key: str,
        upload_id: str,
        *,
        part_bytes: int,
        parts_in_flight: int,
        request: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> None:
        self._client = client
        self._request = request
        self._bucket = bucket
        self._key = object_key
        self._upload_id = upload_id
        self._part_bytes = part_bytes
        self._slots = asyncio.Semaphore(parts_in_flight)
        self._buffer = bytearray()
        self._in_flight_bytes = 0
        self._peak = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._etags: dict[int, str] = {}

    @property
    def upload_id(self) -> str:
        return self._upload_id

    @property
    def peak_buffered_bytes(self) -> int:
        return self._peak

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self._part_bytes - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            self._note_buffered()
            if len(self._buffer) == self._part_bytes:
                await self._send_part()

    async def complete(self) -> None:
        if self._buffer or not self._tasks:
            await self._send_part()  # the last part may be short (or empty for an empty file)
        await asyncio.gather(*self._tasks)
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        await self._request(
            self._client.complete_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
        )

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._buffer = bytearray()
        with contextlib.suppress(self._client.exceptions.NoSuchUpload):
            await self._request(
                self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
            )

    async def _send_part(self) -> None:
        await self._slots.acquire()
        self._raise_failed_part()
        part, self._buffer = bytes(self._buffer), bytearray()
        self._in_flight_bytes += len(part)
        part_number = len(self._tasks) + 1
        self._tasks.append(asyncio.create_task(self._upload_part(part_number, part)))

    async def _upload_part(self, part_number: int, part: bytes) -> None:
        try:
            response = await self._request(
                self._client.upload_part(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=part_number, Body=part
                )
            )
            self._etags[part_number] = response["ETag"]
        finally:
            self._in_flight_bytes -= len(part)
            self._slots.release()

    def _raise_failed_part(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    def _note_buffered(self) -> None:
        self._peak = max(self._peak, len(self._buffer) + self._in_flight_bytes)


LOCAL_STORE_SCHEME = "local-store"


class LocalArchiveStore:
    """Archives as files under a directory: the embedded default, for one machine.

    A writer fills `<key>.partial-<id>` and renames it into place on completion, so a
    reader never sees half an archive.
    """

    _PARTIAL = ".partial-"

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    def path_for(self, key: str) -> Path:
        path = (self._root / key).resolve()
        if not path.is_relative_to(self._root):
            raise InvalidArgument("archive key escapes the store", key=key)
        return path

    def url_for(self, key: str) -> str:
        """`local-store:<key>`: where the server keeps its files is not the tenant's to see."""
        return f"{LOCAL_STORE_SCHEME}:{key}"

    async def probe(self) -> None:
        def writable() -> None:
            self._root.mkdir(parents=True, exist_ok=True)
            if not os.access(self._root, os.W_OK):
                raise PermissionError(f"{self._root} is not writable")

        await asyncio.to_thread(writable)

    async def open_writer(self, key: str) -> ArchiveWriter:
        final = self.path_for(key)
        upload_id = uuid.uuid4().hex
        partial = final.with_name(final.name + self._PARTIAL + upload_id)
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        handle = await asyncio.to_thread(partial.open, "xb")
        return _LocalFileWriter(handle, partial, final, upload_id, self._root)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._remove, self.path_for(key))

    async def abort_pending(self, key: str, upload_id: str) -> None:
        final = self.path_for(key)
        await asyncio.to_thread(self._remove, final.with_name(final.name + self._PARTIAL + upload_id))

    def _remove(self, path: Path) -> None:
        """Removes a file and the directories it leaves empty (up to the store's root)."""
        path.unlink(missing_ok=True)
        prune_empty_parents(path, self._root)

    async def list_pending(self, key: str = "") -> list[PendingUpload]:
        def scan() -> list[PendingUpload]:
            found = []
            for partial in self._root.rglob(f"*{self._PARTIAL}*"):
                name, _, upload_id = partial.name.partition(self._PARTIAL)
                partial_key = str(partial.with_name(name).relative_to(self._root))
                if not key or partial_key == key:
                    found.append(PendingUpload(key=partial_key, upload_id=upload_id))
            return found

        if not self._root.exists():
            return []
        return await asyncio.to_thread(scan)


def prune_empty_parents(path: Path, root: Path) -> None:
    """Removes the empty directories from `path`'s parent up to (not including) `root`."""
    directory = path.parent
    while directory != root and directory.is_relative_to(root):
        try:
            directory.rmdir()
        except OSError:  # not empty (another upload's files), or already gone
            return
        directory = directory.parent


WRITEBACK_STEP_BYTES = 32 * 1024 * 1024
"""The local writer asks the kernel to start writing every this many bytes to disk."""


def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """`sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)` where the C library has
    it (Linux): starts writing a range to disk without waiting for it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    sync_file_range_write = 2

    def start(fd: int, offset: int, length: int) -> None:
        call(fd, offset, length, sync_file_range_write)  # advisory: a failure only means a longer fsync

    return start


_start_writeback = _writeback_starter()


class _LocalFileWriter:
    """Writes straight to the partial file, and has the kernel write each 32 MiB to disk
    as soon as it is complete: the fsync at the end then waits for the last few MiB, not
    for the whole archive (the kernel on its own would start only at its dirty-memory
    threshold, gigabytes later)."""

    def __init__(self, handle: Any, partial: Path, final: Path, upload_id: str, root: Path) -> None:
        self._handle = handle
        self._partial = partial
        self._final = final
        self._upload_id = upload_id
        self._root = root
        self._peak = 0
        self._written = 0
        self._writeback_from = 0

    @property
    def upload_id(self) -> str:
        return self._upload_id

    @property
    def peak_buffered_bytes(self) -> int:
        return self._peak

    async def write(self, data: bytes) -> None:
        self._peak = max(self._peak, len(data))
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self._written += len(data)
        if _start_writeback is not None and self._written - self._writeback_from >= WRITEBACK_STEP_BYTES:
            self._handle.flush()
            _start_writeback(self._handle.fileno(), self._writeback_from, self._written - self._writeback_from)
            self._writeback_from = self._written

    async def complete(self) -> None:
        def finish() -> None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._partial, self._final)

        await asyncio.to_thread(finish)

    async def abort(self) -> None:
        def discard() -> None:
            self._handle.close()
            self._partial.unlink(missing_ok=True)
            prune_empty_parents(self._partial, self._root)

        await asyncio.to_thread(discard)
