"""Unit tests: domain errors become gRPC codes with ErrorInfo; nothing else leaks."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from server.api.error_mapping import ERROR_DOMAIN, INTERNAL_MESSAGE, internal_status, status_for
from server.errors import (
    ArchiveTooLarge,
    ChecksumMismatch,
    CustomModelsNotSupported,
    InvalidArchive,
    ModelAlreadyExists,
    ModelNotFound,
    ModelServiceError,
    NamespaceNotFound,
    Unauthenticated,
)


def _error_info(status: grpc.Status) -> tuple[status_pb2.Status, error_details_pb2.ErrorInfo]:
    trailers = dict(status.trailing_metadata)
    proto = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    return proto, info


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ModelNotFound("m"), grpc.StatusCode.NOT_FOUND),
        (NamespaceNotFound("n"), grpc.StatusCode.NOT_FOUND),
        (ModelAlreadyExists("d"), grpc.StatusCode.ALREADY_EXISTS),
        (InvalidArchive("i"), grpc.StatusCode.INVALID_ARGUMENT),
        (ChecksumMismatch("c"), grpc.StatusCode.INVALID_ARGUMENT),
        (ArchiveTooLarge("t"), grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthenticated("u"), grpc.StatusCode.UNAUTHENTICATED),
        (CustomModelsNotSupported("p"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_each_reason_maps_to_its_code_with_error_info(error: ModelServiceError, code: grpc.StatusCode) -> None:
    status = status_for(error)
    proto, info = _error_info(status)
    assert status.code is code
    assert proto.code == code.value[0]
    assert (info.reason, info.domain) == (error.reason, ERROR_DOMAIN)


def test_details_travel_as_error_info_metadata_strings() -> None:
    _, info = _error_info(status_for(ArchiveTooLarge("big", limit=1024, model_id="m1")))
    assert dict(info.metadata) == {"limit": "1024", "model_id": "m1"}


def test_internal_status_is_generic() -> None:
    status = internal_status()
    _, info = _error_info(status)
    assert status.code is grpc.StatusCode.INTERNAL
    assert status.details == INTERNAL_MESSAGE
    assert info.reason == "INTERNAL"
