"""The build folder (``kernel build --out DIR``): built fresh beside DIR, moved into place, and recorded.

- A build writes into a new hidden folder beside DIR (``.DIR.kit-build-<pid>-<random>``, on the same
  file system) and only a finished build replaces DIR, by renames: a failed or killed build leaves DIR
  as it was, and nothing of an earlier build (a kernel folder, a stale wheel) survives into a new one.
- ``DIR/kit-build.json`` records every file the build wrote (``files``: relative path -> size and
  sha256). DIR is replaced only when every file in it is one that record lists; a file the kit did not
  write (a user's weights file, notes) makes the build refuse and name it, unless ``--force``.
- ``kernel push`` publishes a folder only when it holds exactly the recorded files, unchanged
  (`publish_problems`); the two metadata files may be edited by hand (they are re-validated instead).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from kit.errors import ConfigError
from kit.kaggle.metadata import DATASET_META, KERNEL_META

BUILD_MANIFEST = "kit-build.json"
HAND_EDITABLE = (DATASET_META, KERNEL_META)  # re-validated by `kernel push`, so edits are allowed
_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: Path) -> list[str]:
    """Every file (and link) under `root`, as sorted relative POSIX paths, except the build manifest."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            rel = Path(folder, name).relative_to(root).as_posix()
            if rel != BUILD_MANIFEST:
                found.append(rel)
    return sorted(found)


def record_files(root: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under `root` (what a build wrote)."""
    return {rel: {"size": (root / rel).stat().st_size, "sha256": sha256(root / rel)} for rel in list_files(root)}


def read_record(out: Path) -> dict | None:
    """The build manifest of `out` when it records the build's files, else None."""
    path = Path(out) / BUILD_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def unrecorded_files(out: Path, record: dict | None) -> list[str]:
    """Files under `out` that its build record does not list (all of them without a record)."""
    files = (record or {}).get("files", {})
    return [rel for rel in list_files(out) if rel not in files]


def _listing(paths: list[str], out: Path, limit: int = 5) -> str:
    shown = ", ".join(str(Path(out) / p) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_replaceable(out: Path, *, force: bool = False, keep: Iterable[Path] = ()) -> dict | None:
    """Raise unless a build may replace `out`; return its earlier build record (None if none).

    `keep`: paths the build reads (the run folder, ...): `out` may not hold them, even with `force`.
    """
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_symlink():
        raise ConfigError(f"--out {out} is a link; give the folder it points to (a build replaces --out)")
    if not out.is_dir():
        raise ConfigError(f"--out {out}: not a folder; choose a folder for the build")
    where = out.resolve()
    for path in keep:
        path = Path(path).resolve()
        if path == where or where in path.parents:
            raise ConfigError(f"--out {out} holds {path}, which the build reads; choose another --out")
    record = read_record(out)
    foreign = unrecorded_files(out, record)
    if foreign and not force:
        why = "" if record else f" (it holds no {BUILD_MANIFEST} record of a build)"
        raise ConfigError(
            f"--out {out} holds {len(foreign)} file(s) that `kit kernel build` did not write{why}: "
            f"{_listing(foreign, out)}; a build replaces the whole folder, so move them elsewhere, choose another "
            "--out, or pass --force to delete them"
        )
    if foreign and where in (Path.home().resolve(), Path.cwd().resolve(), Path(where.anchor)):
        raise ConfigError(f"--out {out} is {where}; --force would delete everything in it: choose a folder of its own")
    return record


_STALE_RE = r"^\.{name}\.kit-(?:build|old)-(\d+)-"


def _remove_stale(out: Path) -> None:
    """Delete staging folders of killed builds of `out` (their process is gone)."""
    pattern = re.compile(_STALE_RE.format(name=re.escape(out.name)))
    for p in out.parent.glob(f".{out.name}.kit-*"):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError, ValueError):
            pass  # alive under another user, or not a pid: leave it


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a fresh folder beside `out`; when the block finishes it replaces `out`, when it fails
    it is deleted and `out` is untouched. Check `check_replaceable` first."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.kit-build-{os.getpid()}-", dir=out.parent))
    os.chmod(stage, 0o777 & ~_UMASK)  # mkdtemp makes 0700; give the folder the mode mkdir would
    try:
        yield stage
        if out.exists():
            old = out.with_name(f".{out.name}.kit-old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(out, old)
            try:
                os.rename(stage, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def publish_problems(out: Path, folder: str, record: dict) -> list[str]:
    """Why `out/folder` may not be published as it is: files the build did not write, recorded files
    missing or changed since (the metadata files excepted). Empty when it is exactly what was built."""
    out = Path(out)
    files = record.get("files", {})
    prefix = folder.rstrip("/") + "/"
    here = {f"{prefix}{rel}" for rel in list_files(out / folder)} if (out / folder).is_dir() else set()
    problems = [f"{out / rel}: not written by `kit kernel build`; it would be published: remove it or rebuild"
                for rel in sorted(here - set(files))]
    for rel, meta in sorted(files.items()):
        if not rel.startswith(prefix) or Path(rel).name in HAND_EDITABLE:
            continue
        if rel not in here:
            problems.append(f"{out / rel}: written by the build but missing; rebuild with `kit kernel build`")
        elif (out / rel).stat().st_size != meta.get("size") or sha256(out / rel) != meta.get("sha256"):
            problems.append(f"{out / rel}: changed since the build; rebuild with `kit kernel build`")
    return problems
