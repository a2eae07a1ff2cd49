"""A worker's heartbeat in Redis (for `dreambatch top` and the control-plane metrics), and the
periodic chores of an I/O worker (ending items of jobs past their deadline).

One daemon thread per worker process; it starts after the model loaded and never touches the GPU.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from jobs.store import redis_errors, unreachable
from jobs.submit import now_iso
from worker.runtime import Runtime

log = logging.getLogger("dreambatch.worker")


class Heartbeat(threading.Thread):
    def __init__(self, runtime: Runtime, name: str, queue: str, every: float, chores: Callable[[], None] | None = None):
        super().__init__(name="dreambatch-heartbeat", daemon=True)
        self.runtime, self.worker_name, self.queue, self.every = runtime, name, queue, every
        self.chores = chores
        self.started_at = now_iso()
        self._halt = threading.Event()

    def info(self) -> dict:
        rt = self.runtime
        return {
            "name": self.worker_name,
            "queue": self.queue,
            "model": rt.model,
            "host": socket.gethostname(),
            "model_revision": rt.model_revision,  # its weights' revision: what the catalog compares
            "pid": os.getpid(),
            "started_at": self.started_at,
            "seen": time.time(),
            "active": [f"{j}/{i}" for j, i in sorted(rt.active)],
            "ended": rt.ended,
        }

    def beat(self) -> None:
        self.runtime.store.beat(self.worker_name, self.info(), ttl=self.every * 3)

    def run(self) -> None:
        while True:
            try:
                self.beat()
                if self.chores:
                    self.chores()
            except redis_errors() as exc:  # Redis away for longer than the client's retries: the next beat tries again
                log.warning("heartbeat not sent: %s", unreachable(self.runtime.settings.redis_url, exc))
            except Exception:
                log.warning("heartbeat failed", exc_info=True)
            if self._halt.wait(self.every):
                return

    def stop(self) -> None:
        self._halt.set()
