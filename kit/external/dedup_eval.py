"""Planted duplicates: a synthetic set with known duplicate pairs, and the precision/recall of `kit dedup`.

`plant_set(out, bases, seed)` writes each base green channel as ``<ID>_green.png`` and, for a share
of them, a transformed copy (the kinds below), and returns the truth: which copy came from which
base by which transform. `score(pairs, truth, threshold)` counts the verified pairs at a threshold
against it: precision over the predicted pairs, recall per kind.

Kinds (what separated copies of one field look like in the wild):

- ``crop``: a window of 80-95% of the side at a random offset, scaled back to the full size;
- ``d4``: one of the 7 non-identity flips/rotations;
- ``reencode``: a tinted JPEG (quality 55-85) at another size (0.6-0.85 of the side), as the HPA
  website serves them;
- ``intensity``: gain 0.4-1.6 and gamma 0.6-1.5, stored 16-bit;
- ``combo``: a flip/rotation, then a 90% crop, then JPEG.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.external.dedup import d4

KINDS = ("crop", "d4", "reencode", "intensity", "combo")


@dataclass(frozen=True)
class Planted:
    base: str
    copy: str
    kind: str


def _crop(rng, g: np.ndarray, lo: float = 0.8, hi: float = 0.95) -> np.ndarray:
    import cv2

    h, w = g.shape
    u = rng.uniform(lo, hi)
    ch, cw = int(h * u), int(w * u)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return cv2.resize(g[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _jpeg(rng, g: np.ndarray) -> bytes:
    import cv2

    side = int(g.shape[0] * rng.uniform(0.6, 0.85))
    small = cv2.resize(g, (side, side), interpolation=cv2.INTER_AREA)
    u8 = np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)
    tinted = np.stack([np.zeros_like(u8), u8, np.zeros_like(u8)], axis=-1)  # BGR: green only
    ok, buf = cv2.imencode(".jpg", tinted, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(55, 86))])
    assert ok
    return buf.tobytes()


def _write_png(path: Path, g: np.ndarray, bits: int = 8) -> None:
    import cv2

    full = 255.0 if bits == 8 else 65535.0
    arr = np.clip(g * full + 0.5, 0, full).astype(np.uint8 if bits == 8 else np.uint16)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"cannot write {path}")


def plant_set(out: str | Path, bases: Sequence[tuple[str, np.ndarray]], seed: int = 0,
              share: float = 0.5, kinds: Sequence[str] = KINDS) -> list[Planted]:
    """Write bases (ID, float green in [0, 1]) and transformed copies of a `share` of them into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    truth: list[Planted] = []
    n_copies = int(round(share * len(bases)))
    chosen = set(rng.choice(len(bases), size=n_copies, replace=False).tolist()) if n_copies else set()
    for k, (image_id, g) in enumerate(bases):
        _write_png(out / f"{image_id}_green.png", g)
        if k not in chosen:
            continue
        kind = kinds[len(truth) % len(kinds)]
        copy_id = f"{image_id}-{kind}"
        if kind == "crop":
            _write_png(out / f"{copy_id}_green.png", _crop(rng, g))
        elif kind == "d4":
            _write_png(out / f"{copy_id}_green.png", np.ascontiguousarray(d4(g, int(rng.integers(1, 8)))))
        elif kind == "reencode":
            (out / f"{copy_id}_green.jpg").write_bytes(_jpeg(rng, g))
        elif kind == "intensity":
            gain, gamma = rng.uniform(0.4, 1.6), rng.uniform(0.6, 1.5)
            _write_png(out / f"{copy_id}_green.png", np.clip(gain * g, 0, 1) ** gamma, bits=16)
        elif kind == "combo":
            t = _crop(rng, np.ascontiguousarray(d4(g, int(rng.integers(1, 8)))), 0.88, 0.92)
            (out / f"{copy_id}_green.jpg").write_bytes(_jpeg(rng, t))
        else:
            raise ValueError(f"unknown kind {kind!r}")
        truth.append(Planted(image_id, copy_id, kind))
    return truth


def score(pairs, truth: Sequence[Planted], threshold: float) -> dict:
    """Precision of the pairs >= threshold and recall per kind, against the planted truth."""
    true = {frozenset((p.base, p.copy)) for p in truth}
    pred = {frozenset((a, b)) for a, b, s in zip(pairs.ID_a, pairs.ID_b, pairs.similarity) if s >= threshold}
    tp = len(pred & true)
    out = {"threshold": threshold, "predicted": len(pred), "true": len(true), "tp": tp,
           "precision": tp / len(pred) if pred else 1.0, "recall": tp / len(true) if true else 1.0}
    for kind in sorted({p.kind for p in truth}):
        ks = [p for p in truth if p.kind == kind]
        out[f"recall_{kind}"] = sum(frozenset((p.base, p.copy)) in pred for p in ks) / len(ks)
    return out
