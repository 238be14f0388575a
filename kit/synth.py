"""Synthetic HPA-like fields of view with per-cell ground truth (`python -m kit synth`).

Every image is a confocal-like field of cells that touch each other and the border, four channels
as on the HPA: red (microtubules), green (protein of interest), blue (nuclei), yellow
(endoplasmic reticulum). Lengths below are microscope px: the pixels of a real 2048 px field.

Size and scale (``--size``, ``--field-px``): the real fields are 1728, 2048 or 3072 px at one
microscope resolution (the same cells, cropped differently), so an image of 1728 px or more is
drawn at that resolution: a 3072 px field shows 2.25x the area of a 2048 px one, with cells of
the same size. A smaller image is a whole 2048 px field downscaled to the size (what the demo at
256 px and the image-level models at 512 px need: a field's worth of cells, each ~40 / 80 px
across); ``field_px`` overrides this (``--size 512 --field-px 512``: a 512 px crop at full
resolution, 1-3 cells). Cells per field follow the real train table (median 17 per 2048 px field,
10-35 for the 10-90% range; 27 per 3072 px field); the cell line's spread area is ~120k px, and
when the cells do not fit they are squeezed (a field of 46 cells has ~75k px cells, as real ones).

What is drawn, and why (`benchmarks/realism.py` measures it against the real fields):

* geometry: star-shaped cells with random outlines (harmonics, 0-6 lobes, dents and arms, a
  noise wobble), elongated and with the nucleus often off-centre; where two cells compete for a
  pixel the nearer in normalised distance wins (every cell keeps a ring of cytoplasm around its
  nucleus), so contacts look like real cell-cell borders. One nucleus per cell, ~0.2-0.3 of the
  cell's area (textured ellipse, some kidney-shaped, lobed or with a waist, dark nucleoli);
  about 3% of cells are mitotic (rounded, chromatin condensed to a metaphase plate or a
  prometaphase clump, which is then the nucleus, with a spindle). In each field 15-45% of the
  cells are placed against a neighbour so that their nuclei touch, nearly touch (gap up to 4 px)
  or press flat together (overlap up to 0.5 px, the earlier nucleus keeps the shared pixels): a
  segmenter must split them. Some fields grow in colonies. About 6% of cells lie in another focal
  plane (all four channels of that cell blurred by 4-9 px).
* red: a meshwork of curving microtubules (a third radiate from the centrosome); yellow: a
  granular reticular ER network, denser and with sheets near the nucleus, bright nuclear rim.
  Both follow a thickness profile that fades at free edges and dips where cells touch (a wide
  slight valley, or in confluent fields a thin shallow seam).
* green: one pattern per class (see `_render_patterns`): nucleoplasm sparing nucleoli, nuclear
  rim, a few large nucleoli, tiny dots inside nucleoli, many speckles, a few nuclear bodies, ER
  following yellow, a perinuclear Golgi cap on the centrosome side, wavy intermediate filaments
  caging the nucleus, cortical actin with straight stress fibres, microtubules following red,
  a spindle (mitotic cells only), one or two centrosome dots, plasma-membrane rim, short
  mitochondrial threads, one juxtanuclear aggresome, diffuse cytosol, vesicle dots; Negative
  cells show only the weak non-specific signal every cell has.
* staining and camera: green is punctate (`_puncta`): Poisson puncta of sigma 0.9-1.6 px
  (1 per 20-65 px^2, exponential brightness) over a diffuse share of 10-50%, multiplied into the
  pattern; debris (dust, antibody clumps, some fluorescent in other channels too); per-cell and
  per-image intensity (15% of images faint); optical blur (PSF sigma 0.9-1.4 px in focus, 10% of
  images 3-7 px out of focus), out-of-focus halo, uneven illumination (off-centre vignetting up
  to 35% plus a linear gradient up to +-20%), shot + read noise at the microscope's resolution
  (a downscaled field averages it down) and a subtracted dark level (so the background is
  mostly exact 0). Gains put each channel's in-cell 99th percentile at a level drawn from the
  real fields' range; 16-bit files are the same image at 65535 full scale (finer levels), so
  both depths agree after `kit.images.to_float`.

Styles (``--style``, `STYLES`; `Style` holds the knobs): ``default`` is the median real field.
The others draw the cases segmenters and classifiers fail on elsewhere: ``confluent`` (2.3x the
cells, grown into every gap, thin shallow seams, touching nuclei, neighbours equally bright),
``irregular`` (long arms, dents, ruffled slowly fading edges, deeply lobed nuclei),
``textured`` (coarse chromatin, 3-7 large dark nucleoli, lobes and waists: nuclei that look
like two), ``mitotic`` (a quarter of the cells in mitosis), ``heterogeneous`` (each label shown
by its own share of the cells, 10-50% Negative cells, stain levels that differ 2-3x between
cells), ``dim`` (0.15-0.45x the brightness, 3x the noise, more faint and out-of-focus fields)
and ``hard`` (all of them at once); ``mixed`` draws one style per image (a third ``default``,
the rest alike) from the image's own stream, for benchmarks. `truth/images.csv` says which.

Labels: an image's label set is drawn from the real label-combination frequencies of the 2021
train.csv (`kit/data/label_sets.csv`, see `build_label_table`). Within an image each interphase
cell shows a non-empty subset of the image's location labels (0..17) or none (then it is Negative,
class 18); class 11 (mitotic spindle) is shown by mitotic cells only, which show no nuclear
classes. Rule for the image label written to train.csv: the union of the location labels of its
cells, and ``18`` only when every cell is Negative (an image drawn as Negative has only Negative
cells). Negative cells of other images are class 18 in the solution files.

Files written by `generate_dataset(out, ...)` (Kaggle layout plus truth)::

    out/train/<ID>_{red,green,blue,yellow}.png   8- or 16-bit greyscale PNG, size x size
    out/test/<ID>_{red,green,blue,yellow}.png
    out/train.csv              ID,Label              (image labels, e.g. "0|16")
    out/sample_submission.csv  ID,ImageWidth,ImageHeight,PredictionString (empty strings)
    out/train_solution.csv     ID,ImageWidth,ImageHeight,PredictionString: one "class 1 mask"
    out/test_solution.csv      triple per true cell and per label of that cell; mask is the
                               competition encoding (pycocotools RLE of the HxWx1 Fortran-order
                               uint8 mask -> zlib level 9 -> base64 text)
    out/truth/<ID>_cell_mask.png    uint16, 0 = background, 1..N = cells
    out/truth/<ID>_nuclei_mask.png  uint16, nucleus k lies inside cell k, one nucleus per cell
    out/truth/cell_labels.csv  ID,cell_id,Label  (Label "18" for a Negative cell)
    out/truth/images.csv       ID,split,size,field_px,style  (each image's scale and style)
    out/synth.json             the generation arguments (n_train, n_test, sizes, seed, bit_depth,
                               style, field_px)
    out/.synth/<split>/<ID>.json  resume record of one finished image (labels, solution masks)

Resume: each image's PNGs are written atomically (`kit.atomic.atomic_path`: a hidden
``.<name>.<random>.tmp.png`` renamed when complete), then its record; the CSVs are written last.
A rerun with the same arguments skips every image that has a record (an interrupted run
resumes; a rerun of a complete one only rewrites the CSVs, byte-identical) and deletes the
temporaries a kill left of its own files (never taken for another dataset's); other arguments
into a folder with a synth.json are refused with an error naming the differences (`workers` is
free). Two runs into one folder at the same time are not supported.

Sizes: ``sizes=[2048, 3072]`` (``--sizes 2048,3072``) draws each image's side from the real HPA
mix (2048: 17,955, 3072: 3,842, 4096: 9 images of the 2021 train set; uniform for sizes outside
it) from its own stream ``default_rng([seed, split, index, 7])``; the solution and submission
CSVs carry each image's width and height. The default is one size (``--size``).

Determinism: image i of split s is drawn from ``numpy.random.default_rng([seed, s, i])`` only
(split into independent streams for geometry, labels, patterns and camera, so fixing the labels
leaves the rest unchanged; its size and, for ``mixed``, its style have streams of their own),
never from worker order: the bytes do not depend on `workers`.
Same seed, same bytes with the pinned numpy and OpenCV. The shape geometry on the pixel grid
avoids vectorised sin/cos/arctan (whose last bit may differ between CPU SIMD paths), so the truth
masks are the most robust part; float rendering through OpenCV filters and numpy's exp could in
principle differ in the last bit of a pixel on a CPU with another SIMD path. IDs are hex digests
of (seed, split, index), formatted like the uuid-style HPA IDs.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, clip
from kit.labels import NEGATIVE, format_label
from kit.workers import pool_map

LABEL_TABLE = Path(__file__).resolve().parent / "data" / "label_sets.csv"
SPLITS = {"train": 0, "test": 1}
REF_SIZE = 2048  # geometry is specified in pixels of a 2048 px field and scaled to the output size
MITOSIS = 11

# --------------------------------------------------------------------------------------------
# label-combination table


def build_label_table(train_csv: str | Path, out: str | Path = LABEL_TABLE) -> Path:
    """Write the label-combination frequency table (``Label,count``) from a real train.csv.

    `kit/data/label_sets.csv` was made with
    ``build_label_table("<the competition's train.csv>")``: the 21,806 images
    of the HPA 2021 train.csv, label strings folded and sorted by `kit.labels.read_labels_csv`
    (372 distinct sets). Only the counts are shipped, not the csv.
    """
    from kit.labels import read_labels_csv

    counts = read_labels_csv(train_csv)["Label"].value_counts()
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    with atomic_open(out, "w", newline="") as f:
        f.write("Label,count\n")
        for label, n in rows:
            f.write(f"{label},{n}\n")
    return Path(out)


_TABLE_CACHE: tuple[list[list[int]], np.ndarray] | None = None


def label_table() -> tuple[list[list[int]], np.ndarray]:
    """The shipped label sets and their probabilities (sum 1)."""
    global _TABLE_CACHE
    if _TABLE_CACHE is None:
        sets, counts = [], []
        with open(LABEL_TABLE) as f:
            next(f)
            for line in f:
                label, n = line.strip().rsplit(",", 1)
                sets.append([int(t) for t in label.split("|")])
                counts.append(int(n))
        p = np.asarray(counts, dtype=np.float64)
        _TABLE_CACHE = (sets, p / p.sum())
    return _TABLE_CACHE


def draw_image_labels(rng: np.random.Generator) -> list[int]:
    sets, p = label_table()
    return list(sets[int(rng.choice(len(sets), p=p))])


# --------------------------------------------------------------------------------------------
# styles: what kind of field to draw


@dataclass(frozen=True)
class Style:
    """The knobs of one kind of field (`STYLES` holds the named presets; see the module doc).

    Ranges are (low, high) of a uniform draw per field; lengths are microscope px (a 2048 px
    field's pixels) and scale with the output size.
    """

    name: str = "default"
    density: float = 1.0  # x the real cells-per-field distribution (median 17 per 2048 px field)
    packing: tuple = (0.6, 1.1)  # most summed cell area / field area: crowded fields squeeze cells
    spread: float = 1.0  # x cell shape radius (> 1: cells grow into every gap, borders by contact)
    p_cluster: float = 0.15  # fields whose cells grow in a few colonies instead of evenly
    p_touch: tuple = (0.15, 0.45)  # share of cells placed against a neighbour (touching nuclei)
    valley: tuple = (0.1, 0.5)  # cytoplasm dip where two cells touch (0: an invisible seam)
    valley_px: tuple = (10.0, 20.0)  # its width
    outline: float = 1.5  # x the harmonic irregularity of cell outlines
    protrusions: float = 3.0  # mean lobes / dents per cell outline
    arm: tuple = (0.15, 0.6)  # lobe / dent size (x cell radius); sharp lobes are arms
    ruffle: float = 0.0  # fine (10 px) outline wobble
    lamella_px: tuple = (20.0, 30.0)  # the cytoplasm fades over this much at free edges
    nuc_offset: tuple = (0.0, 0.4)  # nucleus off the cell's centre (x cell radius)
    level_sd: float = 0.3  # log-sd of a cell's tubulin / ER stain level (a step at contacts)
    elong_sd: float = 0.3  # log-sd of cell elongation (median 1.4)
    nuc_size: float = 1.0  # x the typical nucleus area (`NUC_AREA`)
    p_lobed: float = 0.15  # nuclei with lobes, a kidney notch or a waist
    lobe_depth: float = 1.0  # x their depth
    chromatin: float = 0.8  # x the chromatin texture contrast
    nucleoli: tuple = (1, 4)  # dark nucleoli per nucleus (count range)
    nucleolus_dark: tuple = (0.45, 0.75)  # how much of the DNA stain a nucleolus lacks
    nucleolus_size: tuple = (0.1, 0.24)  # nucleolus radius (x nucleus radius)
    p_mitotic: float = 0.03
    per_label: bool = False  # heterogeneous: each label shown by its own share of the cells
    p_neg: tuple = (-0.15, 0.15)  # share of Negative cells in a positive field (< 0: none)
    p_keep: tuple = (0.7, 1.0)  # chance that a cell shows a given label of its image
    cell_sd: float = 0.15  # log-sd of the per-cell stain level
    amp: tuple = (0.6, 1.0)  # per cell and label pattern strength
    gain: tuple = (1.0, 1.0)  # x every channel's brightness (dim fields < 1)
    noise: float = 1.0  # x camera noise (sd)
    p_faint: float = 0.15  # fields whose green is hardly above the background
    p_defocus: float = 0.1  # fields out of focus


_DEFAULT = Style()
STYLES: dict[str, Style] = {
    "default": _DEFAULT,
    # confluent monolayer: many cells pressed together, thin shallow seams, many touching nuclei,
    # neighbours of the same brightness, nuclei far off their cell's centre
    "confluent": replace(_DEFAULT, name="confluent", density=2.3, packing=(1.1, 1.4), p_cluster=0.0,
                         spread=1.5, p_touch=(0.45, 0.75), valley=(0.0, 0.15), valley_px=(1.5, 4.0), level_sd=0.08,
                         nuc_offset=(0.2, 0.6)),
    # irregular outlines: long arms, dents, ruffled edges, elongated cells whose edges fade out
    # slowly, deeply lobed nuclei
    "irregular": replace(_DEFAULT, name="irregular", outline=1.8, protrusions=4.0, arm=(0.3, 1.1), ruffle=0.05,
                         elong_sd=0.45, lamella_px=(40.0, 90.0), p_lobed=0.45, lobe_depth=1.4),
    # textured nuclei: coarse chromatin, several large dark nucleoli, lobes and waists (the
    # nuclei a segmenter takes for two)
    "textured": replace(_DEFAULT, name="textured", chromatin=2.4, nucleoli=(3, 7), nucleolus_dark=(0.7, 0.95),
                        nucleolus_size=(0.15, 0.35), p_lobed=0.4, lobe_depth=1.5),
    # many mitotic cells: rounded, condensed chromatin plates and clumps, spindles
    "mitotic": replace(_DEFAULT, name="mitotic", p_mitotic=0.25),
    # heterogeneous cells: each label in its own share of the cells, more Negative cells, and
    # very different stain levels between cells
    "heterogeneous": replace(_DEFAULT, name="heterogeneous", per_label=True, p_neg=(0.1, 0.5), cell_sd=0.6,
                             amp=(0.25, 1.0)),
    # dim, noisy, often out-of-focus fields
    "dim": replace(_DEFAULT, name="dim", gain=(0.15, 0.45), noise=3.0, p_faint=0.4, p_defocus=0.3),
}
# all of the above at once (a little milder each)
STYLES["hard"] = replace(
    STYLES["confluent"], name="hard", spread=1.3, outline=1.6, protrusions=3.0, arm=(0.25, 0.9), ruffle=0.04, elong_sd=0.4,
    lamella_px=(30.0, 70.0), p_lobed=0.4, lobe_depth=1.3, chromatin=2.0, nucleoli=(2, 6),
    nucleolus_dark=(0.6, 0.9), nucleolus_size=(0.12, 0.3), p_mitotic=0.1, per_label=True, p_neg=(0.1, 0.4),
    cell_sd=0.5, amp=(0.3, 1.0), gain=(0.3, 0.8), noise=2.0, p_faint=0.25, p_defocus=0.15)
MIXED = "mixed"  # per image one of STYLES: default a third of the time, each other style alike
STYLE_NAMES = (*STYLES, MIXED)


def get_style(style: "str | Style") -> Style:
    """The `Style` named `style` (a `Style` passes through)."""
    if isinstance(style, Style):
        return style
    if style not in STYLES:
        raise ConfigError(f"--style must be one of {', '.join(STYLE_NAMES)}, got {style!r}")
    return STYLES[style]


def image_style(seed: int, split: str, index: int, style: str) -> str:
    """The style of image `index`: `style` itself, or for ``mixed`` a draw from the image's own
    stream ``default_rng([seed, split, index, 11])`` (independent of order and workers)."""
    if style != MIXED:
        get_style(style)
        return style
    names = list(STYLES)
    w = np.array([1 / 3 if n == "default" else 2 / 3 / (len(names) - 1) for n in names])
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 11])
    return names[int(rng.choice(len(names), p=w))]


# the real HPA fields are 1728, 2048 or 3072 px at one microscope resolution; smaller images are
# whole fields downscaled (see `default_field_px`)
FULL_RES_MIN = 1728
CELL_AREA = 132_000.0  # median spread area of a cell (microscope px) before contacts and cropping
NUC_AREA = 32_000.0  # median nucleus area (microscope px) before it is fitted into its cell


def default_field_px(size: int) -> int:
    """The side of the field an image of `size` px shows, in microscope px: the size itself for
    sizes of real fields (>= 1728, at the microscope's resolution) and a whole 2048 px field
    downscaled below that (so a 256 px demo field holds as many cells as a real one)."""
    return int(size) if int(size) >= FULL_RES_MIN else REF_SIZE


# --------------------------------------------------------------------------------------------
# small drawing helpers


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0.05:
        return img
    return cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma),
                            borderType=cv2.BORDER_REFLECT)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise rescaled to unit standard deviation."""
    if sigma > 6:  # smooth noise: draw it coarse and enlarge (same look, a fraction of the cost)
        f = sigma / 3
        small = (max(4, int(shape[0] / f) + 1), max(4, int(shape[1] / f) + 1))
        n = _blur(rng.standard_normal(small, dtype=np.float32), 3.0)
        n = cv2.resize(n, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    else:
        n = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    sd = float(n.std())
    return n / sd if sd > 0 else n


def _splat(shape, ys, xs, amps, sigma: float) -> np.ndarray:
    """Sum of Gaussian spots of width `sigma` at (ys, xs) with peak about `amps`."""
    canvas = np.zeros(shape, np.float32)
    ys = np.asarray(ys)
    xs = np.asarray(xs)
    if ys.size == 0:
        return canvas
    yi = np.clip(np.round(ys).astype(np.int64), 0, shape[0] - 1)
    xi = np.clip(np.round(xs).astype(np.int64), 0, shape[1] - 1)
    np.add.at(canvas, (yi, xi), np.broadcast_to(np.asarray(amps, np.float32), yi.shape))
    if sigma > 0.05:
        canvas = _blur(canvas, sigma) * (2 * math.pi * sigma * sigma)
    return canvas


def _polylines(shape, lines, value: float = 1.0, thickness: int = 1) -> np.ndarray:
    """Draw open polylines of (x, y) points: an (n, k, 2) array or a list of (k, 2) arrays."""
    canvas = np.zeros(shape, np.float32)
    if len(lines):
        if isinstance(lines, np.ndarray):
            pts = list(np.round(lines).astype(np.int32)[:, :, None, :])
        else:
            pts = [np.round(l).astype(np.int32).reshape(-1, 1, 2) for l in lines]
        cv2.polylines(canvas, pts, False, float(value), thickness=max(1, int(thickness)),
                      lineType=cv2.LINE_8)
    return canvas


def _walks(rng, starts_xy, angles, n_steps: int, step, turn_sd: float) -> np.ndarray:
    """Curving paths, all at once: (n, n_steps + 1, 2) points (x, y); each step turns by
    N(0, turn_sd) rad. `step` is a scalar or one length per path."""
    starts_xy = np.asarray(starts_xy, np.float64).reshape(-1, 2)
    n = starts_xy.shape[0]
    ang = np.asarray(angles, np.float64).reshape(n, 1) + np.cumsum(rng.normal(0.0, turn_sd, (n, n_steps)), axis=1)
    st = np.asarray(step, np.float64).reshape(-1, 1)
    d = np.stack([np.cos(ang) * st, np.sin(ang) * st], axis=2)
    out = np.empty((n, n_steps + 1, 2))
    out[:, 0] = starts_xy
    out[:, 1:] = starts_xy[:, None, :] + np.cumsum(d, axis=1)
    return out


def _harmonics(rng, n: int, amp: float) -> list[tuple[int, float, float]]:
    return [(m, float(rng.normal(0, amp / m)), float(rng.uniform(0, 2 * math.pi))) for m in range(2, 2 + n)]


def _bumps(rng, n: int, amp: tuple[float, float], powers=(4, 8, 16)) -> list[tuple[float, float, int]]:
    """`n` outline lobes (amp > 0: protrusion, < 0: dent) as (amp, direction, power)."""
    out = []
    for _ in range(n):
        a = float(rng.uniform(*amp))
        out.append((a if rng.random() < 0.7 else -0.6 * a, float(rng.uniform(0, 2 * math.pi)),
                    int(powers[int(rng.integers(len(powers)))])))
    return out


def _polar_dist(u: np.ndarray, v: np.ndarray, harm, bumps=()) -> np.ndarray:
    """rho / r(theta) for points (u, v) and a star shape
    r = 1 + sum a cos(m theta + phase) + sum b ((1 + cos(theta - phi)) / 2) ** p.

    cos(m theta) and sin(m theta) come from powers of (u + iv) / rho, a lobe's power from repeated
    squaring, so only exactly rounded operations (+, *, /, sqrt) touch the pixel grid: the truth
    masks are the same bytes on any machine (no libm or SIMD transcendental functions).
    """
    rho = np.sqrt(u * u + v * v)
    inv = np.maximum(rho, 1e-12)
    np.divide(1.0, inv, out=inv)
    cr, sr = u * inv, v * inv
    cm, sm = cr, sr
    r = np.ones_like(rho)
    m_done = 1
    for m, a, ph in harm:
        while m_done < m:
            cm, sm = cm * cr - sm * sr, sm * cr + cm * sr
            m_done += 1
        r += (a * math.cos(ph)) * cm
        r -= (a * math.sin(ph)) * sm
    for b, phi, p in bumps:
        lobe = (cr * (0.5 * math.cos(phi)) + sr * (0.5 * math.sin(phi))) + 0.5
        while p > 1:  # p is a power of two
            lobe = lobe * lobe
            p //= 2
        r += b * lobe
    np.maximum(r, 0.25, out=r)  # a deep dent never pinches the shape off its centre
    np.divide(rho, r, out=rho)
    return rho


def _shape_radius(harm, bumps, psi: float) -> float:
    """r(psi) of the star shape `_polar_dist` draws, at one angle (scalar maths)."""
    r = 1.0 + sum(a * math.cos(m * psi + ph) for m, a, ph in harm)
    r += sum(b * ((1 + math.cos(psi - phi)) / 2) ** p for b, phi, p in bumps)
    return max(r, 0.25)


def _reach(harm, bumps) -> float:
    """How far a star shape reaches, in units of its radius: the largest r(theta) over 256
    directions (a lobe is at least 0.2 rad wide), plus a margin, rounded up to 0.01 (so that
    the last bit of a vectorised cos cannot move a bounding box)."""
    if not bumps:
        return 1.0 + sum(abs(a) for _, a, _ in harm)
    psi = np.arange(256) * (2 * math.pi / 256)
    r = np.ones(256)
    for m, a, ph in harm:
        r += a * np.cos(m * psi + ph)
    for b, phi, p in bumps:
        r += b * ((1 + np.cos(psi - phi)) / 2) ** p
    return math.ceil((float(r.max()) * 1.03 + 0.01) * 100) / 100


# --------------------------------------------------------------------------------------------
# one field


@dataclass
class Cell:
    """Geometry of one cell (pixels of the output image)."""

    id: int
    ny: float  # nucleus centre
    nx: float
    na: float  # nucleus semi-axes (a >= b) and angle
    nb: float
    nang: float
    nharm: list
    cy: float  # cell-shape centre
    cx: float
    R: float  # cell radius
    elong: float
    cang: float
    charm: list
    mitotic: bool = False
    labels: list[int] = field(default_factory=list)  # location labels shown (empty = Negative)
    nbump: list = field(default_factory=list)  # nuclear lobes / notches (see `_bumps`)
    cbump: list = field(default_factory=list)  # cell protrusions / dents
    nreach: float = 1.3  # `_reach` of the nucleus and the cell shape
    creach: float = 2.0
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1 (end exclusive)

    def nucleus_dist(self, yy, xx):
        """Normalised nucleus distance (1 on the nuclear rim) on grids yy, xx (broadcastable)."""
        dy, dx = yy - self.ny, xx - self.nx
        c, s = math.cos(self.nang), math.sin(self.nang)
        u = (dx * c + dy * s) / self.na
        v = (-dx * s + dy * c) / self.nb
        return _polar_dist(u, v, self.nharm, self.nbump)

    def nucleus_dist_box(self, bbox) -> np.ndarray:
        """`nucleus_dist` over a bbox: the exact shape near the nucleus (wherever it can reach),
        the plain ellipse farther out, where it only weights perinuclear density."""
        y0, y1, x0, x1 = bbox
        yy, xx = _grid(bbox)
        dy, dx = yy - self.ny, xx - self.nx
        c, s = math.cos(self.nang), math.sin(self.nang)
        u = (dx * c + dy * s) / self.na
        v = (-dx * s + dy * c) / self.nb
        out = np.sqrt(u * u + v * v)
        e = max(self.na, self.nb) * self.nreach * 1.2 + 2
        a0, a1 = max(y0, int(self.ny - e)), min(y1, int(self.ny + e) + 2)
        b0, b1 = max(x0, int(self.nx - e)), min(x1, int(self.nx + e) + 2)
        if a0 < a1 and b0 < b1:
            out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = self.nucleus_dist(*_grid((a0, a1, b0, b1)))
        return out

    def cell_dist(self, yy, xx):
        """Normalised cell-shape distance (1 on the outline before contacts) on grids yy, xx."""
        dy, dx = yy - self.cy, xx - self.cx
        c, s = math.cos(self.cang), math.sin(self.cang)
        e = math.sqrt(self.elong)
        u = (dx * c + dy * s) / (e * self.R)
        v = (-dx * s + dy * c) * (e / self.R)
        return _polar_dist(u, v, self.charm, self.cbump)

    @property
    def rn(self) -> float:
        return math.sqrt(self.na * self.nb)


@dataclass
class SynthField:
    """One synthetic field: image (H x W x 4 float32 in [0, 1], RGBY), its noiseless layers
    and its truth."""

    image: np.ndarray
    clean: np.ndarray  # the same before gain, focus and noise (relative units, H x W x 4)
    cells: np.ndarray  # uint16 cell label image
    nuclei: np.ndarray  # uint16 nucleus label image (nucleus k inside cell k)
    cell_labels: list[list[int]]  # per cell id 1..N: class ids (location labels, or [18])
    image_labels: list[int]
    mitotic: list[bool]
    style: str = "default"
    field_px: int = REF_SIZE  # the field's side in microscope px (= size at full resolution)

    def label_string(self) -> str:
        return format_label(self.image_labels)


def _rim_radius(na: float, nb: float, nang: float, harm, theta: float, bumps=()) -> float:
    """Distance from a nucleus centre to its rim in image direction `theta` (exact for the
    star-shaped ellipse that `Cell.nucleus_dist` draws)."""
    c, s_ = math.cos(theta - nang), math.sin(theta - nang)
    k = math.hypot(c / na, s_ / nb)  # rho per unit distance along the ray
    psi = math.atan2(s_ / nb, c / na)
    return _shape_radius(harm, bumps, psi) / k


def _nuclear_lobes(rng, nang: float, scale: float = 1.0) -> list[tuple[float, float, int]]:
    """Irregular nuclei: a kidney notch, 2-3 lobes, or a peanut (a waist across the long axis,
    which a distance transform sees as two nuclei). `scale` deepens them (at most 0.7)."""
    kind = rng.random()
    if kind < 0.35:
        phi = float(rng.uniform(0, 2 * math.pi))
        return [(-min(0.7, float(rng.uniform(0.25, 0.45)) * scale), phi, int(rng.choice([8, 16])))]
    if kind < 0.7:
        k = int(rng.integers(2, 4))
        base = float(rng.uniform(0, 2 * math.pi))
        return [(min(0.7, float(rng.uniform(0.12, 0.28)) * scale), base + 2 * math.pi * j / k
                 + float(rng.normal(0, 0.3)), int(rng.choice([4, 8]))) for j in range(k)]
    a = -min(0.7, float(rng.uniform(0.15, 0.32)) * scale)
    return [(a, nang + math.pi / 2, 8), (a, nang - math.pi / 2, 8)]


def _place_cells(rng: np.random.Generator, size: int, n_cells: int, n_mitotic: int,
                 st: Style = _DEFAULT, field_px: int = REF_SIZE) -> list[Cell]:
    s = size / field_px  # output px per microscope px
    area = float(size * size)
    # the cell line's spread area (cells spread more where they have room), squeezed when the
    # cells do not fit: crowded fields have smaller cells (real: 74k px median with 46 cells,
    # 100-160k px with 10-20)
    a_free = CELL_AREA * float(np.exp(rng.normal(0, 0.25))) * (17.0 * field_px ** 2 / REF_SIZE ** 2
                                                                 / max(n_cells, 1)) ** 0.5 * s * s
    a_cell = min(a_free, float(rng.uniform(*st.packing)) * area / max(n_cells, 1))
    r_mean = math.sqrt(a_cell / math.pi)
    a_nuc = NUC_AREA * st.nuc_size * float(np.exp(rng.normal(0, 0.2))) * s * s
    # some fields grow in colonies (and leave much of the field empty)
    colonies = None
    if rng.random() < st.p_cluster:
        k = 1 + int(rng.poisson(1.5))
        colonies = (rng.uniform(0.1, 0.9, (k, 2)) * size, r_mean * math.sqrt(n_cells / k) * 0.9)
    cells: list[Cell] = []
    centres = np.zeros((0, 2))
    nrad = np.zeros(0)
    crad = np.zeros(0)
    mitotic_flags = [True] * n_mitotic + [False] * (n_cells - n_mitotic)
    p_touch = float(rng.uniform(*st.p_touch))  # share of cells placed against a neighbour
    for mit in mitotic_flags:
        R = r_mean * float(np.exp(rng.normal(0, 0.15)))
        R = max(R, 40 * s)
        # nuclei shrink less than cells when crowded
        # nuclei vary less than cells (real: 24-35k px in fields of 74-156k px cells)
        rn_free = math.sqrt(a_nuc * float(np.exp(rng.normal(0, 0.25))) / math.pi)
        nharm = _harmonics(rng, 4, 0.05 if not mit else 0.02)
        cang = float(rng.uniform(0, math.pi))
        nang = cang + float(rng.normal(0, 0.25))
        if mit:
            R *= 0.7
            elong = float(rng.uniform(1.0, 1.15))
            charm = _harmonics(rng, 3, 0.04)
            cbump = []
            rn = R * rng.uniform(0.45, 0.55)
            na, nb = rn * 1.0, rn * 1.0
            nbump = []
        else:
            elong = float(np.clip(rng.lognormal(math.log(1.4), st.elong_sd), 1.0, 3.5))
            charm = _harmonics(rng, 4, 0.22 * st.outline)
            cbump = _bumps(rng, int(rng.poisson(st.protrusions)), st.arm, (4, 8, 16, 32, 64))
            rn = min(rn_free, 0.72 * R)
            e = rng.uniform(0.0, 0.25)
            na, nb = rn * (1 + e), rn * (1 - e)
            nbump = _nuclear_lobes(rng, nang, st.lobe_depth) if rng.random() < st.p_lobed else []
        nreach = _reach(nharm, nbump)
        rn_max = max(na, nb) * nreach * 1.02
        # a fraction of the cells grow right against a neighbour (daughter pairs, crowding): their
        # nuclei touch or nearly touch, so a segmenter must split them
        buddies = [c for c in cells if not c.mitotic]
        buddy = None
        if not mit and buddies and rng.random() < p_touch:
            buddy = buddies[int(rng.integers(len(buddies)))]
            th = float(rng.uniform(0, 2 * math.pi))
            gap = float(rng.uniform(-0.5, 4.0)) * max(s, 0.25)  # px; < 0: pressed flat together
            d0 = (_rim_radius(buddy.na, buddy.nb, buddy.nang, buddy.nharm, th, buddy.nbump)
                  + _rim_radius(na, nb, nang, nharm, th + math.pi, nbump) + gap)
            p = np.array([buddy.ny + d0 * math.sin(th), buddy.nx + d0 * math.cos(th)])
            if not (0 <= p[0] < size and 0 <= p[1] < size):
                buddy = None
            elif len(centres) > 1:
                others = np.arange(len(centres)) != buddy.id - 1
                d = np.hypot(*(centres[others] - p).T)
                if np.any(d < (nrad[others] + rn_max) * 0.98 + 1):
                    buddy = None
        if buddy is None:
            for _ in range(80):
                if colonies is None:
                    p = rng.uniform(0, size, 2)
                else:
                    cen, spread = colonies
                    p = cen[int(rng.integers(len(cen)))] + rng.normal(0, spread, 2)
                    if not (0 <= p[0] < size and 0 <= p[1] < size):
                        continue
                if len(centres):
                    d = np.hypot(*(centres - p).T)
                    # nuclei may touch (as in dense real fields), never overlap
                    if np.any(d < (nrad + rn_max) * 0.98 + 1) or np.any(d < 0.5 * (crad + R)):
                        continue
                break
            else:
                continue
        off = R * rng.uniform(*st.nuc_offset) * (0.2 if mit else 1.0)  # nucleus often off-centre
        if buddy is not None:  # the cell body lies away from its neighbour
            cy, cx = p[0] + off * math.sin(th), p[1] + off * math.cos(th)
        else:
            sign = 1 if rng.random() < 0.5 else -1
            cy = p[0] + sign * off * math.sin(cang)
            cx = p[1] + sign * off * math.cos(cang)
        cells.append(Cell(
            id=len(cells) + 1, ny=float(p[0]), nx=float(p[1]), na=float(na), nb=float(nb),
            nang=nang, nharm=nharm, cy=float(cy), cx=float(cx), R=float(R * (1.0 if mit else st.spread)),
            elong=elong, cang=cang, charm=charm, mitotic=mit,
            nbump=nbump, cbump=cbump, nreach=nreach, creach=_reach(charm, cbump),
        ))
        centres = np.vstack([centres, p[None]])
        nrad = np.append(nrad, rn_max)
        crad = np.append(crad, R)
    return cells


def _grid(bbox) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of a bbox as a column (y) and a row (x) that broadcast to its shape."""
    y0, y1, x0, x1 = bbox
    return (np.arange(y0, y1, dtype=np.float32)[:, None], np.arange(x0, x1, dtype=np.float32)[None, :])


def _rasterise(cells: list[Cell], size: int, wobble: np.ndarray, rng: np.random.Generator,
               ruffle: np.ndarray | None = None):
    """Cell and nucleus label images plus each pixel's normalised distance within its cell.

    `wobble` (a smooth noise field larger than the image) makes outlines and the contacts
    between cells irregular: each cell reads it at its own offset; `ruffle` (same shape, finer,
    already scaled) adds ruffled edges. The distance factor stays >= 0.77, so a cell never
    reaches past 1.3 of its shape's extent.
    """
    pad = (wobble.shape[0] - size) // 2
    best = np.full((size, size), np.inf, np.float32)
    lab = np.zeros((size, size), np.uint16)
    nuc = np.zeros((size, size), np.uint16)
    for c in cells:
        ext = c.R * math.sqrt(c.elong) * c.creach * 1.3 + 2
        ext = max(ext, max(c.na, c.nb) * c.nreach * 1.45 + abs(c.cy - c.ny) + abs(c.cx - c.nx) + 2)
        y0, y1 = max(0, int(min(c.cy, c.ny) - ext)), min(size, int(max(c.cy, c.ny) + ext) + 2)
        x0, x1 = max(0, int(min(c.cx, c.nx) - ext)), min(size, int(max(c.cx, c.nx) + ext) + 2)
        c.bbox = (y0, y1, x0, x1)
        yy, xx = _grid(c.bbox)
        oy, ox = rng.integers(0, 2 * pad + 1, 2)
        f = 1 + 0.13 * wobble[oy + y0: oy + y1, ox + x0: ox + x1]
        if ruffle is not None:
            f = np.maximum(f + ruffle[oy + y0: oy + y1, ox + x0: ox + x1], 0.77)
        d = c.cell_dist(yy, xx) * f
        # every cell keeps some cytoplasm around its nucleus (a ring of 0.4 nucleus radii, won
        # against a neighbour's body; between two close nuclei the midline decides)
        dn = c.dn = c.nucleus_dist_box(c.bbox)  # kept for the renderers
        ring = dn < 1.4
        d[ring] = np.minimum(d[ring], 0.35 * dn[ring])
        b = best[y0:y1, x0:x1]
        take = (d < 1.0) & (d < b)
        b[take] = d[take]
        lab[y0:y1, x0:x1][take] = c.id
    for c in cells:  # nuclei override: the nucleus always belongs to its own cell
        y0, y1, x0, x1 = c.bbox
        dn = c.dn
        inside = (dn < 1.0) & (nuc[y0:y1, x0:x1] == 0)
        lab[y0:y1, x0:x1][inside] = c.id
        nuc[y0:y1, x0:x1][inside] = c.id
        best[y0:y1, x0:x1][inside] = np.minimum(best[y0:y1, x0:x1][inside], 0.5)
    for c in cells:  # keep only the part of each cell connected to its nucleus
        y0, y1, x0, x1 = c.bbox
        own = (lab[y0:y1, x0:x1] == c.id).astype(np.uint8)
        n, comp = cv2.connectedComponents(own, connectivity=4)
        mine = comp[nuc[y0:y1, x0:x1] == c.id]
        if n > 2 and mine.size:
            keep = np.bincount(mine).argmax()
            drop = (own > 0) & (comp != keep)
            lab[y0:y1, x0:x1][drop] = 0
            best[y0:y1, x0:x1][drop] = np.inf
    best[lab == 0] = 1.0
    return lab, nuc, best


def _assign_labels(rng: np.random.Generator, cells: list[Cell], image_labels: list[int],
                   heterogeneity: bool = True, st: Style = _DEFAULT) -> None:
    """Give each cell a subset of the image labels (see module doc for the rule)."""
    if image_labels == [NEGATIVE] or not image_labels:
        for c in cells:
            c.labels = []
        return
    locs = [l for l in image_labels if l != NEGATIVE]
    inter = [l for l in locs if l != MITOSIS]
    p_neg = max(0.0, rng.uniform(*st.p_neg)) if heterogeneity else 0.0
    p_keep = rng.uniform(*st.p_keep) if heterogeneity else 1.0
    # heterogeneous fields: each label is shown by its own share of the cells
    share = {l: float(rng.uniform(0.15, 1.0)) if (heterogeneity and st.per_label) else p_keep for l in inter}
    for c in cells:
        if c.mitotic:
            # rounded mitotic cells: no nucleus, so only cytoplasmic patterns and the spindle
            shown = [l for l in inter if l >= 6 and rng.random() < share[l]]
            if MITOSIS in locs:
                shown.append(MITOSIS)
            c.labels = sorted(shown)
            continue
        if not inter or rng.random() < p_neg:
            c.labels = []
            continue
        shown = [l for l in inter if rng.random() < share[l]]
        if not shown:
            shown = [inter[int(rng.integers(len(inter)))]]
        c.labels = sorted(shown)
    interphase = [c for c in cells if not c.mitotic]
    for l in inter:  # every image label is shown by at least one cell
        if interphase and not any(l in c.labels for c in interphase):
            c = interphase[int(rng.integers(len(interphase)))]
            c.labels = sorted(set(c.labels) | {l})


class _Ctx:
    """Per-cell local view used by the pattern renderers."""

    def __init__(self, c: Cell, lab, nuc, dcell, edge, prof, s):
        y0, y1, x0, x1 = c.bbox
        self.c = c
        self.sl = (slice(y0, y1), slice(x0, x1))
        self.shape = (y1 - y0, x1 - x0)
        self.y0, self.x0 = y0, x0
        self.own = lab[self.sl] == c.id
        self.nuc = nuc[self.sl] == c.id
        self.cyto = self.own & ~self.nuc
        self.yy, self.xx = _grid(c.bbox)  # (h, 1) and (1, w): broadcast, never materialised
        self.dn = c.dn
        self.d = dcell[self.sl]
        self.edge = edge[self.sl]  # distance to the cell's outline (rims)
        self.s = s
        self.prof = prof[self.sl] * self.own  # cytoplasm thickness profile
        # distance from the nuclear rim in nucleus radii -> perinuclear weight
        self.pn = np.exp(-np.maximum(self.dn - 1, 0) * c.rn / (0.45 * c.R)).astype(np.float32)
        self.nuc_fill = np.clip((1 - self.dn) / 0.08, 0, 1).astype(np.float32)


def _sample_in(rng, ctx: _Ctx, mask: np.ndarray, n: int, weight: np.ndarray | None = None):
    """n random pixel positions (local y, x) inside mask, optionally weighted."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return np.zeros(0), np.zeros(0)
    if weight is not None:
        w = weight.ravel()[idx].astype(np.float64)
        w = w / w.sum() if w.sum() > 0 else None
    else:
        w = None
    pick = rng.choice(idx, size=n, replace=True, p=w)
    ys, xs = np.divmod(pick, ctx.shape[1])
    return ys + rng.uniform(-0.5, 0.5, n), xs + rng.uniform(-0.5, 0.5, n)


def _nucleoli(rng, c: Cell, counts: tuple = (1, 4), size: tuple = (0.1, 0.24)):
    """Nucleoli as (y, x, radius) inside the nucleus; `counts`: (fewest, most); `size`: radius
    range in nucleus radii (large ones lie closer to the centre)."""
    if c.mitotic:
        return []
    k = int(rng.integers(counts[0], counts[1] + 1))
    out = []
    for _ in range(k):
        f = float(rng.uniform(*size))
        r = c.rn * f
        ang = rng.uniform(0, 2 * math.pi)
        rad = rng.uniform(0, max(0.2, 0.8 - 1.2 * f))
        y = c.ny + rad * c.nb * math.sin(ang)
        x = c.nx + rad * c.na * math.cos(ang)
        out.append((y, x, r))
    return out


def _nucleoli_map(ctx: _Ctx, nucleoli) -> np.ndarray:
    """Soft discs of the nucleoli (1 inside), drawn only within each one's own small box."""
    m = np.zeros(ctx.shape, np.float32)
    h, w = ctx.shape
    for y, x, r in nucleoli:
        ly, lx, e = y - ctx.y0, x - ctx.x0, r * 1.2 + 1
        a0, a1 = max(0, int(ly - e)), min(h, int(ly + e) + 2)
        b0, b1 = max(0, int(lx - e)), min(w, int(lx + e) + 2)
        if a0 >= a1 or b0 >= b1:
            continue
        yy = np.arange(a0, a1, dtype=np.float32)[:, None] - np.float32(ly)
        xx = np.arange(b0, b1, dtype=np.float32)[None, :] - np.float32(lx)
        disc = np.clip((1.15 - np.sqrt(yy * yy + xx * xx) / np.float32(r)) / 0.3, 0, 1)
        np.maximum(m[a0:a1, b0:b1], disc, out=m[a0:a1, b0:b1])
    return m * ctx.nuc


def _microtubules(rng, ctx: _Ctx, centro, thick: int) -> np.ndarray:
    """A meshwork of curving filaments: a third radiate from the centrosome, the rest run
    across the cytoplasm in all directions (real fields show a dense tangle, not an aster)."""
    c = ctx.c
    # ~250 for a typical cell at full resolution; fewer where the output pixels cannot show them
    n = int(np.clip(min(1.2 * c.R / ctx.s, 4 * c.R), 40, 500))
    step = max(2.0, 10 * ctx.s)
    n_steps = int(2.2 * c.R / step) + 2
    k = n // 3
    start = np.array([centro[1] - ctx.x0, centro[0] - ctx.y0]) + rng.normal(0, 0.15 * c.rn, (k, 2))
    ys, xs = _sample_in(rng, ctx, ctx.cyto, n - k)
    start = np.concatenate([start, np.stack([xs, ys], 1)]) if ys.size else start
    # filaments of many lengths (short ones look broken, as in a dense tangle)
    steps = step * rng.uniform(0.25, 1.0, len(start))
    paths = _walks(rng, start, rng.uniform(0, 2 * math.pi, len(start)), n_steps, steps, 0.18)
    # filaments of different brightness (bundles vs single tubules)
    m = np.zeros(ctx.shape, np.float32)
    for grp, val in ((paths[: n // 3], 1.0), (paths[n // 3:], 0.55)):
        m = np.maximum(m, _polylines(ctx.shape, grp, val, thick))
    return m


def _render_patterns(rng, ctx: _Ctx, labels: list[int], er_local, mt_local, nucleoli,
                     nucleoli_map, centro, spindle, thick, amp_range=(0.6, 1.0)) -> np.ndarray:
    """Sum of the green patterns of one cell (unmasked values, masked by the caller)."""
    c = ctx.c
    s = ctx.s
    g = np.zeros(ctx.shape, np.float32)
    sp = lambda px: max(0.6, px * s)  # a size given in 2048 px -> output px (min 0.6)
    for l in labels:
        amp = float(rng.uniform(*amp_range))
        if l == 0:  # nucleoplasm, sparing nucleoli
            p = ctx.nuc_fill * (1 - 0.85 * nucleoli_map)
        elif l == 1:  # nuclear membrane: thin rim of the nucleus
            rim = np.exp(-(((ctx.dn - 1.0) * c.rn) / sp(5)) ** 2)
            p = rim * 1.3 + 0.05 * ctx.nuc_fill
        elif l == 2:  # nucleoli
            p = nucleoli_map * 1.2 + 0.04 * ctx.nuc_fill
        elif l == 3:  # fibrillar centres: tiny dots inside nucleoli
            ys, xs = [], []
            for y, x, r in nucleoli:
                k = int(rng.integers(2, 7))
                a = rng.uniform(0, 2 * math.pi, k)
                rr = r * np.sqrt(rng.uniform(0, 0.6, k))
                ys.extend(y - ctx.y0 + rr * np.sin(a))
                xs.extend(x - ctx.x0 + rr * np.cos(a))
            p = _splat(ctx.shape, ys, xs, 1.4, sp(3.5)) + 0.05 * nucleoli_map
        elif l == 4:  # nuclear speckles: many irregular blobs in the nucleoplasm
            k = int(rng.integers(15, 40))
            mask = (ctx.dn < 0.85) & (nucleoli_map < 0.2)
            ys, xs = _sample_in(rng, ctx, mask, k)
            p = _splat(ctx.shape, ys, xs, rng.uniform(0.6, 1.2, ys.size), sp(7))
            p = p * (0.7 + 0.3 * np.clip(_noise(rng, ctx.shape, sp(3)), -1, 1)) + 0.15 * ctx.nuc_fill
        elif l == 5:  # nuclear bodies: a few bright dots
            k = int(rng.integers(1, 7))
            ys, xs = _sample_in(rng, ctx, (ctx.dn < 0.8) & (nucleoli_map < 0.2), k)
            p = _splat(ctx.shape, ys, xs, 1.5, sp(6)) + 0.06 * ctx.nuc_fill
        elif l == 6:  # endoplasmic reticulum: follows the yellow network
            p = er_local * 1.1
        elif l == 7:  # Golgi: perinuclear cap of ribbons and dots on the centrosome side
            ca = math.atan2(centro[0] - c.ny, centro[1] - c.nx)
            k = int(rng.integers(25, 60))
            a = ca + rng.normal(0, 0.45, k)
            rr = c.rn * (1.05 + np.abs(rng.normal(0, 0.25, k)))
            ys = c.ny - ctx.y0 + rr * np.sin(a)
            xs = c.nx - ctx.x0 + rr * np.cos(a)
            p = _splat(ctx.shape, ys, xs, rng.uniform(0.5, 1.0, k), sp(6))
            p = np.minimum(p, 1.5) * ctx.cyto
        elif l == 8:  # intermediate filaments: long wavy bundles, a cage around the nucleus
            k = int(np.clip(c.R / (6 * s), 15, 60))
            step = max(2.0, 10 * s)
            ys, xs = _sample_in(rng, ctx, ctx.cyto, k, ctx.pn)
            radial = np.arctan2(ys + ctx.y0 - c.ny, xs + ctx.x0 - c.nx)
            ang = radial + np.pi / 2 * rng.choice([-1, 1], ys.size) + rng.normal(0, 0.4, ys.size)
            paths = _walks(rng, np.stack([xs, ys], 1), ang, int(1.5 * c.R / step), step, 0.18)
            p = _blur(_polylines(ctx.shape, paths, 1.0, thick), sp(2)) * 1.6
        elif l == 9:  # actin: cortical rim + straight stress fibres
            rim = np.exp(-ctx.edge / sp(8)) * ctx.own
            ang = c.cang + rng.normal(0, 0.2)
            k = int(rng.integers(5, 16))
            lines = []
            L = 2.5 * c.R
            for _ in range(k):
                off = rng.uniform(-0.8, 0.8) * c.R
                a = ang + rng.normal(0, 0.06)
                cy0 = c.cy - ctx.y0 + off * math.cos(ang)
                cx0 = c.cx - ctx.x0 - off * math.sin(ang)
                lines.append(np.array([[cx0 - L * math.cos(a), cy0 - L * math.sin(a)],
                                       [cx0 + L * math.cos(a), cy0 + L * math.sin(a)]]))
            sf = _polylines(ctx.shape, lines, 1.0, thick) * ctx.cyto
            p = rim * 1.2 + _blur(sf, sp(1.5)) * 0.9 + 0.1 * ctx.prof
        elif l == 10:  # microtubules: the red filaments of this cell
            p = mt_local * 1.1 + 0.08 * ctx.prof
        elif l == MITOSIS:  # mitotic spindle
            p = spindle * 1.5 if spindle is not None else np.zeros(ctx.shape, np.float32)
        elif l == 12:  # centrosome: one or two dots by the nucleus
            k = 1 if rng.random() < 0.5 else 2
            ys = centro[0] - ctx.y0 + rng.normal(0, sp(6), k)
            xs = centro[1] - ctx.x0 + rng.normal(0, sp(6), k)
            p = _splat(ctx.shape, ys, xs, 2.0, sp(5)) + 0.05 * ctx.prof
        elif l == 13:  # plasma membrane: rim of the cell
            p = np.exp(-ctx.edge / sp(5)) * ctx.own * 1.3 + 0.04 * ctx.prof
        elif l == 14:  # mitochondria: short curved threads, denser around the nucleus
            k = int(np.clip((c.R / (3 * s)) ** 2 / 25, 40, 400))
            ys, xs = _sample_in(rng, ctx, ctx.cyto, k, ctx.pn + 0.2)
            steps = max(1.0, 8 * s) * rng.uniform(0.3, 1.3, ys.size)  # threads of varied length
            paths = _walks(rng, np.stack([xs, ys], 1), rng.uniform(0, 2 * math.pi, ys.size), 4, steps, 0.5)
            p = _blur(_polylines(ctx.shape, paths, 1.0, thick), sp(2)) * 1.5
        elif l == 15:  # aggresome: one bright juxtanuclear blob
            ca = math.atan2(centro[0] - c.ny, centro[1] - c.nx) + rng.normal(0, 0.3)
            rr = c.rn * 1.25
            y = c.ny - ctx.y0 + rr * math.sin(ca)
            x = c.nx - ctx.x0 + rr * math.cos(ca)
            p = _splat(ctx.shape, [y], [x], 1.6, max(sp(18), c.rn * 0.18)) + 0.08 * ctx.prof
        elif l == 16:  # cytosol: diffuse, the nucleus dimmer
            p = ctx.prof * np.where(ctx.nuc, 0.3, 1.0)
        elif l == 17:  # vesicles: many cytoplasmic dots
            k = int(np.clip((c.R / (3 * s)) ** 2 / 20, 40, 600))
            ys, xs = _sample_in(rng, ctx, ctx.cyto, k)
            p = _splat(ctx.shape, ys, xs, rng.uniform(0.4, 1.3, k), sp(2.5)) + 0.02 * ctx.prof
        else:
            continue
        g += amp * p.astype(np.float32)
    return g


# each channel's in-cell 99th percentile after gain (8-bit value / 255), drawn per field in
# these ranges: the four real Kaggle fields give red 0.49-0.98, green 0.28-0.96 (0.02 in the
# Negative field), blue 0.46-0.72, yellow 0.46-0.81 (some saturate, as here)
_LEVELS = {"red": (0.55, 1.0), "green": (0.28, 0.9), "blue": (0.45, 0.72), "yellow": (0.55, 0.9)}
_FAINT = (0.01, 0.06)  # green of a faint or Negative field


def _puncta(rng: np.random.Generator, shape: tuple[int, int], s: float) -> np.ndarray:
    """Multiplicative punctate texture of mean ~1: diffuse share + sparse Gaussian puncta.

    Puncta have sigma 0.9-1.6 px and a density of 1 per 20-65 px^2 at 2048 px; at smaller sizes
    a pixel gathers several puncta (Poisson counts), as a binned camera would.
    """
    diffuse = float(rng.uniform(0.1, 0.5))  # how punctate this antibody stains
    lam = float(rng.uniform(0.015, 0.05)) / (s * s)  # puncta per output pixel
    sig = float(rng.uniform(0.9, 1.6)) * s
    if lam < 0.5:
        u = rng.random(shape, dtype=np.float32)
        # given u < lam, u / lam is uniform: -log of it gives exponential punctum brightness
        spikes = np.where(u < lam, -np.log(np.maximum(u, 1e-12) / np.float32(lam)), 0).astype(np.float32)
    else:
        spikes = rng.poisson(lam, shape).astype(np.float32)
    spikes = _blur(spikes, sig) if sig > 0.3 else spikes
    return np.float32(diffuse) + spikes * np.float32((1 - diffuse) / lam)  # both kinds have mean lam


def _illumination(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, float, float, float]:
    """Smooth uneven illumination: radial vignetting about an off-centre point and a linear
    gradient, returned as the pieces of ``1 - v * r^2 + g * t`` (column, row, v, g, angle)."""
    yy = np.linspace(-1, 1, size, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, size, dtype=np.float32)[None, :]
    return yy, xx, float(rng.uniform(0.0, 0.35)), float(rng.uniform(-0.2, 0.2)), float(rng.uniform(0, 2 * math.pi))


def _finish(rng: np.random.Generator, size: int, channels, refs, s: float, st: Style = _DEFAULT,
            negative: bool = False) -> np.ndarray:
    """Gain, out-of-focus haze and blur, shot/read noise and offset -> H x W x 4 in [0, 1].

    `refs`: each channel's in-cell 99th percentile before gain (it is set to a level drawn from
    `_LEVELS`); `s`: output px per microscope px. Noise is specified at the microscope's
    resolution (at 2048 px a pixel is smooth at the 1 px scale, as real fields are); a
    downscaled field averages 1/s^2 pixels into one, so its noise is s times smaller. The
    background is mostly exact zeros (a subtracted dark level), as in real HPA images.
    """
    H, W = channels[0].shape
    sn = min(1.0, s)
    # optical blur: sigma 0.9-1.4 microscope px in focus, 3-7 px out of focus
    focus = float(rng.uniform(0.9, 1.4) if rng.random() >= st.p_defocus else rng.uniform(3.0, 7.0)) * s
    yy, xx, vig, grad, gang = _illumination(rng, size)
    cy, cx = (float(v) for v in rng.uniform(-0.4, 0.4, 2))
    light = (1 - vig * 0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2)) + grad * (math.sin(gang) * yy + math.cos(gang) * xx)
    light = np.clip(light, 0.3, None).astype(np.float32)
    faint = rng.random() < st.p_faint or negative  # no specific staining: the camera shows little
    gain = float(rng.uniform(*st.gain))
    small = (max(8, W // 8), max(8, H // 8))
    out = np.empty((H, W, 4), np.float32)
    for i, (name, ch, ref) in enumerate(zip(("red", "green", "blue", "yellow"), channels, refs)):
        lo, hi = _FAINT if (faint and name == "green") else _LEVELS[name]
        x = ch * np.float32(rng.uniform(lo, hi) * gain / ref if ref > 1e-6 else 0.0)
        # out-of-focus light: a wide halo around everything bright
        halo = cv2.resize(_blur(cv2.resize(x, small, interpolation=cv2.INTER_AREA), 2.5), (W, H),
                          interpolation=cv2.INTER_LINEAR)
        x = (_blur(x, focus) + float(rng.uniform(0.03, 0.12)) * halo) * light
        shot = float(rng.uniform(0.0008, 0.004)) * (sn * st.noise) ** 2  # variance per unit signal
        read = float(rng.uniform(0.0025, 0.007)) * sn * st.noise
        # dark level subtracted: the background and the dimmest cytoplasm are exact zeros
        offset = -float(rng.uniform(0.0, 0.008)) * gain - float(rng.uniform(-0.3, 1.5)) * read
        # shot (variance ~ signal) and read noise in one Gaussian draw
        x += np.sqrt(np.maximum(x, 0) * shot + read * read) * rng.standard_normal((H, W), dtype=np.float32)
        x += offset
        np.clip(x, 0.0, 1.0, out=out[..., i])
    return out


def draw_field(rng: np.random.Generator | int, size: int = 512, labels: list[int] | None = None,
               n_cells: int | None = None, heterogeneity: bool = True,
               n_mitotic: int | None = None, *, style: "str | Style" = "default",
               field_px: int | None = None) -> SynthField:
    """Draw one synthetic field of `size` x `size` pixels.

    `labels` fixes the image label set (default: drawn from the real frequencies); with
    ``heterogeneity=False`` every interphase cell shows every label (used to render one class).
    `style` names a preset of `STYLES` (or is a `Style`); `field_px` is the field's side in
    microscope px (default `default_field_px(size)`: the size itself from 1728 px up, else a
    downscaled 2048 px field). Returns a `SynthField` with a float32 RGBY image in [0, 1]
    before quantisation.
    """
    st = get_style(style)
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    size = int(size)
    field_px = int(field_px or default_field_px(size))
    s = size / field_px  # output px per microscope px
    # independent streams: changing the labels leaves geometry, textures and noise unchanged
    rng, rng_lab, rng_pat, rng_img = rng.spawn(4)
    if labels is None:
        labels = draw_image_labels(rng_lab)
    labels = sorted(set(int(l) for l in labels))
    if n_cells is None:
        # the real train table: median 17 cells per 2048 px field (10-35 for 10-90%), 27 per 3072
        rel = field_px / REF_SIZE
        med = 17.0 * st.density * rel ** 1.15
        n_cells = int(np.clip(round(rng.lognormal(math.log(med), 0.48)), 4, max(8, round(110 * rel * rel))))
    if n_mitotic is None:
        n_mitotic = int(rng.binomial(n_cells, st.p_mitotic))
        if MITOSIS in labels:
            n_mitotic = max(n_mitotic, int(rng.integers(1, 4)))
    n_mitotic = min(n_mitotic, n_cells)
    cells = _place_cells(rng, size, n_cells, n_mitotic, st, field_px)
    pad = max(8, size // 8)
    # clipped below so that a cell never reaches past 1 / (1 - 0.13 * 1.75) = 1.3 of its radius
    wobble = np.maximum(_noise(rng, (size + 2 * pad, size + 2 * pad), max(1.0, 90 * s)), -1.75)
    ruffle = None
    if st.ruffle > 0:
        ruffle = (st.ruffle * np.clip(_noise(rng, wobble.shape, max(0.7, 10 * s)), -2, 2)).astype(np.float32)
    lab, nuc, dcell = _rasterise(cells, size, wobble, rng, ruffle)
    _assign_labels(rng_lab, cells, labels, heterogeneity, st)

    # distances to background and to contacts between cells (the image border is neither:
    # cells go on beyond it), for thickness profiles, valleys and rims
    lp = cv2.copyMakeBorder(lab, 1, 1, 1, 1, cv2.BORDER_REPLICATE)
    contact = np.zeros(lp.shape, bool)
    dh = (lp[:, 1:] != lp[:, :-1]) & (lp[:, 1:] > 0) & (lp[:, :-1] > 0)
    dv = (lp[1:, :] != lp[:-1, :]) & (lp[1:, :] > 0) & (lp[:-1, :] > 0)
    contact[:, 1:] |= dh
    contact[:, :-1] |= dh
    contact[1:, :] |= dv
    contact[:-1, :] |= dv
    edge_bg = cv2.distanceTransform((lp > 0).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    edge_int = cv2.distanceTransform((~contact).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    valley = float(rng_img.uniform(*st.valley))
    valley_w = max(0.5, float(rng_img.uniform(*st.valley_px)) * s)
    # cytoplasm thickness: a dome over the cell, thin lamella at free edges (fall-off within
    # ~25 microscope px) and a valley where two cells touch (wide and slight, or a thin seam)
    le = max(float(rng_img.uniform(*st.lamella_px)) * s, 1.0)
    prof = (1 - np.exp(-edge_bg / le)) * (1 - valley * np.exp(-edge_int / valley_w)) * (1.15 - 0.5 * dcell * dcell)
    prof = np.where(lab > 0, prof, 0).astype(np.float32)
    edge = np.minimum(edge_bg, edge_int)

    H = W = size
    red = np.zeros((H, W), np.float32)
    green = np.zeros((H, W), np.float32)
    blue = np.zeros((H, W), np.float32)
    yellow = np.zeros((H, W), np.float32)
    thick = max(1, int(round(2.2 * s)))

    # ER network: the zero set of smooth noise is a net of curved tubules
    # (mesh ~15 microscope px; below ~1 px per tubule it blurs into the fine texture it is)
    er_noise = _noise(rng_img, (H, W), max(0.7, 4 * s))
    er_net = np.exp(-(er_noise / 0.4) ** 2).astype(np.float32)
    # chromatin: fine grain, and coarse clumps made from the same noise (one random draw)
    chroma_fine = _noise(rng_img, (H, W), max(0.6, 1.8 * s))
    chroma = _blur(chroma_fine, max(0.6, 4.8 * s))
    chroma *= np.float32(1.0 / max(float(chroma[::4, ::4].std()), 1e-6))
    tex_field = 1 + st.chromatin * (0.22 * np.clip(chroma_fine, -2.5, 2.5) + 0.16 * np.clip(chroma, -2.5, 2.5))
    np.maximum(tex_field, 0.15, out=tex_field)

    cell_level = np.exp(rng_img.normal(0, st.cell_sd, len(cells) + 1)).astype(np.float32)
    # the odd cell lies in another focal plane (rounded up, or on top of its neighbours)
    defocus = rng_img.random(len(cells) + 1) < 0.06
    for c in cells:
        ctx = _Ctx(c, lab, nuc, dcell, edge, prof, s)
        own = ctx.own
        b_local = np.zeros(ctx.shape, np.float32)
        nucleoli = _nucleoli(rng, c, st.nucleoli, st.nucleolus_size)
        nmap = _nucleoli_map(ctx, nucleoli)
        ang = rng.uniform(0, 2 * math.pi)
        centro = (c.ny + 1.15 * c.rn * math.sin(ang), c.nx + 1.15 * c.rn * math.cos(ang))
        spindle = None
        if c.mitotic:
            # metaphase: chromatin condensed to a plate, spindle poles on either side; or
            # prometaphase: an irregular clump of condensed chromosomes (one piece: star-shaped)
            pa = c.cang + math.pi / 2
            if rng.random() < 0.6:
                plate = np.abs((ctx.xx - c.nx) * math.cos(pa) + (ctx.yy - c.ny) * math.sin(pa))
                along = np.abs(-(ctx.xx - c.nx) * math.sin(pa) + (ctx.yy - c.ny) * math.cos(pa))
                chrom = np.clip(1.0 - plate / (0.22 * c.rn), 0, 1) * np.clip(1.0 - along / (0.95 * c.rn), 0, 1)
                chrom = (chrom > 0.05).astype(np.float32) * own
            else:
                rc = 0.75 * c.rn
                chrom = (_polar_dist((ctx.xx - c.nx) / rc, (ctx.yy - c.ny) / rc, _harmonics(rng, 6, 0.5)) < 1.0)
                chrom = chrom.astype(np.float32) * own
            nuc[ctx.sl][ctx.nuc & (chrom == 0)] = 0  # the nucleus of a mitotic cell is its chromatin
            nuc[ctx.sl][(chrom > 0) & own] = c.id
            ctx.nuc = nuc[ctx.sl] == c.id
            ctx.cyto = own & ~ctx.nuc
            # condensed chromatin stains about twice as bright as an interphase nucleus
            b_local += chrom * (0.85 + 0.3 * np.clip(chroma_fine[ctx.sl], -1.5, 1.5)) * 1.6
            pole_d = 0.95 * c.rn
            poles = [(c.ny + pole_d * math.sin(pa), c.nx + pole_d * math.cos(pa)),
                     (c.ny - pole_d * math.sin(pa), c.nx - pole_d * math.cos(pa))]
            lines = []
            for py, px in poles:
                for t in np.linspace(-0.8, 0.8, 12):
                    ty = c.ny + t * c.rn * math.cos(pa)
                    tx = c.nx - t * c.rn * math.sin(pa)
                    lines.append(np.array([[px - ctx.x0, py - ctx.y0], [tx - ctx.x0, ty - ctx.y0]]))
                # astral microtubules: short rays away from the plate
                a0 = math.atan2(py - c.ny, px - c.nx)
                for a in a0 + rng.uniform(-1.2, 1.2, 8):
                    L = c.rn * rng.uniform(0.3, 0.7)
                    lines.append(np.array([[px - ctx.x0, py - ctx.y0],
                                           [px - ctx.x0 + L * math.cos(a), py - ctx.y0 + L * math.sin(a)]]))
            spindle = _blur(_polylines(ctx.shape, lines, 1.0, thick), max(0.7, 3 * s)) * own
            spindle += _splat(ctx.shape, [p[0] - ctx.y0 for p in poles], [p[1] - ctx.x0 for p in poles],
                              1.0, max(0.7, 5 * s))
            mt = spindle * 1.2 + 0.35 * ctx.prof
            centro = poles[0]
        else:
            # DNA: clumpy, grainy chromatin, dark nucleoli, nuclei of quite different brightness
            dark = float(rng.uniform(*st.nucleolus_dark))
            b = ctx.nuc_fill * tex_field[ctx.sl] * (1 - dark * nmap) * float(np.exp(rng.normal(-0.35, 0.3)))
            b_local += b * ctx.nuc
            mt = _microtubules(rng, ctx, centro, max(1, int(round(1.2 * s)))) * own * 0.8
            mt = _blur(mt, max(0.6, 0.8 * s)) * 1.6 * (ctx.prof + 0.1) * np.where(ctx.nuc, 0.3, 1.0)
            mt += 0.05 * ctx.prof
        level = float(np.exp(rng.normal(0, st.level_sd)))  # cells differ in tubulin/ER content
        r_local = mt * level * float(rng.uniform(0.8, 1.2)) * own
        # tubular network everywhere, sheets (diffuse) close to the nucleus
        er = (0.06 + 0.35 * ctx.pn + 0.9 * er_net[ctx.sl]) * (0.35 + 0.65 * ctx.pn) * ctx.prof
        er = np.where(ctx.nuc, 0.12 * ctx.prof, er)
        er += 0.5 * np.exp(-(((ctx.dn - 1.0) * c.rn) / max(0.7, 6 * s)) ** 2) * own * (not c.mitotic)
        er_l = er.astype(np.float32) * own
        y_local = er_l * level * float(rng.uniform(0.8, 1.2))
        gl = _render_patterns(rng_pat, ctx, c.labels, er_l, mt * own, nucleoli, nmap, centro, spindle, thick,
                              st.amp)
        gl = gl * own * cell_level[c.id] + 0.025 * ctx.prof  # non-specific background of every cell
        layers = [r_local, gl, b_local, y_local]
        if defocus[c.id]:
            sig = max(0.7, float(rng_img.uniform(4.0, 9.0)) * s)
            layers = [_blur(np.ascontiguousarray(x, dtype=np.float32), sig) * 0.8 for x in layers]
        for dst, x in zip((red, green, blue, yellow), layers):
            dst[ctx.sl] += x

    # antibody staining is punctate: bright puncta 2-4 px across (microscope px) over a faint
    # diffuse part; the pattern sets where and how densely they lie; the ER stain is granular
    green *= _puncta(rng_img, (H, W), s)
    yellow *= 0.5 + 0.5 * _puncta(rng_img, (H, W), s)
    # the gains are set on the stain in the cells, before debris (which may then saturate)
    inside = lab[::2, ::2] > 0
    refs = [float(np.percentile(ch[::2, ::2][inside], 99)) if inside.any() else float(ch.max())
            for ch in (red, green, blue, yellow)]
    # debris: dust and antibody aggregates anywhere, cells or background, brightest in green,
    # some also fluorescent in the other channels; a few larger irregular clumps
    k = int(rng_img.poisson(2.5))
    if k:
        ys, xs = rng_img.uniform(0, H, k), rng_img.uniform(0, W, k)
        amp = rng_img.uniform(0.2, 1.2, k).astype(np.float32)
        big = rng_img.random(k) < 0.3
        for sel, sig in ((~big, max(0.6, 2.5 * s)), (big, max(0.8, 7 * s))):
            if not sel.any():
                continue
            # a clump is a few spots together: irregular rather than a disc
            m = 1 + 3 * int(sig > 1)
            jy = np.repeat(ys[sel], m) + rng_img.normal(0, sig, m * int(sel.sum()))
            jx = np.repeat(xs[sel], m) + rng_img.normal(0, sig, m * int(sel.sum()))
            spots = _splat((H, W), jy, jx, np.repeat(amp[sel], m) / m ** 0.5, sig)
            green += spots
            others = rng_img.uniform(0, 0.5, 3).astype(np.float32) * (rng_img.random(3) < 0.5)
            for ch, w in zip((red, blue, yellow), others):
                if w > 0:
                    ch += w * spots
    clean = np.stack([red, green, blue, yellow], axis=-1)
    image = _finish(rng_img, size, (red, green, blue, yellow), refs, s, st,
                    negative=not any(c.labels for c in cells))
    cell_labels = [list(c.labels) if c.labels else [NEGATIVE] for c in cells]
    locs = sorted({l for c in cells for l in c.labels})
    image_labels = locs if locs else [NEGATIVE]
    return SynthField(image=image, clean=clean, cells=lab, nuclei=nuc, cell_labels=cell_labels,
                      image_labels=image_labels, mitotic=[c.mitotic for c in cells], style=st.name,
                      field_px=field_px)


def quantise(image: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Float [0, 1] image -> uint8 (x 255) or uint16 (x 65535), rounded."""
    if bit_depth == 8:
        return np.round(image * 255.0).astype(np.uint8)
    if bit_depth == 16:
        return np.round(image * 65535.0).astype(np.uint16)
    raise ConfigError(f"--bit-depth must be 8 or 16, got {bit_depth}")


# --------------------------------------------------------------------------------------------
# masks in the competition encoding


def encode_masks(label_image: np.ndarray, ids) -> list[str]:
    """Competition encoding of ``label_image == k`` for each k in `ids` (text, byte-identical
    to the official per-mask encoder; one pass over the image via `kit.rle.encode_label_image`)."""
    from kit.rle import encode_label_image

    enc = encode_label_image(label_image)
    return [enc[int(k)] for k in ids]


# --------------------------------------------------------------------------------------------
# dataset


def image_id(seed: int, split: str, index: int) -> str:
    """Deterministic uuid-like ID for image `index` of `split`."""
    h = hashlib.sha256(f"kit-synth:{seed}:{split}:{index}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _write_png(path: Path, img: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"cannot write {path}")


# real image-size mix of the HPA 2021 train set (images per side length)
REAL_SIZE_COUNTS = {2048: 17955, 3072: 3842, 4096: 9}


def size_weights(sizes) -> np.ndarray:
    """Probabilities for `sizes`: the real HPA mix where every size occurs there, else uniform."""
    sizes = [int(x) for x in sizes]
    if all(x in REAL_SIZE_COUNTS for x in sizes):
        w = np.array([REAL_SIZE_COUNTS[x] for x in sizes], np.float64)
    else:
        w = np.ones(len(sizes))
    return w / w.sum()


def image_size(seed: int, split: str, index: int, sizes) -> int:
    """Side length of image `index` (its own random stream: independent of order and workers)."""
    sizes = [int(x) for x in sizes]
    if len(sizes) == 1:
        return sizes[0]
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index), 7])
    return sizes[int(rng.choice(len(sizes), p=size_weights(sizes)))]


# `kit.atomic.atomic_path` writes `<stem><suffix>` as `.<stem>.<8 random chars>.tmp<suffix>` first
_TEMP_NAME = re.compile(r"^\.(?P<stem>[^/]+)\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")
_OWN_FILES = {"train", "sample_submission", "train_solution", "test_solution", "cell_labels", "images", "synth"}


def _temp_stem(name: str) -> str | None:
    """The final file's stem when `name` is an atomic_path temporary, else None."""
    m = _TEMP_NAME.match(name)
    return m.group("stem") if m else None


def _remove_own_temporaries(out: Path, ids: set[str]) -> None:
    """Delete the temporaries a killed run of this dataset left (its PNGs, records and CSVs):
    never finished, never renamed, so nothing else will; other files are left alone."""
    for folder in (out, out / "train", out / "test", out / "truth", out / ".synth" / "train", out / ".synth" / "test"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            stem = _temp_stem(p.name)
            if stem and (stem in _OWN_FILES or stem.split("_", 1)[0] in ids) and p.is_file():
                p.unlink(missing_ok=True)


def _record_path(out: Path, split: str, iid: str) -> Path:
    return Path(out) / ".synth" / split / f"{iid}.json"


def _finished(out: Path, split: str, iid: str) -> bool:
    """The image has its record and every file the record vouches for (a file lost since is redrawn:
    same seed, same bytes)."""
    out = Path(out)
    files = [out / split / f"{iid}_{ch}.png" for ch in ("red", "green", "blue", "yellow")]
    files += [out / "truth" / f"{iid}_{kind}_mask.png" for kind in ("cell", "nuclei")]
    return _record_path(out, split, iid).is_file() and all(f.is_file() for f in files)


def _generate_one(job: tuple) -> tuple:
    import json

    out, split, index, size, seed, bit_depth, style, field_px = job
    iid = image_id(seed, split, index)
    rec = _record_path(Path(out), split, iid)
    if _finished(Path(out), split, iid):  # finished in an earlier run with the same arguments: skip
        r = json.loads(rec.read_text())
        return (split, iid, r["label"], r["pred"], [tuple(x) for x in r["rows"]], r["size"], r["style"],
                r["field_px"])
    cv2.setNumThreads(0)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    f = draw_field(rng, size, style=style, field_px=field_px)
    q = quantise(f.image, bit_depth)
    folder = Path(out) / split
    for k, ch in enumerate(("red", "green", "blue", "yellow")):
        _write_png(folder / f"{iid}_{ch}.png", np.ascontiguousarray(q[..., k]))
    _write_png(Path(out) / "truth" / f"{iid}_cell_mask.png", f.cells)
    _write_png(Path(out) / "truth" / f"{iid}_nuclei_mask.png", f.nuclei)
    ids = list(range(1, len(f.cell_labels) + 1))
    masks = encode_masks(f.cells, ids)
    pred = " ".join(f"{l} 1 {m}" for m, ls in zip(masks, f.cell_labels) for l in ls)
    rows = [(iid, k, format_label(ls)) for k, ls in zip(ids, f.cell_labels)]
    # the record is written last: it marks the image's files complete
    with atomic_open(rec, "w") as fh:
        json.dump({"label": f.label_string(), "pred": pred, "rows": rows, "size": size, "style": f.style,
                   "field_px": f.field_px}, fh)
    return split, iid, f.label_string(), pred, rows, size, f.style, f.field_px


def generate_dataset(out: str | Path, n_train: int, n_test: int, size: int = 512, seed: int = 0,
                     bit_depth: int = 8, workers: int = 1, sizes=None, style: str = "default",
                     field_px: int | None = None) -> Path:
    """Write a synthetic dataset in the Kaggle layout with truth (see module doc); returns `out`.

    `sizes` (e.g. ``[2048, 3072]``) mixes image sizes, drawn per image with the real HPA
    weights (`size_weights`); default: every image is `size` px. `style` is one of
    `STYLE_NAMES` (``mixed``: one style per image, `image_style`); `field_px` the side of every
    field in microscope px (default: `default_field_px` of each image's size). The arguments are recorded in
    ``out/synth.json``; a rerun with the same arguments skips the images already finished
    (each marked by ``out/.synth/<split>/<ID>.json``, written after its PNGs) and rewrites the
    CSVs, so an interrupted run resumes; other arguments into the same folder are refused.
    """
    import json

    from tqdm import tqdm

    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ConfigError(f"need at least one image (--train {n_train}, --test {n_test})")
    sizes = sorted({int(x) for x in sizes}) if sizes else [int(size)]
    if min(sizes) < 64 or max(sizes) > 8192:  # real fields are at most 4096 px
        raise ConfigError(f"--size must be 64..8192 px, got {min(sizes) if min(sizes) < 64 else max(sizes)}")
    if bit_depth not in (8, 16):
        raise ConfigError(f"--bit-depth must be 8 or 16, got {bit_depth}")
    if style != MIXED:
        get_style(style)
    if field_px is not None and int(field_px) < 64:
        raise ConfigError(f"--field-px must be at least 64 px, got {field_px}")
    out = Path(out)
    params = {"generator": "kit.synth", "version": 3, "n_train": int(n_train), "n_test": int(n_test),
              "sizes": sizes, "seed": int(seed), "bit_depth": int(bit_depth), "style": str(style),
              "field_px": None if field_px is None else int(field_px)}
    meta = out / "synth.json"
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except ValueError:
            old = None
        if old != params:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in params.items()
                             if not isinstance(old, dict) or old.get(k) != v) if isinstance(old, dict) else "unreadable"
            raise ConfigError(f"{out} already holds another dataset made with other arguments ({meta}: {diff}); "
                              "repeat the same arguments to resume, or choose an empty or new --out folder")
    # refuse to mix with another dataset: files of IDs we will not write would stay behind.
    # Only finished files count: a hidden temporary (`.<ID>_<ch>.<rand>.tmp.png`) is what a kill
    # during a write leaves, never a file of a dataset
    ours_all: set[str] = set()
    for split, n in (("train", n_train), ("test", n_test)):
        ours = {image_id(seed, split, i) for i in range(n)}
        ours_all |= ours
        folder = out / split
        stale = sorted(p.name for p in folder.glob("*.png")
                       if not _temp_stem(p.name) and p.name.rsplit("_", 1)[0] not in ours) \
            if folder.is_dir() else []
        if stale:
            raise ConfigError(f"{folder} already holds {len(stale)} image file(s) of another dataset "
                              f"(e.g. {stale[0]}); choose an empty or new --out folder")
    _remove_own_temporaries(out, ours_all)
    if not meta.is_file():  # an earlier folder without synth.json: its records cannot be trusted
        import shutil

        shutil.rmtree(out / ".synth", ignore_errors=True)
    for sub in ("train", "test", "truth", ".synth/train", ".synth/test"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    with atomic_open(meta, "w") as fh:
        json.dump(params, fh, indent=1)
    jobs = [(str(out), split, i, image_size(seed, split, i, sizes), seed, bit_depth, image_style(seed, split, i, style),
             field_px) for split, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    todo = sum(not _finished(out, j[1], image_id(seed, j[1], j[2])) for j in jobs)
    bar = dict(total=len(jobs), initial=0, desc="synth", unit="img", disable=None)
    results = list(tqdm(pool_map(_generate_one, jobs, workers if todo > 1 else 1), **bar))

    # the CSVs last: they list only complete images
    train = [r for r in results if r[0] == "train"]
    test = [r for r in results if r[0] == "test"]
    with atomic_open(out / "train.csv", "w", newline="") as f:
        f.write("ID,Label\n")
        for r in train:
            f.write(f"{r[1]},{r[2]}\n")
    with atomic_open(out / "sample_submission.csv", "w", newline="") as f:
        f.write("ID,ImageWidth,ImageHeight,PredictionString\n")
        for r in test:
            f.write(f"{r[1]},{r[5]},{r[5]},\n")
    for name, rs in (("train_solution.csv", train), ("test_solution.csv", test)):
        with atomic_open(out / name, "w", newline="") as f:
            f.write("ID,ImageWidth,ImageHeight,PredictionString\n")
            for r in rs:
                f.write(f"{r[1]},{r[5]},{r[5]},{r[3]}\n")
    with atomic_open(out / "truth" / "cell_labels.csv", "w", newline="") as f:
        f.write("ID,cell_id,Label\n")
        for r in results:
            for iid, k, label in r[4]:
                f.write(f"{iid},{k},{label}\n")
    with atomic_open(out / "truth" / "images.csv", "w", newline="") as f:
        f.write("ID,split,size,field_px,style\n")
        for r in results:
            f.write(f"{r[1]},{r[0]},{r[5]},{r[7]},{r[6]}\n")
    return out


def configure_synth(parser) -> None:
    from kit.cli import folder_arg

    parser.add_argument("--out", required=True, type=folder_arg, help="output folder (Kaggle layout + truth/)")
    parser.add_argument("--train", type=int, default=64, help="number of train images (default 64)")
    parser.add_argument("--test", type=int, default=16, help="number of test images (default 16)")
    parser.add_argument("--size", type=int, default=512,
                        help="image side in pixels (default 512); from 1728 px up the image is at the real "
                             "microscope resolution (a 3072 px field holds 2.25x the area of a 2048 px one), "
                             "below it a whole 2048 px field downscaled (see --field-px)")
    parser.add_argument("--sizes", default=None, metavar="PX,PX",
                        help="mix of image sides, e.g. 2048,3072, drawn per image with the real HPA "
                             "weights (2048: 17,955 images, 3072: 3,842); overrides --size")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    parser.add_argument("--bit-depth", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--style", default="default", choices=STYLE_NAMES,
                        help="kind of field: default (like the real median field), confluent, irregular, "
                             "textured, mitotic, heterogeneous, dim, hard (all of them) or mixed (one per "
                             "image, a third default); see kit/synth.py")
    parser.add_argument("--field-px", type=int, default=None, metavar="PX",
                        help="side of the field in microscope px (default: the size from 1728 px up, else "
                             "2048): e.g. --size 512 --field-px 512 draws 512 px crops at full resolution")
    parser.set_defaults(func=_run_synth)


def _run_synth(args) -> int:
    sizes = None
    if args.sizes:
        try:
            sizes = [int(t) for t in str(args.sizes).split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--sizes must be comma-separated integers, got {clip(args.sizes)}") from None
        if not sizes:
            raise ConfigError(f"--sizes must name at least one size, got {clip(args.sizes)}")
    out = generate_dataset(args.out, args.train, args.test, args.size, args.seed, args.bit_depth, args.workers,
                           sizes=sizes, style=args.style, field_px=args.field_px)
    what = ",".join(map(str, sorted(set(sizes)))) if sizes else str(args.size)
    print(f"wrote {args.train} train + {args.test} test images ({what} px, {args.bit_depth}-bit, style "
          f"{args.style}) to {out}")
    return 0
