"""Plain, picklable descriptions passed from the service to Ray (actor and tasks)."""

from __future__ import annotations

from dataclasses import dataclass

from server.settings import Settings

S3_STORE = "s3"
LOCAL_STORE = "local"


@dataclass(frozen=True)
class StoreConfig:
    """How a Ray worker reads archives: the same store the service writes."""

    kind: str
    bucket: str = ""
    prefix: str = ""
    endpoint_url: str = ""
    region: str = ""
    local_root: str = ""
    timeout_seconds: float = 30.0
    """Connect and read timeout of each request to the store."""

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreConfig:
        if settings.s3_bucket:
            return cls(
                kind=S3_STORE,
                bucket=settings.s3_bucket,
                prefix=settings.s3_prefix,
                endpoint_url=settings.s3_endpoint_url,
                region=settings.s3_region,
                timeout_seconds=settings.s3_timeout_seconds,
            )
        return cls(kind=LOCAL_STORE, local_root=str((settings.data_dir / "archives").resolve()))


@dataclass(frozen=True)
class CacheConfig:
    """What the model cache actor needs: MongoDB, the archive store, limits."""

    mongodb_uri: str
    database: str
    mongodb_timeout_seconds: float
    store: StoreConfig
    ray_cluster_url: str
    max_unpacked_bytes: int
    max_members: int
    scratch_dir: str
    """Where load tasks extract archives (removed after each load)."""
    deploy_task_retention_seconds: float
    """How long finished deploy tasks and their events are kept."""


@dataclass(frozen=True)
class LoadSpec:
    """One load: which archive, what it must hash to, how to decode it."""

    task_id: str
    model_id: str
    model_format: str
    archive_key: str
    sha256: str
    size_bytes: int
    store: StoreConfig
    max_unpacked_bytes: int
    max_members: int
    scratch_dir: str


@dataclass(frozen=True)
class LoadSummary:
    """The small second result of a load task; the weights are the first."""

    ok: bool
    node_id: str
    nbytes: int = 0
    seconds: float = 0.0
    failed_stage: str = ""
    reason: str = ""
    message: str = ""


@dataclass(frozen=True)
class DeployTicket:
    """The answer of the cache to a deploy request."""

    task_id: str
    cached: bool


UNDEPLOYED, NOT_CACHED, LOADING = "undeployed", "not_cached", "loading"
"""Outcomes of an undeploy request to the model cache."""
