"""`kit dedup` on planted duplicates: precision/recall against a baseline, and time per 10k fields.

    .venv/bin/python benchmarks/bench_dedup.py [--bases 300] [--size 256] [--seeds 0 1 2] [--scale-n 10000]

The set: `--bases` synthetic green channels (`kit.synth`, `--size` px; every third one also drawn
again with the same cells and another protein: a hard negative that shares the layout), the
real green channels in ../shared/data/hpa_real (4 Kaggle fields, 2 website JPEGs), and transformed
copies of half of them (`kit.external.dedup_eval`: crops of 80-95%, flips/rotations, re-encoded
tinted JPEGs at 0.6-0.85 size, gain/gamma changes stored 16-bit, flip+crop+JPEG). Per seed
(the planting), precision and recall at several thresholds, for `kit dedup` and, measured in the
same run on the same images, the baseline the README showed before (cosine of 32 x 32 green
thumbnails, one orientation, no verification, threshold 0.95).

Time: CPU seconds of this process (one thread). Features: per field, on the real 2048 px PNG and
website JPEG greens (decode included). Search: measured on `--scale-n` thumbnails (the planted ones
with random shifts/noise, so candidate counts are realistic), split into candidate search
(quadratic in N) and verification (linear: ~5 candidates per image); the 100k figure is an
extrapolation from the measured N, stated as such.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kit.external import dedup as dd  # noqa: E402
from kit.external import dedup_eval as ev  # noqa: E402
from kit.images import read_channel, to_float  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"


def synth_field(seed: int, size: int, labels=None):
    from kit.synth import draw_field

    return draw_field(seed, size=size, labels=labels)


def real_greens(size: int) -> list[tuple[str, np.ndarray]]:
    paths = sorted((REAL / "kaggle2021_fields" / "train").glob("*_green.png")) + \
        sorted((REAL / "website_fields").glob("*_green.jpg"))
    out = []
    for p in paths:
        g = to_float(read_channel(p))
        out.append(("real_" + p.name.split("_green")[0], cv2.resize(g, (size, size), interpolation=cv2.INTER_AREA)))
    return out


def bases(n: int, size: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for s in range(n):
        f = synth_field(10_000 + s, size)
        out.append((f"syn{s:04d}", f.image[..., 1].astype(np.float32)))
        if s % 3 == 0:  # same cells, another protein (a label the first draw does not have)
            other = next(c for c in (16, 0, 14, 6, 13, 2) if c not in f.image_labels)
            out.append((f"syn{s:04d}b", synth_field(10_000 + s, size, labels=[other]).image[..., 1].astype(np.float32)))
    return out + real_greens(size)


def baseline_pairs(items, thumbs32):
    """The README's former snippet: cosine of mean-centred 32 x 32 thumbnails, one orientation."""
    import pandas as pd

    x = thumbs32
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims, 1) >= 0.5)
    return pd.DataFrame({"ID_a": [items[i].image_id for i in a], "ID_b": [items[j].image_id for j in b],
                         "similarity": sims[a, b]})


def thumb32(green: np.ndarray) -> np.ndarray:
    t = cv2.resize(green.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA).ravel()
    t -= t.mean()
    return t / (np.linalg.norm(t) + 1e-8)


def _cpu(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def quality(args, base_set, root: Path) -> None:
    rows, false_pos = [], []
    for seed in args.seeds:
        folder = root / f"planted{seed}"
        truth = ev.plant_set(folder, base_set, seed=seed, share=0.5)
        items = dd.list_items([folder])
        thumbs, errors = dd.compute_features(items, root / f"feat{seed}")
        res = dd.find_duplicates(items, thumbs, errors, threshold=0.9)
        greens = [dd._read_green(it.path) for it in items]
        base = baseline_pairs(items, np.stack([thumb32(g) for g in greens]))
        for th in (0.8, 0.85, 0.9, 0.95):
            rows.append(("kit dedup", seed, ev.score(res.pairs, truth, th)))
        rows.append(("baseline 32px cos", seed, ev.score(base, truth, 0.95)))
        rows.append(("baseline 32px cos", seed, ev.score(base, truth, 0.9)))
        true = {frozenset((p.base, p.copy)) for p in truth}
        wrong = np.array([frozenset((a, b)) not in true for a, b in zip(res.pairs.ID_a, res.pairs.ID_b)], bool)
        fp = res.pairs[(res.pairs.similarity.to_numpy() >= 0.9) & wrong]
        false_pos += [(seed, a, b, s) for a, b, s in zip(fp.ID_a, fp.ID_b, fp.similarity)]
        n_hard = sum(1 for it in items if it.image_id.split("-")[0].endswith("b"))
        print(f"seed {seed}: {len(items)} images ({len(truth)} planted copies, {n_hard} same-layout negatives)")
    kinds = [k for k in rows[0][2] if k.startswith("recall_")]
    print(f"\n{'method':<20}{'thr':>6}{'precision':>16}{'recall':>16}" + "".join(f"{k[7:]:>14}" for k in kinds))
    for method in ("kit dedup", "baseline 32px cos"):
        for th in sorted({r[2]["threshold"] for r in rows if r[0] == method}):
            sel = [r[2] for r in rows if r[0] == method and r[2]["threshold"] == th]

            def ms(key):
                v = [s[key] for s in sel]
                return f"{statistics.mean(v):.3f}+-{statistics.pstdev(v):.3f}"

            print(f"{method:<20}{th:>6}{ms('precision'):>16}{ms('recall'):>16}" + "".join(f"{ms(k):>14}" for k in kinds))
    print(f"(mean +- spread over {len(args.seeds)} plantings)")
    same_layout = [f for f in false_pos if f[1].split("-")[0].rstrip("b") == f[2].split("-")[0].rstrip("b")]
    print(f"false positives of kit dedup at 0.9: {len(false_pos)}, of which {len(same_layout)} are same-cells/"
          f"other-protein pairs: " + "; ".join(f"{a}~{b} {s:.3f}" for _, a, b, s in false_pos[:8]))


def timing(args, base_set, root: Path) -> None:
    # features on real full-size files, decode included
    real_files = sorted((REAL / "kaggle2021_fields" / "train").glob("*_green.png"))
    jpgs = sorted((REAL / "website_fields").glob("*_green.jpg"))
    png_s = statistics.median(_cpu(lambda p=p: dd.thumbnail(dd._read_green(p)))[0] for p in real_files for _ in range(2))
    jpg_s = statistics.median(_cpu(lambda p=p: dd.thumbnail(dd._read_green(p)))[0] for p in jpgs for _ in range(3))
    full_jpg_s = statistics.median(_cpu(lambda p=p: cv2.imread(str(p), cv2.IMREAD_COLOR))[0] for p in jpgs for _ in range(3))
    print(f"\nfeatures per field (CPU s, one thread): 2048-3072 px 8-bit PNG {png_s * 1000:.0f} ms, "
          f"website JPEG {jpg_s * 1000:.1f} ms (a full-size JPEG decode alone: {full_jpg_s * 1000:.0f} ms, "
          f"ratio {full_jpg_s / jpg_s:.1f}x)")
    # search at scale: thumbnails of the planted set, shifted and noised into --scale-n distinct fields
    folder = root / f"planted{args.seeds[0]}"
    items = dd.list_items([folder])
    thumbs, _ = dd.compute_features(items, root / f"feat{args.seeds[0]}")
    rng = np.random.default_rng(0)
    n = args.scale_n
    src = thumbs[rng.integers(0, len(thumbs), n)].astype(np.float32)
    shifts = rng.integers(-20, 21, (n, 2))
    big = np.stack([np.roll(t, tuple(s), (0, 1)) for t, s in zip(src, shifts)])
    big = np.clip(big + rng.normal(0, 12, big.shape), 0, 255).astype(np.uint8)
    fake = [dd.Item("x", f"f{k}", Path("x")) for k in range(n)]
    desc = np.stack([dd.descriptor(t) for t in big]).reshape(n, -1)
    t_cand, (pi, pj, c, o) = _cpu(lambda: dd.candidate_pairs(desc, floor=0.5, top_k=5))
    keep = c >= 0.25
    m = int(keep.sum())
    sample = np.flatnonzero(keep)[:2000]
    t_ver, _ = _cpu(lambda: [dd.verify(big[pi[k]], big[pj[k]], int(o[k])) for k in sample])
    t_ver_all = t_ver / max(len(sample), 1) * m
    print(f"search over N={n} fields (measured, CPU s, one thread): candidates {t_cand:.1f} s "
          f"({m} pairs to verify, {m / n:.1f} per field), verification {t_ver_all:.1f} s "
          f"(measured on {len(sample)} pairs, {t_ver / max(len(sample), 1) * 1000:.2f} ms each)")
    feat_10k = 10_000 * png_s
    print(f"time per 10k fields at N={n}: features {feat_10k / 60:.1f} min (PNG; {10_000 * jpg_s / 60:.1f} min for website JPEGs) "
          f"+ search {(t_cand + t_ver_all) * 10_000 / n / 60:.1f} min = {(feat_10k + (t_cand + t_ver_all) * 10_000 / n) / 60:.1f} CPU-min")
    n100 = 100_000
    cand100 = t_cand * (n100 / n) ** 2
    ver100 = t_ver_all * n100 / n
    print(f"EXTRAPOLATED to 100k fields (candidates x (100k/N)^2, verification x 100k/N): candidates "
          f"{cand100 / 60:.0f} CPU-min, verification {ver100 / 60:.0f} CPU-min, features {n100 * png_s / 3600:.1f} CPU-h "
          f"(PNG) / {n100 * jpg_s / 3600:.2f} CPU-h (JPEG): per 10k fields {(cand100 + ver100) / 10 / 60:.1f} CPU-min of search")
    print(f"memory: descriptors {n100 * 256 * 4 / 2**20:.0f} MB and thumbnails {n100 * 64 * 64 / 2**20:.0f} MB at 100k; "
          f"the search block is 512 x 8 x 8192 float32 = {512 * 8 * 8192 * 4 / 2**20:.0f} MB whatever N is")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale-n", type=int, default=10_000)
    args = parser.parse_args()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"load average {load:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench_dedup_") as tmp:
        root = Path(tmp)
        t = time.time()
        base_set = bases(args.bases, args.size)
        print(f"{len(base_set)} base fields drawn in {time.time() - t:.0f} s")
        quality(args, base_set, root)
        timing(args, base_set, root)


if __name__ == "__main__":
    main()
