"""One Ray Serve deployment per region replica, and the ingress's client for it.

An in-process backend (llama.cpp) runs in :class:`RegionReplica`, metered per request
(``generate`` streams, ``complete`` answers whole), and reports its load (``load``: its batch
and its queue, read by the ingress through :class:`RayLoadSource`). A remote OpenAI-compatible
server is called by the ingress directly (:class:`router.service.proxied.ProxiedReplica`); its
deployment then owns only the meter on the region's node and attributes the timelines the
ingress sends (``meter_events``), billing each request's measured energy to the ledger through
its own spooled :class:`Outbox`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
from ray import serve

from regions.backends import (
    Backend,
    BackendError,
    BackendRefused,
    CompletionRequest,
    LlamaCppBackend,
)
from regions.config import Billing, Replica
from regions.meters import open_meter
from regions.openai_backend import OpenAIBackend
from router.accounting import ATTRIBUTION_METHOD
from router.billing import Tariff, rebill, tariff_for
from router.errors import LoadUnavailable, ReplicaFailed, UpstreamRefused
from router.ledger import LedgerRow
from router.metering.outbox import Outbox
from router.metering.remote import RemoteAttribution
from router.metering.replica import MeteredReplica
from router.ray_app.metering import METERING_ACTOR, NAMESPACE
from router.service.ports import Answer, Chunk, Final, LoadReport, StreamItem
from router.service.proxied import TimelineBatch

log = logging.getLogger(__name__)

MAX_TEMPLATES = 100_000  # predicted bills a proxied replica keeps while it attributes


def make_backend(rep: Replica) -> Backend:
    b = rep.backend
    if b.kind == "llama_cpp":
        return LlamaCppBackend(
            b.model, slots=rep.max_concurrency, n_threads=b.n_threads, n_ctx=b.n_ctx
        )
    return remote_backend(rep)


def remote_backend(rep: Replica) -> OpenAIBackend:
    b = rep.backend
    if b.kind == "llama_cpp":
        raise BackendError(f"replica {rep.name} runs in process, not behind a URL")
    return OpenAIBackend(
        b.url, b.model, api_key=b.api_key or None, timeout_s=b.timeout_s,
        stream_usage=b.stream_usage,
    )  # fmt: skip


def spool_root() -> Path:
    """Where a replica spools the bills it has not yet handed to the metering actor: a private
    (0700) state folder on its node, ``$CARBON_ROUTER_STATE_DIR`` or
    ``$XDG_STATE_HOME/carbon-router`` (``~/.local/state/carbon-router``), never a shared,
    predictable temporary folder where another user could plant rows to be billed."""
    state = os.environ.get("CARBON_ROUTER_STATE_DIR") or str(
        Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "carbon-router"
    )
    return Path(state) / "spool"


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
class RegionReplica:
    def __init__(self, replica_json: str, period_s: float = 0.1) -> None:
        rep = Replica.model_validate_json(replica_json)
        self.name = rep.name
        meter = open_meter(
            rep.meter, gpu_indices=rep.gpu_indices, watts_per_core=rep.cpu_watts_per_core
        )
        self.meter = meter
        self.meter_name = rep.meter
        self.proxied = rep.backend.kind != "llama_cpp"
        self.metered: MeteredReplica | None = None
        if not self.proxied:
            self.metered = MeteredReplica(
                rep.name, make_backend(rep), meter, prefill_weight=rep.prefill_weight
            )
        else:
            self.remote = RemoteAttribution(meter, prefill_weight=rep.prefill_weight)
            self._templates: dict[str, dict[str, Any]] = {}
            self._seqs: dict[str, int] = {}  # sender -> last batch number seen
            self.lost_batches = 0
            self._billed: list[str] = []
            self._tariffs: dict[str, Tariff] = {}
            self._period_s = period_s
            self._metering = ray.get_actor(METERING_ACTOR, namespace=NAMESPACE)
            self.outbox = Outbox(
                self._record,
                spool_dir=spool_root() / rep.name,
                interval_s=0.05,
                on_sent=lambda rows: self._billed.extend(r["request_id"] for r in rows),
            )
            loop = asyncio.get_event_loop()
            loop.call_soon(self.outbox.orphans)
            self._ticker = loop.create_task(self._tick())

    async def _record(self, rows: list[dict[str, Any]]) -> None:
        await self._metering.record.remote(rows)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                self.remote.sample()
                self._bill(self.remote.advance())
            except Exception:  # a failed read is retried next period; the ingress falls back
                log.exception("replica %s: metering tick failed", self.name)

    def _bill(self, done: list[Any]) -> None:
        source = str(self.meter.energy_source)
        for att in done:
            template = self._templates.pop(att.request_id, None)
            if template is None:
                log.warning("replica %s: no bill for %s", self.name, att.request_id)
                continue
            billing = template.pop("billing")
            rates = template.pop("rates", None)
            tariff = self._tariffs.get(billing)
            if tariff is None:
                tariff = self._tariffs[billing] = tariff_for(Billing.model_validate_json(billing))
            row = rebill(
                LedgerRow(**template), att.energy_j, source, tariff,
                prefill_j=att.prefill_j, held_s=att.held_s, meter=self.meter_name,
                method=ATTRIBUTION_METHOD, rates=rates,
            )  # fmt: skip
            self.outbox.add(row.__dict__)

    async def meter_events(self, batch: TimelineBatch) -> list[str]:
        """Timelines from the ingress, and for each ended request its predicted bill (the
        template the measured bill is priced from, with ``billing``: the tariff's config).
        Returns the requests whose measured bill reached the ledger since the last call: the
        ingress stops waiting on them (one that never comes back is billed by its prediction).
        A gap in the batches' numbers is counted and logged (``lost_batches``); the requests
        whose ends it held expire in the attribution."""
        last = self._seqs.get(batch.sender)
        if last is not None and batch.seq != last + 1:
            self.lost_batches += max(0, batch.seq - last - 1)
            log.warning("replica %s: timeline batches %s..%s from %s were lost", self.name,
                        last + 1, batch.seq - 1, batch.sender)  # fmt: skip
        self._seqs[batch.sender] = max(batch.seq, last or 0)
        if len(self._seqs) > 1024:  # ingress replicas come and go: forget the oldest
            self._seqs.pop(next(iter(self._seqs)))
        self._templates.update(batch.bills)
        if len(self._templates) > MAX_TEMPLATES:  # bills whose timeline never came: the
            for rid in list(self._templates)[: len(self._templates) - MAX_TEMPLATES]:  # oldest
                del self._templates[rid]  # go; the ingress bills their prediction
        self.remote.events(batch.events)
        billed, self._billed = self._billed, []
        return billed

    async def generate(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        """The completion as :class:`Chunk` items, then its :class:`Final` with the metered
        energy (``None`` when metering did not settle within 5 s: the ingress predicts it)."""
        if self.metered is None:
            raise BackendError(f"replica {self.name}: its server is called by the ingress")
        prompt_tokens = await self.metered.backend.prompt_tokens(request)
        started = datetime.now(UTC)
        completion, first_at = 0, None
        async for chunk in self.metered.run(request_id, request):
            if chunk.n_tokens and first_at is None:
                first_at = datetime.now(UTC)
            completion += chunk.n_tokens
            yield Chunk(((chunk.text, chunk.finish_reason),))
        ended = datetime.now(UTC)
        try:
            att = await self.metered.energy(request_id, timeout_s=5.0)
        except TimeoutError:  # the ingress bills the prediction
            yield Final(prompt_tokens, completion, started, ended, None, "predicted",
                        first_token_at=first_at)  # fmt: skip
            return
        yield Final(
            prompt_tokens, completion, started, ended, att.energy_j,
            str(self.meter.energy_source), att.prefill_j, att.held_s, first_at,
        )  # fmt: skip

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer:
        """The whole completion in one answer (one actor round trip instead of one per chunk)."""
        text: list[str] = []
        finish = None
        final: Final | None = None
        async for item in self.generate(request_id, request):
            if isinstance(item, Final):
                final = item
            else:
                for t, f in item.pieces:
                    text.append(t)
                    finish = f or finish
        assert final is not None  # generate always ends with it
        return Answer("".join(text), finish, final)

    async def load(self) -> LoadReport:
        """An in-process replica's load: requests holding one of its slots (its batch) and
        requests waiting for one. A proxied server reports its own (its ``/metrics``, read by
        the ingress)."""
        if self.metered is None:
            raise BackendError(f"replica {self.name}: its server reports its own load")
        return LoadReport(self.metered.active, self.metered.waiting)

    def check_health(self) -> None:
        if self.proxied and self._ticker.done():
            raise RuntimeError(f"replica {self.name}: metering stopped")


class RayLoadSource:
    """The :class:`router.service.ports.LoadSource` of an in-process replica deployment: its
    ``load`` through the Serve handle; Ray's failures become :class:`LoadUnavailable`."""

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle

    async def read(self) -> LoadReport:
        try:
            report: LoadReport = await self.handle.load.remote()
        except (ray.exceptions.RayError, BackendError) as e:
            raise LoadUnavailable(str(getattr(e, "cause", None) or e), replica=self.name) from e
        return report


class RayReplicaClient:
    """The :class:`router.service.ports.ReplicaClient` of an in-process replica deployment:
    its items come through the Serve handle; Ray's failures become :class:`ReplicaFailed`."""

    bills_remotely = False

    def __init__(self, name: str, handle: Any) -> None:
        self.name = name
        self.handle = handle
        self._streaming = handle.options(stream=True)

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer:
        try:
            answer: Answer = await self.handle.complete.remote(request_id, request)
        except (ray.exceptions.RayError, BackendError) as e:
            raise self._failed(e) from e
        return answer

    def _failed(self, e: Exception) -> ReplicaFailed | UpstreamRefused:
        """The client's error when the backend refused the request (Ray's task error is an
        instance of its cause), else the replica's."""
        cause = getattr(e, "cause", None) or e
        if isinstance(e, BackendRefused) or isinstance(cause, BackendRefused):
            return UpstreamRefused(f"replica {self.name} refused the request: {cause}")
        return ReplicaFailed(str(cause), replica=self.name)

    async def stream(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        gen = self._streaming.generate.remote(request_id, request)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        except (ray.exceptions.RayError, BackendError) as e:
            finished = True
            raise self._failed(e) from e
        finally:
            if not finished:  # closed early (the client went away): stop generating
                gen.cancel()
