"""Prices, tariffs and bill lines.

- :class:`PriceSchedule` answers $/kWh for a region at a time: flat, time-of-use (local time,
  optional weekdays; a period lasts until the next one starts, past midnight into the next
  day) or a CSV series ``time,usd_per_kwh`` (each value holds until the next row, from the
  row's own time on; a time past the last row by more than ``max_gap_s``, or inside such a
  gap, is an error, never a guess).
- ``Tariff`` turns a request's metered energy and tokens into dollars: :class:`EnergyTariff`
  (kWh x PUE x price x (1 + markup), at least the minimum charge), :class:`HybridTariff`
  (a token fee plus the energy charge) and :class:`TokenTariff` ($ per 1k tokens, what the
  request would cost under per-token pricing). An optional carbon price adds
  grams CO2e / 1e6 x $/tCO2e.
- Carbon is kWh x PUE x intensity(zone, time), and the signal type is kept with it.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pandas as pd

from regions.config import Billing, Price, TouPeriod
from router.errors import RouterError

if TYPE_CHECKING:
    from router.ledger import LedgerRow

J_PER_KWH = 3.6e6
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class PriceError(RouterError):
    """No price can be given for a region at a time (gap in a series, bad CSV)."""


class PriceSchedule:
    def __init__(
        self, price: Price, *, base_dir: Path | None = None, max_gap_s: float = 7200
    ) -> None:
        self.flat = price.flat_usd_per_kwh
        self.tz = ZoneInfo(price.timezone)
        self.tou = sorted(price.time_of_use or [], key=lambda p: p.start)
        self._times: list[datetime] = []
        self._values: list[float] = []
        self.max_gap = timedelta(seconds=max_gap_s)
        if price.csv:
            path = Path(price.csv)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            self._load_csv(path)

    def _load_csv(self, path: Path) -> None:
        try:
            df = pd.read_csv(path)
            times = pd.to_datetime(df.iloc[:, 0], utc=True, format="ISO8601")
            values = pd.to_numeric(df.iloc[:, 1], errors="raise")
        except (OSError, ValueError, IndexError) as e:
            raise PriceError(f"{path}: cannot read the price series (time,usd_per_kwh): {e}") from e
        if (values < 0).any() or values.isna().any():
            row = int(((values < 0) | values.isna()).to_numpy().argmax()) + 2
            raise PriceError(f"{path}:{row}: price must be a number >= 0")
        order = times.argsort()
        self._times = [t.to_pydatetime() for t in times.iloc[order]]
        self._values = [float(v) for v in values.iloc[order]]

    def at(self, when: datetime) -> float:
        if self.flat is not None:
            return self.flat
        if self._times:
            i = bisect.bisect_right(self._times, when) - 1
            if i < 0:
                raise PriceError(f"price series starts {self._times[0]}, asked for {when}")
            nxt = self._times[i + 1] if i + 1 < len(self._times) else None
            step = (nxt - self._times[i]) if nxt else when - self._times[i]
            if step > self.max_gap:
                raise PriceError(
                    f"price series has a gap at {self._times[i]} ({step}); fill it or raise "
                    "max_gap_s"
                )
            return self._values[i]
        local = when.astimezone(self.tz)
        hhmm = local.time()
        day = DAYS[local.weekday()]
        if not self._periods(day):
            raise PriceError(f"no time-of-use period covers {day}")
        started = [p for p in self._periods(day) if p.start <= hhmm]
        if started:
            return started[-1].usd_per_kwh
        # before the day's first start, the last period of the latest day with periods goes on
        # past midnight (Friday's 22:00 rate on Saturday at 03:00, a day's own with none before)
        for back in range(1, 8):
            before = self._periods(DAYS[(local.weekday() - back) % 7])
            if before:
                return before[-1].usd_per_kwh
        raise AssertionError("unreachable: the day itself has periods")  # pragma: no cover

    def _periods(self, day: str) -> list[TouPeriod]:
        """The time-of-use periods of a weekday, by start."""
        return [p for p in self.tou if p.days is None or day in p.days]


@dataclass(frozen=True)
class Usage:
    """What a request used, for pricing."""

    energy_j: float
    pue: float
    price_usd_per_kwh: float
    intensity_g_per_kwh: float
    prompt_tokens: int
    completion_tokens: int

    @property
    def kwh(self) -> float:
        """Facility energy billed: IT energy x PUE."""
        return self.energy_j / J_PER_KWH * self.pue

    @property
    def carbon_g(self) -> float:
        return self.kwh * self.intensity_g_per_kwh

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Charges:
    cost_usd: float
    energy_cost_usd: float
    token_cost_usd: float  # the same request under the token tariff, for comparison
    carbon_cost_usd: float


class Tariff(ABC):
    name: str

    def __init__(self, billing: Billing) -> None:
        self.b = billing

    def energy_cost(self, u: Usage) -> float:
        return u.kwh * u.price_usd_per_kwh * (1 + self.b.markup)

    def token_cost(self, u: Usage) -> float:
        return u.tokens / 1000 * self.b.token_price_usd_per_1k

    def carbon_cost(self, u: Usage) -> float:
        return u.carbon_g / 1e6 * self.b.carbon_price_usd_per_tco2e

    @abstractmethod
    def base_cost(self, u: Usage) -> float:
        """What the tariff charges before the carbon price and the minimum."""

    def charge(self, u: Usage) -> Charges:
        carbon = self.carbon_cost(u)
        cost = max(self.b.min_charge_usd, self.base_cost(u) + carbon)
        return Charges(cost, self.energy_cost(u), self.token_cost(u), carbon)


class EnergyTariff(Tariff):
    name = "energy"

    def base_cost(self, u: Usage) -> float:
        return self.energy_cost(u)


class HybridTariff(Tariff):
    name = "hybrid"

    def base_cost(self, u: Usage) -> float:
        return u.tokens / 1000 * self.b.hybrid_token_fee_usd_per_1k + self.energy_cost(u)


class TokenTariff(Tariff):
    name = "token"

    def base_cost(self, u: Usage) -> float:
        return self.token_cost(u)


TARIFFS: dict[str, type[Tariff]] = {t.name: t for t in (EnergyTariff, HybridTariff, TokenTariff)}


def tariff_for(billing: Billing) -> Tariff:
    return TARIFFS[billing.tariff](billing)


def bill_line(
    *,
    request_id: str,
    tenant: str,
    region: str,
    replica: str,
    model: str,
    started_at: datetime,
    ended_at: datetime,
    prompt_tokens: int,
    completion_tokens: int,
    energy_j: float,
    energy_source: str,
    pue: float,
    intensity_g_per_kwh: float,
    signal: str,
    carbon_stale: bool,
    price_usd_per_kwh: float,
    tariff: Tariff,
    status: str = "ok",
    receipt: dict[str, Any] | None = None,
) -> LedgerRow:
    """Price one request's metered energy into a ledger row; ``receipt``: the row's receipt
    fields (:class:`router.ledger.LedgerRow`), ``avoided_g`` computed here from
    ``baseline_carbon_g`` when a ``baseline_replica`` is given (else nothing was avoided)."""
    from router.ledger import LedgerRow, utc_iso

    usage = Usage(
        energy_j, pue, price_usd_per_kwh, intensity_g_per_kwh, prompt_tokens, completion_tokens
    )
    charges = tariff.charge(usage)
    return LedgerRow(
        request_id=request_id,
        tenant=tenant,
        region=region,
        replica=replica,
        model=model,
        started_at=utc_iso(started_at),
        ended_at=utc_iso(ended_at),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        energy_j=energy_j,
        energy_source=energy_source,  # type: ignore[arg-type]
        pue=pue,
        kwh_billed=usage.kwh,
        intensity_g_per_kwh=intensity_g_per_kwh,
        signal=signal,  # type: ignore[arg-type]
        carbon_stale=carbon_stale,
        carbon_g=usage.carbon_g,
        price_usd_per_kwh=price_usd_per_kwh,
        tariff=tariff.name,
        cost_usd=charges.cost_usd,
        energy_cost_usd=charges.energy_cost_usd,
        token_cost_usd=charges.token_cost_usd,
        carbon_cost_usd=charges.carbon_cost_usd,
        status=status,  # type: ignore[arg-type]
        **(receipt or {}),
        **(
            {"avoided_g": receipt["baseline_carbon_g"] - usage.carbon_g}
            if receipt and receipt.get("baseline_replica")
            else {}
        ),
    )


def rebill(
    row: LedgerRow,
    energy_j: float,
    energy_source: str,
    tariff: Tariff,
    *,
    prefill_j: float | None = None,
    held_s: float | None = None,
    meter: str | None = None,
    method: str | None = None,
    rates: dict[str, float] | None = None,
) -> LedgerRow:
    """``row`` priced again for ``energy_j`` (a prediction replaced by the measurement), at the
    row's own price, intensity and PUE. Its receipt follows: the split and time held the
    meter's attribution gives (else the row's, scaled with its energy), static power and
    embodied carbon at the row's own rates per second held, the baseline's carbon scaled with
    the energy (it is per kWh of the energy used where the request ran). ``rates``: those
    figures per unit, as the ingress had them (``static_w``, ``embodied_g_per_s``,
    ``baseline_g_per_kwh``): a prediction of 0 J or 0 s has no rate to scale by."""
    from router.ledger import COLUMNS

    scale = energy_j / row.energy_j if row.energy_j > 0 else 0.0
    held = row.held_s * scale if held_s is None else held_s
    per_held = 1.0 / row.held_s if row.held_s > 0 else 0.0
    receipt = {c: getattr(row, c) for c in COLUMNS[COLUMNS.index("zone") :]}
    receipt.update(
        prefill_j=min(row.prefill_j * scale if prefill_j is None else prefill_j, energy_j),
        held_s=held,
        static_j=min(row.static_j * per_held * held, energy_j),
        embodied_g=row.embodied_g * per_held * held if row.held_s > 0 else row.embodied_g,
        baseline_carbon_g=row.baseline_carbon_g * scale,
        meter=row.meter if meter is None else meter,
        method=row.method if method is None else method,
    )
    if rates is not None:
        receipt["static_j"] = min(rates.get("static_w", 0.0) * held, energy_j)
        receipt["embodied_g"] = rates.get("embodied_g_per_s", 0.0) * held
        if "baseline_g_per_kwh" in rates and row.baseline_replica:
            receipt["baseline_carbon_g"] = energy_j / J_PER_KWH * rates["baseline_g_per_kwh"]
    del receipt["avoided_g"]  # bill_line's: the baseline less the carbon billed now
    return bill_line(
        request_id=row.request_id,
        tenant=row.tenant,
        region=row.region,
        replica=row.replica,
        model=row.model,
        started_at=datetime.fromisoformat(row.started_at),
        ended_at=datetime.fromisoformat(row.ended_at),
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        energy_j=energy_j,
        energy_source=energy_source,
        pue=row.pue,
        intensity_g_per_kwh=row.intensity_g_per_kwh,
        signal=row.signal,
        carbon_stale=row.carbon_stale,
        price_usd_per_kwh=row.price_usd_per_kwh,
        tariff=tariff,
        status=row.status,
        receipt=receipt,
    )
