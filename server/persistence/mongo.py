"""MongoDB repositories (pymongo's AsyncMongoClient).

Coordination between replicas goes through these documents: a unique index reserves a
(namespace, name, version) before any byte flows; conditional updates flip states.
Reads never trust a stored value's type: some MongoDB-compatible servers hand back 1 for
True, or a datetime written by `$set` as a string. Times that queries compare (leases) are
stored as epoch seconds, which every server compares correctly.
"""

from __future__ import annotations

import datetime
from typing import Any

from pymongo import ASCENDING, AsyncMongoClient, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from server.core.models import (
    DeployDefaults,
    DeployForm,
    DeploymentInfo,
    DeploymentStatus,
    ModelFormat,
    ModelMetadata,
    Namespace,
    NamespaceUsage,
    Quotas,
    ResourceRequirements,
    StoredModel,
    Tier,
)
from server.errors import ModelAlreadyExists, NamespaceAlreadyExists

Document = dict[str, Any]

UPLOADING = "uploading"
READY = "ready"
DELETING = "deleting"
"""Hidden from every read; the janitor finishes a deletion its replica could not."""


def as_utc_datetime(value: Any) -> datetime.datetime:
    """A stored time as an aware UTC datetime, whatever type the server handed back."""
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if not isinstance(value, datetime.datetime):
        raise TypeError(f"not a stored time: {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value.astimezone(datetime.UTC)


def epoch_seconds(moment: datetime.datetime) -> float:
    return moment.timestamp()


def connect(uri: str, timeout_seconds: float) -> AsyncMongoClient[Document]:
    """A client whose every operation is bounded: server selection, connection and each
    operation give up after `timeout_seconds` (an outage becomes an error, not a hang)."""
    milliseconds = max(1, int(timeout_seconds * 1000))
    return AsyncMongoClient(
        uri, tz_aware=True, timeoutMS=milliseconds, serverSelectionTimeoutMS=milliseconds,
        connectTimeoutMS=milliseconds,
    )


def database(client: AsyncMongoClient[Document], name: str) -> AsyncDatabase[Document]:
    return client.get_database(name)


class ModelRepository:
    """The `models` collection: reservations while uploading, then model documents."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._models = db["models"]

    async def ensure_indexes(self) -> None:
        await self._models.create_index(
            [("namespace_id", ASCENDING), ("name", ASCENDING), ("version", ASCENDING)],
            unique=True,
            name="unique_namespace_name_version",
        )
        await self._models.create_index([("state", ASCENDING), ("lease_expires_at", ASCENDING)])

    async def reserve(
        self,
        model_id: str,
        metadata: ModelMetadata,
        archive_key: str,
        lease_expires_at: datetime.datetime,
        now: datetime.datetime,
    ) -> None:
        """Claims (namespace, name, version) for an upload; raises ModelAlreadyExists."""
        document: Document = {
            "_id": model_id,
            "state": UPLOADING,
            "namespace_id": metadata.namespace_id,
            "name": metadata.name,
            "version": metadata.version,
            "model_format": metadata.model_format.value,
            "framework": metadata.framework,
            "task_type": metadata.task_type,
            "resources": {
                "num_cpus": metadata.resources.num_cpus,
                "num_gpus": metadata.resources.num_gpus,
                "memory": metadata.resources.memory_bytes,
            },
            "input_schema": metadata.input_schema,
            "output_schema": metadata.output_schema,
            "expected_sha256": metadata.expected_sha256,
            "archive_key": archive_key,
            "upload_id": None,
            "lease_expires_at": epoch_seconds(lease_expires_at),
            "deployed": False,
            "deployment_info": None,
            "created_at": now,
            "updated_at": now,
        }
        try:
            await self._models.insert_one(document)
        except DuplicateKeyError:
            raise ModelAlreadyExists(
                f"model {metadata.name!r} version {metadata.version!r} already exists in "
                f"namespace {metadata.namespace_id!r}",
                namespace_id=metadata.namespace_id,
                name=metadata.name,
                version=metadata.version,
            ) from None

    async def record_upload_id(self, model_id: str, upload_id: str) -> None:
        await self._models.update_one(
            {"_id": model_id, "state": UPLOADING}, {"$set": {"upload_id": upload_id}}
        )

    async def renew_lease(self, model_id: str, lease_expires_at: datetime.datetime) -> None:
        await self._models.update_one(
            {"_id": model_id, "state": UPLOADING},
            {"$set": {"lease_expires_at": epoch_seconds(lease_expires_at)}},
        )

    async def finalize(
        self,
        model_id: str,
        *,
        sha256: str,
        size_bytes: int,
        archive_url: str,
        weights_bytes: int,
        now: datetime.datetime,
        deploy_form: DeployForm | None = None,
    ) -> StoredModel:
        """Turns the reservation into a ready model document."""
        document = await self._models.find_one_and_update(
            {"_id": model_id, "state": UPLOADING},
            {
                "$set": {
                    "state": READY,
                    "sha256": sha256,
                    "size_bytes": size_bytes,
                    "weights_bytes": weights_bytes,
                    "archive_url": archive_url,
                    "deploy_form": None if deploy_form is None else {
                        "key": deploy_form.key, "sha256": deploy_form.sha256, "size_bytes": deploy_form.size_bytes,
                    },
                    "created_at": now,
                    "updated_at": now,
                },
                "$unset": {"upload_id": "", "lease_expires_at": "", "expected_sha256": ""},
            },
            return_document=ReturnDocument.AFTER,
        )
        if document is None:
            raise RuntimeError(f"reservation {model_id} vanished before its upload completed")
        return model_from_document(document)

    async def release(self, model_id: str) -> None:
        """Removes a reservation whose upload failed; a ready model is never touched."""
        await self._models.delete_one({"_id": model_id, "state": UPLOADING})

    async def get(self, namespace_id: str, model_id: str) -> StoredModel | None:
        document = await self._models.find_one(
            {"_id": model_id, "namespace_id": namespace_id, "state": READY}
        )
        return None if document is None else model_from_document(document)

    async def get_any_namespace(self, model_id: str) -> StoredModel | None:
        """For in-cluster loaders, which address models by id alone."""
        document = await self._models.find_one({"_id": model_id, "state": READY})
        return None if document is None else model_from_document(document)

    async def page(self, namespace_id: str, after_model_id: str, limit: int) -> list[StoredModel]:
        """The namespace's models with ids after `after_model_id`, in id order."""
        query: Document = {"namespace_id": namespace_id, "state": READY}
        if after_model_id:
            query["_id"] = {"$gt": after_model_id}
        cursor = self._models.find(query).sort("_id", ASCENDING).limit(limit)
        return [model_from_document(document) async for document in cursor]

    async def mark_deleting(self, namespace_id: str, model_id: str, now: datetime.datetime) -> StoredModel | None:
        """Hides the model from reads and deploys; None if it was not there (or not ready)."""
        document = await self._models.find_one_and_update(
            {"_id": model_id, "namespace_id": namespace_id, "state": READY},
            {"$set": {"state": DELETING, "deleting_since": epoch_seconds(now)}},
        )
        return None if document is None else model_from_document(document)

    async def restore_ready(self, model_id: str) -> None:
        """Undoes mark_deleting when a deletion must not go on (a load is under way)."""
        await self._models.update_one({"_id": model_id, "state": DELETING}, {"$set": {"state": READY}})

    async def remove_deleted(self, model_id: str) -> None:
        await self._models.delete_one({"_id": model_id, "state": DELETING})

    async def stale_deletions(self, older_than: datetime.datetime) -> list[StoredModel]:
        cursor = self._models.find({"state": DELETING, "deleting_since": {"$lt": epoch_seconds(older_than)}})
        return [model_from_document(document) async for document in cursor]

    async def expired_reservations(self, now: datetime.datetime) -> list[Document]:
        cursor = self._models.find({"state": UPLOADING, "lease_expires_at": {"$lt": epoch_seconds(now)}})
        return [document async for document in cursor]

    async def namespace_usage(self, namespace_id: str) -> NamespaceUsage:
        """What the namespace holds, as its quotas count it (reservations count as models)."""
        models = archive_bytes = deployed_bytes = 0
        cursor = self._models.find(
            {"namespace_id": namespace_id, "state": {"$in": [UPLOADING, READY]}},
            {"state": 1, "size_bytes": 1, "weights_bytes": 1, "deployment_status": 1, "deploy_form": 1},
        )
        async for document in cursor:
            models += 1
            archive_bytes += int(document.get("size_bytes") or 0)
            archive_bytes += int((document.get("deploy_form") or {}).get("size_bytes") or 0)
            if document.get("deployment_status") in (DeploymentStatus.DEPLOYED.value, DeploymentStatus.PENDING.value):
                deployed_bytes += int(document.get("weights_bytes") or 0)
        return NamespaceUsage(models=models, archive_bytes=archive_bytes, deployed_bytes=deployed_bytes)

    async def set_deployment(
        self,
        model_id: str,
        *,
        status: DeploymentStatus,
        info: DeploymentInfo | None,
        now: datetime.datetime,
        error: str = "",
    ) -> None:
        """Records where the model's deployment stands (deployed only with `info`)."""
        info_document = None
        if info is not None:
            info_document = {
                "ray_cluster_url": info.ray_cluster_url,
                "ray_deployment_name": info.ray_deployment_name,
                "endpoint": info.endpoint,
                "base_image": info.base_image,
                "deployed_at": info.deployed_at,
                "node_ids": list(info.node_ids),
            }
        await self._models.update_one(
            {"_id": model_id, "state": READY},
            {
                "$set": {
                    "deployed": status is DeploymentStatus.DEPLOYED,
                    "deployment_status": status.value,
                    "deployment_error": error,
                    "deployment_info": info_document,
                    "updated_at": now,
                }
            },
        )

    async def deployed_model_ids(self) -> list[str]:
        cursor = self._models.find({"state": READY, "deployed": True}, {"_id": 1})
        return [doc["_id"] async for doc in cursor]

    async def record_cache_use(self, model_id: str, *, pinned: bool, last_used: float) -> None:
        """What an automatic redeploy orders by: the model's pin and its last use (epoch
        seconds), kept up to date by the model cache while the model is cached."""
        await self._models.update_one(
            {"_id": model_id, "state": READY}, {"$set": {"cache_pinned": pinned, "cache_last_used": last_used}}
        )

    async def redeploy_order(self, model_ids: list[str]) -> list[tuple[str, bool]]:
        """`(model_id, pinned)` of those models that still exist: pinned first, then the most
        recently used."""
        cursor = self._models.find(
            {"_id": {"$in": model_ids}, "state": READY}, {"_id": 1, "cache_pinned": 1, "cache_last_used": 1}
        )
        found = [
            (bool(doc.get("cache_pinned")), float(doc.get("cache_last_used") or 0.0), str(doc["_id"])) async for doc in cursor
        ]
        return [(model_id, pinned) for pinned, _, model_id in sorted(found, key=lambda item: (not item[0], -item[1]))]


def _deploy_form(stored: Any) -> DeployForm | None:
    if not stored:
        return None
    return DeployForm(key=str(stored["key"]), sha256=str(stored["sha256"]), size_bytes=int(stored["size_bytes"]))


def model_from_document(document: Document) -> StoredModel:
    resources = document.get("resources") or {}
    info = document.get("deployment_info")
    return StoredModel(
        model_id=document["_id"],
        metadata=ModelMetadata(
            namespace_id=document["namespace_id"],
            name=document["name"],
            version=document["version"],
            model_format=ModelFormat(document["model_format"]),
            framework=document.get("framework"),
            task_type=document.get("task_type"),
            resources=ResourceRequirements(
                num_cpus=float(resources.get("num_cpus", 1.0)),
                num_gpus=int(resources.get("num_gpus", 0)),
                memory_bytes=int(resources.get("memory", 4 * 1024**3)),
            ),
            expected_sha256=None,
            input_schema=document.get("input_schema"),
            output_schema=document.get("output_schema"),
        ),
        archive_url=document.get("archive_url", ""),
        archive_key=document["archive_key"],
        sha256=document.get("sha256", ""),
        size_bytes=int(document.get("size_bytes", 0)),
        weights_bytes=int(document.get("weights_bytes") or 0),
        deploy_form=_deploy_form(document.get("deploy_form")),
        deployed=bool(document.get("deployed")),
        deployment_status=DeploymentStatus(document.get("deployment_status") or DeploymentStatus.NOT_DEPLOYED.value),
        deployment_error=document.get("deployment_error") or "",
        deployment_info=None
        if not info
        else DeploymentInfo(
            ray_cluster_url=info.get("ray_cluster_url") or "",
            ray_deployment_name=info.get("ray_deployment_name") or "",
            endpoint=info.get("endpoint") or "",
            base_image=info.get("base_image") or "",
            deployed_at=as_utc_datetime(info["deployed_at"]) if info.get("deployed_at") else None,
            node_ids=tuple(info.get("node_ids") or ()),
        ),
        created_at=as_utc_datetime(document["created_at"]),
        updated_at=as_utc_datetime(document["updated_at"]),
    )


class TenancyRepository:
    """The `namespaces` and `api_keys` collections. Keys are stored as hashes only."""

    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._namespaces = db["namespaces"]
        self._keys = db["api_keys"]

    async def ensure_indexes(self) -> None:
        await self._keys.create_index("key_hash", unique=True, name="unique_key_hash")

    async def create_namespace(self, namespace_id: str, tier: Tier, now: datetime.datetime) -> Namespace:
        try:
            await self._namespaces.insert_one({"_id": namespace_id, "tier": tier.value, "created_at": now})
        except DuplicateKeyError:
            raise NamespaceAlreadyExists(
                f"namespace {namespace_id!r} already exists", namespace_id=namespace_id
            ) from None
        return Namespace(namespace_id=namespace_id, tier=tier, created_at=now)

    async def set_tier(self, namespace_id: str, tier: Tier) -> bool:
        result = await self._namespaces.update_one({"_id": namespace_id}, {"$set": {"tier": tier.value}})
        return result.matched_count == 1

    async def get_namespace(self, namespace_id: str) -> Namespace | None:
        document = await self._namespaces.find_one({"_id": namespace_id})
        if document is None:
            return None
        quotas = document.get("quotas") or {}
        defaults = document.get("deploy_defaults") or {}
        return Namespace(
            namespace_id=document["_id"],
            tier=Tier(document["tier"]),
            created_at=as_utc_datetime(document["created_at"]),
            quotas=Quotas(
                max_archive_bytes=int(quotas.get("max_archive_bytes") or 0),
                max_models=int(quotas.get("max_models") or 0),
                max_deployed_bytes=int(quotas.get("max_deployed_bytes") or 0),
            ),
            deploy_defaults=DeployDefaults(
                pin=bool(defaults.get("pin")), idle_ttl_seconds=float(defaults.get("idle_ttl_seconds") or 0.0)
            ),
        )

    async def set_deploy_defaults(self, namespace_id: str, defaults: DeployDefaults) -> bool:
        result = await self._namespaces.update_one(
            {"_id": namespace_id},
            {"$set": {"deploy_defaults": {"pin": defaults.pin, "idle_ttl_seconds": defaults.idle_ttl_seconds}}},
        )
        return result.matched_count == 1

    async def set_quotas(self, namespace_id: str, quotas: Quotas) -> bool:
        result = await self._namespaces.update_one(
            {"_id": namespace_id},
            {"$set": {"quotas": {
                "max_archive_bytes": quotas.max_archive_bytes,
                "max_models": quotas.max_models,
                "max_deployed_bytes": quotas.max_deployed_bytes,
            }}},
        )
        return result.matched_count == 1

    async def insert_key(
        self, key_id: str, key_hash: str, namespaces: list[str], label: str, now: datetime.datetime
    ) -> None:
        await self._keys.insert_one(
            {
                "_id": key_id,
                "key_hash": key_hash,
                "namespaces": namespaces,
                "label": label,
                "created_at": now,
                "revoked_at": None,
            }
        )

    async def find_active_key(self, key_hash: str) -> Document | None:
        document = await self._keys.find_one({"key_hash": key_hash})
        if document is None or document.get("revoked_at") is not None:
            return None
        return document

    async def list_keys(self, namespace_id: str | None) -> list[Document]:
        query: Document = {} if namespace_id is None else {"namespaces": namespace_id}
        cursor = self._keys.find(query, {"key_hash": 0}).sort("created_at", ASCENDING)
        return [document async for document in cursor]

    async def revoke_key(self, key_id: str, now: datetime.datetime) -> bool:
        result = await self._keys.update_one(
            {"_id": key_id, "revoked_at": None}, {"$set": {"revoked_at": now}}
        )
        return result.modified_count == 1
