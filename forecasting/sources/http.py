"""Shared machinery of the remote carbon sources: one aiohttp session, a timeout on every
call, retries with exponential backoff that honour ``Retry-After``, a per-zone TTL cache, and
the stale fallback.

Failure rules (STYLE #6): a failed call never becomes a number. If the cache holds a value
for the key younger than ``max_stale_s``, it is returned marked ``stale`` with its age and the
failure is logged; otherwise the :class:`CarbonSourceError` propagates.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import aiohttp

from forecasting.errors import (
    CarbonSourceError,
    SourceAuthError,
    SourceDataError,
    SourceUnavailable,
)
from forecasting.sources.base import Clock, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0  # a longer Retry-After fails now instead of stalling


@dataclass
class _Entry:
    value: Any
    fetched_at: datetime


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - now).total_seconds())


class HttpClient:
    """JSON GETs against one API with timeout, retries and a TTL cache with stale fallback."""

    def __init__(
        self,
        *,
        source: str,
        timeout_s: float = 10.0,
        cache_ttl_s: float = 300.0,
        max_stale_s: float = 6 * 3600.0,
        retry: RetryPolicy | None = None,
        session: aiohttp.ClientSession | None = None,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.source = source
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.cache_ttl_s = cache_ttl_s
        self.max_stale_s = max_stale_s
        self.retry = retry or RetryPolicy()
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._sleep = sleep
        self._cache: dict[tuple[str, ...], _Entry] = {}
        self.requests_sent = 0

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._owns_session = True
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and self._owns_session and not self._session.closed:
            await self._session.close()

    async def get_json(
        self,
        url: str,
        *,
        zone: str | None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """GET ``url`` and decode JSON; retry 429/5xx/timeouts; raise typed errors."""
        session = await self.session()
        last: CarbonSourceError | None = None
        for attempt in range(1, self.retry.attempts + 1):
            wait: float | None = None
            try:
                self.requests_sent += 1
                async with session.get(
                    url, params=params, headers=headers, timeout=self.timeout
                ) as resp:
                    if resp.status in (401, 403):
                        raise SourceAuthError(
                            f"HTTP {resp.status} from {resp.url.path}: credentials refused; check "
                            "the API key / username and password in the config (${ENV} vars)",
                            source=self.source,
                            zone=zone,
                        )
                    if resp.status == 404:
                        raise SourceDataError(
                            f"HTTP 404 from {resp.url.path}: unknown zone or endpoint",
                            source=self.source,
                            zone=zone,
                        )
                    if resp.status == 429 or resp.status >= 500:
                        wait = retry_after_s(resp.headers.get("Retry-After"), self._clock())
                        last = SourceUnavailable(
                            f"HTTP {resp.status} from {resp.url.path}"
                            + (f" (Retry-After {wait:.0f}s)" if wait is not None else ""),
                            source=self.source,
                            zone=zone,
                        )
                    elif resp.status >= 400:
                        text = (await resp.text())[:200]
                        raise SourceDataError(
                            f"HTTP {resp.status} from {resp.url.path}: {text}",
                            source=self.source,
                            zone=zone,
                        )
                    else:
                        try:
                            return await resp.json(content_type=None)
                        except ValueError as e:
                            raise SourceDataError(
                                f"malformed JSON from {resp.url.path}: {e}",
                                source=self.source,
                                zone=zone,
                            ) from e
            except (TimeoutError, aiohttp.ClientError) as e:
                last = SourceUnavailable(
                    f"{type(e).__name__} calling {url}: {e or 'timed out'}",
                    source=self.source,
                    zone=zone,
                )
                last.__cause__ = e
            if attempt == self.retry.attempts:
                break
            if wait is not None and wait > self.retry.max_retry_after_s:
                log.warning(
                    "%s: Retry-After %.0fs exceeds the cap; giving up now", self.source, wait
                )
                break
            backoff = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** (attempt - 1))
            delay = wait if wait is not None else backoff * (0.5 + random.random() / 2)
            log.info(
                "%s: attempt %d failed (%s); retrying in %.2fs", self.source, attempt, last, delay
            )
            await self._sleep(delay)
        assert last is not None
        raise last

    async def cached(
        self, key: tuple[str, ...], fetch: Callable[[], Awaitable[T]], *, zone: str | None
    ) -> tuple[T, bool, float]:
        """``(value, stale, age_s)``: a fresh cached value, a new fetch, or a stale fallback."""
        now = self._clock()
        entry = self._cache.get(key)
        if entry is not None:
            age = (now - entry.fetched_at).total_seconds()
            if age <= self.cache_ttl_s:
                return entry.value, False, age
        try:
            value = await fetch()
        except CarbonSourceError as e:
            if entry is not None:
                age = (now - entry.fetched_at).total_seconds()
                if age <= self.max_stale_s:
                    log.warning("%s; serving the value fetched %.0fs ago, marked stale", e, age)
                    return entry.value, True, age
                raise type(e)(
                    f"{e}; the last known value is {age:.0f}s old, older than max_stale_s "
                    f"{self.max_stale_s:.0f}",
                    source=self.source,
                    zone=zone,
                ) from e
            raise
        self._cache[key] = _Entry(value, now)
        return value, False, 0.0
