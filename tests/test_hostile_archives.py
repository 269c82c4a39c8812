"""Unit tests: every case of the hostile corpus is refused, by the rule named in `check`,
at upload (the streaming inspector) and again at deploy (the extractor reads the same way)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from server.archives.inspector import ArchiveInspector, InspectionLimits
from server.core.models import ModelFormat
from server.deploy.extraction import Extraction, extract_archive, extract_mapped_archive, map_local_archive
from server.deploy.specs import LOCAL_STORE, StoreConfig
from server.errors import InvalidArchive
from tests.support import hostile

LIMITS = InspectionLimits(max_unpacked_bytes=1 << 30, max_compression_ratio=1e9, max_members=1000)


def _inspect(data: bytes, declared: ModelFormat = ModelFormat.SAFETENSORS, slice_bytes: int = 64 * 1024) -> None:
    inspector = ArchiveInspector(declared, LIMITS)
    for start in range(0, len(data), slice_bytes):
        inspector.feed(data[start : start + slice_bytes])
    inspector.finish()


def _refused_check(data: bytes, declared: ModelFormat = ModelFormat.SAFETENSORS) -> str:
    with pytest.raises(InvalidArchive) as refused:
        _inspect(data, declared)
    return refused.value.details["check"]


CORPUS: dict[str, tuple[Callable[[], bytes], str]] = {
    "zeros_after_the_end_marker": (lambda: hostile.zeros_after_end_marker(8 << 20), "trailing_data"),
    "many_pax_global_headers": (lambda: hostile.many_pax_global_headers(1500), "extended_header"),
    "second_gzip_stream_hiding_traversal": (hostile.second_gzip_stream_with_traversal, "gzip_trailing_data"),
    "junk_after_the_tar": (hostile.junk_after_tar, "trailing_data"),
    "zip_after_the_tar": (hostile.zip_after_tar, "trailing_data"),
    "truncated_zstd_frame": (hostile.truncated_zstd, "zstd"),
    "pax_negative_size": (hostile.pax_negative_size, "extended_header"),
    "duplicate_member_names": (hostile.duplicate_member_names, "duplicate_member"),
    "file_then_directory_of_the_same_name": (hostile.file_then_directory_of_the_same_name, "duplicate_member"),
    "control_character_in_a_path": (hostile.control_character_in_path, "member_path"),
    "base256_negative_size": (hostile.base256_negative_size, "tar"),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_archive_is_refused_at_upload_by_its_rule(case: str) -> None:
    build, check = CORPUS[case]
    assert _refused_check(build()) == check


def _extract_streamed(archive: Path, destination: Path) -> Extraction:
    """As from S3: the archive arrives in chunks."""
    data = archive.read_bytes()
    return extract_archive(
        iter([data[i : i + 65536] for i in range(0, len(data), 65536)]), destination,
        max_unpacked_bytes=1 << 30, max_members=1000, on_progress=lambda _: None,
    )


def _extract_mapped(archive: Path, destination: Path) -> Extraction:
    """As from the local store: the archive file mapped, its tar unpacked in place."""
    store = StoreConfig(kind=LOCAL_STORE, local_root=str(archive.parent))
    mapped = map_local_archive(store, archive.name)
    assert mapped is not None
    return extract_mapped_archive(mapped, destination, max_unpacked_bytes=1 << 30, max_members=1000, on_progress=lambda _: None)


@pytest.mark.parametrize("extract", [_extract_streamed, _extract_mapped], ids=["streamed", "mapped"])
@pytest.mark.parametrize("case", sorted(CORPUS))
def test_hostile_archive_is_refused_at_deploy_and_nothing_lands_outside(
    case: str, extract: Callable[[Path, Path], Extraction], tmp_path: Path
) -> None:
    build, check = CORPUS[case]
    archive = tmp_path / "store" / "archive"
    archive.parent.mkdir()
    archive.write_bytes(build())
    destination = tmp_path / "scratch" / "model"
    destination.mkdir(parents=True)
    extraction = extract(archive, destination)
    assert extraction.error is not None and extraction.error.details["check"] == check
    assert not (tmp_path / "scratch" / "escaped").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("case", sorted(hostile.HOSTILE_SAFETENSORS_HEADERS))
def test_odd_but_valid_json_in_a_safetensors_header_is_a_clean_refusal(case: str) -> None:
    data = hostile.safetensors_with_header(hostile.HOSTILE_SAFETENSORS_HEADERS[case])
    with pytest.raises(InvalidArchive) as refused:
        _inspect(data)
    assert refused.value.details["check"] == "safetensors"
    assert refused.value.details["member"].startswith("m/model.safetensors")


@pytest.mark.parametrize(
    "config",
    [b'{"n": ' + b"1" * 5000 + b"}", b'{"a": ' + b"[" * 3000 + b"]" * 3000 + b"}", b"[1, 2]", b"\xff\xfe", b'{"a": '],
    ids=["huge_integer", "deep_nesting", "not_an_object", "not_utf8", "truncated"],
)
def test_hostile_config_json_is_a_clean_refusal_naming_the_member(config: bytes) -> None:
    with pytest.raises(InvalidArchive) as refused:
        _inspect(hostile.huggingface_with_config(config), ModelFormat.HUGGINGFACE)
    assert refused.value.details["check"] == "config_json"
    assert refused.value.details["member"] == "m/config.json"


def test_many_config_files_keep_no_parsed_documents_in_memory() -> None:
    data = hostile.many_huggingface_configs(count=200, config_bytes=200_000)
    tracemalloc.start()
    try:
        _inspect(data, ModelFormat.HUGGINGFACE, slice_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 40 MB of configs pass through; what stays is one config at a time plus a slice.
    assert peak < 12 * 1024 * 1024, peak


def test_padding_after_the_end_marker_within_budget_is_accepted() -> None:
    _inspect(hostile.zeros_after_end_marker(0))  # tar's own record padding
