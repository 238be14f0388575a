"""Prediction speed: the kit's inference path beside a plain baseline, measured in the same run.

1. Cell-model inference on tiles: `kit.predict.FoldEnsemble` (torch.inference_mode, channels_last
   weights and inputs) vs the plain loop (torch.no_grad, contiguous NCHW), same models and tiles.
2. Whole images: `Predictor.predict_folder` with the read-ahead thread (the next image is decoded,
   tiled and its masks RLE-encoded while the CNN runs; `kit.prepare.prepare_image`) vs without it (the CPU default; the thread
   is the default on CUDA, where the CPU work then overlaps the GPU).
3. Combination + submission triples for the predicted images (kit.combine + build_predictions).

Randomly initialised ResNet checkpoints are used (speed does not depend on the weights).

    .venv/bin/python benchmarks/bench_predict.py                       # small: ~1-2 minutes
    .venv/bin/python benchmarks/bench_predict.py --size 2048 --images 4 --tile-size 128 --backbone resnet50

Prints medians over --repeats and the ratio baseline / kit (>1: the kit is faster). On a machine
shared with other jobs, trust the ratios more than the absolute times.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_run(root: Path, data_dir: Path, backbone: str, tile_size: int, field_size: int, folds: int) -> Path:
    from kit.config import load_config, save_config, to_dict
    from kit.models import build_from_config

    run = root / "run"
    cfg = load_config(None, [f"model.backbone={backbone}", f"data.tile_size={tile_size}",
                             f"data.field_size={field_size}", f"data.data_dir={data_dir}",
                             f"data.mask_cache={root / 'masks'}", "train.device=cpu"])
    cfg.run_dir = str(run)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    for kind in ("cell", "image"):
        for fold in range(folds):
            model = build_from_config(cfg.model(kind), pretrained=False)
            path = run / kind / f"fold{fold}" / "best.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1}, path)
    return run


def baseline_predict(models, tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """The plain way: no_grad, contiguous NCHW."""
    from kit.models import preprocess

    out = []
    with torch.no_grad():
        for start in range(0, len(tiles), batch_size):
            x = preprocess(torch.from_numpy(np.ascontiguousarray(tiles[start:start + batch_size])))
            out.append(sum(torch.sigmoid(m(x)) for m in models).numpy() / len(models))
    return np.concatenate(out)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="synthetic test images (default 4)")
    ap.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=64)
    ap.add_argument("--field-size", type=int, default=128)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from kit.combine import CombineSpec
    from kit.models import load_fold_models
    from kit.layout import list_image_ids
    from kit.predict import FoldEnsemble, Predictor, build_predictions
    from kit.prepare import Plan, prepare_folder
    from kit.synth import generate_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        data = generate_dataset(root / "data", n_train=0, n_test=args.images, size=args.size, seed=1)
        run = make_run(root, data, args.backbone, args.tile_size, args.field_size, args.folds)
        test_dir = data / "test"
        ids = list_image_ids(test_dir)
        predictor = Predictor(run, batch_size=args.batch_size, device="cpu")
        masks = predictor.run_masks(test_dir)
        prepare_folder(test_dir, ids, Plan(masks=masks.cache), progress=False)  # segmentation is not measured here

        print(f"machine: {torch.get_num_threads()} torch threads; {args.images} images of {args.size} px, "
              f"{args.backbone}, {args.folds} folds, tiles {args.tile_size} px, fields {args.field_size} px")
        print("(the machine may be shared with other jobs: compare the ratios)\n")

        # 1. tiles through the cell models
        from kit.cells import extract_tiles
        from kit.images import read_sample

        tiles = []
        for i in ids:
            _, cells, table = masks.load(i, None)
            tiles.append(extract_tiles(read_sample(test_dir, i), cells, args.tile_size, table=table)[0])
        tiles = np.concatenate(tiles)
        ens = FoldEnsemble(run, "cell", "cpu", batch_size=args.batch_size)
        plain = load_fold_models(run, "cell", "cpu")
        ens.predict(tiles[: args.batch_size])  # warm-up (first-call allocations)
        baseline_predict(plain, tiles[: args.batch_size], args.batch_size)
        t_base, p_base = timed(lambda: baseline_predict(plain, tiles, args.batch_size), args.repeats)
        t_kit, p_kit = timed(lambda: ens.predict(tiles), args.repeats)
        diff = float(np.abs(p_base - p_kit).max())
        print(f"cell inference, {len(tiles)} tiles x {args.folds} folds")
        print(f"  baseline no_grad NCHW          {t_base:8.3f} s  {len(tiles) / t_base:8.1f} tiles/s")
        print(f"  kit inference_mode NHWC        {t_kit:8.3f} s  {len(tiles) / t_kit:8.1f} tiles/s")
        print(f"  ratio {t_base / t_kit:.2f}x   (max |difference| of probabilities {diff:.1e})\n")

        # 2. whole images, with and without the read-ahead thread
        def whole(prefetch: bool):
            cache = predictor.cache_dir(test_dir, masks)
            shutil.rmtree(cache, ignore_errors=True)
            return predictor.predict_folder(test_dir, ids, masks, progress=False, prefetch=prefetch)

        whole(True)  # warm-up: loads the fold models once
        t_seq, _ = timed(lambda: whole(False), args.repeats)
        t_pre, results = timed(lambda: whole(True), args.repeats)
        print(f"whole images ({len(ids)}: read, tiles, cell + image models, RLE, cache write)")
        print(f"  sequential                     {t_seq:8.3f} s  {len(ids) / t_seq:8.2f} img/s")
        print(f"  with read-ahead thread         {t_pre:8.3f} s  {len(ids) / t_pre:8.2f} img/s")
        print(f"  ratio {t_seq / t_pre:.2f}x\n")

        # 3. combination and triples
        spec = CombineSpec("geometric", 0.5, "max", 0.5)
        t_comb, preds = timed(lambda: build_predictions(results, spec), args.repeats)
        n_triples = sum(len(p.triples) for p in preds.values())
        print(f"combine + triples: {n_triples} triples in {t_comb * 1000:.1f} ms")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
