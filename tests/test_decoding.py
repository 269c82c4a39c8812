"""Unit tests: decoding extracted model directories into numpy (no Ray, no servers)."""

from __future__ import annotations

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
        assert isinstance(model.tensors[name].base, np.memmap)


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
