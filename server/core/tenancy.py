"""Tenancy: who is calling (API keys) and what they may touch (namespaces, tiers)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from server.core.models import Caller, Namespace, Tier, utc_now
from server.core.validation import validate_namespace_id
from server.errors import (
    CustomModelsNotSupported,
    InvalidArgument,
    NamespaceNotFound,
    Unauthenticated,
)
from server.persistence.mongo import TenancyRepository

KEY_PREFIX = "msk_"


def hash_api_key(key: str) -> str:
    # Keys carry 256 random bits, so a plain SHA-256 is as strong as a slow KDF here and
    # lets a lookup use an index.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    key: str
    """The secret; shown once, never stored."""
    namespaces: tuple[str, ...]


class TenancyService:
    def __init__(self, repository: TenancyRepository) -> None:
        self._repository = repository

    async def authenticate(self, bearer_token: str | None) -> Caller:
        if not bearer_token:
            raise Unauthenticated(
                "missing API key: send 'authorization: Bearer <key>'", header="authorization"
            )
        document = await self._repository.find_active_key(hash_api_key(bearer_token))
        if document is None:
            raise Unauthenticated("the API key is unknown or revoked")
        return Caller(key_id=document["_id"], namespaces=frozenset(document["namespaces"]))

    async def authorize(self, bearer_token: str | None, namespace_id: str) -> Namespace:
        """Returns the namespace if the key may use custom models in it.

        A namespace the key is not scoped to answers NOT_FOUND, exactly like a namespace
        that does not exist, so keys cannot probe other tenants.
        """
        caller = await self.authenticate(bearer_token)
        validate_namespace_id(namespace_id)
        namespace = await self._repository.get_namespace(namespace_id) if caller.may_act_for(namespace_id) else None
        if namespace is None:
            raise NamespaceNotFound(
                f"namespace {namespace_id!r} not found", id=namespace_id, resource="namespace"
            )
        if not namespace.tier.includes_custom_models:
            raise CustomModelsNotSupported(
                f"namespace {namespace_id!r} is on the {namespace.tier.value} tier; custom models "
                f"need the {Tier.ENTERPRISE.value} tier",
                namespace_id=namespace_id, tier=namespace.tier.value, required_tier=Tier.ENTERPRISE.value,
            )
        return namespace

    async def namespace_of(self, bearer_token: str | None, namespace_id: str) -> str:
        """The namespace of a call whose path names none (the seeds' own routes): the one
        given, else the key's namespace when the key acts for exactly one."""
        if namespace_id:
            return namespace_id
        caller = await self.authenticate(bearer_token)
        if len(caller.namespaces) == 1:
            return next(iter(caller.namespaces))
        raise InvalidArgument(
            "this API key acts for several namespaces: say which one with namespace_id "
            "(a body field or a query parameter)",
            field="namespace_id",
        )

    async def create_namespace(self, namespace_id: str, tier: Tier) -> Namespace:
        validate_namespace_id(namespace_id)
        return await self._repository.create_namespace(namespace_id, tier, utc_now())

    async def issue_key(self, namespaces: list[str], label: str = "") -> IssuedKey:
        if not namespaces:
            raise InvalidArgument("a key needs at least one namespace", field="namespaces")
        for namespace_id in namespaces:
            if await self._repository.get_namespace(validate_namespace_id(namespace_id)) is None:
                raise NamespaceNotFound(f"namespace {namespace_id!r} not found", id=namespace_id)
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        await self._repository.insert_key(key_id, hash_api_key(key), list(namespaces), label, utc_now())
        return IssuedKey(key_id=key_id, key=key, namespaces=tuple(namespaces))
