"""Download the four channels of public HPA fields: parallel, retried, verified, resumable.

    python -m kit external download --list external.csv --out DIR [--workers N] [--size 2048|1024|512]
        [--base-url URL] [--format jpg|tif.gz] [--retries 5] [--timeout 60] [--backoff 1] [--shard I/N]

URLs. An HPA website field ``<antibody>_<plate>_<well>_<field>`` (the ID of the HPAv18 list and of
the hosts' 2021 notebook, whose ``Image`` column is ``<base>/<antibody>/<plate>_<well>_<field>``)
has one file per channel::

    <base-url>/<antibody>/<plate>_<well>_<field>_<channel>.<format>     channel in red, green, blue, yellow

with base ``https://images.proteinatlas.org`` (the hosts' 2021 notebook; the 2019 winner used
``http://v18.proteinatlas.org/images``, pass it with ``--base-url``). ``jpg`` is the tinted 8-bit
JPEG the website shows; ``tif.gz`` the gzipped original (16-bit), which the hosts fetched where
a JPEG failed. IDs of another form (Kaggle UUIDs) are not on the website: they are reported as
failures without any request.

Files written, per channel, in DIR (one folder, the layout `kit.images.read_sample` reads):

- no ``--size``: ``<ID>_<channel>.jpg`` (the served bytes, once they decode) or, for tif.gz,
  ``<ID>_<channel>.png`` (the decoded TIFF, lossless);
- ``--size S``: ``<ID>_<channel>.png``, one grey plane (a tinted JPEG becomes the maximum over its
  colour planes, as `kit.images.read_channel` reads it) resized with area averaging so the longer
  side is at most S; fields are never enlarged (the full set is ~200 GB at full size; the top
  teams kept 512-768 px copies).

Every file is written to a temporary name and renamed once it decodes, so a file under its final
name is complete, and a rerun skips it: an interrupted download resumes where it stopped.
``DIR/download.json`` records the format and size; a rerun with other settings is refused (mixed
files otherwise). Errors: HTTP 404/403/410 are final; connection errors, timeouts, a connection
that drops mid-file (fewer bytes than Content-Length), HTTP 429/5xx and a file that does not
decode are retried ``--retries`` times with exponential back-off (``backoff * 2**attempt``, with
jitter, at most 60 s, or the server's Retry-After). The failures are listed once, at the end, and
in ``DIR/download_failures.csv`` (``ID,channel,url,reason,attempts``; with ``--shard I/N``
``download_failures-I-of-N.csv``, so array tasks sharing DIR never overwrite each other's); the
exit status is 1 when any file failed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from kit import __version__
from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, DataError
from kit.external.labels import HPA_ID
from kit.images import CHANNELS

DEFAULT_BASE_URL = "https://images.proteinatlas.org"
FORMATS = ("jpg", "tif.gz")
FAILURES_FILE = "download_failures.csv"
SHARD_FAILURES_FILE = "download_failures-{i}-of-{n}.csv"
SETTINGS_FILE = "download.json"
MAX_BACKOFF_S = 60.0
_FINAL_HTTP = {400, 401, 403, 404, 410}


class PermanentError(Exception):
    """A download that retrying cannot fix (HTTP 404, an ID that is not on the website)."""


@dataclass(frozen=True)
class Job:
    image_id: str
    channel: str
    url: str
    path: Path


@dataclass
class Outcome:
    image_id: str
    channel: str
    url: str
    status: str  # "downloaded", "skipped" or "failed"
    reason: str = ""
    attempts: int = 0
    shape: tuple[int, ...] | None = None


def channel_url(image_id: str, channel: str, base_url: str = DEFAULT_BASE_URL, fmt: str = "jpg") -> str:
    """The website URL of one channel of a field; PermanentError for an ID of another form."""
    m = HPA_ID.match(str(image_id))
    if not m:
        raise PermanentError(f"{image_id!r} is not an HPA website ID (<antibody>_<plate>_<well>_<field>)")
    return f"{base_url.rstrip('/')}/{m.group('antibody')}/{m.group('rest')}_{channel}.{fmt}"


def output_path(out_dir: Path, image_id: str, channel: str, fmt: str, size: int | None) -> Path:
    """Where one channel is stored (see the module doc)."""
    ext = "jpg" if fmt == "jpg" and size is None else "png"
    return Path(out_dir) / f"{image_id}_{channel}.{ext}"


# ------------------------------------------------------------------------------------ one file


def fetch(url: str, timeout: float, opener: Callable | None = None) -> bytes:
    """GET `url`; the whole body or an exception (IncompleteRead when the connection drops)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"kit/{__version__}"})
    with (opener or urllib.request.urlopen)(request, timeout=timeout) as response:
        data = response.read()
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and len(data) != int(length):
            raise http.client.IncompleteRead(data, int(length) - len(data))
        return data


def decode(data: bytes, fmt: str) -> np.ndarray:
    """Bytes of one channel -> a 2-D uint8/uint16 array; ValueError when they do not decode."""
    import cv2

    if fmt == "tif.gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"not a complete gzip file: {exc}") from None
    elif not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        # libjpeg decodes a truncated JPEG with a grey bottom and only a warning: check the EOI marker.
        raise ValueError("not a complete JPEG file (no end-of-image marker)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ValueError("does not decode as an image")
    if img.ndim == 3:  # a tinted RGB JPEG of one channel: its colour planes hold the signal
        img = img[..., :3].max(axis=2)
    if img.dtype not in (np.uint8, np.uint16):
        img = np.clip(img, 0, 65535).astype(np.uint16)
    return img


def resize_max(img: np.ndarray, size: int | None) -> np.ndarray:
    """Shrink so the longer side is at most `size` (area averaging); never enlarge."""
    import cv2

    if size is None or max(img.shape[:2]) <= size:
        return img
    scale = size / max(img.shape[:2])
    w, h = max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)


def _retryable(exc: BaseException) -> tuple[bool, str, float | None]:
    """(retry?, reason, server's Retry-After seconds) of a failed attempt."""
    if isinstance(exc, PermanentError):
        return False, str(exc), None
    if isinstance(exc, urllib.error.HTTPError):
        after = exc.headers.get("Retry-After") if exc.headers else None
        wait = float(after) if after and after.strip().isdigit() else None
        return exc.code not in _FINAL_HTTP, f"HTTP {exc.code}", wait
    if isinstance(exc, http.client.IncompleteRead):
        return True, f"connection dropped mid-file ({len(exc.partial)} bytes received)", None
    if isinstance(exc, ValueError):
        return True, f"corrupt file: {exc}", None
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return True, "timed out", None
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            return True, "timed out", None
        return True, f"connection failed: {reason}", None
    if isinstance(exc, (ConnectionError, http.client.HTTPException, OSError)):
        return True, f"connection failed: {type(exc).__name__}: {exc}", None
    raise exc  # a bug, not a download problem


def download_one(job: Job, fmt: str, size: int | None, *, retries: int, timeout: float, backoff: float,
                 opener: Callable | None = None, sleep: Callable[[float], None] = time.sleep) -> Outcome:
    """Fetch, verify, resize and store one channel file, retrying what can be retried."""
    import cv2

    attempts = 0
    reason = ""
    while True:
        attempts += 1
        try:
            data = fetch(job.url, timeout, opener)
            img = decode(data, fmt)
            if size is None and fmt == "jpg":
                with atomic_path(job.path) as tmp:
                    tmp.write_bytes(data)
            else:
                img = resize_max(img, size)
                with atomic_path(job.path) as tmp:
                    if not cv2.imwrite(str(tmp), img):
                        raise OSError(f"cannot write {tmp}")
            return Outcome(job.image_id, job.channel, job.url, "downloaded", attempts=attempts, shape=img.shape)
        except Exception as exc:  # classified below; a bug re-raises from _retryable
            retry, reason, wait = _retryable(exc)
            if not retry or attempts > retries:
                return Outcome(job.image_id, job.channel, job.url, "failed", reason, attempts)
            delay = wait if wait is not None else backoff * 2 ** (attempts - 1) * (1 + 0.25 * random.random())
            sleep(min(delay, MAX_BACKOFF_S))


# ------------------------------------------------------------------------------------ many files


def _check_settings(out_dir: Path, settings: dict) -> None:
    path = out_dir / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key in ("format", "size"):
            if old.get(key) != settings[key]:
                raise ConfigError(
                    f"{out_dir} holds a download with {key}={old.get(key)!r}, not {settings[key]!r}: files would mix; "
                    f"use another --out or the same settings")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(settings, indent=1) + "\n")


def download(image_ids: Iterable[str], out_dir: str | Path, *, base_url: str = DEFAULT_BASE_URL, fmt: str = "jpg",
             size: int | None = None, channels: Sequence[str] = CHANNELS, workers: int = 8, retries: int = 5,
             timeout: float = 60.0, backoff: float = 1.0, progress: bool = False,
             opener: Callable | None = None, failures_file: str = FAILURES_FILE) -> list[Outcome]:
    """Download every channel of every field into `out_dir`, skipping finished files.

    Returns one Outcome per file (downloaded, skipped or failed) and writes the failure list
    `out_dir/failures_file` (array tasks sharing a folder each name their own).
    `opener`: a replacement for `urllib.request.urlopen` (tests, proxies).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if size is not None and size < 16:
        raise ConfigError(f"--size {size}: too small")
    if not str(base_url).startswith(("http://", "https://")):
        raise ConfigError(f"--base-url {base_url!r}: must start with http:// or https://")
    out_dir = Path(out_dir)
    _check_settings(out_dir, {"format": fmt, "size": size, "base_url": base_url, "kit": __version__})
    outcomes: list[Outcome] = []
    jobs: list[Job] = []
    for image_id in dict.fromkeys(image_ids):
        for ch in channels:
            try:
                url = channel_url(image_id, ch, base_url, fmt)
            except PermanentError as exc:
                outcomes.append(Outcome(image_id, ch, "", "failed", str(exc), 0))
                continue
            path = output_path(out_dir, image_id, ch, fmt, size)
            if path.is_file():
                outcomes.append(Outcome(image_id, ch, url, "skipped"))
            else:
                jobs.append(Job(image_id, ch, url, path))
    bar = None
    if progress and jobs:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="download", unit="file", file=sys.stderr)
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        futures = [pool.submit(download_one, job, fmt, size, retries=retries, timeout=timeout,
                               backoff=backoff, opener=opener) for job in jobs]
        for fut in as_completed(futures):
            res = fut.result()
            with lock:
                outcomes.append(res)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    _field_shapes(outcomes)
    write_failures(out_dir / failures_file, outcomes)
    return outcomes


def _field_shapes(outcomes: list[Outcome]) -> None:
    """Mark the channels of a field whose downloaded sizes differ (a field must be one size)."""
    by_id: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.shape is not None:
            by_id.setdefault(o.image_id, []).append(o)
    for group in by_id.values():
        shapes = {o.shape[:2] for o in group}
        if len(shapes) > 1:
            text = ", ".join(f"{o.channel} {o.shape[1]}x{o.shape[0]}" for o in group)
            for o in group:
                o.status, o.reason = "failed", f"channel sizes differ in one field: {text}"


def write_failures(path: Path, outcomes: Sequence[Outcome]) -> None:
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: (o.image_id, o.channel))
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["ID", "channel", "url", "reason", "attempts"])
        for o in failed:
            w.writerow([o.image_id, o.channel, o.url, o.reason, o.attempts])


def failures_name(shard=None) -> str:
    """The failure list's file name: one per shard, so array tasks in one folder never collide."""
    from kit.segment.cache import parse_shard

    sh = parse_shard(shard)
    return FAILURES_FILE if sh is None else SHARD_FAILURES_FILE.format(i=sh[0], n=sh[1])


def summarize(outcomes: Sequence[Outcome], out_dir: Path, limit: int = 20, failures_file: str = FAILURES_FILE) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("downloaded", "skipped", "failed")}
    failed = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: (o.image_id, o.channel))
    fields = {o.image_id for o in outcomes}
    bad_fields = {o.image_id for o in failed}
    lines = [f"{len(fields) - len(bad_fields)}/{len(fields)} fields complete in {out_dir}: "
             f"{counts['downloaded']} files downloaded, {counts['skipped']} already there, {counts['failed']} failed"]
    if failed:
        lines.append(f"failures ({len(failed)} files, all in {out_dir / failures_file}; rerun to retry):")
        for o in failed[:limit]:
            lines.append(f"  {o.image_id} {o.channel}: {o.reason} ({o.attempts} attempt{'s' * (o.attempts != 1)}) {o.url}")
        if len(failed) > limit:
            lines.append(f"  ... {len(failed) - limit} more")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- command


def configure_download(parser: argparse.ArgumentParser) -> None:
    """Download the four channels of listed HPA website fields (parallel, retried, resumable)."""
    parser.add_argument("--list", required=True, type=Path, help="CSV with an ID column (e.g. external.csv)")
    parser.add_argument("--out", required=True, type=Path, help="folder for <ID>_<channel> files")
    parser.add_argument("--workers", type=int, default=8, help="parallel downloads (threads; default 8)")
    parser.add_argument("--size", type=int, default=None,
                        help="store PNGs whose longer side is at most SIZE (e.g. 2048, 1024, 512); default: as served")
    parser.add_argument("--base-url", default=os.environ.get("KIT_HPA_BASE_URL", DEFAULT_BASE_URL),
                        help=f"image server (default {DEFAULT_BASE_URL}, or $KIT_HPA_BASE_URL)")
    parser.add_argument("--format", default="jpg", choices=FORMATS, help="jpg (8-bit, tinted) or tif.gz (16-bit)")
    parser.add_argument("--retries", type=int, default=5, help="retries per file after the first attempt (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before an attempt fails")
    parser.add_argument("--backoff", type=float, default=1.0, help="first back-off in seconds, doubled per retry")
    parser.add_argument("--shard", default=None, help="I/N: only shard I of N of the sorted IDs (array jobs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from kit.layout import read_id_list
    from kit.segment.cache import shard_ids

    ids = read_id_list(args.list)
    if args.shard:
        ids = shard_ids(ids, args.shard)
    t0 = time.time()
    name = failures_name(args.shard)
    outcomes = download(ids, args.out, base_url=args.base_url, fmt=args.format, size=args.size,
                        workers=args.workers, retries=args.retries, timeout=args.timeout,
                        backoff=args.backoff, progress=not args.quiet, failures_file=name)
    print(summarize(outcomes, args.out, failures_file=name), end="")
    print(f"({time.time() - t0:.1f} s)")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


__all__ = ["channel_url", "output_path", "download", "download_one", "decode", "resize_max", "Outcome",
           "PermanentError", "summarize", "configure_download"]
