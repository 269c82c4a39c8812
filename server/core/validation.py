"""Validation of an upload's declared metadata, before any byte is accepted."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from server.core.models import GB, ModelFormat, ModelMetadata, ResourceRequirements
from server.errors import InvalidArgument

# Matched with fullmatch: `$` would also accept a trailing newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FREE_TEXT_MAX = 128

MIN_CPUS, MAX_CPUS = 0.1, 64.0
MIN_GPUS, MAX_GPUS = 0, 8
MAX_MEMORY_GB = 4096.0


@dataclass(frozen=True)
class UploadDeclaration:
    """The raw, unvalidated metadata of an upload, as any transport received it."""

    namespace_id: str
    name: str
    version: str
    model_format: str
    framework: str = ""
    task_type: str = ""
    num_cpus: float | None = None
    num_gpus: float | None = None
    memory_gb: float | None = None
    expected_sha256: str = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


def validate_namespace_id(namespace_id: str) -> str:
    if not _NAMESPACE.fullmatch(namespace_id):
        raise InvalidArgument(
            "namespace_id must be 1-64 letters, digits, '_' or '-'", field="namespace_id"
        )
    return namespace_id


def validate_declaration(declared: UploadDeclaration) -> ModelMetadata:
    """Returns validated metadata or raises InvalidArgument naming the first bad field."""
    validate_namespace_id(declared.namespace_id)
    if not _NAME.fullmatch(declared.name):
        raise InvalidArgument(
            "name must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit",
            field="name",
        )
    if not _VERSION.fullmatch(declared.version):
        raise InvalidArgument(
            "version must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit",
            field="version",
        )
    try:
        model_format = ModelFormat(declared.model_format)
    except ValueError:
        allowed = ", ".join(f.value for f in ModelFormat)
        raise InvalidArgument(
            f"model_format must be one of: {allowed}", field="model_format", allowed=allowed
        ) from None
    for field, value in (("framework", declared.framework), ("task_type", declared.task_type)):
        if len(value) > _FREE_TEXT_MAX or not value.isprintable():
            raise InvalidArgument(
                f"{field} must be printable text of at most {_FREE_TEXT_MAX} characters", field=field
            )
    expected = declared.expected_sha256.strip().lower()
    if expected and not _SHA256.fullmatch(expected):
        raise InvalidArgument("expected_sha256 must be 64 hex digits", field="expected_sha256")
    return ModelMetadata(
        namespace_id=declared.namespace_id,
        name=declared.name,
        version=declared.version,
        model_format=model_format,
        framework=declared.framework or None,
        task_type=declared.task_type or None,
        resources=_validate_resources(declared),
        expected_sha256=expected or None,
        input_schema=declared.input_schema,
        output_schema=declared.output_schema,
    )


def _validate_resources(declared: UploadDeclaration) -> ResourceRequirements:
    defaults = ResourceRequirements()
    num_cpus = defaults.num_cpus if declared.num_cpus is None else declared.num_cpus
    if not (math.isfinite(num_cpus) and MIN_CPUS <= num_cpus <= MAX_CPUS):
        raise InvalidArgument(
            f"num_cpus must be between {MIN_CPUS} and {MAX_CPUS}",
            field="num_cpus", minimum=MIN_CPUS, maximum=MAX_CPUS,
        )
    num_gpus = defaults.num_gpus if declared.num_gpus is None else declared.num_gpus
    if not (float(num_gpus).is_integer() and MIN_GPUS <= num_gpus <= MAX_GPUS):
        raise InvalidArgument(
            f"num_gpus must be an integer between {MIN_GPUS} and {MAX_GPUS}",
            field="num_gpus", minimum=MIN_GPUS, maximum=MAX_GPUS,
        )
    if declared.memory_gb is None:
        memory_bytes = defaults.memory_bytes
    else:
        if not (math.isfinite(declared.memory_gb) and 0 < declared.memory_gb <= MAX_MEMORY_GB):
            raise InvalidArgument(
                f"memory_gb must be greater than 0 and at most {MAX_MEMORY_GB:g}",
                field="memory_gb", maximum=MAX_MEMORY_GB,
            )
        memory_bytes = max(1, round(declared.memory_gb * GB))
    return ResourceRequirements(num_cpus=num_cpus, num_gpus=int(num_gpus), memory_bytes=memory_bytes)
