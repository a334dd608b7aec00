"""The tracer provider a config's ``telemetry`` block asks for: spans sampled at its
``sample_ratio``, batched, and exported over OTLP/HTTP on a thread of their own.

A collector that is down, slow or refusing never holds up a request: a request only appends
its ended span to a bounded queue (:class:`SheddingProcessor`); the batch processor's thread
exports (each export bounded by ``export_timeout_s``, retries included), and while the queue is
full new spans are dropped and counted (``dropped``), one warning a minute in the log rather
than one a span. The OTLP exporter is imported only when tracing is on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from regions.config import Telemetry

log = logging.getLogger(__name__)

MAX_QUEUE = 2048  # ended spans waiting for export; past it new ones are dropped
BATCH = 512  # spans in one export
DELAY_MS = 2000  # the longest an ended span waits for its batch


def tracer_provider(
    cfg: Telemetry, exporter: SpanExporter | None = None
) -> tuple[TracerProvider, SheddingProcessor]:
    """The provider for ``cfg`` and its processor: ``exporter`` (default: OTLP/HTTP to
    ``cfg.otlp_endpoint``) behind a :class:`SheddingProcessor`, sampling ``cfg.sample_ratio``
    of the traces. The ratio decides for every request, whatever the client's ``traceparent``
    says was sampled: the client does not choose what this router exports."""
    if exporter is None:  # its HTTP stack (requests, protobuf) loaded only when asked for
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=cfg.traces_url(), headers=dict(cfg.headers), timeout=cfg.export_timeout_s
        )
    ratio = TraceIdRatioBased(cfg.sample_ratio)
    sampler = ParentBased(
        ratio,
        remote_parent_sampled=ratio,
        remote_parent_not_sampled=ratio,
    )
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({"service.name": cfg.service_name})
    )
    processor = SheddingProcessor(exporter, cfg.export_timeout_s)
    provider.add_span_processor(processor)
    return provider, processor


class SheddingProcessor(SpanProcessor):
    """A batch span processor that drops, counted and quietly, what it cannot queue. The SDK's
    own logs a warning for every span it drops: under load with the collector down, a log line
    a request."""

    def __init__(
        self,
        exporter: SpanExporter,
        export_timeout_s: float = 5.0,
        *,
        max_queue: int = MAX_QUEUE,
        batch: int = BATCH,
        delay_ms: float = DELAY_MS,
        warn_every_s: float = 60.0,
    ) -> None:
        self.max_queue = max_queue
        self.pending = 0  # ended and not yet handed to the exporter
        self.dropped = 0
        self._lock = threading.Lock()
        self._warn_every_s = warn_every_s
        self._warned_at = -warn_every_s
        self._batch = BatchSpanProcessor(
            _Counted(exporter, self),
            max_queue_size=max_queue + batch,  # its own limit never reached: ours comes first
            max_export_batch_size=batch,
            schedule_delay_millis=delay_ms,
            export_timeout_millis=export_timeout_s * 1000,
        )

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        with self._lock:
            full = self.pending >= self.max_queue
            if full:
                self.dropped += 1
            else:
                self.pending += 1
        if not full:
            self._batch.on_end(span)
            return
        now = time.monotonic()
        if now - self._warned_at >= self._warn_every_s:
            self._warned_at = now
            log.warning(
                "trace export is behind (is the collector down?): %d spans dropped so far",
                self.dropped,
            )

    def _exported(self, n: int) -> None:
        with self._lock:
            self.pending -= n

    def shutdown(self) -> None:
        self._batch.shutdown()  # type: ignore[no-untyped-call]

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flushed: bool = self._batch.force_flush(timeout_millis)
        return flushed


class _Counted(SpanExporter):
    """The exporter, telling its processor how many spans left the queue."""

    def __init__(self, exporter: SpanExporter, owner: SheddingProcessor) -> None:
        self._exporter = exporter
        self._owner = owner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self._exporter.export(spans)
        finally:
            self._owner._exported(len(spans))

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        flushed: bool = self._exporter.force_flush(timeout_millis)
        return flushed
