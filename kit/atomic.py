"""Atomic file output: write to a temporary name in the same folder, then rename.

A killed run therefore never leaves a half-written file under the final name, and a rerun can
trust that every file it finds is complete (the basis of every resumable stage in the kit).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.

    The temporary name keeps the final suffix (numpy, cv2 and torch choose formats by suffix).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """`open()` for writing that only shows the file under its name once it is complete."""
    if not any(m in mode for m in "wax"):
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode.replace("x", "w").replace("a", "w"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


STALE_TEMP_AGE_S = 3600.0  # a temp file older than this belongs to a killed run, not a live writer


def remove_stale_temps(folder: str | os.PathLike, stem: str | None = None,
                       max_age_s: float = STALE_TEMP_AGE_S) -> int:
    """Remove the hidden temp files `atomic_path` left in `folder` when a run was killed mid-write.

    Only ``.<stem>.<random>.tmp<suffix>`` files (any stem when `stem` is None) older than
    `max_age_s` go: a concurrent run's temp file is younger, so it is left alone. Returns how many.
    """
    import glob
    import time

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f".{glob.escape(stem)}.*.tmp*" if stem is not None else ".*.tmp*"
    now = time.time()
    removed = 0
    for p in folder.glob(pattern):
        try:
            if now - p.stat().st_mtime > max_age_s and p.is_file():
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed
