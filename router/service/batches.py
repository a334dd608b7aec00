"""The OpenAI Batch API on the deferral planner: an uploaded JSONL file of requests becomes a
batch whose lines are planned into the cleanest slots of its completion window (or now), run
as jobs, and gathered into an output file when the last one ends."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from router.errors import BodyTooLarge, NotFound, PermissionDenied, RequestError
from router.jobs import Batch, Job, JobStore, StoredFile
from router.policy import Candidates
from router.service.deferral import Deferral
from router.service.live import Live
from router.service.ports import Wire
from router.service.tenants import Caller

ENDPOINTS = {"/v1/chat/completions": True, "/v1/completions": False}  # path -> chat
# OpenAI allows 200 MB and 50,000 requests a batch; files here live in SQLite and a batch is
# planned in one pass when it is created, so both are smaller
MAX_FILE_BYTES = 16 << 20
MAX_LINES = 10_000
MAX_WINDOW_H = 168  # a week: forecasts reach no further
WINDOW = re.compile(r"[1-9][0-9]{0,2}h", re.ASCII)
YIELD_EVERY = 50  # lines planned between two turns of the event loop


class Batches:
    def __init__(
        self, live: Callable[[], Live], jobs: JobStore, deferral: Deferral, wire: Wire
    ) -> None:
        self._live = live
        self.jobs = jobs
        self.deferral = deferral
        self.wire = wire

    def add_file(self, caller: Caller, purpose: str, filename: str, content: bytes) -> StoredFile:
        if len(content) > MAX_FILE_BYTES:
            raise BodyTooLarge(f"file over {MAX_FILE_BYTES} bytes", param="file")
        if purpose != "batch":
            raise RequestError("purpose must be 'batch'", param="purpose")
        f = StoredFile(
            f"file-{uuid.uuid4().hex}", caller.tenant, purpose, filename, int(time.time()), content
        )
        self.jobs.add_file(f)
        return f

    def file(self, caller: Caller, file_id: str) -> StoredFile:
        f = self.jobs.file(file_id)
        if f is None or (f.tenant != caller.tenant and not caller.admin):
            raise NotFound(f"no file {file_id}")
        return f

    def delete_file(self, caller: Caller, file_id: str) -> None:
        self.file(caller, file_id)  # the caller's, or NotFound
        self.jobs.delete_file(file_id)

    async def create(
        self, caller: Caller, input_file_id: Any, endpoint: Any, window: Any
    ) -> dict[str, Any]:
        """Plan every line of the caller's ``input_file_id``; all lines are stored with the
        batch in one transaction, or none (a bad line refuses the batch, naming the line; so
        does a ``custom_id`` another line has: a line without one is ``line-N``)."""
        if endpoint not in ENDPOINTS:
            raise RequestError(f"endpoint must be one of {', '.join(ENDPOINTS)}", param="endpoint")
        if not (
            isinstance(window, str)
            and WINDOW.fullmatch(window)
            and int(window[:-1]) <= MAX_WINDOW_H
        ):
            raise RequestError(
                f"completion_window must be hours, 1h..{MAX_WINDOW_H}h, like '24h'",
                param="completion_window",
            )
        f = self.jobs.file(str(input_file_id))
        if f is None or f.tenant != caller.tenant:
            raise NotFound(f"no file {input_file_id}")
        try:
            text = f.content.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RequestError(f"{f.filename} is not UTF-8: {e}", param="input_file_id") from e
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) > MAX_LINES:
            raise RequestError(
                f"{f.filename} has {len(lines)} requests; a batch takes at most {MAX_LINES}",
                param="input_file_id",
            )
        chat = ENDPOINTS[endpoint]
        router = self._live().router
        header = f"defer={int(window[:-1]) * 3600}"
        pref = router.preference(header)
        jobs: list[Job] = []
        custom_ids: list[str] = []
        line_of: dict[str, int] = {}  # custom_id -> the line that has it
        predicted: list[Candidates] = []
        for k, (n, line) in enumerate(lines):
            if k % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # the loop serves other requests meanwhile
            try:
                item = orjson.loads(line)
                if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
                    raise ValueError("a line must be an object with a 'body' object")
                # each output line answers one input line: two lines with one custom_id could
                # not be told apart (nor billed apart by the client)
                custom_id = str(item.get("custom_id", f"line-{n}"))
                if custom_id in line_of:
                    raise ValueError(
                        f"custom_id {custom_id!r} is also the custom_id of line "
                        f"{line_of[custom_id]}; each line needs its own"
                    )
                line_of[custom_id] = n
                raw = orjson.dumps(item["body"])
                parsed = self.wire.parse(raw, chat=chat)
                if parsed.model not in router.models:
                    raise RequestError(f"model {parsed.model!r} is not served here")
            except (ValueError, TypeError, RecursionError, RequestError) as e:
                raise RequestError(f"{f.filename} line {n}: {e}", param="input_file_id") from e
            expected = router.lengths.expected(
                caller.tenant, parsed.model, parsed.completion.max_tokens
            )
            cands = await router.candidates(parsed.prompt_estimate(), expected)
            predicted.append(cands)
            job = await self.deferral.plan(
                raw, caller.tenant, parsed, pref, cands, expected, force=True, header=header
            )
            assert job is not None  # forced
            jobs.append(job)
            custom_ids.append(custom_id)
        # the whole batch must fit the tenant's budget now; each line is checked again when it
        # runs (others may have spent it meanwhile)
        await self.deferral.completions.settlement.check(caller.tenant, predicted)
        batch = Batch(
            f"batch_{uuid.uuid4().hex}",
            caller.tenant,
            str(input_file_id),
            endpoint,
            window,
            int(time.time()),
            [j.id for j in jobs],
            custom_ids,
        )
        self.jobs.add_batch(batch, jobs)
        return self.status(caller, batch.id)

    def status(self, caller: Caller, batch_id: str) -> dict[str, Any]:
        """The batch object; its output file is written when its last job ends."""
        b = self.jobs.batch(batch_id)
        if b is None or (b.tenant != caller.tenant and not caller.admin):
            raise NotFound(f"no batch {batch_id}")
        jobs = [self.jobs.get(j) for j in b.jobs]
        done = [j for j in jobs if j is not None and j.status in ("completed", "failed")]
        failed = [j for j in done if j.status == "failed"]
        status = "completed" if len(done) == len(jobs) else "in_progress"
        output_file_id = b.output_file_id
        if status == "completed" and not output_file_id:
            lines = []
            for cid, job in zip(b.custom_ids, jobs, strict=True):
                assert job is not None
                ok = job.status == "completed"
                response = {"status_code": 200, "request_id": job.id, "body": job.result}
                lines.append(
                    json.dumps(
                        {
                            "id": job.id,
                            "custom_id": cid,
                            "response": response if ok else None,
                            "error": None if ok else {"message": job.error},
                        }
                    )
                )
            out = StoredFile(
                f"file-{uuid.uuid4().hex}",
                b.tenant,
                "batch_output",
                f"{batch_id}_output.jsonl",
                int(time.time()),
                ("\n".join(lines) + "\n").encode(),
            )
            self.jobs.set_batch_output(batch_id, out)
            output_file_id = out.id
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": b.endpoint,
            "errors": None,
            "input_file_id": b.input_file_id,
            "completion_window": b.completion_window,
            "status": status,
            "output_file_id": output_file_id,
            "error_file_id": None,
            "created_at": b.created_at,
            "request_counts": {
                "total": len(jobs),
                "completed": len(done) - len(failed),
                "failed": len(failed),
            },
        }

    def run_now(self, caller: Caller, batch_id: str) -> None:
        """Admin: run a batch's scheduled requests now instead of at their planned times."""
        if not caller.admin:
            raise PermissionDenied("admin key required")
        b = self.jobs.batch(batch_id)
        if b is None:
            raise NotFound(f"no batch {batch_id}")
        now = datetime.now(UTC)
        for j in b.jobs:
            self.jobs.run_now(j, now)
