"""Runtime estimate of `predict` from measured per-stage figures, scaled to a test set's size mix.

Per field: decode (4 channels), segment (the configured backend), cell table + tiles (per cell),
the downscaled field, RLE of every mask, writing + validating the submission (per cell); per cell:
the cell CNN (folds x TTA tiles at the tiles/s of the path `kit.throughput` chose); per field: the
image CNN. The CPU stages are measured on real fields (``measure_stages``, by
``python -m kit bench --fields DIR``) and kept in a figures file (default: the one shipped in
``kit/data/runtime_figures.json``, measured on the dev machine on the four real Kaggle 2021 fields),
whose layout is::

    {"machine": {...}, "when": "...", "load": "1.0 1.2 1.1", "backend": "classical",
     "fields": [{"id", "side", "cells", "decode_s", "segment_s", "tiles_s", "field_s", "rle_s"}, ...],
     "per_mpx": {"decode": s, "segment": s, "field": s, "rle": s},      # seconds per megapixel
     "per_cell": {"tiles": s, "submission": s},                         # seconds per cell
     "cells_per_field": {"2048": 19.2, "3072": 31.0, "source": "..."},
     "cnn": {"resnet50@128": {"path": "...", "tiles_s": 40.1, "baseline_tiles_s": 20.3, "load": "..."}, ...}}

Decode, segmentation, field and RLE scale with the pixel count, tiles and the submission with the
cells, cells per field come from the real train table by image size (a size it lacks is scaled by
area, and says so). Every figure in the printed estimate says whether it was measured, and where.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from kit.atomic import atomic_open

FIGURES_PATH = Path(__file__).resolve().parent / "data" / "runtime_figures.json"
WARN_HOURS = 1.0  # print a warning when the estimate is above this
KAGGLE_LIMIT_H = 9.0
ANCHOR = "3rd place 2021: one model + segmentation on the 559 test images ~2 h on a P100 (ANCHORS.md; not measured here)"
# The real test set (hpa2021_sample_submission.csv): 68 x 1728, 462 x 2048, 29 x 3072.
TEST_SIZE_MIX = {1728: 68, 2048: 462, 3072: 29}


def size_mix(sample_csv: str | Path | None = None, sizes: dict | None = None) -> dict[int, int]:
    """{side: number of fields} from a sample_submission.csv (or a {id: (w, h)} dict)."""
    if sizes is None:
        if sample_csv is None:
            return dict(TEST_SIZE_MIX)
        import pandas as pd

        df = pd.read_csv(sample_csv, usecols=["ID", "ImageWidth", "ImageHeight"])
        sizes = {i: (int(w), int(h)) for i, w, h in zip(df["ID"], df["ImageWidth"], df["ImageHeight"])}
    mix: dict[int, int] = {}
    for w, h in sizes.values():
        side = int(round((int(w) * int(h)) ** 0.5))
        mix[side] = mix.get(side, 0) + 1
    return dict(sorted(mix.items()))


def cells_per_field_table(cells_csv: str | Path) -> dict:
    """Mean cells per image by image side from a table with ImageWidth and a space-separated `cells` column
    (the real hpa2021_train_4folded_cells.csv)."""
    import pandas as pd

    df = pd.read_csv(cells_csv, usecols=["ImageWidth", "cells"], dtype={"cells": str}, keep_default_na=False)
    n = df["cells"].str.split().str.len().fillna(0)
    out = {str(int(side)): round(float(n[df["ImageWidth"] == side].mean()), 2)
           for side in sorted(df["ImageWidth"].unique()) if (df["ImageWidth"] == side).sum() >= 20}
    out["source"] = f"mean cells per image by size in {Path(cells_csv).name} ({len(df)} real train images)"
    return out


def _timed(fn: Callable, *args):
    """(CPU seconds of this process, wall seconds, result). These stages run on one core, so on a
    shared machine their CPU time is what they cost on an idle core; the wall time is kept beside it."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.process_time() - c0, time.perf_counter() - w0, out


def measure_stages(images_dir: str | Path, ids: Sequence[str] | None = None, *, backend: str = "classical",
                   tile_size: int = 128, field_size: int = 512, repeats: int = 1,
                   log: Callable[[str], None] | None = None) -> dict:
    """Per-stage seconds on each field of `images_dir` (medians over `repeats`), and the per-megapixel /
    per-cell figures fitted from them (the figures file layout of the module doc, without ``cnn``)."""
    import tempfile

    from kit.cells import cell_table, extract_tiles
    from kit.fields import downscale_field as make_field
    from kit.images import read_sample
    from kit.rle import encode_label_image
    from kit.segment import segment_image
    from kit.submission import ImagePrediction, validate_submission, write_submission
    from kit.throughput import load_average, machine_info

    images_dir = Path(images_dir)
    if ids is None:
        ids = sorted({p.name[: -len("_red.png")] for p in images_dir.glob("*_red.png")})
    load0 = load_average()
    rows = []
    for image_id in ids:
        rec: dict = {}
        for _ in range(repeats):
            def add(key, timing):
                rec.setdefault(key + "_s", []).append(timing[0])
                rec.setdefault(key + "_wall_s", []).append(timing[1])
                return timing[2]

            image = add("decode", _timed(read_sample, images_dir, image_id))
            nuclei, cells = add("segment", _timed(lambda im: segment_image(im, backend), image))
            tiles, table = add("tiles", _timed(lambda: extract_tiles(image, cells, tile_size,
                                                                     table=cell_table(nuclei, cells))))
            add("field", _timed(make_field, image, field_size))
            rle = add("rle", _timed(encode_label_image, cells))
            h, w = image.shape[:2]
            triples = [(c, 0.5, rle[int(k)]) for k in table["cell_id"] for c in range(19)]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "submission.csv"

                def write_and_check():
                    write_submission(path, {image_id: ImagePrediction(w, h, triples)}, [image_id], {image_id: (w, h)})
                    return validate_submission(path, check_masks=True)

                add("submission", _timed(write_and_check))
        row = {"id": image_id, "side": int(round((h * w) ** 0.5)), "cells": int(len(table))}
        row.update({k: round(statistics.median(v), 4) for k, v in rec.items()})
        rows.append(row)
        if log:
            log(f"  {image_id} {row['side']} px, {row['cells']} cells, CPU s (wall s): " +
                ", ".join(f"{k[:-2]} {row[k]:.3f} ({row[k[:-2] + '_wall_s']:.3f})" for k in rec if not k.endswith("_wall_s")))
    mpx = np.array([r["side"] ** 2 / 1e6 for r in rows])
    cells = np.array([max(r["cells"], 1) for r in rows])

    def per(key: str, unit: np.ndarray) -> float:  # least squares through the origin
        y = np.array([r[key] for r in rows])
        return round(float((unit * y).sum() / (unit * unit).sum()), 6)

    return {
        "machine": machine_info(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), "load": f"{load0} -> {load_average()}",
        "backend": backend, "tile_size": tile_size, "field_size": field_size, "images": str(images_dir),
        "fields": rows,
        "per_mpx": {"decode": per("decode_s", mpx), "segment": per("segment_s", mpx), "field": per("field_s", mpx),
                    "rle": per("rle_s", mpx)},
        "per_cell": {"tiles": per("tiles_s", cells), "submission": per("submission_s", cells)},
    }


def load_figures(path: str | Path | None = None) -> dict:
    path = Path(path) if path else FIGURES_PATH
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_figures(figures: dict, path: str | Path | None = None) -> Path:
    path = Path(path) if path else FIGURES_PATH
    with atomic_open(path, "w") as f:
        json.dump(figures, f, indent=1, sort_keys=True)
    return path


def cells_per_field(side: int, figures: dict, default: float = 19.0) -> tuple[float, str]:
    """(cells, how it was obtained) for a field of `side` px."""
    table = figures.get("cells_per_field") or {}
    sizes = {int(k): float(v) for k, v in table.items() if k.isdigit()}
    if side in sizes:
        return sizes[side], "real train table"
    if sizes:
        ref = min(sizes, key=lambda s: abs(s - side))
        return sizes[ref] * (side / ref) ** 2, f"scaled by area from {ref} px (no {side} px images in the table; not measured)"
    return default * (side / 2048.0) ** 2, "assumed (no cells table; not measured)"


@dataclass
class RuntimeEstimate:
    """Seconds of `predict` for a size mix; `parts` in seconds for the whole set, `labels` says where each came from."""

    n_images: int
    seconds: float
    parts: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    def lines(self) -> list[str]:
        out = [f"runtime estimate ({self.device}): {self.n_images} fields -> {_fmt(self.seconds)} "
               f"({self.hours:.2f} h)"]
        for k, v in sorted(self.parts.items(), key=lambda kv: -kv[1]):
            share = 100.0 * v / self.seconds if self.seconds else 0.0
            out.append(f"  {k:<22} {_fmt(v):>9} {share:5.1f}%  [{self.labels.get(k, '')}]")
        if self.hours > WARN_HOURS:
            out.append(f"WARNING: this config would take {self.hours:.1f} h on this device"
                       + (f" (over Kaggle's {KAGGLE_LIMIT_H:g} h limit)" if self.hours > KAGGLE_LIMIT_H else "")
                       + ": fewer folds/TTA, a smaller backbone or tile size, or a GPU")
        out.append(f"  anchor: {ANCHOR}")
        return out


def _fmt(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def estimate_predict(mix: dict[int, int], figures: dict, *, cell_tiles_s: float, image_fields_s: float,
                     n_folds: int = 1, tta: int = 1, cnn_label: str = "measured", segment_s_per_mpx: float | None = None,
                     segment_label: str | None = None, device: str = "cpu", image_label: str | None = None) -> RuntimeEstimate:
    """The estimate for `mix` ({side: fields}) from `figures` (module doc) and the CNN rates.

    `cell_tiles_s` / `image_fields_s`: tiles per second of ONE fold model (the ensemble costs
    n_folds x TTA of them per cell / field). `segment_s_per_mpx` overrides the figures' segmentation
    (another backend, e.g. the HPA Cell Segmentator on a GPU), labelled by `segment_label`.
    """
    src = figures.get("machine", {}).get("cpu", "?")
    where = (f"CPU time measured on {len(figures.get('fields', []))} real fields, {src}, {figures.get('when', '?')}, "
             f"load {figures.get('load', '?')}")
    per_mpx, per_cell = figures.get("per_mpx", {}), figures.get("per_cell", {})
    parts = {k: 0.0 for k in ("decode", "segment", "tiles", "field", "rle", "submission", "cell CNN", "image CNN")}
    labels = {k: where for k in ("decode", "tiles", "field", "rle", "submission")}
    labels["segment"] = segment_label or where + f" ({figures.get('backend', '?')})"
    seg_rate = per_mpx.get("segment", 0.0) if segment_s_per_mpx is None else segment_s_per_mpx
    cell_notes = []
    n_cells = 0.0
    for side, count in mix.items():
        mp = side * side / 1e6
        cells, how = cells_per_field(side, figures)
        n_cells += cells * count
        cell_notes.append(f"{count} x {side} px at {cells:.1f} cells ({how})")
        parts["decode"] += count * mp * per_mpx.get("decode", 0.0)
        parts["segment"] += count * mp * seg_rate
        parts["field"] += count * mp * per_mpx.get("field", 0.0)
        parts["rle"] += count * mp * per_mpx.get("rle", 0.0)
        parts["tiles"] += count * cells * per_cell.get("tiles", 0.0)
        parts["submission"] += count * cells * per_cell.get("submission", 0.0)
    n = sum(mix.values())
    parts["cell CNN"] = n_cells * n_folds * tta / max(cell_tiles_s, 1e-9)
    parts["image CNN"] = n * n_folds * tta / max(image_fields_s, 1e-9)
    labels["cell CNN"] = (f"{n_cells:.0f} cells x {n_folds} folds x TTA {tta} at {cell_tiles_s:.1f} tiles/s per model "
                          f"({cnn_label}); cells: " + "; ".join(cell_notes))
    labels["image CNN"] = (f"{n} fields x {n_folds} folds x TTA {tta} at {image_fields_s:.2f} fields/s per model "
                           f"({image_label or cnn_label})")
    return RuntimeEstimate(n, sum(parts.values()), parts, labels, device)


def cnn_rate(figures: dict, backbone: str, side: int) -> tuple[float, str] | None:
    """(tiles/s of one model on the chosen path, label) from the figures' ``cnn`` table, when measured."""
    rec = (figures.get("cnn") or {}).get(f"{backbone}@{side}")
    if not rec:
        return None
    cpu = figures.get("machine", {}).get("cpu", "?")
    return float(rec["tiles_s"]), (f"measured by kit bench on {cpu}, {rec.get('path', '?')}, {rec.get('when', '?')}, "
                                   f"load {rec.get('load', '?')}")


def cnn_table_from_bench(bench: dict) -> dict:
    """{"<backbone>@<side>": {path, tiles_s, baseline_tiles_s, when, load}} of the chosen inference rows of a
    `kit bench` JSON (one model per row, so tiles/s per model)."""
    out = {}
    for r in bench.get("rows", []):
        if r.get("mode") == "infer" and r.get("chosen"):
            key = f"{r['backbone']}@{r['side']}"
            base = next((b for b in bench["rows"] if b.get("baseline") and b.get("mode") == "infer"
                         and b["backbone"] == r["backbone"] and b["side"] == r["side"] and b.get("stage") == r.get("stage")), None)
            out[key] = {"path": r["path"], "tiles_s": r["tiles_s"], "ratio": r["ratio"],
                        "baseline_tiles_s": base["tiles_s"] if base else None,
                        "achieved_gflops": r.get("achieved_gflops"), "pct_peak": r.get("pct_peak"),
                        "when": bench.get("when"), "load": bench.get("load_before")}
    return out


def config_estimate(cfg, mix: dict[int, int], *, n_folds: int, tta: int = 1, figures: dict | None = None,
                    cell_rate: tuple[float, str] | None = None, image_rate: tuple[float, str] | None = None,
                    device: str = "cpu") -> RuntimeEstimate | None:
    """The `predict` estimate of a run config: CNN rates given (measured by the probe of this run), else
    the figures' ``cnn`` table for the config's backbones, else a FLOP-based rate scaled from the
    nearest measured backbone (labelled not measured). None when nothing at all was measured."""
    figures = load_figures() if figures is None else figures
    if not figures.get("per_mpx"):
        return None
    tile, fsize = cfg.data.tile_size, cfg.data.field_size
    cell_rate = cell_rate or cnn_rate(figures, cfg.cell_model.backbone, tile) or _scaled_rate(figures, cfg.cell_model.backbone, tile)
    image_rate = image_rate or cnn_rate(figures, cfg.image_model.backbone, fsize) or _scaled_rate(figures, cfg.image_model.backbone, fsize)
    if not cell_rate or not image_rate:
        return None
    seg = None
    if cfg.data.segment_backend != figures.get("backend", "classical"):
        seg = (0.0, f"{cfg.data.segment_backend}: not measured here (not included)")
    return estimate_predict(mix, figures, cell_tiles_s=cell_rate[0], image_fields_s=image_rate[0], n_folds=n_folds,
                            tta=tta, cnn_label=cell_rate[1], image_label=image_rate[1],
                            segment_s_per_mpx=seg[0] if seg else None, segment_label=seg[1] if seg else None,
                            device=device)


def _scaled_rate(figures: dict, backbone: str, side: int) -> tuple[float, str] | None:
    """A rate from the measured achieved GFLOP/s of the nearest measured input (FLOPs counted now)."""
    cnn = figures.get("cnn") or {}
    if not cnn:
        return None
    try:
        from kit.bench import gflops_per_tile
        from kit.models import build_model

        gf = gflops_per_tile(build_model(backbone), side)
    except Exception:
        return None
    key, rec = max(cnn.items(), key=lambda kv: kv[1].get("achieved_gflops", 0.0))
    if not rec.get("achieved_gflops"):
        return None
    return rec["achieved_gflops"] / gf, (f"not measured: {gf:.2f} GFLOP per input at the {rec['achieved_gflops']:.0f} "
                                         f"GFLOP/s measured for {key}")


def cpu_s_per_field(figures: dict | None = None, side: int = 2048) -> tuple[float, str] | None:
    """Measured CPU work of one `side` px field (decode, segment, tiles, field, RLE, submission) and its
    label: the figure the Kaggle kernel estimate (`kit.kaggle.runtime`) uses for every hardware kind
    (decoding and the classical segmenter stay on the CPU)."""
    figures = load_figures() if figures is None else figures
    if not figures.get("per_mpx"):
        return None
    est = estimate_predict({side: 1}, figures, cell_tiles_s=float("inf"), image_fields_s=float("inf"))
    seconds = sum(v for k, v in est.parts.items() if "CNN" not in k)
    return seconds, est.labels["decode"]


def measured_gflops(figures: dict | None = None, backbone: str = "resnet50") -> tuple[float, str] | None:
    """Achieved GFLOP/s of the chosen inference path measured by `kit bench` (the backbone's cell row,
    else the best measured), with its label: the CNN rate of the ``here-cpu`` Kaggle estimate."""
    figures = load_figures() if figures is None else figures
    cnn = {k: v for k, v in (figures.get("cnn") or {}).items() if v.get("achieved_gflops")}
    if not cnn:
        return None
    mine = [k for k in cnn if k.startswith(backbone + "@")]
    key = min(mine, key=lambda k: int(k.split("@")[1])) if mine else max(cnn, key=lambda k: cnn[k]["achieved_gflops"])
    rec = cnn[key]
    return float(rec["achieved_gflops"]), (f"measured by kit bench: {key} {rec.get('path')}, {rec['achieved_gflops']:.0f} "
                                           f"GFLOP/s, {rec.get('when')}, load {rec.get('load')}")
