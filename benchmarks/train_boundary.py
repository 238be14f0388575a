"""Train the classical segmenter's boundary map (kit/segment/boundary.py) on synthetic cell truth.

    .venv/bin/python benchmarks/train_boundary.py                     # writes kit/data/boundary_mlp.json
    .venv/bin/python benchmarks/train_boundary.py --out /tmp/b.json --cache /tmp/bnd/fields

Training fields: `benchmarks/foreign_fields.py`, every style, seeds 0-4 (its tuning seeds; 100-104
stay held out, see `bench_segment.py --foreign`), and `kit synth` fields of its default, textured
and hard styles at 2048 px (truth from the generator). No real field is trained on: the four real
Kaggle fields with HPA Cell Segmentator masks are the check (`bench_segment.py --real`).

Per field, at the segmenter's working scale: the features of `boundary_features` (from
`kit.segment.classical.boundary_inputs`, defaults, boundary map off) and the target: 1 where the
pixel touches a different truth cell (a ~2 px band along every cell-cell boundary), 0 elsewhere in
the foreground. Up to 20,000 boundary and 40,000 other pixels are sampled per field; each field
weighs the same and boundary/other are weighted 1:1 within it. The MLP (FEATURES -> 16 -> 16 -> 1,
ReLU, sigmoid) is trained with Adam (one-cycle, 3,000 steps of 4,096 pixels) on one thread with
fixed seeds, so the file is reproducible on a machine. ~5 min when the fields are cached.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from kit.segment.boundary import FEATURES, MODEL_PATH  # noqa: E402
from kit.segment.classical import _resize_labels, boundary_inputs  # noqa: E402

FOREIGN_SEEDS = (0, 1, 2, 3, 4)
SYNTH_STYLES = ("default", "textured", "hard")


def boundary_target(truth: np.ndarray) -> np.ndarray:
    """True on both pixels of every 8-neighbour pair that belongs to two different truth cells."""
    t = truth
    h, w = t.shape
    out = np.zeros((h, w), bool)
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys, yd = slice(dy, h), slice(0, h - dy)
        xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
        a, b = t[ys, xs], t[yd, xd]
        m = (a != b) & (a > 0) & (b > 0)
        out[ys, xs] |= m
        out[yd, xd] |= m
    return out


def fields(cache: Path | None, n_synth: int):
    """(name, image, truth cells) of every training field, drawn or read from `cache`."""
    from benchmarks.foreign_fields import STYLES, draw_field
    from kit import synth

    def cached(name, draw):
        path = cache / f"{name}.npz" if cache else None
        if path is not None and path.is_file():
            d = np.load(path)
            return d["image"], d["cells"]
        image, cells = draw()
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, image=image, cells=cells)
            os.replace(tmp, path)
        return image, cells

    for style in sorted(STYLES):
        for seed in FOREIGN_SEEDS:
            def draw(style=style, seed=seed):
                f = draw_field(seed, style)
                return f["image"], f["cells"]
            yield (f"{style}_{seed}", *cached(f"{style}_{seed}", draw))
    for style in SYNTH_STYLES:
        for i in range(n_synth):
            def draw(style=style, i=i):
                f = synth.draw_field(np.random.default_rng([77, 0, i]), 2048, style=style)
                return synth.quantise(f.image, 8), f.cells.astype(np.int32)
            yield (f"synth_{style}_{i}", *cached(f"synth_{style}_{i}", draw))


def samples(image: np.ndarray, cells: np.ndarray, rng: np.random.Generator, hard: float = 0.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sampled (features, target, weight) of one field; a `hard` share of the other pixels is drawn
    from the false boundaries of the segmenter without the map (texture valleys it followed)."""
    from kit.segment.classical import segment_classical

    got = boundary_inputs(image, boundary=0.0)
    if "features" not in got:
        return np.zeros((0, len(FEATURES)), np.float32), np.zeros(0, np.float32), np.zeros(0)
    truth = _resize_labels(np.asarray(cells, np.int32), got["shape"])
    y = boundary_target(truth)
    where = (got["fg"] & (truth > 0)) | y
    pos = np.flatnonzero(y.ravel())
    pos = rng.choice(pos, min(pos.size, 20000), replace=False)
    neg_all = where & ~y
    n_neg = 40000
    picks = []
    if hard > 0:
        _, ours = segment_classical(image, boundary=0.0)
        ours = _resize_labels(ours, got["shape"])
        false = cv2.dilate(boundary_target(ours).view(np.uint8), np.ones((3, 3), np.uint8)) > 0
        false = np.flatnonzero((false & neg_all).ravel())
        picks.append(rng.choice(false, min(false.size, int(hard * n_neg)), replace=False))
    neg = np.flatnonzero(neg_all.ravel())
    picks.append(rng.choice(neg, min(neg.size, n_neg - sum(p.size for p in picks)), replace=False))
    neg = np.concatenate(picks)
    x = got["features"].reshape(len(FEATURES), -1).T
    w = np.concatenate([np.full(pos.size, 0.5 / max(pos.size, 1)), np.full(neg.size, 0.5 / max(neg.size, 1))])
    return x[np.concatenate([pos, neg])], np.concatenate([np.ones(pos.size), np.zeros(neg.size)]).astype(np.float32), w


def train(x: np.ndarray, y: np.ndarray, w: np.ndarray, hidden: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    mean, std = x.mean(0), x.std(0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt, wt = torch.tensor(y), torch.tensor(w / w.mean(), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    for i in range(steps):
        idx = torch.randint(0, len(xt), (4096,), generator=gen)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(net(xt[idx])[:, 0], yt[idx], reduction="none")
                * wt[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % 1000 == 0 or i == steps - 1:
            print(f"step {i}: weighted loss {float(loss):.4f}", file=sys.stderr, flush=True)
    with torch.no_grad():
        p = torch.sigmoid(net(xt)[:, 0]).numpy()
    acc = float((((p > 0.5) == (y > 0)) * w).sum() / w.sum())
    layers = [{"W": m.weight.detach().numpy().T.round(6).tolist(), "b": m.bias.detach().numpy().round(6).tolist()}
              for m in net if isinstance(m, torch.nn.Linear)]
    return {"mean": mean.round(6).tolist(), "std": std.round(6).tolist(), "layers": layers, "weighted_accuracy": acc}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=MODEL_PATH)
    p.add_argument("--cache", type=Path, default=None, help="keep drawn fields here (npz) and reuse them")
    p.add_argument("--synth", type=int, default=3, help="kit synth fields per style (default 3)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--hard", type=float, default=0.0,
                   help="share of the non-boundary samples taken on the false boundaries of the segmenter without the map")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    xs, ys, ws, names = [], [], [], []
    t0 = time.time()
    for name, image, cells in fields(args.cache, args.synth):
        x, y, w = samples(image, cells, rng, args.hard)
        xs.append(x), ys.append(y), ws.append(w), names.append(name)
        print(f"{name}: {int(y.sum())} boundary / {int((y == 0).sum())} other pixels", file=sys.stderr, flush=True)
    fit = train(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), args.hidden, args.steps)
    spec = {"version": 1, "features": list(FEATURES), "mean": fit["mean"], "std": fit["std"], "layers": fit["layers"],
            "trained_on": f"{len(names)} synthetic fields: foreign_fields.py seeds {list(FOREIGN_SEEDS)} of every "
                          f"style, kit synth {args.synth} x {list(SYNTH_STYLES)} at 2048 px",
            "weighted_accuracy": round(fit["weighted_accuracy"], 4),
            "command": "python benchmarks/train_boundary.py " + " ".join(
                f"--{k} {v}" for k, v in (("synth", args.synth), ("hidden", args.hidden), ("steps", args.steps), ("hard", args.hard)))}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(names)} fields, weighted accuracy {fit['weighted_accuracy']:.3f}, "
          f"{time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
