"""Benchmark: `encode_label_image` (one pass over the label image) vs the host's per-mask encoder.

The reference is the competition's published `encode_binary_mask` (pycocotools on a full-frame
H x W x 1 Fortran copy per cell), applied to ``labels == id`` for every cell, as a naive
submission writer does. Both run on the same synthetic label images in the same process; the
outputs are checked byte for byte. Prints medians of CPU time (wall time beside it) and the
ratio; CPU time of this process is the steadier figure when other jobs share the machine.
Also shows decoding all cells to full frames vs to bounding-box crops.

    .venv/bin/python benchmarks/bench_rle.py                 # 2048 px / 25 cells and 3072 px / 100 cells
    .venv/bin/python benchmarks/bench_rle.py --repeats 7 --cases 2048:25
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import reference_encode_binary_mask  # noqa: E402
from kit.rle import decode_binary_mask, decode_to_crop, encode_label_image  # noqa: E402


def label_image(size: int, n_cells: int, seed: int) -> np.ndarray:
    """Touching, irregular cells: a Voronoi tessellation of random seeds, clipped to discs."""
    import cv2

    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), np.int32)
    radius = int(size / np.sqrt(n_cells) * 0.62)
    centres = rng.integers(0, size, (n_cells, 2))
    for k, (y, x) in enumerate(centres, start=1):
        axes = (int(radius * rng.uniform(0.6, 1.0)), int(radius * rng.uniform(0.6, 1.0)))
        cv2.ellipse(labels, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, int(k), -1)
    return labels


def median_time(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of `repeats` calls. CPU time of this process is the
    steadier figure on a machine shared with other jobs (everything here is single-threaded)."""
    cpu, wall = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return statistics.median(cpu), statistics.median(wall)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="2048:25,3072:100", help="comma-separated SIZE:CELLS")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"medians of {args.repeats} runs, CPU time of this process (wall time in brackets); the machine "
          "may be shared with other jobs, so read the ratios")
    print(f"{'case':>12}  {'cells':>5}  {'reference':>18}  {'encode_label_image':>18}  {'ratio':>6}  "
          f"{'decode full':>11}  {'decode crop':>11}")
    for case in args.cases.split(","):
        size, n_cells = (int(v) for v in case.split(":"))
        labels = label_image(size, n_cells, args.seed)
        ids = [int(i) for i in np.unique(labels) if i]
        ours = encode_label_image(labels)
        ref = {i: reference_encode_binary_mask(labels == i).decode() for i in ids}
        if ours != ref:
            bad = [i for i in ids if ours.get(i) != ref[i]]
            print(f"MISMATCH on {case}: cells {bad[:10]}")
            return 1
        t_ref = median_time(lambda: [reference_encode_binary_mask(labels == i) for i in ids], args.repeats)
        t_new = median_time(lambda: encode_label_image(labels), args.repeats)
        texts = list(ours.values())
        t_full = median_time(lambda: [decode_binary_mask(t, size, size) for t in texts], args.repeats)
        t_crop = median_time(lambda: [decode_to_crop(t, size, size) for t in texts], args.repeats)
        ms = lambda t: f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f}) ms"  # noqa: E731
        print(f"{size:>5}x{size:<6}  {len(ids):>5}  {ms(t_ref):>18}  {ms(t_new):>18}  "
              f"{t_ref[0] / t_new[0]:>5.1f}x  {t_full[0] * 1e3:>9.1f}ms  {t_crop[0] * 1e3:>9.1f}ms")
    print("outputs byte-identical to the reference on every case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
