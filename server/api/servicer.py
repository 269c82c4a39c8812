"""The ModelService servicer: request -> one core call -> response. Nothing else.

The seeds' other route families (seed 003, seed 004) are in `server.api.seed_routes`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from modelservice.v1 import model_service_pb2 as pb
from modelservice.v1 import model_service_pb2_grpc as pb_grpc

from server.api import converters
from server.api.seed_routes import SeedRoutes
from server.api.upload_stream import open_upload_stream
from server.core.aliases import AliasService
from server.core.catalog import ModelCatalog
from server.core.deletion import DeletionService
from server.core.deployments import DeploymentService
from server.core.tenancy import TenancyService
from server.core.uploads import UploadService

Context = grpc.aio.ServicerContext[Any, Any]


class ModelServiceServicer(SeedRoutes, pb_grpc.ModelServiceServicer):
    def __init__(
        self,
        tenancy: TenancyService,
        uploads: UploadService,
        catalog: ModelCatalog,
        deployments: DeploymentService,
        deletions: DeletionService,
        aliases: AliasService,
    ) -> None:
        self._tenancy = tenancy
        self._aliases = aliases
        self._uploads = uploads
        self._catalog = catalog
        self._deletions = deletions
        self._deployments = deployments

    async def UploadModel(
        self, request_iterator: AsyncIterator[pb.UploadModelRequest], context: Context
    ) -> pb.UploadModelResponse:
        upload = await open_upload_stream(request_iterator)
        token = converters.api_key(context)
        model = await self._uploads.upload(token, upload.namespace_id, upload.read_declaration)
        return converters.upload_response(model)

    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.GetModelResponse:
        token = converters.api_key(context)
        model = await self._catalog.get(token, request.namespace_id, request.model_id)
        aliases = await self._aliases.pointing_at(request.namespace_id, [model.model_id])
        return pb.GetModelResponse(success=True, model=converters.model_document(model, aliases.get(model.model_id, ())))

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        token = converters.api_key(context)
        page = await self._catalog.page(token, request.namespace_id, request.page_size, request.page_token)
        aliases = await self._aliases.pointing_at(request.namespace_id, [model.model_id for model in page.models])
        return converters.model_page(page, aliases)

    async def SetAlias(self, request: pb.SetAliasRequest, context: Context) -> pb.ModelAlias:
        alias = await self._aliases.set(
            converters.api_key(context), request.namespace_id, request.model_name, request.alias, request.model_id
        )
        return converters.model_alias(alias)

    async def GetAlias(self, request: pb.AliasRequest, context: Context) -> pb.ModelAlias:
        alias = await self._aliases.get(converters.api_key(context), request.namespace_id, request.model_name, request.alias)
        return converters.model_alias(alias)

    async def ListAliases(self, request: pb.ListAliasesRequest, context: Context) -> pb.ListAliasesResponse:
        aliases = await self._aliases.all_in(converters.api_key(context), request.namespace_id)
        return pb.ListAliasesResponse(success=True, aliases=[converters.model_alias(alias) for alias in aliases])

    async def DeleteAlias(self, request: pb.AliasRequest, context: Context) -> pb.DeleteAliasResponse:
        await self._aliases.delete(converters.api_key(context), request.namespace_id, request.model_name, request.alias)
        return pb.DeleteAliasResponse(
            success=True, message=f"alias {request.model_name}@{request.alias} deleted; its model stays"
        )

    async def DeleteModel(self, request: pb.DeleteModelRequest, context: Context) -> pb.DeleteModelResponse:
        token = converters.api_key(context)
        wait = request.wait if request.HasField("wait") else True
        task = await self._deletions.delete(token, request.namespace_id, request.model_id, wait=wait)
        await context.send_initial_metadata(converters.delete_rest_metadata(task))
        return converters.delete_response(task)

    async def GetDeleteTask(self, request: pb.GetDeleteTaskRequest, context: Context) -> pb.DeleteTask:
        task = await self._deletions.get_task(converters.api_key(context), request.namespace_id, request.task_id)
        return converters.delete_task(task)

    async def GetModelDeleteStatus(self, request: pb.GetModelDeleteStatusRequest, context: Context) -> pb.DeleteTask:
        task = await self._deletions.latest_task(converters.api_key(context), request.namespace_id, request.model_id)
        return converters.delete_task(task)

    async def UndeployModel(self, request: pb.UndeployModelRequest, context: Context) -> pb.UndeployModelResponse:
        token = converters.api_key(context)
        outcome = await self._deployments.undeploy(token, request.namespace_id, request.model_id)
        return converters.undeploy_response(outcome)

    async def DeployModel(self, request: pb.DeployModelRequest, context: Context) -> pb.DeployModelResponse:
        token = converters.api_key(context)
        wait = request.wait if request.HasField("wait") else True
        outcome = await self._deployments.deploy(
            token, request.namespace_id, request.model_id, wait, converters.deploy_options(request)
        )
        await context.send_initial_metadata(converters.deploy_rest_metadata(outcome))
        return converters.deploy_response(outcome)

    async def WatchDeployment(
        self, request: pb.WatchDeploymentRequest, context: Context
    ) -> AsyncIterator[pb.DeploymentEvent]:
        token = converters.api_key(context)
        events = self._deployments.watch(
            token, request.namespace_id, request.model_id, request.after_sequence, request.task_id
        )
        async for event in events:
            yield converters.deployment_event(event)

    async def GetDeployTask(self, request: pb.GetDeployTaskRequest, context: Context) -> pb.DeployTask:
        token = converters.api_key(context)
        task = await self._deployments.get_task(token, request.namespace_id, request.task_id)
        return converters.deploy_task(task)

    async def GetCacheStatus(self, request: pb.GetCacheStatusRequest, context: Context) -> pb.CacheStatus:
        token = converters.api_key(context)
        nodes = await self._deployments.cache_status(token, request.namespace_id)
        return converters.cache_status(nodes)

    async def GetModelDeployStatus(self, request: pb.GetModelDeployStatusRequest, context: Context) -> pb.DeployTask:
        token = converters.api_key(context)
        task = await self._deployments.latest_task(token, request.namespace_id, request.model_id)
        return converters.deploy_task(task)
