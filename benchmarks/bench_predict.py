"""Whole-field prediction speed: the kit's `predict` against a plain loop and against an older commit.

Every variant runs the whole job on the same fields, from PNG files to a validated submission:
decode, segment (masks not cached: segmentation is counted), cell tiles, the cell and image fold
models, RLE, write + validate. Variants, each in its own fresh process (imports not counted; the
model loading is), interleaved over `--repeats` rounds with the order rotated; medians:

* ``plain``: the straightforward loop (one image at a time: read, segment, tiles, each fold model in
  ``torch.no_grad`` on NCHW tensors, field, RLE; then write + validate); defined here, so it does
  not change when the kit does;
* ``kit``: ``kit.predict.predict`` of this tree (its chosen inference path, batching, read-ahead);
* ``<commit>`` (``--commit``, default 971207d): the same call in a temporary ``git worktree`` of that
  commit (today's code when the issue was filed).

Randomly initialised checkpoints (speed does not depend on the weights); ``--check`` compares the
kit's cell probabilities with the plain loop's (max |difference|, same masks).

    .venv/bin/python benchmarks/bench_predict.py                       # the four real fields, ResNet-18, 2 folds
    .venv/bin/python benchmarks/bench_predict.py --backbone resnet50 --folds 5 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL_FIELDS = REPO.parent / "shared" / "data" / "hpa_real" / "kaggle2021_fields" / "train"


def make_run(root: Path, backbone: str, tile_size: int, field_size: int, folds: int, masks: Path) -> Path:
    """A run folder with random-init fold checkpoints that old and new kits both read."""
    import torch

    from kit.config import load_config, save_config, to_dict
    from kit.models import build_from_config

    run = root / "run"
    cfg = load_config(None, [f"model.backbone={backbone}", f"data.tile_size={tile_size}",
                             f"data.field_size={field_size}", f"data.mask_cache={masks}", "train.device=cpu"])
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


# ------------------------------------------------------------------------------------ children

def plain_predict(run: Path, images: Path, out: Path) -> dict:
    """The plain loop (module doc). Returns {"cell_probs": {id: N x 19}} for --check."""
    import numpy as np
    import torch

    from kit.cells import cell_table, extract_tiles
    from kit.images import read_sample
    from kit.models import load_fold_models, preprocess
    from kit.rle import encode_label_image
    from kit.segment import segment_image
    from kit.submission import ImagePrediction, validate_submission, write_submission
    try:
        from kit.fields import downscale_field
    except ImportError:  # before the restructuring
        from kit.datasets import make_field as downscale_field
    from kit.config import load_config

    cfg = load_config(run / "config.yaml")
    cell_models = load_fold_models(run, "cell", "cpu")
    image_models = load_fold_models(run, "image", "cpu")
    ids = sorted(p.name[: -len("_red.png")] for p in images.glob("*_red.png"))

    def probs(models, batch):
        out = []
        with torch.no_grad():
            for s in range(0, len(batch), 64):
                x = preprocess(torch.from_numpy(np.ascontiguousarray(batch[s:s + 64])))
                out.append((sum(torch.sigmoid(m(x)) for m in models) / len(models)).numpy())
        return np.concatenate(out) if out else np.zeros((0, 19), np.float32)

    preds, cell_probs = {}, {}
    for image_id in ids:
        image = read_sample(images, image_id)
        nuclei, cells = segment_image(image, cfg.data.segment_backend)
        table = cell_table(nuclei, cells)
        tiles, table = extract_tiles(image, cells, cfg.data.tile_size, table=table)
        cp = probs(cell_models, tiles)
        ip = probs(image_models, downscale_field(image, cfg.data.field_size)[None])[0]
        rle = encode_label_image(cells)
        h, w = image.shape[:2]
        triples = [(c, float(cp[i, c] * ip[c]), rle[int(k)]) for i, k in enumerate(table["cell_id"]) for c in range(19)]
        preds[image_id] = ImagePrediction(w, h, triples)
        cell_probs[image_id] = cp
    write_submission(out, preds, ids, None)
    problems = validate_submission(out, images=images, check_masks=True)
    assert not problems, problems[:3]
    return {"cell_probs": cell_probs}


def kit_predict(run: Path, images: Path, out: Path) -> dict:
    from kit.predict import predict

    predict(run, images, out, progress=False)
    return {}


def _child(args) -> int:
    """Run one variant in this fresh process; print one JSON line."""
    sys.path.insert(0, args.tree)
    import kit  # noqa: F401  (imports are not timed)
    import kit.predict  # noqa: F401
    import torch  # noqa: F401

    run, images, out = Path(args.run), Path(args.images), Path(args.out)
    t0 = time.perf_counter()
    extra = (plain_predict if args.child == "plain" else kit_predict)(run, images, out)
    seconds = time.perf_counter() - t0
    if args.check_out and extra.get("cell_probs"):
        import numpy as np

        np.savez(args.check_out, **extra["cell_probs"])
    print(json.dumps({"seconds": seconds}))
    return 0


# ------------------------------------------------------------------------------------ parent

def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=REAL_FIELDS, help="fields (default: the four real Kaggle 2021 fields)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--tile-size", type=int, default=128)
    ap.add_argument("--field-size", type=int, default=512)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--commit", default="971207d", help="older commit to compare with ('' to skip)")
    ap.add_argument("--check", action="store_true", help="compare the kit's cell probabilities with the plain loop's")
    ap.add_argument("--json", type=Path, help="write the figures here")
    # child mode (internal)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--check-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    if not args.images.is_dir():
        print(f"fields not found: {args.images}", file=sys.stderr)
        return 2

    sys.path.insert(0, str(REPO))
    root = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    trees = {"plain": REPO, "kit": REPO}
    try:
        if args.commit:
            old = root / f"tree-{args.commit}"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.commit],
                           check=True, capture_output=True)
            trees[args.commit] = old
        runs = {}
        for name in trees:  # one run folder (and mask cache) per variant: no sharing of caches
            if trees[name] == REPO:
                runs[name] = make_run(root / name, args.backbone, args.tile_size, args.field_size, args.folds,
                                      root / name / "masks")
            else:  # the older kit writes its own run folder (its config knows other keys)
                code = (f"import sys; sys.path[:0] = [{str(trees[name])!r}, {str(Path(__file__).resolve().parent)!r}]; "
                        "from pathlib import Path; import bench_predict as b; "
                        f"b.make_run(Path({str(root / name)!r}), {args.backbone!r}, {args.tile_size}, "
                        f"{args.field_size}, {args.folds}, Path({str(root / name / 'masks')!r}))")
                subprocess.run([sys.executable, "-c", code], check=True, cwd=str(trees[name]))
                runs[name] = root / name / "run"
        env = dict(os.environ, KIT_THROUGHPUT_CACHE=str(root / "throughput.json"))
        print(f"{len(list(args.images.glob('*_red.png')))} fields in {args.images}; {args.backbone}, {args.folds} folds, "
              f"tiles {args.tile_size} px, fields {args.field_size} px; load {_load()}", flush=True)

        def run_variant(name: str, check_out: Path | None = None) -> float:
            run = runs[name]
            shutil.rmtree(root / name / "masks", ignore_errors=True)
            # the prediction cache goes; the run's ONNX export of its folds stays (made once per run
            # on the warm-up, like the throughput probe: ~3 s per model kind, a one-off for 559 fields)
            for stale in (run / "predict").glob("*"):
                if stale.suffix not in (".onnx", ".json"):  # the export and its sidecar
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--tree", str(trees[name]),
                   "--run", str(run), "--images", str(args.images), "--out", str(root / name / "submission.csv")]
            if check_out:
                cmd += ["--check-out", str(check_out)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(trees[name]))
            if res.returncode != 0:
                raise RuntimeError(f"variant {name} failed:\n{res.stderr[-3000:]}")
            return json.loads(res.stdout.strip().splitlines()[-1])["seconds"]

        # warm-up: the kit's first run probes the inference path (cached per machine and model) and
        # exports the folds to ONNX when that path wins (cached in the run folder)
        t_probe = run_variant("kit")
        print(f"warm-up kit run (includes the one-off throughput probe and ONNX export): {t_probe:.1f} s", flush=True)
        names = list(trees)
        times = {n: [] for n in names}
        for r in range(args.repeats):
            for n in names[r % len(names):] + names[: r % len(names)]:
                times[n].append(run_variant(n))
                print(f"  round {r + 1}: {n:8s} {times[n][-1]:7.1f} s   load {_load()}", flush=True)
        med = {n: statistics.median(v) for n, v in times.items()}
        print("\nvariant   median s   plain / variant")
        for n in names:
            print(f"{n:8s} {med[n]:9.1f}   {med['plain'] / med[n]:6.2f}x")
        result = {"median_s": med, "times": times, "load_end": _load(), "fields": str(args.images),
                  "backbone": args.backbone, "folds": args.folds, "tile_size": args.tile_size,
                  "field_size": args.field_size, "probe_run_s": t_probe}
        print(f"\nkit vs plain loop: {med['plain'] / med['kit']:.2f}x")
        if args.commit:
            print(f"kit vs {args.commit}: {med[args.commit] / med['kit']:.2f}x")
            result["vs_commit"] = med[args.commit] / med["kit"]
        result["vs_plain"] = med["plain"] / med["kit"]
        if args.check:
            import numpy as np

            run_variant("plain", root / "plain_probs.npz")
            plain = np.load(root / "plain_probs.npz")
            from kit.predict import ImageResult

            diffs = []
            for npz in (runs["kit"] / "predict").glob("*/*.npz"):
                r = ImageResult.load(npz, npz.stem)
                if npz.stem in plain.files and plain[npz.stem].shape == r.cell_probs.shape:
                    diffs.append(float(np.abs(plain[npz.stem] - r.cell_probs).max(initial=0.0)))
            print(f"cell probabilities, kit vs plain loop: max |difference| {max(diffs):.1e} over {len(diffs)} fields")
            result["max_abs_diff"] = max(diffs) if diffs else None
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        if args.commit and (root / f"tree-{args.commit}").exists():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / f"tree-{args.commit}")],
                           capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
