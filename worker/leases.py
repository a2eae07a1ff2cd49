"""Execution leases: at most one execution of an item runs at a time, whatever the broker does.

A task can be delivered twice while its first delivery still runs: Redis redelivers a message that
stays unacknowledged past the visibility timeout (the threads pool cannot enforce a hard time
limit), and a publish retried across a Redis outage may queue an item twice. Before an item runs,
its execution takes the item's lease (a Redis key with a short TTL holding a random token); a
background thread renews every lease this process holds at a third of the TTL. A second delivery
that finds the lease held waits and tries again; if the holder's process dies, its lease expires
and the item can run again.
"""

from __future__ import annotations

import logging
import threading
import uuid

from jobs.store import Store

log = logging.getLogger("dreambatch.worker")


class Leases:
    def __init__(self, store: Store, ttl: float):
        self.store = store
        self.ttl = ttl
        self._held: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, job_id: str, item_id: str) -> tuple[str | None, float]:
        """(token, 0) when this execution now holds the item; (None, seconds left) when another does."""
        token = uuid.uuid4().hex
        wait = self.store.acquire_lease(job_id, item_id, token, self.ttl)
        if wait:
            return None, wait
        with self._lock:
            self._held[(job_id, item_id)] = token
            if self._thread is None:
                self._thread = threading.Thread(target=self._renew_forever, name="lease-renewal", daemon=True)
                self._thread.start()
        return token, 0.0

    def release(self, job_id: str, item_id: str, token: str) -> None:
        with self._lock:
            if self._held.get((job_id, item_id)) == token:
                del self._held[(job_id, item_id)]
        try:
            self.store.release_lease(job_id, item_id, token)
        except Exception as exc:  # it expires on its own
            log.warning("could not release the lease of %s/%s: %s", job_id, item_id, exc)

    def _renew_forever(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                held = dict(self._held)
            for (job_id, item_id), token in held.items():
                with self._lock:  # released since: not renewed (a renewal takes back an expired lease)
                    if self._held.get((job_id, item_id)) != token:
                        continue
                try:
                    if not self.store.renew_lease(job_id, item_id, token, self.ttl):
                        log.error("lost the lease of %s/%s (expired while running)", job_id, item_id)
                except Exception as exc:
                    log.warning("lease renewal of %s/%s failed: %s", job_id, item_id, exc)

    def close(self) -> None:
        self._stop.set()
