"""A hostile-archive corpus, built by the tests themselves.

Each builder returns the bytes a hostile tenant would upload; the tests feed them to the
inspector (upload), the extractor and the decoders (deploy) and check which rule refused
them. Sizes are kept small: each rule trips on a budget long before real harm is done.
"""

from __future__ import annotations

import io
import json
import tarfile
import zlib
from collections.abc import Iterable

import zstandard

from tests.support import model_files


def _tar(entries: Iterable[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def valid_safetensors_tar() -> bytes:
    return _tar([file("m/model.safetensors", model_files.safetensors_bytes())])


def zeros_after_end_marker(zero_bytes: int) -> bytes:
    """A tiny .tar.gz that inflates to `zero_bytes` of zeros after the end marker."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(valid_safetensors_tar())]
    block = bytes(1 << 20)
    for _ in range(zero_bytes // len(block)):
        parts.append(compressor.compress(block))
    parts.append(compressor.flush())
    return b"".join(parts)


def many_pax_global_headers(count: int) -> bytes:
    """`count` pax global headers before one valid member."""
    buffer = io.BytesIO()
    for index in range(count):
        info = tarfile.TarInfo(f"pax_global_header_{index}")
        info.type = tarfile.XGLTYPE
        payload = _pax_record("comment", f"global {index}")
        info.size = len(payload)
        buffer.write(info.tobuf(format=tarfile.USTAR_FORMAT))
        buffer.write(payload + bytes(-len(payload) % 512))
    buffer.write(valid_safetensors_tar())
    return buffer.getvalue()


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def second_gzip_stream_with_traversal() -> bytes:
    """A valid .tar.gz followed by a second gzip stream holding `../escaped`."""
    first = model_files.tar_bytes({"m/model.safetensors": model_files.safetensors_bytes()}, "gz")
    second = model_files.tar_bytes({"../escaped": b"pwned"}, "gz")
    return first + second


def junk_after_tar() -> bytes:
    return valid_safetensors_tar() + b"junk that is not padding"


def zip_after_tar() -> bytes:
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../etc/cron.d/evil", "* * * * * root true")
    return valid_safetensors_tar() + buffer.getvalue()


def truncated_zstd() -> bytes:
    whole = zstandard.ZstdCompressor().compress(valid_safetensors_tar())
    return whole[:-3]


def pax_negative_size() -> bytes:
    info = tarfile.TarInfo("m/model.safetensors")
    info.pax_headers = {"size": "-512"}
    return _tar([(info, model_files.safetensors_bytes())])


def duplicate_member_names() -> bytes:
    good = model_files.safetensors_bytes()
    other = model_files.safetensors_bytes(seed=1)
    return _tar([file("m/model.safetensors", good), file("m/model.safetensors", other)])


def file_then_directory_of_the_same_name() -> bytes:
    return _tar([file("m/model.safetensors", model_files.safetensors_bytes()), file("m/x", b"1"), file("m/x/y", b"2")])


def control_character_in_path() -> bytes:
    return _tar([file("m/model.safetensors", model_files.safetensors_bytes()), file("m/evil\nname", b"1")])


def base256_negative_size() -> bytes:
    data = bytearray(valid_safetensors_tar())
    header = bytearray(data[:512])
    header[124:136] = b"\xff" * 12
    header[148:156] = b"        "
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    data[:512] = header
    return bytes(data)


def safetensors_with_header(header: str | bytes) -> bytes:
    raw = header if isinstance(header, bytes) else header.encode()
    return _tar([file("m/model.safetensors", len(raw).to_bytes(8, "little") + raw)])


HOSTILE_SAFETENSORS_HEADERS: dict[str, str | bytes] = {
    "dtype_is_a_list": json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}),
    "five_thousand_digit_integer": '{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}',
    "deep_nesting": '{"__metadata__": ' + "[" * 5000 + "]" * 5000 + "}",
    "boolean_dimension": json.dumps({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}),
    "invalid_utf8": b'{"w\xff": 1}',
}


def huggingface_with_config(config_text: bytes) -> bytes:
    return _tar([file("m/config.json", config_text), file("m/model.safetensors", model_files.safetensors_bytes())])


def many_huggingface_configs(count: int, config_bytes: int) -> bytes:
    """`count` directories each holding a config.json of about `config_bytes`."""
    config = json.dumps({"padding": "x" * config_bytes}).encode()
    entries = [file(f"m/{index}/config.json", config) for index in range(count)]
    entries.append(file("m/model.safetensors", model_files.safetensors_bytes()))
    entries.append(file("m/config.json", b"{}"))
    return _tar(entries)
