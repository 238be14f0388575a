"""Training / inference throughput of the classifiers and of the data loader, side by side.

    .venv/bin/python benchmarks/bench_train.py                       # resnet18 + resnet50, 64 px, CPU
    .venv/bin/python benchmarks/bench_train.py --size 128 --batch 32 --device cuda --amp
    .venv/bin/python benchmarks/bench_train.py --learn               # the synthetic-data learning check

Throughput: tiles/s of a training step (forward, backward, AdamW step) and of inference, both with
the kit's layout (channels_last) and with the plain NCHW layout as the baseline measured in the same
run; and tiles/s of the kit's DataLoader alone (CellTileDataset over a tile cache of random tiles,
augmentation on, spawn workers), which must be at least 2x what training consumes so the model
never waits. Medians over --repeats timed runs; other processes share the CPU, so read ratios.

--learn: synthetic dataset (kit.synth) -> folds -> segmentation + tiles (kit.cells) -> the cell
model trained on weak labels for a few epochs; prints the per-epoch table, the validation macro-AP
and the class-prior macro-AP for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(name: str, size: int, batch: int, iters: int, repeats: int, device, channels_last: bool, amp: bool):
    from kit.losses import BCELoss
    from kit.models import build_model, preprocess

    torch.manual_seed(0)
    model = build_model(name).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = BCELoss()
    x8 = torch.randint(0, 256, (batch, 4, size, size), dtype=torch.uint8, device=device)
    y = (torch.rand(batch, 19, device=device) > 0.8).float()

    def prep():
        x = preprocess(x8)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def train_step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = loss_fn(model(prep()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer_step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            model(prep())

    out = {}
    for label, step, mode in (("train", train_step, model.train), ("infer", infer_step, model.eval)):
        mode()
        step()  # warm-up
        _sync(device)
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(iters):
                step()
            _sync(device)
            rates.append(batch * iters / (time.perf_counter() - t))
        out[label] = statistics.median(rates)
    return out


def time_loader(size: int, batch: int, workers: int, n_batches: int, repeats: int):
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import write_random_tiles
    from kit.torchdata import CellTileDataset, EpochSampler, worker_init_fn

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    n_images = max(8, n_batches * batch // 20 + 1)
    ids = [f"img{i:04d}" for i in range(n_images)]
    targets = (np.random.default_rng(0).random((n_images, 19)) > 0.85).astype(np.float32)
    write_random_tiles(tmp, ids, targets, size=size, cells=(15, 25))
    ds = CellTileDataset(tmp, ids, targets, augment=True)
    sampler = EpochSampler(len(ds), seed=0)
    kwargs = dict(num_workers=workers, multiprocessing_context="spawn", persistent_workers=True,
                  worker_init_fn=worker_init_fn, prefetch_factor=4) if workers else {}
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, **kwargs)
    rates = []
    for r in range(repeats + 1):  # the first pass starts the workers: not timed
        sampler.set_epoch(r)
        t = time.perf_counter()
        seen = 0
        for i, (x, _) in enumerate(loader):
            seen += len(x)
            if i + 1 >= n_batches:
                break
        if r:
            rates.append(seen / (time.perf_counter() - t))
    del loader
    return statistics.median(rates)


def throughput(args) -> None:
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    print(f"device {device}{' (amp)' if amp else ''}, tiles {args.size} px, batch {args.batch}, "
          f"torch threads {torch.get_num_threads()}, medians of {args.repeats} runs; machine shared with other work")
    loader = time_loader(args.size, args.batch, args.workers, args.loader_batches, args.repeats)
    print(f"DataLoader alone ({args.workers} spawn workers, augmentation on): {loader:.0f} tiles/s\n")
    head = (f"{'model':<10} {'train/s':>9} {'NCHW':>8} {'ratio':>6}   {'infer/s':>9} {'NCHW':>8} {'ratio':>6}"
            f"   {'loader/train':>12}")
    print(head)
    print("-" * len(head))
    for name in args.models.split(","):
        ours = time_model(name, args.size, args.batch, args.iters, args.repeats, device, True, amp)
        base = time_model(name, args.size, args.batch, args.iters, args.repeats, device, False, amp)
        ok = "ok" if loader >= 2 * ours["train"] else "LOW"
        print(f"{name:<10} {ours['train']:>9.1f} {base['train']:>8.1f} {ours['train'] / base['train']:>5.2f}x"
              f"   {ours['infer']:>9.1f} {base['infer']:>8.1f} {ours['infer'] / base['infer']:>5.2f}x"
              f"   {loader / ours['train']:>10.1f}x {ok}")
    print("\ntrain/infer: kit layout (channels_last); NCHW: baseline layout; loader/train must be >= 2x")


def learn(args) -> None:
    import subprocess

    from kit.config import load_config
    from kit.train import train_fold

    root = Path(args.out or tempfile.mkdtemp(prefix="bench_learn_"))
    py = sys.executable
    if not (root / "train.csv").is_file():
        from kit.synth import generate_dataset

        generate_dataset(root, n_train=args.images, n_test=0, size=args.field, seed=1, workers=args.workers)
    if not (root / "folds.csv").is_file():
        subprocess.run([py, "-m", "kit", "folds", "--labels", str(root / "train.csv"), "--n-splits", "3",
                        "--seed", "0", "--out", str(root / "folds.csv")], check=True, stdout=subprocess.DEVNULL)
    cfg = load_config(None, [
        f"data.data_dir={root}", f"data.folds_file={root}/folds.csv", f"data.mask_cache={root}/cache/masks",
        f"data.tile_cache={root}/cache/tiles", f"data.field_cache={root}/cache/fields", f"data.tile_size={args.size}",
        f"model.backbone={args.models.split(',')[0]}", "model.dropout=0.1", f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch}", f"train.lr={args.lr}", f"train.workers={args.workers}",
        f"run_dir={root}/run", f"train.device={args.device}", f"train.max_cells_per_image={args.max_cells}",
    ])
    t = time.perf_counter()
    res = train_fold(cfg, "cell", 0)
    print(f"\ncell model, fold 0, {res['n_train']} train / {res['n_valid']} valid cells, {args.epochs} epochs in "
          f"{time.perf_counter() - t:.0f} s: best validation macro-AP {res['macro_ap']:.4f} (epoch {res['best_epoch']}), "
          f"class-prior macro-AP {res['prior_ap']:.4f}, micro-AP {res['micro_ap']:.4f}, image-level macro-AP "
          f"(max over cells) {res.get('image_macro_ap', float('nan')):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--size", type=int, default=64, help="tile side in px")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=3, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--loader-batches", type=int, default=30)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--learn", action="store_true", help="run the synthetic-data learning check instead")
    p.add_argument("--out", help="--learn: dataset/run folder (reused when present)")
    p.add_argument("--images", type=int, default=90, help="--learn: synthetic training images")
    p.add_argument("--field", type=int, default=512, help="--learn: synthetic field size in px")
    p.add_argument("--epochs", type=int, default=6, help="--learn: epochs")
    p.add_argument("--lr", type=float, default=2e-3, help="--learn: peak learning rate")
    p.add_argument("--max-cells", type=int, default=0, help="--learn: training cells kept per image (0 = all)")
    args = p.parse_args()
    learn(args) if args.learn else throughput(args)


if __name__ == "__main__":
    main()
