"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive connections to one upstream,
responses parsed by ``httptools`` (llhttp, the parser uvicorn uses) straight off an asyncio
protocol.

Why not aiohttp here: ``benchmarks/http_client.py`` runs both against the fake backend. On the
2-core development machine an aiohttp session used 1.7-2.0x this client's CPU per non-streamed
completion (140-220 us vs 75-110 us per request, the benchmark's own loop included) and
1.2-1.3x per 8-chunk stream, at concurrency 1 to 32. It does only what a
proxy to an OpenAI-compatible server needs: one origin (http or https), a request body in
memory, the response read whole or as it arrives, and

- timeouts: ``connect_timeout_s`` to connect; ``timeout_s`` for the response head and then for
  each read of the body (so a long stream lives as long as it keeps sending);
- flow control: a body the caller does not read fast enough pauses the socket;
- keep-alive: a connection goes back to the pool only once its response was read to the end
  and the server keeps it open; idle ones are dropped after ``idle_s``, before a typical
  server's keep-alive timeout (uvicorn's is 5 s);
- the keep-alive race: when a reused connection closes without a byte of answer (almost
  always the server's idle timeout crossing our send), the request is sent once more on a new
  connection. A server that read it and then died may see it twice; the router bills its own
  request once either way.

Every failure is an :class:`UpstreamError` naming the upstream, never a partial answer
passed off as whole.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from carbonrouter.errors import CarbonRouterError

HIGH_WATER = 256 * 1024  # body bytes buffered before the socket is paused
MAX_BODY = 64 * 1024 * 1024  # a whole-read body larger than this is refused
MAX_HEAD = 64 * 1024  # response headers past this are refused, not buffered


class UpstreamError(CarbonRouterError):
    """The upstream could not be reached, answered malformed HTTP, closed early or timed out."""


class _Conn(asyncio.Protocol):
    """One connection, parsing one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, origin: str) -> None:
        self.loop = loop
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.requests = 0  # sent on this connection
        self._waiter: asyncio.Future[None] | None = None
        self._begin()

    def _begin(self) -> None:
        self.requests += 1
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.close_delimited = False
        self.draining: Http1Pool | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports (Ray Serve runs on uvloop) do not subclass asyncio's
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(f"malformed HTTP response: {e}")
            self.close()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and self.close_delimited and not self.complete:
            self.complete = True  # a body without length ends where the connection does
        elif not self.complete:
            why = f": {exc}" if exc else ""
            self._fail(
                "connection closed before the answer was complete" + why
                if self.got_bytes
                else "connection closed without an answer" + why
            )
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD:
            if self.error is None:
                self._fail(f"response head over {MAX_HEAD} bytes")
                self.close()
            return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        names = {n.lower() for n, _ in self.headers}
        self.close_delimited = b"content-length" not in names and not any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers
        )
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.draining is not None:
            return  # its reader is done with it
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # reset once this returns
        self.complete = True
        if self.draining is not None:
            self.draining._release(self)
        self._wake()

    # -- for the pool and the response ---------------------------------------------------------
    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = UpstreamError(f"{self.origin}: {why}")

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _timed_out(self, waiter: asyncio.Future[None], timeout_s: float, what: str) -> None:
        if not waiter.done():
            waiter.set_exception(UpstreamError(f"{self.origin}: no {what} within {timeout_s:g} s"))

    async def wait(self, timeout_s: float, what: str) -> None:
        """Until the parser or the connection has news, or ``timeout_s`` passes."""
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout_s, self._timed_out, waiter, timeout_s, what)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.paused = False
        return data

    def drain_expired(self, request: int) -> None:
        if self.requests == request and not self.complete and self.draining is not None:
            self.draining._draining.discard(self)
            self.close()

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose head has arrived. Read its body with :meth:`read` or :meth:`chunks`,
    and :meth:`close` it (``async with`` does) so its connection is reused or closed."""

    def __init__(self, pool: Http1Pool, conn: _Conn, timeout_s: float) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self._timeout_s = timeout_s
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        for n, v in self.headers:
            if n.lower() == key:
                return v.decode("latin-1")
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what one or more network reads brought, per item."""
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.body:
                yield conn.take()
            elif conn.complete:
                self.close()
                return
            elif conn.error is not None:
                self.close()
                raise conn.error
            else:
                await conn.wait(self._timeout_s, "data")

    async def read(self, limit: int = MAX_BODY) -> bytes:
        parts, size = [], 0
        async for data in self.chunks():
            size += len(data)
            if size > limit:
                self.close()
                raise UpstreamError(f"{self._pool.origin}: answer over {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back when its answer was read whole, else close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._release(conn)

    def release_after_end(self, within_s: float = 1.0) -> None:
        """Done reading, though the body may not have ended (an SSE stream's ``[DONE]`` comes
        just before its last chunk): keep the connection if the end arrives within
        ``within_s``, discarding what comes before it; else close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete or conn.closed or conn.error is not None:
            self._pool._release(conn)
            return
        conn.take()  # also resumes a paused socket
        conn.draining = self._pool
        self._pool._draining.add(conn)
        conn.loop.call_later(within_s, conn.drain_expired, conn.requests)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def header_lines(headers: dict[str, str]) -> bytes:
    """``headers`` as the lines of a request head. A value with a control character (CR, LF:
    a header of its own smuggled in) or outside latin-1 is refused (``ValueError``)."""
    out = []
    for name, value in headers.items():
        if any(ord(c) < 32 or ord(c) == 127 for c in name + value):
            raise ValueError(f"header {name!r} has a control character")
        out.append(f"{name}: {value}\r\n".encode("latin-1"))
    return b"".join(out)


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to the origin of ``base_url``."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float = 5.0,
        idle_s: float = 4.0,
        max_idle: int = 256,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{base_url!r}: an http:// or https:// URL with a host is needed")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        host_header = parts.netloc.rsplit("@", 1)[-1]
        self._host_line = f"Host: {host_header}\r\n".encode("latin-1")
        self.connect_timeout_s = connect_timeout_s
        self.idle_s = idle_s
        self.max_idle = max_idle
        self._idle: deque[_Conn] = deque()
        self._draining: set[_Conn] = set()  # read by their callers up to the end of their body
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections_opened = 0

    def head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The start of a request to ``base_url + path``, up to its Content-Length value:
        built once per kind of request and reused (see :meth:`request`)."""
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (
            f"{method} {self.base_path}{path} HTTP/1.1\r\n".encode("latin-1")
            + self._host_line
            + lines.encode("latin-1")
            + b"Content-Length: "
        )

    async def request(
        self, head: bytes, body: bytes, *, timeout_s: float, headers: bytes = b""
    ) -> Response:
        """Send ``head`` (from :meth:`head`) with ``body`` and this request's own ``headers``
        (from :func:`header_lines`); returns once the response head is in."""
        message = b"".join((head, str(len(body)).encode(), b"\r\n", headers, b"\r\n", body))
        for attempt in (0, 1):
            conn = self._idle_conn()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            conn._begin()
            assert conn.transport is not None
            conn.transport.write(message)
            try:
                while not conn.head_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(timeout_s, "answer")
            except UpstreamError:
                conn.close()
                if reused and not conn.got_bytes and attempt == 0:
                    continue  # the server closed it as we sent: it never saw this request
                raise
            except BaseException:  # cancelled: the answer would land on the next request
                conn.close()
                raise
            return Response(self, conn, timeout_s)
        raise AssertionError("unreachable")

    def _idle_conn(self) -> _Conn | None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._idle.clear()
            self._loop = loop
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if not conn.closed and now - conn.idle_since < self.idle_s:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(loop, self.origin),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as e:
            raise UpstreamError(
                f"{self.origin}: no connection within {self.connect_timeout_s:g} s"
            ) from e
        except OSError as e:
            raise UpstreamError(f"{self.origin}: cannot connect: {e}") from e
        self.connections_opened += 1
        return conn

    def _release(self, conn: _Conn) -> None:
        self._draining.discard(conn)
        if conn.reusable() and len(self._idle) < self.max_idle and conn.loop is self._loop:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()
        while self._draining:
            self._draining.pop().close()
        await asyncio.sleep(0)  # the transports' close completes in the next loop iteration
