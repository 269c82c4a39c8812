"""Unit tests: the two ways a deploy reads an archive (streamed from S3, mapped from the
local store) agree, and the mapped one copies no weights."""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path

import numpy as np
import pytest

from server.deploy.decoding import decode_model
from server.deploy.extraction import Extraction, extract_archive, extract_mapped_archive, map_local_archive
from server.deploy.specs import LOCAL_STORE, StoreConfig
from tests.support import model_files
from tests.support.uploads import build_model_archive

LIMITS = {"max_unpacked_bytes": 1 << 30, "max_members": 1000}


def _streamed(archive: Path, destination: Path) -> Extraction:
    data = archive.read_bytes()
    chunks = iter([data[i : i + 100_000] for i in range(0, len(data), 100_000)])
    return extract_archive(chunks, destination, on_progress=lambda _: None, **LIMITS)


def _mapped(archive: Path, destination: Path) -> Extraction:
    mapped = map_local_archive(StoreConfig(kind=LOCAL_STORE, local_root=str(archive.parent)), archive.name)
    assert mapped is not None
    return extract_mapped_archive(mapped, destination, on_progress=lambda _: None, **LIMITS)


@pytest.mark.parametrize("compression", ["", "gz", "zst"])
def test_streamed_and_mapped_extraction_give_the_same_digest_and_the_same_tensors(compression: str, tmp_path: Path) -> None:
    archive = build_model_archive(tmp_path, "huggingface", compression=compression)
    expected_sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    decoded = []
    for name, extract in (("streamed", _streamed), ("mapped", _mapped)):
        destination = tmp_path / name
        destination.mkdir()
        extraction = extract(archive, destination)
        assert extraction.error is None and extraction.sha256 == expected_sha256
        decoded.append(decode_model(destination, "m", "huggingface", extraction.sha256, max_unpacked_bytes=1 << 30, in_memory=extraction.in_memory))
    streamed, mapped = decoded
    assert sorted(streamed.tensors) == sorted(mapped.tensors) == sorted(model_files.reference_weights())
    for name, tensor in streamed.tensors.items():
        np.testing.assert_array_equal(tensor, mapped.tensors[name])


def test_a_mapped_uncompressed_tar_keeps_its_weights_where_they_lie_in_the_archive(tmp_path: Path) -> None:
    archive = build_model_archive(tmp_path, "safetensors", compression="")
    destination = tmp_path / "scratch"
    destination.mkdir()
    extraction = _mapped(archive, destination)
    assert extraction.error is None and [p for p in destination.rglob("*") if p.is_file()] == []  # no file in scratch
    (member,) = extraction.in_memory.values()
    assert isinstance(member, memoryview) and isinstance(member.obj, mmap.mmap) and member.readonly
    assert bytes(member) in archive.read_bytes()  # a window on the archive's own bytes


def test_a_mapped_tar_whose_bytes_changed_after_upload_hashes_to_something_else(tmp_path: Path) -> None:
    archive = build_model_archive(tmp_path, "safetensors", compression="")
    recorded = hashlib.sha256(archive.read_bytes()).hexdigest()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    destination = tmp_path / "scratch"
    destination.mkdir()
    assert _mapped(archive, destination).sha256 != recorded
