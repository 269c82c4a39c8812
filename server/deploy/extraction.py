"""Streams an archive from the store to a scratch directory, hashing it on the way.

Runs inside a Ray task. The same tar reader and inflaters as upload inspection are used,
so the same hostile-archive rules apply (no links, no absolute paths, no `..`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from server.archives.compression import SNIFF_BYTES, Inflater, detect_compression, make_inflater
from server.archives.tar_stream import MemberHandler, TarMember, TarStreamReader
from server.deploy.specs import LOCAL_STORE, StoreConfig

READ_CHUNK = 8 * 1024 * 1024


def read_archive(store: StoreConfig, archive_key: str) -> Iterator[bytes]:
    """The stored archive's bytes, in chunks (a synchronous read for Ray workers)."""
    if store.kind == LOCAL_STORE:
        path = Path(store.local_root) / archive_key
        with path.open("rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                yield chunk
        return
    import boto3

    client: Any = boto3.client("s3", endpoint_url=store.endpoint_url or None, region_name=store.region or None)
    body = client.get_object(Bucket=store.bucket, Key=store.prefix + archive_key)["Body"]
    try:
        yield from body.iter_chunks(READ_CHUNK)
    finally:
        body.close()


class _DiskWriter(MemberHandler):
    def __init__(self, root: Path) -> None:
        self._root = root
        self._handle: IO[bytes] | None = None

    def on_member_start(self, member: TarMember) -> None:
        target = self._root / member.path
        if member.is_directory:
            target.mkdir(parents=True, exist_ok=True)
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        self._handle = target.open("wb")

    def on_member_data(self, data: memoryview) -> None:
        if self._handle is not None:
            self._handle.write(data)

    def on_member_end(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def extract_archive(
    chunks: Iterator[bytes],
    destination: Path,
    *,
    max_unpacked_bytes: int,
    max_members: int,
    on_progress: Callable[[int], None],
) -> str:
    """Extracts the archive into `destination` and returns the sha256 of its bytes."""
    digest = hashlib.sha256()
    unpacked = 0

    def count(size: int) -> None:
        nonlocal unpacked
        unpacked += size
        if unpacked > max_unpacked_bytes:
            raise ValueError(f"the archive unpacks to more than {max_unpacked_bytes} bytes")

    reader = TarStreamReader(
        _DiskWriter(destination), max_members=max_members, max_member_bytes=max_unpacked_bytes,
        on_unpacked_bytes=count,
    )
    inflater: Inflater | None = None
    head = bytearray()
    done = 0
    for chunk in chunks:
        digest.update(chunk)
        done += len(chunk)
        if inflater is None:
            head += chunk
            if len(head) < SNIFF_BYTES:
                continue
            inflater = make_inflater(detect_compression(bytes(head)), reader.feed)
            inflater.feed(bytes(head))
            head.clear()
        else:
            inflater.feed(chunk)
        on_progress(done)
    if inflater is None:
        inflater = make_inflater(detect_compression(bytes(head)), reader.feed)
        inflater.feed(bytes(head))
    inflater.finish()
    reader.finish()
    on_progress(done)
    return digest.hexdigest()
