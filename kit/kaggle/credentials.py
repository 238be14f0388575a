"""Kaggle credentials: tested for presence only, never read into output, and kept out of every bundle.

Where the kaggle CLI looks: ``$KAGGLE_CONFIG_DIR/kaggle.json``, ``~/.kaggle/kaggle.json``,
``~/.kaggle/access_token``, ``$XDG_CONFIG_HOME/kaggle/kaggle.json``, and the environment
(``KAGGLE_USERNAME``/``KAGGLE_KEY``, ``KAGGLE_API_TOKEN``). ``import kaggle`` authenticates at import,
so the kit never imports it (`kit.kaggle.push` runs the ``kaggle`` executable).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kit.errors import KitError


def credential_files() -> list[Path]:
    """Where the kaggle CLI looks for credentials, in its order."""
    paths = []
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        paths.append(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json")
    paths.append(Path.home() / ".kaggle" / "kaggle.json")
    paths.append(Path.home() / ".kaggle" / "access_token")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(xdg) / "kaggle" / "kaggle.json")
    return paths


def have_credentials() -> str | None:
    """Where credentials were found (a description, never their value), or None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME/KAGGLE_KEY)"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "environment (KAGGLE_API_TOKEN)"
    for p in credential_files():
        if p.is_file():
            return str(p)
    return None


def _secret_values() -> list[bytes]:
    """The credential values present (to check a bundle does not contain them); kept in memory only."""
    secrets = [os.environ.get(k, "") for k in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    for p in credential_files():
        try:
            text = p.read_text()
        except OSError:
            continue
        try:
            secrets.append(str(json.loads(text).get("key", "")))
        except (ValueError, AttributeError):
            secrets.append(text.strip())
    return [s.encode() for s in secrets if len(s) >= 8]


def check_no_credentials(root: Path, shown_as: Path | None = None) -> None:
    """Raise if a credential file, or a credential value, is anywhere under `root`.

    `shown_as`: the folder the error names instead of `root` (a build checks its staging folder,
    which the user never sees, and reports the path it would have had under ``--out``).
    """
    secrets = _secret_values()
    for p in sorted(root.rglob("*")):
        shown = Path(shown_as) / p.relative_to(root) if shown_as is not None else p
        if p.name in ("kaggle.json", "access_token") or p.name == ".kaggle":
            raise KitError(f"{shown}: a Kaggle credential file is inside the bundle; remove it")
        if secrets and p.is_file() and p.stat().st_size < 50_000_000:
            data = p.read_bytes()
            if any(s in data for s in secrets):
                raise KitError(f"{shown}: holds the Kaggle API key; remove it from the bundle")
