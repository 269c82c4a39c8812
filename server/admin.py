"""Administration of tenants: namespaces (with their tier and quotas) and API keys.

    python -m server.admin create-namespace acme --tier enterprise
    python -m server.admin create-key --namespace acme --label ci
    python -m server.admin list-keys [--namespace acme]
    python -m server.admin revoke-key <key_id>
    python -m server.admin set-tier acme pro
    python -m server.admin set-quota acme --max-models 100 --max-archive-bytes 107374182400 --max-deployed-bytes 0
    python -m server.admin show-quota acme
    python -m server.admin set-deploy-defaults acme --pin --idle-ttl 3600

It talks to MongoDB directly: `MODELSERVICE_MONGODB_URI`, or, when the service runs with its
embedded MongoDB, the address that the running service wrote to `<data_dir>/mongodb/uri`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pymongo import AsyncMongoClient

from server.core.models import DeployDefaults, Tier, utc_now
from server.core.tenancy import TenancyService
from server.errors import ModelServiceError
from server.persistence.mongo import ModelRepository, TenancyRepository, connect, database
from server.settings import Settings

URI_FILE = Path("mongodb") / "uri"


def mongodb_uri(settings: Settings) -> str:
    if settings.mongodb_uri:
        return settings.mongodb_uri
    uri_file = settings.data_dir / URI_FILE
    if not uri_file.exists():
        raise SystemExit(
            "no MongoDB to talk to: set MODELSERVICE_MONGODB_URI, or start the service "
            f"(it writes the embedded server's address to {uri_file})"
        )
    return uri_file.read_text().strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modelservice-admin", description="Manage namespaces and API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    create_ns = commands.add_parser("create-namespace", help="create a namespace")
    create_ns.add_argument("namespace_id")
    create_ns.add_argument("--tier", choices=[t.value for t in Tier], default=Tier.ENTERPRISE.value)
    set_tier = commands.add_parser("set-tier", help="change a namespace's tier")
    set_tier.add_argument("namespace_id")
    set_tier.add_argument("tier", choices=[t.value for t in Tier])
    create_key = commands.add_parser("create-key", help="issue an API key (printed once)")
    create_key.add_argument("--namespace", action="append", required=True, dest="namespaces")
    create_key.add_argument("--label", default="")
    list_keys = commands.add_parser("list-keys", help="list keys (never their secrets)")
    list_keys.add_argument("--namespace", default=None)
    revoke = commands.add_parser("revoke-key", help="revoke a key by its id")
    revoke.add_argument("key_id")
    set_quota = commands.add_parser("set-quota", help="set a namespace's quotas (0: unlimited; unset: unchanged)")
    set_quota.add_argument("namespace_id")
    for flag in ("--max-archive-bytes", "--max-models", "--max-deployed-bytes"):
        set_quota.add_argument(flag, type=_non_negative_int, default=None)
    show_quota = commands.add_parser("show-quota", help="show a namespace's quotas, deploy defaults and usage")
    show_quota.add_argument("namespace_id")
    defaults = commands.add_parser(
        "set-deploy-defaults", help="what the namespace's deploys get when they do not say (pin, idle time-out)"
    )
    defaults.add_argument("namespace_id")
    pinning = defaults.add_mutually_exclusive_group()
    pinning.add_argument("--pin", dest="pin", action="store_const", const=True)
    pinning.add_argument("--no-pin", dest="pin", action="store_const", const=False)
    defaults.add_argument("--idle-ttl", type=float, default=None, metavar="SECONDS", help="0: never")
    return parser


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (unlimited) or more")
    return value


async def run(arguments: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = connect(mongodb_uri(settings), settings.mongodb_timeout_seconds)
    try:
        db = database(client, settings.mongodb_database)
        repository = TenancyRepository(db)
        await repository.ensure_indexes()
        tenancy = TenancyService(repository)
        if arguments.command in ("set-quota", "show-quota", "set-deploy-defaults"):
            return await _quota(arguments, repository, ModelRepository(db))
        if arguments.command == "create-namespace":
            namespace = await tenancy.create_namespace(arguments.namespace_id, Tier(arguments.tier))
            return {"namespace_id": namespace.namespace_id, "tier": namespace.tier.value}
        if arguments.command == "set-tier":
            if not await repository.set_tier(arguments.namespace_id, Tier(arguments.tier)):
                raise SystemExit(f"namespace {arguments.namespace_id!r} not found")
            return {"namespace_id": arguments.namespace_id, "tier": arguments.tier}
        if arguments.command == "create-key":
            issued = await tenancy.issue_key(arguments.namespaces, arguments.label)
            return {"key_id": issued.key_id, "api_key": issued.key, "namespaces": list(issued.namespaces)}
        if arguments.command == "list-keys":
            keys = await repository.list_keys(arguments.namespace)
            return {
                "keys": [
                    {
                        "key_id": key["_id"],
                        "namespaces": key["namespaces"],
                        "label": key.get("label", ""),
                        "created_at": str(key.get("created_at")),
                        "revoked": key.get("revoked_at") is not None,
                    }
                    for key in keys
                ]
            }
        if not await repository.revoke_key(arguments.key_id, utc_now()):
            raise SystemExit(f"no active key {arguments.key_id!r}")
        return {"key_id": arguments.key_id, "revoked": True}
    finally:
        await client.close()


async def _quota(arguments: argparse.Namespace, tenancy: TenancyRepository, models: ModelRepository) -> dict[str, Any]:
    namespace = await tenancy.get_namespace(arguments.namespace_id)
    if namespace is None:
        raise SystemExit(f"namespace {arguments.namespace_id!r} not found")
    quotas, defaults = namespace.quotas, namespace.deploy_defaults
    if arguments.command == "set-deploy-defaults":
        if arguments.idle_ttl is not None and not arguments.idle_ttl >= 0:
            raise SystemExit("--idle-ttl must be 0 (never) or more seconds")
        defaults = DeployDefaults(
            pin=defaults.pin if arguments.pin is None else arguments.pin,
            idle_ttl_seconds=defaults.idle_ttl_seconds if arguments.idle_ttl is None else arguments.idle_ttl,
        )
        await tenancy.set_deploy_defaults(namespace.namespace_id, defaults)
    if arguments.command == "set-quota":
        changes = {
            field: value
            for field, value in (
                ("max_archive_bytes", arguments.max_archive_bytes),
                ("max_models", arguments.max_models),
                ("max_deployed_bytes", arguments.max_deployed_bytes),
            )
            if value is not None
        }
        quotas = dataclasses.replace(quotas, **changes)
        await tenancy.set_quotas(namespace.namespace_id, quotas)
    usage = await models.namespace_usage(namespace.namespace_id)
    return {
        "namespace_id": namespace.namespace_id,
        "quotas": dataclasses.asdict(quotas),
        "deploy_defaults": dataclasses.asdict(defaults),
        "usage": {"models": usage.models, "archive_bytes": usage.archive_bytes, "deployed_bytes": usage.deployed_bytes},
    }


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _parser().parse_args(argv)
    try:
        result = asyncio.run(run(arguments, Settings.from_env()))
    except ModelServiceError as error:
        print(f"error: {error.reason}: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
