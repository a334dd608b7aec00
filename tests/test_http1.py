"""The proxy's HTTP/1.1 client against loopback servers that answer byte by byte as scripted:
lengths, chunks, bodies ended by closing, keep-alive and its race, servers that die, stall or
speak garbage, flow control, TLS; and the OpenAI backend's mapping of upstream statuses."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from regions.backends import BackendError, BackendRefused, BackendUnavailable, CompletionRequest
from regions.http1 import HIGH_WATER, Http1Pool, UpstreamError, header_lines
from regions.openai_backend import OpenAIBackend

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Seen:
    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []


async def read_request(reader: asyncio.StreamReader, seen: Seen) -> bytes | None:
    """One request (head and body) off the connection; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    request = head + await reader.readexactly(length)
    seen.requests.append(request)
    return request


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Seen]:
    """A loopback server running ``handler`` per connection; on exit every connection is
    closed and every handler ended, so no transport is left to the garbage collector."""
    seen = Seen()
    tasks: set[asyncio.Task[None]] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, seen.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=tls)
    seen.port = srv.sockets[0].getsockname()[1]
    try:
        async with srv:
            yield seen
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.01)  # closed transports release their sockets a turn later


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def keep_answering(body: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while await read_request(reader, seen) is not None:
            writer.write(ok(body))
            await writer.drain()

    return handler


def pool_for(seen: Seen) -> Http1Pool:
    return Http1Pool(f"http://127.0.0.1:{seen.port}/v1")


async def post(pool: Http1Pool, body: bytes = b"{}", timeout_s: float = 5.0) -> bytes:
    head = pool.head("POST", "/chat/completions", {"Content-Type": "application/json"})
    async with await pool.request(head, body, timeout_s=timeout_s) as resp:
        assert resp.status == 200
        return await resp.read()


async def test_keep_alive_reuses_one_connection_and_sends_a_well_formed_request() -> None:
    seen_by: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while (request := await read_request(reader, seen)) is not None:
            seen_by.append(request)
            writer.write(ok(b'{"n": %d}' % len(seen_by)))

    async with server(handler) as seen:
        pool = pool_for(seen)
        assert [await post(pool, b'{"a": 1}') for _ in range(3)] == [
            b'{"n": 1}',
            b'{"n": 2}',
            b'{"n": 3}',
        ]
        await pool.aclose()
    assert seen.connections == 1 and pool.connections_opened == 1
    head, _, body = seen_by[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{seen.port}".encode() in lines
    assert b"Content-Length: 8" in lines and body == b'{"a": 1}'


async def test_chunked_body_arrives_as_it_is_sent() -> None:
    go_on = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await go_on.wait()  # the second part only once the client has the first
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader, Seen())

    async with server(handler) as seen:
        pool = pool_for(seen)
        head = pool.head("POST", "/x", {})
        got = []
        async with await pool.request(head, b"", timeout_s=5) as resp:
            async for data in resp.chunks():
                got.append(data)
                go_on.set()
        assert got == [b"first", b"second"]
        assert len(pool._idle) == 1  # read to the end: kept for the next request
        await pool.aclose()


async def test_body_ended_by_close_is_whole_and_the_connection_is_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        await writer.drain()

    async with server(handler) as seen:
        pool = pool_for(seen)
        assert await post(pool) == b"all of it"
        assert await post(pool) == b"all of it"
        await pool.aclose()
    assert seen.connections == 2


async def test_reused_connection_closed_as_the_request_goes_out_is_sent_once_more() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        seen = Seen()
        await read_request(reader, seen)
        writer.write(ok(b"one"))
        await writer.drain()
        if n == 1:  # the keep-alive race: the next request is read, then the server hangs up
            await read_request(reader, seen)
            return
        while await read_request(reader, seen) is not None:
            writer.write(ok(b"two"))

    async with server(handler) as seen:
        pool = pool_for(seen)
        assert await post(pool) == b"one"
        assert await post(pool) == b"one"  # on the second connection, its first answer
        await pool.aclose()
    assert seen.connections == 2


async def test_new_connection_closed_without_an_answer_is_an_error_not_a_retry() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())

    async with server(handler) as seen:
        pool = pool_for(seen)
        with pytest.raises(UpstreamError, match="closed without an answer"):
            await post(pool)
    assert seen.connections == 1


async def test_close_in_the_middle_of_the_body_is_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()

    async with server(handler) as seen:
        pool = pool_for(seen)
        with pytest.raises(UpstreamError, match="closed before the answer was complete"):
            await post(pool)


async def test_garbage_is_a_malformed_response() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HELLO THERE\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async with server(handler) as seen:
        with pytest.raises(UpstreamError, match="malformed HTTP response"):
            await post(pool_for(seen))


async def test_silent_server_times_out_on_the_head_then_on_the_body() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        await asyncio.sleep(5)

    async with server(silent) as seen:
        with pytest.raises(UpstreamError, match="no answer within 0.2 s"):
            await post(pool_for(seen), timeout_s=0.2)

    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfive!")
        await writer.drain()
        await asyncio.sleep(5)

    async with server(stalls) as seen:
        with pytest.raises(UpstreamError, match="no data within 0.2 s"):
            await post(pool_for(seen), timeout_s=0.2)


async def test_refused_connection_names_the_upstream() -> None:
    async with server(keep_answering(b"")) as seen:
        port = seen.port
    pool = Http1Pool(f"http://127.0.0.1:{port}/v1")
    with pytest.raises(UpstreamError, match=f"http://127.0.0.1:{port}: cannot connect"):
        await post(pool)


async def test_a_body_not_read_pauses_the_socket() -> None:
    size = 4 * 1024 * 1024

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(ok(bytes(range(256)) * (size // 256)))
        await writer.drain()
        await read_request(reader, Seen())

    async with server(handler) as seen:
        pool = pool_for(seen)
        async with await pool.request(pool.head("POST", "/x", {}), b"", timeout_s=5) as resp:
            await asyncio.sleep(0.3)  # the server has written all it can; we read nothing
            conn = resp._conn
            assert conn is not None and conn.paused
            assert conn.buffered <= HIGH_WATER + 256 * 1024  # one socket read past the mark
            body = await resp.read()
        assert body == bytes(range(256)) * (size // 256)
        await pool.aclose()


async def test_abandoned_or_cancelled_answers_close_their_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        seen = Seen()
        while await read_request(reader, seen) is not None:
            if n == 2:
                await asyncio.sleep(5)  # the request that gets cancelled
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await writer.drain()

    async with server(handler) as seen:
        pool = pool_for(seen)
        head = pool.head("POST", "/x", {})
        async with await pool.request(head, b"", timeout_s=5) as resp:
            async for data in resp.chunks():
                assert data == b"abc"
                break  # the stream's reader goes away before its end
        assert not pool._idle  # a half-read answer cannot precede the next one
        task = asyncio.ensure_future(pool.request(head, b"", timeout_s=5))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not pool._idle
        async with await pool.request(head, b"", timeout_s=5) as resp:
            assert resp.status == 200
    assert seen.connections == 3


async def test_tls_upstream(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    async with server(keep_answering(b"secret"), tls=tls) as seen:
        port = seen.port
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = Http1Pool(f"https://localhost:{port}/v1", ssl_context=trusting)
        assert await post(pool) == b"secret"
        await pool.aclose()
        with pytest.raises(UpstreamError, match="cannot connect.*CERTIFICATE_VERIFY_FAILED"):
            await post(Http1Pool(f"https://localhost:{port}/v1"))  # not trusted by default


def status(code: int, body: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await read_request(reader, Seen()) is not None:
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (code, len(body), body))

    return handler


@pytest.mark.parametrize(
    ("code", "error", "match"),
    [
        (429, BackendUnavailable, "HTTP 429"),
        (503, BackendUnavailable, "HTTP 503"),
        (500, BackendUnavailable, "HTTP 500"),
        (400, BackendRefused, 'HTTP 400: {"error": "max_tokens too large"}'),
        (422, BackendRefused, "HTTP 422"),
    ],
)
async def test_backend_maps_upstream_statuses(
    code: int, error: type[Exception], match: str
) -> None:
    async with server(status(code, b'{"error": "max_tokens too large"}')) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        request = CompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(error, match=match):
            await backend.answer(request)
        with pytest.raises(error, match=match):
            async for _ in backend.stream(request):
                pass
        await backend.aclose()


async def test_backend_answer_that_is_not_json_is_an_error() -> None:
    async with server(keep_answering(b"<html>proxy error</html>")) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        request = CompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(BackendError, match="not JSON"):
            await backend.answer(request)
        await backend.aclose()


def test_under_uvloop() -> None:
    """Ray Serve runs replicas on uvloop, whose transports are not asyncio's classes."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> list[bytes]:
        async with server(keep_answering(b"fast")) as seen:
            pool = pool_for(seen)
            got = [await post(pool) for _ in range(2)]
            await pool.aclose()
            assert pool.connections_opened == 1
            return got

    assert uvloop.run(main()) == [b"fast", b"fast"]


def sse(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)


async def test_stream_connection_is_reused_when_its_end_follows_done() -> None:
    """An SSE body's last chunk often comes after ``[DONE]``, in a later read: the connection
    is still kept, and the stream's reader does not wait for that end."""
    end = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while await read_request(reader, seen) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(sse(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'))
            writer.write(sse(b"data: [DONE]\n\n"))
            await writer.drain()
            await end.wait()
            end.clear()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        request = CompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        for _ in range(3):
            chunks = [c async for c in backend.stream(request)]  # before the body's end
            assert [c.text for c in chunks] == ["hi"]
            end.set()
            await asyncio.sleep(0.05)
        assert backend._pool.connections_opened == 1
        await backend.aclose()


async def test_stream_whose_end_never_comes_is_closed_not_reused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while await read_request(reader, seen) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(sse(b"data: [DONE]\n\n"))
            await writer.drain()

    async with server(handler) as seen:
        pool = pool_for(seen)
        async with await pool.request(pool.head("POST", "/x", {}), b"", timeout_s=5) as resp:
            async for _ in resp.chunks():
                resp.release_after_end(within_s=0.1)
                break
        await asyncio.sleep(0.3)
        assert not pool._idle
        await pool.aclose()
    assert seen.connections == 1


async def test_backend_stream_event_that_is_not_json_is_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(sse(b"data: {oops\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        request = CompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(BackendError, match="stream event is not a JSON chunk"):
            async for _ in backend.stream(request):
                pass
        await backend.aclose()


async def test_closing_the_pool_closes_connections_still_draining() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(sse(b"data: [DONE]\n\n"))
        await writer.drain()
        await asyncio.sleep(5)  # the body's end never comes

    async with server(handler) as seen:
        pool = pool_for(seen)
        resp = await pool.request(pool.head("POST", "/x", {}), b"", timeout_s=5)
        async for _ in resp.chunks():
            resp.release_after_end()
            break
        conn = next(iter(pool._draining))
        await pool.aclose()
        assert conn.closed and not pool._draining


async def test_a_head_past_its_cap_is_refused_not_buffered() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for k in range(4000):  # ~200 KiB of headers
            writer.write(b"X-Filler-%d: %s\r\n" % (k, b"y" * 40))
        writer.write(b"Content-Length: 0\r\n\r\n")
        await writer.drain()

    async with server(handler) as seen:
        pool = pool_for(seen)
        with pytest.raises(UpstreamError, match="head over"):
            await pool.request(pool.head("POST", "/x", {}), b"", timeout_s=5)
        await pool.aclose()


async def test_an_sse_line_past_its_cap_is_an_error_not_a_memory_leak() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader, Seen())
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):  # 2.5 MiB without a newline
            writer.write(sse(b"x" * 65536))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        request = CompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        with pytest.raises(BackendError, match="event over"):
            async for _ in backend.stream(request):
                pass
        await backend.aclose()


async def test_a_requests_trace_context_goes_in_its_head_and_nothing_smuggled_does() -> None:
    answer = b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}'
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while (request := await read_request(reader, seen)) is not None:
            got.append(request)
            writer.write(ok(answer))

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    messages = [{"role": "user", "content": "hi"}]
    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        traced = CompletionRequest(messages=messages, traceparent=traceparent, tracestate="a=b")
        sneaky = CompletionRequest(messages=messages, traceparent=traceparent,
                                   tracestate="a=b\r\nX-Injected: 1")  # fmt: skip
        for request in (traced, CompletionRequest(messages=messages), sneaky):
            assert (await backend.answer(request)).text == "ok"  # answered either way
        await backend.aclose()
    head, body = got[0].split(b"\r\n\r\n", 1)
    assert f"\r\ntraceparent: {traceparent}\r\ntracestate: a=b".encode() in head
    assert body.startswith(b"{") and b'"model":"m"' in body
    assert b"traceparent" not in got[1]
    assert b"traceparent" not in got[2] and b"X-Injected" not in got[2]  # not sent at all
    with pytest.raises(ValueError, match="control character"):
        header_lines({"traceparent": "00-x\r\nAuthorization: Bearer stolen"})
