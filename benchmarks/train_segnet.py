"""Train the learned segmentation backend's network (kit/segment/data/segnet.npz), reproducibly.

    .venv/bin/python benchmarks/train_segnet.py --cache /tmp/segnet-data            # generate + train
    .venv/bin/python benchmarks/train_segnet.py --cache DIR --steps 200 --out /tmp/x.npz   # quick try
    .venv/bin/python benchmarks/train_segnet.py --cache DIR --no-foreign            # kit.synth only

Data (cached in --cache, one .npz per field at the working scale, so a rerun or a longer run
reuses it; generation resumes): `kit.synth` fields of every style it has, 2048 px, seeds
1000-1000+n, and fields of the independent foreign generator (`foreign_fields.py`) in the styles
of `FOREIGN_TRAIN` only, seeds 200-200+n. Held out of training on purpose, for honest figures:
the foreign styles ``crowded`` and ``irregular`` (never seen), and every foreign seed below 200
(`bench_segment.py --foreign` scores seeds 100-104; seeds 0-2 tuned the classical defaults).
Each field is reduced to 1/4 scale exactly as the backend reduces it (area averaging, plus the
1 px full-resolution grey erosion of red and yellow that keeps seams), normalised per field.

Targets at 1/4 scale: foreground = any cell (with or without a visible nucleus); border = the
pixels where two different cells touch, 3 px wide. Loss: binary cross-entropy on both maps (the
border weighted up) plus a soft Dice term on the border. Crops of 192 px, random flips and
quarter turns, rescaling 0.75-1.33x (cell size), per-channel gamma and gain, added noise.

The run is deterministic for a given machine and thread count (seeded numpy and torch); the
weights file records the data list, the seeds, the arguments and the final losses, and the
script prints its sha256 (the learned backend's cache key).
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

FOREIGN_TRAIN = ("sparse", "medium", "confluent", "mitotic", "dim", "bigcells")
FOREIGN_HELD_OUT = ("crowded", "irregular")
SYNTH_SEED0, FOREIGN_SEED0 = 1000, 200
CROP = 192


# ------------------------------------------------------------------------------- data
def synth_styles() -> list[str]:
    """Every style `kit.synth` can draw (only ``default`` before it had styles)."""
    from kit import synth

    return list(getattr(synth, "STYLES", {"default": None}))


def _draw_synth(style: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from kit import synth

    draw = getattr(synth, "draw_field", None) or synth.make_field
    kwargs = {"style": style} if "style" in inspect.signature(draw).parameters else {}
    f = draw(np.random.default_rng(seed), 2048, **kwargs)
    cells = np.asarray(f.cells, np.int32)
    return synth.quantise(f.image, 8), cells, cells


def _draw_foreign(style: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from benchmarks.foreign_fields import draw_field

    f = draw_field(seed, style)
    return f["image"], f["cells"], f["all_cells"]


def field_jobs(n_synth: int, n_foreign: int, foreign: bool = True,
               styles: list[str] | None = None) -> list[tuple[str, str, int]]:
    """(source, style, seed) of every training field, interleaved so that any prefix is balanced."""
    jobs = []
    styles = styles or synth_styles()
    for k in range(max(n_synth, n_foreign)):
        if k < n_synth:
            jobs += [("synth", st, SYNTH_SEED0 + k) for st in styles]
        if foreign and k < n_foreign:
            jobs += [("foreign", st, FOREIGN_SEED0 + k) for st in FOREIGN_TRAIN]
    return jobs


def prepare(cache: Path, jobs: list[tuple[str, str, int]], generate: bool = True) -> list[Path]:
    """Make the missing cached fields (inputs uint8 at 1/4 scale + truth labels); returns their
    paths (with `generate` False: only those already there)."""
    from kit.segment.classical import reduce_image

    cache.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (source, style, seed) in enumerate(jobs):
        path = cache / f"{source}_{style}_{seed}.npz"
        if path.exists() or not generate:
            if path.exists():
                paths.append(path)
            continue
        paths.append(path)
        t = time.time()
        image, cells, all_cells = (_draw_synth if source == "synth" else _draw_foreign)(style, seed)
        small, ero = reduce_image(image, 0.25, 0)
        sh = (small.shape[1], small.shape[0])
        lab = cv2.resize(all_cells.astype(np.uint16), sh, interpolation=cv2.INTER_NEAREST_EXACT)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, small=small, ero=ero, all_cells=lab)
        tmp.replace(path)
        print(f"  [{i + 1}/{len(jobs)}] {path.name} {image.shape[0]} px, {int(cells.max())} cells, "
              f"{time.time() - t:.0f} s", flush=True)
    return paths


def targets(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, border) float32 targets of a label image at working scale."""
    fg = lab > 0
    lab_f = lab.astype(np.float32)
    k = np.ones((3, 3), np.uint8)
    hi = cv2.dilate(lab_f, k)
    lo = cv2.erode(np.where(fg, lab_f, np.float32(1e9)), k)
    contact = (hi != lo) & fg & (lo < 1e9)
    border = cv2.dilate(contact.astype(np.uint8), k) > 0
    return fg.astype(np.float32), (border & fg).astype(np.float32)


def load_fields(paths: list[Path]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(planes (h, w, C) float32, labels) per cached field."""
    from kit.segment.learned import planes_from_reduced

    out = []
    for p in paths:
        with np.load(p) as z:
            out.append((planes_from_reduced(z["small"], z["ero"]), z["all_cells"].astype(np.int32)))
    return out


def sample(rng: np.random.Generator, fields, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """One augmented training crop: (C, crop, crop) input, (2, crop, crop) targets."""
    planes, lab = fields[int(rng.integers(len(fields)))]
    f = float(np.exp(rng.uniform(np.log(0.75), np.log(1.33))))
    src = int(math.ceil(crop / f))
    h, w = lab.shape
    if h < src or w < src:
        pad = ((0, max(0, src - h)), (0, max(0, src - w)))
        planes = np.pad(planes, pad + ((0, 0),))
        lab = np.pad(lab, pad)
        h, w = lab.shape
    y, x = int(rng.integers(0, h - src + 1)), int(rng.integers(0, w - src + 1))
    p = planes[y:y + src, x:x + src]
    lb = lab[y:y + src, x:x + src]
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    p = np.stack([cv2.resize(np.ascontiguousarray(p[..., c]), (crop, crop), interpolation=interp)
                  for c in range(p.shape[-1])], -1)
    lb = cv2.resize(lb.astype(np.uint16), (crop, crop), interpolation=cv2.INTER_NEAREST_EXACT).astype(np.int32)
    k = int(rng.integers(4))
    p, lb = np.rot90(p, k), np.rot90(lb, k)
    if rng.random() < 0.5:
        p, lb = p[:, ::-1], lb[:, ::-1]
    p = np.ascontiguousarray(p, np.float32)
    # intensity: per-channel gamma and gain (the seam planes follow their channel), noise
    n_ch = p.shape[-1]
    gamma = np.exp(rng.uniform(np.log(0.6), np.log(1.6), 3))
    gain = rng.uniform(0.6, 1.3, 3)
    follow = [0, 1, 2, 0, 1][:n_ch]
    for c in range(n_ch):
        g = follow[c]
        p[..., c] = np.clip(p[..., c], 0, 1) ** gamma[g] * gain[g]
    p += rng.normal(0, rng.uniform(0, 0.03), p.shape).astype(np.float32)
    fg, border = targets(lb)
    return p.transpose(2, 0, 1), np.stack([fg, border])


# ------------------------------------------------------------------------------- training
def train_one_epoch(model, optimizer, scheduler, rng, fields, steps: int, batch: int, crop: int, log_every: int,
                    border_weight: float, step0: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    model.train()
    hist = {"loss": [], "fg": [], "border": [], "dice": []}
    pos_weight = torch.tensor([1.0, border_weight]).view(1, 2, 1, 1)
    t0 = time.time()
    for step in range(step0, step0 + steps):
        xs, ys = zip(*(sample(rng, fields, crop) for _ in range(batch)))
        x = torch.from_numpy(np.stack(xs))
        y = torch.from_numpy(np.stack(ys))
        logits = model(x)
        bce = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none").mean((0, 2, 3))
        pb = torch.sigmoid(logits[:, 1])
        dice = 1 - (2 * (pb * y[:, 1]).sum() + 1) / (pb.sum() + y[:, 1].sum() + 1)
        loss = bce[0] + bce[1] + dice
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        for k, v in (("loss", loss), ("fg", bce[0]), ("border", bce[1]), ("dice", dice)):
            hist[k].append(float(v.detach()))
        if (step + 1) % log_every == 0:
            m = {k: np.mean(v[-log_every:]) for k, v in hist.items()}
            print(f"  step {step + 1}: loss {m['loss']:.4f} (fg {m['fg']:.4f}, border {m['border']:.4f}, "
                  f"dice {m['dice']:.4f}), lr {scheduler.get_last_lr()[0]:.2e}, "
                  f"{(time.time() - t0) / (step + 1 - step0):.2f} s/step", flush=True)
    return {k: float(np.mean(v[-max(1, log_every):])) for k, v in hist.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="folder of the generated training fields")
    p.add_argument("--n-synth", type=int, default=8, help="kit.synth fields per style (default 8)")
    p.add_argument("--n-foreign", type=int, default=6, help="foreign fields per training style (default 6)")
    p.add_argument("--no-foreign", action="store_true", help="train on kit.synth fields only")
    p.add_argument("--synth-styles", nargs="+", default=None, help="kit.synth styles (default: all it has)")
    p.add_argument("--available", action="store_true", help="train on the cached fields only, generate none")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=CROP, help=f"crop side at working scale (default {CROP})")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--border-weight", type=float, default=3.0)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 48, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="weights file (default: the package's)")
    p.add_argument("--prepare-only", action="store_true", help="generate the data and stop")
    args = p.parse_args()

    styles = args.synth_styles or synth_styles()
    jobs = field_jobs(args.n_synth, args.n_foreign, foreign=not args.no_foreign, styles=styles)
    print(f"data: {len(jobs)} fields ({args.n_synth} per kit.synth style: {', '.join(styles)}; "
          f"{0 if args.no_foreign else args.n_foreign} per foreign style: {', '.join(FOREIGN_TRAIN)}); "
          f"never trained on: foreign {', '.join(FOREIGN_HELD_OUT)}, foreign seeds < {FOREIGN_SEED0}")
    paths = prepare(args.cache, jobs, generate=not args.available)
    if args.available:
        print(f"  {len(paths)} of them cached, training on those")
    if args.prepare_only:
        return

    import torch

    from kit.segment.learned import default_weights
    from kit.segment.segnet import SegNet, save_segnet

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    fields = load_fields(paths)
    model = SegNet(fields[0][0].shape[-1], tuple(args.widths))
    n_params = sum(q.numel() for q in model.parameters())
    print(f"model: SegNet widths {args.widths}, {n_params:,} parameters; {args.steps} steps of {args.batch} "
          f"crops of {args.crop} px, {args.threads} threads", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                    pct_start=0.1)
    t0 = time.time()
    final = train_one_epoch(model, optimizer, scheduler, rng, fields, args.steps, args.batch, args.crop,
                            args.log_every, args.border_weight)
    record = {"data": [q.stem for q in paths], "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "border_weight": args.border_weight, "seed": args.seed, "crop": args.crop, "final": final,
              "held_out": {"foreign_styles": list(FOREIGN_HELD_OUT), "foreign_seeds_below": FOREIGN_SEED0},
              "train_seconds": round(time.time() - t0)}
    out = args.out or default_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_segnet(model, out, record)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), sha256 {digest}")


if __name__ == "__main__":
    main()
