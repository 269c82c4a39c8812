"""`modelservice`: the command line for people and scripts.

    modelservice upload model.tar.gz --namespace dev --name bert --version 1 --format safetensors
    modelservice get <model_id> --namespace dev
    modelservice deploy <model_id> --namespace dev [--no-wait] [--pin | --unpin] [--idle-ttl SECONDS]
    modelservice watch <model_id> --namespace dev
    modelservice tasks --namespace dev (--task <task_id> | --model <model_id>)
    modelservice list --namespace dev
    modelservice undeploy <model_id> --namespace dev
    modelservice cache --namespace dev
    modelservice delete <model_id> --namespace dev

Connection: --address / MODELSERVICE_ADDRESS (default 127.0.0.1:50051; an Envoy port works
too) and --api-key / MODELSERVICE_API_KEY. Human output by default; --json prints the
responses as the REST API spells them. Exit codes: 0 success, 1 the service refused or the
deployment failed, 2 bad usage, 3 the service is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from modelservice_sdk.client import ModelServiceClient, ServiceError, UploadFields, file_sha256, message_to_json

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
MIB = 1024 * 1024


class ProgressBar:
    """Bytes, percentage, rate and ETA on one line (redrawn on a terminal, else every 10%)."""

    def __init__(self, total: int, stream: TextIO, label: str) -> None:
        self._total = max(total, 1)
        self._stream = stream
        self._label = label
        self._started = time.monotonic()
        self._interactive = stream.isatty()
        self._last_decile = -1
        self._last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        fraction = done / self._total
        decile = int(fraction * 10)
        if self._interactive and now - self._last_draw < 0.1 and done < self._total:
            return
        if not self._interactive and decile == self._last_decile and done < self._total:
            return
        self._last_draw, self._last_decile = now, decile
        elapsed = max(now - self._started, 1e-6)
        rate = done / elapsed
        eta = (self._total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(fraction * width)
        line = (
            f"{self._label} [{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% "
            f"{done / MIB:.1f}/{self._total / MIB:.1f} MiB  {rate / MIB:.1f} MiB/s  ETA {_clock(eta)}"
        )
        self._stream.write(("\r" + line) if self._interactive else (line + "\n"))
        if self._interactive and done >= self._total:
            self._stream.write("\n")
        self._stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("MODELSERVICE_ADDRESS", "127.0.0.1:50051"))
    common.add_argument("--api-key", default=os.environ.get("MODELSERVICE_API_KEY"))
    common.add_argument("--namespace", "-n", required=True, help="namespace id")
    common.add_argument("--json", action="store_true", help="print JSON (REST field names) instead of text")
    parser = argparse.ArgumentParser(prog="modelservice", description="Upload, inspect and deploy custom models.")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", parents=[common], help="upload a model archive")
    upload.add_argument("archive", type=Path)
    upload.add_argument("--name", required=True)
    upload.add_argument("--version", required=True)
    upload.add_argument("--format", dest="model_format", required=True, choices=["safetensors", "onnx", "pytorch", "huggingface"])
    upload.add_argument("--framework", default="")
    upload.add_argument("--task-type", default="")
    upload.add_argument("--num-cpus", type=float)
    upload.add_argument("--num-gpus", type=int)
    upload.add_argument("--memory-gb", type=float)
    get = commands.add_parser("get", parents=[common], help="show a model")
    get.add_argument("model_id")
    deploy = commands.add_parser("deploy", parents=[common], help="load a model into the Ray object store")
    deploy.add_argument("model_id")
    deploy.add_argument("--no-wait", action="store_true", help="return at once with the task id")
    pinning = deploy.add_mutually_exclusive_group()
    pinning.add_argument("--pin", dest="pin", action="store_const", const=True, help="never evict this model")
    pinning.add_argument("--unpin", dest="pin", action="store_const", const=False, help="let it be evicted again")
    deploy.add_argument(
        "--idle-ttl", type=float, default=None, metavar="SECONDS", help="undeploy after this long unused (0: never)"
    )
    deploy.add_argument(
        "--node", dest="node_ids", action="append", default=[], metavar="NODE_ID",
        help="load on this Ray node (repeat for a choice of nodes)",
    )
    deploy.add_argument("--all-nodes", action="store_true", help="put a copy in every node's object store")
    deploy.add_argument(
        "--alias", default="", metavar="ALIAS",
        help="blue-green: point this alias of the model's name at it once it is deployed",
    )
    alias = commands.add_parser("alias", parents=[common], help="set, show, list or delete model aliases")
    alias.add_argument("action", choices=["set", "get", "list", "delete"])
    alias.add_argument("reference", nargs="?", default="", help="<model name>@<alias> (all but list)")
    alias.add_argument("model_id", nargs="?", default="", help="the model to point at (set)")
    watch = commands.add_parser("watch", parents=[common], help="follow a deployment live")
    watch.add_argument("model_id")
    watch.add_argument("--task", default="", help="a deploy task id (default: the latest)")
    watch.add_argument("--after", type=int, default=0, help="resume after this sequence number")
    listing = commands.add_parser("list", parents=[common], help="list the namespace's models")
    listing.add_argument("--page-size", type=int, default=0)
    listing.add_argument("--page-token", default="")
    undeploy = commands.add_parser("undeploy", parents=[common], help="drop a model's weights from the object store")
    undeploy.add_argument("model_id")
    delete = commands.add_parser("delete", parents=[common], help="delete a model, its archive and cached weights")
    delete.add_argument("model_id")
    delete.add_argument("--no-wait", action="store_true", help="return at once with the delete task id")
    commands.add_parser("cache", parents=[common], help="show the object store per Ray node and the namespace's cached models")
    tasks = commands.add_parser("tasks", parents=[common], help="show a deploy (or delete) task")
    which = tasks.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="task id")
    which.add_argument("--model", help="model id (its latest task of that kind)")
    tasks.add_argument("--delete", action="store_true", help="a delete task rather than a deploy task")
    return parser


async def run(arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if not arguments.api_key:
        err.write("error: no API key: pass --api-key or set MODELSERVICE_API_KEY\n")
        return EXIT_USAGE
    async with ModelServiceClient(arguments.address, arguments.api_key) as client:
        command = arguments.command
        if command == "upload":
            return await _upload(client, arguments, out, err)
        if command == "get":
            return _show(await client.get_model(arguments.namespace, arguments.model_id), arguments, out, _describe_model)
        if command == "deploy":
            response = await client.deploy_model(
                arguments.namespace, arguments.model_id, wait=not arguments.no_wait,
                pin=arguments.pin, idle_ttl_seconds=arguments.idle_ttl,
                node_ids=arguments.node_ids, all_nodes=arguments.all_nodes, alias=arguments.alias,
            )
            _show(response, arguments, out, _describe_deploy)
            return EXIT_OK if response.success else EXIT_REFUSED
        if command == "watch":
            return await _watch(client, arguments, out)
        if command == "list":
            page = await client.list_models(arguments.namespace, page_size=arguments.page_size, page_token=arguments.page_token)
            return _show(page, arguments, out, _describe_page)
        if command == "undeploy":
            undeployed = await client.undeploy_model(arguments.namespace, arguments.model_id)
            return _show(undeployed, arguments, out, lambda body: str(body["message"]))
        if command == "cache":
            return _show(await client.get_cache_status(arguments.namespace), arguments, out, _describe_cache)
        if command == "alias":
            return await _alias(client, arguments, out, err)
        if command == "delete":
            deleted = await client.delete_model(arguments.namespace, arguments.model_id, wait=not arguments.no_wait)
            return _show(deleted, arguments, out, lambda body: f"{body['message']} (task {body['task_id']})")
        task: Any
        if arguments.delete:
            task = (
                await client.get_delete_task(arguments.namespace, arguments.task)
                if arguments.task
                else await client.get_model_delete_status(arguments.namespace, arguments.model)
            )
        else:
            task = (
                await client.get_deploy_task(arguments.namespace, arguments.task)
                if arguments.task
                else await client.get_model_deploy_status(arguments.namespace, arguments.model)
            )
        return _show(task, arguments, out, _describe_task)


async def _upload(client: ModelServiceClient, arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    archive: Path = arguments.archive
    if not archive.is_file():
        err.write(f"error: {archive} is not a file\n")
        return EXIT_USAGE
    digest = await asyncio.to_thread(file_sha256, archive)
    if not arguments.json:
        err.write(f"sha256 {digest}  {archive.name}\n")
    fields = UploadFields(
        namespace_id=arguments.namespace, name=arguments.name, version=arguments.version,
        model_format=arguments.model_format, framework=arguments.framework, task_type=arguments.task_type,
        num_cpus=arguments.num_cpus, num_gpus=arguments.num_gpus, memory_gb=arguments.memory_gb,
        expected_sha256=digest,
    )
    progress = ProgressBar(archive.stat().st_size, err, "upload")
    response = await client.upload_file(archive, fields, progress=progress)
    return _show(response, arguments, out, lambda r: f"uploaded {r['model_id']} ({r['model_hash']}, {r['deployment_status']})")


async def _watch(client: ModelServiceClient, arguments: argparse.Namespace, out: TextIO) -> int:
    last_state = ""
    async for event in client.watch_deployment(
        arguments.namespace, arguments.model_id, after_sequence=arguments.after, task_id=arguments.task
    ):
        last_state = event.state
        if arguments.json:
            out.write(json.dumps(message_to_json(event)) + "\n")
        elif event.state != "heartbeat":
            out.write(_describe_event(message_to_json(event)) + "\n")
        out.flush()
    return EXIT_REFUSED if last_state == "failed" else EXIT_OK


def _show(message: Any, arguments: argparse.Namespace, out: TextIO, describe: Any) -> int:
    body = message_to_json(message)
    out.write((json.dumps(body, indent=2) if arguments.json else describe(body)) + "\n")
    return EXIT_OK


def _describe_model(body: dict[str, Any]) -> str:
    model = body["model"]
    resources = model["resource_requirements"]
    lines = [
        f"{model['model_id']}  {model['name']}:{model['version']}  ({model['model_format']})",
        f"  namespace   {model['namespace_id']}",
        f"  sha256      {model['model_hash']}",
        f"  archive     {model['model_archive_url']} ({int(model['size_bytes'])} bytes)",
        f"  resources   {resources['num_cpus']:g} CPU, {resources['num_gpus']} GPU, {int(resources['memory'])} bytes",
        f"  deployed    {'yes' if model['deployed'] else 'no'}",
    ]
    info = model.get("deployment_info")
    if info:
        lines.append(f"  load with   {info['endpoint']} on {info['ray_cluster_url']} (since {info.get('deployed_at', '?')})")
        lines.append(f"  on nodes    {', '.join(info.get('node_ids') or []) or '?'}")
    if model.get("aliases"):
        lines.append(f"  aliases     {', '.join(model['name'] + '@' + alias for alias in model['aliases'])}")
    return "\n".join(lines)


def _describe_page(body: dict[str, Any]) -> str:
    lines = [
        f"{m['model_id']}  {m['name']}:{m['version']}  {m['model_format']:<11} {m['deployment_status']}"
        for m in body["models"]
    ]
    if body["next_page_token"]:
        lines.append(f"(more: --page-token {body['next_page_token']})")
    return "\n".join(lines) or "no models"


def _describe_cache(body: dict[str, Any]) -> str:
    lines = []
    for node in body["nodes"]:
        lines.append(
            f"node {node['node_id']}: {_mib(node['used_bytes'])} of {_mib(node['budget_bytes'])} budget used "
            f"({_mib(node['pinned_bytes'])} pinned or loading; object store {_mib(node['capacity_bytes'])})"
        )
        for model in node["models"]:
            flags = ", ".join(flag for flag in ("pinned", "loading") if model[flag])
            ttl = f", idle ttl {model['idle_ttl_seconds']:g}s" if model["idle_ttl_seconds"] else ""
            lines.append(f"  {model['model_id']}  {_mib(model['bytes'])}  last used {model['last_used']}{ttl}{' (' + flags + ')' if flags else ''}")
    return "\n".join(lines) or "no Ray node with an object store"


def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _describe_deploy(body: dict[str, Any]) -> str:
    cached = " (already cached)" if body["cached"] else ""
    return f"{body['deployment_status']}{cached}: {body['message']}  [task {body['task_id']}]"


async def _alias(client: ModelServiceClient, arguments: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    namespace, action = arguments.namespace, arguments.action
    if action == "list":
        return _show(await client.list_aliases(namespace), arguments, out, _describe_aliases)
    model_name, _, alias = arguments.reference.rpartition("@")
    if not model_name or not alias or (action == "set") != bool(arguments.model_id):
        err.write("error: alias set <name>@<alias> <model_id> | alias get|delete <name>@<alias> | alias list\n")
        return EXIT_USAGE
    if action == "set":
        answer: Any = await client.set_alias(namespace, model_name, alias, arguments.model_id)
    elif action == "get":
        answer = await client.get_alias(namespace, model_name, alias)
    else:
        return _show(await client.delete_alias(namespace, model_name, alias), arguments, out, lambda body: str(body["message"]))
    return _show(answer, arguments, out, _describe_alias)


def _describe_alias(body: dict[str, Any]) -> str:
    was = f" (was {body['previous_model_id']})" if body["previous_model_id"] else ""
    return f"{body['reference']} -> {body['model_id']}{was}"


def _describe_aliases(body: dict[str, Any]) -> str:
    return "\n".join(_describe_alias(alias) for alias in body["aliases"]) or "no aliases"


def _describe_task(body: dict[str, Any]) -> str:
    error = f"  error: {body['error']}" if body["error"] else ""
    return f"task {body['task_id']}  {body['state']} ({body['stage']})  model {body['model_id']}{error}"


def _describe_event(event: dict[str, Any]) -> str:
    detail = ""
    if event["state"] == "downloading" and event["bytes_total"]:
        detail = f"{event['bytes_done'] / MIB:.1f}/{event['bytes_total'] / MIB:.1f} MiB"
    elif event["state"] == "failed":
        detail = f"at {event['failed_stage']}: {event['error_reason']}: {event['message']}"
    elif event["message"]:
        detail = event["message"]
    return f"#{event['sequence']:<3} {event['time']}  {event['state']:<11} {detail}".rstrip()


def main(argv: Sequence[str] | None = None) -> None:
    arguments = _parser().parse_args(argv)
    try:
        code = asyncio.run(run(arguments, sys.stdout, sys.stderr))
    except ServiceError as error:
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            sys.stderr.write(f"error: cannot reach modelservice at {arguments.address}: {error.message}\n")
            raise SystemExit(EXIT_UNREACHABLE) from None
        sys.stderr.write(f"error: {error.reason or error.code.name}: {error.message}\n")
        if error.metadata:
            sys.stderr.write("       " + ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items())) + "\n")
        raise SystemExit(EXIT_REFUSED) from None
    raise SystemExit(code)


if __name__ == "__main__":
    main()
