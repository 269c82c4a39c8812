"""Streaming uploads: reserve, then hash + inspect + store every chunk in one pass.

Order matters. The (namespace, name, version) is reserved in MongoDB before the first
byte is read, so a duplicate fails at once instead of after gigabytes. Each chunk then
goes to the sha256, the archive inspector (each in a thread of its own: they are CPU work
and release the GIL) and the store's writer, in order, while the next chunks are received
(`chunk_pipeline`: a few MiB in flight at most). Any failure or cancellation
aborts the writer and releases the reservation: nothing half-made stays behind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from server.archives.inspector import ArchiveInspector, InspectionLimits
from server.archives.stores import ArchiveStore, ArchiveWriter
from server.core import quotas
from server.core.chunk_pipeline import chunk_pipeline
from server.core.models import DeployForm, ModelMetadata, Namespace, NamespaceUsage, StoredModel, utc_now
from server.core.tenancy import TenancyService
from server.core.validation import UploadDeclaration, validate_declaration
from server.errors import ArchiveTooLarge, ChecksumMismatch, InvalidArchive, InvalidArgument
from server.persistence.mongo import ModelRepository

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UploadLimits:
    max_archive_bytes: int
    inspection: InspectionLimits
    lease_seconds: float
    in_flight_bytes: int = 8 * 1024 * 1024
    """Received bytes that may wait for the hash, the inspector or the store's writer
    before the next chunk is read (the overlap between receiving and storing)."""


@dataclass(frozen=True)
class UploadStats:
    """How an upload went; the most recent ones are kept for metrics and diagnosis."""

    model_id: str
    size_bytes: int
    seconds: float
    peak_buffered_bytes: int
    """Most archive bytes the store's writer held in memory at once (the bound to keep)."""


RECENT_UPLOADS_KEPT = 100


@dataclass(frozen=True)
class _SizeLimit:
    """The most bytes an upload may have: the service's archive limit on the archive, and
    the storage left in the namespace's quota on all it stores (with a compressed
    archive's inflated deploy form)."""

    max_archive_bytes: int
    storage_left: int | None
    namespace: Namespace
    usage: NamespaceUsage

    def check(self, size: int, stored: int) -> None:
        """`size`: the archive's bytes so far; `stored`: those plus the deploy form's."""
        if self.storage_left is not None and stored > self.storage_left:
            raise quotas.archive_over_quota(self.namespace, self.usage, stored)
        if size > self.max_archive_bytes:
            raise ArchiveTooLarge(
                f"the archive is larger than the limit of {self.max_archive_bytes} bytes", limit=self.max_archive_bytes
            )


class UploadService:
    def __init__(
        self,
        tenancy: TenancyService,
        models: ModelRepository,
        store: ArchiveStore,
        limits: UploadLimits,
    ) -> None:
        self._tenancy = tenancy
        self._models = models
        self._store = store
        self._limits = limits
        self.recent_uploads: collections.deque[UploadStats] = collections.deque(maxlen=RECENT_UPLOADS_KEPT)

    async def upload(
        self,
        bearer_token: str | None,
        namespace_id: str,
        read_declaration: Callable[[], Awaitable[tuple[UploadDeclaration, AsyncIterator[bytes]]]],
    ) -> StoredModel:
        """Authorizes the caller for `namespace_id` BEFORE reading anything else of the
        request (form fields included), then validates, reserves and streams."""
        namespace = await self._tenancy.authorize(bearer_token, namespace_id)
        declared, chunks = await read_declaration()
        if declared.namespace_id != namespace_id:
            raise InvalidArgument("namespace_id may only be set in the first message", field="namespace_id")
        metadata = validate_declaration(declared)
        # Counting the namespace's models is a scan: only for a namespace with upload quotas.
        usage = await self._models.namespace_usage(namespace_id) if namespace.quotas.limit_uploads else quotas.NO_USAGE
        quotas.check_new_model(namespace, usage)  # before any archive byte flows
        storage_left = quotas.archive_bytes_left(namespace.quotas, usage)
        started = time.monotonic()
        model_id = uuid.uuid4().hex
        archive_key = f"{metadata.namespace_id}/{model_id}/archive"
        await self._models.reserve(model_id, metadata, archive_key, self._lease_end(), utc_now())
        writer: ArchiveWriter | None = None
        stored = False
        deploy_form = _DeployFormWriter(self._store, deploy_form_key(archive_key), asyncio.get_running_loop())
        try:
            writer = await self._store.open_writer(archive_key)
            await self._models.record_upload_id(model_id, writer.upload_id)
            sha256, size, weights_bytes = await self._consume(
                model_id, metadata, chunks, writer, deploy_form,
                _SizeLimit(self._limits.max_archive_bytes, storage_left, namespace, usage),
            )
            await writer.complete()
            stored = True
            form = await deploy_form.complete()
            model = await self._models.finalize(
                model_id,
                sha256=sha256,
                size_bytes=size,
                archive_url=self._store.url_for(archive_key),
                weights_bytes=weights_bytes,
                now=utc_now(),
                deploy_form=form,
            )
        except BaseException:
            # Also on cancellation (client gone): shielded so the clean-up itself finishes.
            await asyncio.shield(self._discard(model_id, archive_key, writer, stored, deploy_form))
            raise
        stats = UploadStats(model_id, size, time.monotonic() - started, writer.peak_buffered_bytes)
        self.recent_uploads.append(stats)
        logger.info(
            "uploaded model %s (%s/%s:%s, %d bytes in %.2fs, peak buffer %d bytes, sha256 %s)",
            model_id, metadata.namespace_id, metadata.name, metadata.version, size,
            stats.seconds, stats.peak_buffered_bytes, sha256,
        )
        return model

    async def _consume(
        self,
        model_id: str,
        metadata: ModelMetadata,
        chunks: AsyncIterator[bytes],
        writer: ArchiveWriter,
        deploy_form: _DeployFormWriter,
        size_limit: _SizeLimit,
    ) -> tuple[str, int, int]:
        renewer = asyncio.create_task(self._renew_lease_until_cancelled(model_id))
        try:
            return await self._hash_inspect_store(metadata, chunks, writer, deploy_form, size_limit)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _renew_lease_until_cancelled(self, model_id: str) -> None:
        """Keeps the reservation alive on a timer of its own: a part upload that takes
        long (a slow store) must not let the janitor take the upload for a dead one."""
        while True:
            await asyncio.sleep(self._limits.lease_seconds / 3)
            try:
                await self._models.renew_lease(model_id, self._lease_end())
            except Exception:  # the metadata store is down: retried at the next tick
                logger.warning("could not renew the lease of upload %s", model_id, exc_info=True)

    async def _hash_inspect_store(
        self, metadata: ModelMetadata, chunks: AsyncIterator[bytes], writer: ArchiveWriter,
        deploy_form: _DeployFormWriter, size_limit: _SizeLimit,
    ) -> tuple[str, int, int]:
        digest = hashlib.sha256()
        inspector = ArchiveInspector(metadata.model_format, self._limits.inspection, on_inflated=deploy_form.write)
        size = 0
        async with chunk_pipeline(
            [digest.update, inspector.feed], writer.write,
            max_in_flight_bytes=self._limits.in_flight_bytes, name="upload",
        ) as pipeline:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                # The deploy form's count lags by what is in flight; checked exactly below.
                size_limit.check(size, size + deploy_form.size_bytes)
                await pipeline.push(chunk)
            await pipeline.finish()
        if size == 0:
            raise InvalidArchive("the upload holds no archive bytes", check="empty")
        report = await asyncio.to_thread(inspector.finish)
        size_limit.check(size, size + deploy_form.size_bytes)
        sha256 = digest.hexdigest()
        if metadata.expected_sha256 and metadata.expected_sha256 != sha256:
            raise ChecksumMismatch(
                "the archive's sha256 differs from expected_sha256: the upload was corrupted "
                "or the expected digest is wrong",
                expected_sha256=metadata.expected_sha256, actual_sha256=sha256, size_bytes=size,
            )
        return sha256, size, report.weights_bytes

    async def _discard(
        self, model_id: str, archive_key: str, writer: ArchiveWriter | None, stored: bool,
        deploy_form: _DeployFormWriter,
    ) -> None:
        try:
            await deploy_form.discard()
            if stored:
                await self._store.delete(archive_key)
            elif writer is not None:
                await writer.abort()
            else:
                # Opening the upload failed, yet it may exist: the request can reach the
                # store while its answer does not reach us. Abort whatever is under the key.
                for pending in await self._store.list_pending(archive_key):
                    await self._store.abort_pending(pending.key, pending.upload_id)
        except Exception:
            # The reservation stays, its lease ended: it is the janitor's record of what to
            # abort once the store answers again.
            logger.warning("could not abort the archive upload of %s; the janitor retries", model_id, exc_info=True)
            await _logged(self._models.renew_lease(model_id, utc_now()), f"could not expire reservation {model_id}")
            return
        await _logged(self._models.release(model_id), f"could not release reservation {model_id}; the janitor retries")

    def _lease_end(self) -> datetime.datetime:
        return utc_now() + datetime.timedelta(seconds=self._limits.lease_seconds)


async def _logged(call: Awaitable[None], failure: str) -> None:
    """Runs a clean-up step; its failure is logged (the janitor finishes the job)."""
    try:
        await call
    except Exception:
        logger.exception(failure)


def deploy_form_key(archive_key: str) -> str:
    """Where a compressed archive's inflated `.tar` is kept, beside the archive (the
    janitor and deletions clear both keys)."""
    return f"{archive_key}.tar"


class _DeployFormWriter:
    """Writes the inflated tar of a compressed upload beside the archive, with its own
    digest, so that deploys never pay decompression again (`StoredModel.deploy_form`).

    The inspector calls `write` from its worker thread with each inflated slice; each call
    waits until the store's writer has taken the bytes, so memory stays bounded whatever
    the compression ratio. Nothing is written for an uncompressed archive.
    """

    def __init__(self, store: ArchiveStore, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self._store = store
        self._loop = loop
        self._writer: ArchiveWriter | None = None
        self._digest = hashlib.sha256()
        self._size = 0
        self._completed = False

    @property
    def size_bytes(self) -> int:
        """Inflated bytes written so far (0 for an uncompressed archive)."""
        return self._size

    def write(self, data: bytes) -> None:
        """From the inspector's thread."""
        if self._writer is None:
            self._writer = asyncio.run_coroutine_threadsafe(self._store.open_writer(self.key), self._loop).result()
        self._digest.update(data)
        self._size += len(data)
        asyncio.run_coroutine_threadsafe(self._writer.write(data), self._loop).result()

    async def complete(self) -> DeployForm | None:
        if self._writer is None:
            return None
        await self._writer.complete()
        self._completed = True
        return DeployForm(key=self.key, sha256=self._digest.hexdigest(), size_bytes=self._size)

    async def discard(self) -> None:
        if self._completed:
            await self._store.delete(self.key)
        elif self._writer is not None:
            await self._writer.abort()
