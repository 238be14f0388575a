"""What an image ID may be: a plain file-name stem, the same on Linux, Windows and macOS.

Every stage turns an ID into file names (``<ID>_<channel>.png``, ``<ID>.npz`` in a cache, a hidden
``.<ID>....tmp`` while writing), so an ID read from a CSV, an ID list or a command line decides
where the kit reads and writes. `id_problem` is the one rule, and every entry point applies it:
`kit.labels.read_labels_csv`, `kit.layout.read_id_list` / `read_sample_submission` /
`scan_split` (file names), `kit.submission` (submission and solution rows), `kit.check_data`
(every bad ID reported in one pass), and the path builders (`kit.images.channel_path`, the mask,
tile, field and prediction caches) as the last line of defence.

An ID is refused when it is empty; has leading or trailing whitespace; holds a path separator
(``/``, ``\\``), ``..``, or starts with ``.`` (hidden files, the kit's temp files); holds a control
or invisible format character (NUL, newline, BOM, bidi marks), or a character Windows forbids in
file names (``< > : " | ? *``); is a Windows device name (``CON``, ``NUL``, ``COM1``, ...); or is
longer than `MAX_ID_BYTES` in UTF-8 (file names are at most 255 bytes, and the kit adds suffixes).
Kaggle IDs (``5b931256-bb99-11e8-b2b9-ac1f6b6435d0``) and HPA website IDs (``10580_1610_C1_1``)
are fine.
"""
from __future__ import annotations

import re
import unicodedata

from kit.errors import DataError, clip

__all__ = ["MAX_ID_BYTES", "id_problem", "check_id"]

MAX_ID_BYTES = 200
_PLAIN = re.compile(r"[A-Za-z0-9_\-]{1,200}")  # the common case, accepted without a closer look
_WINDOWS_FORBIDDEN = set('<>:"|?*')
_WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}  # control, format, surrogate, private, unassigned, separators


def id_problem(image_id: object) -> str | None:
    """Why `image_id` cannot be an ID (a phrase that follows "ID 'x'"), or None when it can."""
    if not isinstance(image_id, str):
        return f"is a {type(image_id).__name__}, not text"
    if _PLAIN.fullmatch(image_id):
        return "is a Windows device name" if image_id.upper() in _WINDOWS_DEVICES else None
    if not image_id:
        return "is empty"
    if image_id != image_id.strip():
        return "has surrounding spaces"
    for sep in ("/", "\\"):
        if sep in image_id:
            return f"contains the path separator {sep!r}"
    if ".." in image_id:
        return "contains '..'"
    if image_id.startswith("."):
        return "starts with '.' (hidden files)"
    for ch in image_id:
        if unicodedata.category(ch) in _INVISIBLE:
            return f"contains the control or invisible character U+{ord(ch):04X}"
        if ch in _WINDOWS_FORBIDDEN:
            return f"contains {ch!r}, which Windows does not allow in file names"
    if image_id.split(".")[0].upper() in _WINDOWS_DEVICES:
        return "is a Windows device name"
    try:
        n_bytes = len(image_id.encode("utf-8"))
    except UnicodeEncodeError:  # pragma: no cover - surrogates are caught above
        return "is not valid Unicode"
    if n_bytes > MAX_ID_BYTES:
        return f"is {n_bytes:,} bytes long (at most {MAX_ID_BYTES})"
    return None


def check_id(image_id: object, where: str = "") -> str:
    """`image_id` itself when it is a valid ID; else DataError ``"<where>: ID '...' <why>"``.

    `where` names the source, e.g. ``"train.csv: line 7"``; the ID is quoted cut to a readable length.
    """
    problem = id_problem(image_id)
    if problem is None:
        return image_id  # type: ignore[return-value]
    prefix = f"{where}: " if where else ""
    if problem == "is empty":
        raise DataError(f"{prefix}empty ID")
    raise DataError(f"{prefix}ID {clip(image_id)} {problem} (an ID is a file-name stem)")
