"""The embedded archive store (a local directory): refused and deleted uploads leave nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

from server.archives.stores import WRITEBACK_STEP_BYTES, LocalArchiveStore


async def test_an_aborted_upload_leaves_no_file_and_no_directory(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "archives")
    writer = await store.open_writer("tenant/model-id/archive")
    await writer.write(b"partial bytes")
    await writer.abort()
    assert list((tmp_path / "archives").iterdir()) == []


async def test_deleting_an_archive_prunes_its_directories_but_not_a_neighbours(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "archives")
    for key in ("tenant/kept/archive", "tenant/deleted/archive"):
        writer = await store.open_writer(key)
        await writer.write(b"bytes")
        await writer.complete()
    await store.delete("tenant/deleted/archive")
    assert [p.relative_to(tmp_path / "archives").as_posix() for p in sorted((tmp_path / "archives").rglob("*"))] == [
        "tenant", "tenant/kept", "tenant/kept/archive",
    ]


def test_archive_urls_name_the_key_not_the_servers_directories(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "archives")
    url = store.url_for("tenant/model-id/archive")
    assert url == "local-store:tenant/model-id/archive" and str(tmp_path) not in url


async def test_an_archive_written_past_several_early_writeback_steps_reads_back_byte_for_byte(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "archives")
    chunks = [bytes([index]) * (3 << 20) + b"tail-%d" % index for index in range(30)]  # ~90 MiB, odd sizes
    assert sum(map(len, chunks)) > 2 * WRITEBACK_STEP_BYTES
    writer = await store.open_writer("tenant/model-id/archive")
    for chunk in chunks:
        await writer.write(chunk)
    await writer.complete()
    stored = store.path_for("tenant/model-id/archive")
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(b"".join(chunks)).digest()
