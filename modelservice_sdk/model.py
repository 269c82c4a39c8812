"""`NamespaceModel`: a deployed model's weights as they sit in Ray's object store.

Tensors are numpy arrays; fetched with `ray.get` they are read-only views on shared
object-store memory (zero-copy). The helpers build torch tensors, an ONNX Runtime session
or a TorchScript module from them without copying the weights again where the library
allows it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: numpy has no bfloat16/float8: such tensors are stored as same-width integer bit views.
BIT_VIEW_DTYPES = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


@dataclass
class NamespaceModel:
    model_id: str
    model_format: str
    kind: str
    """What was decoded: "safetensors", "state_dict", "torchscript", "onnx" or "huggingface"."""
    sha256: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    tensor_dtypes: dict[str, str] = field(default_factory=dict)
    """Tensors whose array is a bit view of another dtype (name -> torch dtype name)."""
    artifacts: dict[str, np.ndarray] = field(default_factory=dict)
    """Serialized models as uint8 arrays: "onnx" (model bytes), "torchscript" (module zip)."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Small companion files (config.json, tokenizer files), by path in the archive."""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values()) + sum(a.nbytes for a in self.artifacts.values())

    def torch_state_dict(self) -> dict[str, Any]:
        """The tensors as torch tensors sharing the arrays' memory (no copy).

        The memory is read-only object-store memory: treat the tensors as read-only.
        """
        import torch

        state: dict[str, Any] = {}
        with warnings.catch_warnings():
            # torch warns that the arrays are not writable; sharing them is the point.
            warnings.simplefilter("ignore", UserWarning)
            for name, array in self.tensors.items():
                tensor = torch.from_numpy(array)
                if name in self.tensor_dtypes:
                    tensor = tensor.view(getattr(torch, self.tensor_dtypes[name]))
                state[name] = tensor
        return state

    def onnx_session(self, **session_options: Any) -> Any:
        """An onnxruntime.InferenceSession built from the cached model bytes."""
        import onnxruntime

        if "onnx" not in self.artifacts:
            raise ValueError(f"model {self.model_id} is not an ONNX model (kind {self.kind})")
        return onnxruntime.InferenceSession(
            self.artifacts["onnx"].tobytes(), providers=["CPUExecutionProvider"], **session_options
        )

    def torchscript_module(self) -> Any:
        """The TorchScript module, loaded from the cached bytes."""
        import torch

        if "torchscript" not in self.artifacts:
            raise ValueError(f"model {self.model_id} is not a TorchScript model (kind {self.kind})")
        return torch.jit.load(  # type: ignore[no-untyped-call]
            io.BytesIO(self.artifacts["torchscript"].tobytes()), map_location="cpu"
        )


class ModelNotAvailable(LookupError):
    """The model does not exist (for this namespace) or could not be loaded."""
