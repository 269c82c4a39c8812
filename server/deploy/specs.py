"""Plain, picklable descriptions passed from the service to Ray (actor and tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.deploy.cache_policy import Resident
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
    object_store_budget_fraction: float = 0.7
    """Share of each node's object store that cached models may take."""
    auto_redeploy: bool = True
    """Load again, without a call, the deployed models whose weights the cluster lost."""
    alias_blue_grace_seconds: float = 300.0
    """How long a model an alias moved away from stays cached (unused) before it leaves."""


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
class DeployOptions:
    """What a deploy asks of the cache beyond the load (None: leave as is / the default)."""

    pin: bool | None = None
    idle_ttl_seconds: float | None = None
    node_ids: tuple[str, ...] = ()
    """Ray nodes the load may go to (empty: any)."""
    all_nodes: bool = False
    """Also put a copy in the object store of every other alive node."""
    config: dict[str, Any] | None = None
    """Free-form deployment parameters, kept on the deploy task."""
    trigger: str = ""
    """Why the deploy happens when no one asked: AUTO_REDEPLOY ("" for a request)."""
    alias: str = ""
    """Blue-green: point this alias of the model's name at it once it is deployed."""
    default_pin: bool = False
    default_idle_ttl_seconds: float = 0.0
    """The namespace's defaults, for a new load whose request left pin or the time-out unset."""


@dataclass(frozen=True)
class NodeUsage:
    """One Ray node's object store, as the model cache manages it."""

    node_id: str
    capacity_bytes: int
    budget_bytes: int
    used_bytes: int
    pinned_bytes: int
    models: list[Resident]
    """Every resident model of the node, least recently used first."""


LOAD_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Histogram buckets (upper bounds, seconds) of the time a load spends in each stage."""


@dataclass
class StageTimes:
    """A histogram of how long one load stage took: cumulative counts per bucket."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LOAD_SECONDS_BUCKETS))
    count: int = 0
    total_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_seconds += seconds
        for index, bound in enumerate(LOAD_SECONDS_BUCKETS):
            if seconds <= bound:
                self.bucket_counts[index] += 1


@dataclass
class CacheCounters:
    """What the cache did since it started (counters only grow; a new cache starts at 0)."""

    loads: dict[str, int] = field(default_factory=dict)
    """Finished loads by outcome: "deployed", "failed"."""
    evictions: dict[str, int] = field(default_factory=dict)
    """Models let go by reason: "lru" (room for another), "idle_ttl"."""
    admission_refusals: int = 0
    lookups: dict[str, int] = field(default_factory=dict)
    """Plugin loads by result: "hit" (cached), "miss" (loaded on demand)."""
    stage_seconds: dict[str, StageTimes] = field(default_factory=dict)

    def add(self, counter: dict[str, int], key: str) -> None:
        counter[key] = counter.get(key, 0) + 1


@dataclass(frozen=True)
class CacheSnapshot:
    """The cache's counters and its nodes, read by the service for /metrics."""

    counters: CacheCounters
    nodes: list[NodeUsage]


@dataclass(frozen=True)
class DeployTicket:
    """The answer of the cache to a deploy request."""

    task_id: str
    cached: bool


UNDEPLOYED, NOT_CACHED, LOADING = "undeployed", "not_cached", "loading"
"""Outcomes of an undeploy request to the model cache."""
