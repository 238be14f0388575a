"""Learning benchmark: true cell mAP of every way the kit learns cell labels from image labels.

    .venv/bin/python benchmarks/bench_learning.py                      # the full table (see below)
    .venv/bin/python benchmarks/bench_learning.py --quick              # smoke run, minutes
    .venv/bin/python benchmarks/bench_learning.py --seeds 1001 --styles default --variants broadcast,mil

Data: `kit synth` datasets with per-cell truth, one per (style, seed): ``--train`` 150 / ``--test``
50 fields of ``--size`` 512 px, seeds 1001, 1002, 1003 (no test and no default was tuned on
them), each style the generator offers (``--styles``; ``default`` and, when kit.synth has styles,
its harder heterogeneous one, fields whose cells show few of the image's labels). Per dataset the
expensive shared work runs once: folds, segmentation (the classical default), tiles, fields, and
the image model (one per dataset, linked into every variant's run folder). Each trained variant is
a kit run folder (kit.train.train_all, the kit's own code paths) whose OOF files and test
predictions (kit.predict, cached) are then scored post hoc for every Negative mode, combination,
image source and cell policy at prediction, without retraining.

Trained variants (``--variants``; CPU-sized: ResNet-18, ``--tile-size`` 48 px tiles, 256 px
fields, ``--epochs`` 4, ``--folds`` 3):
  broadcast   today's defaults (every cell gets its image's labels) + ``--rounds`` pseudo-label rounds
  mil         train.cell_mode=mil (max pooling, bag 16, cell weight 0.1) + ``--rounds`` pseudo rounds
  mil_attn    the same with attention pooling (no pseudo round)
  filters     broadcast trained and predicted with the cell policy on (``POLICY``)
  negaug      broadcast with the dimmed-green Negative augmentation (p = 0.05)
  unstained   broadcast, training cells below stain fraction 0.3 get the unstained rule's targets
  unstained_pseudo  the same + ``--rounds`` pseudo-label rounds (the rule applied to the pseudo targets)
  effnet      EfficientNet-Lite0 with ImageNet weights, epochs set for equal training CPU time
  resnet50    ResNet-50 from scratch, epochs set for equal training CPU time
  effimage    the image model as EfficientNet-Lite0 with ImageNet weights (same epochs; its CPU
              time is in table.json), scored with the broadcast variant's cell model (run first)
  image_long  the ResNet-18 image model trained 16 epochs instead of ``--epochs`` (same cell model)
  effimage_long  EfficientNet-Lite0 (ImageNet) image model, 16 epochs (same cell model)
Rows: per variant, cell-only, image-only, product and the combination chosen on OOF by the kit's
rule (kit.combine.choose); for the broadcast round 0 also every Negative mode, every combination,
the OOF-best candidate without the rule, the cell policy at prediction only; the segmentation
ceiling (true labels on predicted masks), the classification ceiling (broadcast model on true
masks) and the oracle broadcast (true image labels on true cells). Each row: mean +- sd over
seeds, and min..max, per style; ``--out``/table.md and table.json hold it all.

Cost: ~2 h on an idle 2-core machine for the full table (shared work ~3 min per dataset; a
variant ~3-4 min per dataset); ``--quick`` ~10 min. Deterministic: fixed seeds, one torch thread
per process unless ``--threads``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

POLICY = ["cells.border_nucleus_fraction=0.5", "cells.min_signal_fraction=0.2",
          "cells.edge_area_fraction=0.019", "cells.inner_area_fraction=0.0076"]
VARIANTS = {
    "broadcast": [],
    "mil": ["train.cell_mode=mil"],
    "mil_attn": ["train.cell_mode=mil", "train.bag_pool=attention"],
    "filters": POLICY,
    "negaug": ["train.negative_aug=0.05"],
    "unstained": ["train.unstained_targets=0.3"],
    "unstained_pseudo": ["train.unstained_targets=0.3"],
    "effnet": ["cell_model.backbone=efficientnet_lite0", "cell_model.pretrained=imagenet"],
    "resnet50": ["cell_model.backbone=resnet50"],
    "effimage": ["image_model.backbone=efficientnet_lite0", "image_model.pretrained=imagenet"],
    "image_long": ["image_model.epochs=16"],
    "effimage_long": ["image_model.backbone=efficientnet_lite0", "image_model.pretrained=imagenet",
                      "image_model.epochs=16"],
}
EQUAL_TIME = ("effnet", "resnet50")
PSEUDO_VARIANTS = ("broadcast", "mil", "unstained_pseudo")  # the variants trained with --rounds pseudo rounds
# Variants that change the image model only: they train their own image model and reuse the
# broadcast variant's cell model (linked, so it is trained once), then score every row with it.
IMAGE_ONLY_VARIANTS = ("effimage", "image_long", "effimage_long")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# data and shared stages


def make_dataset(root: Path, style: str, seed: int, args) -> Path:
    import inspect

    from kit.synth import generate_dataset

    data = root / f"{style}-s{seed}"
    if (data / "test_solution.csv").is_file():
        return data
    kwargs = {}
    if "style" in inspect.signature(generate_dataset).parameters:
        kwargs["style"] = style
    elif style != "default":
        raise SystemExit(f"kit.synth has no styles: --styles {style} is not available (use default)")
    generate_dataset(data, n_train=args.train, n_test=args.test, size=args.size, seed=seed, workers=args.workers,
                     **kwargs)
    return data


def base_overrides(args) -> list[str]:
    return [f"model.backbone={args.backbone}", f"train.epochs={args.epochs}", f"data.tile_size={args.tile_size}",
            f"data.field_size={args.field_size}", "train.batch_size=32", "train.lr=0.002", "train.workers=0",
            "predict.tta=1", "predict.batch_size=128", f"train.pseudo_rounds={args.rounds}",
            # plain torch inference: this measures scores, and the engine probe of kit.throughput
            # (equal outputs to ~1e-7) took 15 min per model under load on the shared 2-core machine
            "predict.engine=torch"]


def prepare(data: Path, work: Path, args) -> list[str]:
    """Folds, then one decode per image (kit.prepare): masks, tiles and fields of the train images,
    masks of the test images, once per dataset (every variant's run reads the same caches);
    returns the test IDs."""
    import pandas as pd

    from kit.manifest import resolve_inputs
    from kit.pipeline import build_config, stage_folds
    from kit.prepare import Plan, prepare_folder, prepare_run

    cfg = build_config(data, work, None, base_overrides(args), args.folds, 7)
    stage_folds(cfg, args.folds, 7)
    ids = pd.read_csv(data / "train.csv", dtype=str)["ID"].tolist()
    test = pd.read_csv(data / "sample_submission.csv", dtype=str)["ID"].tolist()
    inputs = resolve_inputs(cfg)
    prepare_run(inputs, ids, workers=args.workers, progress=False)
    prepare_folder(data / "test", test, Plan(masks=inputs.masks()), workers=args.workers,
                   progress=False).raise_failures("test masks")
    return test


def variant_config(data: Path, work: Path, overrides: list[str], args):
    from kit.pipeline import build_config

    return build_config(data, work, None, base_overrides(args) + overrides, args.folds, 7)


def step_rate(backbone: str, args, pretrained: str | None = None) -> float:
    """Training steps per CPU second of `backbone` at the benchmark's tile and batch size."""
    import torch

    from kit.losses import BCELoss
    from kit.models import build_model, preprocess

    torch.manual_seed(0)
    model = build_model(backbone, pretrained=pretrained).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.randint(0, 255, (32, 4, args.tile_size, args.tile_size), dtype=torch.uint8)
    y = torch.zeros(32, 19)
    loss_fn = BCELoss()
    model.train()
    for i in range(8):
        if i == 2:
            t0 = time.process_time()
        loss = loss_fn(model(preprocess(x).contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return 6 / (time.process_time() - t0)


# --------------------------------------------------------------------------------------------
# scoring


def true_map(solution: dict, preds: dict, ids: list[str]) -> float:
    from kit.metric import evaluate_predictions

    return float(evaluate_predictions(solution, preds, image_ids=ids)["mAP"])


def oracle_broadcast(solution: dict, train_labels: dict | None = None) -> dict:
    """The true image labels (union of the true cells') broadcast to every true cell, confidence 1."""
    from kit.labels import NUM_CLASSES
    from kit.submission import ImagePrediction

    out = {}
    for image_id, p in solution.items():
        masks = list(dict.fromkeys(m for _, _, m in p.triples))
        labels = {c for c, _, _ in p.triples}
        if labels - {18}:
            labels -= {18}  # an image is Negative only when every cell is
        out[image_id] = ImagePrediction(p.width, p.height, [(c, 1.0 if c in labels else 0.0, m)
                                                            for m in masks for c in range(NUM_CLASSES)])
    return out


def with_policy(results: dict, cache, policy) -> dict:  # cache: the run's kit.segment.cache.MaskCache
    """Results with the cell policy applied after the fact (drop + confidence factor)."""
    from kit.cell_policy import confidence_scale, keep_mask
    from kit.combine import stain_fraction

    out = {}
    for image_id, r in results.items():
        _, cells, table = cache.load(image_id)
        table = table.set_index("cell_id").loc[r.cell_ids].reset_index()
        keep = keep_mask(table, policy)
        scale = confidence_scale(table, policy, float(cells.size))[keep]
        out[image_id] = dataclasses.replace(
            r, cell_ids=r.cell_ids[keep], cell_probs=r.cell_probs[keep], visible=r.visible[keep],
            masks=r.masks[keep], scale=scale, stain=stain_fraction(table[keep]))  # as kit.predict: kept cells
    return out


def score_run(cfg, data: Path, test_ids: list[str], solution: dict, rounds: list[int], extra: bool) -> dict:
    """{row name: test true cell mAP} of one trained variant (post-hoc rows when `extra`)."""
    from kit.combine import (CELL_ONLY, IMAGE_ONLY, UNSTAINED, CombineSpec, candidate_specs, choose, load_oof,
                             tune)
    from kit.ceilings import seg_ceiling_predictions
    from kit.manifest import read_manifest
    from kit.masks import truth_masks
    from kit.predict import Predictor, available_image_sources, build_predictions
    from kit.pseudo import cell_dir_name

    run_dir = Path(cfg.run_dir)
    test_dir = data / "test"
    rows: dict[str, float] = {}
    PRODUCT = CombineSpec("product")  # the plain product, whatever the kit's default is
    PRODUCT_UNSTAINED = CombineSpec("product", unstained=UNSTAINED)
    CELL_UNSTAINED = CombineSpec("cell_only", unstained=UNSTAINED)
    for r in rounds:
        rcfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pseudo_rounds=r))
        predictor = Predictor(run_dir, rcfg)
        sources = [predictor.run_masks(test_dir)] + ([truth_masks(data)] if extra and r == 0 else [])
        results, *true_results = predictor.predict_sources(test_dir, test_ids, sources, progress=False)
        have = available_image_sources(results)
        tag = f"r{r}"
        rows[f"{tag} cell-only"] = true_map(solution, build_predictions(results, CELL_ONLY), test_ids)
        rows[f"{tag} cell-only + unstained"] = true_map(solution, build_predictions(results, CELL_UNSTAINED), test_ids)
        for src in have + (["mean"] if len(have) == 2 else []):
            rows[f"{tag} image-only [{src}]"] = true_map(solution, build_predictions(results, IMAGE_ONLY, image_source=src), test_ids)
            rows[f"{tag} product [{src}]"] = true_map(solution, build_predictions(results, PRODUCT, image_source=src), test_ids)
            rows[f"{tag} product + unstained [{src}]"] = true_map(
                solution, build_predictions(results, PRODUCT_UNSTAINED, image_source=src), test_ids)
        oof = load_oof(run_dir, rcfg, progress=False, cell_dir=cell_dir_name(r))
        rows[f"{tag} OOF cell-only"] = oof.score(CELL_ONLY)
        rows[f"{tag} OOF product"] = oof.score(PRODUCT)
        rows[f"{tag} OOF product + unstained"] = oof.score(PRODUCT_UNSTAINED)
        ranking = tune(oof, candidate_specs())
        chosen, _, _ = choose(oof, ranking)
        rows[f"{tag} tuned (kit rule) [{oof.image_source}]"] = true_map(
            solution, build_predictions(results, chosen, image_source=oof.image_source), test_ids)
        rows[f"{tag} tuned choice"] = chosen.name
        if extra and r == 0:
            rows["r0 OOF-best without the rule"] = true_map(
                solution, build_predictions(results, ranking[0][0], image_source=oof.image_source), test_ids)
            for neg in ("model", "max", "complement", "min_complement", "suppress"):
                rows[f"negative={neg} (product)"] = true_map(
                    solution, build_predictions(results, CombineSpec("product", negative=neg)), test_ids)
            for t in (0.1, 0.2, 0.5):
                rows[f"unstained<{t:g} (product)"] = true_map(
                    solution, build_predictions(results, CombineSpec("product", unstained=t)), test_ids)
            for spec in (CombineSpec("mean", 0.7), CombineSpec("geometric", 0.5), CombineSpec("field", 0.9),
                         CombineSpec("rank", 0.5), CombineSpec("product", border_power=1.0)):
                rows[f"combination {spec.name}"] = true_map(solution, build_predictions(results, spec), test_ids)
            from kit.config import load_config

            cache = read_manifest(run_dir).masks()
            for label, rules in [("all rules", POLICY)] + [(rule.split("=")[0][6:], [rule]) for rule in POLICY]:
                filtered = with_policy(results, cache, load_config(None, rules).cells)
                rows[f"policy at prediction only ({label}): product"] = true_map(
                    solution, build_predictions(filtered, PRODUCT), test_ids)
            rows["ceiling: segmentation (true labels, predicted masks)"] = true_map(
                solution, seg_ceiling_predictions(results, solution), test_ids)
            rows["ceiling: classification (product, true masks)"] = true_map(
                solution, build_predictions(true_results[0], PRODUCT), test_ids)
            rows["ceiling: classification (product + unstained, true masks)"] = true_map(
                solution, build_predictions(true_results[0], PRODUCT_UNSTAINED), test_ids)
            rows["oracle broadcast (true image labels, true cells)"] = true_map(solution, oracle_broadcast(solution), test_ids)
    return rows


# --------------------------------------------------------------------------------------------
# the benchmark


def run_dataset(style: str, seed: int, args, root: Path) -> dict:
    import torch

    from kit.submission import read_submission
    from kit.train import train_all

    t0 = time.time()
    data = make_dataset(root / "data", style, seed, args)
    work = root / "work" / f"{style}-s{seed}"
    test_ids = prepare(data, work, args)
    solution = read_submission(data / "test_solution.csv")
    out: dict = {"style": style, "seed": seed, "rows": {}, "cpu_s": {}, "epochs": {}, "prep_s": round(time.time() - t0, 1)}
    base = variant_config(data, work, [], args)
    image_dir = Path(base.run_dir) / "image"
    torch.manual_seed(0)
    c0 = time.process_time()
    train_all(base, kinds=("image",), resume=True, progress=False)
    out["cpu_s"]["image model"] = round(time.process_time() - c0, 1)
    rate18 = None
    for name in args.variants:
        overrides = list(VARIANTS[name])
        if name not in PSEUDO_VARIANTS:
            overrides.append("train.pseudo_rounds=0")
        epochs = args.epochs
        if name in EQUAL_TIME:
            rate18 = rate18 or step_rate(args.backbone, args)
            bb = "efficientnet_lite0" if name == "effnet" else "resnet50"
            rate = step_rate(bb, args, "imagenet" if name == "effnet" else None)
            epochs = max(1, int(round(args.epochs * rate / rate18)))
            overrides.append(f"cell_model.epochs={epochs}")
        out["epochs"][name] = epochs
        cfg = variant_config(data, work, overrides, args)
        run_dir = Path(cfg.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        t1, c1 = time.time(), time.process_time()
        if name in IMAGE_ONLY_VARIANTS:
            cell_dir = Path(base.run_dir) / "cell"
            if not cell_dir.is_dir():
                raise SystemExit(f"variant {name} needs the broadcast variant's cell model: list broadcast first")
            link = run_dir / "cell"
            if not link.exists():
                link.symlink_to(cell_dir.resolve(), target_is_directory=True)
            train_all(cfg, kinds=("image",), resume=True, progress=False)
        else:
            link = run_dir / "image"
            if not link.exists() and run_dir != image_dir.parent:
                link.symlink_to(image_dir.resolve(), target_is_directory=True)
            train_all(cfg, kinds=("cell",), resume=True, progress=False)
        out["cpu_s"][name] = round(time.process_time() - c1, 1)
        _log(f"[{style} s{seed}] {name}: trained in {time.time() - t1:.0f} s wall")
        rounds = list(range(cfg.train.pseudo_rounds + 1))
        rows = score_run(cfg, data, test_ids, solution, rounds, extra=name == "broadcast")
        out["rows"].update({f"{name} {k}": v for k, v in rows.items()})
        _log(f"[{style} s{seed}] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows.items()
                                                        if isinstance(v, float) and " OOF" not in k))
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def summarise(results: list[dict]) -> tuple[str, dict]:
    """One markdown table: rows x styles, mean +- sd (min..max) over seeds."""
    styles = sorted({r["style"] for r in results})
    names: list[str] = []
    for r in results:
        names += [k for k in r["rows"] if k not in names]
    summary: dict = {}
    lines = ["| row | " + " | ".join(f"{s}: mean +- sd (min..max), n" for s in styles) + " |",
             "|---|" + "---:|" * len(styles)]
    for name in names:
        cells = []
        for s in styles:
            vals = [r["rows"][name] for r in results if r["style"] == s and name in r["rows"]]
            if vals and isinstance(vals[0], str):
                cells.append(", ".join(sorted(set(vals))))
                summary.setdefault(name, {})[s] = vals
                continue
            v = np.asarray(vals, dtype=float)
            if not len(v):
                cells.append("")
                continue
            sd = float(v.std(ddof=1)) if len(v) > 1 else 0.0
            summary.setdefault(name, {})[s] = {"mean": float(v.mean()), "sd": sd, "min": float(v.min()),
                                               "max": float(v.max()), "values": v.tolist()}
            cells.append(f"{v.mean():.4f} +- {sd:.4f} ({v.min():.4f}..{v.max():.4f}), {len(v)}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench_learning"))
    p.add_argument("--seeds", default="1001,1002,1003")
    p.add_argument("--styles", default="default")
    p.add_argument("--variants", default=",".join(VARIANTS))
    for name, default, what in (("--train", 150, "train fields per dataset"), ("--test", 50, "test fields per dataset"),
                                ("--size", 512, "field side in px"), ("--folds", 3, "folds (OOF for the choice)"),
                                ("--epochs", 4, "epochs of ResNet-18 (the others: equal CPU time)")):
        p.add_argument(name, type=int, default=default, help=f"{what} (default {default})")
    p.add_argument("--rounds", type=int, default=2, help="pseudo-label rounds of the broadcast and mil variants")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--tile-size", type=int, default=48)
    p.add_argument("--field-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed: the table is then reproducible)")
    p.add_argument("--quick", action="store_true", help="1 seed, 24/8 fields of 256 px, 2 folds, 2 epochs, 3 variants")
    p.add_argument("--table-only", action="store_true",
                   help="no training: the table of every result-*.json already under --out (runs made in parts)")
    args = p.parse_args(argv)
    if args.table_only:
        results = [json.loads(f.read_text()) for f in sorted(args.out.glob("result-*.json"))]
        table, _ = summarise(results)
        print(table)
        return 0
    if args.quick:
        args.seeds, args.train, args.test, args.size, args.folds, args.epochs, args.rounds = "1001", 24, 8, 256, 2, 2, 1
        if args.variants == ",".join(VARIANTS):
            args.variants = "broadcast,mil,effnet"
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for style in [s for s in args.styles.split(",") if s]:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            res = run_dataset(style, seed, args, args.out)
            results.append(res)
            with open(args.out / f"result-{style}-s{seed}.json", "w") as f:
                json.dump(res, f, indent=1)
    table, summary = summarise(results)
    cpu = {(r["style"], r["seed"]): r["cpu_s"] for r in results}
    text = (f"# bench_learning: true test cell mAP\n\ncommand: {' '.join(sys.argv)}\n\n{table}\n\n"
            f"training CPU seconds per dataset: {json.dumps({f'{k[0]}-s{k[1]}': v for k, v in cpu.items()})}\n"
            f"epochs: {json.dumps(results[0]['epochs'])}\nwall seconds per dataset: "
            f"{[r['wall_s'] for r in results]}\n")
    (args.out / "table.md").write_text(text)
    (args.out / "table.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
