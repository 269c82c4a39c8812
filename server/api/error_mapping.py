"""The one place where failures become gRPC statuses (and REST error bodies).

A `ModelServiceError` becomes its gRPC code plus a `google.rpc.Status` carrying
`google.rpc.ErrorInfo` (reason, domain, metadata) in the `grpc-status-details-bin`
trailer. The REST body of the same error, in the public API's shape, travels in the
`x-modelservice-error` trailer; Envoy's Lua filter (envoy/error_shape.lua) makes it the
response body and status. Anything else is a bug:
it is logged once with its traceback and the caller gets INTERNAL with a generic message.
Covers unary and streaming handlers alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import dependencies
from server.errors import ErrorKind, ModelServiceError

logger = logging.getLogger(__name__)

ERROR_DOMAIN = "modelservice"

GRPC_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.CONFLICT: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}

#: HTTP status and error type of each kind, for REST callers (the public API's shape).
HTTP_ERRORS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_INPUT: (400, "ValidationError"),
    ErrorKind.UNAUTHENTICATED: (401, "AuthenticationError"),
    ErrorKind.FORBIDDEN: (403, "PermissionDeniedError"),
    ErrorKind.NOT_FOUND: (404, "NotFoundError"),
    ErrorKind.CONFLICT: (409, "ConflictError"),
    ErrorKind.FAILED_PRECONDITION: (400, "FailedPreconditionError"),
    ErrorKind.UNAVAILABLE: (503, "ServiceUnavailableError"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "QuotaExceededError"),
}
#: Reasons whose HTTP status is more precise than their kind's.
HTTP_STATUS_OF_REASON = {"ARCHIVE_TOO_LARGE": 413, "MODEL_DEPLOYING": 409, "MODEL_ALIASED": 409}
REST_ERROR_METADATA_KEY = "x-modelservice-error"

OWN_SERVICE_PREFIX = "/modelservice.v1."
INTERNAL_MESSAGE = "internal error; the service logged the details"


def status_for(error: ModelServiceError) -> grpc.Status:
    """The rich status of a domain error."""
    http_status, error_type = HTTP_ERRORS[error.kind]
    http_status = HTTP_STATUS_OF_REASON.get(error.reason, http_status)
    return _rich_status(
        GRPC_CODES[error.kind], error.message, error.reason, dict(error.details), http_status, error_type
    )


def internal_status() -> grpc.Status:
    return _rich_status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, "INTERNAL", {}, 500, "InternalServerError")


def rest_error_body(http_status: int, message: str, error_type: str, reason: str, details: dict[str, str]) -> str:
    """The public API's ErrorResponse, as compact ASCII JSON (it travels as metadata)."""
    body = {
        "success": False,
        "status": http_status,
        "error": {"message": message, "type": error_type, "code": reason.lower(), "details": details},
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=True)


def _rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str],
    http_status: int,
    error_type: str,
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=[detail]
    )
    status = rpc_status.to_status(proto)
    rest_body = rest_error_body(http_status, message, error_type, reason, metadata)
    return _Status(status.code, status.details, (*status.trailing_metadata, (REST_ERROR_METADATA_KEY, rest_body)))


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    if isinstance(error, ModelServiceError):
        status = status_for(error)
    elif (unavailable := dependencies.translate(error)) is not None:
        logger.warning("%s: %r", unavailable.reason, error)
        status = status_for(unavailable)
    else:
        logger.error("unhandled error in RPC", exc_info=error)
        status = internal_status()
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


_PASS_THROUGH = (asyncio.CancelledError, grpc.aio.AbortError)


class InFlightCalls:
    """Counts the calls of our service under way, so that a graceful stop can wait for
    them to end (and their answers to leave) before the server closes its connections."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is under way; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _wrap_single_response(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]], calls: InFlightCalls
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        with calls.track():
            try:
                return await behavior(request, context)
            except _PASS_THROUGH:
                raise
            except Exception as error:
                await _abort(context, error)

    return guarded


def _wrap_streaming_response(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]], calls: InFlightCalls
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        with calls.track():
            try:
                async for response in behavior(request, context):
                    yield response
            except _PASS_THROUGH:
                raise
            except Exception as error:
                await _abort(context, error)

    return guarded


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of our service: no servicer needs a try/except, and the calls
    under way are counted (`calls`) for a graceful stop."""

    def __init__(self) -> None:
        self.calls = InFlightCalls()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(OWN_SERVICE_PREFIX):
            # Health and reflection come from grpcio and map their own errors.
            return handler
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # Our servicer's methods are all coroutines / async generators (grpc.aio); the
        # stubs type handlers as the sync API's, hence the Any.
        behaviors: Any = handler
        if behaviors.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_single_response(behaviors.unary_unary, self.calls), **serializers)
        if behaviors.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_single_response(behaviors.stream_unary, self.calls), **serializers)
        if behaviors.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_streaming_response(behaviors.unary_stream, self.calls), **serializers)
        if behaviors.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_wrap_streaming_response(behaviors.stream_stream, self.calls), **serializers)
        return handler
