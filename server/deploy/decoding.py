"""Decodes an extracted model directory into contiguous numpy arrays, by format.

Numpy, not torch tensors: Ray hands numpy arrays out of its object store zero-copy, while
torch tensors are copied on every get. PyTorch pickles are loaded with
`weights_only=True`: a file that needs arbitrary code to unpickle is refused.
"""

from __future__ import annotations

import pickle
import zipfile
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
from server.errors import InvalidArchive

MAX_COMPANION_FILE_BYTES = 16 * 1024 * 1024


class DecodeError(Exception):
    """The weights cannot be decoded; `reason` is stable, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decode_model(root: Path, model_id: str, model_format: str, sha256: str) -> NamespaceModel:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    declared = ModelFormat(model_format)
    model = NamespaceModel(model_id=model_id, model_format=model_format, kind=model_format, sha256=sha256)
    if declared is ModelFormat.SAFETENSORS:
        _load_safetensors(model, [p for p in files if p.name.endswith(SAFETENSORS_SUFFIX)], root)
    elif declared is ModelFormat.ONNX:
        _load_onnx(model, _first(files, ONNX_SUFFIX, "an .onnx file"))
    elif declared is ModelFormat.PYTORCH:
        _load_pytorch(model, _first(files, TORCH_SUFFIXES, "a PyTorch file"))
    else:
        _load_huggingface(model, files, root)
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

    if name in model.tensors:
        raise DecodeError("DUPLICATE_TENSOR", f"tensor {name!r} appears in more than one weights file")
    dtype_name = str(tensor.dtype).removeprefix("torch.")
    tensor = tensor.detach().contiguous()
    if dtype_name in BIT_VIEW_DTYPES:
        tensor = tensor.view(getattr(torch, BIT_VIEW_DTYPES[dtype_name]))
        model.tensor_dtypes[name] = dtype_name
    model.tensors[name] = np.ascontiguousarray(tensor.numpy())


def _load_safetensors(model: NamespaceModel, paths: list[Path], root: Path) -> None:
    """Maps each tensor straight from the file (np.memmap): the only copy of the weights
    is the one Ray makes into its object store."""
    if not paths:
        raise DecodeError("FORMAT_FILE_MISSING", "the archive holds no .safetensors file")
    for path in paths:
        relative = str(path.relative_to(root))
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if header_length > MAX_SAFETENSORS_HEADER:
                raise DecodeError("CORRUPT_WEIGHTS", f"{relative}: the header is implausibly large")
            head = prefix + handle.read(header_length)
        try:
            header = validate_safetensors_header(relative, head, size)
        except InvalidArchive as error:
            raise DecodeError("CORRUPT_WEIGHTS", error.message) from None
        data_start = 8 + header_length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert isinstance(info, dict)  # validated above
            numpy_dtype, real_dtype = SAFETENSORS_NUMPY_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if name in model.tensors:
                raise DecodeError("DUPLICATE_TENSOR", f"tensor {name!r} appears in more than one weights file")
            if end > begin and shape:
                # A plain ndarray view of the mapping (not the memmap subclass, which Ray
                # would hand back to readers as a writable copy).
                mapped = np.memmap(path, dtype=numpy_dtype, mode="r", offset=data_start + begin, shape=shape)
                array: np.ndarray = mapped.view(np.ndarray)
            else:  # scalars and empty tensors: np.memmap cannot map zero bytes or shape ()
                with path.open("rb") as handle:
                    handle.seek(data_start + begin)
                    array = np.frombuffer(handle.read(end - begin), dtype=numpy_dtype).reshape(shape)
            model.tensors[name] = array
            if real_dtype is not None:
                model.tensor_dtypes[name] = real_dtype


def _load_onnx(model: NamespaceModel, path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    raw = path.read_bytes()
    try:
        proto = onnx.load_from_string(raw)
        onnx.checker.check_model(proto)
    except Exception as error:  # onnx raises several unrelated types for a corrupt model
        raise DecodeError("CORRUPT_WEIGHTS", f"{path.name} is not a valid ONNX model: {error}") from None
    for initializer in proto.graph.initializer:
        if initializer.name in model.tensors:
            raise DecodeError("DUPLICATE_TENSOR", f"initializer {initializer.name!r} appears twice")
        model.tensors[initializer.name] = np.ascontiguousarray(numpy_helper.to_array(initializer))
    model.kind = "onnx"
    model.artifacts["onnx"] = np.frombuffer(raw, dtype=np.uint8)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name.startswith("code/") or "/code/" in name for name in archive.namelist())


def _load_pytorch(model: NamespaceModel, path: Path) -> None:
    import torch

    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
        except Exception as error:
            raise DecodeError("CORRUPT_WEIGHTS", f"{path.name} is not a loadable TorchScript module: {error}") from None
        for name, tensor in module.state_dict().items():
            _put(model, name, tensor)
        model.kind = "torchscript"
        model.artifacts["torchscript"] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
        return
    for name, tensor in _torch_state_dict(path).items():
        _put(model, name, tensor)
    model.kind = "state_dict"


def _torch_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
            raise DecodeError(
                "UNSAFE_PICKLE",
                f"{path.name} needs arbitrary code to unpickle; save a state_dict (tensors only) "
                "or use safetensors",
            ) from None
        raise DecodeError("CORRUPT_WEIGHTS", f"{path.name} cannot be read by torch.load: {error}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise DecodeError("NOT_A_STATE_DICT", f"{path.name} holds a {type(loaded).__name__}, not a state_dict")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise DecodeError("NO_WEIGHTS", f"{path.name} holds no tensors")
    return tensors


def _load_huggingface(model: NamespaceModel, files: list[Path], root: Path) -> None:
    configs = sorted((p for p in files if p.name == HF_CONFIG), key=lambda p: len(p.parts))
    if not configs:
        raise DecodeError("FORMAT_FILE_MISSING", f"the archive holds no {HF_CONFIG}")
    model_dir = configs[0].parent
    inside = [p for p in files if p.is_relative_to(model_dir)]
    safetensors_files = [p for p in inside if p.name.endswith(SAFETENSORS_SUFFIX)]
    if safetensors_files:
        _load_safetensors(model, safetensors_files, root)
    else:
        torch_files = [p for p in inside if p.name.endswith(TORCH_SUFFIXES)]
        if not torch_files:
            raise DecodeError("FORMAT_FILE_MISSING", f"no weights (.safetensors or .bin) beside {HF_CONFIG}")
        for path in torch_files:
            for name, tensor in _torch_state_dict(path).items():
                _put(model, name, tensor)
    weights = set(safetensors_files) | {p for p in inside if p.name.endswith(TORCH_SUFFIXES + (ONNX_SUFFIX,))}
    for path in inside:
        if path not in weights and path.stat().st_size <= MAX_COMPANION_FILE_BYTES:
            model.files[str(path.relative_to(model_dir))] = path.read_bytes()
    model.kind = "huggingface"
