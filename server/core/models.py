"""Value types of the core: what a model is, what a caller is."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Any

GB = 1024**3


class ModelFormat(enum.StrEnum):
    """Formats the public API accepts; values are the API's strings."""

    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    PYTORCH = "pytorch"
    HUGGINGFACE = "huggingface"


class DeploymentStatus(enum.StrEnum):
    """A model's deployment status as the public API spells it."""

    NOT_DEPLOYED = "not_deployed"
    PENDING = "pending"
    DEPLOYED = "deployed"
    FAILED = "failed"


#: Runtime image per format (the public API's auto-selected base images).
BASE_IMAGES: dict[ModelFormat, str] = {
    ModelFormat.SAFETENSORS: "mixpeek/serve-gpu:latest",
    ModelFormat.PYTORCH: "mixpeek/serve-gpu:latest",
    ModelFormat.HUGGINGFACE: "mixpeek/serve-gpu:latest",
    ModelFormat.ONNX: "mixpeek/serve-minimal:latest",
}


@dataclasses.dataclass(frozen=True)
class ResourceRequirements:
    num_cpus: float = 1.0
    num_gpus: int = 0
    memory_bytes: int = 4 * GB


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """Everything an upload declares before its bytes, validated."""

    namespace_id: str
    name: str
    version: str
    model_format: ModelFormat
    framework: str | None
    task_type: str | None
    resources: ResourceRequirements
    expected_sha256: str | None
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class DeploymentInfo:
    ray_cluster_url: str
    ray_deployment_name: str
    endpoint: str
    base_image: str
    deployed_at: datetime.datetime | None
    node_ids: tuple[str, ...] = ()
    """Ray nodes whose object store holds the weights."""


@dataclasses.dataclass(frozen=True)
class DeployForm:
    """The inflated `.tar` of a compressed archive, written during its upload, so that no
    deploy pays decompression again. Deploys read and verify it; the original archive
    stays what `sha256` (the public `model_hash`) describes."""

    key: str
    sha256: str
    size_bytes: int


@dataclasses.dataclass(frozen=True)
class StoredModel:
    """A model whose upload completed (the public API's CustomModelDocument)."""

    model_id: str
    metadata: ModelMetadata
    archive_url: str
    archive_key: str
    sha256: str
    size_bytes: int
    deployed: bool
    deployment_info: DeploymentInfo | None
    created_at: datetime.datetime
    updated_at: datetime.datetime
    deployment_status: DeploymentStatus = DeploymentStatus.NOT_DEPLOYED
    deployment_error: str = ""
    """For a failed deployment: "<stage>: <reason>: <message>"."""
    weights_bytes: int = 0
    """Object-store bytes of the deployed weights, from upload inspection (0: unknown,
    for models uploaded before it was recorded)."""
    deploy_form: DeployForm | None = None
    """For a compressed archive: its deploy-ready inflated form (None for a plain tar)."""

    @property
    def endpoint(self) -> str:
        """Resource path of the model in this API."""
        return model_endpoint(self.metadata.namespace_id, self.model_id)


def model_endpoint(namespace_id: str, model_id: str) -> str:
    return f"/v1/namespaces/{namespace_id}/models/{model_id}"


class Tier(enum.StrEnum):
    """Namespace plans. Only enterprise includes custom models (the public API's rule)."""

    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"

    @property
    def includes_custom_models(self) -> bool:
        return self is Tier.ENTERPRISE


@dataclasses.dataclass(frozen=True)
class Quotas:
    """A namespace's limits; 0 means unlimited."""

    max_archive_bytes: int = 0
    """Archive bytes stored in all (every model's archive)."""
    max_models: int = 0
    """Models (uploads under way included)."""
    max_deployed_bytes: int = 0
    """Object-store bytes of the namespace's deployed models (their weights_bytes)."""

    @property
    def limit_uploads(self) -> bool:
        return bool(self.max_archive_bytes or self.max_models)


@dataclasses.dataclass(frozen=True)
class DeployDefaults:
    """What a namespace's deploys get when they do not say (set by the operator)."""

    pin: bool = False
    idle_ttl_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class NamespaceUsage:
    """What a namespace holds now, as its quotas count it."""

    models: int
    archive_bytes: int
    deployed_bytes: int


@dataclasses.dataclass(frozen=True)
class Namespace:
    namespace_id: str
    tier: Tier
    created_at: datetime.datetime
    quotas: Quotas = Quotas()
    deploy_defaults: DeployDefaults = DeployDefaults()


@dataclasses.dataclass(frozen=True)
class Caller:
    """An authenticated API key and the namespaces it may act for."""

    key_id: str
    namespaces: frozenset[str]

    def may_act_for(self, namespace_id: str) -> bool:
        return namespace_id in self.namespaces


def utc_now() -> datetime.datetime:
    # Millisecond precision: what MongoDB stores, so a value reads back equal.
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)
