"""Async rate limiting (requests/tokens per minute) and the spend budget.

Providers enforce per-minute limits at sub-minute granularity, so the bucket holds at
most one second's worth of capacity: a limit of 600 RPM means bursts of 10, then 10/s.
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Token bucket refilled continuously at ``per_minute / 60`` per second.

    ``acquire`` waits in FIFO order; an amount bigger than the bucket (a huge request under a
    TPM limit) is admitted when the bucket is full and drives it negative, so it is paid for
    by the requests after it instead of blocking forever.
    """

    def __init__(self, per_minute: float, burst_seconds: float = 1.0):
        if per_minute <= 0:
            raise ValueError("rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, amount: float = 1.0) -> None:
        async with self._lock:
            need = min(amount, self.capacity)
            while True:
                self._refill()
                if self._tokens >= need:
                    self._tokens -= amount
                    return
                await asyncio.sleep((need - self._tokens) / self.rate)

    def adjust(self, delta: float) -> None:
        """Charge (positive) or refund (negative) after the true usage is known."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens - delta)


class Budget:
    """Spend tracking against an optional cap.

    Each request reserves its estimated cost before it is sent and settles to the actual
    cost when it returns, so concurrent requests cannot jointly overshoot the cap by more
    than the estimates are wrong. Once a reservation is refused the budget is closed: the
    remaining requests all end as ``budget_exceeded`` (a run that stops, not one that
    keeps nibbling at the cap with cheaper requests).
    """

    def __init__(self, max_cost: float | None):
        self.max_cost = max_cost
        self.spent = 0.0
        self.reserved = 0.0
        self.closed = False

    def try_reserve(self, amount: float) -> bool:
        if self.max_cost is None:
            return True
        if self.closed or self.spent + self.reserved + amount > self.max_cost:
            self.closed = True
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, actual: float) -> None:
        if self.max_cost is not None:
            self.reserved = max(0.0, self.reserved - reserved)
        self.spent += actual
        if self.max_cost is not None and self.spent >= self.max_cost:
            self.closed = True
