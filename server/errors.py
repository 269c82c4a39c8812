"""Domain errors: what went wrong, as a stable reason plus the details a program needs.

The core raises these and knows nothing of transports. `server.api.error_mapping` is the
one place that turns them into gRPC codes and `google.rpc.ErrorInfo`; the REST error shape
is derived from the same status by Envoy.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class ErrorKind(enum.Enum):
    """Transport-neutral class of a failure; the API layer maps each to a status code."""

    INVALID_INPUT = "invalid_input"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    FAILED_PRECONDITION = "failed_precondition"
    UNAVAILABLE = "unavailable"
    RESOURCE_EXHAUSTED = "resource_exhausted"


class ModelServiceError(Exception):
    """Base of every expected failure. Subclasses fix `reason` and `kind`."""

    reason: str = "INTERNAL"
    kind: ErrorKind = ErrorKind.INVALID_INPUT

    def __init__(self, message: str, **details: str | int | float) -> None:
        super().__init__(message)
        self.message = message
        self.details: Mapping[str, str] = {key: str(value) for key, value in details.items()}


class InvalidArgument(ModelServiceError):
    reason = "INVALID_ARGUMENT"
    kind = ErrorKind.INVALID_INPUT


class InvalidArchive(ModelServiceError):
    reason = "INVALID_ARCHIVE"
    kind = ErrorKind.INVALID_INPUT


class ChecksumMismatch(ModelServiceError):
    reason = "CHECKSUM_MISMATCH"
    kind = ErrorKind.INVALID_INPUT


class ArchiveTooLarge(ModelServiceError):
    reason = "ARCHIVE_TOO_LARGE"
    kind = ErrorKind.INVALID_INPUT


class Unauthenticated(ModelServiceError):
    reason = "UNAUTHENTICATED"
    kind = ErrorKind.UNAUTHENTICATED


class CustomModelsNotSupported(ModelServiceError):
    reason = "CUSTOM_MODELS_NOT_SUPPORTED"
    kind = ErrorKind.FORBIDDEN


class NamespaceNotFound(ModelServiceError):
    reason = "NAMESPACE_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class ModelNotFound(ModelServiceError):
    reason = "MODEL_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class DeployTaskNotFound(ModelServiceError):
    reason = "DEPLOY_TASK_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class DeleteTaskNotFound(ModelServiceError):
    reason = "DELETE_TASK_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class AliasNotFound(ModelServiceError):
    reason = "ALIAS_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class ModelAliased(ModelServiceError):
    """The model is an alias's target: move or delete the alias first."""

    reason = "MODEL_ALIASED"
    kind = ErrorKind.FAILED_PRECONDITION


class TaskNotFound(ModelServiceError):
    """Neither a deploy nor a delete task (OpenSearch's tasks API covers both)."""

    reason = "TASK_NOT_FOUND"
    kind = ErrorKind.NOT_FOUND


class ModelAlreadyExists(ModelServiceError):
    reason = "MODEL_ALREADY_EXISTS"
    kind = ErrorKind.CONFLICT


class NamespaceAlreadyExists(ModelServiceError):
    reason = "NAMESPACE_ALREADY_EXISTS"
    kind = ErrorKind.CONFLICT


class UploadIncomplete(ModelServiceError):
    """The stream ended before any archive byte, or the client stopped mid-way."""

    reason = "UPLOAD_INCOMPLETE"
    kind = ErrorKind.INVALID_INPUT


class ModelDeploying(ModelServiceError):
    """The model is being loaded; it cannot be undeployed or deleted until that ends."""

    reason = "MODEL_DEPLOYING"
    kind = ErrorKind.FAILED_PRECONDITION


class QuotaExceeded(ModelServiceError):
    """The namespace's quota (stored bytes, models, deployed bytes) would be exceeded."""

    reason = "QUOTA_EXCEEDED"
    kind = ErrorKind.RESOURCE_EXHAUSTED
