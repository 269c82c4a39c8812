"""The janitor: runs at start-up and periodically, on every replica, and finishes or undoes
what a replica that died mid-way left behind. Every step is idempotent, so replicas may
sweep at the same time."""

from __future__ import annotations

import asyncio
import datetime
import logging

from server.archives.stores import ArchiveStore
from server.core.deletion import DeletionService
from server.core.models import utc_now
from server.core.uploads import deploy_form_key
from server.persistence.mongo import ModelRepository

logger = logging.getLogger(__name__)


class Janitor:
    """Clears what replicas that died mid-way left: upload reservations, incomplete
    multipart uploads, and half-done deletions."""

    def __init__(
        self, models: ModelRepository, store: ArchiveStore, deletions: DeletionService, lease_seconds: float
    ) -> None:
        self._models = models
        self._store = store
        self._deletions = deletions
        self._lease = datetime.timedelta(seconds=lease_seconds)

    async def sweep(self) -> int:
        """Returns how many stale reservations and orphan uploads were cleared.

        Decided from our own records only, never from the store's clock (S3-compatible
        stores disagree on "Initiated"): a reservation whose lease ran out has every
        incomplete upload of its archive key and of its deploy form's key aborted (also one
        opened by a replica that died before recording its id: the reservation is written
        before the upload is opened), and whatever it completed under them deleted (a
        reservation is never finalized, so nothing refers to those objects), then is
        released. Live uploads renew their lease on a timer of their own. Uploads under
        keys we hold no record of are never touched: another deployment sharing the bucket
        may own them.
        """
        now = utc_now()
        cleared = 0
        for reservation in await self._models.expired_reservations(now):
            archive_key = reservation["archive_key"]
            for key in (archive_key, deploy_form_key(archive_key)):
                for pending in await self._store.list_pending(key):
                    await self._store.abort_pending(pending.key, pending.upload_id)
                await self._store.delete(key)
            await self._models.release(reservation["_id"])
            cleared += 1
        cleared += await self._deletions.finish_stale(self._lease)
        if cleared:
            logger.info("janitor cleared %d stale uploads and deletions", cleared)
        return cleared

    async def run_forever(self, interval_seconds: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("janitor sweep failed; retrying next interval")
            await asyncio.sleep(interval_seconds)
