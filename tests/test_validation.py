"""Unit tests: upload metadata validation (no servers)."""

from __future__ import annotations

import dataclasses

import pytest

from server.core.models import GB, ModelFormat
from server.core.validation import UploadDeclaration, validate_declaration
from server.errors import InvalidArgument

VALID = UploadDeclaration(namespace_id="acme", name="bert-base", version="1.0.0", model_format="safetensors")


def test_defaults_follow_the_public_api() -> None:
    metadata = validate_declaration(VALID)
    assert metadata.model_format is ModelFormat.SAFETENSORS
    assert (metadata.resources.num_cpus, metadata.resources.num_gpus) == (1.0, 0)
    assert metadata.resources.memory_bytes == 4 * GB
    assert metadata.framework is None and metadata.expected_sha256 is None


def test_memory_gb_is_stored_in_bytes() -> None:
    metadata = validate_declaration(dataclasses.replace(VALID, memory_gb=0.5))
    assert metadata.resources.memory_bytes == GB // 2


def test_expected_sha256_is_normalised_to_lowercase() -> None:
    digest = "AB" * 32
    assert validate_declaration(dataclasses.replace(VALID, expected_sha256=digest)).expected_sha256 == digest.lower()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"namespace_id": ""}, "namespace_id"),
        ({"namespace_id": "a/b"}, "namespace_id"),
        ({"name": ""}, "name"),
        ({"name": "-leading-dash"}, "name"),
        ({"name": "x" * 129}, "name"),
        ({"version": "1 0"}, "version"),
        ({"model_format": "SAFETENSORS"}, "model_format"),
        ({"model_format": "keras"}, "model_format"),
        ({"framework": "bad\nline"}, "framework"),
        ({"task_type": "t" * 200}, "task_type"),
        ({"num_cpus": 0.09}, "num_cpus"),
        ({"num_cpus": 64.5}, "num_cpus"),
        ({"num_cpus": float("nan")}, "num_cpus"),
        ({"num_gpus": -1}, "num_gpus"),
        ({"num_gpus": 1.5}, "num_gpus"),
        ({"num_gpus": 9}, "num_gpus"),
        ({"memory_gb": 0}, "memory_gb"),
        ({"memory_gb": -2}, "memory_gb"),
        ({"memory_gb": float("inf")}, "memory_gb"),
        ({"expected_sha256": "z" * 64}, "expected_sha256"),
    ],
)
def test_each_bad_field_is_named_in_the_error(change: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate_declaration(dataclasses.replace(VALID, **change))  # type: ignore[arg-type]
    assert raised.value.details["field"] == field


@pytest.mark.parametrize(("cpus", "gpus"), [(0.1, 0), (64.0, 8)])
def test_resource_bounds_are_inclusive(cpus: float, gpus: int) -> None:
    resources = validate_declaration(dataclasses.replace(VALID, num_cpus=cpus, num_gpus=gpus)).resources
    assert (resources.num_cpus, resources.num_gpus) == (cpus, gpus)
