"""Aliases: named pointers (e.g. `production`) at one model of a model name.

Plugins load `name@alias`; a blue-green promotion is a deploy with `alias` (the cache
actor switches the alias once the new model is deployed). Every alias write goes through
the model cache actor, which resolves plugins' references from what it wrote; this
service reads aliases from MongoDB directly.
"""

from __future__ import annotations

import re
from typing import Protocol

from server.core.catalog import ModelCatalog
from server.core.tenancy import TenancyService
from server.errors import AliasNotFound, InvalidArgument
from server.persistence.aliases import Alias, AliasRepository

_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias):
        raise InvalidArgument(
            "an alias is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit", field="alias"
        )
    return alias


class AliasWriter(Protocol):
    """The model cache: the one writer of aliases."""

    async def point_alias(self, namespace_id: str, model_name: str, alias: str, model_id: str) -> str: ...

    async def delete_alias(self, namespace_id: str, model_name: str, alias: str) -> bool: ...


class AliasService:
    def __init__(
        self, tenancy: TenancyService, catalog: ModelCatalog, aliases: AliasRepository, writer: AliasWriter
    ) -> None:
        self._tenancy = tenancy
        self._catalog = catalog
        self._aliases = aliases
        self._writer = writer

    async def set(self, bearer_token: str | None, namespace_id: str, model_name: str, alias: str, model_id: str) -> Alias:
        """Points the alias at the model now (no deploy)."""
        model = await self._catalog.get(bearer_token, namespace_id, model_id)
        validate_alias(alias)
        if model.metadata.name != model_name:
            raise InvalidArgument(
                f"model {model_id!r} is named {model.metadata.name!r}, not {model_name!r}: an alias of a model "
                "name points at a model of that name", field="model_id",
            )
        await self._writer.point_alias(namespace_id, model_name, alias, model_id)
        return await self.get(bearer_token, namespace_id, model_name, alias)

    async def get(self, bearer_token: str | None, namespace_id: str, model_name: str, alias: str) -> Alias:
        await self._tenancy.authorize(bearer_token, namespace_id)
        found = await self._aliases.get(namespace_id, model_name, alias)
        if found is None:
            raise AliasNotFound(
                f"alias {model_name}@{alias} not found in namespace {namespace_id!r}",
                id=f"{model_name}@{alias}", resource="alias", namespace_id=namespace_id,
            )
        return found

    async def all_in(self, bearer_token: str | None, namespace_id: str) -> list[Alias]:
        await self._tenancy.authorize(bearer_token, namespace_id)
        return await self._aliases.all_in(namespace_id)

    async def delete(self, bearer_token: str | None, namespace_id: str, model_name: str, alias: str) -> None:
        await self.get(bearer_token, namespace_id, model_name, alias)
        await self._writer.delete_alias(namespace_id, model_name, alias)

    async def pointing_at(self, namespace_id: str, model_ids: list[str]) -> dict[str, list[str]]:
        """The aliases (names) pointing at each of these models."""
        found: dict[str, list[str]] = {}
        for alias in await self._aliases.pointing_at(namespace_id, model_ids):
            found.setdefault(alias.model_id, []).append(alias.alias)
        return found
