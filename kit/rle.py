"""Cell masks in the competition's text encoding, fast.

The format (Open Images challenge "OID encoding", as published by the HPA 2021 host)::

    mask (H x W bool) -> H x W x 1 uint8, Fortran (column-major) order
                      -> pycocotools.mask.encode(...)[0]["counts"]   (COCO compressed RLE, bytes)
                      -> zlib.compress(counts, 9)
                      -> base64.b64encode(...)                       (ASCII)

COCO RLE reads the mask column by column (top to bottom, then left to right) and stores the
lengths of alternating runs, starting with a run of zeros (possibly of length 0); the last count
is the last run, whatever its value. Each count is written as a LEB128-like string: from the
fourth count on, the difference to the count two places earlier; 5 bits per character, bit 0x20
"more follows", bit 0x10 of the last character the sign, each character offset by 48 ('0').

This module reproduces those bytes without pycocotools' full-frame copies:

- `encode_binary_mask(mask) -> str`: one mask; byte-identical to the host's published encoder
  (kept as ``tests/helpers.py:reference_encode_binary_mask`` for the tests and benchmarks) except
  that it returns ``str``.
- `encode_label_image(labels) -> {cell_id: str}`: every cell of a label image from one pass over
  the image (run boundaries found on the C-ordered array, put in column-major order; no per-cell
  full-frame mask), each string identical to ``encode_binary_mask(labels == id)``.
- `decode_binary_mask(text, height, width) -> H x W bool`, `decode_to_crop(text, height, width)
  -> (y0, x0, crop)`: the full frame, or only the mask's bounding box (what the metric needs).
- `mask_runs(text, height, width) -> MaskRuns(starts, ends, height, width)`: the foreground runs
  as column-major pixel offsets (end exclusive), the cheapest form for areas; `mask_bbox(runs)`
  and `runs_to_crop(runs)` give the box and the crop from them (what `kit.metric` uses).

Every malformed string (not base64, not zlib, not RLE, run lengths not summing to H x W) raises
`RLEError` (a `kit.errors.DataError`) saying what is wrong.
"""
from __future__ import annotations

import base64
import binascii
import zlib
from typing import NamedTuple

import numpy as np

from kit.errors import DataError, clip

__all__ = [
    "RLEError",
    "encode_binary_mask",
    "decode_binary_mask",
    "encode_label_image",
    "decode_to_crop",
    "mask_runs",
    "mask_bbox",
    "runs_to_crop",
    "MaskRuns",
    "counts_to_string",
    "string_to_counts",
]

# Largest RLE counts string a mask may inflate to: a 4096 px field with a run at every pixel needs
# 16 MiB; a crafted few-KB zlib stream would otherwise inflate to GBs.
MAX_COUNTS_BYTES = 64 << 20


class RLEError(DataError):
    """A mask string that cannot be decoded, or a mask that cannot be encoded."""


# ----------------------------------------------------------------------------------------------
# COCO compressed counts <-> integer run lengths (vectorised rleToString / rleFrString)
# ----------------------------------------------------------------------------------------------

def _counts_to_chars(counts: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Several concatenated count lists -> their COCO strings back to back, and chars per count.

    Exactly pycocotools' ``rleToString`` applied to each segment: from the 4th count of a
    segment on, the difference to the count two places earlier; then 5-bit groups, least
    significant first, 0x20 = more follows, 0x10 of the last group = sign, each + 48.
    """
    c = np.asarray(counts, dtype=np.int64)
    local = np.arange(len(c)) - np.repeat(seg_start, seg_len)
    x = c.copy()
    delta = np.flatnonzero(local >= 3)
    x[delta] -= c[delta - 2]
    chunks = []
    more = []
    rest = x
    while True:
        chunk = rest & 0x1F
        rest = rest >> 5  # arithmetic shift, as C's >> on a negative long
        m = np.where(chunk & 0x10, rest != -1, rest != 0)
        chunks.append(chunk)
        more.append(m)
        if not m.any():
            break
    chunks_a = np.stack(chunks, axis=1)
    more_a = np.stack(more, axis=1)
    # more[k] is true exactly for k < nchars - 1 (once a value is exhausted it stays exhausted)
    nchars = more_a.sum(axis=1) + 1
    chars = (chunks_a | (more_a.astype(np.int64) << 5)) + 48
    keep = np.arange(chunks_a.shape[1])[None, :] < nchars[:, None]
    return chars[keep].astype(np.uint8).tobytes(), nchars


def counts_to_string(counts: np.ndarray) -> bytes:
    """Run lengths -> COCO compressed counts bytes, exactly as pycocotools' ``rleToString``."""
    c = np.asarray(counts, dtype=np.int64)
    return _counts_to_chars(c, np.zeros(1, dtype=np.int64), np.array([len(c)]))[0]


def string_to_counts(data: bytes) -> np.ndarray:
    """COCO compressed counts bytes -> run lengths (int64), as pycocotools' ``rleFrString``.

    Raises RLEError for characters outside the alphabet or a truncated last value.
    """
    b = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 48
    if b.size == 0:
        raise RLEError("empty RLE counts")
    if b.min() < 0 or b.max() > 63:
        bad = int(np.flatnonzero((b < 0) | (b > 63))[0])
        raise RLEError(f"byte {data[bad]!r} at offset {bad} is not a COCO RLE character")
    last = (b & 0x20) == 0  # this character ends a value
    if not last[-1]:
        raise RLEError("RLE counts end in the middle of a value")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 12:
        raise RLEError("RLE value longer than 12 characters")
    k = np.arange(b.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((b & 0x1F) << (5 * k), starts)
    negative = (b[ends] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * lengths)), x)
    counts = x.copy()
    if len(counts) > 3:
        counts[1::2] = np.cumsum(x[1::2])
        counts[2::2] = np.cumsum(x[2::2])
    return counts


def _pack(counts: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(counts_to_string(counts), 9)).decode("ascii")


def _unpack(text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
        try:
            raw = text.strip().encode("ascii")
        except UnicodeEncodeError:
            raise RLEError("mask string is not ASCII base64") from None
    elif isinstance(text, (bytes, bytearray)):
        raw = bytes(text).strip()
    else:
        raise RLEError(f"mask must be a base64 str, got {type(text).__name__}")
    if not raw:
        raise RLEError("empty mask string")
    try:
        compressed = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RLEError(f"mask string is not valid base64 ({exc})") from None
    try:
        inflate = zlib.decompressobj()
        data = inflate.decompress(compressed, MAX_COUNTS_BYTES)
    except zlib.error as exc:
        raise RLEError(f"mask string is not zlib data ({exc})") from None
    if inflate.unconsumed_tail:  # a few KB of zlib can inflate to GBs
        raise RLEError(f"mask string inflates to more than {MAX_COUNTS_BYTES >> 20} MiB of RLE counts")
    if not inflate.eof:
        raise RLEError("mask string is not zlib data (incomplete or truncated stream)")
    return string_to_counts(data)


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------

def _as_2d(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        squeezed = np.squeeze(array)
        if squeezed.ndim != 2:
            raise RLEError(f"{what} must be 2-D (H x W), got shape {array.shape}")
        array = squeezed
    return array


def _column_major_boundaries(a: np.ndarray) -> np.ndarray:
    """Sorted column-major offsets where the value changes (start of every run but the first).

    Works on the C-ordered array: a column-major transpose copy costs ~35 ms on a 2048^2 int32
    image, this ~2 ms. Changes inside a column are vertical neighbours that differ; a change
    between columns is the last pixel of column x against the first of column x + 1.
    """
    h, w = a.shape
    idx = np.flatnonzero(a[1:] != a[:-1])  # (y, x) with a[y + 1, x] != a[y, x]
    ys, xs = np.divmod(idx, w)
    inside = xs * h + ys + 1
    across = (np.flatnonzero(a[-1, :-1] != a[0, 1:]) + 1) * h
    out = np.concatenate((inside, across))
    out.sort()
    return out


def encode_binary_mask(mask: np.ndarray) -> str:
    """One boolean mask -> the competition's mask string (base64 text).

    `mask` is H x W bool (singleton axes are squeezed, as in the host's code). Byte-identical to
    the host's encoder (``tests/helpers.py:reference_encode_binary_mask``), decoded to ``str``.
    """
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise RLEError(
            f"mask must be boolean, got dtype {mask.dtype} (use `labels == cell_id` or `mask > 0`)"
        )
    mask = _as_2d(mask, "mask")
    n = mask.size
    if n == 0:
        return _pack(np.zeros(1, dtype=np.int64))
    edges = np.concatenate(([0], _column_major_boundaries(mask), [n]))
    counts = np.diff(edges)
    if mask[0, 0]:
        counts = np.concatenate(([0], counts))
    return _pack(counts)


def encode_label_image(labels: np.ndarray) -> dict[int, str]:
    """Every cell of a label image -> ``{cell_id: mask string}`` (ids ascending, 0 = background).

    One pass over the image finds the column-major runs of all cells at once; the run lengths of
    every cell are then built and turned into COCO strings together (vectorised), leaving one
    zlib + base64 call per cell. Each string equals ``encode_binary_mask(labels == cell_id)``
    byte for byte.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise RLEError(f"label image must be an integer array, got dtype {labels.dtype}")
    labels = _as_2d(labels, "label image")
    h, w = labels.shape
    n = labels.size
    if n == 0:
        return {}
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise RLEError("label image has negative ids (0 is background, cells are 1, 2, ...)")
    starts = np.concatenate(([0], _column_major_boundaries(labels)))
    values = labels[starts % h, starts // h]
    ends = np.append(starts[1:], n)
    fg = values != 0
    if not fg.any():
        return {}
    starts, ends, values = starts[fg], ends[fg], values[fg]
    order = np.argsort(values, kind="stable")  # group by cell, keep position order within it
    starts, ends, values = starts[order], ends[order], values[order]
    ids, first = np.unique(values, return_index=True)
    last = np.append(first[1:], len(values)) - 1

    # run lengths of every cell, concatenated: per run (gap before it, its length), then the
    # trailing background when the cell does not reach the last pixel
    prev_end = np.concatenate(([0], ends[:-1]))
    prev_end[first] = 0
    pairs = np.stack((starts - prev_end, ends - starts), axis=1).ravel()
    trailing = n - ends[last]
    has_tail = trailing > 0
    counts = np.insert(pairs, 2 * (last[has_tail] + 1), trailing[has_tail])
    seg_len = 2 * (last - first + 1) + has_tail
    seg_start = np.concatenate(([0], np.cumsum(seg_len)[:-1]))
    data, char_counts = _counts_to_chars(counts, seg_start, seg_len)
    offsets = np.concatenate(([0], np.cumsum(np.add.reduceat(char_counts, seg_start))))
    out: dict[int, str] = {}
    for j, cell in enumerate(ids.tolist()):
        chunk = data[offsets[j]:offsets[j + 1]]
        out[int(cell)] = base64.b64encode(zlib.compress(chunk, 9)).decode("ascii")
    return out


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------

class MaskRuns(NamedTuple):
    """Foreground runs of a decoded mask, column-major pixel offsets, ``end`` exclusive."""

    starts: np.ndarray
    ends: np.ndarray
    height: int
    width: int

    @property
    def area(self) -> int:
        return int((self.ends - self.starts).sum())


def _check_size(height: int, width: int) -> tuple[int, int]:
    try:
        h, w = int(height), int(width)
    except (TypeError, ValueError):
        raise RLEError(f"height/width must be integers, got {clip(height)} x {clip(width)}") from None
    if h <= 0 or w <= 0:
        raise RLEError(f"height/width must be positive, got {h} x {w}")
    return h, w


def mask_runs(text: str | bytes, height: int, width: int) -> MaskRuns:
    """Mask string -> its foreground runs (no pixel array is built)."""
    h, w = _check_size(height, width)
    counts = _unpack(text)
    if (counts < 0).any():
        raise RLEError("RLE has a negative run length")
    total = int(counts.sum())
    if total != h * w:
        raise RLEError(f"run lengths sum to {total} pixels, but {h} x {w} = {h * w}")
    pos = np.concatenate(([0], np.cumsum(counts)))
    starts = pos[1:-1:2]
    ends = pos[2::2]
    nonempty = ends > starts
    return MaskRuns(starts[nonempty], ends[nonempty], h, w)


def decode_binary_mask(text: str | bytes, height: int, width: int) -> np.ndarray:
    """Mask string -> H x W bool array (C order). Raises RLEError for a malformed string."""
    runs = mask_runs(text, height, width)
    out = np.zeros((runs.height, runs.width), dtype=bool)
    y0, x0, crop = runs_to_crop(runs)
    out[y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop  # no full-frame transpose
    return out


def mask_bbox(runs: MaskRuns) -> tuple[int, int, int, int] | None:
    """Bounding box ``(y0, x0, y1, x1)`` (ends exclusive) of decoded runs; None when empty."""
    if len(runs.starts) == 0:
        return None
    h = runs.height
    xs, ys = np.divmod(runs.starts, h)
    xe, ye = np.divmod(runs.ends - 1, h)
    x0, x1 = int(xs[0]), int(xe[-1]) + 1
    if (xs != xe).any():  # a run wraps from one column into the next
        return 0, x0, h, x1
    return int(ys.min()), x0, int(ye.max()) + 1, x1


def runs_to_crop(runs: MaskRuns, box: tuple[int, int, int, int] | None = None) -> tuple[int, int, np.ndarray]:
    """Decoded runs -> ``(y0, x0, crop)`` where crop is the bool mask inside its bounding box.

    `box` is ``mask_bbox(runs)`` when the caller has it already. An empty mask gives
    ``(0, 0, zeros((0, 0), bool))``. The crop is a Fortran-ordered view (no copy was needed).
    """
    if box is None:
        box = mask_bbox(runs)
    if box is None or len(runs.starts) == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    y0, x0, y1, x1 = box
    ch, cw = y1 - y0, x1 - x0
    h = runs.height
    # offsets inside the crop's own column-major frame; each run stays contiguous there because a
    # run that wraps columns forces the crop to full height
    xs, ys = np.divmod(runs.starts, h)
    xe, ye = np.divmod(runs.ends - 1, h)
    edges = np.empty(2 * len(xs) + 2, dtype=np.int64)
    edges[0], edges[-1] = 0, ch * cw
    edges[1:-1:2] = (xs - x0) * ch + (ys - y0)
    edges[2:-1:2] = (xe - x0) * ch + (ye - y0) + 1
    # alternating background/foreground lengths, expanded in one call
    flat = np.repeat(np.arange(len(edges) - 1) % 2 == 1, np.diff(edges))
    return y0, x0, flat.reshape(cw, ch).T


def decode_to_crop(text: str | bytes, height: int, width: int) -> tuple[int, int, np.ndarray]:
    """Mask string -> ``(y0, x0, crop)``: the mask inside its bounding box, never the full frame.

    ``decode_binary_mask(text, h, w)[y0:y0+ch, x0:x0+cw] == crop`` and the mask is empty outside.
    An empty mask gives ``(0, 0, zeros((0, 0), bool))``.
    """
    return runs_to_crop(mask_runs(text, height, width))
