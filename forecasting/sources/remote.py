"""Remote carbon sources over aiohttp: Electricity Maps v3, WattTime v3, UK Carbon Intensity.

Each class turns one API's documented JSON into the :class:`CarbonSource` answers and leaves
timeouts, retries, caching and stale fallback to :class:`HttpClient`.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from forecasting.errors import SourceAuthError, SourceDataError, UnknownZoneError
from forecasting.sources.base import (
    LBS_PER_MWH_TO_G_PER_KWH,
    CarbonSource,
    Clock,
    Forecast,
    Intensity,
    Signal,
    checked_value,
    clean_series,
    require_utc,
    utc_now,
)
from forecasting.sources.http import HttpClient

log = logging.getLogger(__name__)


def parse_time(value: object, *, source: str, zone: str, field: str = "datetime") -> pd.Timestamp:
    if not isinstance(value, str) or not value:
        raise SourceDataError(f"field {field!r} is {value!r}", source=source, zone=zone)
    try:
        ts = pd.Timestamp(value)
    except ValueError as e:
        raise SourceDataError(f"bad timestamp {value!r}", source=source, zone=zone) from e
    if ts.tzinfo is None:
        ts = ts.tz_localize("UTC")
    return ts.tz_convert("UTC")


def _items(payload: Any, key: str, *, source: str, zone: str) -> list[dict[str, Any]]:
    items = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise SourceDataError(f"no list {key!r} in the answer", source=source, zone=zone)
    return items


def _series(
    items: Iterable[dict[str, Any]],
    time_key: str,
    value_key: str,
    *,
    source: str,
    zone: str,
    scale: float = 1.0,
) -> pd.Series:
    """A g/kWh series from API points; points whose value is null are dropped (gaps), and an
    answer with no usable point at all is an error, never an empty or zero series."""
    times, values = [], []
    for item in items:
        if item.get(value_key) is None:
            continue
        times.append(parse_time(item.get(time_key), source=source, zone=zone, field=time_key))
        values.append(checked_value(item[value_key], source=source, zone=zone, field=value_key))
    if not values:
        raise SourceDataError(f"no non-null {value_key!r} in the answer", source=source, zone=zone)
    s = pd.Series(values, index=pd.DatetimeIndex(times)) * scale
    return clean_series(s, source=source, zone=zone)


class _Remote(CarbonSource):
    def __init__(self, http: HttpClient, clock: Clock) -> None:
        self.http = http
        self._clock = clock

    async def aclose(self) -> None:
        await self.http.aclose()

    def _window(
        self, parts: list[pd.Series], zone: str, lo: pd.Timestamp, hi: pd.Timestamp
    ) -> pd.Series:
        s = pd.concat(parts)
        s = clean_series(s[(s.index >= lo) & (s.index < hi)], source=self.name, zone=zone)
        if s.empty:
            raise UnknownZoneError(f"no data in [{lo}, {hi})", source=self.name, zone=zone)
        return s

    def _latest_of(self, zone: str, s: pd.Series, stale: bool, age: float) -> Intensity:
        return Intensity(
            zone=zone,
            time=s.index[-1].to_pydatetime(),
            g_per_kwh=float(s.iloc[-1]),
            signal=self.signal,
            source=self.name,
            stale=stale,
            age_s=age,
        )

    def _forecast_of(
        self, zone: str, s: pd.Series, horizon_h: int, stale: bool, age: float
    ) -> Forecast:
        now = pd.Timestamp(self._clock()).floor("h")
        s = s[(s.index >= now) & (s.index < now + pd.Timedelta(hours=horizon_h))]
        if s.empty:
            raise SourceDataError(
                f"the forecast holds nothing for the next {horizon_h} h",
                source=self.name,
                zone=zone,
            )
        return Forecast(
            zone=zone,
            issued_at=now.to_pydatetime(),
            g_per_kwh=s,
            signal=self.signal,
            source=self.name,
            stale=stale,
            age_s=age,
        )


class ElectricityMapsSource(_Remote):
    """Electricity Maps API v3 (``auth-token`` header); average signal, lifecycle by default."""

    name = "electricitymaps"
    signal: Signal = "average"

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = "https://api.electricitymap.org/v3",
        emission_factor: str = "lifecycle",
        http: HttpClient | None = None,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(http or HttpClient(source=self.name, clock=clock), clock)
        self._base = base_url.rstrip("/")
        self._headers = {"auth-token": api_key}
        self._factor = emission_factor

    async def _get(self, path: str, zone: str, **params: str) -> Any:
        return await self.http.get_json(
            f"{self._base}{path}",
            zone=zone,
            params={"zone": zone, "emissionFactorType": self._factor, **params},
            headers=self._headers,
        )

    async def latest(self, zone: str) -> Intensity:
        async def fetch() -> pd.Series:
            body = await self._get("/carbon-intensity/latest", zone)
            if not isinstance(body, dict):
                raise SourceDataError("answer is not an object", source=self.name, zone=zone)
            return _series([body], "datetime", "carbonIntensity", source=self.name, zone=zone)

        s, stale, age = await self.http.cached(("latest", zone), fetch, zone=zone)
        return self._latest_of(zone, s, stale, age)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        lo, hi = pd.Timestamp(require_utc(start)), pd.Timestamp(require_utc(end))
        parts = []
        step = pd.Timedelta(days=10)  # past-range serves at most 10 days of hourly data a call
        t = lo
        while t < hi:
            u = min(t + step, hi)
            body = await self._get(
                "/carbon-intensity/past-range", zone, start=t.isoformat(), end=u.isoformat()
            )
            items = _items(body, "data", source=self.name, zone=zone)
            parts.append(_series(items, "datetime", "carbonIntensity", source=self.name, zone=zone))
            t = u
        return self._window(parts, zone, lo, hi)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        async def fetch() -> pd.Series:
            body = await self._get("/carbon-intensity/forecast", zone)
            items = _items(body, "forecast", source=self.name, zone=zone)
            return _series(items, "datetime", "carbonIntensity", source=self.name, zone=zone)

        s, stale, age = await self.http.cached(("forecast", zone), fetch, zone=zone)
        return self._forecast_of(zone, s, horizon_h, stale, age)


class WattTimeSource(_Remote):
    """WattTime API v3: marginal operating emissions rate (``co2_moer``), lbs/MWh -> g/kWh.

    Logs in with HTTP basic auth for a bearer token (valid 30 minutes), renewed before it
    expires and once more if a call answers 401.
    """

    name = "watttime"
    signal: Signal = "marginal"
    TOKEN_TTL = timedelta(minutes=25)

    def __init__(
        self,
        username: str,
        password: str,
        *,
        base_url: str = "https://api.watttime.org",
        http: HttpClient | None = None,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(http or HttpClient(source=self.name, clock=clock), clock)
        self._base = base_url.rstrip("/")
        basic = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._login_headers = {"Authorization": f"Basic {basic}"}
        self._token: str | None = None
        self._token_at: datetime | None = None

    async def _login(self) -> str:
        now = self._clock()
        if self._token and self._token_at and now - self._token_at < self.TOKEN_TTL:
            return self._token
        body = await self.http.get_json(
            f"{self._base}/login", zone=None, headers=self._login_headers
        )
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise SourceDataError("login answered without a token", source=self.name)
        self._token, self._token_at = token, now
        return token

    async def _get(self, path: str, zone: str, **params: str) -> Any:
        for attempt in (1, 2):
            token = await self._login()
            try:
                return await self.http.get_json(
                    f"{self._base}{path}",
                    zone=zone,
                    params={"region": zone, "signal_type": "co2_moer", **params},
                    headers={"Authorization": f"Bearer {token}"},
                )
            except SourceAuthError:
                if attempt == 2:
                    raise
                self._token = None  # expired or revoked: log in again once
        raise AssertionError("unreachable")

    def _points(self, body: Any, zone: str) -> pd.Series:
        items = _items(body, "data", source=self.name, zone=zone)
        meta = body.get("meta") if isinstance(body, dict) else None
        units = meta.get("units") if isinstance(meta, dict) else None
        scale = {"lbs_co2_per_mwh": LBS_PER_MWH_TO_G_PER_KWH, "g_co2_per_kwh": 1.0}.get(str(units))
        if scale is None:
            raise SourceDataError(
                f"unsupported units {units!r}; expected lbs_co2_per_mwh (co2_moer)",
                source=self.name,
                zone=zone,
            )
        return _series(items, "point_time", "value", source=self.name, zone=zone, scale=scale)

    async def latest(self, zone: str) -> Intensity:
        async def fetch() -> pd.Series:
            now = pd.Timestamp(self._clock())
            body = await self._get(
                "/v3/historical",
                zone,
                start=(now - pd.Timedelta(minutes=30)).isoformat(),
                end=now.isoformat(),
            )
            return self._points(body, zone)

        s, stale, age = await self.http.cached(("latest", zone), fetch, zone=zone)
        return self._latest_of(zone, s, stale, age)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        lo, hi = pd.Timestamp(require_utc(start)), pd.Timestamp(require_utc(end))
        parts, t = [], lo
        while t < hi:  # historical serves at most 32 days a call
            u = min(t + pd.Timedelta(days=30), hi)
            body = await self._get("/v3/historical", zone, start=t.isoformat(), end=u.isoformat())
            parts.append(self._points(body, zone))
            t = u
        return self._window(parts, zone, lo, hi)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        async def fetch() -> pd.Series:
            body = await self._get("/v3/forecast", zone, horizon_hours=str(max(horizon_h, 24)))
            return self._points(body, zone)

        s, stale, age = await self.http.cached(("forecast", zone), fetch, zone=zone)
        return self._forecast_of(zone, s, horizon_h, stale, age)


class UKCarbonIntensitySource(_Remote):
    """UK Carbon Intensity API (National Grid ESO), no key. Zone ``GB`` is national;
    ``GB-<regionid>`` (1-17, e.g. ``GB-13`` London) is regional. Half-hourly, average signal.
    ``actual`` is used where published, else the API's own ``forecast`` for that half hour."""

    name = "ukci"
    signal: Signal = "average"

    def __init__(
        self,
        *,
        base_url: str = "https://api.carbonintensity.org.uk",
        http: HttpClient | None = None,
        clock: Clock = utc_now,
    ) -> None:
        super().__init__(http or HttpClient(source=self.name, clock=clock), clock)
        self._base = base_url.rstrip("/")

    @staticmethod
    def _region(zone: str) -> int | None:
        if zone == "GB":
            return None
        prefix, _, rid = zone.partition("-")
        if prefix == "GB" and rid.isdigit() and 1 <= int(rid) <= 17:
            return int(rid)
        raise UnknownZoneError(
            "UK Carbon Intensity zones are 'GB' (national) or 'GB-1' .. 'GB-17' (regions)",
            source="ukci",
            zone=zone,
        )

    @staticmethod
    def _fmt(t: pd.Timestamp) -> str:
        return str(t.strftime("%Y-%m-%dT%H:%MZ"))

    def _periods(self, body: Any, zone: str) -> pd.Series:
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, dict):  # regional: {"data": {"regionid":..., "data": [...]}}
            data = data.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
            data = [{**p, **(p.get("regions") or [{}])[0]} for p in data]
        if not isinstance(data, list):
            raise SourceDataError("no list 'data' in the answer", source=self.name, zone=zone)
        rows = []
        for p in data:
            intensity = p.get("intensity") if isinstance(p, dict) else None
            if not isinstance(intensity, dict):
                raise SourceDataError("period without 'intensity'", source=self.name, zone=zone)
            value = intensity.get("actual")
            if value is None:
                value = intensity.get("forecast")
            rows.append({"from": p.get("from"), "value": value})
        return _series(rows, "from", "value", source=self.name, zone=zone)

    async def _fetch_window(self, zone: str, lo: pd.Timestamp, hi: pd.Timestamp) -> pd.Series:
        rid = self._region(zone)
        if rid is None:
            url = f"{self._base}/intensity/{self._fmt(lo)}/{self._fmt(hi)}"
        else:
            url = f"{self._base}/regional/intensity/{self._fmt(lo)}/{self._fmt(hi)}/regionid/{rid}"
        return self._periods(await self.http.get_json(url, zone=zone), zone)

    async def latest(self, zone: str) -> Intensity:
        async def fetch() -> pd.Series:
            rid = self._region(zone)
            url = (
                f"{self._base}/intensity"
                if rid is None
                else f"{self._base}/regional/regionid/{rid}"
            )
            return self._periods(await self.http.get_json(url, zone=zone), zone)

        s, stale, age = await self.http.cached(("latest", zone), fetch, zone=zone)
        return self._latest_of(zone, s, stale, age)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        lo, hi = pd.Timestamp(require_utc(start)), pd.Timestamp(require_utc(end))
        parts, t = [], lo
        while t < hi:  # the API serves at most 14 days a call
            u = min(t + pd.Timedelta(days=14), hi)
            parts.append(await self._fetch_window(zone, t, u))
            t = u
        return self._window(parts, zone, lo, hi)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        async def fetch() -> pd.Series:
            now = pd.Timestamp(self._clock()).floor("h")
            rid = self._region(zone)
            tail = "fw48h" if rid is None else f"fw48h/regionid/{rid}"
            base = f"{self._base}/intensity" if rid is None else f"{self._base}/regional/intensity"
            body = await self.http.get_json(f"{base}/{self._fmt(now)}/{tail}", zone=zone)
            return self._periods(body, zone)

        s, stale, age = await self.http.cached(("forecast", zone), fetch, zone=zone)
        return self._forecast_of(zone, s, horizon_h, stale, age)
