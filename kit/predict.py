"""Fold-ensemble inference: a folder of images -> ``submission/submission.csv``.

``python -m kit predict --run RUN_DIR --images DIR [--out submission/submission.csv]
[--ids-from sample_submission.csv]``

For every image, one at a time (memory stays bounded for 3072 px fields: one image in the model,
on CUDA one more being read ahead by a thread, tiles in batches):

1. cells from the mask cache (segmented first, in parallel, when missing);
2. cell tiles (`kit.cells.extract_tiles`, the run's tile size) -> each fold's cell model ->
   probabilities averaged over folds and the optional flip TTA;
3. the downscaled field (`kit.datasets.make_field`, the run's field size) -> each fold's image
   model -> image probabilities, averaged the same way;
4. every cell mask RLE-encoded in one pass (`kit.rle.encode_label_image`).

Per-image results are cached as ``RUN_DIR/predict/<key>/<ID>.npz`` (written atomically)::

    cell_ids     int64   (N,)       ids in the label image
    cell_probs   float32 (N, 19)    fold/TTA-averaged cell probabilities
    image_probs  float32 (19,)      fold/TTA-averaged image probabilities
    visible      float32 (N,)       visible fraction (kit.combine.visible_fraction)
    masks        str     (N,)       the competition mask strings
    size         int64   (2,)       width, height

``<key>`` hashes the images folder, the checkpoints (name, size, mtime), TTA, tile and field
size and the mask source, so a killed predict resumes where it stopped and gives the same file,
and retraining never reuses stale probabilities. Only then are the scores combined (the run's
tuned strategy from ``RUN_DIR/combine.yaml``; the rank blend needs every cell at once) and the
submission written atomically and validated. One triple per (cell, class) for all 19 classes
(allowed by the competition; it maximises mAP because a missing triple can only lose recall);
``--min-confidence`` drops the lowest ones to make the file smaller.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from kit.atomic import atomic_open, atomic_path
from kit.combine import CombineSpec, combine, read_combine_spec, visible_fraction
from kit.errors import ConfigError, DataError, KitError
from kit.labels import NUM_CLASSES

PREDICT_CACHE_VERSION = 1


@dataclass
class ImageResult:
    """Cached per-image predictions (see the module doc for the file)."""

    image_id: str
    cell_ids: np.ndarray
    cell_probs: np.ndarray
    image_probs: np.ndarray
    visible: np.ndarray
    masks: np.ndarray
    width: int
    height: int

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                cell_ids=self.cell_ids.astype(np.int64),
                cell_probs=self.cell_probs.astype(np.float32),
                image_probs=self.image_probs.astype(np.float32),
                visible=self.visible.astype(np.float32),
                masks=np.asarray(self.masks, dtype=np.str_),
                size=np.array([self.width, self.height], np.int64),
            )

    @classmethod
    def load(cls, path: Path, image_id: str) -> "ImageResult":
        with np.load(path, allow_pickle=False) as z:
            w, h = (int(v) for v in z["size"])
            masks = z["masks"]
            return cls(image_id, z["cell_ids"], z["cell_probs"], z["image_probs"], z["visible"],
                       masks.astype(str) if len(masks) else np.zeros(0, dtype=str), w, h)


# --------------------------------------------------------------------------------------------
# the fold ensemble


def resolve_device(name: str = "auto"):
    import torch

    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"bad device {name!r}: {exc}") from None


def dihedral(x, k: int):
    """Transform k (0..7) of the dihedral group on the last two axes: bit 4 transpose, 1 h-flip, 2 v-flip."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


class FoldEnsemble:
    """The fold models of one kind of a run; `predict` averages probabilities over folds and TTA."""

    def __init__(self, run_dir: str | Path, kind: str, device="cpu", which: str = "best", tta: int = 1,
                 batch_size: int = 64, activation: str = "sigmoid"):
        import torch

        from kit.models import load_fold_models

        if tta not in (1, 2, 4, 8):
            raise ConfigError(f"tta must be 1, 2, 4 or 8, got {tta}")
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.models = load_fold_models(run_dir, kind, self.device, which)
        # channels_last: ~1.6x faster convolutions on the development CPU (measured), no harm on CUDA
        self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        self.tta = tta
        self.batch_size = max(1, int(batch_size))
        self.activation = activation

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 N x 4 x S x S -> float32 N x 19 mean probabilities."""
        import torch

        from kit.models import preprocess

        n = len(batch)
        out = np.zeros((n, NUM_CLASSES), np.float32)
        if n == 0:
            return out
        use_amp = self.device.type == "cuda"
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(batch[start:start + self.batch_size]))
                x = preprocess(chunk.to(self.device, non_blocking=True))
                acc = torch.zeros((len(chunk), NUM_CLASSES), dtype=torch.float32, device=self.device)
                for k in range(self.tta):
                    xk = dihedral(x, k).contiguous(memory_format=torch.channels_last)
                    with torch.autocast(self.device.type, enabled=use_amp):
                        for model in self.models:
                            logits = model(xk).float()
                            acc += torch.softmax(logits, 1) if self.activation == "softmax" else torch.sigmoid(logits)
                out[start:start + len(chunk)] = (acc / (self.tta * len(self.models))).cpu().numpy()
        return out


def checkpoint_fingerprint(run_dir: Path, which: str) -> list:
    """(relative path, size, mtime) of every checkpoint used: changes when a fold is retrained."""
    items = []
    for kind in ("cell", "image"):
        for p in sorted((run_dir / kind).glob(f"fold*/{which}.pt")):
            st = p.stat()
            items.append([str(p.relative_to(run_dir)), st.st_size, st.st_mtime_ns])
    return items


# --------------------------------------------------------------------------------------------
# masks


class MaskSource:
    """Where each image's cells come from: the run's mask cache (segmenting what is missing), or
    ``truth/<ID>_{cell,nuclei}_mask.png`` of a synthetic dataset (for the classification ceiling)."""

    def __init__(self, cfg, images_dir: str | Path, truth_dir: str | Path | None = None, workers: int = 1):
        self.cfg = cfg
        self.images_dir = Path(images_dir)
        self.truth_dir = Path(truth_dir) if truth_dir else None
        self.workers = workers
        self.cache = None if self.truth_dir else open_mask_cache(cfg)

    @property
    def key(self) -> str:
        if self.truth_dir:
            return "truth:" + str(self.truth_dir.resolve())
        return "cache:" + Path(self.cache.dir).name

    def prepare(self, ids: Sequence[str], progress: bool = True) -> None:
        """Segment every image not yet in the mask cache (in parallel)."""
        if self.cache is not None:
            segment_into_cache(self.cache, self.images_dir, ids, self.workers, progress)

    def load(self, image_id: str, image: np.ndarray):
        """(nuclei, cells, table) of one image."""
        if self.truth_dir is not None:
            return load_truth_masks(self.truth_dir, image_id)
        if not self.cache.has(image_id):
            self.cache.segment_and_save(image_id, image)
        return self.cache.load(image_id)


def open_mask_cache(cfg):
    """The run's `kit.segment.cache.MaskCache` (root and backend from the config).

    When the run's tile cache records the mask folder its tiles were cut from (``params.json``),
    that folder is used even if the backend's defaults changed since (a newer kit): the OOF cell
    ids and the test masks must come from the segmentation the models were trained on.
    """
    from kit.segment.cache import MaskCache

    cache = MaskCache(cfg.data.mask_cache, cfg.data.segment_backend)
    params = Path(cfg.data.tile_cache) / "params.json"
    if params.is_file():
        try:
            info = json.loads(params.read_text())
        except ValueError:
            info = {}
        pinned = Path(info.get("mask_cache", ""))
        if info.get("mask_cache") and pinned != cache.dir and pinned.is_dir() and info.get("backend") == cache.backend:
            cache.dir = pinned
            cache.params = info.get("backend_params", cache.params)
    return cache


def segment_into_cache(cache, images_dir: Path, ids: Sequence[str], workers: int = 1, progress: bool = True) -> None:
    from kit.segment.cache import segment_folder

    todo = [i for i in ids if not cache.has(i)]
    if todo:
        segment_folder(images_dir, todo, cache, workers=workers, progress=progress)


def load_truth_masks(truth_dir: Path, image_id: str):
    """(nuclei, cells, cell table) from a synthetic dataset's truth folder."""
    import cv2

    from kit.cells import cell_table

    masks = []
    for name in ("nuclei", "cell"):
        path = truth_dir / f"{image_id}_{name}_mask.png"
        m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if m is None:
            raise DataError(f"true mask not found or unreadable: {path}")
        masks.append(m.astype(np.int32))
    nuclei, cells = masks
    return nuclei, cells, cell_table(nuclei, cells)


# --------------------------------------------------------------------------------------------
# prediction


def list_image_ids(images_dir: str | Path) -> list[str]:
    """IDs with all four channel files in `images_dir`, sorted."""
    from kit.dataset import scan_split
    from kit.images import CHANNELS

    split = scan_split(images_dir)
    return sorted(i for i, ch in split.samples.items() if all(c in ch for c in CHANNELS))


def read_ids_sizes(sample_csv: str | Path) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """IDs and (width, height) from a sample_submission.csv."""
    import pandas as pd

    path = Path(sample_csv)
    if not path.is_file():
        raise DataError(f"sample submission not found: {path}")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in ("ID", "ImageWidth", "ImageHeight"):
        if col not in df.columns:
            raise DataError(f"{path}: missing column {col}")
    sizes = {}
    for line, (i, w, h) in enumerate(zip(df["ID"], df["ImageWidth"], df["ImageHeight"]), start=2):
        try:
            sizes[i] = (int(w), int(h))
        except ValueError:
            raise DataError(f"{path}: line {line}, ID {i}: ImageWidth/ImageHeight not integers") from None
    return list(df["ID"]), sizes


class Predictor:
    """Per-image inference for one run with its fold ensembles; results cached per image."""

    def __init__(self, run_dir: str | Path, cfg=None, *, tta: int | None = None, which: str | None = None,
                 device: str | None = None, batch_size: int | None = None):
        from kit.config import load_config

        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        if cfg is None:
            if not cfg_path.is_file():
                raise KitError(f"{cfg_path} not found: is {self.run_dir} a run folder (train writes it)?")
            cfg = load_config(cfg_path)
        self.cfg = cfg
        self.tta = int(tta if tta is not None else cfg.predict.tta)
        self.which = which or cfg.predict.which
        self.batch_size = int(batch_size or cfg.predict.batch_size)
        self.device = resolve_device(device or cfg.train.device)
        self._ens: dict[str, FoldEnsemble] = {}

    def ensemble(self, kind: str) -> FoldEnsemble:
        if kind not in self._ens:
            # sigmoid (the default) for every loss: the probabilities training reports in oof.csv
            self._ens[kind] = FoldEnsemble(self.run_dir, kind, self.device, self.which, self.tta, self.batch_size)
        return self._ens[kind]

    def cache_dir(self, images_dir: Path, masks: MaskSource) -> Path:
        key = {
            "version": PREDICT_CACHE_VERSION,
            "images": str(Path(images_dir).resolve()),
            "checkpoints": checkpoint_fingerprint(self.run_dir, self.which),
            "tta": self.tta,
            "tile_size": self.cfg.data.tile_size,
            "field_size": self.cfg.data.field_size,
            "masks": masks.key,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return self.run_dir / "predict" / digest

    def _prepare(self, images_dir: Path, image_id: str, masks: MaskSource):
        """Read one image and cut its inputs (runs in the read-ahead thread)."""
        from kit.cells import extract_tiles
        from kit.datasets import make_field
        from kit.images import read_sample
        from kit.rle import encode_label_image

        image = read_sample(images_dir, image_id)
        nuclei, cells, table = masks.load(image_id, image)
        if cells.shape != image.shape[:2]:  # an image the segmenter could not read: no cells
            cells = np.zeros(image.shape[:2], np.int32)
            table = table.iloc[:0]
        tiles, table = extract_tiles(image, cells, self.cfg.data.tile_size, table=table)
        field = make_field(image, self.cfg.data.field_size)
        rle = encode_label_image(cells)
        ids = table["cell_id"].to_numpy(np.int64)
        masks_text = np.asarray([rle[int(k)] for k in ids], dtype=np.str_) if len(ids) else np.zeros(0, np.str_)
        h, w = image.shape[:2]
        return ids, tiles, field, visible_fraction(table), masks_text, w, h

    def predict_folder(self, images_dir: str | Path, ids: Sequence[str], masks: MaskSource | None = None,
                       progress: bool = True, stop_after: int | None = None,
                       prefetch: bool | None = None) -> dict[str, ImageResult]:
        """Results of every image in `ids` (cached ones loaded, the rest predicted and cached).

        `stop_after` stops after that many newly predicted images (tests simulate a kill with it).
        `prefetch` reads and tiles the next image in a thread while the models run; default on
        CUDA only (on a CPU the thread competes with torch's own threads for the same cores:
        benchmarks/bench_predict.py measured it slower on 2 cores).
        """
        if prefetch is None:
            prefetch = self.device.type == "cuda"
        from tqdm import tqdm

        images_dir = Path(images_dir)
        masks = masks or MaskSource(self.cfg, images_dir)
        cache = self.cache_dir(images_dir, masks)
        todo = [i for i in ids if not (cache / f"{i}.npz").is_file()]
        if todo:
            masks.prepare(todo, progress)
            cache.mkdir(parents=True, exist_ok=True)
            self._write_cache_info(cache, images_dir, masks)
            cell_ens, image_ens = self.ensemble("cell"), self.ensemble("image")
            bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, file=sys.stderr)
            # optional read-ahead of one image in a thread: decoding and tiling overlap the CNN
            with ThreadPoolExecutor(max_workers=1) as pool:
                submit = pool.submit if prefetch else _run_now
                pending = submit(self._prepare, images_dir, todo[0], masks)
                for n, image_id in enumerate(todo):
                    ids_, tiles, field, visible, masks_text, w, h = pending.result()
                    if n + 1 < len(todo) and (stop_after is None or n + 1 < stop_after):
                        pending = submit(self._prepare, images_dir, todo[n + 1], masks)
                    cell_probs = cell_ens.predict(tiles)
                    image_probs = image_ens.predict(field[None])[0]
                    ImageResult(image_id, ids_, cell_probs, image_probs, visible, masks_text, w, h).save(
                        cache / f"{image_id}.npz")
                    bar.update(1)
                    if stop_after is not None and n + 1 >= stop_after:
                        break
            bar.close()
        return {i: ImageResult.load(cache / f"{i}.npz", i) for i in ids if (cache / f"{i}.npz").is_file()}

    def _write_cache_info(self, cache: Path, images_dir: Path, masks: MaskSource) -> None:
        info = cache / "params.json"
        if not info.exists():
            with atomic_open(info, "w") as f:
                json.dump({"images": str(images_dir.resolve()), "masks": masks.key, "tta": self.tta,
                           "which": self.which, "tile_size": self.cfg.data.tile_size,
                           "field_size": self.cfg.data.field_size}, f, indent=2)


class _Done:
    """A finished future (prefetch off)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def _run_now(fn, *args):
    return _Done(fn(*args))


# --------------------------------------------------------------------------------------------
# combination and submission


def combined_scores(results: dict[str, ImageResult], spec: CombineSpec) -> dict[str, np.ndarray]:
    """{ID: N x 19 combined confidences}, combined over all images at once (rank needs it)."""
    order = [i for i, r in results.items() if len(r.cell_ids)]
    if not order:
        return {i: np.zeros((0, NUM_CLASSES)) for i in results}
    cell = np.concatenate([results[i].cell_probs for i in order]).astype(np.float64)
    image = np.concatenate([np.repeat(results[i].image_probs[None], len(results[i].cell_ids), 0) for i in order])
    visible = np.concatenate([results[i].visible for i in order]).astype(np.float64)
    scores = combine(cell, image, spec, visible)
    out, start = {}, 0
    for i in results:
        n = len(results[i].cell_ids)
        if n:
            out[i] = scores[start:start + n]
            start += n
        else:
            out[i] = np.zeros((0, NUM_CLASSES))
    return out


def build_predictions(results: dict[str, ImageResult], spec: CombineSpec, min_confidence: float = 0.0,
                      scores: dict[str, np.ndarray] | None = None) -> dict:
    """{ID: kit.submission.ImagePrediction} with one triple per (cell, class) at or above `min_confidence`."""
    from kit.submission import ImagePrediction

    scores = scores if scores is not None else combined_scores(results, spec)
    preds = {}
    for image_id, r in results.items():
        # as the float32 the CSV stores: in-memory scoring = file scoring
        s = np.asarray(scores[image_id], dtype=np.float32).astype(np.float64).tolist()
        triples = []
        for row, mask in zip(s, r.masks):
            mask = str(mask)
            for c, conf in enumerate(row):
                if conf >= min_confidence:
                    triples.append((c, conf, mask))
        preds[image_id] = ImagePrediction(r.width, r.height, triples)
    return preds


def write_and_validate(path: str | Path, predictions: dict, ids: Sequence[str], sizes: dict | None,
                       sample: str | Path | None = None, images: str | Path | None = None) -> Path:
    """Write the submission atomically, then validate it; problems raise DataError."""
    from kit.submission import validate_submission, write_submission

    path = write_submission(path, predictions, ids, sizes)
    problems = validate_submission(path, sample=sample, images=images, check_masks=True)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{path}: the written submission is invalid: " + "; ".join(problems[:5]) + more)
    return path


def predict(run_dir: str | Path, images_dir: str | Path, out: str | Path = "submission/submission.csv", *,
            ids_from: str | Path | None = None, spec: CombineSpec | None = None, tta: int | None = None,
            device: str | None = None, workers: int = 1, min_confidence: float = 0.0,
            progress: bool = True) -> dict:
    """The whole `predict` command; returns {"submission", "images", "cells", "triples", "combine", "seconds"}."""
    t0 = time.perf_counter()
    run_dir, images_dir = Path(run_dir), Path(images_dir)
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    if ids_from:
        ids, sizes = read_ids_sizes(ids_from)
    else:
        ids, sizes = list_image_ids(images_dir), None
        if not ids:
            raise DataError(f"no images (<ID>_red/green/blue/yellow.png) in {images_dir}")
    predictor = Predictor(run_dir, tta=tta, device=device)
    spec = spec or read_combine_spec(run_dir, predictor.cfg)
    masks = MaskSource(predictor.cfg, images_dir, workers=workers)
    results = predictor.predict_folder(images_dir, ids, masks, progress=progress)
    missing = [i for i in ids if i not in results]
    if missing:  # e.g. listed in the sample submission but no image file
        raise DataError(f"no prediction for {len(missing)} image(s), e.g. {missing[0]}: are they in {images_dir}?")
    preds = build_predictions(results, spec, min_confidence)
    path = write_and_validate(out, preds, ids, sizes, sample=ids_from, images=images_dir)
    return {
        "submission": str(path),
        "images": len(ids),
        "cells": int(sum(len(r.cell_ids) for r in results.values())),
        "triples": int(sum(len(p.triples) for p in preds.values())),
        "combine": spec.name,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, type=Path, help="run folder (config.yaml, cell/ and image/ fold checkpoints)")
    parser.add_argument("--images", required=True, type=Path, help="folder of <ID>_{red,green,blue,yellow}.png images")
    parser.add_argument("--out", type=Path, default=Path("submission/submission.csv"), help="submission CSV (default submission/submission.csv)")
    parser.add_argument("--ids-from", type=Path, help="sample_submission.csv: the IDs, their order and sizes (default: every image in --images)")
    parser.add_argument("--tta", type=int, choices=(1, 2, 4, 8), help="flip TTA: 1 none, 2 +h-flip, 4 +v-flips, 8 all (default: the run's predict.tta)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: the run's train.device)")
    parser.add_argument("--workers", type=int, default=1, help="segmentation worker processes (default 1)")
    parser.add_argument("--combine", help="override the tuned combination, e.g. geometric:0.5 or image_only")
    parser.add_argument("--min-confidence", type=float, default=0.0, help="drop triples below this confidence (default 0: keep all 19 per cell)")
    parser.set_defaults(func=_run_predict)


def parse_combine_option(text: str) -> CombineSpec:
    """``strategy[:weight[:negative[:border_power]]]`` -> CombineSpec."""
    parts = text.split(":")
    try:
        kwargs = {"strategy": parts[0]}
        if len(parts) > 1 and parts[1]:
            kwargs["weight"] = float(parts[1])
        if len(parts) > 2 and parts[2]:
            kwargs["negative"] = parts[2]
        if len(parts) > 3 and parts[3]:
            kwargs["border_power"] = float(parts[3])
    except ValueError:
        raise ConfigError(f"--combine {text!r}: expected strategy[:weight[:negative[:border_power]]]") from None
    return CombineSpec(**kwargs)


def _run_predict(args) -> int:
    spec = parse_combine_option(args.combine) if args.combine else None
    info = predict(args.run, args.images, args.out, ids_from=args.ids_from, spec=spec, tta=args.tta,
                   device=args.device, workers=args.workers, min_confidence=args.min_confidence)
    print(f"wrote {info['submission']}: {info['images']} images, {info['cells']} cells, {info['triples']} triples "
          f"(combine {info['combine']}, {info['seconds']:.1f} s); validated")
    return 0
