"""Decodes an extracted model directory into contiguous numpy arrays, by format.

Numpy, not torch tensors: Ray hands numpy arrays out of its object store zero-copy, while
torch tensors are copied on every get.

Everything here runs in the load task, in the service's trust domain, so a model is DATA:
PyTorch pickles load with `weights_only=True`; TorchScript tensors are read by a restricted
reader that runs none of the module's code (`torchscript_reader`); ONNX external data and
any other path named inside a model resolve only to that model's own extracted files
(`confined_file`).
"""

from __future__ import annotations

import mmap
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from modelservice_sdk.model import BIT_VIEW_DTYPES, NamespaceModel
from server.archives.formats import (
    HF_CONFIG,
    MAX_SAFETENSORS_HEADER,
    ONNX_SUFFIX,
    SAFETENSORS_NUMPY_DTYPES,
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    validate_safetensors_header,
)
from server.core.models import ModelFormat
from server.deploy.errors import DecodeError
from server.deploy.torchscript_reader import TorchScriptArchive, is_torchscript
from server.errors import InvalidArchive

MAX_COMPANION_FILE_BYTES = 16 * 1024 * 1024


MAX_COMPANION_FILES_TOTAL_BYTES = 64 * 1024 * 1024
MAX_COMPANION_FILES = 1000
DEFAULT_MAX_UNPACKED_BYTES = 256 * 1024 * 1024 * 1024

__all__ = ["DecodeError", "confined_file", "decode_model"]

Buffer = mmap.mmap | bytes | bytearray | memoryview
"""The bytes of a member unpacked into memory."""


def decode_model(
    root: Path, model_id: str, model_format: str, sha256: str, *, max_unpacked_bytes: int = DEFAULT_MAX_UNPACKED_BYTES,
    in_memory: Mapping[str, Buffer] | None = None,
) -> NamespaceModel:
    """Decodes the model unpacked under `root`; `in_memory` holds members unpacked into
    memory instead (relative path → bytes), which count as files of the archive."""
    in_memory = in_memory or {}
    files = sorted([p for p in root.rglob("*") if p.is_file()] + [root / relative for relative in in_memory])
    declared = ModelFormat(model_format)
    model = NamespaceModel(model_id=model_id, model_format=model_format, kind=model_format, sha256=sha256)
    if declared is ModelFormat.SAFETENSORS:
        _load_safetensors(model, [p for p in files if p.name.endswith(SAFETENSORS_SUFFIX)], root, in_memory)
    elif declared is ModelFormat.ONNX:
        _load_onnx(model, _first(files, ONNX_SUFFIX, "an .onnx file"), root)
    elif declared is ModelFormat.PYTORCH:
        _load_pytorch(model, _first(files, TORCH_SUFFIXES, "a PyTorch file"), root, max_unpacked_bytes)
    else:
        _load_huggingface(model, files, root, in_memory)
    if not model.tensors:
        raise DecodeError("NO_WEIGHTS", "the archive's model holds no tensors")
    return model


def _first(files: list[Path], suffixes: str | tuple[str, ...], what: str) -> Path:
    for path in files:
        if path.name.endswith(suffixes):
            return path
    raise DecodeError("FORMAT_FILE_MISSING", f"the archive holds no {what}")


def _put(model: NamespaceModel, name: str, tensor: Any) -> None:
    """Stores a torch tensor as a contiguous numpy array (bit view for numpy-less dtypes)."""
    import torch

    dtype_name = str(tensor.dtype).removeprefix("torch.")
    tensor = tensor.detach().contiguous()
    real_dtype = None
    if dtype_name in BIT_VIEW_DTYPES:
        tensor = tensor.view(getattr(torch, BIT_VIEW_DTYPES[dtype_name]))
        real_dtype = dtype_name
    _put_array(model, name, np.ascontiguousarray(tensor.numpy()), real_dtype)


def _put_array(model: NamespaceModel, name: str, array: np.ndarray, real_dtype: str | None) -> None:
    if name in model.tensors:
        raise DecodeError("DUPLICATE_TENSOR", f"tensor {name!r} appears in more than one weights file")
    model.tensors[name] = array
    if real_dtype is not None:
        model.tensor_dtypes[name] = real_dtype


def _load_safetensors(
    model: NamespaceModel, paths: list[Path], root: Path, in_memory: Mapping[str, Buffer] | None = None
) -> None:
    """Views each tensor straight on the member's bytes (held in memory, or a read-only
    mapping of the file): the only copy of the weights is the one Ray makes into its
    object store."""
    if not paths:
        raise DecodeError("FORMAT_FILE_MISSING", "the archive holds no .safetensors file")
    for path in paths:
        relative = str(path.relative_to(root))
        held = (in_memory or {}).get(relative)
        _view_safetensors(model, relative, memoryview(held if held is not None else _mapped(path)))


def _mapped(path: Path) -> Buffer:
    """The file's bytes as a read-only mapping (an empty file cannot be mapped)."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return b""
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


def _view_safetensors(model: NamespaceModel, relative: str, data: memoryview) -> None:
    """The tensors of a safetensors file, as plain ndarray views on its bytes (not
    np.memmap, which Ray would hand back to readers as a writable copy)."""
    header_length = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if header_length > MAX_SAFETENSORS_HEADER:
        raise DecodeError("CORRUPT_WEIGHTS", f"{relative}: the header is implausibly large")
    try:
        header = validate_safetensors_header(relative, bytes(data[: 8 + header_length]), len(data))
    except InvalidArchive as error:
        raise DecodeError("CORRUPT_WEIGHTS", error.message) from None
    data_start = 8 + header_length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert isinstance(info, dict)  # validated above
        numpy_dtype, real_dtype = SAFETENSORS_NUMPY_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        array = np.frombuffer(data[data_start + begin : data_start + end], dtype=numpy_dtype).reshape(tuple(info["shape"]))
        _put_array(model, name, array, real_dtype)


def confined_file(root: Path, base: Path, reference: str) -> Path:
    """The file a model names by `reference` (relative to `base`), if it is one of the
    model's own extracted files; DecodeError otherwise.

    Refused before touching the disk: absolute paths, drive letters, backslashes, NUL and
    `..`; then the resolved path (links followed) must still lie inside `root` and be a
    regular file. Nothing outside the model's own files is ever opened.
    """
    if (
        not reference
        or reference.startswith(("/", "\\"))
        or "\\" in reference
        or "\0" in reference
        or (len(reference) > 1 and reference[1] == ":")
        or ".." in reference.split("/")
    ):
        raise DecodeError("PATH_OUTSIDE_MODEL", f"the model refers to {reference!r}, outside its own files")
    candidate = base / reference
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise DecodeError("MISSING_MODEL_FILE", f"the model refers to {reference!r}, which the archive does not hold") from None
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        raise DecodeError("PATH_OUTSIDE_MODEL", f"the model refers to {reference!r}, outside its own files")
    return resolved


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers, sparse ones, node attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _onnx_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _onnx_tensors(subgraph)


def _internalize_external_data(proto: Any, path: Path, root: Path) -> None:
    """Reads each tensor's external data from the model's own files into the model.

    ONNX's own helpers resolve `location` against the process's working directory or any
    path the model names; here every reference goes through `confined_file`. The result is
    self-contained, so a plugin's ONNX Runtime session never resolves a path either.
    """
    from onnx import TensorProto

    for tensor in _onnx_tensors(proto.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        source = confined_file(root, path.parent, entries.get("location", ""))
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else source.stat().st_size - offset
        except ValueError:
            raise DecodeError("CORRUPT_WEIGHTS", f"tensor {tensor.name!r} has a malformed external data offset or length") from None
        if offset < 0 or length < 0 or offset + length > source.stat().st_size:
            raise DecodeError("CORRUPT_WEIGHTS", f"tensor {tensor.name!r} reaches past the end of its external data file")
        with source.open("rb") as handle:
            handle.seek(offset)
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = TensorProto.DEFAULT


def _load_onnx(model: NamespaceModel, path: Path, root: Path) -> None:
    import onnx
    from onnx import numpy_helper

    try:
        proto = onnx.load_from_string(path.read_bytes())  # never follows external data itself
    except Exception:  # protobuf raises DecodeError and others for garbage
        raise DecodeError("CORRUPT_WEIGHTS", f"{_relative(path, root)} is not a valid ONNX model") from None
    _internalize_external_data(proto, path, root)
    try:
        onnx.checker.check_model(proto)
        raw = proto.SerializeToString()
    except Exception as error:  # onnx raises several unrelated types for a corrupt model
        raise DecodeError("CORRUPT_WEIGHTS", f"{_relative(path, root)} is not a valid ONNX model: {_first_line(error)}") from None
    for initializer in proto.graph.initializer:
        if initializer.name in model.tensors:
            raise DecodeError("DUPLICATE_TENSOR", f"initializer {initializer.name!r} appears twice")
        model.tensors[initializer.name] = np.ascontiguousarray(numpy_helper.to_array(initializer))
    model.kind = "onnx"
    model.artifacts["onnx"] = np.frombuffer(raw, dtype=np.uint8)


def _load_pytorch(model: NamespaceModel, path: Path, root: Path, max_unpacked_bytes: int) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if is_torchscript(archive):
                reader = TorchScriptArchive(archive, max_unpacked_bytes)
                for name, record in reader.tensors().items():
                    _put_array(model, name, reader.array(record), record.storage.real_dtype)
                model.kind = "torchscript"
                # Kept as bytes: only a plugin, in the tenant's own process, builds the module.
                model.artifacts["torchscript"] = np.fromfile(path, dtype=np.uint8)
                return
    for name, tensor in _torch_state_dict(path, root).items():
        _put(model, name, tensor)
    model.kind = "state_dict"


def _relative(path: Path, root: Path) -> str:
    """A file's name as the tenant knows it: its path inside the archive."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return path.name


def _first_line(error: BaseException) -> str:
    """The gist of a library's message about the tenant's model, without paths of ours."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:300]


def _torch_state_dict(path: Path, root: Path) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise DecodeError(
                "UNSAFE_PICKLE",
                f"{_relative(path, root)} needs arbitrary code to unpickle; save a state_dict (tensors only) "
                "or use safetensors",
            ) from None
        raise DecodeError("CORRUPT_WEIGHTS", f"{_relative(path, root)} cannot be read as a PyTorch state_dict") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise DecodeError("NOT_A_STATE_DICT", f"{path.name} holds a {type(loaded).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DecodeError("NO_WEIGHTS", f"{path.name} holds no tensors")
    return tensors


def _load_huggingface(model: NamespaceModel, files: list[Path], root: Path, in_memory: Mapping[str, Buffer]) -> None:
    configs = sorted((p for p in files if p.name == HF_CONFIG), key=lambda p: len(p.parts))
    if not configs:
        raise DecodeError("FORMAT_FILE_MISSING", f"the archive holds no {HF_CONFIG}")
    model_dir = configs[0].parent
    inside = [p for p in files if p.is_relative_to(model_dir)]
    safetensors_files = [p for p in inside if p.name.endswith(SAFETENSORS_SUFFIX)]
    if safetensors_files:
        _load_safetensors(model, safetensors_files, root, in_memory)
    else:
        torch_files = [p for p in inside if p.name.endswith(TORCH_SUFFIXES)]
        if not torch_files:
            raise DecodeError("FORMAT_FILE_MISSING", f"no weights (.safetensors or .bin) beside {HF_CONFIG}")
        for path in torch_files:
            for name, tensor in _torch_state_dict(path, root).items():
                _put(model, name, tensor)
    weights = set(safetensors_files) | {p for p in inside if p.name.endswith(TORCH_SUFFIXES + (ONNX_SUFFIX,))}
    kept = 0
    for path in inside:
        if path in weights:
            continue
        size = path.stat().st_size
        if size > MAX_COMPANION_FILE_BYTES:
            continue
        kept += size
        if kept > MAX_COMPANION_FILES_TOTAL_BYTES or len(model.files) >= MAX_COMPANION_FILES:
            raise DecodeError(
                "TOO_MANY_COMPANION_FILES",
                f"the files beside {HF_CONFIG} exceed {MAX_COMPANION_FILES} files or "
                f"{MAX_COMPANION_FILES_TOTAL_BYTES} bytes",
            )
        model.files[str(path.relative_to(model_dir))] = path.read_bytes()
    model.kind = "huggingface"
