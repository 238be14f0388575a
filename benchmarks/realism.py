"""Realism of `kit synth`: the same measurements on real HPA fields and on synthetic ones.

    .venv/bin/python benchmarks/realism.py                          # real fields vs 8 default fields at 2048 px
    .venv/bin/python benchmarks/realism.py --styles default hard --n 8 --markdown
    .venv/bin/python benchmarks/realism.py --per-field              # one row per field as well

Real fields (`../shared/data/hpa_real/`): the four Kaggle 2021 train fields with their HPA Cell
Segmentator masks (`kaggle2021_fields/`), the two website fields (tinted JPEG, no masks: only the
mask-free figures) and the cells-per-image column of the real train table (21,806 images).
Synthetic fields: `kit.synth.draw_field` at `--size` (default 2048), seeds 0..n-1, per style.

Every figure is measured the same way on both sides, from the image and a cell mask only: the
nucleus of a cell is its blue pixels above the field's Otsu threshold (largest piece), because the
real fields have no nucleus masks (for synthetic fields the truth nuclei give nearly the same
areas; see `--per-field`). Areas are in pixels of the microscope (the 2048 px resolution), shape
and texture figures are medians over the interior cells (not touching the border). What each
column means:

* cells: cells per field (real table: median and 10-90% range of the segmented cells per image)
* cell px, nucleus px, n/c: median cell area, nucleus area, and per-cell nucleus/cell area ratio
* cover: share of the field covered by cells
* solidity: area / convex-hull area (1 = convex; real cells have concave borders and protrusions)
* p50 / p99 of a channel: intensity percentiles over the whole field in 8-bit units; zero: share
  of exact zeros (the dark level the camera subtracts)
* g-corr 1/8: correlation of the green channel with itself shifted by 1 and 8 px, inside cells;
  g-fine 1/3: the same for its fine part (green minus its 4 px blur) at 1 and 3 px: how smooth
  the stain is at the pixel scale (pixel noise brings it towards 0)
* red tex: band-pass contrast of the red channel in cells, std of (1.5 px blur - 10 px blur) / mean
  (filaments against dark gaps)
* nuc tex: nuclear texture, the same band-pass contrast of blue inside eroded nuclei (chromatin
  grain and nucleoli, not pixel noise)
* noise: robust pixel noise in cells, 1.48 MAD(x - median3x3(x)) / median(x), red channel
* cell CV: spread of the mean green between the interior cells of a field (std / mean)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"
CHANNELS = ("red", "green", "blue", "yellow")
REF = 2048  # areas are reported in px of a 2048 px field at the microscope's resolution


def _u8(image: np.ndarray) -> np.ndarray:
    """H x W x 4 in 8-bit units as float32 (16-bit images scaled by 255/65535)."""
    x = image.astype(np.float32)
    return x * np.float32(255.0 / 65535.0) if image.dtype == np.uint16 else x


def _nuclei_from_blue(blue: np.ndarray, cells: np.ndarray, scale: float) -> np.ndarray:
    """Nucleus label image: blue above the field's Otsu threshold, the largest piece per cell."""
    sm = cv2.GaussianBlur(blue, (0, 0), max(0.7, 2.0 / scale))
    b8 = np.clip(sm, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(b8[cells > 0] if (cells > 0).any() else b8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (sm > t) & (cells > 0)
    out = np.zeros(cells.shape, np.int32)
    n, comp, st, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    if n <= 1:
        return out
    # each component belongs to the cell holding most of it; keep the largest per cell
    owner = np.zeros(n, np.int64)
    flat_c, flat_l = comp.ravel(), cells.ravel()
    sel = flat_c > 0
    pairs = np.bincount(flat_c[sel].astype(np.int64) * (int(cells.max()) + 1) + flat_l[sel],
                        minlength=n * (int(cells.max()) + 1)).reshape(n, -1)
    owner = pairs.argmax(axis=1)
    best: dict[int, tuple[int, int]] = {}
    for i in range(1, n):
        k = int(owner[i])
        if k and (k not in best or st[i, cv2.CC_STAT_AREA] > best[k][1]):
            best[k] = (i, int(st[i, cv2.CC_STAT_AREA]))
    lut = np.zeros(n, np.int32)
    for k, (i, _) in best.items():
        lut[i] = k
    out = lut[comp]
    out[cells != out] = 0
    return out


def _corr(x: np.ndarray, mask: np.ndarray, d: int) -> float:
    a, b = x[:, :-d], x[:, d:]
    m = mask[:, :-d] & mask[:, d:]
    if m.sum() < 100:
        return float("nan")
    return float(np.corrcoef(a[m], b[m])[0, 1])


def _texture(out: dict, x: np.ndarray, mask: np.ndarray, scale: float) -> None:
    """Green neighbour correlation at 1 and 8 px (raw), and of its fine part (minus a 4 px blur)
    at 1 and 3 px: how smooth the stain is at the pixel scale, apart from the pattern's layout."""
    g = x[..., 1]
    for d in (1, 8):
        out[f"gcorr{d}"] = _corr(g, mask, max(1, round(d * scale)))
    hp = g - cv2.GaussianBlur(g, (0, 0), max(0.7, 4 * scale))
    for d in (1, 3):
        out[f"ghp{d}"] = _corr(hp, mask, max(1, round(d * scale)))
    r = x[..., 0]
    bp = cv2.GaussianBlur(r, (0, 0), max(0.5, 1.5 * scale)) - cv2.GaussianBlur(r, (0, 0), max(0.7, 10 * scale))
    out["red_tex"] = float(bp[mask].std() / max(r[mask].mean(), 1e-6)) if mask.any() else float("nan")


def _solidity(mask: np.ndarray) -> float:
    cs, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not cs:
        return float("nan")
    c = max(cs, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(c))
    return float(mask.sum() / hull) if hull > 0 else float("nan")


def _med(xs) -> float:
    xs = [x for x in xs if x == x]
    return float(statistics.median(xs)) if xs else float("nan")


def field_stats(image: np.ndarray, cells: np.ndarray | None = None, field_px: int | None = None) -> dict:
    """Realism figures of one field (see the module doc).

    `image`: H x W x 4 RGBY uint8/uint16; `cells`: instance labels (None: the mask-free figures
    only, cells then being the foreground of a threshold); `field_px`: the field's side at the
    microscope's resolution (default: the image side; a downscaled synthetic field is larger).
    """
    x = _u8(image)
    H, W = x.shape[:2]
    scale = H / float(field_px or H)  # image px per microscope px
    px2 = 1.0 / (scale * scale)  # microscope px per image px
    out: dict = {"size": H, "field_px": int(field_px or H)}
    for i, ch in enumerate(CHANNELS):
        p50, p99 = np.percentile(x[..., i], [50, 99])
        out[f"{ch}_p50"], out[f"{ch}_p99"] = float(p50), float(p99)
        out[f"{ch}_zero"] = float((image[..., i] == 0).mean())
    if cells is None:  # mask-free: foreground of the summed non-green channels
        s = cv2.GaussianBlur(x[..., 0] + x[..., 2] + x[..., 3], (0, 0), max(1.0, 8 * scale))
        t, _ = cv2.threshold(np.clip(s, 0, 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        fg = s > t
        out["cover"] = float(fg.mean())
        _texture(out, x, fg, scale)
        return out
    cells = np.asarray(cells).astype(np.int32)
    nuc = _nuclei_from_blue(x[..., 2], cells, scale)
    ids = [int(k) for k in np.unique(cells) if k]
    area = np.bincount(cells.ravel(), minlength=max(ids, default=0) + 1)
    narea = np.bincount(nuc.ravel(), minlength=len(area))[: len(area)]
    border = set(np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])).tolist()) - {0}
    interior = [k for k in ids if k not in border]
    out["cells"] = len(ids)
    out["cells_2048"] = len(ids) * (REF / float(field_px or H)) ** 2
    out["cell_px"] = _med([area[k] * px2 for k in ids])
    out["cell_px_int"] = _med([area[k] * px2 for k in interior])
    out["nuc_px"] = _med([narea[k] * px2 for k in interior if narea[k]])
    out["nc_ratio"] = _med([narea[k] / area[k] for k in interior if narea[k]])
    out["cover"] = float((cells > 0).mean())
    g = x[..., 1]
    inside = cells > 0
    _texture(out, x, inside, scale)
    blue, red = x[..., 2], x[..., 0]
    # band-pass: chromatin grain and nucleoli (1.5-10 px), not pixel noise nor the nucleus' shape
    bl = cv2.GaussianBlur(blue, (0, 0), max(0.7, 10 * scale))
    bf = cv2.GaussianBlur(blue, (0, 0), max(0.5, 1.5 * scale))
    ker = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    er = cv2.erode((nuc > 0).astype(np.uint8), ker, iterations=max(1, round(3 * scale))) > 0
    sol, tex, lvl = [], [], []
    boxes = ndi.find_objects(cells)
    for k in interior:
        box = boxes[k - 1]
        m = cells[box] == k
        sol.append(_solidity(m))
        mn = er[box] & (nuc[box] == k)
        if mn.sum() > 50:
            mb = float(blue[box][mn].mean())
            if mb > 1:
                tex.append(float((bf[box][mn] - bl[box][mn]).std()) / mb)
        lvl.append(float(g[box][m].mean()))
    out["solidity"] = _med(sol)
    out["nuc_tex"] = _med(tex)
    out["cell_cv"] = float(np.std(lvl) / np.mean(lvl)) if len(lvl) > 2 and np.mean(lvl) > 0 else float("nan")
    r8 = np.clip(red, 0, 255).astype(np.uint8)
    diff = red - cv2.medianBlur(r8, 3).astype(np.float32)
    med_r = float(np.median(red[inside])) if inside.any() else 0.0
    out["noise"] = float(1.4826 * np.median(np.abs(diff[inside])) / med_r) if med_r > 0 else float("nan")
    return out


# --------------------------------------------------------------------------------------------
# sources


def real_kaggle_fields():
    """(name, image, cells) of the four Kaggle 2021 fields with the reference masks."""
    d = REAL / "kaggle2021_fields"
    for m in sorted((d / "masks").glob("*_predictedmask.png")):
        iid = m.name.split("_")[0]
        chans = [cv2.imread(str(d / "train" / f"{iid}_{c}.png"), cv2.IMREAD_UNCHANGED) for c in CHANNELS]
        yield iid[:8], np.stack(chans, -1), cv2.imread(str(m), cv2.IMREAD_UNCHANGED)


def real_website_fields():
    """(name, image) of the two website fields: tinted BGR JPEGs, yellow = red + green."""
    d = REAL / "website_fields"
    for p in sorted(d.glob("*_blue.jpg")):
        stem = p.name[: -len("_blue.jpg")]
        r = cv2.imread(str(d / f"{stem}_red.jpg"))[..., 2]
        g = cv2.imread(str(d / f"{stem}_green.jpg"))[..., 1]
        b = cv2.imread(str(d / f"{stem}_blue.jpg"))[..., 0]
        yy = cv2.imread(str(d / f"{stem}_yellow.jpg"))
        y = np.maximum(yy[..., 1], yy[..., 2])
        yield stem, np.stack([r, g, b, y], -1)


def real_table_counts() -> dict[int, list[int]]:
    """Cells per image of the real 2021 train table, by image side."""
    import pandas as pd

    t = pd.read_csv(REAL / "labels" / "hpa2021_train_4folded_cells.csv", usecols=["ImageWidth", "cells"])
    n = t["cells"].fillna("").str.split().str.len()
    return {int(w): n[t["ImageWidth"] == w].tolist() for w in sorted(t["ImageWidth"].unique())}


def synth_fields(n: int, size: int, style: str = "default", seed0: int = 0, module=None):
    """(name, image uint8, cells, field_px) of n synthetic fields (seeds seed0..); `module`: another
    version of kit.synth (see --against)."""
    if module is None:
        from kit import synth as module
    draw = getattr(module, "draw_field", None) or module.make_field
    for i in range(n):
        kw = {} if style == "default" else {"style": style}
        f = draw(np.random.default_rng([seed0 + i, 0, i]), size, **kw)
        # before v3 a field of any size was a 2048 px field drawn at that size
        yield f"{style}-{i}", module.quantise(f.image, 8), f.cells, getattr(f, "field_px", max(size, 2048))


# --------------------------------------------------------------------------------------------
# table

COLS = [("cells", "cells", "{:.0f}"), ("cell_px", "cell px", "{:,.0f}"), ("nuc_px", "nucleus px", "{:,.0f}"),
        ("nc_ratio", "n/c", "{:.2f}"), ("cover", "cover", "{:.2f}"), ("solidity", "solidity", "{:.3f}"),
        ("red_p50", "red p50", "{:.0f}"), ("red_p99", "red p99", "{:.0f}"),
        ("green_p50", "green p50", "{:.0f}"), ("green_p99", "green p99", "{:.0f}"),
        ("blue_p99", "blue p99", "{:.0f}"), ("yellow_p99", "yellow p99", "{:.0f}"),
        ("green_zero", "green zero", "{:.2f}"), ("red_zero", "red zero", "{:.2f}"),
        ("gcorr1", "g-corr 1", "{:.2f}"), ("gcorr8", "8", "{:.2f}"), ("ghp1", "g-fine 1", "{:.2f}"),
        ("ghp3", "3", "{:.2f}"), ("red_tex", "red tex", "{:.2f}"), ("nuc_tex", "nuc tex", "{:.3f}"), ("noise", "noise", "{:.3f}"), ("cell_cv", "cell CV", "{:.2f}")]


def _fmt(v, f) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


def summarise(rows: list[dict]) -> dict:
    """Median of each figure over fields; cells also as min-max."""
    out = {}
    for key, _, _ in COLS:
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]
        out[key] = float(statistics.median(vals)) if vals else float("nan")
    return out


def print_table(named: list[tuple[str, dict, str]], markdown: bool) -> None:
    heads = ["source"] + [h for _, h, _ in COLS]
    lines = []
    for name, s, cells_text in named:
        vals = [cells_text or _fmt(s.get("cells"), "{:.0f}")] + [_fmt(s.get(k), f) for k, _, f in COLS[1:]]
        lines.append([name] + vals)
    if markdown:
        print("| " + " | ".join(heads) + " |")
        print("|" + "---|" * len(heads))
        for l in lines:
            print("| " + " | ".join(l) + " |")
    else:
        w = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(heads)]
        print("  ".join(h.rjust(w[i]) for i, h in enumerate(heads)))
        for l in lines:
            print("  ".join(v.rjust(w[i]) for i, v in enumerate(l)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="synthetic fields per style (default 8)")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--styles", nargs="+", default=["default"])
    ap.add_argument("--seed", type=int, default=0, help="first seed of the synthetic fields")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table (for the README)")
    ap.add_argument("--per-field", action="store_true", help="one row per field too")
    ap.add_argument("--against", default=None, metavar="REV",
                    help="also measure the generator of this git revision (default style), e.g. main")
    args = ap.parse_args()
    cv2.setNumThreads(0)

    named = []
    if REAL.is_dir():
        counts = real_table_counts()
        for w in (2048, 3072):
            c = counts.get(w, [])
            if c:
                q = np.percentile(c, [10, 50, 90])
                named.append((f"real train table, {w} px ({len(c):,} images)", {},
                              f"{q[1]:.0f} ({q[0]:.0f}-{q[2]:.0f})"))
        real = []
        for name, image, cells in real_kaggle_fields():
            st = field_stats(image, cells)
            real.append(st)
            if args.per_field:
                named.append((f"real {name} ({image.shape[0]} px)", st, ""))
        lo, hi = min(r["cells"] for r in real), max(r["cells"] for r in real)
        named.append((f"real Kaggle fields ({len(real)}, reference masks)", summarise(real), f"{lo}-{hi}"))
        web = []
        for name, image in real_website_fields():
            st = field_stats(image)
            web.append(st)
            if args.per_field:
                named.append((f"real website {name} ({image.shape[0]} px)", st, ""))
        named.append((f"real website fields ({len(web)}, no masks)", summarise(web), "-"))
    else:
        print(f"(real data not found at {REAL}: synthetic rows only)")
    runs = [(style, None, "") for style in args.styles]
    if args.against:
        from bench_synth import _module_at

        runs.insert(0, ("default", _module_at(args.against), f" at {args.against}"))
    for style, module, rev in runs:
        rows = []
        for name, image, cells, fpx in synth_fields(args.n, args.size, style, args.seed, module):
            st = field_stats(image, cells, fpx)
            rows.append(st)
            if args.per_field:
                named.append((f"synth {name}", st, ""))
        lo, hi = min(r["cells"] for r in rows), max(r["cells"] for r in rows)
        what = f"--style {style}" if not rev else ""
        named.append((f"kit synth{rev} --size {args.size} {what}({len(rows)})", summarise(rows), f"{lo}-{hi}"))
    print("medians over fields; areas in px at the microscope's resolution (2048 px fields); see the module doc")
    print_table(named, args.markdown)


if __name__ == "__main__":
    main()
