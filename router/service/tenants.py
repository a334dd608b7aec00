"""Who is calling (API keys to tenants) and what each tenant may still spend (budgets)."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from regions.config import Tenant
from router.errors import AuthError, BudgetExceeded
from router.ledger import LedgerRow

ADMIN_KEY_ENV = "CARBON_ROUTER_ADMIN_KEY"


# ---- tenants -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


class Tenants:
    """API keys to tenants; keys are compared as sha256 digests in constant time."""

    def __init__(self, tenants: list[Tenant], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._entries: list[tuple[bytes, Tenant]] = [
            (bytes.fromhex(h), t) for t in tenants for h in t.api_key_sha256
        ]
        admin = env.get(ADMIN_KEY_ENV)
        self._admin_digest = hashlib.sha256(admin.encode()).digest() if admin else None

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: Tenant | None = None
        for stored, tenant in self._entries:  # every entry is compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = tenant
        if self._admin_digest is not None and hmac.compare_digest(self._admin_digest, digest):
            return Caller("admin", True)
        if found is None:
            raise AuthError("invalid API key")
        return Caller(found.name, found.admin)


# ---- budgets ---------------------------------------------------------------------------------


def period_start(now: datetime, period: str) -> datetime:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_end(start: datetime, period: str) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)


@dataclass
class Spend:
    """Billed spend in a period, and what requests in flight hold of it (their prediction)."""

    since: datetime
    kwh: float = 0.0
    co2_g: float = 0.0
    usd: float = 0.0
    held_kwh: float = 0.0
    held_co2_g: float = 0.0
    held_usd: float = 0.0


@dataclass
class Hold:
    """A request's predicted spend, reserved at admission and released (once, whoever asks
    first) when it is billed or never runs."""

    tenant: str
    since: datetime
    kwh: float
    co2_g: float
    usd: float
    released: bool = False


class Budgets:
    """Each tenant's spend in its budget period (kWh, g CO2e, $), checked before a request runs.

    Totals start from the ledger and grow with every billed row. A request reserves its
    predicted spend when it is admitted (:meth:`reserve`) and releases it when it is billed
    (:meth:`release`), so requests in flight count against the budget: one whose prediction,
    on top of what is billed and held, would cross a limit is refused
    (:class:`BudgetExceeded`, with the time the budget resets). A budget is overshot by at most
    the prediction error of the requests in flight.
    """

    def __init__(self, tenants: list[Tenant]) -> None:
        self.limits = {t.name: t.budget for t in tenants if t.budget is not None}
        self.spend: dict[str, Spend] = {}

    def _current(self, tenant: str, now: datetime) -> Spend:
        budget = self.limits[tenant]
        start = period_start(now, budget.period)
        sp = self.spend.get(tenant)
        if sp is None or sp.since != start:
            sp = self.spend[tenant] = Spend(start)
        return sp

    def load(self, tenant: str, kwh: float, co2_g: float, usd: float, now: datetime) -> None:
        """Start ``tenant``'s period from what the ledger says it has spent in it."""
        if tenant not in self.limits:
            return
        sp = self._current(tenant, now)
        sp.kwh, sp.co2_g, sp.usd = kwh, co2_g, usd

    def check(self, tenant: str, kwh: float, co2_g: float, usd: float, now: datetime) -> None:
        """Refuse spend of ``kwh``, ``co2_g``, ``usd`` that would cross a limit, counting what
        is billed and what requests in flight hold."""
        budget = self.limits.get(tenant)
        if budget is None:
            return
        sp = self._current(tenant, now)
        reset = period_end(sp.since, budget.period)
        for name, used, held, add, limit, unit in (
            ("energy", sp.kwh, sp.held_kwh, kwh, budget.kwh, "kWh"),
            ("carbon", sp.co2_g, sp.held_co2_g, co2_g, budget.co2_g, "g CO2e"),
            ("cost", sp.usd, sp.held_usd, usd, budget.usd, "USD"),
        ):
            if limit is not None and used + held + add > limit:
                raise BudgetExceeded(
                    f"{name} budget of tenant {tenant} exceeded: {used:.6g} of {limit:g} {unit} "
                    f"used this {budget.period} and {held:.3g} held by requests in flight; this "
                    f"request needs about {add:.3g} more; the budget resets at "
                    f"{reset.isoformat()}",
                    reset_at=reset,
                )

    def reserve(
        self, tenant: str, kwh: float, co2_g: float, usd: float, now: datetime
    ) -> Hold | None:
        """Check, then hold, a request's predicted spend; ``None`` for a tenant with no budget."""
        if tenant not in self.limits:
            return None
        self.check(tenant, kwh, co2_g, usd, now)
        sp = self._current(tenant, now)
        sp.held_kwh += kwh
        sp.held_co2_g += co2_g
        sp.held_usd += usd
        return Hold(tenant, sp.since, kwh, co2_g, usd)

    def release(self, hold: Hold | None) -> None:
        """Give back what ``hold`` reserved (its request is billed, or never ran)."""
        if hold is None or hold.released:
            return
        hold.released = True
        sp = self.spend.get(hold.tenant)
        if sp is None or sp.since != hold.since:
            return  # a new period (or a reload) started from zero holds
        sp.held_kwh = max(0.0, sp.held_kwh - hold.kwh)
        sp.held_co2_g = max(0.0, sp.held_co2_g - hold.co2_g)
        sp.held_usd = max(0.0, sp.held_usd - hold.usd)

    def add(self, row: LedgerRow, now: datetime) -> None:
        if row.tenant in self.limits:
            sp = self._current(row.tenant, now)
            sp.kwh += row.kwh_billed
            sp.co2_g += row.carbon_g
            sp.usd += row.cost_usd
