"""Speed of the synthetic data generator (`kit synth`).

Prints, measured in the same run:
  * images/s of `generate_dataset` (all files: 4 channel PNGs, 2 truth PNGs, solution masks) on one
    core, wall clock and per CPU-second (the latter barely moves when other jobs load the
    machine), beside a floor that only writes the same files filled with random bytes (the I/O + PNG
    share of the cost); the target is >= 5 images/s at 512 px on one core;
  * with --workers N > 1 also the spawn-pool figure;
  * the solution-mask encoding, one pycocotools call for all cells vs the official per-mask encoder;
  * with --against REV (e.g. main), one field per seed drawn by this tree's generator and by the
    generator of git revision REV, alternately in this process (CPU time; the ratio is what a
    change costs), per --style.

    .venv/bin/python benchmarks/bench_synth.py                    # 20 images of 512 px
    .venv/bin/python benchmarks/bench_synth.py --size 2048 --n 4 --workers 2
    .venv/bin/python benchmarks/bench_synth.py --against main --n 10 --styles default hard

The machine may be shared: figures are medians over --repeat runs.
"""
from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kit import synth  # noqa: E402


def _official_encode(mask: np.ndarray) -> str:
    from pycocotools import mask as coco_mask

    m = np.asfortranarray(mask.reshape(mask.shape[0], mask.shape[1], 1).astype(np.uint8))
    return base64.b64encode(zlib.compress(coco_mask.encode(m)[0]["counts"], 9)).decode("ascii")


def _floor(out: Path, n: int, size: int) -> None:
    """Write the same number and kind of files with random content (no synthesis)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        for ch in ("red", "green", "blue", "yellow"):
            cv2.imwrite(str(out / f"{i}_{ch}.png"), rng.integers(0, 40, (size, size), dtype=np.uint8))
        for kind in ("cell_mask", "nuclei_mask"):
            lab = np.zeros((size, size), np.uint16)
            lab[size // 4: size // 2, size // 4: size // 2] = 1
            cv2.imwrite(str(out / f"{i}_{kind}.png"), lab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--n", type=int, default=20, help="images per timed run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--bit-depth", type=int, default=8)
    ap.add_argument("--against", default=None, metavar="REV", help="also time the generator of this git revision")
    ap.add_argument("--styles", nargs="+", default=["default"], help="styles timed with --against")
    args = ap.parse_args()
    cv2.setNumThreads(0)  # one core, as in a worker
    if args.against:
        against(args)
        return

    one, one_cpu, floor, pool = [], [], [], []
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            t, c = time.perf_counter(), time.process_time()
            synth.generate_dataset(Path(tmp) / "a", args.n, 0, args.size, seed=r, bit_depth=args.bit_depth)
            one.append(args.n / (time.perf_counter() - t))
            one_cpu.append(args.n / (time.process_time() - c))
            t = time.perf_counter()
            _floor(Path(tmp), args.n, args.size)
            floor.append(args.n / (time.perf_counter() - t))
            if args.workers > 1:
                t = time.perf_counter()
                synth.generate_dataset(Path(tmp) / "b", args.n, 0, args.size, seed=r,
                                       bit_depth=args.bit_depth, workers=args.workers)
                pool.append(args.n / (time.perf_counter() - t))
    med = statistics.median
    print(f"synth {args.size} px, {args.bit_depth}-bit, {args.n} images x {args.repeat} runs (medians)")
    print(f"  generate_dataset, 1 core        : {med(one):7.2f} images/s wall, {med(one_cpu):.2f} images "
          f"per CPU-second (what an idle core gives; target >= 5 at 512 px)")
    print(f"  floor: write same files only    : {med(floor):7.2f} images/s   "
          f"(synthesis is {med(floor) / med(one):.1f}x the I/O floor)")
    if pool:
        print(f"  generate_dataset, {args.workers} workers     : {med(pool):7.2f} images/s   "
              f"({med(pool) / med(one):.2f}x one core; spawn start-up included)")

    f = synth.draw_field(np.random.default_rng(0), args.size)
    ids = list(range(1, int(f.cells.max()) + 1))
    t_one, t_off = [], []
    for _ in range(args.repeat):
        t = time.perf_counter()
        fast = synth.encode_masks(f.cells, ids)
        t_one.append(time.perf_counter() - t)
        t = time.perf_counter()
        slow = [_official_encode(f.cells == k) for k in ids]
        t_off.append(time.perf_counter() - t)
    assert fast == slow
    print(f"  masks of {len(ids)} cells: one call {med(t_one) * 1e3:.1f} ms vs official per-mask "
          f"{med(t_off) * 1e3:.1f} ms ({med(t_off) / med(t_one):.1f}x, byte-identical)")


def _module_at(rev: str):
    """kit/synth.py as it is at git revision `rev`, imported under another name."""
    import importlib.util
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "show", f"{rev}:kit/synth.py"], cwd=repo, capture_output=True, text=True,
                         check=True).stdout
    tmp = Path(tempfile.mkdtemp(prefix="bench-synth-")) / "synth_at_rev.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("synth_at_rev", tmp)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["synth_at_rev"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    mod.LABEL_TABLE = synth.LABEL_TABLE  # shipped beside this tree's module
    return mod


def against(args) -> None:
    """This tree's draw_field vs revision REV's, alternately, CPU time per field."""
    old = _module_at(args.against)
    draw_old = getattr(old, "draw_field", None) or old.make_field
    print(f"synth {args.size} px: this tree vs {args.against}, {args.n} fields each (CPU s per field, medians)")
    for style in args.styles:
        t_new, t_old, c_new, c_old = [], [], [], []
        for i in range(args.n):
            kw_new = {"style": synth.image_style(0, "train", i, style)}  # mixed: one style per field
            for fn, ts, cs, kw in ((synth.draw_field, t_new, c_new, kw_new), (draw_old, t_old, c_old, {})):
                t = time.process_time()
                f = fn(np.random.default_rng([i, 0, i]), args.size, **kw)
                ts.append(time.process_time() - t)
                cs.append(int(f.cells.max()))
        med = statistics.median
        print(f"  {style:>14}: {med(t_new):6.3f} s ({med(c_new):.0f} cells)  vs {args.against}: {med(t_old):6.3f} s "
              f"({med(c_old):.0f} cells)  -> {med(t_new) / med(t_old):.2f}x the time, "
              f"{(med(t_new) / med(c_new)) / (med(t_old) / med(c_old)):.2f}x per cell")


if __name__ == "__main__":
    main()
