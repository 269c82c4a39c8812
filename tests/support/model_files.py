"""Real model files of every supported format, built by the tests themselves."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import safetensors.numpy
import torch
import zstandard
from onnx import TensorProto, helper, numpy_helper


def reference_weights(seed: int = 0, scale: int = 1) -> dict[str, np.ndarray]:
    """A few float32 tensors; `scale` multiplies the first one's rows (for big models)."""
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.standard_normal((16 * scale, 8), dtype=np.float32),
        "encoder.bias": rng.standard_normal(8, dtype=np.float32),
        "head.weight": rng.standard_normal((8, 4), dtype=np.float32),
    }


def write_safetensors(directory: Path, weights: dict[str, np.ndarray], name: str = "model.safetensors") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    safetensors.numpy.save_file(weights, str(path))
    return path


def safetensors_bytes(seed: int = 0) -> bytes:
    return safetensors.numpy.save(reference_weights(seed))


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.head(torch.relu(self.encoder(x)))
        return result


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def write_state_dict(directory: Path, net: torch.nn.Module, name: str = "model.pt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    torch.save(net.state_dict(), path)
    return path


def write_torchscript(directory: Path, net: torch.nn.Module, name: str = "model.pt") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    torch.jit.script(net).save(str(path))  # type: ignore[no-untyped-call]
    return path


def write_onnx(
    directory: Path, seed: int = 0, name: str = "model.onnx", save: bool = True
) -> tuple[Path, dict[str, np.ndarray]]:
    """y = relu(x @ W + b): a real ONNX graph with two initializers."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 4), dtype=np.float32)
    bias = rng.standard_normal(4, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = directory / name
    if save:
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    return path, {"W": weight, "b": bias}


def write_huggingface(directory: Path, weights: dict[str, np.ndarray]) -> Path:
    """A Hugging Face-style model directory: config, tokenizer files and safetensors weights."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps({"architectures": ["TinyModel"], "model_type": "tiny", "hidden_size": 8})
    )
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    write_safetensors(directory, weights)
    return directory


def pack(source: Path, archive: Path, compression: str = "gz", arcname: str = "model") -> Path:
    """Packs a file or directory into .tar.gz ("gz"), .tar ("") or .tar.zst ("zst").

    A directory is stored under `arcname/`; a single file keeps its own name.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    if source.is_file():
        arcname = source.name
    if compression == "zst":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(source, arcname=arcname)
        archive.write_bytes(zstandard.ZstdCompressor().compress(buffer.getvalue()))
        return archive
    with tarfile.open(archive, "w:gz" if compression == "gz" else "w") as tar:
        tar.add(source, arcname=arcname)
    return archive


def tar_member_header(name: str, size: int) -> bytes:
    """The 512-byte tar header of a member of `size` bytes, its data to follow."""
    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.GNU_FORMAT)


def tar_bytes(members: dict[str, bytes], compression: str = "") -> bytes:
    """A small in-memory archive of the given files (for inspector tests)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compression == "gz" else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    if compression == "zst":
        return zstandard.ZstdCompressor().compress(raw)
    return raw
