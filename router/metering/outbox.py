"""Billed rows on their way to the ledger, off the response path.

The ingress answers a request as soon as it has billed it in memory; the row then travels to the
metering actor with others in one call. :class:`Outbox` gathers rows, sends what has gathered
every ``interval_s`` (or at once when ``max_rows`` are waiting), and keeps every row until the
sink has acknowledged it (the ledger is durable then; ``on_sent`` hears of it), retrying with
backoff while the sink is down. Rows are acknowledged in the order they were added. A row the
sink refuses for good (the ledger cannot store it) is set aside in ``dead-letters.jsonl``
beside the spool, logged, and the rows after it keep flowing.

With a spool directory, each row is also appended to a segment file before :meth:`add` returns,
and a segment is deleted only once its rows are acknowledged. The append is a ``write`` with no
``fsync``: rows survive the ingress process crashing or being killed (the kernel has them), not
the machine losing power before the page cache reaches the disk. A new outbox replays the
segments of any spool whose owner is gone (it holds no lock on it); the ledger is idempotent by
request id, so a row sent twice is billed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import stat
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from router.errors import RouterError

log = logging.getLogger(__name__)

Sink = Callable[[list[dict[str, Any]]], Awaitable[Any]]
DEAD_LETTERS = "dead-letters.jsonl"


class SpoolError(RouterError):
    """A spool folder is not private to this user: rows in it could be forged or read."""


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter: created 0700 (parents too); an existing
    one must be a real folder (no link) owned by this user that no one else can write to, and
    is then closed to reading by others. Anything else is a :class:`SpoolError`: a spool that
    others could write to would let them plant rows that get billed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"{path} is not a folder (a link?); remove it or choose another spool")
    if st.st_uid != os.geteuid():
        raise SpoolError(f"{path} belongs to uid {st.st_uid}, not to this user; remove it")
    if st.st_mode & 0o022:
        raise SpoolError(
            f"others can write to {path} (mode {stat.S_IMODE(st.st_mode):o}): rows planted in "
            f"it would be billed; check what is in it, then chmod 700 it"
        )
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _ours(path: Path) -> bool:
    """Whether ``path`` (a folder or file in our spool) was made by this user and no one else
    can have written it."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.geteuid() and not st.st_mode & 0o022 and not stat.S_ISLNK(st.st_mode)


def refused_for_good(e: Exception) -> bool:
    """Whether the sink refused the rows themselves (the ledger's own error, also when it comes
    back through a Ray task error, which is an instance of its cause), rather than failing to
    take them (an actor restarting, a timeout): those are retried, these never will succeed."""
    from router.ledger import LedgerError

    return isinstance(e, LedgerError | ValueError | TypeError)


class Outbox:
    def __init__(
        self,
        sink: Sink,
        *,
        spool_dir: str | Path | None = None,
        interval_s: float = 0.005,
        max_rows: int = 512,
        max_backoff_s: float = 5.0,
        on_sent: Callable[[list[dict[str, Any]]], None] | None = None,
        permanent: Callable[[Exception], bool] = refused_for_good,
    ) -> None:
        self._sink = sink
        self._on_sent = on_sent
        self.interval_s = interval_s
        self.max_rows = max_rows
        self.max_backoff_s = max_backoff_s
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._permanent = permanent
        self.added = 0  # rows added so far (a sequence number: flush waits up to it)
        self._done = 0  # rows acknowledged or set aside, in order
        self._progress = asyncio.Event()
        self.dead = 0  # rows the sink refused for good, set aside
        self._dead_rows: list[dict[str, Any]] = []
        self.sent = 0  # rows acknowledged by the sink
        self.failures = 0  # sink calls that failed (each retried)
        self._root: Path | None = None
        self._dir: Path | None = None
        self._lock: int | None = None
        self._segment: TextIO | None = None
        self._segment_path: Path | None = None
        if spool_dir is not None:
            self._open_spool(Path(spool_dir))

    # -- spool -----------------------------------------------------------------------------------
    def _open_spool(self, root: Path) -> None:
        self._root = private_dir(root)
        self._dir = root / uuid.uuid4().hex
        self._dir.mkdir(mode=0o700)
        self._lock = os.open(self._dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._new_segment()

    def _new_segment(self) -> None:
        assert self._dir is not None
        self._segment_path = self._dir / f"{uuid.uuid4().hex}.jsonl"
        fd = os.open(self._segment_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        self._segment = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def _rotate(self) -> Path | None:
        """Close the segment holding the rows about to be sent; new rows go to a fresh one."""
        if self._segment is None:
            return None
        done = self._segment_path
        self._segment.close()
        self._new_segment()
        return done

    def orphans(self) -> list[dict[str, Any]]:
        """Rows left unacknowledged by outboxes whose process is gone (their spool is unlocked);
        they are taken over: queued here, and their spool removed once they are acknowledged."""
        if self._root is None:
            return []
        rows: list[dict[str, Any]] = []
        for d in sorted(p for p in self._root.iterdir() if p.is_dir() and p != self._dir):
            if not _ours(d):
                log.warning("outbox: %s in the spool is not this user's own: not replayed", d)
                continue
            fd = os.open(d / "lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its owner is alive
            found = []
            for seg in sorted(d.glob("*.jsonl")):
                if not _ours(seg):
                    log.warning("outbox: %s is not this user's own: not replayed", seg)
                    continue
                for line in seg.read_text(encoding="utf-8").splitlines():
                    with contextlib.suppress(ValueError):  # a torn last line from the crash
                        found.append(json.loads(line))
            for row in found:
                self.add(row)
            rows += found
            for seg in d.glob("*.jsonl"):  # now in our own spool
                seg.unlink()
            (d / "lock").unlink(missing_ok=True)
            os.close(fd)
            d.rmdir()
        if rows:
            log.warning("outbox: took over %d unacknowledged rows from a dead process", len(rows))
        return rows

    # -- queue -----------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, row: dict[str, Any]) -> None:
        """Queue one row; returns at once (after the spool append, if any)."""
        if self._segment is not None:
            self._segment.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._pending.append(row)
        self.added += 1
        self._idle.clear()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        if len(self._pending) >= self.max_rows:
            self._wake.set()

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every row added before the call is acknowledged (or set aside); rows
        added meanwhile do not hold it up, so it returns under steady traffic too."""
        target = self.added
        self._wake.set()
        async with asyncio.timeout(timeout_s):
            while self._done < target:
                self._progress.clear()
                await self._progress.wait()

    async def _run(self) -> None:
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            self._wake.clear()
            batch, self._pending = self._pending, []
            segment = self._rotate()
            sent = await self._deliver(batch)
            self.sent += len(sent)
            if self._on_sent is not None and sent:
                self._on_sent(sent)
            if segment is not None:
                segment.unlink(missing_ok=True)
            self._done += len(batch)
            self._progress.set()
        self._idle.set()

    async def _deliver(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send ``batch`` until the sink takes it, retrying with backoff while it fails. A
        batch the sink refuses for good (``permanent``) is split to find the rows it refuses;
        those are set aside (:meth:`dead_letters`) and the rest go on. Returns what was sent."""
        backoff = 0.05
        while True:
            try:
                await self._sink(batch)
                return batch
            except Exception as e:
                if self._permanent(e):
                    if len(batch) == 1:
                        self._set_aside(batch[0], e)
                        return []
                    half = len(batch) // 2
                    return await self._deliver(batch[:half]) + await self._deliver(batch[half:])
                self.failures += 1  # the rows stay ours; try again
                log.warning("outbox: sink failed for %d rows, retrying: %s", len(batch), e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def _set_aside(self, row: dict[str, Any], e: Exception) -> None:
        self.dead += 1
        log.error(
            "outbox: the sink refused row %s for good (%s); set aside", row.get("request_id"), e
        )
        self._dead_rows.append(row)
        if self._root is not None:  # beside the spool, for the admin to see and replay
            with (self._root / DEAD_LETTERS).open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"row": row, "error": str(e)}, separators=(",", ":")) + "\n")

    def dead_letters(self) -> list[dict[str, Any]]:
        """The rows the sink refused for good: this process's, and those on file."""
        if self._root is None or not (self._root / DEAD_LETTERS).exists():
            return list(self._dead_rows)
        lines = (self._root / DEAD_LETTERS).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["row"] for line in lines if line.strip()]

    async def aclose(self) -> None:
        """Send what is pending, stop, and remove this outbox's (now empty) spool."""
        if self._pending or not self._idle.is_set():
            await self.flush()
        if self._segment is not None:
            self._segment.close()
            assert self._segment_path is not None and self._dir is not None
            self._segment_path.unlink(missing_ok=True)
            (self._dir / "lock").unlink(missing_ok=True)
            if self._lock is not None:
                os.close(self._lock)
            with contextlib.suppress(OSError):
                self._dir.rmdir()
            self._segment = None
