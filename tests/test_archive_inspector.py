"""Unit tests: the streaming archive inspector on real archives, fed in awkward slices."""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from pathlib import Path

import pytest

from server.archives.compression import Compression
from server.archives.inspector import ArchiveInspector, ArchiveReport, InspectionLimits
from server.core.models import ModelFormat
from server.errors import InvalidArchive
from tests.support import model_files

LIMITS = InspectionLimits(max_unpacked_bytes=1 << 30, max_compression_ratio=200.0, max_members=1000)


def inspect(data: bytes, declared: ModelFormat, slice_bytes: int = 777, limits: InspectionLimits = LIMITS) -> ArchiveReport:
    inspector = ArchiveInspector(declared, limits)
    for start in range(0, len(data), slice_bytes):
        inspector.feed(data[start : start + slice_bytes])
    return inspector.finish()


@pytest.mark.parametrize(("compression", "expected"), [("gz", Compression.GZIP), ("", Compression.NONE), ("zst", Compression.ZSTD)])
@pytest.mark.parametrize("slice_bytes", [1, 511, 4096, 1 << 20])
def test_detects_compression_by_magic_whatever_the_slicing(compression: str, expected: Compression, slice_bytes: int) -> None:
    data = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, compression)
    report = inspect(data, ModelFormat.SAFETENSORS, slice_bytes)
    assert report.compression is expected
    assert report.weight_files == ["m/model.safetensors"]


def test_every_real_format_passes(tmp_path: Path) -> None:
    weights = model_files.reference_weights()
    cases = {
        ModelFormat.SAFETENSORS: model_files.write_safetensors(tmp_path / "st", weights).parent,
        ModelFormat.ONNX: model_files.write_onnx(tmp_path / "onnx")[0].parent,
        ModelFormat.PYTORCH: model_files.write_state_dict(tmp_path / "pt", model_files.tiny_net()).parent,
        ModelFormat.HUGGINGFACE: model_files.write_huggingface(tmp_path / "hf", weights),
    }
    for declared, directory in cases.items():
        archive = model_files.pack(directory, tmp_path / f"{declared}.tar.gz")
        assert inspect(archive.read_bytes(), declared).weight_files, declared
    torchscript = model_files.write_torchscript(tmp_path / "ts", model_files.tiny_net())
    assert inspect(model_files.pack(torchscript, tmp_path / "ts.tar").read_bytes(), ModelFormat.PYTORCH).weight_files


def test_pax_long_names_are_followed() -> None:
    long_dir = "d" * 150
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        payload = model_files.safetensors_bytes()
        info = tarfile.TarInfo(f"{long_dir}/model.safetensors")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    assert inspect(buffer.getvalue(), ModelFormat.SAFETENSORS).weight_files == [f"{long_dir}/model.safetensors"]


def _with_member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        payload = model_files.safetensors_bytes()
        ok = tarfile.TarInfo("m/model.safetensors")
        ok.size = len(payload)
        tar.addfile(ok, io.BytesIO(payload))
        tar.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "character device"), (tarfile.FIFOTYPE, "FIFO")],
)
def test_links_and_devices_are_refused(kind: bytes, fragment: str) -> None:
    info = tarfile.TarInfo("m/evil")
    info.type = kind
    info.linkname = "/etc/passwd"
    with pytest.raises(InvalidArchive, match=fragment):
        inspect(_with_member(info), ModelFormat.SAFETENSORS)


def test_truncated_archive_is_refused() -> None:
    data = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, "gz")
    with pytest.raises(InvalidArchive, match="truncated"):
        inspect(data[: len(data) // 2], ModelFormat.SAFETENSORS)


def test_corrupt_tar_header_is_refused() -> None:
    data = bytearray(model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}))
    data[10] ^= 0xFF
    with pytest.raises(InvalidArchive, match="checksum"):
        inspect(bytes(data), ModelFormat.SAFETENSORS)


def test_safetensors_whose_tensors_do_not_fill_the_file_is_refused() -> None:
    valid = model_files.safetensors_bytes()
    with pytest.raises(InvalidArchive, match="safetensors"):
        inspect(model_files.tar_bytes({"m/model.safetensors": valid + b"extra"}), ModelFormat.SAFETENSORS)


def test_safetensors_with_unknown_dtype_is_refused() -> None:
    header = json.dumps({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}).encode()
    body = len(header).to_bytes(8, "little") + header + bytes(16)
    with pytest.raises(InvalidArchive, match="unknown dtype"):
        inspect(model_files.tar_bytes({"m/model.safetensors": body}), ModelFormat.SAFETENSORS)


def test_decompression_bomb_is_stopped_by_the_ratio_limit() -> None:
    # 200 MiB of zeros in one member compresses about 1000x.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = tarfile.TarInfo("m/zeros.bin")
    header.size = 200 * 1024 * 1024
    chunks = [compressor.compress(header.tobuf()), compressor.compress(bytes(header.size)), compressor.flush()]
    with pytest.raises(InvalidArchive, match="decompression bomb"):
        inspect(b"".join(chunks), ModelFormat.PYTORCH, slice_bytes=64 * 1024)


def test_total_unpacked_size_limit_applies() -> None:
    limits = InspectionLimits(max_unpacked_bytes=100, max_compression_ratio=1e9, max_members=10)
    data = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()})
    with pytest.raises(InvalidArchive, match="more than 100 bytes"):
        inspect(data, ModelFormat.SAFETENSORS, limits=limits)


def test_too_many_members_is_refused() -> None:
    limits = InspectionLimits(max_unpacked_bytes=1 << 30, max_compression_ratio=200, max_members=3)
    data = model_files.tar_bytes({f"m/{i}.txt": b"x" for i in range(5)})
    with pytest.raises(InvalidArchive, match="more than 3 members"):
        inspect(data, ModelFormat.SAFETENSORS, limits=limits)


def test_empty_upload_is_refused() -> None:
    with pytest.raises(InvalidArchive, match="no archive bytes"):
        ArchiveInspector(ModelFormat.ONNX, LIMITS).finish()
