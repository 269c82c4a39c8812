"""Reads the tensors of a TorchScript archive as DATA, without running TorchScript.

`torch.jit.load` compiles the archive's `code/` and runs the tenant's `__setstate__`
methods: tenant code. The load task must never do that (it holds S3 credentials and every
tenant's archives), so this module reads `data.pkl` with a restricted unpickler instead:

- `__torch__.*` classes resolve to inert stand-ins that only record their pickled state
  (no TorchScript is compiled, no `__setstate__` of the tenant's runs);
- tensors are rebuilt by our own code as numpy arrays from the archive's `data/<key>`
  records, with every offset, shape and stride checked against the record's size;
- any other global is refused (UNSAFE_PICKLE), whatever it names.

The module itself is built only where the tenant's code may run: in the plugin's own
process, by `NamespaceModel.torchscript_module()`.
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.deploy.errors import DecodeError

MAX_DATA_PICKLE_BYTES = 64 * 1024 * 1024
"""The pickled module structure (not its tensors) is small; a bigger one is refused."""
MAX_OBJECT_DEPTH = 64
MAX_OBJECTS_VISITED = 1_000_000

#: numpy dtype of each storage class, and the real dtype of those kept as bit views.
_STORAGE_DTYPES: dict[str, tuple[str, str | None]] = {
    "FloatStorage": ("<f4", None), "DoubleStorage": ("<f8", None), "HalfStorage": ("<f2", None),
    "BFloat16Storage": ("<i2", "bfloat16"), "LongStorage": ("<i8", None), "IntStorage": ("<i4", None),
    "ShortStorage": ("<i2", None), "CharStorage": ("i1", None), "ByteStorage": ("u1", None),
    "BoolStorage": ("?", None), "ComplexFloatStorage": ("<c8", None), "ComplexDoubleStorage": ("<c16", None),
    "Float8_e4m3fnStorage": ("u1", "float8_e4m3fn"), "Float8_e5m2Storage": ("u1", "float8_e5m2"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    dtype: np.dtype[Any]
    real_dtype: str | None
    key: str
    numel: int


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as the archive describes it; materialised by `TorchScriptArchive.array`."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _ScriptObject:
    """Stand-in for every `__torch__.*` class: holds the pickled state, runs nothing."""

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_ignored: Any) -> TensorRecord:
    if not isinstance(storage, _Storage) or not isinstance(offset, int):
        raise DecodeError("CORRUPT_WEIGHTS", "a TorchScript tensor record is malformed")
    if not (_int_tuple(shape) and _int_tuple(stride) and len(shape) == len(stride)):
        raise DecodeError("CORRUPT_WEIGHTS", "a TorchScript tensor has a malformed shape or stride")
    return TensorRecord(storage=storage, offset=offset, shape=tuple(shape), stride=tuple(stride))


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and v >= 0 for v in value)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    return data


def _identity(value: Any, *_ignored: Any) -> Any:
    return value


#: The only globals a TorchScript data.pkl may name besides `__torch__.*` classes.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_genericlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._script_classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self._script_classes:
                stand_in = type(name, (_ScriptObject,), {"qualified_name": qualified})
                self._script_classes[qualified] = stand_in
            return self._script_classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise DecodeError(
                "UNSAFE_PICKLE", f"the TorchScript archive's data names {module}.{name}, which is not tensor data"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript archive holds an unknown persistent record")
        _, storage_type, key, _location, numel = pid
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int) and numel >= 0):
            raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript archive holds a malformed storage record")
        numpy_dtype, real_dtype = _STORAGE_DTYPES[storage_type.name]
        return _Storage(dtype=np.dtype(numpy_dtype), real_dtype=real_dtype, key=key, numel=numel)


class TorchScriptArchive:
    """One TorchScript zip, opened for reading its tensors."""

    def __init__(self, zip_file: zipfile.ZipFile, max_bytes: int) -> None:
        self._zip = zip_file
        self._max_bytes = max_bytes
        pickles = [name for name in zip_file.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript archive has no single data.pkl")
        self._prefix = pickles[0].removesuffix("data.pkl")
        declared = sum(info.file_size for info in zip_file.infolist())
        if declared > max_bytes:
            raise DecodeError("CORRUPT_WEIGHTS", f"the TorchScript archive unpacks to more than {max_bytes} bytes")
        self._storages: dict[str, np.ndarray] = {}

    def tensors(self) -> dict[str, TensorRecord]:
        """Every tensor reachable from the module, named by its attribute path."""
        info = self._zip.getinfo(self._prefix + "data.pkl")
        if info.file_size > MAX_DATA_PICKLE_BYTES:
            raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript module structure is implausibly large")
        try:
            root = _RestrictedUnpickler(self._zip.read(info)).load()
        except DecodeError:
            raise
        except Exception:  # any malformed pickle: truncated, bad opcodes, wrong arities
            raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript archive's data.pkl cannot be read") from None
        found: dict[str, TensorRecord] = {}
        _collect(root, "", found, visited=set(), depth=0)
        return found

    def array(self, record: TensorRecord) -> np.ndarray:
        """The tensor as a contiguous numpy array, bounds-checked against its storage."""
        storage = self._storage(record.storage)
        if record.shape and math.prod(record.shape) > 0:
            last = record.offset + sum((size - 1) * step for size, step in zip(record.shape, record.stride))
            if last >= storage.size:
                raise DecodeError("CORRUPT_WEIGHTS", "a TorchScript tensor reaches past its storage")
        elif record.offset > storage.size:
            raise DecodeError("CORRUPT_WEIGHTS", "a TorchScript tensor starts past its storage")
        itemsize = storage.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[record.offset :],
            shape=record.shape,
            strides=tuple(step * itemsize for step in record.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)

    def _storage(self, storage: _Storage) -> np.ndarray:
        cached = self._storages.get(storage.key)
        if cached is not None:
            return cached
        name = f"{self._prefix}data/{storage.key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise DecodeError("CORRUPT_WEIGHTS", f"the TorchScript archive lacks the storage record {storage.key!r}") from None
        expected = storage.numel * storage.dtype.itemsize
        if info.file_size != expected:
            raise DecodeError("CORRUPT_WEIGHTS", f"storage record {storage.key!r} holds {info.file_size} bytes, not {expected}")
        array = np.frombuffer(self._zip.read(info), dtype=storage.dtype)
        self._storages[storage.key] = array
        return array


def _collect(value: Any, path: str, found: dict[str, TensorRecord], *, visited: set[int], depth: int) -> None:
    if isinstance(value, TensorRecord):
        if path:
            found.setdefault(path, value)
        return
    if depth > MAX_OBJECT_DEPTH:
        raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript module is nested implausibly deep")
    if not isinstance(value, (dict, list, tuple, _ScriptObject)):
        return
    if id(value) in visited:  # shared or cyclic references: each object is walked once
        return
    visited.add(id(value))
    if len(visited) > MAX_OBJECTS_VISITED:
        raise DecodeError("CORRUPT_WEIGHTS", "the TorchScript module holds implausibly many objects")
    if isinstance(value, _ScriptObject):
        value = getattr(value, "state", None)
        if isinstance(value, (dict, list, tuple)):
            _collect(value, path, found, visited=visited, depth=depth + 1)
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        child = f"{path}.{key}" if path else str(key)
        _collect(item, child, found, visited=visited, depth=depth + 1)


def is_torchscript(zip_file: zipfile.ZipFile) -> bool:
    """A TorchScript archive carries compiled code beside its data (`code/`, constants.pkl)."""
    return any(
        name.endswith("/constants.pkl") or name.startswith("code/") or "/code/" in name for name in zip_file.namelist()
    )
