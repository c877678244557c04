"""Bounded in-flight bytes: the receiver's memory bound and its overload signal.

Each request reserves the bytes it holds (raw body, then decompressed body) before doing work and releases them when
it has answered. ``external`` adds bytes held elsewhere, e.g. records still waiting in the Kafka producer after a
timed-out write, so a down broker fills the budget and further requests are refused at once (HTTP 503 with
``Retry-After`` / gRPC UNAVAILABLE with ``RetryInfo``) instead of piling up in memory.
"""

from __future__ import annotations

from typing import Callable


class InflightBudget:
    """Counter of in-flight bytes with a hard limit (``limit_bytes``, int, bytes)."""

    def __init__(self, limit_bytes: int, external: Callable[[], int] = lambda: 0) -> None:
        self.limit_bytes = limit_bytes
        self._used = 0
        self._external = external

    @property
    def used_bytes(self) -> int:
        """Bytes held by requests now plus bytes held by the sink (``external``)."""
        return self._used + self._external()

    def try_acquire(self, n: int, held: int = 0) -> bool:
        """Reserve ``n`` more bytes for a request that already holds ``held``; False (nothing reserved) when that
        would pass the limit.

        A single request larger than the whole limit is still admitted when nothing else is in flight, so a
        legitimate big request (below the body cap) cannot be refused forever; ``held`` keeps the request's own
        earlier reservation from counting as "something else".
        """
        if n <= 0:
            return True
        used = self.used_bytes
        if used + n > self.limit_bytes and used - held > 0:
            return False
        self._used += n
        return True

    def release(self, n: int) -> None:
        if n > 0:
            self._used -= n
