"""Pure conversions between protobuf messages and core values. No I/O, no rules."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from modelservice.v1 import model_service_pb2 as pb

from server.core.catalog import ModelPage
from server.core.deployments import DeployOutcome, UndeployOutcome
from server.core.models import DeploymentStatus, StoredModel
from server.core.validation import UploadDeclaration
from server.deploy.specs import DeployOptions, NodeUsage
from server.persistence.aliases import Alias
from server.persistence.delete_tasks import TASK_TYPE as DELETE_TASK_TYPE
from server.persistence.delete_tasks import DeleteTask
from server.persistence.deployments import TASK_TYPE, DeploymentEvent, DeployTask


def api_key(context: Any) -> str | None:
    """The API key of a call (its gRPC servicer context)."""
    return bearer_token(context.invocation_metadata())


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The API key of `authorization: Bearer <key>` metadata, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


def declaration_from_request(request: pb.UploadModelRequest) -> UploadDeclaration:
    return UploadDeclaration(
        namespace_id=request.namespace_id,
        name=request.name,
        version=request.version,
        model_format=request.model_format,
        framework=request.framework,
        task_type=request.task_type,
        num_cpus=request.num_cpus if request.HasField("num_cpus") else None,
        num_gpus=request.num_gpus if request.HasField("num_gpus") else None,
        memory_gb=request.memory_gb if request.HasField("memory_gb") else None,
        expected_sha256=request.expected_sha256,
        input_schema=struct_field(request, "input_schema"),
        output_schema=struct_field(request, "output_schema"),
    )


def cache_status(nodes: list[NodeUsage]) -> pb.CacheStatus:
    return pb.CacheStatus(
        success=True,
        nodes=[
            pb.CacheNode(
                node_id=node.node_id,
                capacity_bytes=float(node.capacity_bytes),
                budget_bytes=float(node.budget_bytes),
                used_bytes=float(node.used_bytes),
                pinned_bytes=float(node.pinned_bytes),
                models=[
                    pb.CachedModel(
                        model_id=model.model_id, bytes=float(model.nbytes), pinned=model.pinned, loading=model.loading,
                        last_used=timestamp(datetime.datetime.fromtimestamp(model.last_used, datetime.UTC)),
                        idle_ttl_seconds=model.idle_ttl_seconds,
                    )
                    for model in node.models
                ],
            )
            for node in nodes
        ],
    )


def deploy_options(request: pb.DeployModelRequest | pb.InferenceDeployRequest | pb.MlCommonsDeployRequest) -> DeployOptions:
    """The typed options of any deploy request (fields a request lacks are left unset)."""
    if isinstance(request, pb.MlCommonsDeployRequest):
        return DeployOptions(node_ids=tuple(request.node_ids))
    return DeployOptions(
        pin=request.pin if request.HasField("pin") else None,
        idle_ttl_seconds=request.idle_ttl_seconds if request.HasField("idle_ttl_seconds") else None,
        node_ids=tuple(request.node_ids),
        all_nodes=request.all_nodes,
        config=struct_field(request, "config"),
        alias=request.alias,
    )


def upload_response(model: StoredModel) -> pb.UploadModelResponse:
    return pb.UploadModelResponse(
        success=True,
        model_id=model.model_id,
        deployment_status=DeploymentStatus.NOT_DEPLOYED.value,
        endpoint=model.endpoint,
        model_archive_url=model.archive_url,
        model_hash=model.sha256,
        size_bytes=float(model.size_bytes),
    )


def model_alias(alias: Alias) -> pb.ModelAlias:
    return pb.ModelAlias(
        namespace_id=alias.namespace_id, model_name=alias.model_name, alias=alias.alias, model_id=alias.model_id,
        previous_model_id=alias.previous_model_id, updated_at=timestamp(alias.updated_at), reference=alias.reference,
    )


def model_document(model: StoredModel, aliases: Iterable[str] = ()) -> pb.CustomModelDocument:
    metadata = model.metadata
    document = pb.CustomModelDocument(
        model_id=model.model_id,
        namespace_id=metadata.namespace_id,
        name=metadata.name,
        version=metadata.version,
        model_archive_url=model.archive_url,
        model_format=metadata.model_format.value,
        model_hash=model.sha256,
        deployed=model.deployed,
        framework=metadata.framework or "",
        task_type=metadata.task_type or "",
        resource_requirements=pb.ModelResourceRequirements(
            num_cpus=metadata.resources.num_cpus,
            num_gpus=metadata.resources.num_gpus,
            memory=float(metadata.resources.memory_bytes),
        ),
        created_at=timestamp(model.created_at),
        updated_at=timestamp(model.updated_at),
        size_bytes=float(model.size_bytes),
        weights_bytes=float(model.weights_bytes),
        deployment_status=model.deployment_status.value,
        deployment_error=model.deployment_error,
        aliases=list(aliases),
    )
    if metadata.input_schema is not None:
        document.input_schema.update(metadata.input_schema)
    if metadata.output_schema is not None:
        document.output_schema.update(metadata.output_schema)
    info = model.deployment_info
    if info is not None:
        document.deployment_info.CopyFrom(
            pb.ModelDeploymentInfo(
                ray_cluster_url=info.ray_cluster_url,
                ray_deployment_name=info.ray_deployment_name,
                endpoint=info.endpoint,
                base_image=info.base_image,
                node_ids=list(info.node_ids),
            )
        )
        if info.deployed_at is not None:
            document.deployment_info.deployed_at.CopyFrom(timestamp(info.deployed_at))
    return document


def timestamp(moment: datetime.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def struct_field(message: Any, field: str) -> dict[str, Any] | None:
    """A google.protobuf.Struct field as a dict (None when unset)."""
    if not message.HasField(field):
        return None
    value: struct_pb2.Struct = getattr(message, field)
    converted: dict[str, Any] = json_format.MessageToDict(value)
    return converted


def struct_value(value: dict[str, Any] | None) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(value or {})
    return struct


def deploy_response(outcome: DeployOutcome) -> pb.DeployModelResponse:
    return pb.DeployModelResponse(
        success=outcome.success,
        model_id=outcome.model_id,
        namespace_id=outcome.namespace_id,
        deployment_status=outcome.status.value,
        cached=outcome.cached,
        message=outcome.message,
        task_id=outcome.task_id,
    )


#: Response metadata carrying a REST status for a call that succeeded over gRPC (envoy/error_shape.lua).
HTTP_STATUS_METADATA_KEY = "x-modelservice-http-status"


def deploy_rest_metadata(outcome: DeployOutcome) -> tuple[tuple[str, str], ...]:
    """The public API answers a failed deployment with HTTP 500 (its body still the deploy response)."""
    if outcome.status is DeploymentStatus.FAILED:
        return ((HTTP_STATUS_METADATA_KEY, "500"),)
    return ()


def deploy_task(task: DeployTask) -> pb.DeployTask:
    return pb.DeployTask(
        task_id=task.task_id,
        model_id=task.model_id,
        namespace_id=task.namespace_id,
        task_type=TASK_TYPE,
        state=task.state,
        stage=task.stage,
        worker_node=task.worker_node,
        create_time=timestamp(task.create_time),
        last_update_time=timestamp(task.last_update_time),
        error=task.error,
        is_async=task.is_async,
        config=struct_value(task.config),
        reason=task.trigger,
    )


def deployment_event(event: DeploymentEvent) -> pb.DeploymentEvent:
    return pb.DeploymentEvent(
        sequence=event.sequence,
        task_id=event.task_id,
        model_id=event.model_id,
        state=event.state,
        bytes_done=float(event.bytes_done),
        bytes_total=float(event.bytes_total),
        failed_stage=event.failed_stage,
        error_reason=event.error_reason,
        message=event.message,
        time=timestamp(event.time),
        terminal=event.terminal,
    )


def model_page(page: ModelPage, aliases: dict[str, list[str]]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        success=True, models=[model_document(m, aliases.get(m.model_id, ())) for m in page.models],
        next_page_token=page.next_page_token,
    )


def delete_response(task: DeleteTask) -> pb.DeleteModelResponse:
    message = (
        "the model was deleted with its archive and cached weights" if task.finished
        else f"deletion {task.task_id} is under way; follow it with GetDeleteTask"
    )
    return pb.DeleteModelResponse(
        success=True, model_id=task.model_id, message=message, task_id=task.task_id, state=task.state
    )


def delete_rest_metadata(task: DeleteTask) -> tuple[tuple[str, str], ...]:
    """A deletion still under way answers REST callers 202 Accepted."""
    return () if task.finished else ((HTTP_STATUS_METADATA_KEY, "202"),)


def delete_task(task: DeleteTask) -> pb.DeleteTask:
    return pb.DeleteTask(
        task_id=task.task_id, model_id=task.model_id, namespace_id=task.namespace_id, task_type=DELETE_TASK_TYPE,
        state=task.state, stage=task.stage, create_time=timestamp(task.create_time),
        last_update_time=timestamp(task.last_update_time), error=task.error, is_async=task.is_async, params=struct_value(task.params),
    )


def undeploy_response(outcome: UndeployOutcome) -> pb.UndeployModelResponse:
    return pb.UndeployModelResponse(
        success=True,
        model_id=outcome.model_id,
        namespace_id=outcome.namespace_id,
        deployment_status=DeploymentStatus.NOT_DEPLOYED.value,
        was_cached=outcome.was_cached,
        message=outcome.message,
    )
