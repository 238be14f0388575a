"""The classical segmenter on each `kit synth` style: instance F1 at IoU 0.6 against the truth.

    .venv/bin/python benchmarks/synth_styles.py                       # 6 fields per style, 512 and 2048 px
    .venv/bin/python benchmarks/synth_styles.py --n 10 --sizes 512 --styles default hard mixed

The starting point for tuning a segmenter on harder synthetic cases (issue 12: F1 >= 0.95 on the
default fields, >= 0.90 on the harder ones). Fields are drawn with `kit.synth.draw_field` from
seeds ``[seed, 0, i]`` (the same fields `generate_dataset(seed=seed)` writes as train images) and
quantised to 8 bits, then segmented with `kit.segment.segment_image` (defaults). F1 pools the
matches of all fields of a row (2 TP / (n_pred + n_true)); "fields >= 0.9" counts fields whose own
cell F1 reaches 0.9. Seconds are the segmenter's CPU time per field (one thread).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kit import synth  # noqa: E402
from kit.segment import instance_f1, segment_image  # noqa: E402


def _pooled(stats: list[dict]) -> float:
    tp = sum(s["tp"] for s in stats)
    return 2 * tp / max(sum(s["n_pred"] + s["n_true"] for s in stats), 1)


def row(style: str, size: int, n: int, seed: int, options: dict | None = None) -> dict:
    cells_s, nuc_s, secs = [], [], []
    for i in range(n):
        idx_style = synth.image_style(seed, "train", i, style)
        f = synth.draw_field(np.random.default_rng([seed, 0, i]), size, style=idx_style)
        image = synth.quantise(f.image, 8)
        t = time.process_time()
        nuc, cells = segment_image(image, **(options or {}))
        secs.append(time.process_time() - t)
        cells_s.append(instance_f1(cells, f.cells.astype(np.int32)))
        nuc_s.append(instance_f1(nuc, f.nuclei.astype(np.int32)))
    return {"style": style, "size": size, "f1": _pooled(cells_s), "nuc_f1": _pooled(nuc_s),
            "ok": sum(s["f1"] >= 0.9 for s in cells_s), "n": n,
            "true": sum(s["n_true"] for s in cells_s), "pred": sum(s["n_pred"] for s in cells_s),
            "worst": min(s["f1"] for s in cells_s), "s": statistics.median(secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6, help="fields per style and size (default 6)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--styles", nargs="+", default=list(synth.STYLE_NAMES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="classical segmenter option (a number), e.g. --option boundary=0")
    args = ap.parse_args()
    options = {k: float(v) for k, v in (o.split("=", 1) for o in args.option)}
    cv2.setNumThreads(0)
    print(f"classical segmenter ({options or 'defaults'}) on kit synth styles, {args.n} fields each, seed {args.seed}, IoU 0.6")
    head = ["style", "size", "cell F1", "nucleus F1", "fields >= 0.9", "worst field", "true", "pred", "s/field"]
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    else:
        print(f"{'style':>14} {'size':>5} {'cell F1':>8} {'nuc F1':>7} {'>=0.9':>6} {'worst':>6} "
              f"{'true':>5} {'pred':>5} {'s/field':>7}")
    for size in args.sizes:
        for style in args.styles:
            r = row(style, size, args.n, args.seed, options)
            if args.markdown:
                print(f"| {style} | {size} | {r['f1']:.3f} | {r['nuc_f1']:.3f} | {r['ok']}/{r['n']} | "
                      f"{r['worst']:.2f} | {r['true']} | {r['pred']} | {r['s']:.2f} |")
            else:
                print(f"{style:>14} {size:>5} {r['f1']:>8.3f} {r['nuc_f1']:>7.3f} {r['ok']:>3}/{r['n']:<2} "
                      f"{r['worst']:>6.2f} {r['true']:>5} {r['pred']:>5} {r['s']:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
