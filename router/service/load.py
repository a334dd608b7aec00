"""Replica load reports: what each replica runs (its batch) and holds (its queue), read in the
background, so that routing sees load at most one report interval old and the request path
does no I/O for it.

- :class:`LoadPoller` reads every replica's :class:`~router.service.ports.LoadSource` twice per
  interval (``policy.load_report_s``, 1 s by default), each read bounded by half an interval,
  and keeps the last report on the replica's routing state, stamped with the time the read was
  sent and the ingress's own count of requests there at that time
  (:meth:`router.service.routing.ReplicaState.in_flight` adds what the ingress sent there or
  saw end since). A read that fails or hangs leaves the last report to age; past one interval
  routing uses the ingress's own count and the decision lists ``load`` as estimated.
- :class:`ServerMetricsLoad`: a server's Prometheus ``/metrics`` (vLLM, llama.cpp server, TGI,
  SGLang; :data:`ENGINE_GAUGES`), for replicas behind an OpenAI-compatible URL.

The Ray replica deployment's source is :class:`router.ray_app.replica.RayLoadSource`; the
shipped fake is :class:`router.service.fakes.FakeLoadSource`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from regions.http1 import Http1Pool, UpstreamError
from router.errors import LoadUnavailable
from router.service.ports import LoadReport, LoadSource

if TYPE_CHECKING:
    from router.service.live import Live
    from router.service.routing import Router

log = logging.getLogger(__name__)

# (running batch, queue) gauges per engine, in the order they are looked for
ENGINE_GAUGES = (
    ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    ("tgi_batch_current_size", "tgi_queue_size"),
    ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
)
_NAMES = tuple(name for pair in ENGINE_GAUGES for name in pair)
# a real server's /metrics is ~100 KB (vLLM's, with its histograms); a body past this is refused
MAX_METRICS_BYTES = 1024 * 1024
# the most sequences (running, or waiting) a report may say: no server batches or queues more;
# a larger count is a broken or hostile source, and routing on it would overflow its arithmetic
MAX_LOAD_COUNT = 1_000_000


def checked(report: LoadReport, *, replica: str = "?", where: str = "") -> LoadReport:
    """``report`` if both counts are whole numbers in [0, :data:`MAX_LOAD_COUNT`], else
    :class:`LoadUnavailable` (the replica's load is then the ingress's own count, estimated)."""
    counts = (report.running, report.waiting)
    if not all(isinstance(v, numbers.Integral) and 0 <= v <= MAX_LOAD_COUNT for v in counts):
        shown = tuple(repr(v)[:20] for v in counts)
        raise LoadUnavailable(f"{where}{shown} is not a count in [0, {MAX_LOAD_COUNT}]",
                              replica=replica)  # fmt: skip
    return LoadReport(int(report.running), int(report.waiting))


def metrics_url(api_url: str, configured: str | None = None) -> str:
    """Where an OpenAI-compatible server's metrics are: ``configured``, else ``/metrics`` at
    the root of its API URL (``http://h:8000/v1`` -> ``http://h:8000/metrics``), where vLLM,
    llama.cpp server, TGI and SGLang serve them."""
    if configured:
        return configured
    return api_url.rstrip("/").removesuffix("/v1") + "/metrics"


def load_from_metrics(text: str, *, replica: str = "?", url: str = "") -> LoadReport:
    """The (running, waiting) gauges of the first engine in :data:`ENGINE_GAUGES` whose
    running gauge ``text`` (Prometheus exposition) has, summed over its label sets (a server
    with several engines). :class:`LoadUnavailable` says what is missing."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(_NAMES):
            continue
        brace, space = line.find("{"), line.find(" ")
        if brace >= 0 and (space < 0 or brace < space):
            name, rest = line[:brace], line[line.rfind("}") + 1 :]
        else:
            name, rest = (line[:space], line[space:]) if space >= 0 else (line, "")
        if name not in _NAMES:
            continue  # a longer name that starts with one of ours
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            value = math.nan
        sums[name] = sums.get(name, 0.0) + value
    where = f"{url}: " if url else ""
    for running, waiting in ENGINE_GAUGES:
        if running not in sums:
            continue
        if waiting not in sums:
            raise LoadUnavailable(f"{where}{running} but no queue gauge {waiting}",
                                  replica=replica)  # fmt: skip
        counts = sums[running], sums[waiting]
        if not all(_plausible(v) for v in counts):
            raise LoadUnavailable(f"{where}{running}, {waiting} = {counts} is not a count "
                                  f"in [0, {MAX_LOAD_COUNT}]", replica=replica)  # fmt: skip
        return LoadReport(int(counts[0]), int(counts[1]))
    names = ", ".join(r for r, _ in ENGINE_GAUGES)
    raise LoadUnavailable(f"{where}no running-batch gauge ({names})", replica=replica)


_PARSER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-parse")


def _plausible(v: float) -> bool:
    """A count of sequences: whole, >= 0, at most :data:`MAX_LOAD_COUNT` (NaN fails each)."""
    return 0 <= v <= MAX_LOAD_COUNT and v == math.floor(v)


class ServerMetricsLoad:
    """The load of a server behind an OpenAI-compatible URL, from its Prometheus metrics
    (``url``: see :func:`metrics_url`); each read within ``timeout_s``."""

    def __init__(self, name: str, url: str, *, timeout_s: float = 1.0) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self._pool = Http1Pool(url, connect_timeout_s=timeout_s)
        self._head = self._pool.head("GET", "", {"Accept": "text/plain"})

    async def read(self) -> LoadReport:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with await self._pool.request(
                    self._head, b"", timeout_s=self.timeout_s
                ) as resp:
                    body = await resp.read(MAX_METRICS_BYTES)
                    status = resp.status
        except (UpstreamError, TimeoutError) as e:
            raise LoadUnavailable(f"{self.url}: {e or 'no answer in time'}",
                                  replica=self.name) from e  # fmt: skip
        if status != 200:
            raise LoadUnavailable(f"{self.url}: HTTP {status}", replica=self.name)
        # parsed in a thread: a body of many matching lines takes tens of ms, which on the
        # event loop would hold up every request the ingress is serving
        # one thread for all replicas' parses, so at most one competes with the loop for the GIL
        return await asyncio.get_running_loop().run_in_executor(_PARSER, self._parse, body)

    def _parse(self, body: bytes) -> LoadReport:
        return load_from_metrics(body.decode("utf-8", "replace"), replica=self.name, url=self.url)

    async def aclose(self) -> None:
        await self._pool.aclose()


class LoadPoller:
    """Reads the replicas' load sources (one per replica, in the router's order; None: the
    replica has none) into their routing state; see the module docstring."""

    def __init__(self, live: Callable[[], Live], sources: Sequence[LoadSource | None]) -> None:
        self._live = live
        self.sources = list(sources)
        self._down: set[int] = set()  # sources whose last read failed (logged once)

    def interval_s(self) -> float:
        return self._live().config.policy.load_report_s

    async def poll_once(self) -> None:
        """Read every source once, concurrently, each within half an interval."""
        live = self._live()
        half_s = live.config.policy.load_report_s / 2
        await asyncio.gather(
            *(
                self._read(i, source, live.router, half_s)
                for i, source in enumerate(self.sources)
                if source is not None
            )
        )

    async def _read(self, i: int, source: LoadSource, router: Router, timeout_s: float) -> None:
        st = router.states[i]
        sent_at, active = router.clock(), st.active
        try:
            async with asyncio.timeout(timeout_s):
                report = checked(await source.read(), replica=source.name)
        except (LoadUnavailable, TimeoutError) as e:
            if i not in self._down:
                self._down.add(i)
                log.warning("no load report from %s (%s): its load is estimated until one comes",
                            source.name, e or f"none within {timeout_s:g} s")  # fmt: skip
            return
        except Exception:  # a bug in a source must not stop the others' reports
            if i not in self._down:
                self._down.add(i)
                log.exception("reading the load of %s failed", source.name)
            return
        if i in self._down:
            self._down.discard(i)
            log.info("load reports from %s again", source.name)
        st.report, st.report_at, st.active_at_report = report, sent_at, active

    async def loop(self) -> None:
        """Poll twice per interval, for ever (the service's background)."""
        while True:
            t0 = time.monotonic()
            await self.poll_once()
            await asyncio.sleep(max(0.0, self.interval_s() / 2 - (time.monotonic() - t0)))
