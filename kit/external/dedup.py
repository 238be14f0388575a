"""Near-duplicate fields across folders: groups for folds, and test leaks dropped from training.

    python -m kit dedup --images DIR [DIR ...] --out groups.csv [--threshold T] [--exclude-test DIR]
                        [--workers N] [--shard I/N] [--pairs-png K]

About 400 public-test images of 2021 were duplicates of train or public HPA images; the same field
also appears twice among the public images (other sizes, encodings, crops). Duplicates must share a
fold (or validation leaks), and a training image that duplicates a test image must go.

Method (two stages, both on the protein channel, green):

1. Features, once per image, cached: the green channel is read (JPEGs decoded at 1/2-1/8 scale in
   the DCT, which is what makes 100k fields cheap), log-scaled (``log1p(255 x)``: intensity and
   gamma changes become near-offsets) and shrunk to a 64 x 64 thumbnail (uint8 after per-image
   min/max) and a 16 x 16 descriptor (zero mean, unit norm: cosine = correlation).
2. Candidates: a blocked similarity search over every pair, cosine of the descriptors maximised
   over the 8 flips/rotations (D4) of one side. Blocks of ``--block`` query rows x 8 x 8192 keep
   memory at ~200 MB whatever N is; every pair with cosine >= ``--candidate`` (0.5) and each image's
   5 nearest are kept, with the orientation that won.
3. Verification of each candidate at 64 px: the central 80% of one thumbnail, in that orientation
   and shrunk by 1.0, 0.9, 0.8 and 0.7 (a crop of the other image is a zoomed view), is searched
   over the other thumbnail (normalised cross-correlation, ``cv2.matchTemplate``), both ways; the
   best correlation is the pair's similarity. Pairs >= ``--threshold`` (default 0.9) are duplicates;
   connected components of those pairs are the groups (`kit.folds.groups_from_pairs`).

Outputs (beside ``--out``):

- ``groups.csv``: ``ID,group,folder,group_size,is_test,drop``: every image in a group of two or
  more (pass it to ``kit folds --groups groups.csv``: unlisted images are groups of their own).
  ``drop`` is 1 for a non-test image in a group that holds a test image (``--exclude-test``).
- ``<stem>.pairs.csv``: ``ID_a,folder_a,ID_b,folder_b,similarity,coarse,transform`` of every
  verified candidate (duplicates and the near misses below the threshold, to tune it).
- ``<stem>.report.txt``: images per folder, pairs, groups, drops, a similarity histogram, and the
  PNGs written: ``<stem>_pairs/`` holds the ``--pairs-png`` most similar pairs and as many pairs
  closest to the threshold (both sides), each the two green thumbnails side by side, for a person
  to check.
- ``<stem>.features/``: the feature cache, one file per chunk of 1000 images (named by a hash of
  the chunk's files, sizes and mtimes), so an interrupted run resumes and ``--shard I/N`` array
  jobs can compute disjoint chunks into one shared folder before one final search.

Measured precision/recall and time per 10k fields: ``benchmarks/bench_dedup.py``.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, DataError

THUMB = 64          # verification thumbnail side
DESC = 16           # descriptor side (DESC**2 dimensions)
CHUNK = 1000        # images per feature-cache file
SCALES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
CENTRE = 0.8        # share of the (shrunk) thumbnail used as the template
D4_NAMES = ("identity", "rot90", "rot180", "rot270", "flip", "flip+rot90", "flip+rot180", "flip+rot270")
FEATURE_VERSION = 1


# ----------------------------------------------------------------------------------- features


def d4(img: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips/rotations (0 = identity; 4..7 = left-right flip, then rotations)."""
    out = np.fliplr(img) if k >= 4 else img
    return np.rot90(out, k % 4)


def _read_green(path: Path) -> np.ndarray:
    """The green channel as float32 in [0, 1]; JPEGs are decoded at a reduced scale (fast)."""
    import cv2

    from kit.images import ImageReadError, read_channel, to_float

    if path.suffix.lower() in (".jpg", ".jpeg"):
        data = np.fromfile(path, dtype=np.uint8)
        img = None
        # Luma only (a tinted channel's signal is proportional to it, and it is stored at full
        # resolution, unlike chroma), at 1/8 scale in the DCT when the file is large: ~10x faster.
        for mode in (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_GRAYSCALE):
            img = cv2.imdecode(data, mode)
            if img is None or min(img.shape[:2]) >= 2 * THUMB:
                break
        if img is None:
            raise ImageReadError(f"unreadable or truncated image file: {path}")
        return img.astype(np.float32) / 255.0
    return to_float(read_channel(path))


def thumbnail(green: np.ndarray) -> np.ndarray:
    """A float green channel in [0, 1] -> THUMB x THUMB uint8 thumbnail of log intensity."""
    import cv2

    g = np.log1p(255.0 * np.clip(green, 0.0, 1.0)).astype(np.float32)
    # the blur (1 px at 64) takes out what re-encoding and resizing change: JPEG blocks, aliasing
    t = cv2.GaussianBlur(cv2.resize(g, (THUMB, THUMB), interpolation=cv2.INTER_AREA), (0, 0), 1.0)
    lo, hi = float(t.min()), float(t.max())
    if hi - lo < 1e-6:
        return np.zeros((THUMB, THUMB), np.uint8)
    return np.round((t - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def descriptor(thumb: np.ndarray) -> np.ndarray:
    """THUMB x THUMB thumbnail -> DESC x DESC float32, zero mean, unit norm (all zeros when flat)."""
    import cv2

    d = cv2.resize(thumb.astype(np.float32), (DESC, DESC), interpolation=cv2.INTER_AREA)
    d -= d.mean()
    n = float(np.linalg.norm(d))
    return (d / n if n > 1e-6 else np.zeros_like(d)).astype(np.float32)


@dataclass(frozen=True)
class Item:
    """One image: its folder, ID and green file."""

    folder: str
    image_id: str
    path: Path
    is_test: bool = False


def list_items(folders: Sequence[str | Path], test_folders: Sequence[str | Path] = ()) -> list[Item]:
    """Every image of the folders with a green channel file, sorted by folder then ID."""
    from kit.layout import scan_split

    items: list[Item] = []
    seen: set[Path] = set()
    for folders_, is_test in ((folders, False), (test_folders, True)):
        for folder in folders_:
            folder = Path(folder)
            if not folder.is_dir():
                raise DataError(f"image folder not found: {folder}")
            if folder.resolve() in seen:
                raise ConfigError(f"{folder} is given twice (as --images and --exclude-test?)")
            seen.add(folder.resolve())
            samples = scan_split(folder).samples
            items += [Item(str(folder), i, ch["green"][0], is_test) for i, ch in sorted(samples.items()) if "green" in ch]
    return items


def _chunk_key(chunk: Sequence[Item]) -> str:
    h = hashlib.sha1(f"kit-dedup-features/{FEATURE_VERSION}/{THUMB}/{DESC}".encode())
    for it in chunk:
        st = it.path.stat()
        h.update(f"{it.path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _features_job(job: tuple) -> tuple[str, list[str], np.ndarray, list[str]]:
    """Worker: thumbnails of one chunk -> (key, ids, thumbs, errors)."""
    key, paths = job
    thumbs = np.zeros((len(paths), THUMB, THUMB), np.uint8)
    errors = [""] * len(paths)
    for k, p in enumerate(paths):
        try:
            thumbs[k] = thumbnail(_read_green(Path(p)))
        except DataError as exc:
            errors[k] = str(exc)
    return key, paths, thumbs, errors


def compute_features(items: Sequence[Item], cache_dir: str | Path, *, workers: int = 1, shard=None,
                     progress: bool = False) -> tuple[np.ndarray, list[str]] | None:
    """Thumbnails of every item (N x THUMB x THUMB uint8) and per-item read errors ('' if fine).

    Chunks already in `cache_dir` are read, missing ones computed (in `workers` spawn processes)
    and written. With `shard` ``I/N`` only chunks k with ``k % N == I`` are computed and None is
    returned (an array job's part; the final run without a shard reads them all).
    """
    from kit.segment.cache import parse_shard
    from kit.workers import pool_map

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    chunks = [list(items[s:s + CHUNK]) for s in range(0, len(items), CHUNK)]
    keys = [_chunk_key(c) for c in chunks]
    sh = parse_shard(shard)
    todo = [(keys[k], [str(it.path) for it in c]) for k, c in enumerate(chunks)
            if not (cache_dir / f"{keys[k]}.npz").is_file() and (sh is None or k % sh[1] == sh[0])]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(p) for _, p in todo), desc="dedup features", unit="img", file=sys.stderr)
    for key, paths, thumbs, errors in pool_map(_features_job, todo, workers, ordered=False):
        with atomic_path(cache_dir / f"{key}.npz") as tmp:
            np.savez(tmp, thumbs=thumbs, paths=np.array(paths), errors=np.array(errors))
        if bar is not None:
            bar.update(len(paths))
    if bar is not None:
        bar.close()
    if sh is not None:
        return None
    thumbs = np.zeros((len(items), THUMB, THUMB), np.uint8)
    errors: list[str] = []
    for k, c in enumerate(chunks):
        path = cache_dir / f"{keys[k]}.npz"
        try:
            with np.load(path, allow_pickle=False) as z:
                thumbs[k * CHUNK:k * CHUNK + len(c)] = z["thumbs"]
                errors += [str(e) for e in z["errors"]]
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"damaged dedup feature file {path}: {exc}; delete it and rerun") from exc
    return thumbs, errors


# ------------------------------------------------------------------------------------- search


def candidate_pairs(desc: np.ndarray, *, floor: float = 0.5, top_k: int = 5, block: int = 512,
                    db_block: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Blocked all-pairs search: (i, j, cosine, orientation) with i < j, cosine maximised over D4.

    Keeps every pair with cosine >= `floor` and, for each image, its `top_k` nearest others.
    Memory: a `block` x 8 x `db_block` float32 matrix (~134 MB at the defaults), whatever N is.
    """
    n, dim = desc.shape
    side = int(round(math.sqrt(dim)))
    grids = desc.reshape(n, side, side)
    top_val = np.full((n, top_k), -np.inf, np.float32)
    top_idx = np.full((n, top_k), -1, np.int64)
    top_ori = np.zeros((n, top_k), np.int8)
    keep_i, keep_j, keep_s, keep_o = [], [], [], []

    def push(rows, vals, idx, ori):
        """Merge candidate neighbours (rows x m) into the per-row top-k."""
        allv = np.concatenate([top_val[rows], vals], axis=1)
        alli = np.concatenate([top_idx[rows], idx], axis=1)
        allo = np.concatenate([top_ori[rows], ori], axis=1)
        sel = np.argsort(-allv, axis=1, kind="stable")[:, :top_k]
        top_val[rows] = np.take_along_axis(allv, sel, 1)
        top_idx[rows] = np.take_along_axis(alli, sel, 1)
        top_ori[rows] = np.take_along_axis(allo, sel, 1)

    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        variants = np.stack([np.ascontiguousarray(d4(g, k)) for g in grids[q0:q1] for k in range(8)])
        variants = variants.reshape(q1 - q0, 8, dim)
        flat = variants.reshape(-1, dim)
        for d0 in range(q0, n, db_block):
            d1 = min(n, d0 + db_block)
            sims = (flat @ desc[d0:d1].T).reshape(q1 - q0, 8, d1 - d0)
            ori = sims.argmax(axis=1).astype(np.int8)
            best = np.take_along_axis(sims, ori[:, None, :].astype(np.int64), 1)[:, 0, :]
            rows = np.arange(q0, q1)[:, None]
            cols = np.arange(d0, d1)[None, :]
            best = np.where(cols > rows, best, -np.inf)  # each unordered pair once, never i == i
            a, b = np.nonzero(best >= floor)
            keep_i.append(a + q0)
            keep_j.append(b + d0)
            keep_s.append(best[a, b])
            keep_o.append(ori[a, b])
            m = min(top_k, d1 - d0)
            part = np.argpartition(-best, m - 1, axis=1)[:, :m]
            push(np.arange(q0, q1), np.take_along_axis(best, part, 1),
                 part + d0, np.take_along_axis(ori, part, 1))
            # the same pairs seen from the database side (the orientation then inverts; we
            # record the query side's, and verification tries the pair in both directions)
            m0 = min(top_k, q1 - q0)
            part0 = np.argpartition(-best, m0 - 1, axis=0)[:m0, :]
            push(np.arange(d0, d1), np.take_along_axis(best, part0, 0).T,
                 (part0 + q0).T, np.take_along_axis(ori, part0, 0).T)
    rows = np.repeat(np.arange(n), top_k)
    ok = np.isfinite(top_val.ravel()) & (top_idx.ravel() >= 0)
    ti, tj = rows[ok], top_idx.ravel()[ok]
    # orientation from the top-k side is relative to whichever was the query: re-derive below
    i = np.concatenate(keep_i + [np.minimum(ti, tj)]) if keep_i else np.minimum(ti, tj)
    j = np.concatenate(keep_j + [np.maximum(ti, tj)]) if keep_j else np.maximum(ti, tj)
    pairs = np.unique(np.stack([i, j], axis=1), axis=0) if len(i) else np.zeros((0, 2), np.int64)
    if not len(pairs):
        return (np.zeros(0, np.int64),) * 2 + (np.zeros(0, np.float32), np.zeros(0, np.int8))
    pi, pj = pairs[:, 0], pairs[:, 1]
    # exact cosine and orientation of each kept pair (cheap: O(pairs x 8 x dim))
    vi = np.stack([np.stack([d4(grids[a], k).ravel() for k in range(8)]) for a in pi])
    sims = np.einsum("pkd,pd->pk", vi, desc[pj])
    ori = sims.argmax(axis=1).astype(np.int8)
    return pi, pj, sims.max(axis=1).astype(np.float32), ori


def verify(thumb_a: np.ndarray, thumb_b: np.ndarray, orientation: int) -> tuple[float, float]:
    """(best normalised cross-correlation, scale) of two thumbnails, the first in `orientation`.

    The centre of one side, shrunk by each of SCALES, is searched over the other side, both ways.
    """
    import cv2

    a = np.ascontiguousarray(d4(thumb_a, orientation)).astype(np.float32)
    b = thumb_b.astype(np.float32)
    scores: dict[tuple[int, float], float] = {}

    def at(direction: int, s: float) -> float:
        if (direction, s) not in scores:
            src, dst = (a, b) if direction == 0 else (b, a)
            side = max(8, int(round(THUMB * s)))
            shrunk = cv2.resize(src, (side, side), interpolation=cv2.INTER_AREA) if side != THUMB else src
            m = max(8, int(round(side * CENTRE)))
            o = (side - m) // 2
            tmpl = np.ascontiguousarray(shrunk[o:o + m, o:o + m])
            flat = int(tmpl.max()) - int(tmpl.min()) < 1  # a flat template has no correlation
            scores[(direction, s)] = -1.0 if flat else float(cv2.matchTemplate(dst, tmpl, cv2.TM_CCOEFF_NORMED).max())
        return scores[(direction, s)]

    # coarse to fine: every other scale first, then the neighbours of the best one
    for direction in (0, 1):
        for s in SCALES[::2]:
            at(direction, s)
    d, s = max(scores, key=scores.get)
    k = SCALES.index(s)
    for nb in (k - 1, k + 1):
        if 0 <= nb < len(SCALES):
            at(d, SCALES[nb])
    d, s = max(scores, key=scores.get)
    return scores[(d, s)], s


def _verify_chunk(job: tuple) -> list[tuple[float, float]]:
    """Worker: `verify` over aligned arrays of thumbnails and orientations."""
    ta, tb, ori = job
    return [verify(a, b, int(o)) for a, b, o in zip(ta, tb, ori)]


@dataclass
class DedupResult:
    items: list[Item]
    pairs: "object"   # DataFrame of verified candidates
    groups: "object"  # DataFrame ID,group,folder,group_size,is_test,drop
    errors: list[str]
    thumbs: np.ndarray


def find_duplicates(items: Sequence[Item], thumbs: np.ndarray, errors: Sequence[str] | None = None, *,
                    threshold: float = 0.9, candidate: float = 0.5, top_k: int = 5, block: int = 512,
                    workers: int = 1) -> DedupResult:
    """Candidates, verification (in `workers` processes) and groups for images whose thumbnails are given."""
    import pandas as pd

    from kit.folds import groups_from_pairs
    from kit.workers import pool_map

    errors = list(errors) if errors is not None else [""] * len(items)
    usable = np.array([not e for e in errors], bool)
    desc = np.stack([descriptor(t) for t in thumbs]).reshape(len(items), -1) if len(items) else np.zeros((0, DESC * DESC))
    desc[~usable] = 0.0  # an unreadable image matches nothing
    pi, pj, coarse, ori = candidate_pairs(desc.astype(np.float32), floor=candidate, top_k=top_k, block=block)
    # a nearest neighbour this far below the candidate cosine is no duplicate of any kind planted
    keep = usable[pi] & usable[pj] & (coarse >= min(candidate, 0.25))
    pi, pj, coarse, ori = pi[keep], pj[keep], coarse[keep], ori[keep]
    jobs = [(thumbs[pi[s:s + 2000]], thumbs[pj[s:s + 2000]], ori[s:s + 2000]) for s in range(0, len(pi), 2000)]
    verified = [r for chunk in pool_map(_verify_chunk, jobs, workers) for r in chunk]
    rows = []
    for a, b, c, o, (sim, scale) in zip(pi, pj, coarse, ori, verified):
        rows.append((items[a].image_id, items[a].folder, items[b].image_id, items[b].folder, round(sim, 5),
                     round(float(c), 5), D4_NAMES[int(o)] + (f", scale {scale:g}" if scale != 1.0 else "")))
    pairs = pd.DataFrame(rows, columns=["ID_a", "folder_a", "ID_b", "folder_b", "similarity", "coarse", "transform"])
    pairs = pairs.sort_values("similarity", ascending=False, kind="stable").reset_index(drop=True)
    key = {(it.folder, it.image_id): it for it in items}
    dup = pairs[pairs.similarity >= threshold]
    edges = [(f"{fa}\0{a}", f"{fb}\0{b}") for a, fa, b, fb in zip(dup.ID_a, dup.folder_a, dup.ID_b, dup.folder_b)]
    comp = groups_from_pairs(edges)
    out = []
    if len(comp):
        comp["folder"], comp["image_id"] = zip(*(k.split("\0", 1) for k in comp["ID"]))
        comp["group_key"] = comp["group"].map(lambda g: g.split("\0", 1)[1])
        sizes = comp.groupby("group").ID.transform("size")
        has_test = comp.groupby("group").ID.transform(lambda ks: any(key[tuple(k.split("\0", 1))].is_test for k in ks))
        for k, g, size, t in zip(comp["ID"], comp["group_key"], sizes, has_test):
            folder, image_id = k.split("\0", 1)
            it = key[(folder, image_id)]
            out.append((image_id, g, folder, int(size), int(it.is_test), int(bool(t) and not it.is_test)))
    groups = pd.DataFrame(out, columns=["ID", "group", "folder", "group_size", "is_test", "drop"])
    groups = groups.sort_values(["group", "ID", "folder"], kind="stable").reset_index(drop=True)
    return DedupResult(list(items), pairs, groups, errors, thumbs)


# ------------------------------------------------------------------------------------- report


def side_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {"pairs": Path(f"{stem}.pairs.csv"), "report": Path(f"{stem}.report.txt"),
            "png": Path(f"{stem}_pairs"), "features": Path(f"{stem}.features")}


def _pair_png(path: Path, ta: np.ndarray, tb: np.ndarray, lines: Sequence[str]) -> None:
    """The two thumbnails side by side (the first in the orientation that matched), a caption above."""
    import cv2

    big, head = 256, 16 * len(lines) + 8
    a = cv2.resize(ta, (big, big), interpolation=cv2.INTER_NEAREST)
    b = cv2.resize(tb, (big, big), interpolation=cv2.INTER_NEAREST)
    canvas = np.full((big + head, 2 * big + 8), 255, np.uint8)
    canvas[head:, :big] = a
    canvas[head:, big + 8:] = b
    for k, line in enumerate(lines):
        cv2.putText(canvas, line[:90], (4, 14 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), canvas)


def write_outputs(result: DedupResult, out: Path, threshold: float, n_png: int = 12) -> str:
    """Write groups.csv, the pairs, the side-by-side PNGs and the report; returns the report text."""
    paths = side_paths(out)
    with atomic_open(out, "w", newline="", encoding="utf-8") as f:
        result.groups.to_csv(f, index=False, lineterminator="\n")
    with atomic_open(paths["pairs"], "w", newline="", encoding="utf-8") as f:
        result.pairs.to_csv(f, index=False, lineterminator="\n")
    index = {(it.folder, it.image_id): k for k, it in enumerate(result.items)}
    pairs = result.pairs
    chosen = list(range(min(n_png, len(pairs))))
    if len(pairs):
        near = np.argsort(np.abs(pairs.similarity.to_numpy() - threshold), kind="stable")
        chosen += [int(k) for k in near if int(k) not in chosen][:n_png]
    png_dir = paths["png"]
    if png_dir.is_dir():
        for old in png_dir.glob("*.png"):
            old.unlink()
    written = []
    for rank, k in enumerate(sorted(chosen, key=lambda k: -pairs.similarity.iloc[k])):
        r = pairs.iloc[k]
        orientation = D4_NAMES.index(r["transform"].split(",")[0])
        ta = np.ascontiguousarray(d4(result.thumbs[index[(r.folder_a, r.ID_a)]], orientation))
        tb = result.thumbs[index[(r.folder_b, r.ID_b)]]
        tag = "dup" if r.similarity >= threshold else "not"
        name = f"{rank:03d}_{r.similarity:.3f}_{tag}_{r.ID_a}__{r.ID_b}.png"
        _pair_png(png_dir / name, ta, tb, [f"similarity {r.similarity:.3f} ({'duplicate' if tag == 'dup' else 'below'} "
                                           f"{threshold}); left {r['transform']}", f"{r.ID_a}  |  {r.ID_b}"])
        written.append(name)
    text = format_report(result, threshold, out, written)
    with atomic_open(paths["report"], "w", encoding="utf-8") as f:
        f.write(text)
    return text


def format_report(result: DedupResult, threshold: float, out: Path, pngs: Sequence[str]) -> str:
    from collections import Counter

    folders = Counter((it.folder, it.is_test) for it in result.items)
    g = result.groups
    dup = result.pairs[result.pairs.similarity >= threshold]
    lines = [f"dedup: {len(result.items)} images, threshold {threshold}"]
    for (folder, is_test), n in folders.items():
        lines.append(f"  {folder}: {n} images{' (test)' if is_test else ''}")
    n_err = sum(bool(e) for e in result.errors)
    if n_err:
        first = next(e for e in result.errors if e)
        lines.append(f"  {n_err} images could not be read and match nothing (e.g. {first})")
    lines.append(f"{len(result.pairs)} candidate pairs verified, {len(dup)} duplicates (similarity >= {threshold})")
    sizes = g.drop_duplicates("group").group_size if len(g) else []
    lines.append(f"{g.group.nunique() if len(g) else 0} groups holding {len(g)} images"
                 + (f"; largest {int(max(sizes))}" if len(g) else ""))
    if len(g) and g.is_test.any():
        lines.append(f"{int(g['drop'].sum())} training images duplicate a test image: drop=1 in {out.name} "
                     f"(`kit external table --dedup {out.name}` leaves them out)")
    edges = [0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0001]
    hist = np.histogram(result.pairs.similarity.to_numpy(), bins=edges)[0] if len(result.pairs) else [0] * 8
    lines.append("similarity of verified candidates: " + ", ".join(
        f"[{a:g},{min(b, 1):g}{']' if b > 1 else ')'} {n}" for a, b, n in zip(edges[:-1], edges[1:], hist)))
    if pngs:
        lines.append(f"side-by-side PNGs (most similar, and closest to the threshold) in {side_paths(out)['png']}:")
        lines += [f"  {p}" for p in pngs]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ command


def configure_dedup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", nargs="+", required=True, type=Path, help="image folders (train, external, ...)")
    parser.add_argument("--out", required=True, type=Path, help="groups.csv to write")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="verified similarity for a duplicate (default 0.9; see the report's near misses)")
    parser.add_argument("--exclude-test", nargs="*", default=[], type=Path, metavar="DIR",
                        help="test image folders: training images that duplicate one get drop=1")
    parser.add_argument("--candidate", type=float, default=0.5, help="coarse cosine that makes a candidate (0.5)")
    parser.add_argument("--workers", type=int, default=1, help="processes for features and verification (default 1)")
    parser.add_argument("--shard", default=None,
                        help="I/N: compute only this shard's feature chunks into the shared cache, then stop")
    parser.add_argument("--features", type=Path, help="feature cache folder (default <out stem>.features)")
    parser.add_argument("--pairs-png", type=int, default=12, help="PNGs of the most similar / borderline pairs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run_dedup)


def _run_dedup(args: argparse.Namespace) -> int:
    if not 0.0 < args.threshold <= 1.0:
        raise ConfigError(f"--threshold {args.threshold}: must be in (0, 1]")
    if args.out.suffix != ".csv":
        raise ConfigError(f"--out {args.out}: must end in .csv")
    t0 = time.time()
    items = list_items(args.images, args.exclude_test)
    if not items:
        raise DataError("no <ID>_green.<ext> files in " + ", ".join(map(str, args.images + args.exclude_test)))
    cache = args.features or side_paths(args.out)["features"]
    feats = compute_features(items, cache, workers=args.workers, shard=args.shard, progress=not args.quiet)
    t_feat = time.time() - t0
    if feats is None:
        print(f"shard {args.shard}: features of {len(items)} images' chunks written to {cache} ({t_feat:.1f} s); "
              f"run without --shard to search")
        return 0
    thumbs, errors = feats
    result = find_duplicates(items, thumbs, errors, threshold=args.threshold, candidate=args.candidate,
                             workers=args.workers)
    text = write_outputs(result, args.out, args.threshold, args.pairs_png)
    print(text, end="")
    print(f"wrote {args.out}, {side_paths(args.out)['pairs']}, {side_paths(args.out)['report']} "
          f"(features {t_feat:.1f} s, search {time.time() - t0 - t_feat:.1f} s)")
    return 0
