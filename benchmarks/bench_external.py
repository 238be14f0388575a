"""Segment + tiles throughput per core at 2048 px on real fields, and the projected cost of the external set.

    .venv/bin/python benchmarks/bench_external.py [--repeats 3] [--tile 128] [--fields 83703]

Per field, one thread, CPU seconds of this process (medians over repeats and fields): decoding
the four channels (the baseline, measured in the same run: every stage pays it), the classical
segmenter (`kit.segment`, its default 1/4 working scale), the cell table with intensities and the
tiles (`kit.cells`), and what a mask-cache file and the tiles take on disk. Fields: the four real
Kaggle 2021 fields (8-bit PNG; the 3072 px one resized to 2048) and the 2048 px HPA website field
(tinted JPEG: the format of the public images). The projection multiplies by ``--fields`` (default
83,703: the HPAv18 list plus the 2019-only train images that `kit external labels` keeps) and
divides by a cluster's cores; it is arithmetic on the measured per-field figures, not a run of
that size.
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

cv2.setNumThreads(0)

from kit.cells import cell_table, extract_tiles  # noqa: E402
from kit.images import read_sample  # noqa: E402
from kit.segment import segment_image  # noqa: E402
from kit.segment.cache import MaskCache  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real"


def _cpu(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def fields() -> list[tuple[str, Path, str]]:
    kaggle = REAL / "kaggle2021_fields" / "train"
    out = [(p.name[: -len("_blue.png")], kaggle, "png") for p in sorted(kaggle.glob("*_blue.png"))]
    web = REAL / "website_fields"
    out += [(p.name[: -len("_blue.jpg")], web, "jpg") for p in sorted(web.glob("*_blue.jpg"))
            if cv2.imread(str(p), cv2.IMREAD_REDUCED_GRAYSCALE_8).shape[0] * 8 >= 2048]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--fields", type=int, default=83_703)
    parser.add_argument("--cores", type=int, nargs="+", default=[1, 64, 512])
    args = parser.parse_args()
    found = fields()
    if not found:
        sys.exit(f"no real fields under {REAL}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {len(found)} real fields; one thread")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_external_") as tmp:
        cache = MaskCache(tmp)
        for image_id, folder, kind in found:
            for _ in range(args.repeats):
                t_read, image = _cpu(lambda: read_sample(folder, image_id))
                if image.shape[0] != 2048:
                    image = cv2.resize(image, (2048, 2048), interpolation=cv2.INTER_AREA)
                t_seg, (nuclei, cells) = _cpu(lambda: segment_image(image))
                t_tab, table = _cpu(lambda: cell_table(nuclei, cells, image))
                t_tile, (tiles, _) = _cpu(lambda: extract_tiles(image, cells, args.tile))
                t_save, path = _cpu(lambda: cache.save(image_id, nuclei, cells, table))
                rows.append({"id": image_id, "kind": kind, "read": t_read, "segment": t_seg, "table": t_tab,
                             "tiles": t_tile, "save": t_save, "cells": int(cells.max()),
                             "mask_bytes": path.stat().st_size, "tile_bytes": tiles.nbytes})
    def med(key, kind=None):
        return statistics.median(r[key] for r in rows if kind is None or r["kind"] == kind)

    print(f"\n{'field':<38}{'kind':>5}{'cells':>6}{'read':>8}{'segment':>9}{'table':>8}{'tiles':>8}{'save':>8}   (CPU ms)")
    for image_id, _, kind in found:
        sel = [r for r in rows if r["id"] == image_id]
        m = {k: statistics.median(r[k] for r in sel) * 1000 for k in ("read", "segment", "table", "tiles", "save")}
        print(f"{image_id:<38}{kind:>5}{sel[0]['cells']:>6}" + "".join(f"{m[k]:>8.0f}" if k != "segment" else f"{m[k]:>9.0f}"
                                                                          for k in ("read", "segment", "table", "tiles", "save")))
    work = {k: med(k) for k in ("segment", "table", "tiles", "save")}
    per_field_work = sum(work.values())
    read_png, read_jpg = med("read", "png"), (med("read", "jpg") if any(r["kind"] == "jpg" for r in rows) else med("read"))
    per_field = read_jpg + per_field_work  # the external set is website JPEGs
    print(f"\nper 2048 px field, one core: decode {read_png * 1000:.0f} ms (PNG) / {read_jpg * 1000:.0f} ms (website JPEG) "
          f"[baseline]; segment+table+tiles+save {per_field_work * 1000:.0f} ms = {per_field_work / read_png:.1f}x the PNG decode")
    print(f"throughput: {3600 / per_field:.0f} fields per core-hour (JPEG decode + segment + {args.tile} px tiles + save)")
    mask_mb = statistics.median(r["mask_bytes"] for r in rows) / 2**20
    tile_mb = statistics.median(r["tile_bytes"] for r in rows) / 2**20
    core_h = args.fields * per_field / 3600
    print(f"\nPROJECTED for {args.fields} external fields (arithmetic on the figures above, not a run):")
    print(f"  {core_h:.0f} core-hours; " + "; ".join(f"{c} cores: {core_h / c * 60:.0f} min wall" if core_h / c < 2
                                                     else f"{c} cores: {core_h / c:.1f} h wall" for c in args.cores))
    print(f"  shared cache: masks {mask_mb:.2f} MB/field -> {mask_mb * args.fields / 1024:.0f} GB; tiles "
          f"{tile_mb:.2f} MB/field -> {tile_mb * args.fields / 1024:.0f} GB (uint8, {args.tile} px, 4 channels)")
    print("  (the segmenter here is the classical one; the HPA Cell Segmentator on a GPU has other costs)")


if __name__ == "__main__":
    main()
