"""What proves an archive holds the declared format, gathered while members stream by.

Only small heads of the relevant files are kept: a safetensors file's JSON header (checked
against the file's size, tensor by tensor), a `config.json`, the first bytes of ONNX and
PyTorch files. Deep checks that need the whole weights (unpickling with
`weights_only=True`, building an ONNX session) happen at deploy time, on Ray.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np

from server.archives.json_documents import parse_json_object
from server.archives.tar_stream import TarMember
from server.core.models import ModelFormat
from server.errors import InvalidArchive

SAFETENSORS_SUFFIX = ".safetensors"
ONNX_SUFFIX = ".onnx"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
HF_CONFIG = "config.json"
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
MAX_SAFETENSORS_DIMENSIONS = 16
MAX_CONFIG_BYTES = 1024 * 1024
_HEAD_BYTES = 64

#: numpy dtype of each safetensors dtype (little-endian), and the name of the real dtype
#: for those numpy lacks (kept as same-width integer bit views).
SAFETENSORS_NUMPY_DTYPES: dict[str, tuple[str, str | None]] = {
    "BOOL": ("?", None), "U8": ("u1", None), "I8": ("i1", None),
    "U16": ("<u2", None), "I16": ("<i2", None), "F16": ("<f2", None),
    "U32": ("<u4", None), "I32": ("<i4", None), "F32": ("<f4", None),
    "U64": ("<u8", None), "I64": ("<i8", None), "F64": ("<f8", None),
    "BF16": ("<i2", "bfloat16"), "F8_E4M3": ("u1", "float8_e4m3fn"), "F8_E5M2": ("u1", "float8_e5m2"),
}
#: Bytes per element of every safetensors dtype.
SAFETENSORS_DTYPE_BYTES = {name: np.dtype(spec[0]).itemsize for name, spec in SAFETENSORS_NUMPY_DTYPES.items()}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_MARK = 0x80


@dataclass
class _Member:
    path: str
    size: int
    wanted: int
    head: bytearray = field(default_factory=bytearray)


class FormatEvidence:
    """Collects member heads for the format checks.

    Memory stays bounded: a member's head is dropped once checked, and what is kept per
    member is a path of the weight files and of the directories holding a config.json
    (the verdict needs nothing more).
    """

    def __init__(self, declared: ModelFormat) -> None:
        self.declared = declared
        self.file_count = 0
        self.weight_paths: list[str] = []
        self.safetensors_files: list[str] = []
        self.onnx_files: list[str] = []
        self.torch_files: list[str] = []
        self.config_directories: set[str] = set()
        self.object_store_bytes = 0
        """What the deployed weights will take in Ray's object store (see `_object_store_share`)."""
        self._current: _Member | None = None

    def start_member(self, member: TarMember) -> None:
        if member.is_directory:
            return
        self.file_count += 1
        name = posixpath.basename(member.path)
        if name.endswith(SAFETENSORS_SUFFIX):
            wanted = 8  # grows to 8 + header length once the length is read
        elif name == HF_CONFIG:
            if member.size > MAX_CONFIG_BYTES:
                raise InvalidArchive(
                    f"{member.path} is larger than {MAX_CONFIG_BYTES} bytes",
                    check="config_json", member=member.path,
                )
            wanted = member.size
        elif name.endswith(ONNX_SUFFIX) or name.endswith(TORCH_SUFFIXES):
            wanted = _HEAD_BYTES
        else:
            wanted = 0
        self._current = _Member(member.path, member.size, wanted)
        if member.size == 0:
            self.end_member()

    def member_data(self, data: memoryview) -> None:
        current = self._current
        if current is None:
            return
        offset = 0
        while offset < len(data) and len(current.head) < current.wanted:
            take = current.wanted - len(current.head)
            current.head += data[offset : offset + take]
            offset += take
            if current.path.endswith(SAFETENSORS_SUFFIX) and current.wanted == 8 == len(current.head):
                # The 8-byte length prefix is in: now keep the JSON header that follows.
                header_length = int.from_bytes(current.head, "little")
                if header_length > MAX_SAFETENSORS_HEADER:
                    raise InvalidArchive(
                        f"{current.path}: the safetensors header declares {header_length} bytes, "
                        f"more than the {MAX_SAFETENSORS_HEADER} allowed",
                        check="safetensors", member=current.path,
                    )
                current.wanted = 8 + header_length

    def end_member(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        name = posixpath.basename(current.path)
        directory = posixpath.dirname(current.path)
        head = bytes(current.head)
        self.object_store_bytes += _object_store_share(self.declared, name, current.size, head)
        if name.endswith(SAFETENSORS_SUFFIX):
            validate_safetensors_header(current.path, head, current.size)
            self.safetensors_files.append(current.path)
            self.weight_paths.append(current.path)
        elif name == HF_CONFIG:
            parse_json_object(head, member=current.path, check="config_json")
            self.config_directories.add(directory)
        elif name.endswith(ONNX_SUFFIX):
            if _looks_like_onnx(head):
                self.onnx_files.append(current.path)
                self.weight_paths.append(current.path)
            elif self.declared is ModelFormat.ONNX:
                raise InvalidArchive(
                    f"{current.path} is not an ONNX model (no ModelProto header)",
                    check="onnx", member=current.path,
                )
        elif name.endswith(TORCH_SUFFIXES):
            if _looks_like_torch(head):
                self.torch_files.append(current.path)
                self.weight_paths.append(current.path)
            elif self.declared in (ModelFormat.PYTORCH, ModelFormat.HUGGINGFACE):
                raise InvalidArchive(
                    f"{current.path} is neither a torch.save zip nor a pickle",
                    check="pytorch", member=current.path,
                )


def _object_store_share(declared: ModelFormat, name: str, size: int, head: bytes) -> int:
    """Bytes a member adds to the deployed model in the object store: exact for
    safetensors (its tensor data), an upper bound otherwise.

    ONNX models and TorchScript modules are kept twice (their tensors as arrays, and the
    model's own bytes for plugins' sessions), and an ONNX model's external data files are
    folded into its bytes; a Hugging Face directory keeps its small companion files.
    """
    if name.endswith(SAFETENSORS_SUFFIX):
        header_length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
        return max(0, size - 8 - header_length)
    if declared is ModelFormat.SAFETENSORS:
        return 0  # only .safetensors files are decoded
    if declared is ModelFormat.ONNX:
        return 2 * size
    if declared is ModelFormat.PYTORCH:
        return 2 * size if name.endswith(TORCH_SUFFIXES) else 0
    if name.endswith(ONNX_SUFFIX):
        return 0  # not decoded in a Hugging Face directory
    return size  # Hugging Face: state_dict weights, and companion files kept as bytes


def check_format(evidence: FormatEvidence) -> None:
    """Raises InvalidArchive unless the archive holds what its declared format needs."""
    declared = evidence.declared
    if declared is ModelFormat.SAFETENSORS and not evidence.safetensors_files:
        _missing(declared, "no .safetensors file")
    if declared is ModelFormat.ONNX and not evidence.onnx_files:
        _missing(declared, "no .onnx file")
    if declared is ModelFormat.PYTORCH and not evidence.torch_files:
        _missing(declared, "no PyTorch file (.pt, .pth, .bin, .ckpt)")
    if declared is ModelFormat.HUGGINGFACE:
        if not evidence.config_directories:
            _missing(declared, f"no {HF_CONFIG}")
        weights = evidence.safetensors_files + evidence.torch_files
        if not any(_has_config_above(weight, evidence.config_directories) for weight in weights):
            _missing(declared, f"no weights (.safetensors or .bin) beside {HF_CONFIG}")


def validate_safetensors_header(path: str, head: bytes, file_size: int) -> dict[str, object]:
    """Checks a safetensors header against the file size; returns the parsed header."""
    if len(head) < 8:
        _bad_safetensors(path, "the file is shorter than its 8-byte header length")
    header_length = int.from_bytes(head[:8], "little")
    if len(head) < 8 + header_length or file_size < 8 + header_length:
        _bad_safetensors(path, "the file ends inside its header")
    header = parse_json_object(head[8 : 8 + header_length], member=f"{path}'s header", check="safetensors")
    parsed: dict[str, object] = header
    data_size = file_size - 8 - header_length
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            _bad_safetensors(path, f"tensor {name!r} has no description")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
            _bad_safetensors(path, f"tensor {name!r} has an unknown dtype")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_SAFETENSORS_DIMENSIONS
            and all(type(d) is int and d >= 0 for d in shape)
        ):
            _bad_safetensors(path, f"tensor {name!r} has a bad shape")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            _bad_safetensors(path, f"tensor {name!r} has bad data_offsets")
        expected = math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != expected:
            _bad_safetensors(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape needs {expected}")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            _bad_safetensors(path, "tensor data overlaps or leaves gaps")
        position = end
    if position != data_size:
        _bad_safetensors(
            path, f"the tensors cover {position} bytes but the file holds {data_size} after its header"
        )
    return parsed


def _bad_safetensors(path: str, why: str) -> NoReturn:
    raise InvalidArchive(f"{path} is not a valid safetensors file: {why}", check="safetensors", member=path)


def _looks_like_onnx(head: bytes) -> bool:
    # A serialized ModelProto starts with field 1 (ir_version, varint): tag byte 0x08,
    # followed by a small version number. Nothing else in our accepted set starts so.
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 64


def _looks_like_torch(head: bytes) -> bool:
    # torch.save (and TorchScript) write a zip; the legacy format is a pickle.
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == _PICKLE_PROTOCOL_MARK and 2 <= head[1] <= 5)


def _has_config_above(path: str, config_directories: set[str]) -> bool:
    """Whether a directory holding `path` (at any depth) also holds a config.json."""
    directory = posixpath.dirname(path)
    while True:
        if directory in config_directories:
            return True
        if not directory:
            return False
        directory = posixpath.dirname(directory)


def _missing(declared: ModelFormat, what: str) -> NoReturn:
    raise InvalidArchive(
        f"the archive does not hold a {declared.value} model: {what}",
        check="format", model_format=declared.value,
    )
