"""Unit tests: decoding extracted model directories into numpy (no Ray, no servers)."""

from __future__ import annotations

import mmap
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from server.deploy.decoding import DecodeError, decode_model
from tests.support import model_files


def test_safetensors_tensors_are_mapped_from_the_file_without_a_copy(tmp_path: Path) -> None:
    weights = model_files.reference_weights()
    model_files.write_safetensors(tmp_path / "m", weights)
    model = decode_model(tmp_path, "id", "safetensors", "digest")
    for name, array in weights.items():
        assert np.array_equal(model.tensors[name], array)
        view = model.tensors[name]
        owner: object = view
        while isinstance(owner, np.ndarray):
            owner = owner.base
        # A view on a read-only mapping of the file: no copy, and nothing can write to it.
        assert isinstance(owner, memoryview) and isinstance(owner.obj, mmap.mmap)
        assert not view.flags.owndata and not view.flags.writeable


def test_safetensors_held_in_memory_decode_to_views_on_those_bytes(tmp_path: Path) -> None:
    weights = model_files.reference_weights()
    data = bytearray(model_files.safetensors_bytes())
    model = decode_model(tmp_path, "id", "safetensors", "digest", in_memory={"m/model.safetensors": data})
    for name, array in weights.items():
        assert np.array_equal(model.tensors[name], array)
        assert np.shares_memory(model.tensors[name], np.frombuffer(data, dtype=np.uint8))


def test_bfloat16_and_scalars_survive_the_round_trip_through_numpy(tmp_path: Path) -> None:
    original = {
        "half": torch.randn(4, 3, dtype=torch.bfloat16),
        "scale": torch.tensor(2.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }
    (tmp_path / "m").mkdir()
    safetensors.torch.save_file(original, str(tmp_path / "m" / "model.safetensors"))
    model = decode_model(tmp_path, "id", "safetensors", "digest")
    restored = model.torch_state_dict()
    assert model.tensor_dtypes == {"half": "bfloat16"}
    for name, tensor in original.items():
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor)


def test_a_state_dict_inside_a_checkpoint_dict_is_found(tmp_path: Path) -> None:
    net = model_files.tiny_net()
    (tmp_path / "m").mkdir()
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "m" / "model.ckpt")
    model = decode_model(tmp_path, "id", "pytorch", "digest")
    assert model.kind == "state_dict" and sorted(model.tensors) == sorted(net.state_dict())


def test_huggingface_keeps_companion_files_and_weights(tmp_path: Path) -> None:
    model_files.write_huggingface(tmp_path / "model", model_files.reference_weights())
    model = decode_model(tmp_path, "id", "huggingface", "digest")
    assert json.loads(model.files["config.json"])["model_type"] == "tiny"
    assert "model.safetensors" not in model.files and model.kind == "huggingface"


def test_duplicate_tensor_names_across_weight_files_are_refused(tmp_path: Path) -> None:
    weights = model_files.reference_weights()
    model_files.write_safetensors(tmp_path / "m", weights, name="a.safetensors")
    model_files.write_safetensors(tmp_path / "m", weights, name="b.safetensors")
    with pytest.raises(DecodeError) as raised:
        decode_model(tmp_path, "id", "safetensors", "digest")
    assert raised.value.reason == "DUPLICATE_TENSOR"


# ----- tenant isolation: a model is data in the load task -------------------------------


class _SetstateRewritesWeights(torch.nn.Module):
    """A TorchScript module whose `__setstate__` (tenant code) replaces its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", torch.arange(4, dtype=torch.float32))
        self.register_buffer("rewritten", torch.zeros(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        return (self.kept, self.rewritten, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, bool]) -> None:
        self.kept = state[0]
        self.rewritten = torch.full([2], 7.0)
        self.training = state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.rewritten


def test_torchscript_tensors_are_read_without_running_the_modules_code(tmp_path: Path) -> None:
    path = model_files.write_torchscript(tmp_path / "m", _SetstateRewritesWeights())
    ran = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    assert torch.equal(ran.rewritten, torch.full([2], 7.0))  # torch.jit.load runs __setstate__
    model = decode_model(tmp_path, "id", "pytorch", "digest")
    assert model.kind == "torchscript"
    assert sorted(np.asarray(a).tolist() for a in model.tensors.values()) == [[0.0, 0.0], [0.0, 1.0, 2.0, 3.0]]


def test_torchscript_tensors_keep_their_names_dtypes_and_strides(tmp_path: Path) -> None:
    net = model_files.tiny_net()
    model_files.write_torchscript(tmp_path / "m", net)
    model = decode_model(tmp_path, "id", "pytorch", "digest")
    state = model.torch_state_dict()
    assert sorted(state) == sorted(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert torch.equal(state[name], tensor)


def test_a_torchscript_pickle_naming_any_other_global_is_refused_unrun(tmp_path: Path) -> None:
    import pickle
    import zipfile

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))

    (tmp_path / "m").mkdir()
    with zipfile.ZipFile(tmp_path / "m" / "model.pt", "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps(Exploit(), protocol=2))
        archive.writestr("model/code/__torch__.py", "")
        archive.writestr("model/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(DecodeError) as refused:
        decode_model(tmp_path, "id", "pytorch", "digest")
    assert refused.value.reason == "UNSAFE_PICKLE" and not marker.exists()


def _onnx_with_external_weight(directory: Path, location: str) -> None:
    import onnx
    from onnx import TensorProto

    path, _ = model_files.write_onnx(directory)
    proto = onnx.load(str(path))
    weight = proto.graph.initializer[0]
    weight.ClearField("raw_data")
    del weight.float_data[:]
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "128")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize(
    ("location", "reason"),
    [("../secret.bin", "PATH_OUTSIDE_MODEL"), ("/etc/passwd", "PATH_OUTSIDE_MODEL"), ("link.bin", "PATH_OUTSIDE_MODEL"),
     ("only-in-the-working-directory.bin", "MISSING_MODEL_FILE")],
)
def test_onnx_external_data_never_resolves_outside_the_models_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, location: str, reason: str
) -> None:
    root = tmp_path / "extracted"
    (tmp_path / "secret.bin").write_bytes(b"S" * 128)
    (root / "m").mkdir(parents=True)
    (root / "m" / "link.bin").symlink_to(tmp_path / "secret.bin")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "only-in-the-working-directory.bin").write_bytes(b"W" * 128)
    monkeypatch.chdir(workdir)
    _onnx_with_external_weight(root / "m", location)
    with pytest.raises(DecodeError) as refused:
        decode_model(root, "id", "onnx", "digest")
    assert refused.value.reason == reason
    assert str(tmp_path) not in refused.value.message


def test_onnx_external_data_inside_the_model_is_internalized_for_plugins(tmp_path: Path) -> None:
    _, weights = model_files.write_onnx(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").write_bytes(weights["W"].tobytes())
    _onnx_with_external_weight(tmp_path / "m", "weights.bin")
    model = decode_model(tmp_path, "id", "onnx", "digest")
    assert np.array_equal(model.tensors["W"], weights["W"])
    probe = np.ones((1, 8), dtype=np.float32)
    expected = np.maximum(probe @ weights["W"] + weights["b"], 0)
    assert np.allclose(model.onnx_session().run(None, {"x": probe})[0], expected, atol=1e-5)
