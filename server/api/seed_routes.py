"""The public API's other route families, onto the same core calls:

- seed 004, the Inference Deployment Tasks API: `POST /deploy`, `GET /deploy/{task_id}`,
  `GET /deploy-status/{model_id}`, `POST /delete`, `GET /delete/{task_id}`,
  `GET /delete-status/{model_id}`, answering ModelDeploymentResponse / ModelDeletionResponse;
- seed 003, OpenSearch ML Commons: `POST /_plugins/_ml/models/{model_id}/_deploy` and
  `GET /_plugins/_ml/tasks/{task_id}` in OpenSearch's shapes.

None of these paths names a namespace: `TenancyService.namespace_of` takes it from the key
(or a `namespace_id` field). From there on the rules are the usual ones: another
namespace's model or task answers 404 exactly like a missing one.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from modelservice.v1 import model_service_pb2 as pb

from server.api.converters import (
    HTTP_STATUS_METADATA_KEY,
    api_key,
    deploy_options,
    deploy_rest_metadata,
    struct_value,
)
from server.core.catalog import ModelCatalog
from server.core.deletion import DeletionService
from server.core.deployments import DeploymentService
from server.core.tenancy import TenancyService
from server.errors import DeleteTaskNotFound, DeployTaskNotFound, InvalidArgument, ModelServiceError, TaskNotFound
from server.persistence.delete_tasks import TASK_TYPE as DELETE_TASK_TYPE
from server.persistence.delete_tasks import DeleteTask
from server.persistence.deployments import COMPLETED, CREATED, FAILED, RUNNING, TASK_TYPE, DeployTask

Context = grpc.aio.ServicerContext[Any, Any]

#: Seed 004's lower-case status of each task state.
STATUS_OF_STATE = {CREATED: "pending", RUNNING: "in_progress", COMPLETED: "completed", FAILED: "failed"}


class SeedRoutes:
    """Handlers of the seed 003 and 004 routes; mixed into the ModelService servicer."""

    _tenancy: TenancyService
    _catalog: ModelCatalog
    _deployments: DeploymentService
    _deletions: DeletionService

    # ----- seed 004 -------------------------------------------------------------------

    async def InferenceDeploy(self, request: pb.InferenceDeployRequest, context: Context) -> pb.ModelDeploymentResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        wait = request.wait if request.HasField("wait") else True
        outcome = await self._deployments.deploy(token, namespace_id, request.model_id, wait, deploy_options(request))
        task = await self._deployments.get_task(token, namespace_id, outcome.task_id)
        await context.send_initial_metadata(deploy_rest_metadata(outcome))
        return deployment_response(task, cached=outcome.cached)

    async def InferenceGetDeployTask(self, request: pb.InferenceTaskRequest, context: Context) -> pb.ModelDeploymentResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        return deployment_response(await self._deployments.get_task(token, namespace_id, request.task_id))

    async def InferenceGetDeployStatus(self, request: pb.InferenceModelRequest, context: Context) -> pb.ModelDeploymentResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        return deployment_response(await self._deployments.latest_task(token, namespace_id, request.model_id))

    async def InferenceDelete(self, request: pb.InferenceDeleteRequest, context: Context) -> pb.ModelDeletionResponse:
        params: dict[str, Any] = json_format.MessageToDict(request.body) if request.HasField("body") else {}
        model_id = params.pop("model_id", None)
        if not isinstance(model_id, str) or not model_id:
            raise InvalidArgument("the body needs a model_id (a string)", field="model_id")
        wait = params.pop("wait", True)
        if not isinstance(wait, bool):
            raise InvalidArgument("wait must be true or false", field="wait")
        body_namespace = params.pop("namespace_id", "")
        if not isinstance(body_namespace, str):
            raise InvalidArgument("namespace_id must be a string", field="namespace_id")
        token, namespace_id = await self._caller(context, body_namespace or request.namespace_id)
        task = await self._deletions.delete(token, namespace_id, model_id, wait=wait, params=params)
        if not task.finished:
            await context.send_initial_metadata(((HTTP_STATUS_METADATA_KEY, "202"),))
        return deletion_response(task)

    async def InferenceGetDeleteTask(self, request: pb.InferenceTaskRequest, context: Context) -> pb.ModelDeletionResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        return deletion_response(await self._deletions.get_task(token, namespace_id, request.task_id))

    async def InferenceGetDeleteStatus(self, request: pb.InferenceModelRequest, context: Context) -> pb.ModelDeletionResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        return deletion_response(await self._deletions.latest_task(token, namespace_id, request.model_id))

    # ----- seed 003 -------------------------------------------------------------------

    async def MlCommonsDeploy(self, request: pb.MlCommonsDeployRequest, context: Context) -> pb.MlCommonsDeployResponse:
        token, namespace_id = await self._caller(context, request.namespace_id)
        outcome = await self._deployments.deploy(token, namespace_id, request.model_id, False, deploy_options(request))
        return pb.MlCommonsDeployResponse(task_id=outcome.task_id, status=COMPLETED if outcome.cached else "DEPLOYING")

    async def MlCommonsGetTask(self, request: pb.InferenceTaskRequest, context: Context) -> pb.MlCommonsTask:
        token, namespace_id = await self._caller(context, request.namespace_id)
        task: DeployTask | DeleteTask
        try:
            task = await self._deployments.get_task(token, namespace_id, request.task_id)
        except DeployTaskNotFound:
            try:
                task = await self._deletions.get_task(token, namespace_id, request.task_id)
            except DeleteTaskNotFound:
                raise TaskNotFound(
                    f"task {request.task_id!r} not found in namespace {namespace_id!r}",
                    id=request.task_id, resource="task", namespace_id=namespace_id,
                ) from None
        return pb.MlCommonsTask(
            model_id=task.model_id,
            task_type=TASK_TYPE if isinstance(task, DeployTask) else DELETE_TASK_TYPE,
            function_name=await self._function_name(token, namespace_id, task.model_id),
            state=task.state,
            worker_node=task.worker_node if isinstance(task, DeployTask) else [],
            create_time=_epoch_millis(task.create_time),
            last_update_time=_epoch_millis(task.last_update_time),
            is_async=task.is_async,
            error=task.error,
        )

    async def _caller(self, context: Context, namespace_id: str) -> tuple[str | None, str]:
        """The call's API key, and the namespace it acts in (see the module's docstring)."""
        token = api_key(context)
        return token, await self._tenancy.namespace_of(token, namespace_id)

    async def _function_name(self, token: str | None, namespace_id: str, model_id: str) -> str:
        """OpenSearch's function name: the model's task type in upper case, if it still exists."""
        try:
            model = await self._catalog.get(token, namespace_id, model_id)
        except ModelServiceError:
            return ""
        return (model.metadata.task_type or "").upper()


def deployment_response(task: DeployTask, *, cached: bool = False) -> pb.ModelDeploymentResponse:
    return pb.ModelDeploymentResponse(
        task_id=task.task_id, status=STATUS_OF_STATE.get(task.state, task.state.lower()), model_id=task.model_id,
        metadata=struct_value({
            "namespace_id": task.namespace_id, "stage": task.stage, "error": task.error,
            "worker_node": list(task.worker_node), "is_async": task.is_async, "config": task.config,
            "create_time": task.create_time.isoformat(), "last_update_time": task.last_update_time.isoformat(),
            "cached": cached,
        }),
    )


def deletion_response(task: DeleteTask) -> pb.ModelDeletionResponse:
    return pb.ModelDeletionResponse(
        task_id=task.task_id, status=STATUS_OF_STATE.get(task.state, task.state.lower()), model_id=task.model_id,
        metadata=struct_value({
            "namespace_id": task.namespace_id, "stage": task.stage, "error": task.error, "is_async": task.is_async,
            "params": task.params or {}, "create_time": task.create_time.isoformat(),
            "last_update_time": task.last_update_time.isoformat(),
        }),
    )


def _epoch_millis(moment: Any) -> float:
    return float(round(moment.timestamp() * 1000))


