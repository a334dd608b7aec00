"""Local HTTP servers that speak the documented JSON of Electricity Maps v3, WattTime v3 and
UK Carbon Intensity, with scriptable failures (status, Retry-After, delay, malformed body).

Shapes follow ../shared/data/carbon/api_formats; numbers are generated per request.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
from aiohttp import web


@dataclass
class Fault:
    status: int = 500
    body: str = '{"error": "boom"}'
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


class FakeAPI:
    """One aiohttp app; ``faults[path]`` is a queue consumed one per request before the
    normal answer; ``override[path]`` replaces the normal JSON body."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.override: dict[str, Any] = {}
        self.hits: dict[str, int] = defaultdict(int)
        self.headers_seen: list[dict[str, str]] = []
        self.app = web.Application(middlewares=[self._middleware])
        self._runner: web.AppRunner | None = None
        self.url = ""

    def fail(self, path: str, *faults: Fault) -> None:
        self.faults[path].extend(faults)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        self.headers_seen.append(dict(request.headers))
        key = next((k for k in self.faults if path.startswith(k) and self.faults[k]), None)
        if key is not None:
            fault = self.faults[key].popleft()
            if fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            return web.Response(
                status=fault.status,
                text=fault.body,
                headers=fault.headers,
                content_type="application/json",
            )
        for k, body in self.override.items():
            if path.startswith(k):
                text = body if isinstance(body, str) else json.dumps(body)
                return web.Response(text=text, content_type="application/json")
        return await handler(request)

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def hours(self, start: datetime, n: int, step_min: int = 60) -> list[datetime]:
        return [start + timedelta(minutes=step_min * i) for i in range(n)]


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _value(t: datetime, base: float = 200.0) -> float:
    return round(base + 50 * ((t.hour % 12) / 12), 1)


def electricitymaps_app(api: FakeAPI, key: str = "em-key") -> FakeAPI:
    async def check(request: web.Request) -> None:
        if request.headers.get("auth-token") != key:
            raise web.HTTPUnauthorized(text='{"message": "invalid auth-token"}')

    async def latest(request: web.Request) -> web.Response:
        await check(request)
        now = pd.Timestamp(api.clock()).floor("h").to_pydatetime()
        return web.json_response(
            {
                "zone": request.query["zone"],
                "carbonIntensity": _value(now),
                "datetime": _iso(now),
                "updatedAt": _iso(now),
                "emissionFactorType": "lifecycle",
                "isEstimated": True,
                "estimationMethod": "TIME_SLICER_AVERAGE",
            }
        )

    async def past_range(request: web.Request) -> web.Response:
        await check(request)
        lo = pd.Timestamp(request.query["start"]).to_pydatetime()
        hi = pd.Timestamp(request.query["end"]).to_pydatetime()
        n = int((hi - lo).total_seconds() // 3600)
        return web.json_response(
            {
                "zone": request.query["zone"],
                "data": [
                    {
                        "datetime": _iso(t),
                        "carbonIntensity": _value(t),
                        "updatedAt": _iso(t),
                        "createdAt": _iso(t),
                        "emissionFactorType": "lifecycle",
                        "isEstimated": False,
                        "estimationMethod": None,
                    }
                    for t in api.hours(lo, n)
                ],
            }
        )

    async def forecast(request: web.Request) -> web.Response:
        await check(request)
        now = pd.Timestamp(api.clock()).floor("h").to_pydatetime()
        return web.json_response(
            {
                "zone": request.query["zone"],
                "updatedAt": _iso(now),
                "forecast": [
                    {"carbonIntensity": _value(t), "datetime": _iso(t)} for t in api.hours(now, 72)
                ],
            }
        )

    api.app.router.add_get("/v3/carbon-intensity/latest", latest)
    api.app.router.add_get("/v3/carbon-intensity/past-range", past_range)
    api.app.router.add_get("/v3/carbon-intensity/forecast", forecast)
    return api


def watttime_app(api: FakeAPI, user: str = "u", password: str = "p") -> FakeAPI:
    tokens: set[str] = set()

    async def login(request: web.Request) -> web.Response:
        import base64

        auth = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        if auth != expected:
            raise web.HTTPUnauthorized(text='{"error": "bad credentials"}')
        token = f"tok{len(tokens) + 1}"
        tokens.add(token)
        return web.json_response({"token": token})

    def check(request: web.Request) -> None:
        if request.headers.get("Authorization", "").removeprefix("Bearer ") not in tokens:
            raise web.HTTPUnauthorized(text='{"error": "token expired"}')

    def meta(units: str = "lbs_co2_per_mwh") -> dict[str, Any]:
        return {
            "region": "CAISO_NORTH",
            "signal_type": "co2_moer",
            "units": units,
            "data_point_period_seconds": 300,
            "model": {"date": "2023-03-01"},
            "warnings": [],
        }

    async def historical(request: web.Request) -> web.Response:
        check(request)
        lo = pd.Timestamp(request.query["start"]).to_pydatetime()
        hi = pd.Timestamp(request.query["end"]).to_pydatetime()
        n = int((hi - lo).total_seconds() // 300)
        pts = [{"point_time": t.isoformat(), "value": 1000.0} for t in api.hours(lo, n, 5)]
        return web.json_response({"data": pts, "meta": meta()})

    async def forecast(request: web.Request) -> web.Response:
        check(request)
        now = pd.Timestamp(api.clock()).floor("5min").to_pydatetime()
        pts = [
            {"point_time": t.isoformat(), "value": 900.0 + (i % 12)}
            for i, t in enumerate(api.hours(now, 24 * 12, 5))
        ]
        return web.json_response({"data": pts, "meta": {**meta(), "generated_at": now.isoformat()}})

    api.app.router.add_get("/login", login)
    api.app.router.add_get("/v3/historical", historical)
    api.app.router.add_get("/v3/forecast", forecast)
    api.tokens = tokens  # type: ignore[attr-defined]
    return api


def ukci_app(api: FakeAPI) -> FakeAPI:
    def fmt(t: datetime) -> str:
        return t.strftime("%Y-%m-%dT%H:%MZ")

    def periods(lo: datetime, n: int, actual: bool) -> list[dict[str, Any]]:
        return [
            {
                "from": fmt(t),
                "to": fmt(t + timedelta(minutes=30)),
                "intensity": {
                    "forecast": _value(t, 150),
                    "actual": _value(t, 140) if actual else None,
                    "index": "moderate",
                },
            }
            for t in api.hours(lo, n, 30)
        ]

    def regional(p: dict[str, Any], rid: int) -> dict[str, Any]:
        return {
            "from": p["from"],
            "to": p["to"],
            "regions": [
                {
                    "regionid": rid,
                    "shortname": "London",
                    "dnoregion": "UKPN London",
                    "intensity": {"forecast": p["intensity"]["forecast"], "index": "moderate"},
                    "generationmix": [
                        {"fuel": "gas", "perc": 40.0},
                        {"fuel": "wind", "perc": 60.0},
                    ],
                }
            ],
        }

    def now() -> datetime:
        return pd.Timestamp(api.clock()).floor("30min").to_pydatetime()

    async def current(request: web.Request) -> web.Response:
        return web.json_response({"data": periods(now(), 1, actual=True)})

    async def window(request: web.Request) -> web.Response:
        lo = pd.Timestamp(request.match_info["frm"]).to_pydatetime()
        to = request.match_info["to"]
        n = (
            96
            if to == "fw48h"
            else int((pd.Timestamp(to).to_pydatetime() - lo).total_seconds() // 1800)
        )
        return web.json_response({"data": periods(lo, n, actual=to != "fw48h")})

    async def regional_current(request: web.Request) -> web.Response:
        rid = int(request.match_info["rid"])
        return web.json_response({"data": [regional(p, rid) for p in periods(now(), 1, False)]})

    async def regional_window(request: web.Request) -> web.Response:
        rid = int(request.match_info["rid"])
        lo = pd.Timestamp(request.match_info["frm"]).to_pydatetime()
        to = request.match_info["to"]
        n = (
            96
            if to == "fw48h"
            else int((pd.Timestamp(to).to_pydatetime() - lo).total_seconds() // 1800)
        )
        return web.json_response(
            {
                "data": {
                    "regionid": rid,
                    "shortname": "London",
                    "data": [{**p, "generationmix": []} for p in periods(lo, n, False)],
                }
            }
        )

    api.app.router.add_get("/intensity", current)
    api.app.router.add_get("/intensity/{frm}/{to}", window)
    api.app.router.add_get("/regional/regionid/{rid}", regional_current)
    api.app.router.add_get("/regional/intensity/{frm}/{to}/regionid/{rid}", regional_window)
    return api


@asynccontextmanager
async def fake_openai() -> AsyncIterator[str]:
    """regions.fake_openai on a loopback port: its base URL (.../v1)."""
    from regions.fake_openai import make_app

    runner = web.AppRunner(make_app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


# ---- an OpenAI-compatible server that gives one answer whole or streamed -----------------------

USAGE_MODES = ("final", "last_choice", "cumulative", "none")


@dataclass
class Scripted:
    """What :func:`scripted_openai` answers: ``pieces`` of text (one SSE chunk each when
    streamed, joined when whole), with ``prompt_tokens`` and one completion token a piece as
    its usage, reported as ``usage`` says:

    - ``final``: OpenAI's way, an event of its own (``"choices": []``) before ``[DONE]`` when
      the request asked for it (``stream_options.include_usage``), and on a whole answer;
    - ``last_choice``: on the chunk that carries ``finish_reason`` (TGI, older llama.cpp);
    - ``cumulative``: running totals on every chunk (some vLLM versions with continuous usage
      stats), the last one the whole stream's;
    - ``none``: never, neither whole nor streamed.

    ``pause_s`` is waited between chunks. ``bodies`` records what it was asked, ``cut`` counts
    the streams their client hung up on."""

    pieces: list[str]
    prompt_tokens: int = 9
    usage: str = "final"
    pause_s: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    cut: int = 0

    def counts(self, k: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": k,
                "total_tokens": self.prompt_tokens + k}  # fmt: skip


@asynccontextmanager
async def scripted_openai(script: Scripted) -> AsyncIterator[str]:
    """A loopback OpenAI-compatible server (chat and text completions) that answers ``script``
    whole or streamed, the same answer either way: its base URL (.../v1)."""
    if script.usage not in USAGE_MODES:
        raise ValueError(f"usage must be one of {USAGE_MODES}")

    async def answer(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        script.bodies.append(body)
        chat = request.path.endswith("/chat/completions")
        n = len(script.pieces)
        if not body.get("stream"):
            text = "".join(script.pieces)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            whole: dict[str, Any] = {"id": "x", "object": "chat.completion" if chat else
                                     "text_completion", "choices": [choice]}  # fmt: skip
            if script.usage != "none":
                whole["usage"] = script.counts(n)
            return web.json_response(whole)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        for k, piece in enumerate(script.pieces, 1):
            choice = {"index": 0, "finish_reason": "stop" if k == n else None}
            if chat:
                choice["delta"] = {"content": piece}
            else:
                choice["text"] = piece
            event: dict[str, Any] = {"id": "x", "object": obj, "choices": [choice]}
            if script.usage == "cumulative" or (script.usage == "last_choice" and k == n):
                event["usage"] = script.counts(k)
            try:
                await resp.write(f"data: {json.dumps(event)}\n\n".encode())
                if script.pause_s:
                    await asyncio.sleep(script.pause_s)
            except ConnectionResetError:  # the router hung up: it stopped the generation
                script.cut += 1
                return resp
        asked = (body.get("stream_options") or {}).get("include_usage")
        if script.usage == "final" and asked:
            end = {"id": "x", "object": obj, "choices": [], "usage": script.counts(n)}
            await resp.write(f"data: {json.dumps(end)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    app.router.add_post("/v1/completions", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()
