"""An independent generator of HPA-like fields with cell truth, for evaluating segmenters only.

Written from scratch and on purpose unlike `kit.synth` (no code, shapes or renderers shared), so a
segmenter tuned on kit.synth fields, or on the few real fields we have, can be checked on cells it
has never seen:

* layout: a power diagram (Laguerre cells, weights = squared cell radii) of jittered seeds, cut
  to each cell's own irregular extent and bent by a smooth domain warp; in confluent styles the
  cells fill the field and meet along thin seams, in sparse ones they float apart. Seeds are
  also placed outside the field, so cells enter the field without their nucleus.
* nuclei: lumpy ellipses, kidney shapes and two-lobed nuclei near (not at) the cell centre,
  chromatin textured at several scales, 0-4 dark nucleoli, some with a bright rim; mitotic cells
  are rounded and bright, with a condensed metaphase plate or two anaphase plates close together.
* channels: red = filaments traced from the nucleus outward, yellow = a reticular network denser
  near the nucleus, green = one random pattern per cell; cytoplasm fades at free edges and
  dips by a random depth at seams; per-cell brightness spread, dim cells; then PSF blur, uneven
  illumination, Poisson-like and read noise, 8-bit quantisation with a field gain (dim styles use
  a small part of the range).

Truth: ``cells`` (int32, 0 = background) holds every cell whose nucleus lies in the field with at
least `MIN_NUCLEUS_VISIBLE` of its area; cells whose nucleus is cut more than that are listed in
``ignore`` (a prediction on them is neither a hit nor a false positive); cells whose nucleus lies
wholly outside the field are background (a segmenter should not invent them). ``nuclei`` holds
the visible nucleus of each truth cell with the same id.

    from benchmarks.foreign_fields import draw_field, STYLES
    field = draw_field(seed=3, style="confluent")       # dict(image, cells, nuclei, ignore, style, seed)

Styles (`STYLES`): sparse, medium, confluent, crowded, mitotic, dim, irregular, bigcells.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np

__all__ = ["STYLES", "draw_field", "score_field", "MIN_NUCLEUS_VISIBLE"]

MIN_NUCLEUS_VISIBLE = 0.5


def _read_styles(path: Path) -> dict[str, dict]:
    """The style table (foreign_styles.csv): one row per style; *_lo/*_hi columns become ranges."""
    styles = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name = row.pop("style")
            st = {}
            for key, value in row.items():
                base, _, end = key.rpartition("_")
                if end in ("lo", "hi"):
                    st.setdefault(base, [0.0, 0.0])[end == "hi"] = float(value)
                else:
                    st[key] = float(value)
            styles[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in st.items()}
    return styles


# Styles live in foreign_styles.csv. Sizes are pixels of a 2048 px HPA field (the microscope's
# pixel; 1728/3072 px fields are crops).
# r: cell radius range; cover: cell area per field area; gap: how far seeds keep apart
# (x the radii sum; < 1 makes confluent fields); mitotic: share of mitotic cells; gain: field
# brightness range (1 = full 8-bit range); reach: how far a cell may extend (x its radius; the
# power diagram splits the overlaps, so reach > gap makes cells meet); warp: outline irregularity;
# aspect: elongation range;
# seam: seam depth range (0 = invisible contact); dim_cells: share of cells at 15-40% brightness.
STYLES: dict[str, dict] = _read_styles(Path(__file__).with_name("foreign_styles.csv"))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Zero-mean, unit-sd noise varying on a length scale of `cell` px (bicubic-upsampled grid)."""
    gh, gw = max(2, int(math.ceil(shape[0] / cell)) + 3), max(2, int(math.ceil(shape[1] / cell)) + 3)
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    up = cv2.resize(grid, (int(gw * cell), int(gh * cell)), interpolation=cv2.INTER_CUBIC)
    oy, ox = int(rng.integers(0, max(1, up.shape[0] - shape[0]))), int(rng.integers(0, max(1, up.shape[1] - shape[1])))
    out = up[oy:oy + shape[0], ox:ox + shape[1]]
    return (out - out.mean()) / (out.std() + 1e-6)


def _fbm(rng, shape, scales, weights) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    for s, w in zip(scales, weights):
        out += w * _smooth_noise(rng, shape, s)
    return out / (np.sqrt(np.sum(np.square(weights))) + 1e-6)


def _seeds(rng, side: int, n: int, radii: np.ndarray, gap: float, margin: float):
    """Dart throwing in the field plus a margin; a seed keeps gap * (r_i + r_j) from the others."""
    lo, hi = -margin, side + margin
    pts, rs = [], []
    for r in radii:
        for _ in range(60):
            p = rng.uniform(lo, hi, 2)
            if all(np.hypot(*(p - q)) >= gap * (r + rq) for q, rq in zip(pts, rs)):
                pts.append(p)
                rs.append(r)
                break
    return np.array(pts).reshape(-1, 2), np.array(rs)


class _Cell:
    pass


def _make_cells(rng, side: int, st: dict) -> list[_Cell]:
    r_lo, r_hi = st["r"]
    mean_area = math.pi * ((r_lo + r_hi) / 2) ** 2
    margin = r_hi * 1.1
    n = int(st["cover"] * (side + 2 * margin) ** 2 / mean_area * rng.uniform(0.85, 1.15))
    radii = rng.uniform(r_lo, r_hi, n)
    pts, rs = _seeds(rng, side, n, radii, st["gap"], margin)
    cells = []
    for (y, x), r in zip(pts, rs):
        c = _Cell()
        c.y, c.x = float(y), float(x)
        c.mitotic = rng.random() < st["mitotic"]
        c.r = float(r * (0.7 if c.mitotic else 1.0))
        c.aspect = 1.0 if c.mitotic else float(rng.uniform(*st["aspect"]))
        c.angle = float(rng.uniform(0, math.pi))
        k = np.arange(2, 7)
        c.harm = [(int(kk), float(rng.normal(0, st["warp"] / kk ** 0.8)), float(rng.uniform(0, 2 * math.pi)))
                  for kk in k] if not c.mitotic else []
        # nucleus: offset from the cell centre, own orientation and shape
        c.nr = float(c.r * rng.uniform(0.36, 0.5) * (0.75 if c.mitotic else 1.0))
        off = c.r * rng.uniform(0.0, 0.3) if not c.mitotic else 0.0
        a = rng.uniform(0, 2 * math.pi)
        c.ny, c.nx = c.y + off * math.sin(a), c.x + off * math.cos(a)
        c.naspect = float(rng.uniform(1.0, 1.6))
        c.nangle = c.angle + float(rng.normal(0, 0.4))
        c.nshape = "mitotic" if c.mitotic else str(rng.choice(["ellipse", "ellipse", "ellipse", "kidney", "bilobed"],
                                                            p=[0.3, 0.25, 0.2, 0.15, 0.1]))
        c.nharm = [(int(kk), float(rng.normal(0, 0.05)), float(rng.uniform(0, 2 * math.pi))) for kk in (2, 3, 4, 5)]
        c.bright = float(np.exp(rng.normal(0, 0.3)))
        if rng.random() < st["dim_cells"]:
            c.bright *= float(rng.uniform(0.15, 0.4))
        c.nbright = float(np.exp(rng.normal(0, 0.3))) * (1.8 if c.mitotic else 1.0)
        cells.append(c)
    return cells


def _polar(dy, dx, angle, aspect, harm):
    """Normalised radius of offsets (dy, dx) in a rotated ellipse with a harmonic outline."""
    ca, sa = math.cos(angle), math.sin(angle)
    u = dx * ca + dy * sa
    v = (-dx * sa + dy * ca) * aspect
    rho = np.sqrt(u * u + v * v)
    if harm:
        th = np.arctan2(v, u)
        bump = np.ones_like(rho)
        for k, amp, ph in harm:
            bump += amp * np.cos(k * th + ph)
        rho = rho / np.maximum(bump, 0.35)
    return rho


def _nucleus_mask(c: _Cell, yy, xx, rng) -> np.ndarray:
    dy, dx = yy - c.ny, xx - c.nx
    nr = c.nr
    if c.nshape == "mitotic":
        # metaphase plate: a bar across the cell; anaphase: two bars close together
        ca, sa = math.cos(c.nangle), math.sin(c.nangle)
        u = dx * ca + dy * sa
        v = -dx * sa + dy * ca
        rough = 1 + 0.25 * np.cos(u / max(nr * 0.15, 1.0) + c.nangle * 7)
        if c.anaphase:
            d = nr * 0.55
            bar = ((np.abs(np.abs(v) - d) < nr * 0.2 * rough) & (np.abs(u) < nr * 1.0))
        else:
            bar = (np.abs(v) < nr * 0.3 * rough) & (np.abs(u) < nr * 1.1)
        return bar
    rho = _polar(dy, dx, c.nangle, c.naspect, c.nharm) / nr
    m = rho < 1
    if c.nshape == "kidney":
        ca, sa = math.cos(c.nangle), math.sin(c.nangle)
        u = dx * ca + dy * sa
        v = (-dx * sa + dy * ca) * c.naspect
        bite = np.hypot(u, v - nr * 1.15) < nr * 0.6
        m &= ~bite
    elif c.nshape == "bilobed":
        ca, sa = math.cos(c.nangle), math.sin(c.nangle)
        u = dx * ca + dy * sa
        v = (-dx * sa + dy * ca)
        lobe1 = np.hypot(u - nr * 0.45, v * 1.1) < nr * 0.62
        lobe2 = np.hypot(u + nr * 0.45, v * 1.1) < nr * 0.58
        m = lobe1 | lobe2 | ((np.abs(u) < nr * 0.45) & (np.abs(v) < nr * 0.38))
    return m


def draw_field(seed: int, style: str = "medium", size: int | None = None) -> dict:
    """One field: dict(image (H, W, 4) uint8 RGBY, cells, nuclei (int32), ignore (set of ids), ...)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    st = STYLES[style]
    rng = np.random.default_rng([seed, sorted(STYLES).index(style), 20261201])
    side = int(size or rng.choice([1728, 2048, 2048, 2048, 3072]))
    cells = _make_cells(rng, side, st)
    for c in cells:
        c.anaphase = bool(c.mitotic and rng.random() < 0.3)
    H = W = side
    # --- power diagram with extents, on a domain-warped grid ---
    warp_amp = 40.0 * st["warp"] / 0.15
    wy = _smooth_noise(rng, (H, W), 220) * warp_amp
    wx = _smooth_noise(rng, (H, W), 220) * warp_amp
    best = np.full((H, W), np.inf, np.float32)
    lab = np.zeros((H, W), np.int32)
    nuc = np.zeros((H, W), np.int32)
    nuc_full_area = {}
    for i, c in enumerate(cells, start=1):
        ext = c.r * st["reach"] * 1.6 + warp_amp * 2
        y0, y1 = int(max(0, c.y - ext)), int(min(H, c.y + ext + 1))
        x0, x1 = int(max(0, c.x - ext)), int(min(W, c.x + ext + 1))
        if y0 >= y1 or x0 >= x1:
            # nucleus area still matters for the visible share; compute it off-field
            nuc_full_area[i] = math.pi * c.nr ** 2 / c.naspect
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        wyy, wxx = yy + wy[y0:y1, x0:x1], xx + wx[y0:y1, x0:x1]
        rho = _polar(wyy - c.y, wxx - c.x, c.angle, c.aspect, c.harm) / (c.r * (1.0 if c.mitotic else st["reach"]))
        power = (rho * rho - 1.0) * c.r * c.r  # Laguerre distance |x-c|^2 - r^2, in the cell's metric
        inside = rho < 1.0
        sub_best = best[y0:y1, x0:x1]
        win = inside & (power < sub_best)
        sub_best[win] = power[win]
        lab[y0:y1, x0:x1][win] = i
        # full nucleus (also off-field) to know how much of it is visible
        ny0, ny1 = int(c.ny - 1.7 * c.nr), int(c.ny + 1.7 * c.nr + 1)
        nx0, nx1 = int(c.nx - 1.7 * c.nr), int(c.nx + 1.7 * c.nr + 1)
        gyy, gxx = np.mgrid[ny0:ny1, nx0:nx1].astype(np.float32)
        full = _nucleus_mask(c, gyy, gxx, rng)
        nuc_full_area[i] = float(full.sum())
        vy0, vy1, vx0, vx1 = max(0, ny0), min(H, ny1), max(0, nx0), min(W, nx1)
        if vy0 < vy1 and vx0 < vx1:
            part = full[vy0 - ny0:vy1 - ny0, vx0 - nx0:vx1 - nx0]
            sub = nuc[vy0:vy1, vx0:vx1]
            sub[part & (sub == 0)] = i
    # a nucleus belongs to its own cell: force those pixels into the cell, drop what leaks out
    own = nuc > 0
    lab[own] = nuc[own]
    # cells split by the warp into pieces: keep each cell's piece holding its nucleus
    lab = _keep_main_pieces(lab, nuc)
    nuc = np.where(lab == nuc, nuc, 0)

    # --- truth ---
    n = len(cells)
    vis = np.bincount(nuc.ravel(), minlength=n + 1).astype(np.float64)
    truth_ids, ignore_ids = [], []
    for i in range(1, n + 1):
        if vis[i] <= 0:
            continue
        frac = vis[i] / max(nuc_full_area.get(i, 1.0), 1.0)
        (truth_ids if frac >= MIN_NUCLEUS_VISIBLE else ignore_ids).append(i)

    image = _render(rng, cells, lab, nuc, st, H, W)
    # renumber: truth 1..K, ignored K+1..; nucleus-less cells become background
    lut = np.zeros(n + 1, np.int32)
    for k, i in enumerate(truth_ids + ignore_ids, start=1):
        lut[i] = k
    cells_out = lut[lab]
    nuclei_out = lut[nuc]
    ignore = set(range(len(truth_ids) + 1, len(truth_ids) + len(ignore_ids) + 1))
    return dict(image=image, cells=cells_out, nuclei=nuclei_out, ignore=ignore, style=style, seed=seed,
                n_nucleus_free=int(sum(1 for i in range(1, n + 1) if vis[i] <= 0 and (lab == i).any())))


def _keep_main_pieces(lab: np.ndarray, nuc: np.ndarray) -> np.ndarray:
    """Zero the fragments of a cell not connected to its nucleus (the warp can cut a cell in pieces)."""
    from scipy import ndimage as ndi

    out = lab.copy()
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None:
            continue
        m = (lab[sl] == i).astype(np.uint8)
        k, cc = cv2.connectedComponents(m, connectivity=4)
        if k <= 2:
            continue
        nm = nuc[sl] == i
        counts = np.bincount(cc[nm], minlength=k) if nm.any() else np.bincount(cc.ravel(), minlength=k)
        counts[0] = 0
        out[sl][(cc != int(np.argmax(counts))) & (m > 0)] = 0
    return out


def _render(rng, cells, lab, nuc, st, H, W) -> np.ndarray:
    fg = lab > 0
    # thickness: fades at free edges (distance to background), bump around the nucleus
    d_edge = cv2.distanceTransform(fg.astype(np.uint8), cv2.DIST_L2, 5)
    # seams: pixels next to a different cell
    lab_f = lab.astype(np.float32)
    k3 = np.ones((3, 3), np.uint8)
    contact = (cv2.dilate(lab_f, k3) != cv2.erode(lab_f, k3)) & fg & (cv2.erode(lab_f, k3) > 0)
    d_seam = cv2.distanceTransform((~contact).astype(np.uint8), cv2.DIST_L2, 5)
    seam_depth = float(rng.uniform(*st["seam"]))
    seam_w = float(rng.uniform(2.0, 6.0))
    seam = 1.0 - seam_depth * np.exp(-np.minimum(d_seam / seam_w, 10.0) ** 2)
    edge_len = float(rng.uniform(15, 45))
    thick = (1.0 - np.exp(-d_edge / edge_len)) * seam

    n = len(cells)
    bright = np.array([1.0] + [c.bright for c in cells], np.float32)
    nbright = np.array([1.0] + [c.nbright for c in cells], np.float32)
    mito = np.array([False] + [c.mitotic for c in cells])
    cb = bright[lab] * np.where(mito[lab], 1.6, 1.0) * fg

    # near-nucleus bump from distance to the cell's own nucleus
    d_nuc = cv2.distanceTransform((nuc == 0).astype(np.uint8), cv2.DIST_L2, 5)
    near = np.exp(-d_nuc / 60.0)

    # red: filaments from nuclei outward (random walks), blurred
    fil = np.zeros((H, W), np.uint8)
    for i, c in enumerate(cells, start=1):
        if c.mitotic:
            continue
        nlines = int(rng.integers(40, 90))
        for _ in range(nlines):
            a = rng.uniform(0, 2 * math.pi)
            y, x = c.ny + c.nr * math.sin(a) * 0.9, c.nx + c.nr * math.cos(a) * 0.9
            pts = [(x, y)]
            step = rng.uniform(12, 25)
            for _ in range(int(c.r * 1.3 / step)):
                a += rng.normal(0, 0.25)
                x += step * math.cos(a)
                y += step * math.sin(a)
                pts.append((x, y))
            cv2.polylines(fil, [np.round(np.array(pts)).astype(np.int32)], False, 255, 1)
    fil = cv2.GaussianBlur(fil.astype(np.float32) / 255.0, (0, 0), 1.2)
    fil *= (lab > 0)
    red = (0.35 + 1.6 * fil + 0.25 * _fbm(rng, (H, W), (6, 25), (0.5, 1.0)).clip(-1, 2)) * thick * cb
    red = red * (1 + 0.5 * near)

    # yellow: reticular ER (ridges of band-pass noise), denser near the nucleus
    bp = _smooth_noise(rng, (H, W), 9) - 0.6 * _smooth_noise(rng, (H, W), 30)
    ridges = np.exp(-(bp / 0.35) ** 2)
    yellow = (0.25 + 0.9 * ridges) * thick * cb * (0.5 + 1.5 * near)

    # green: one pattern per cell
    green = np.zeros((H, W), np.float32)
    dots = _smooth_noise(rng, (H, W), 3.5)
    dots = np.clip(dots - 1.5, 0, None) * 2.0
    for i, c in enumerate(cells, start=1):
        c.pattern = int(rng.integers(0, 5))
    pat = np.array([-1] + [c.pattern for c in cells])[lab]
    green += np.where(pat == 0, 0.6 * (nuc > 0), 0)            # nucleoplasm
    green += np.where(pat == 1, 0.5 * thick, 0)                 # cytosol
    green += np.where(pat == 2, dots * thick, 0)                # vesicles
    green += np.where(pat == 3, 0.6 * ridges * thick, 0)        # ER-like
    green += np.where(pat == 4, 0.03 * thick, 0)                # negative
    green *= cb * float(rng.uniform(0.3, 1.0))

    # blue: nuclei with textured chromatin and dark nucleoli
    tex = _fbm(rng, (H, W), (4, 10, 28), (0.5, 0.8, 0.6))
    blue = np.zeros((H, W), np.float32)
    nmask = nuc > 0
    d_in = cv2.distanceTransform(nmask.astype(np.uint8), cv2.DIST_L2, 5)
    tex_amp = float(rng.uniform(0.15, 0.35))
    base = 1.0 + tex_amp * tex
    for i, c in enumerate(cells, start=1):
        if c.mitotic:
            continue
        k = int(rng.integers(0, 5))
        for _ in range(k):
            a, rr = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.55) * c.nr
            cy, cx = c.ny + rr * math.sin(a), c.nx + rr * math.cos(a)
            rad = c.nr * rng.uniform(0.08, 0.22)
            depth = rng.uniform(0.35, 0.75)
            y0, y1 = int(max(0, cy - 2 * rad)), int(min(H, cy + 2 * rad + 1))
            x0, x1 = int(max(0, cx - 2 * rad)), int(min(W, cx + 2 * rad + 1))
            if y0 >= y1 or x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1]
            g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (rad * 0.7) ** 2))
            base[y0:y1, x0:x1] *= (1 - depth * g).astype(np.float32)
    rim = 1.0 + float(rng.uniform(0.0, 0.4)) * np.exp(-d_in / 4.0)
    edge_soft = 1.0 - np.exp(-d_in / 3.0)
    blue = np.where(nmask, base * rim * edge_soft * nbright[nuc], 0).astype(np.float32)
    mit_px = nmask & mito[nuc]
    blue[mit_px] *= (1.0 + 0.5 * np.clip(tex[mit_px], -1, 2))

    # camera: blur, illumination, noise, gain, 8-bit
    out = np.stack([red, green, blue, yellow], axis=-1).astype(np.float32)
    psf = float(rng.uniform(1.0, 2.2))
    illum = 1.0 + 0.25 * _smooth_noise(rng, (H, W), max(H, W) / 1.5)
    gain = float(rng.uniform(*st["gain"]))
    img = np.empty((H, W, 4), np.uint8)
    for ch in range(4):
        x = cv2.GaussianBlur(out[..., ch], (0, 0), psf) * illum
        scale = float(np.percentile(x[::4, ::4], 99.7)) + 1e-6
        level = gain * rng.uniform(150, 250) / scale  # counts per unit signal
        photons = np.clip(x * level, 0, None)
        noisy = photons + rng.standard_normal(x.shape).astype(np.float32) * np.sqrt(photons * 0.8 + 1.5)
        noisy += float(rng.uniform(0, 3))
        img[..., ch] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return img


def score_field(pred_cells: np.ndarray, field: dict, iou: float = 0.6) -> dict:
    """Instance F1 against a field's truth: predictions on ignored cells are left out of the count."""
    from kit.segment import instance_f1, match_instances

    true = field["cells"]
    ignore = field["ignore"]
    pred = np.asarray(pred_cells, np.int32).copy()
    if ignore:
        ign_mask = np.isin(true, list(ignore))
        # a prediction that matches an ignored cell, or lies mostly on ignored cells, is not counted
        for p, t, _ in match_instances(pred, np.where(ign_mask, true, 0), iou):
            pred[pred == p] = 0
        areas = np.bincount(pred.ravel())
        on_ign = np.bincount(pred[ign_mask].ravel(), minlength=areas.size)
        drop = (on_ign > 0.5 * np.maximum(areas, 1))
        drop[0] = False
        pred[drop[pred]] = 0
        true = np.where(ign_mask, 0, true)
    return instance_f1(pred, true, iou)
