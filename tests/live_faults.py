"""The live fault-injection suite: the router on Ray Serve (this machine) in front of
OpenAI-compatible servers on loopback that misbehave on command (:mod:`regions.fake_openai`),
one real local model (SmolLM2-135M on llama.cpp), a carbon API that is down, and spools planted
by another user. Used by ``tests/test_fault_suite.py`` (asserts) and ``benchmarks/faults.py``
(prints one line per fault).

Each fault is a scenario run by its own tenant, so its bills can be counted exactly, while a
bystander tenant sends requests that may go anywhere. :func:`check` then says what broke a
guarantee:

- every request the router answered (200) or cut (a stream ended by the client or by its
  upstream) is in the ledger exactly once, under its own id and tenant; nothing else is;
- no status but the fault's own (each scenario names the ones it expects);
- the bystander gets 200 to every request and is billed for each one, whatever the fault;
- no request restricted to EU regions is served, or billed, outside them;
- a budget is overshot by at most the prediction error of the requests admitted against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from router.ledger import Ledger, LedgerRow

ROOT = Path(__file__).resolve().parent.parent
EU = {"eu-a", "eu-b", "eu-api", "eu-local"}
TENANTS = (
    "bystander", "refused", "errors", "timeouts", "midstream", "absurd", "hangup",
    "replica", "upstream", "metering", "carbon", "budget", "batch", "spool",
)  # fmt: skip
NOBODY = 65534  # the uid of "another local user" who plants spool rows


def key(tenant: str) -> str:
    return f"sk-fault-{tenant}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the stack -------------------------------------------------------------------------------


@dataclass
class Fake:
    """One fake OpenAI-compatible server process."""

    port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "regions.fake_openai", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.state()
                return
            except OSError:
                assert time.monotonic() < deadline, f"fake server on {self.port} never came up"
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def fault(self, mode: str | None) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_fault", method="POST",
            data=json.dumps({"mode": mode}).encode(), headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=5):
            pass

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_fault", timeout=2) as r:
            return dict(json.loads(r.read()))


@dataclass
class Stack:
    url: str
    ledger: Path
    config: Path
    tmp: Path
    fakes: dict[str, Fake]
    forged: set[str] = field(default_factory=set)  # ids of rows planted in spools
    replayed: set[str] = field(default_factory=set)  # ids of our own dead process's rows

    def rows(self, tenant: str) -> list[LedgerRow]:
        return Ledger(self.ledger).tenant_rows(tenant)


def _fake_region(name: str, zone: str, port: int, price: float, residency: str,
                 source: str = "replay", timeout_s: float = 5.0) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name, "zone": zone, "carbon_source": source, "pue": 1.2,
        "price": {"flat_usd_per_kwh": price}, "rtt_ms": 20, "residency": [residency],
        "replicas": [{
            "name": f"{name}-0", "meter": "cpu", "max_concurrency": 64, "tokens_per_s": 130,
            "backend": {"kind": "openai", "url": f"http://127.0.0.1:{port}/v1",
                        "model": "smollm2-135m", "timeout_s": timeout_s},
        }],
    }  # fmt: skip


def config(tmp: Path, fakes: dict[str, Fake], budget_kwh: float = 1.0) -> dict[str, Any]:
    """eu-a (the cheapest that works, so the first choice in the EU), eu-b, us-a behind fake
    servers; eu-api, cheapest of all, whose carbon API is down; eu-local, the real model, dear
    (chosen only when asked for)."""
    dead_api = f"http://127.0.0.1:{free_port()}/v3"  # nothing listens there
    tenants: list[dict[str, Any]] = [
        {"name": t, "api_key_sha256": [hashlib.sha256(key(t).encode()).hexdigest()]}
        for t in TENANTS
    ]
    admin = hashlib.sha256(key("admin").encode()).hexdigest()
    tenants.append({"name": "admin", "admin": True, "api_key_sha256": [admin]})
    for t in tenants:
        if t["name"] == "budget":
            t["budget"] = {"period": "month", "kwh": budget_kwh}
    return {
        "carbon_sources": {
            "replay": {"kind": "replay", "dataset": "electricitymaps_hourly"},
            "down": {
                "kind": "electricitymaps",
                "api_key": "k",
                "base_url": dead_api,
                "timeout_s": 1,
            },
        },  # fmt: skip
        "regions": [
            _fake_region("eu-a", "SE", fakes["eu-a"].port, 0.05, "eu", timeout_s=2.0),
            _fake_region("eu-b", "DE", fakes["eu-b"].port, 0.10, "eu"),
            _fake_region("us-a", "US-TEX-ERCO", fakes["us-a"].port, 0.06, "us"),
            _fake_region("eu-api", "FR", fakes["eu-api"].port, 0.01, "eu", source="down"),
            {
                "name": "eu-local",
                "zone": "SE",
                "carbon_source": "replay",
                "pue": 1.1,
                "price": {"flat_usd_per_kwh": 0.90},
                "rtt_ms": 20,
                "residency": ["eu"],
                "replicas": [
                    {
                        "name": "eu-local-0",
                        "meter": "cpu",
                        "max_concurrency": 4,
                        "tokens_per_s": 130,
                        "backend": {"kind": "llama_cpp", "model": "smollm2-135m", "n_threads": 1},
                    }
                ],
            },  # fmt: skip
        ],
        "tenants": tenants,
        "billing": {"tariff": "energy", "markup": 0.25},
        "policy": {"name": "price_carbon", "weight": 0.5, "cooldown_s": 3},
        "ledger": str(tmp / "ledger.sqlite"),
    }


def _row(request_id: str, tenant: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat()
    row = LedgerRow(
        request_id=request_id, tenant=tenant, region="eu-a", replica="eu-a-0",
        model="smollm2-135m", started_at=now, ended_at=now, prompt_tokens=8,
        completion_tokens=1, energy_j=36.0, energy_source="measured", pue=1.2,
        kwh_billed=1.2e-5, intensity_g_per_kwh=30.0, signal="average", carbon_stale=False,
        carbon_g=3.6e-4, price_usd_per_kwh=0.05, tariff="energy", cost_usd=1e-6,
        energy_cost_usd=6e-7, token_cost_usd=0.0, carbon_cost_usd=0.0,
    )  # fmt: skip
    return dataclasses.asdict(row)


def _plant(folder: Path, rows: list[dict[str, Any]], *, uid: int | None = None,
           mode: int = 0o700, file_mode: int = 0o600) -> None:  # fmt: skip
    """A spool folder of ``rows``, owned by ``uid`` (None: this user; another needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    seg = folder / "0.jsonl"
    seg.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "lock").touch()
    for p in (seg, folder / "lock"):
        if uid is not None:
            os.chown(p, uid, uid)
        os.chmod(p, file_mode)
    if uid is not None:
        os.chown(folder, uid, uid)
    os.chmod(folder, mode)


def plant_spools(stack: Stack, state: Path) -> None:
    """Before the stack starts: rows a local attacker plants where spools are (or were) kept,
    each forged to bill the bystander, and one spool our own crashed process left behind."""
    spools = [state / "spool" / "eu-a-0", stack.ledger.with_suffix(".spool")]
    # another user's folder (planted by root here: only root can make one), a folder anyone
    # can write to, a file anyone can write to in a folder of ours
    plants = [(None, 0o777, 0o600), (None, 0o700, 0o666)]
    if os.geteuid() == 0:
        plants.insert(0, (NOBODY, 0o755, 0o644))
    for i, root in enumerate(spools):
        root.mkdir(parents=True, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        for j, (uid, mode, file_mode) in enumerate(plants):
            rid = f"forged-{i}-{j}"
            _plant(root / f"planted{j}", [_row(rid, "bystander")], uid=uid, mode=mode,
                   file_mode=file_mode)  # fmt: skip
            stack.forged.add(rid)
        rid = f"left-by-a-crash-{i}"
        _plant(root / "crashed", [_row(rid, "spool")])
        stack.replayed.add(rid)
    # the predictable shared folder the replicas used to spool to, now never read
    old = Path("/tmp/carbon-router/spool/eu-a-0/planted")
    with contextlib.suppress(OSError):  # another user may own that folder: then it is theirs
        _plant(old, [_row("forged-tmp", "bystander")], mode=0o755, file_mode=0o644)
        stack.forged.add("forged-tmp")


@contextlib.contextmanager
def live_stack(tmp: Path, prefill: Callable[[Path], None] | None = None) -> Iterator[Stack]:
    """The stack, up and ready; ``prefill`` writes to the ledger (its path) before it starts."""
    import ray
    from ray import serve

    from router.serve_app import build_app, wait_ready

    fakes = {name: Fake(free_port()) for name in ("eu-a", "eu-b", "us-a", "eu-api")}
    for f in fakes.values():
        f.start()
    cfg_path = tmp / "faults.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp, fakes)))
    stack = Stack("", tmp / "ledger.sqlite", cfg_path, tmp, fakes)
    state = tmp / "state"
    plant_spools(stack, state)
    if prefill is not None:
        prefill(stack.ledger)
    os.environ["CARBON_ROUTER_STATE_DIR"] = str(state)  # the replicas' spools; Ray's workers
    port = free_port()  # inherit the environment of the driver that starts the cluster
    try:
        ray.init(
            resources={f"region:{r}": 1.0 for r in ("eu-a", "eu-b", "us-a", "eu-api", "eu-local")},
            include_dashboard=False, namespace="carbon-router", log_to_driver=False,
        )  # fmt: skip
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(cfg_path)}), name="carbon-router", route_prefix="/")
        stack.url = f"http://127.0.0.1:{port}"
        assert wait_ready(stack.url, timeout_s=180), "the router never became ready"
        yield stack
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        os.environ.pop("CARBON_ROUTER_STATE_DIR", None)
        for f in fakes.values():
            f.kill()


# ---- calls -----------------------------------------------------------------------------------


@dataclass
class Result:
    """One request as its client saw it."""

    label: str  # "200", "400 upstream_refused", "200 stream error", "hung up", ...
    id: str | None = None
    region: str | None = None
    predicted_kwh: float | None = None
    seconds: float = 0.0
    message: str = ""  # the error's message, when there was one

    @property
    def billable(self) -> bool:
        """Answered or cut: the router owes the ledger a row for it. (A request whose client
        hung up before any answer is owed one only if it reached a replica: the scenario
        counts those at the upstream.)"""
        return self.label in ("200", "200 stream error", "cut by client")


def body(**kw: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m", "max_tokens": 12, "temperature": 0.0, "seed": 1,
            "messages": [{"role": "user", "content": "Name one fruit."}], **kw}  # fmt: skip


def regions(*names: str) -> dict[str, str]:
    return {"X-Carbon-Preference": "regions=(" + " ".join(f'"{n}"' for n in names) + ")"}


async def call(
    client: httpx.AsyncClient, tenant: str, *, stream: bool = False,
    headers: dict[str, str] | None = None, hang_up_after_s: float | None = None,
    hang_up_when: Callable[[], bool] | None = None,
    cut_after_chunks: int | None = None, on_first_chunk: Callable[[], Any] | None = None,
    **kw: Any,
) -> Result:  # fmt: skip
    """One chat completion; a client that hangs up after ``hang_up_after_s``, or once
    ``hang_up_when()`` holds (checked in a thread every 20 ms), or (streams) after
    ``cut_after_chunks`` chunks."""
    h = {"Authorization": f"Bearer {key(tenant)}", **(headers or {})}
    t0 = time.monotonic()
    payload = body(stream=stream, **kw)
    try:
        if not stream and hang_up_when is not None:
            post = asyncio.ensure_future(
                client.post("/v1/chat/completions", json=payload, headers=h, timeout=120)
            )
            while not post.done():
                if await asyncio.to_thread(hang_up_when):
                    post.cancel()  # the connection is closed under the request
                    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                        await post
                    return Result("hung up", seconds=_since(t0))
                await asyncio.sleep(0.02)
            r = post.result()
            return Result(f"answered before the hang-up ({r.status_code})", seconds=_since(t0))
        if not stream:
            r = await client.post("/v1/chat/completions", json=payload, headers=h,
                                  timeout=hang_up_after_s or 120)  # fmt: skip
            data = r.json()
            if r.status_code != 200:
                e = data["error"]
                return Result(
                    f"{r.status_code} {e['code']}", seconds=_since(t0), message=e["message"]
                )
            u = data["usage"]
            predicted = u["energy_kwh"] if u["energy_source"] == "predicted" else None
            return Result("200", data["id"], u["region"], predicted, _since(t0))
        async with client.stream("POST", "/v1/chat/completions", json=payload, headers=h,
                                 timeout=120) as r:  # fmt: skip
            if r.status_code != 200:
                data = json.loads(await r.aread())
                return Result(f"{r.status_code} {data['error']['code']}", seconds=_since(t0))
            rid, chunks = None, 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return Result("200 stream error", rid, r.headers.get("x-carbon-region"))
                rid = rid or event["id"]
                chunks += 1
                if chunks == 1 and on_first_chunk is not None:
                    on_first_chunk()
                if cut_after_chunks is not None and chunks >= cut_after_chunks:
                    return Result("cut by client", rid, r.headers.get("x-carbon-region"))
            return Result("200", rid, r.headers.get("x-carbon-region"), seconds=_since(t0))
    except httpx.TimeoutException:
        if hang_up_after_s is not None:
            return Result("hung up", seconds=_since(t0))
        return Result("client timeout", seconds=_since(t0))
    except httpx.HTTPError as e:
        return Result(f"transport error {type(e).__name__}", seconds=_since(t0))


def _since(t0: float) -> float:
    return time.monotonic() - t0


def client(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, limits=httpx.Limits(max_connections=128))


def gather(stack: Stack, *calls: Callable[[httpx.AsyncClient], Any]) -> list[Result]:
    """Run the calls concurrently; their results in order."""

    async def go() -> list[Result]:
        async with client(stack) as c:
            return list(await asyncio.gather(*(f(c) for f in calls)))

    return asyncio.run(go())


class Bystander:
    """Another tenant sending one request after another, anywhere, while a fault runs."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.results: list[Result] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with client(self.stack) as c:
            while not self._stop.is_set():
                self.results.append(await call(c, "bystander"))
                await asyncio.sleep(0.05)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.3)  # at least one request after the fault
        self._stop.set()
        self._thread.join(timeout=180)


# ---- outcomes and their check ----------------------------------------------------------------


@dataclass
class Outcome:
    fault: str
    tenant: str
    results: list[Result]
    allowed: set[str]  # the labels this fault may cause
    bystander: list[Result] = field(default_factory=list)
    billed_extra: int = 0  # billable requests whose id the client never saw (hung up early)
    budget_kwh: float | None = None
    eu_only: bool = False
    problems: list[str] = field(default_factory=list)  # the scenario's own findings
    rows_found: int = 0
    seconds: float = 0.0

    @property
    def rows_expected(self) -> int:
        return sum(r.billable for r in self.results) + self.billed_extra

    def statuses(self) -> Counter[str]:
        return Counter(r.label for r in self.results)


def settle(stack: Stack, tenant: str, expected: int, timeout_s: float = 45.0) -> list[LedgerRow]:
    """The tenant's rows once ``expected`` are there (or the time is up), and a moment more
    to see any that should not come."""
    deadline = time.monotonic() + timeout_s
    while len(stack.rows(tenant)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    return stack.rows(tenant)


def check(stack: Stack, out: Outcome) -> list[str]:
    """What broke a guarantee in this outcome (empty: nothing)."""
    problems = list(out.problems)
    for label, n in out.statuses().items():
        if label not in out.allowed:
            problems.append(f"{n} x unexpected {label!r} (allowed: {sorted(out.allowed)})")
    rows = settle(stack, out.tenant, out.rows_expected)
    out.rows_found = len(rows)
    ids = [r.request_id for r in rows]
    seen = {r.id for r in out.results if r.billable and r.id}
    if len(ids) != out.rows_expected:
        problems.append(f"{len(ids)} rows for {out.rows_expected} answered or cut requests")
    if missing := seen - set(ids):
        problems.append(f"answered but not billed: {sorted(missing)}")
    if len(ids) != len(set(ids)):
        problems.append("a request billed twice")
    if out.eu_only and (outside := {r.region for r in rows} - EU):
        problems.append(f"EU-only requests billed in {outside}")
    if out.eu_only and (served := {r.region for r in out.results if r.region} - EU):
        problems.append(f"EU-only requests served in {served}")
    if out.budget_kwh is not None:
        predicted = {r.id: r.predicted_kwh for r in out.results if r.id}
        spent = sum(r.kwh_billed for r in rows)
        error = sum(max(0.0, r.kwh_billed - (predicted.get(r.request_id) or 0.0)) for r in rows)
        if spent > out.budget_kwh + error + 1e-12:
            problems.append(
                f"budget {out.budget_kwh:.3g} kWh overspent: {spent:.3g} kWh billed, more than "
                f"the prediction error of the admitted requests ({error:.3g} kWh) allows"
            )
    if bad := Counter(r.label for r in out.bystander if r.label != "200"):
        problems.append(f"bystander affected: {dict(bad)}")
    by_ids = {r.id for r in out.bystander if r.id}
    deadline = time.monotonic() + 45
    while True:
        by_rows = stack.rows("bystander")
        lost = by_ids - {r.request_id for r in by_rows}
        if not lost or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if lost:
        problems.append(f"{len(lost)} bystander requests not billed")
    if forged := stack.forged & {r.request_id for r in by_rows}:
        problems.append(f"planted rows billed: {sorted(forged)}")
    return problems


# ---- the faults ------------------------------------------------------------------------------

Scenario = Callable[[Stack], Outcome]
SCENARIOS: dict[str, Scenario] = {}
LONG_PROMPT = "word " * 2000  # over the fake servers' context, as a long paste is on a real one
FAILED = {"503 replica_failed", "503 no_replica"}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(f: Scenario) -> Scenario:
        SCENARIOS[name] = f
        return f

    return register


def run(stack: Stack, name: str) -> Outcome:
    """One fault, with the bystander running through it; the outcome, checked."""
    t0 = time.monotonic()
    with Bystander(stack) as by:
        out = SCENARIOS[name](stack)
    out.fault = name
    out.bystander = by.results
    out.seconds = time.monotonic() - t0
    out.problems = check(stack, out)
    time.sleep(3.2)  # a replica the fault cooled down is back for the next one
    return out


def n_calls(n: int, tenant: str, **kw: Any) -> list[Callable[[httpx.AsyncClient], Any]]:
    return [lambda c: call(c, tenant, **kw) for _ in range(n)]


@scenario("upstream 4xx (prompt over its context)")
def _refused(stack: Stack) -> Outcome:
    long = [{"role": "user", "content": LONG_PROMPT}]
    bad = gather(stack, *n_calls(5, "refused", headers=regions("eu-a"), messages=long))
    good = gather(stack, *n_calls(1, "refused", headers=regions("eu-a")))
    problems = _all(bad, "400 upstream_refused")
    if good[0].region != "eu-a":  # a client's error must not cool the replica down
        problems.append(f"eu-a took the client's 400 as its failure: next got {good[0].label}")
    return Outcome("", "refused", bad + good, {"200", "400 upstream_refused"},
                   eu_only=True, problems=problems)  # fmt: skip


def _fault(stack: Stack, upstream: str, mode: str, calls: list[Any]) -> list[Result]:
    stack.fakes[upstream].fault(mode)
    try:
        return gather(stack, *calls)
    finally:
        stack.fakes[upstream].fault(None)


def _all(results: list[Result], *labels: str) -> list[str]:
    """The fault happened: each result is one of ``labels`` (a problem if not)."""
    wrong = [r.label for r in results if r.label not in labels]
    return [f"expected {' or '.join(labels)}, got {wrong}"] if wrong else []


def _served_in(results: list[Result], region: str) -> list[str]:
    wrong = [f"{r.label} in {r.region}" for r in results if r.region != region]
    return [f"expected every request served in {region}: {wrong}"] if wrong else []


def _replica_fails(tenant: str, mode: str, n: int) -> Scenario:
    """eu-a fails (``mode``): requests that may also use eu-b are served there; those allowed
    eu-a alone get the fault's own 503."""

    def run(stack: Stack) -> Outcome:
        either = _fault(stack, "eu-a", mode, n_calls(n, tenant, headers=regions("eu-a", "eu-b")))
        only = _fault(stack, "eu-a", mode, n_calls(1, tenant, headers=regions("eu-a")))
        return Outcome("", tenant, either + only, {"200"} | FAILED, eu_only=True,
                       problems=_served_in(either, "eu-b") + _all(only, *FAILED))  # fmt: skip

    return run


scenario("upstream 5xx")(_replica_fails("errors", "error", 5))
scenario("upstream timeout")(_replica_fails("timeouts", "hang", 3))


@scenario("upstream dies mid-stream")
def _midstream(stack: Stack) -> Outcome:
    cut = _fault(stack, "eu-a", "die_mid_stream",
                 n_calls(3, "midstream", stream=True, headers=regions("eu-a")))  # fmt: skip
    out = Outcome("", "midstream", cut, {"200 stream error"} | FAILED, eu_only=True)
    # the first death cools eu-a down: a stream that arrives after it finds no replica
    if not any(r.label == "200 stream error" for r in cut):
        out.problems.append(f"no stream died mid-way: {[r.label for r in cut]}")
    return out


@scenario("upstream reports absurd usage")
def _absurd(stack: Stack) -> Outcome:
    got = _fault(stack, "eu-a", "absurd_usage", n_calls(3, "absurd", headers=regions("eu-a")))
    after = gather(stack, *n_calls(2, "absurd", headers=regions("eu-a")))
    out = Outcome("", "absurd", got + after, {"200"}, eu_only=True)
    rows = settle(stack, "absurd", out.rows_expected)
    if silly := [r.prompt_tokens for r in rows if r.prompt_tokens > 1000]:
        out.problems.append(f"absurd prompt counts billed: {silly}")
    return out


@scenario("client hangs up")
def _hangup(stack: Stack) -> Outcome:
    fake = stack.fakes["eu-b"]
    fake.fault("slow")  # answers after 1 s, stream chunks 0.25 s apart
    calls = fake.state()["calls"]

    def upstream_has_them() -> bool:  # all 6 calls (3 whole, 3 streams) reached it: hang up
        return bool(fake.state()["calls"] - calls >= 6)

    try:
        got = gather(
            stack,
            *n_calls(3, "hangup", headers=regions("eu-b"), hang_up_when=upstream_has_them),
            *n_calls(3, "hangup", stream=True, headers=regions("eu-b"), cut_after_chunks=1),
        )
        time.sleep(1.5)  # the upstream's answers to the hung-up calls arrive
    finally:
        fake.fault(None)
    reached = fake.state()["calls"] - calls - 3  # the whole calls that reached the upstream
    out = Outcome("", "hangup", got, {"hung up", "cut by client"}, eu_only=True,
                  billed_extra=reached)  # fmt: skip
    out.problems = _all(got[:3], "hung up") + _all(got[3:], "cut by client")
    if reached != 3:
        out.problems.append(f"{reached} of the 3 hung-up calls reached the upstream")
    return out


def kill_replica_actor(deployment: str) -> None:
    """Kill the Ray actor of one Serve replica, as a crash would (Serve starts another)."""
    import ray

    found = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if deployment in a["name"]]  # fmt: skip
    assert found, f"no actor of {deployment}"
    for a in found:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)


@scenario("replica process killed mid-stream")
def _replica(stack: Stack) -> Outcome:
    count = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
    killed = gather(stack, lambda c: call(
        c, "replica", stream=True, headers=regions("eu-local"), messages=count, max_tokens=400,
        on_first_chunk=lambda: kill_replica_actor("replica-eu-local-0"),
    ))  # fmt: skip
    after = gather(stack, *n_calls(3, "replica", headers=regions("eu-local", "eu-b")))
    out = Outcome("", "replica", killed + after, {"200", "200 stream error"}, eu_only=True)
    if killed[0].label != "200 stream error":
        out.problems.append(f"the stream on the killed replica ended {killed[0].label!r}")
    return out


@scenario("upstream server killed")
def _upstream(stack: Stack) -> Outcome:
    fake = stack.fakes["eu-b"]
    fake.kill()
    try:
        either = gather(stack, *n_calls(3, "upstream", headers=regions("eu-b", "eu-a")))
        only = gather(stack, *n_calls(1, "upstream", headers=regions("eu-b")))
    finally:
        fake.start()
    return Outcome("", "upstream", either + only, {"200"} | FAILED, eu_only=True,
                   problems=_served_in(either, "eu-a") + _all(only, *FAILED))  # fmt: skip


@scenario("metering actor killed")
def _metering(stack: Stack) -> Outcome:
    import ray

    from router.ray_app.metering import METERING_ACTOR, NAMESPACE

    def kill() -> None:
        ray.kill(ray.get_actor(METERING_ACTOR, namespace=NAMESPACE), no_restart=False)

    got = gather(
        stack,
        lambda c: call(c, "metering", stream=True, headers=regions("eu-b"), on_first_chunk=kill),
        *n_calls(10, "metering", headers=regions("eu-a")),
        *n_calls(10, "metering", headers=regions("us-a")),
        *n_calls(9, "metering", stream=True, headers=regions("eu-b")),
    )
    return Outcome("", "metering", got, {"200"})


@scenario("carbon API down")
def _carbon(stack: Stack) -> Outcome:
    only = gather(stack, *n_calls(3, "carbon", headers=regions("eu-api")))
    either = gather(stack, *n_calls(3, "carbon", headers=regions("eu-api", "eu-a")))
    anywhere = gather(stack, *n_calls(3, "carbon"))
    problems = _served_in(either, "eu-a") + _all(only, "503 no_replica")
    if unclear := [
        r.message for r in only if "eu-api" not in r.message or "carbon" not in r.message
    ]:
        problems.append(f"refusals that do not say the region has no carbon data: {unclear}")
    if any(r.region == "eu-api" for r in anywhere):
        problems.append("a region without carbon data served a request")
    return Outcome("", "carbon", only + either + anywhere, {"200", "503 no_replica"},
                   problems=problems)  # fmt: skip


def _admin(stack: Stack, method: str, path: str, **kw: Any) -> httpx.Response:
    with httpx.Client(base_url=stack.url, timeout=120) as c:
        return c.request(method, path, headers={"Authorization": f"Bearer {key('admin')}"}, **kw)


@scenario("64 concurrent requests against a small budget")
def _budget(stack: Stack) -> Outcome:
    probe = gather(stack, *n_calls(1, "budget", headers=regions("us-a")))
    predicted = probe[0].predicted_kwh
    assert predicted, probe
    spent = sum(r.kwh_billed for r in settle(stack, "budget", 1))
    budget = spent + 3.5 * predicted  # room for about three more
    cfg = config(stack.tmp, stack.fakes, budget_kwh=budget)
    cfg["regions"] = yaml.safe_load(stack.config.read_text())["regions"]
    stack.config.write_text(yaml.safe_dump(cfg))
    r = _admin(stack, "POST", "/v1/admin/reload")
    assert r.status_code == 200, r.text
    burst = gather(stack, *n_calls(64, "budget", headers=regions("us-a")))
    out = Outcome("", "budget", probe + burst, {"200", "402 budget_exceeded"}, budget_kwh=budget)
    # the money is checked by the Outcome (what was billed stays within the budget); how many
    # fit is not a contract: a hold is the request's predicted energy at the load when it is
    # admitted, and in a burst the replica batches, so each costs less than the lone probe (a
    # full-suite run admitted 12 with nothing overspent). Some must be served, some refused.
    if not 1 <= sum(x.label == "200" for x in burst) < len(burst):
        out.problems.append(f"{out.statuses()} for room of about 3 lone requests")
    return out


def batch_lines(n: int) -> bytes:
    line = {"method": "POST", "url": "/v1/chat/completions", "body": body()}
    return b"".join(json.dumps({**line, "custom_id": f"r{i}"}).encode() + b"\n" for i in range(n))


@scenario("large batch (2,000 lines; one over the 10,000-line cap)")
def _batch(stack: Stack) -> Outcome:
    h = {"Authorization": f"Bearer {key('batch')}"}
    results: list[Result] = []
    with httpx.Client(base_url=stack.url, timeout=120, headers=h) as c:
        ids = {}
        for n in (2000, 10_001):
            f = c.post("/v1/files", files={"file": ("in.jsonl", batch_lines(n))},
                       data={"purpose": "batch"})  # fmt: skip
            assert f.status_code == 200, f.text
            b = c.post("/v1/batches", json={"input_file_id": f.json()["id"],
                       "endpoint": "/v1/chat/completions", "completion_window": "24h"})  # fmt: skip
            code = b.json()["error"].get("param") if b.status_code != 200 else ""
            results.append(Result(f"batch {b.status_code} {code}".strip()))
            ids[n] = b.json().get("id")
            c.delete(f"/v1/files/{f.json()['id']}")
    out = Outcome("", "batch", results, {"batch 200", "batch 400 input_file_id"})
    if [r.label for r in results] != ["batch 200", "batch 400 input_file_id"]:
        out.problems.append(f"expected the 2,000-line batch taken, the other refused: {results}")
        return out
    r = _admin(stack, "POST", f"/v1/batches/{ids[2000]}/run")
    assert r.status_code in (200, 202), r.text
    deadline = time.monotonic() + 600
    while True:
        b = httpx.get(f"{stack.url}/v1/batches/{ids[2000]}", headers=h, timeout=60).json()
        if b["status"] in ("completed", "failed") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    counts = b["request_counts"]
    out.billed_extra = counts["completed"]
    if counts != {"total": 2000, "completed": 2000, "failed": 0}:
        out.problems.append(f"batch ended {b['status']} with {counts}")
    return out


@scenario("spool planted by another user")
def _spool(stack: Stack) -> Outcome:
    out = Outcome("", "spool", [], set(), billed_extra=len(stack.replayed))
    rows = settle(stack, "spool", len(stack.replayed))
    if {r.request_id for r in rows} != stack.replayed:
        out.problems.append(f"our crashed process's rows {sorted(stack.replayed)} billed as "
                            f"{sorted(r.request_id for r in rows)}")  # fmt: skip
    return out
