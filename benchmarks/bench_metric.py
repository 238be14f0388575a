"""Benchmark: the crop-based evaluator vs a plain full-frame implementation of the same rules.

Synthetic test set in the competition's shape: N images of S x S px, ~25 cells each, every cell
with 1-3 true labels in the solution, and a submission whose cells are the true cells slightly
shifted (plus some missed and some spurious cells), ~3 (class, confidence) triples per cell.

- ours: `kit.metric.evaluate_files` on the whole set (CSV parsing included), wall time; then
  `evaluate_predictions` again under tracemalloc for its peak memory (numpy allocations included).
- baseline: what a straightforward port of the Open Images code does: decode every mask of an
  image to a full frame (pycocotools), stack them as N x H x W uint8, IoU as sum(minimum) per pair
  (``np_mask_ops.iou``), then the same matching and AP. Run on a subset (it is slow), with its
  peak memory per image; its mAP on that subset must equal ours on the same subset.

    .venv/bin/python benchmarks/bench_metric.py                  # 40 images of 1024 px
    .venv/bin/python benchmarks/bench_metric.py --full           # 559 images of 2048 px
"""
from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kit.labels import NUM_CLASSES  # noqa: E402
from kit.metric import average_precision, evaluate_files, evaluate_predictions  # noqa: E402
from kit.rle import encode_label_image  # noqa: E402
from kit.submission import ImagePrediction, write_submission  # noqa: E402


def make_label_image(rng, size: int, n_cells: int) -> np.ndarray:
    import cv2

    labels = np.zeros((size, size), np.int32)
    radius = size / np.sqrt(n_cells) * 0.62
    for k in range(1, n_cells + 1):
        y, x = rng.integers(0, size, 2)
        axes = (int(radius * rng.uniform(0.6, 1.0)), int(radius * rng.uniform(0.6, 1.0)))
        cv2.ellipse(labels, (int(x), int(y)), axes, float(rng.uniform(0, 180)), 0, 360, k, -1)
    return labels


def make_dataset(n_images: int, size: int, n_cells: int, seed: int):
    """(solution, submission) dicts of ImagePrediction."""
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    solution, submission = {}, {}
    for i in tqdm(range(n_images), desc="synthesise", unit="image", file=sys.stderr):
        image_id = f"img{i:05d}"
        truth = make_label_image(rng, size, int(rng.integers(n_cells - 5, n_cells + 6)))
        image_labels = rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False)
        gt_masks = encode_label_image(truth)
        triples = []
        true_of = {}
        for cell, mask in gt_masks.items():
            k = int(rng.integers(1, len(image_labels) + 1))
            cls = rng.choice(image_labels, size=k, replace=False)
            true_of[cell] = set(int(c) for c in cls)
            triples += [(int(c), 1.0, mask) for c in cls]
        solution[image_id] = ImagePrediction(size, size, triples)

        # prediction: the truth shifted by a few pixels, 5% of cells lost, a few spurious cells
        dy, dx = rng.integers(-size // 80, size // 80 + 1, 2)
        pred = np.roll(truth, (int(dy), int(dx)), axis=(0, 1))
        for cell in rng.choice(list(gt_masks), size=max(1, len(gt_masks) // 20), replace=False):
            pred[pred == cell] = 0
        pred_masks = encode_label_image(pred)
        det = []
        for cell, mask in pred_masks.items():
            classes = set(true_of.get(cell, ()))
            while len(classes) < 3:
                classes.add(int(rng.integers(0, NUM_CLASSES)))
            for c in classes:
                bonus = 0.35 if c in true_of.get(cell, ()) else 0.0
                det.append((c, float(np.clip(rng.uniform(0, 0.65) + bonus, 0, 1)), mask))
        submission[image_id] = ImagePrediction(size, size, det)
    return solution, submission


# ---------------------------------------------------------------------------------------------
# the plain full-frame baseline (np_mask_ops-style)
# ---------------------------------------------------------------------------------------------

def decode_full(text: str, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as coco_mask

    counts = zlib.decompress(base64.b64decode(text))
    return coco_mask.decode({"size": [h, w], "counts": counts})  # H x W uint8


def full_frame_tp(gt: ImagePrediction, det: ImagePrediction | None, thr=0.6):
    """Per class (scores, tp) of one image and the number of GT, with full-frame masks."""
    h, w = gt.height, gt.width
    gt_cls = np.array([c for c, _, _ in gt.triples], dtype=int)
    gt_masks = np.stack([decode_full(m, h, w) for _, _, m in gt.triples]) if gt.triples else np.zeros((0, h, w), np.uint8)
    gt_area = gt_masks.sum(axis=(1, 2), dtype=np.float32)
    out, n_gt = {}, np.zeros(NUM_CLASSES, int)
    verified = set(gt_cls.tolist())
    for c in verified:
        n_gt[c] += int(((gt_cls == c) & (gt_area > 0)).sum())
    if det is None:
        return out, n_gt
    keep = [(c, s, m) for c, s, m in det.triples if c in verified]
    if not keep:
        return out, n_gt
    d_masks = np.stack([decode_full(m, h, w) for _, _, m in keep])
    d_area = d_masks.sum(axis=(1, 2), dtype=np.float32)
    d_cls = np.array([c for c, _, _ in keep])
    d_score = np.array([s for _, s, _ in keep], dtype=np.float64)
    for c in verified:
        di = np.flatnonzero((d_cls == c) & (d_area > 0))
        if not len(di):
            continue
        di = di[np.argsort(-d_score[di], kind="stable")]
        gi = np.flatnonzero((gt_cls == c) & (gt_area > 0))
        tp = np.zeros(len(di), bool)
        if len(gi):
            inter = np.zeros((len(di), len(gi)), np.float32)
            for a, i in enumerate(di):
                for b, j in enumerate(gi):
                    inter[a, b] = np.sum(np.minimum(d_masks[i], gt_masks[j]), dtype=np.float32)
            union = d_area[di][:, None] + gt_area[gi][None, :] - inter
            iou = inter / np.maximum(union, np.float32(1e-7))
            used = np.zeros(len(gi), bool)
            best = iou.argmax(axis=1)
            for a in range(len(di)):
                if iou[a, best[a]] >= np.float32(thr) and not used[best[a]]:
                    used[best[a]] = tp[a] = True
        out[c] = (d_score[di], tp)
    return out, n_gt


def full_frame_map(solution, submission, ids):
    scores = [[] for _ in range(NUM_CLASSES)]
    tps = [[] for _ in range(NUM_CLASSES)]
    n_gt = np.zeros(NUM_CLASSES, int)
    for image_id in sorted(ids):  # ties across images ordered by ID, as kit.metric does
        per_class, g = full_frame_tp(solution[image_id], submission.get(image_id))
        n_gt += g
        for c, (s, t) in per_class.items():
            scores[c].append(s)
            tps[c].append(t)
    aps = []
    for c in range(NUM_CLASSES):
        if n_gt[c] == 0:
            continue
        s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
        t = np.concatenate(tps[c]) if tps[c] else np.zeros(0, bool)
        o = np.argsort(-s, kind="stable")
        ctp, cfp = np.cumsum(t[o]), np.cumsum(~t[o])
        aps.append(average_precision(ctp / np.maximum(ctp + cfp, 1), ctp / n_gt[c]))
    return float(np.mean(aps))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--cells", type=int, default=25)
    ap.add_argument("--full", action="store_true", help="559 images of 2048 px (the test set's shape)")
    ap.add_argument("--baseline-images", type=int, default=3, help="images for the full-frame baseline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.full:
        args.images, args.size = 559, 2048

    t = time.perf_counter()
    solution, submission = make_dataset(args.images, args.size, args.cells, args.seed)
    n_gt = sum(len(p.triples) for p in solution.values())
    n_det = sum(len(p.triples) for p in submission.values())
    print(f"synthetic set: {args.images} images of {args.size} px, {n_gt} GT (cell, label) pairs, "
          f"{n_det} detections ({time.perf_counter() - t:.1f} s to make)")

    def timed(fn):
        """(result, CPU seconds of this process, wall seconds): CPU time is the steadier figure
        on a machine shared with other jobs (all of this is single-threaded)."""
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.process_time() - c, time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        sol_path, sub_path = Path(tmp) / "solution.csv", Path(tmp) / "submission.csv"
        write_submission(sol_path, solution)
        write_submission(sub_path, submission)
        mb = (sol_path.stat().st_size + sub_path.stat().st_size) / 2**20
        result, c_files, w_files = timed(lambda: evaluate_files(sol_path, sub_path))
    print(f"ours, evaluate_files (CSV {mb:.1f} MB parsed): CPU {c_files:.2f} s (wall {w_files:.2f} s), "
          f"mAP {result['mAP']:.4f}")

    _, c_ours, w_ours = timed(lambda: evaluate_predictions(solution, submission))
    tracemalloc.start()
    evaluate_predictions(solution, submission)
    _, peak_ours = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"ours, evaluate_predictions on all {args.images} images: CPU {c_ours:.2f} s (wall {w_ours:.2f} s), "
          f"{c_ours / args.images * 1e3:.1f} ms/image; peak traced memory {peak_ours / 2**20:.1f} MiB")

    subset = list(solution)[: args.baseline_images]
    sub_ours, c_sub, w_sub = timed(lambda: evaluate_predictions(solution, submission, image_ids=subset))
    base_map, c_base, w_base = timed(lambda: full_frame_map(solution, submission, subset))
    tracemalloc.start()
    full_frame_tp(solution[subset[0]], submission[subset[0]])
    _, peak_base = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"subset of {len(subset)} images, CPU: ours {c_sub:.3f} s, full-frame baseline {c_base:.2f} s "
          f"-> {c_base / c_sub:.0f}x (wall {w_sub:.3f} s vs {w_base:.2f} s); mAP ours {sub_ours['mAP']:.6f}, "
          f"baseline {base_map:.6f} ({'equal' if abs(sub_ours['mAP'] - base_map) < 1e-12 else 'DIFFERENT'})")
    print(f"baseline peak traced memory for one image {peak_base / 2**20:.0f} MiB; extrapolated to "
          f"{args.images} images: {c_base / len(subset) * args.images / 60:.1f} CPU min; holding every mask of "
          f"the set at full frame would need {(n_gt + n_det) * args.size ** 2 / 2**30:.0f} GiB (uint8)")
    return 0 if abs(sub_ours["mAP"] - base_map) < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
