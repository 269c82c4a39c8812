"""Model aliases in MongoDB: per namespace, `(model name, alias)` → a model id of that name.

An alias is one document, replaced in one write: readers see the old target or the new
one, never neither (what makes a blue-green switch gap-free).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pymongo.asynchronous.database import AsyncDatabase

from server.persistence.mongo import Document, as_utc_datetime


@dataclass(frozen=True)
class Alias:
    namespace_id: str
    model_name: str
    alias: str
    model_id: str
    previous_model_id: str
    """The target before the last switch ("" for a new alias)."""
    updated_at: datetime.datetime

    @property
    def reference(self) -> str:
        """How plugins name it: `name@alias`."""
        return f"{self.model_name}@{self.alias}"


def _key(namespace_id: str, model_name: str, alias: str) -> str:
    return f"{namespace_id}/{model_name}@{alias}"


class AliasRepository:
    def __init__(self, db: AsyncDatabase[Document]) -> None:
        self._aliases = db["aliases"]

    async def ensure_indexes(self) -> None:
        await self._aliases.create_index([("namespace_id", 1), ("model_id", 1)], name="by_target")

    async def point(
        self, namespace_id: str, model_name: str, alias: str, model_id: str, now: datetime.datetime
    ) -> Alias:
        """Points the alias at `model_id` (creating it if needed); returns it as it now is."""
        key = _key(namespace_id, model_name, alias)
        current = await self._aliases.find_one({"_id": key})
        if current is None:
            previous = ""
        elif current["model_id"] != model_id:
            previous = str(current["model_id"])
        else:  # pointed again at the same model: keep what it replaced
            previous = str(current.get("previous_model_id") or "")
        document = {
            "_id": key, "namespace_id": namespace_id, "model_name": model_name, "alias": alias,
            "model_id": model_id, "previous_model_id": previous, "updated_at": now,
        }
        await self._aliases.replace_one({"_id": key}, document, upsert=True)
        return _alias(document)

    async def get(self, namespace_id: str, model_name: str, alias: str) -> Alias | None:
        document = await self._aliases.find_one({"_id": _key(namespace_id, model_name, alias)})
        return None if document is None else _alias(document)

    async def all_in(self, namespace_id: str) -> list[Alias]:
        cursor = self._aliases.find({"namespace_id": namespace_id}).sort("_id", 1)
        return [_alias(document) async for document in cursor]

    async def pointing_at(self, namespace_id: str, model_ids: list[str]) -> list[Alias]:
        cursor = self._aliases.find({"namespace_id": namespace_id, "model_id": {"$in": model_ids}}).sort("_id", 1)
        return [_alias(document) async for document in cursor]

    async def delete(self, namespace_id: str, model_name: str, alias: str) -> bool:
        result = await self._aliases.delete_one({"_id": _key(namespace_id, model_name, alias)})
        return result.deleted_count == 1


def _alias(document: Document) -> Alias:
    return Alias(
        namespace_id=document["namespace_id"],
        model_name=document["model_name"],
        alias=document["alias"],
        model_id=document["model_id"],
        previous_model_id=document.get("previous_model_id") or "",
        updated_at=as_utc_datetime(document["updated_at"]),
    )
