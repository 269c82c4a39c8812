"""The load of one model, run as a Ray task with the model's resource requirements.

Stages, each reported to the model cache as it starts: downloading (streamed from S3,
hashed and unpacked in one pass; or, from the local store, the file mapped, hashed, then
unpacked in place; with bytes done and total) → verifying (sha256
against the digest recorded at upload; no model file is decoded before it matches) →
decoding (by format, into numpy) → caching (the task returns the weights, which Ray
stores once in the object store, owned by the cache actor).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelservice_sdk.model import NamespaceModel
from server.deploy.decoding import decode_model
from server.deploy.errors import DecodeError
from server.deploy.extraction import extract_archive, extract_mapped_archive, map_local_archive, read_archive
from server.deploy.specs import LoadSpec, LoadSummary
from server.errors import ModelServiceError

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 0.25

Reporter = Callable[[dict[str, Any]], None]

DOWNLOAD, VERIFY, DECODE, CACHE = "download", "verify", "decode", "cache"


def run_load(spec: LoadSpec, report: Reporter, node_id: str = "") -> tuple[NamespaceModel | None, LoadSummary]:
    """Loads one model; never raises for a bad model: the summary says what failed."""
    started = time.monotonic()
    stage = DOWNLOAD
    scratch = Path(tempfile.mkdtemp(prefix=f"modelservice-load-{spec.model_id}-", dir=spec.scratch_dir or None))
    # The task works inside its own empty scratch directory: a relative path that any
    # library resolves finds nothing but this model's files.
    previous_directory = os.getcwd()
    os.chdir(scratch)
    try:
        extracted = scratch / "model"
        extracted.mkdir()
        report({"state": "downloading", "bytes_done": 0, "bytes_total": spec.size_bytes})
        progress = _throttled_progress(report, spec.size_bytes)
        mapped = map_local_archive(spec.store, spec.archive_key)
        if mapped is not None:
            extraction = extract_mapped_archive(
                mapped, extracted, max_unpacked_bytes=spec.max_unpacked_bytes, max_members=spec.max_members,
                on_progress=progress,
            )
        else:
            extraction = extract_archive(
                read_archive(spec.store, spec.archive_key), extracted,
                max_unpacked_bytes=spec.max_unpacked_bytes, max_members=spec.max_members, on_progress=progress,
            )
        stage = VERIFY
        report({"state": "verifying", "bytes_done": spec.size_bytes, "bytes_total": spec.size_bytes})
        if extraction.sha256 != spec.sha256:
            return None, _failed(
                node_id, started, VERIFY, "CHECKSUM_MISMATCH",
                f"the stored archive hashes to {extraction.sha256}, not to {spec.sha256} recorded at upload",
            )
        stage = DECODE
        report({"state": "decoding"})
        if extraction.error is not None:
            raise extraction.error
        model = decode_model(
            extracted, spec.model_id, spec.model_format, extraction.sha256, max_unpacked_bytes=spec.max_unpacked_bytes,
            in_memory=extraction.in_memory,
        )
        stage = CACHE
        report({"state": "caching", "message": f"{len(model.tensors)} tensors, {model.nbytes} bytes"})
        summary = LoadSummary(ok=True, node_id=node_id, nbytes=model.nbytes, seconds=time.monotonic() - started)
        return model, summary
    except DecodeError as error:
        return None, _failed(node_id, started, stage, error.reason, error.message)
    except ModelServiceError as error:
        return None, _failed(node_id, started, stage, error.reason, error.message)
    except Exception:  # a load must end in a state, whatever broke
        # The detail (paths, hosts, exception types) stays in the worker's log; the tenant
        # gets a reference to quote.
        reference = uuid.uuid4().hex[:12]
        logger.exception("load %s of model %s failed (reference %s)", spec.task_id, spec.model_id, reference)
        return None, _failed(
            node_id, started, stage, "LOAD_ERROR",
            f"the load failed unexpectedly at the {stage} stage (reference {reference}); try again or contact the operator",
        )
    finally:
        os.chdir(previous_directory)
        # Safe even though safetensors tensors are memory maps of these files: a mapping
        # keeps its pages readable after the unlink, until Ray has copied them into the
        # object store and the arrays are gone.
        shutil.rmtree(scratch, ignore_errors=True)


def _throttled_progress(report: Reporter, total: int) -> Callable[[int], None]:
    last_report = time.monotonic()

    def progress(done: int) -> None:
        nonlocal last_report
        now = time.monotonic()
        if now - last_report >= PROGRESS_INTERVAL_SECONDS:
            report({"state": "downloading", "bytes_done": done, "bytes_total": total})
            last_report = now

    return progress


def _failed(node_id: str, started: float, stage: str, reason: str, message: str) -> LoadSummary:
    return LoadSummary(
        ok=False, node_id=node_id, seconds=time.monotonic() - started,
        failed_stage=stage, reason=reason, message=message,
    )


def remote_load(spec: LoadSpec, cache: Any) -> tuple[NamespaceModel | None, LoadSummary]:
    """Body of the Ray task: reports progress to the cache actor.

    Each report is awaited: the cache then records events in the order they happened,
    and the last one ("caching") before the task's result arrives.
    """
    import ray

    def report(event: dict[str, Any]) -> None:
        ray.get(cache.report.remote(spec.task_id, event))

    return run_load(spec, report, node_id=ray.get_runtime_context().get_node_id())


def remote_copy(source: list[Any]) -> tuple[NamespaceModel, int]:
    """Body of the Ray task that puts a copy of cached weights on the node it runs on.

    The model it returns is stored in this node's object store, owned by the cache actor
    that submitted the task; the second result (its size) is all the actor fetches.
    """
    import ray

    model: NamespaceModel = ray.get(source[0])
    return model, model.nbytes
