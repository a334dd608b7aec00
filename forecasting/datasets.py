"""The dataset registry: real public data files, pinned by repository, commit and sha256.

Where data is read from, in order:

1. ``$CARBON_ROUTER_DATA`` — a folder with the layout of the project's data share
   (``carbon/electricitymaps_hourly/DE.csv`` ...). Tests and CI point it at ``../shared/data``.
2. The user cache, ``$CARBON_ROUTER_CACHE`` or ``$XDG_CACHE_HOME/carbon-router/data``
   (``~/.cache/carbon-router/data``), filled on first use by downloading the raw file of the
   pinned commit, checking its sha256 (a mismatch is rejected and nothing is cached), with a
   progress bar on stderr.

The registry (``datasets.json`` beside this module) lists every file with its origin.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from forecasting.errors import DatasetError

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
DATA_ENV = "CARBON_ROUTER_DATA"
CACHE_ENV = "CARBON_ROUTER_CACHE"
BASE_URL_ENV = "CARBON_ROUTER_DATA_URL"
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class DataFile:
    name: str  # path in the data layout, e.g. carbon/electricitymaps_hourly/DE.csv
    repo: str
    commit: str
    path: str  # path inside the repository
    sha256: str

    def url(self, base_url: str) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


@cache
def registry() -> dict[str, DataFile]:
    raw = json.loads((Path(__file__).with_name("datasets.json")).read_text(encoding="utf-8"))
    return {name: DataFile(name=name, **spec) for name, spec in raw["files"].items()}


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "carbon-router" / "data"


def data_dir() -> Path | None:
    """The read-only data folder from ``$CARBON_ROUTER_DATA``, if set."""
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_path(name: str, *, download: bool = True, base_url: str | None = None) -> Path:
    """Local path of the registered file ``name``, downloading it into the cache if needed."""
    entry = registry().get(name)
    local = data_dir()
    if local is not None and (local / name).is_file():
        return local / name
    cached = cache_dir() / name
    if cached.is_file():
        return cached
    if entry is None:
        where = f"{local}/{name}" if local else str(cached)
        raise DatasetError(
            f"{name} is not in the dataset registry and not found at {where}; "
            f"known files: see `router datasets list`"
        )
    if not download:
        raise DatasetError(f"{name} is not cached at {cached}; run `router datasets fetch {name}`")
    return download_file(entry, cached, base_url=base_url)


def download_file(entry: DataFile, dest: Path, *, base_url: str | None = None) -> Path:
    """Download ``entry`` to ``dest`` atomically, verifying sha256 before it becomes visible."""
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    url = entry.url(base)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    how = (
        f"Copy the file to {dest}, or set {DATA_ENV} to a folder that holds {entry.name}, "
        f"or {BASE_URL_ENV} to a mirror of the pinned files (laid out <repo>/<commit>/<path>)"
    )
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    total = int(resp.headers.get("Content-Length") or 0)
                    _copy_with_progress(resp, out, h, total, entry.name)
            except urllib.error.HTTPError as e:
                raise DatasetError(
                    f"downloading {entry.name} from {url} failed: HTTP {e.code} {e.reason}. {how}"
                ) from e
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                raise DatasetError(
                    f"cannot download {entry.name} from {url} ({e}). Offline? {how}"
                ) from e
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise DatasetError(
                f"{entry.name} from {url} has sha256 {digest}, expected {entry.sha256}; "
                "the download is corrupt or the source changed. Nothing was cached; retry later"
            )
        tmp.replace(dest)
        log.info("downloaded %s to %s", entry.name, dest)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


def _copy_with_progress(resp: object, out: object, h: object, total: int, label: str) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    read = resp.read  # type: ignore[attr-defined]
    write = out.write  # type: ignore[attr-defined]
    update = h.update  # type: ignore[attr-defined]
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
        disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task(label, total=total or None)
        while chunk := read(1 << 16):
            write(chunk)
            update(chunk)
            progress.advance(task, len(chunk))


def zone_file(dataset: str, zone: str) -> str:
    """Registry name of a zone's file in a per-zone dataset folder."""
    folder = dataset if "/" in dataset else f"carbon/{dataset}"
    return f"{folder}/{zone}.csv"
