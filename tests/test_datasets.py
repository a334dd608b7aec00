"""The dataset registry and its download path, against a local HTTP server."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from forecasting.datasets import DataFile, dataset_path, download_file, registry, sha256_of
from forecasting.errors import DatasetError

NAME = "carbon/electricitymaps_hourly/SE.csv"


class Files(BaseHTTPRequestHandler):
    payloads: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = self.payloads.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, bytes]]]:
    payloads: dict[str, bytes] = {}
    handler = type("H", (Files,), {"payloads": payloads})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", payloads
    httpd.shutdown()
    httpd.server_close()


def test_registry_matches_the_shared_checksums(data_dir: Path) -> None:
    sums = {
        line.split()[1].removeprefix("./"): line.split()[0]
        for line in (data_dir / "SHA256SUMS").read_text().splitlines()
    }
    reg = registry()
    assert len(reg) > 40
    for name, entry in reg.items():
        assert sums[name] == entry.sha256
    assert sha256_of(data_dir / NAME) == reg[NAME].sha256


def test_data_dir_is_used_when_set(data_dir: Path) -> None:
    assert dataset_path(NAME) == data_dir / NAME


def test_download_verifies_and_caches(
    isolated_cache: Path, server: tuple[str, dict[str, bytes]], data_dir: Path
) -> None:
    base, payloads = server
    entry = registry()[NAME]
    payloads[f"/{entry.repo}/{entry.commit}/{entry.path}"] = (data_dir / NAME).read_bytes()
    path = dataset_path(NAME, base_url=base)
    assert path == isolated_cache / NAME
    assert sha256_of(path) == entry.sha256
    payloads.clear()  # served from the cache from now on
    assert dataset_path(NAME, base_url=base) == path


def test_corrupted_download_is_rejected_and_not_cached(
    isolated_cache: Path, server: tuple[str, dict[str, bytes]], data_dir: Path
) -> None:
    base, payloads = server
    entry = registry()[NAME]
    good = (data_dir / NAME).read_bytes()
    payloads[f"/{entry.repo}/{entry.commit}/{entry.path}"] = good[:-10] + b"0000000000"
    with pytest.raises(DatasetError, match="sha256 .* expected .*Nothing was cached"):
        dataset_path(NAME, base_url=base)
    assert not (isolated_cache / NAME).exists()
    assert list((isolated_cache / NAME).parent.iterdir()) == []  # no partial file left


def test_http_error_names_the_url(
    isolated_cache: Path, server: tuple[str, dict[str, bytes]]
) -> None:
    base, _ = server
    with pytest.raises(DatasetError, match=r"HTTP 404"):
        dataset_path(NAME, base_url=base)


def test_offline_says_what_to_do(isolated_cache: Path) -> None:
    entry = DataFile(
        name="x/y.csv",
        repo="o/r",
        commit="c" * 40,
        path="y.csv",
        sha256=hashlib.sha256(b"").hexdigest(),
    )
    with pytest.raises(
        DatasetError, match="Offline\\? Copy the file to .* or set CARBON_ROUTER_DATA"
    ):
        download_file(entry, isolated_cache / "x/y.csv", base_url="http://127.0.0.1:9")


def test_unknown_file(isolated_cache: Path) -> None:
    with pytest.raises(DatasetError, match="not in the dataset registry"):
        dataset_path("carbon/nowhere/XX.csv")


def test_dataset_messages_are_exact(
    isolated_cache: Path, server: tuple[str, dict[str, bytes]]
) -> None:
    """What a user reads when a data file is missing says what to run, word for word."""
    with pytest.raises(DatasetError) as info:
        dataset_path("carbon/nowhere/XX.csv")
    assert str(info.value) == (
        f"carbon/nowhere/XX.csv is not in the dataset registry and not found at "
        f"{isolated_cache}/carbon/nowhere/XX.csv; known files: see `router datasets list`"
    )
    with pytest.raises(DatasetError) as info:
        dataset_path(NAME, download=False)
    assert str(info.value) == (
        f"{NAME} is not cached at {isolated_cache}/{NAME}; run `router datasets fetch {NAME}`"
    )
    base, payloads = server
    entry = registry()[NAME]
    url = f"{base}/{entry.repo}/{entry.commit}/{entry.path}"
    how = (
        f"Copy the file to {isolated_cache}/{NAME}, or set CARBON_ROUTER_DATA to a folder that "
        f"holds {NAME}, or CARBON_ROUTER_DATA_URL to a mirror of the pinned files (laid out "
        "<repo>/<commit>/<path>)"
    )
    with pytest.raises(DatasetError) as info:
        dataset_path(NAME, base_url=base)
    assert str(info.value) == f"downloading {NAME} from {url} failed: HTTP 404 Not Found. {how}"
    payloads[f"/{entry.repo}/{entry.commit}/{entry.path}"] = b"not the file"
    with pytest.raises(DatasetError) as info:
        dataset_path(NAME, base_url=base)
    assert str(info.value) == (
        f"{NAME} from {url} has sha256 {hashlib.sha256(b'not the file').hexdigest()}, expected "
        f"{entry.sha256}; the download is corrupt or the source changed. Nothing was cached; "
        "retry later"
    )
