"""`kernel push`: publish a build with the kaggle CLI (datasets first, then the kernels), or print the commands.

A build is re-validated before anything runs (`load_build`): the metadata against the kaggle CLI's
rules, and every folder against the build's record of the files it wrote, so a file put there since
(or changed) is never published. The kaggle CLI reports some failures with exit status 0, so its
words count too; ``datasets create`` of a dataset that exists becomes ``datasets version`` (mode auto).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from kit.errors import ConfigError, KitError
from kit.kaggle.credentials import have_credentials
from kit.kaggle.metadata import (DATASET_META, KERNEL_META, dataset_metadata_problems, kernel_metadata_problems,
                                 raise_problems)
from kit.kaggle.staging import BUILD_MANIFEST, publish_problems


def load_build(out: Path) -> dict:
    """Read and re-validate a build folder: metadata may have been edited by hand since (it is checked
    again), and every folder to publish must hold exactly the files the build wrote, unchanged."""
    out = Path(out)
    path = out / BUILD_MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} not found; run `python -m kit kernel build --out {out}` first")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); rebuild with `python -m kit kernel build`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ConfigError(f"{path} records no files (a build by an older kit); rebuild with `python -m kit kernel build`")
    problems: list[str] = []
    ids: set = set()  # the datasets built, which the kernels may name as sources
    for kind, meta_name in (("datasets", DATASET_META), ("kernels", KERNEL_META)):
        for entry in manifest[kind].values():
            problems += publish_problems(out, entry["dir"], manifest)
            meta_path = out / entry["dir"] / meta_name
            if not meta_path.is_file():
                problems.append(f"{meta_path}: missing")
                continue
            meta = json.loads(meta_path.read_text())
            if kind == "datasets":
                ids.add(meta.get("id"))
                problems += dataset_metadata_problems(meta, str(meta_path))
            else:
                problems += kernel_metadata_problems(meta, out / entry["dir"], str(meta_path), ids)
    raise_problems(problems)
    return manifest


def push_commands(out: Path, *, mode: str = "auto", message: str = "kit kernel build") -> list[list[str]]:
    """The kaggle CLI commands that publish a build, in order (datasets first, then the kernels).

    `mode` "new" -> ``kaggle datasets create``, "update" -> ``kaggle datasets version``; "both" lists
    both alternatives for each dataset (dry-run display), "auto" decides later (see `push`).
    """
    manifest = load_build(out)
    cmds: list[list[str]] = []
    for name, d in manifest["datasets"].items():
        folder = str(Path(out) / d["dir"])
        create = ["kaggle", "datasets", "create", "-p", folder, "--dir-mode", "zip"]
        version = ["kaggle", "datasets", "version", "-p", folder, "-m", message, "--dir-mode", "zip"]
        if mode in ("new", "both", "auto"):
            cmds.append(create)
        if mode in ("update", "both"):
            cmds.append(version)
    for name, k in manifest["kernels"].items():
        cmds.append(["kaggle", "kernels", "push", "-p", str(Path(out) / k["dir"])])
    return cmds


def _kaggle_exe() -> str | None:
    exe = shutil.which("kaggle")
    if exe is None:
        cand = Path(sys.executable).with_name("kaggle")
        exe = str(cand) if cand.is_file() else None
    return exe


def _run_kaggle(args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    res = subprocess.run(args, capture_output=True, text=True)
    return res, (res.stdout + res.stderr).strip()


def _failed(res: subprocess.CompletedProcess, text: str) -> bool:
    # The kaggle CLI reports some failures ("Dataset creation error: ...", "Kernel push error: ...")
    # with exit status 0, so its words count too.
    return res.returncode != 0 or re.search(r"\berror\b", text, re.I) is not None


def push(out: Path, *, dry_run: bool = False, mode: str = "auto", message: str = "kit kernel build",
         log=print) -> int:
    """Print (dry run) or run the kaggle CLI commands of a build. Returns an exit code."""
    cmds = push_commands(out, mode="both" if dry_run and mode == "auto" else mode, message=message)
    if dry_run:
        log("# dry run: the commands `kernel push` would run (datasets first, then kernels).")
        if mode == "auto":
            log("# For each dataset: `datasets create` the first time, `datasets version` once it exists.")
        for c in cmds:
            log(shlex.join(c))
        return 0
    where = have_credentials()
    if where is None:
        raise KitError(
            "no Kaggle credentials: put kaggle.json (from kaggle.com > Settings > API) in ~/.kaggle/ (chmod 600) "
            "or set KAGGLE_USERNAME and KAGGLE_KEY; nothing was pushed. `--dry-run` prints the commands."
        )
    exe = _kaggle_exe()
    if exe is None:
        raise KitError("the kaggle CLI is not installed: `pip install kaggle` (only needed for push); nothing was pushed")
    log(f"credentials found ({where.split(' ')[0] if where.startswith('environment') else 'file'}); pushing")
    for c in cmds:
        log("$ " + shlex.join(c))
        res, text = _run_kaggle([exe, *c[1:]])
        exists = re.search(r"already (exists|in use)|\b409\b", text, re.I)
        if _failed(res, text) and mode == "auto" and c[1:3] == ["datasets", "create"] and exists:
            alt = ["datasets", "version", "-p", c[4], "-m", message, "--dir-mode", "zip"]
            log(f"  the dataset exists; $ {shlex.join(['kaggle', *alt])}")
            res, text = _run_kaggle([exe, *alt])
        if text:
            log("  " + text.replace("\n", "\n  "))
        if _failed(res, text):
            log(f"error: `{shlex.join(c)}` failed (status {res.returncode}); later commands were not run")
            return res.returncode or 1
    return 0
