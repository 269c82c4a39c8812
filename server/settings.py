"""The service's settings: one typed object, read from the environment once at start.

Every knob is an environment variable `MODELSERVICE_<FIELD>` (upper case). Empty
addresses select the embedded defaults: an nx-27017 subprocess for MongoDB, a local
directory for archives, a local Ray head. No other module reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_PREFIX = "MODELSERVICE_"
MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class Settings:
    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one (the bound port is logged and returned by the app)."""

    http_host: str = "127.0.0.1"
    """Address the Envoy gateway listens on (its admin interface stays on loopback)."""
    http_port: int = 8080
    """REST (and gRPC) port of the Envoy gateway the launcher starts; 0 picks a free one."""
    rest_gateway: bool = True
    """Whether `python -m server` starts Envoy beside the service."""

    mongodb_uri: str = ""
    """MongoDB connection string. Empty: start an embedded nx-27017 server in `data_dir`."""
    mongodb_database: str = "modelservice"
    """Database holding namespaces, api_keys, models and deployments."""
    mongodb_timeout_seconds: float = 5.0
    """Longest any MongoDB operation may take (server selection included) before it fails
    with METADATA_STORE_UNAVAILABLE."""

    s3_bucket: str = ""
    """Bucket for archives. Empty: store archives in `data_dir/archives` instead."""
    s3_endpoint_url: str = ""
    """S3 endpoint (MinIO, moto, ...). Empty: the AWS default for the region."""
    s3_region: str = "us-east-1"
    """S3 region."""
    s3_prefix: str = "archives/"
    """Key prefix of archives in the bucket."""
    s3_timeout_seconds: float = 30.0
    """Longest any single S3 request (a part upload included) may take before it fails with
    ARCHIVE_STORE_UNAVAILABLE; also the connect and read timeout of load tasks' reads."""

    ray_address: str = ""
    """Ray cluster (`host:port` of the head, or `auto`). Empty: start a local head in `data_dir`."""
    ray_object_store_bytes: int = 2 * GIB
    """Object store size of the embedded local Ray head."""
    ray_num_cpus: int = 0
    """Logical CPUs of the embedded local Ray head (0: the machine's count)."""
    ray_cluster_url: str = ""
    """Cluster address shown in deployment_info; default: `ray://<ray_address>`."""
    object_store_budget_fraction: float = 0.7
    """Share of each Ray node's object store that deployed models may take; the rest stays
    for plugins' own objects, so that the store never spills. A deploy that cannot fit even
    after evicting the least recently used unpinned models fails at the schedule stage."""
    auto_redeploy: bool = True
    """When the model cache starts on a cluster that lost its objects (Ray restarted), the
    models that were deployed load again without a call: pinned ones first, then the most
    recently used, within the admission rules, each as an AUTO_REDEPLOY deploy task."""
    alias_blue_grace_seconds: float = 300.0
    """After an alias moved to a new model ("green"), the old one ("blue") stays cached this
    long unused, so plugins still holding it are not cut off; 0 undeploys it at once. A
    pinned blue, or one another alias still points at, stays."""
    ray_timeout_seconds: float = 10.0
    """Longest a call to the model cache actor may take before it fails with RAY_UNAVAILABLE
    (waiting for a deployment to finish is not such a call)."""

    dependency_check_interval_seconds: float = 2.0
    """How often MongoDB, the archive store and Ray are probed; while one does not answer,
    gRPC health is NOT_SERVING (Envoy routes around the replica)."""
    dependency_probe_timeout_seconds: float = 3.0
    """A MongoDB or archive store probe that takes longer than this counts as down."""

    watch_poll_seconds: float = 0.05
    """How often the feed of a followed deployment reads MongoDB for new events: one reader
    per deployment and replica, however many watchers and waiting deploys follow it."""
    watch_heartbeat_seconds: float = 15.0
    """An idle watch stream gets a heartbeat event this often."""
    deploy_task_retention_seconds: float = 7 * 24 * 3600.0
    """Finished deploy and delete tasks, and deployment events, are removed this long after (TTL index)."""

    data_dir: Path = Path(".modelservice")
    """Where embedded servers and the local archive store keep their files."""

    max_archive_bytes: int = 64 * GIB
    """Largest archive accepted, compressed (ARCHIVE_TOO_LARGE above it)."""
    max_unpacked_bytes: int = 256 * GIB
    """Largest total size of the archive's files once decompressed (bomb guard)."""
    max_compression_ratio: float = 200.0
    """Largest unpacked/compressed ratio accepted past the first 64 MiB (bomb guard)."""
    max_archive_members: int = 100_000
    """Most files and directories an archive may hold."""
    multipart_part_bytes: int = 8 * MIB
    """Size of each S3 multipart part (S3 needs at least 5 MiB but for the last)."""
    multipart_parts_in_flight: int = 2
    """Parts uploading at once; memory per upload stays under (this + 1) x part size."""
    upload_lease_seconds: float = 120.0
    """An upload whose replica stopped renewing its reservation for this long is cleaned."""
    janitor_interval_seconds: float = 60.0
    """How often stale reservations and orphan multipart uploads are cleaned."""

    metrics_host: str = "127.0.0.1"
    """Address of the Prometheus `/metrics` endpoint."""
    metrics_port: int = 9464
    """Port of the Prometheus `/metrics` endpoint; 0 picks a free one, -1 turns it off."""

    grpc_max_message_bytes: int = 8 * MIB
    """Largest gRPC message accepted (upload chunks must fit)."""
    shutdown_grace_seconds: float = 10.0
    """On SIGTERM: time in-flight RPCs get to finish after health turns NOT_SERVING."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Reads `MODELSERVICE_*` variables; explicit `overrides` win over the environment."""
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = source.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field.type, raw, field.name)
        values.update(overrides)
        return cls(**values)

    @property
    def multipart_buffer_budget_bytes(self) -> int:
        """Upper bound of archive bytes one upload's writer holds in memory (a compressed
        archive has two: its inflated deploy form streams to the store beside it)."""
        return (self.multipart_parts_in_flight + 1) * self.multipart_part_bytes


def _parse(type_name: object, raw: str, name: str) -> object:
    parsers: dict[str, Any] = {"int": int, "float": float, "str": str, "Path": Path, "bool": _parse_bool}
    parser = parsers.get(str(type_name))
    if parser is None:
        raise TypeError(f"no parser for setting {name} of type {type_name}")
    try:
        return parser(raw)
    except ValueError as error:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {error}") from error


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


RAY_DRIVER_RECONNECT_SECONDS = 3600
"""How long the service's Ray driver waits for a lost head before Ray ends the process."""


def keep_ray_driver_through_head_outages() -> None:
    """Tells Ray's driver not to end this process 60 s after the cluster's head became
    unreachable (Ray's default): the service stays up, says the cluster is unavailable, and
    reconnects when the head is back. Ray reads these once, when it is first imported."""
    for knob in ("RAY_gcs_rpc_server_reconnect_timeout_s", "RAY_gcs_server_request_timeout_seconds"):
        os.environ.setdefault(knob, str(RAY_DRIVER_RECONNECT_SECONDS))
