"""`kit external download` against a local HTTP server on 127.0.0.1 that this test starts.

The server serves small generated tinted JPEGs (and gzipped TIFFs) under the website's URL pattern
(``/<antibody>/<plate>_<well>_<field>_<channel>.<ext>``) and misbehaves on purpose, chosen by the
antibody number of the ID: a 404, a 503 once, a response slower than the client's timeout once, a
connection that drops mid-file once and always, and a file that never decodes. Every socket connection
the process opens is checked: nothing but 127.0.0.1 may be contacted.
"""
from __future__ import annotations

import gzip
import http.server
import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kit.cli import main as kit_main
from kit.errors import ConfigError
from kit.external import download as dl
from kit.images import CHANNELS, read_channel, read_sample

SIDE = 48
TINT = {"red": (0, 0, 1), "green": (0, 1, 0), "blue": (1, 0, 0), "yellow": (0, 1, 1)}  # BGR weights
NOT_FOUND, BUSY_ONCE, SLOW_ONCE, DROP_ONCE, DROP_ALWAYS, CORRUPT = 404, 503, 801, 802, 803, 804
GOOD = ["10580_1610_C1_1", "10580_1610_C1_2", "77_1_A1_1_cr5abc"]


def plane(image_id: str, channel: str) -> np.ndarray:
    seed = sum(map(ord, image_id + channel))
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE), dtype=np.uint8)


def tinted_jpeg(image_id: str, channel: str) -> bytes:
    p = plane(image_id, channel)
    bgr = np.stack([p * w for w in TINT[channel]], axis=-1).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def tif_gz(image_id: str, channel: str) -> bytes:
    ok, buf = cv2.imencode(".tif", plane(image_id, channel).astype(np.uint16) * 257)
    assert ok
    return gzip.compress(buf.tobytes())


def make_handler(requests: Counter, lock: threading.Lock):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            with lock:
                requests[self.path] += 1
                n = requests[self.path]
            parts = self.path.strip("/").split("/")
            if len(parts) != 2:
                return self._send(404, b"no such path")
            antibody, name = int(parts[0]), parts[1]
            stem, _, ext = name.partition(".")
            rest, _, channel = stem.rpartition("_")
            image_id = f"{antibody}_{rest}"
            if antibody == NOT_FOUND:
                return self._send(404, b"not found")
            if antibody == BUSY_ONCE and n == 1:
                return self._send(503, b"busy", {"Retry-After": "0"})
            body = tif_gz(image_id, channel) if ext == "tif.gz" else tinted_jpeg(image_id, channel)
            if antibody == CORRUPT:
                body = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"  # JPEG markers around garbage
            if antibody == SLOW_ONCE and n == 1:
                time.sleep(1.5)  # longer than the client's timeout
            if antibody == DROP_ALWAYS or (antibody == DROP_ONCE and n == 1):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            return self._send(200, body)

        def _send(self, code, body, headers=None):
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture
def server(monkeypatch):
    """(base URL, request counter) of a local server; the test fails if anything else is contacted."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    connections: list = []
    blocked: list = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            blocked.append(address)
            raise AssertionError(f"the downloader tried to contact {address!r}")
        connections.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    requests: Counter = Counter()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(requests, threading.Lock()))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests, blocked
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert connections, "the test made no connection at all"
    assert not blocked, f"addresses other than 127.0.0.1 were contacted: {blocked}"


def write_list(path: Path, ids) -> Path:
    pd.DataFrame({"ID": list(ids), "Label": "0"}).to_csv(path, index=False)
    return path


def test_url_pattern():
    assert dl.channel_url("10580_1610_C1_1", "green") == "https://images.proteinatlas.org/10580/1610_C1_1_green.jpg"
    assert dl.channel_url("11651_1732_F3_13_cr580610dc203b9", "blue", "http://v18.proteinatlas.org/images/",
                          "tif.gz") == "http://v18.proteinatlas.org/images/11651/1732_F3_13_cr580610dc203b9_blue.tif.gz"
    with pytest.raises(dl.PermanentError, match="not an HPA website ID"):
        dl.channel_url("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0", "red")


def test_failure_cases_retries_and_the_one_failure_list(server, tmp_path):
    base, requests, _ = server
    ids = GOOD + [f"{ab}_1_A1_1" for ab in (BUSY_ONCE, SLOW_ONCE, DROP_ONCE, NOT_FOUND, CORRUPT, DROP_ALWAYS)]
    ids.append("5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0")  # a Kaggle UUID: not on the website
    out = tmp_path / "ext"
    t0 = time.perf_counter()
    outcomes = dl.download(ids, out, base_url=base, workers=6, retries=2, timeout=0.5, backoff=0.01)
    assert time.perf_counter() - t0 < 60
    by = {(o.image_id, o.channel): o for o in outcomes}
    assert len(by) == len(ids) * 4
    failed = {o.image_id for o in outcomes if o.status == "failed"}
    assert failed == {f"{NOT_FOUND}_1_A1_1", f"{CORRUPT}_1_A1_1", f"{DROP_ALWAYS}_1_A1_1",
                      "5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0"}
    for ch in CHANNELS:
        assert by[(f"{NOT_FOUND}_1_A1_1", ch)].reason == "HTTP 404"
        assert by[(f"{NOT_FOUND}_1_A1_1", ch)].attempts == 1  # final: never retried
        assert by[(f"{CORRUPT}_1_A1_1", ch)].reason.startswith("corrupt file")
        assert by[(f"{CORRUPT}_1_A1_1", ch)].attempts == 3  # first try + 2 retries
        assert by[(f"{DROP_ALWAYS}_1_A1_1", ch)].reason.startswith("connection dropped mid-file")
        assert by[(f"5c27f04c-bb99-11e8-b2b9-ac1f6b6435d0", ch)].attempts == 0
        for ab in (BUSY_ONCE, SLOW_ONCE, DROP_ONCE):  # transient: the retry succeeded
            o = by[(f"{ab}_1_A1_1", ch)]
            assert o.status == "downloaded" and o.attempts == 2, o
    assert not any(p.startswith("/5c27f04c") for p in requests)
    # the files: the served JPEG bytes, decodable, no temp files left
    for image_id in GOOD + [f"{ab}_1_A1_1" for ab in (BUSY_ONCE, SLOW_ONCE, DROP_ONCE)]:
        sample = read_sample(out, image_id)
        assert sample.shape == (SIDE, SIDE, 4) and sample.dtype == np.uint8
        assert (out / f"{image_id}_green.jpg").read_bytes() == tinted_jpeg(image_id, "green")
    for bad in failed:
        assert not list(out.glob(f"{bad}_*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # the one failure list
    fail = pd.read_csv(out / dl.FAILURES_FILE)
    assert len(fail) == 16 and set(fail.ID) == failed
    text = dl.summarize(outcomes, out)
    assert text.startswith(f"{len(ids) - 4}/{len(ids)} fields complete")
    assert "HTTP 404" in text and "connection dropped mid-file" in text and "corrupt file" in text


def test_rerun_skips_finished_files_and_resumes(server, tmp_path):
    base, requests, _ = server
    out = tmp_path / "ext"
    first = dl.download(GOOD[:2], out, base_url=base, workers=2, retries=0, timeout=5, backoff=0.01)
    assert all(o.status == "downloaded" for o in first)
    n_requests = sum(requests.values())
    # a killed run left a temp file and lost one channel: the rerun fetches only the missing file
    (out / f".{GOOD[0]}_red.xyz.tmp.jpg").write_bytes(b"partial")
    (out / f"{GOOD[0]}_red.jpg").unlink()
    again = dl.download(GOOD, out, base_url=base, workers=2, retries=0, timeout=5, backoff=0.01)
    status = Counter(o.status for o in again)
    assert status == {"skipped": 7, "downloaded": 5}
    assert sum(requests.values()) - n_requests == 5
    assert read_sample(out, GOOD[0]).shape == (SIDE, SIDE, 4)
    with pytest.raises(ConfigError, match="size=None, not 24"):
        dl.download(GOOD, out, base_url=base, size=24)


def test_resize_on_the_fly_and_tif_gz(server, tmp_path):
    base, _, _ = server
    out = tmp_path / "small"
    outcomes = dl.download(GOOD[:1], out, base_url=base, size=24, workers=2, retries=0, timeout=5)
    assert all(o.status == "downloaded" for o in outcomes)
    green = read_channel(out / f"{GOOD[0]}_green.png")
    assert green.shape == (24, 24) and green.dtype == np.uint8
    full = cv2.imdecode(np.frombuffer(tinted_jpeg(GOOD[0], "green"), np.uint8), cv2.IMREAD_UNCHANGED).max(axis=2)
    expected = cv2.resize(full, (24, 24), interpolation=cv2.INTER_AREA)
    assert np.abs(green.astype(int) - expected).max() <= 1
    tif = tmp_path / "tif"
    outcomes = dl.download(GOOD[:1], tif, base_url=base, fmt="tif.gz", workers=2, retries=0, timeout=5)
    assert all(o.status == "downloaded" for o in outcomes)
    red = read_channel(tif / f"{GOOD[0]}_red.png")
    assert red.dtype == np.uint16 and np.array_equal(red, plane(GOOD[0], "red").astype(np.uint16) * 257)
    assert json.loads((tif / dl.SETTINGS_FILE).read_text())["format"] == "tif.gz"
    # never enlarged
    big = tmp_path / "big"
    dl.download(GOOD[:1], big, base_url=base, size=2048, workers=2, retries=0, timeout=5)
    assert read_channel(big / f"{GOOD[0]}_blue.png").shape == (SIDE, SIDE)


def test_command_exit_status_and_summary(server, tmp_path, capsys):
    base, _, _ = server
    lst = write_list(tmp_path / "external.csv", GOOD + [f"{NOT_FOUND}_2_B2_2"])
    out = tmp_path / "dl"
    code = kit_main(["external", "download", "--list", str(lst), "--out", str(out), "--base-url", base,
                     "--workers", "3", "--retries", "1", "--backoff", "0.01", "--quiet"])
    text = capsys.readouterr().out
    assert code == 1
    assert "3/4 fields complete" in text and f"{NOT_FOUND}_2_B2_2 red: HTTP 404" in text
    lst2 = write_list(tmp_path / "ok.csv", GOOD)
    assert kit_main(["external", "download", "--list", str(lst2), "--out", str(out), "--base-url", base,
                     "--quiet"]) == 0
    assert "12 already there, 0 failed" in capsys.readouterr().out
    assert pd.read_csv(out / dl.FAILURES_FILE).empty
    # sharding splits the list without overlap
    shard_files = set()
    for i in range(2):
        sub = tmp_path / f"shard{i}"
        assert kit_main(["external", "download", "--list", str(lst2), "--out", str(sub), "--base-url", base,
                         "--shard", f"{i}/2", "--quiet"]) == 0
        shard_files |= {p.name for p in sub.glob("*.jpg")}
    assert len(shard_files) == 12


def test_the_guard_would_catch_another_address(server, tmp_path):
    """The connection guard of these tests is live: a non-loopback base URL is stopped before any packet."""
    base, _, blocked = server
    with pytest.raises(AssertionError, match="tried to contact"):
        dl.download(GOOD[:1], tmp_path / "x", base_url="http://192.0.2.1", workers=1, retries=0, timeout=1)
    assert blocked and set(blocked) == {("192.0.2.1", 80)}
    blocked.clear()
    dl.download(GOOD[:1], tmp_path / "y", base_url=base, workers=1, retries=0, timeout=5)  # the fixture wants one
