"""Fair share: per-tenant limits on chat requests in flight and on tokens per minute.

Counts are per tenant: every key of a tenant shares them. The limits a request is held to are
the settings' (`LORAG_TENANT_MAX_INFLIGHT`, `LORAG_TENANT_TOKENS_PER_MINUTE`), or its key's own
where the key has them; 0 is no limit. Tokens are checked at admission and charged when the
request ends, with what it used (so a tenant may overshoot its budget by what its requests in
flight use; the in-flight limit bounds that).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from service.auth.keys import ApiKey
from service.errors import TenantLimited
from service.metrics import Metrics
from service.settings import Settings

WINDOW_S = 60.0  # the "minute" of tokens per minute: a sliding window, not a calendar minute


@dataclass(frozen=True)
class Share:
    """The limits one request is held to (0: none) and where each comes from, for the message."""

    max_inflight: int
    tokens_per_minute: int
    inflight_source: str
    tokens_source: str


@dataclass
class _Usage:
    """One tenant's requests in flight and the tokens it used in the last WINDOW_S."""

    in_flight: int = 0
    charges: deque[tuple[float, int]] = field(default_factory=deque)  # (clock s, tokens), oldest first
    spent: int = 0  # the sum of `charges`

    def forget_before(self, cutoff: float) -> None:
        while self.charges and self.charges[0][0] <= cutoff:
            self.spent -= self.charges.popleft()[1]


class Slot:
    """An admitted request's place in its tenant's share; `release` it when the request ends."""

    def __init__(self, fair_share: FairShare, tenant: str):
        self._fair_share = fair_share
        self._tenant = tenant
        self._released = False

    def release(self, tokens: int) -> None:
        """Free the place and charge the tokens used; only the first call counts."""
        if not self._released:
            self._released = True
            self._fair_share._release(self._tenant, tokens)


class FairShare:
    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._tenants: dict[str, _Usage] = {}

    def share(self, key: ApiKey | None) -> Share:
        """The key's own limits where it has them, else the settings'."""
        s = self._settings
        own_inflight = key is not None and key.max_inflight is not None
        own_tokens = key is not None and key.tokens_per_minute is not None
        return Share(
            key.max_inflight if own_inflight else s.tenant_max_inflight,
            key.tokens_per_minute if own_tokens else s.tenant_tokens_per_minute,
            "this API key's max_inflight" if own_inflight else "LORAG_TENANT_MAX_INFLIGHT",
            "this API key's tokens_per_minute" if own_tokens else "LORAG_TENANT_TOKENS_PER_MINUTE",
        )

    def take(self, tenant: str, key: ApiKey | None) -> Slot:
        """A place for one more request of the tenant; TenantLimited (429) if its share is used up."""
        share = self.share(key)
        usage = self._tenants.setdefault(tenant, _Usage())
        now = self._clock()
        usage.forget_before(now - WINDOW_S)
        if share.max_inflight and usage.in_flight >= share.max_inflight:
            self._metrics.tenant_refused.labels(tenant, "inflight").inc()
            raise TenantLimited(
                f"tenant {tenant!r} has {usage.in_flight} chat requests in flight, its limit "
                f"({share.max_inflight}, {share.inflight_source}); retry when one of them has ended",
                code="tenant_inflight_limit", retry_after=1,
            )
        if share.tokens_per_minute and usage.spent >= share.tokens_per_minute:
            self._metrics.tenant_refused.labels(tenant, "tokens").inc()
            retry_after = self._frees_in(usage, share.tokens_per_minute, now)
            raise TenantLimited(
                f"tenant {tenant!r} used {usage.spent} tokens in the last {WINDOW_S:.0f} s, its limit of "
                f"{share.tokens_per_minute} per minute ({share.tokens_source}); retry in {retry_after} s",
                code="tenant_token_limit", retry_after=retry_after,
            )
        usage.in_flight += 1
        self._metrics.tenant_in_flight.labels(tenant).inc()
        return Slot(self, tenant)

    def _release(self, tenant: str, tokens: int) -> None:
        usage = self._tenants[tenant]
        usage.in_flight -= 1
        self._metrics.tenant_in_flight.labels(tenant).dec()
        if tokens > 0:
            usage.charges.append((self._clock(), tokens))
            usage.spent += tokens

    @staticmethod
    def _frees_in(usage: _Usage, budget: int, now: float) -> int:
        """Whole seconds (at least 1) until the tokens still in the window are under the budget."""
        left = usage.spent
        for at, tokens in usage.charges:
            left -= tokens
            if left < budget:
                return max(1, math.ceil(at + WINDOW_S - now))
        return 1  # unreached: over a budget above 0, the window holds charges
