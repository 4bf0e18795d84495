"""The Redis tier: one cache shared by every replica, so a prompt encoded by one server is a hit on all.

Values are the same self-describing safetensors bytes as the disk tier's files (key, dtypes, shapes,
CRC-32 inside), verified on every read: a tampered value, or one written under this key for another
model, dtype or length, is a miss and is deleted. Redis being down is never an outage: every call
becomes a miss or a no-op, the first failure of an outage is logged (and counted in `errors`,
`healthy` turns False), and calls are skipped for `retry_interval` seconds at a time so requests do
not each wait for a connect timeout; the first call that succeeds again logs the recovery.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from shared.disk_cache import CorruptEntry, Tensors, pack, unpack

logger = logging.getLogger(__name__)


def redact(url: str) -> str:
    """`redis://user:secret@host` -> `redis://user:***@host`."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


class RedisTier:
    """`redis://host:port/db` (or `rediss://`, `unix://`) as a cache tier."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "promptcast:embedding:", ttl: float | None = None,
                 timeout: float = 1.0, retry_interval: float = 2.0):
        import redis  # only servers started with --cache-redis need the package loaded

        self.url = redact(url)  # for logs and stats: never print a password
        self.prefix = prefix
        self.ttl = ttl  # seconds; None leaves eviction to the server's maxmemory-policy
        self.retry_interval = retry_interval
        self.healthy = True
        self.errors = 0  # failed calls (connection refused, timeouts...)
        self.corrupt = 0  # values found tampered or foreign, and deleted
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._redis_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                              redis.exceptions.BusyLoadingError, redis.exceptions.ReadOnlyError, OSError)
        # from_url validates the URL now, so a typo in --cache-redis fails at start-up, not on first use.
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           health_check_interval=30)

    def _call(self, method: str, *args, **kwargs):
        """Run one Redis command; `None` (and an outage noted) when Redis cannot be reached."""
        if not self.healthy and time.monotonic() < self._retry_at:
            return None
        try:
            result = getattr(self.client, method)(*args, **kwargs)
        except self._redis_errors as e:
            with self._lock:
                self.errors += 1
                self._retry_at = time.monotonic() + self.retry_interval
                was_healthy, self.healthy = self.healthy, False
            if was_healthy:
                logger.error("Redis cache at %s is unreachable (%s: %s); serving from the other tiers and retrying "
                             "every %gs", self.url, type(e).__name__, e, self.retry_interval)
            return None
        if not self.healthy:
            with self._lock:
                self.healthy = True
            logger.warning("Redis cache at %s is reachable again", self.url)
        return result

    def get(self, key: str) -> Tensors | None:
        data = self._call("get", self.prefix + key)
        if data is None:
            return None
        try:
            return unpack(key, data)
        except CorruptEntry as e:
            self.corrupt += 1
            logger.warning("Redis cache: the value of %s is damaged or foreign (%s); deleted, treating it as a miss",
                           key, e)
            self.delete(key)
            return None

    def put(self, key: str, tensors: Tensors) -> None:
        self.put_packed(key, pack(key, tensors))

    def put_packed(self, key: str, data: bytes) -> None:
        """Store an entry already `pack`ed (the cache packs once for every slow tier)."""
        self._call("set", self.prefix + key, data, px=int(self.ttl * 1000) if self.ttl else None)

    def delete(self, key: str) -> None:
        self._call("delete", self.prefix + key)

    def stats(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "errors": self.errors, "corrupt": self.corrupt}
