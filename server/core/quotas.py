"""Per-namespace quotas: stored archive bytes, number of models, deployed object-store bytes.

Checked before the work they limit starts: an upload over the model count or with no
storage left is refused before any byte flows (and one that outgrows the storage left is
stopped as soon as it does); a deploy over the deployed-bytes quota is refused before it
loads. Checks read the current usage, so two requests racing for the last room may both
pass: quotas bound what a namespace holds, they are not a lock.
"""

from __future__ import annotations

from server.core.models import Namespace, NamespaceUsage, Quotas
from server.errors import QuotaExceeded

NO_USAGE = NamespaceUsage(models=0, archive_bytes=0, deployed_bytes=0)
"""What the checks see of a namespace without the quota in question (usage never read)."""


def check_new_model(namespace: Namespace, usage: NamespaceUsage) -> None:
    quotas = namespace.quotas
    if quotas.max_models and usage.models >= quotas.max_models:
        _exceeded(namespace, "max_models", quotas.max_models, usage.models, "models")
    if quotas.max_archive_bytes and usage.archive_bytes >= quotas.max_archive_bytes:
        _exceeded(namespace, "max_archive_bytes", quotas.max_archive_bytes, usage.archive_bytes, "bytes of archives")


def archive_bytes_left(quotas: Quotas, usage: NamespaceUsage) -> int | None:
    """How many more archive bytes the namespace may store (None: no limit)."""
    return None if not quotas.max_archive_bytes else max(0, quotas.max_archive_bytes - usage.archive_bytes)


def archive_over_quota(namespace: Namespace, usage: NamespaceUsage, size: int) -> QuotaExceeded:
    return _error(namespace, "max_archive_bytes", namespace.quotas.max_archive_bytes, usage.archive_bytes + size,
                  "bytes of archives with this upload")


def check_deploy(namespace: Namespace, usage: NamespaceUsage, weights_bytes: int) -> None:
    quotas = namespace.quotas
    if quotas.max_deployed_bytes and usage.deployed_bytes + weights_bytes > quotas.max_deployed_bytes:
        _exceeded(
            namespace, "max_deployed_bytes", quotas.max_deployed_bytes, usage.deployed_bytes + weights_bytes,
            "bytes deployed with this model",
        )


def _error(namespace: Namespace, quota: str, limit: int, usage: int, what: str) -> QuotaExceeded:
    return QuotaExceeded(
        f"namespace {namespace.namespace_id!r} is over its {quota} quota: {usage} {what}, the limit is {limit}",
        namespace_id=namespace.namespace_id, quota=quota, limit=limit, usage=usage,
    )


def _exceeded(namespace: Namespace, quota: str, limit: int, usage: int, what: str) -> None:
    raise _error(namespace, quota, limit, usage, what)
