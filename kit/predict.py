"""Fold-ensemble inference: a folder of images -> ``submission/submission.csv``.

``python -m kit predict --run RUN_DIR --images DIR [--out submission/submission.csv]
[--ids-from sample_submission.csv] [--folds 0,1] [--mask-cache DIR]``

The run's inputs come from its manifest (`kit.manifest.read_manifest`): its folds (every one must
have its checkpoints, unless ``--folds`` names the ones to use), the segmentation backend and
options its cells were cut with, the tile and field sizes. Each image is decoded once
(`kit.prepare.prepare_image`, in ``--workers`` processes, a bounded number of images ahead):

1. cells from each mask source (`kit.masks`): the run's segmentation, from the mask cache
   (segmented and stored when missing or stale), and, for the classification ceiling, true masks;
2. the cell policy (``cells:`` of the run, kit.cell_policy) drops cells and gives each kept one
   its confidence factor; cell tiles (`kit.cells.extract_tiles`, the run's tile size) -> each
   fold's cell model (the last pseudo-label round, kit.pseudo) -> probabilities averaged over
   folds and the optional flip TTA; a MIL cell model (kit.mil) also gives the bag head's image
   score over all of the field's cells;
3. the downscaled field (`kit.fields.downscale_field`, the run's field size) -> each fold's image
   model -> image probabilities, averaged the same way (once per image, whatever the sources;
   skipped when the run has no image model);
4. every cell mask RLE-encoded in one pass (`kit.rle.encode_label_image`).

Per-image results are cached as ``RUN_DIR/predict/<key>/<ID>.npz`` (written atomically)::

    cell_ids     int64   (N,)       ids in the label image
    cell_probs   float32 (N, 19)    fold/TTA-averaged cell probabilities
    image_probs  float32 (19,)      fold/TTA-averaged image probabilities of the image model (NaN: none)
    bag_probs    float32 (19,)      the MIL cell model's bag head over all the field's cells (NaN: none)
    visible      float32 (N,)       visible fraction (kit.combine.visible_fraction)
    scale        float32 (N,)       the cell policy's confidence factor (kit.cell_policy)
    stain        float32 (N,)       green over the field's stained level (kit.combine.stain_fraction)
    masks        str     (N,)       the competition mask strings
    size         int64   (2,)       width, height

``<key>`` (`kit.cachekey.cache_key`, `PREDICT_CACHE_VERSION`) covers the images folder, the
checkpoints (name, size, mtime), TTA, tile and field size, the cell policy and the mask source, so a killed
predict resumes where it stopped and gives the same file, and retraining never reuses stale
probabilities. Only then are the scores combined (the run's tuned strategy from
``RUN_DIR/combine.yaml``; the rank blend needs every cell at once), and the submission is written
to a temporary file, validated there, and only then renamed over the output (a rejected file never
replaces the previous good one). One triple per (cell, class) for all 19 classes (allowed by the
competition; it maximises mAP because a missing triple can only lose recall); ``--min-confidence``
drops the lowest ones to make the file smaller.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from kit.atomic import atomic_open, atomic_path
from kit.combine import CombineSpec, combine, read_combine_spec, stain_fraction, visible_fraction
from kit.errors import ConfigError, DataError, KitError, clip
from kit.ids import check_id
from kit.labels import NUM_CLASSES

PREDICT_CACHE_VERSION = 4  # 2: kit.cachekey folder key; 3: bag_probs and scale; 4: stain
KINDS = ("cell", "image")


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
    bag_probs: np.ndarray | None = None
    scale: np.ndarray | None = None
    stain: np.ndarray | None = None

    def image_score(self, source: str) -> np.ndarray:
        """The image-level probabilities of `source`: field | bag | mean (kit.combine.resolve_image_source)."""
        if source == "field":
            return self.image_probs
        if source == "bag":
            return self.bag_probs
        return 0.5 * (self.image_probs + self.bag_probs)

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                cell_ids=self.cell_ids.astype(np.int64),
                cell_probs=self.cell_probs.astype(np.float32),
                image_probs=self.image_probs.astype(np.float32),
                visible=self.visible.astype(np.float32),
                bag_probs=(self.bag_probs if self.bag_probs is not None else np.full(NUM_CLASSES, np.nan)).astype(np.float32),
                scale=(self.scale if self.scale is not None else np.ones(len(self.cell_ids))).astype(np.float32),
                stain=(self.stain if self.stain is not None else np.ones(len(self.cell_ids))).astype(np.float32),
                masks=np.asarray(self.masks, dtype=np.str_),
                size=np.array([self.width, self.height], np.int64),
            )

    @classmethod
    def load(cls, path: Path, image_id: str) -> "ImageResult":
        with np.load(path, allow_pickle=False) as z:
            w, h = (int(v) for v in z["size"])
            masks = z["masks"]
            return cls(image_id, z["cell_ids"], z["cell_probs"], z["image_probs"], z["visible"],
                       masks.astype(str) if len(masks) else np.zeros(0, dtype=str), w, h, z["bag_probs"], z["scale"],
                       z["stain"])


# --------------------------------------------------------------------------------------------
# the fold ensemble


def prediction_path(cache_dir: str | Path, image_id: str) -> Path:
    """One image's entry ``<cache_dir>/<ID>.npz`` in the prediction cache (DataError for a bad ID)."""
    return Path(cache_dir) / f"{check_id(image_id)}.npz"


def checkpoint_path(run_dir: str | Path, folder: str, fold: int, which: str = "best") -> Path:
    """``RUN_DIR/<folder>/fold<k>/<which>.pt``; `folder` is a kind or a pseudo round's ``cell_pseudo<r>``."""
    return Path(run_dir) / folder / f"fold{int(fold)}" / f"{which}.pt"


class FoldEnsemble:
    """The fold models of one kind of a run; `predict` averages probabilities over folds and TTA.

    The folds and the TTA copies run as one batch on the path `kit.throughput` measured fastest on
    this machine for this model (`engine` "auto", probed once on `side` px inputs and cached; or a
    named engine): see `kit.inference.EnsembleRunner`. `onnx_path` caches the exported ensemble.
    """

    def __init__(self, run_dir: str | Path, kind: str, device="cpu", which: str = "best", tta: int = 1,
                 batch_size: int = 64, activation: str = "sigmoid", folds: Sequence[int] | None = None,
                 subdir: str | None = None, side: int | None = None, engine: str = "auto",
                 onnx_path: str | Path | None = None, log=None):
        import torch

        if tta not in (1, 2, 4, 8):
            raise ConfigError(f"tta must be 1, 2, 4 or 8, got {tta}")
        self.device = torch.device(device) if not isinstance(device, torch.device) else device
        self.run_dir, self.kind, self.which, self.folds, self.subdir = Path(run_dir), kind, which, folds, subdir
        self.tta = tta
        self.batch_size = max(1, int(batch_size))
        self.activation = activation
        self.side, self.engine, self.onnx_path, self.log = side, engine, onnx_path, log
        self._models = None
        self._info = None  # the export's .json, once read (`_export_info`)
        self._runner = None

    @property
    def models(self) -> list:
        """The fold models, built on first use: a run whose ensemble is exported to ONNX and chosen
        for this machine never builds them (`runner_for`)."""
        if self._models is None:
            from kit.models import load_checkpoint, load_fold_models, model_from_checkpoint

            if self.folds is None:  # every fold checkpoint there is
                self._models = load_fold_models(self.run_dir, self.kind, self.device, self.which, subdir=self.subdir)
            else:
                self._models = [model_from_checkpoint(load_checkpoint(
                    checkpoint_path(self.run_dir, self.subdir or self.kind, f, self.which)), self.kind
                ).to(self.device).eval() for f in self.folds]
        return self._models

    def _export_info_path(self) -> Path | None:
        return Path(self.onnx_path).with_suffix(".json") if self.onnx_path else None

    def _export_info(self) -> dict | None:
        """What `runner_for` saved beside the ONNX export: the fold count, MIL or not, the probe
        signature (read once: `has_bag` is asked per pack)."""
        if self._info is None:
            path = self._export_info_path()
            info = {}
            if path is not None and path.is_file() and Path(self.onnx_path).is_file():
                try:
                    info = json.loads(path.read_text())
                except ValueError:
                    info = {}
            self._info = info if {"n_models", "has_bag", "signature"} <= set(info) else {}
        return self._info or None

    def _unbuilt_info(self) -> dict | None:
        """The export's record while the models are not built (once built, they are asked)."""
        return self._export_info() if self._models is None else None

    @property
    def has_bag(self) -> bool:
        """MIL fold models (kit.mil): their bag head gives an image score."""
        info = self._unbuilt_info()
        if info is not None:
            return bool(info["has_bag"])
        from kit.mil import is_mil

        return bool(self.models) and all(is_mil(m) for m in self.models)

    @property
    def n_models(self) -> int:
        info = self._unbuilt_info()
        return int(info["n_models"]) if info is not None else len(self.models)

    def runner_for(self, side: int | None = None):
        """The `kit.inference.EnsembleRunner` for `side` px inputs (built, and its path probed, on first
        use; the constructor's `side` unless given).

        When the ensemble was exported to ONNX before (``RUN/predict/<key>.onnx`` and its ``.json``)
        and ONNX Runtime is this machine's measured path for it, the runner reads the export and the
        PyTorch models are never built (importing torchvision and building the folds cost ~4 s of a
        predict here)."""
        if self._runner is None:
            from kit.inference import EnsembleRunner
            from kit.throughput import model_signature

            side = int(side or self.side or 64)
            example = np.random.default_rng(0).integers(0, 256, (self.batch_size, 4, side, side), dtype=np.uint8)
            info = self._unbuilt_info()
            if info is not None and not info["has_bag"] and info["signature"].get("input") == [4, side, side]:
                self._runner = EnsembleRunner.from_export(
                    self.onnx_path, info["signature"], int(info["n_models"]), self.device, tta=self.tta,
                    activation=self.activation, example=example, batch_size=self.batch_size, engine=self.engine,
                    log=self.log)
            if self._runner is None:
                self._runner = EnsembleRunner(self.models, self.device, tta=self.tta, activation=self.activation,
                                              example=example, batch_size=self.batch_size, engine=self.engine,
                                              onnx_path=self.onnx_path, log=self.log)
                if self.onnx_path and Path(self.onnx_path).is_file():
                    info = {"n_models": len(self.models), "has_bag": self.has_bag,
                            "signature": model_signature(self.models[:1], example.shape, self.activation)}
                    with atomic_open(self._export_info_path(), "w") as f:
                        json.dump(info, f, indent=1, sort_keys=True)
        return self._runner

    @property
    def tiles_per_call(self) -> int:
        return self.runner_for().tiles_per_call

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """uint8 N x 4 x S x S -> float32 N x 19 mean probabilities."""
        if len(batch) == 0:
            return np.zeros((0, NUM_CLASSES), np.float32)
        return self.runner_for(batch.shape[-1]).predict(batch)

    def predict_with_bag(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N x 19 cell probabilities, 19 bag-head probabilities over all N cells of one field, or None).

        MIL models (kit.mil) give the bag score: their cells and bag head run in one pass
        (`kit.mil.predict_cells_and_bag`, plain torch: the engines of `kit.throughput` return no
        embeddings); other models give None and their cells go through `predict`."""
        if not self.has_bag or len(batch) == 0:
            return self.predict(batch), None
        from kit.mil import predict_cells_and_bag

        return predict_cells_and_bag(self.models, batch, self.device, tta=self.tta, batch_size=self.batch_size,
                                     activation=self.activation)


def checkpoint_fingerprint(run_dir: Path, which: str, folds: Sequence[int] | None = None,
                           folders: Sequence[str] = KINDS) -> list:
    """(relative path, size, mtime) of every checkpoint used: changes when a fold is retrained.
    `folders`: the model folders predict uses (the cell model's is the last pseudo round's)."""
    items = []
    for kind in folders:
        paths = (sorted((run_dir / kind).glob(f"fold*/{which}.pt")) if folds is None
                 else [checkpoint_path(run_dir, kind, f, which) for f in folds])
        for p in paths:
            st = p.stat()
            items.append([str(p.relative_to(run_dir)), st.st_size, st.st_mtime_ns])
    return items


def run_folds(run_dir: Path, manifest, which: str, folds: Sequence[int] | None,
              folders: Sequence[str] = KINDS) -> list[int] | None:
    """The folds to predict with: `folds` when the user names them, else the manifest's; every one
    must have the checkpoint of every model folder in `folders` (KitError naming the first missing
    file otherwise). None: a legacy run folder whose folds are unknown (every checkpoint found is used)."""
    named = folds is not None
    folds = sorted(set(int(f) for f in folds)) if named else manifest.folds
    if folds is None:
        return None
    if not folds:
        raise ConfigError("--folds: name at least one fold")
    missing = [checkpoint_path(run_dir, k, f, which) for f in folds for k in folders
               if not checkpoint_path(run_dir, k, f, which).is_file()]
    if missing:
        have = [f for f in folds if all(checkpoint_path(run_dir, k, f, which).is_file() for k in folders)]
        hint = (f"; to predict with the folds that are complete, pass --folds {','.join(map(str, have))}" if have
                else "; train them first")
        whose = "named with --folds" if named else f"of the run ({run_dir / 'manifest.json'})"
        raise KitError(f"{missing[0]} not found: the folds {whose} are {', '.join(map(str, folds))}"
                       + (f" and {len(missing) - 1} more checkpoint(s) are missing" if len(missing) > 1 else "")
                       + hint)
    return folds


# --------------------------------------------------------------------------------------------
# prediction


def _predict_inputs(job: tuple) -> dict:
    """Worker: decode one image once and cut every source's inputs (see the module docstring).

    An optional source that cannot give this image's cells (e.g. a true mask missing) is reported
    under ``failed`` instead of stopping the prediction of the others."""
    from kit.images import read_sample
    from kit.prepare import cut_cells, prepare_image
    from kit.rle import encode_label_image

    from kit.cell_policy import confidence_scale

    images_dir, image_id, sources, tile_size, field_size, policy = job
    image = read_sample(images_dir, image_id)
    prepared = prepare_image(image_id, image, [s for s, optional in sources if not optional], tile_size, field_size,
                             policy=policy)
    failed = {}
    for source, optional in sources:
        if optional:
            try:
                prepared.cells[source.key] = cut_cells(image_id, image, source, tile_size, policy=policy)
            except KitError as exc:
                failed[source.key] = str(exc)
    cells = {}
    for key, (labels, table, tiles) in prepared.cells.items():
        rle = encode_label_image(labels)
        ids = table["cell_id"].to_numpy(np.int64) if len(table) else np.zeros(0, np.int64)
        masks_text = np.asarray([rle[int(k)] for k in ids], dtype=np.str_) if len(ids) else np.zeros(0, np.str_)
        scale = confidence_scale(table, policy, float(labels.size))
        cells[key] = (ids, tiles, visible_fraction(table), masks_text, scale, stain_fraction(table))
    return {"id": image_id, "width": prepared.width, "height": prepared.height, "field": prepared.field,
            "cells": cells, "failed": failed}


def _read_ahead(items: Iterator) -> Iterator:
    """The next item is computed in a thread while the caller works on the current one."""
    end = object()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, end)
        while True:
            item = pending.result()
            if item is end:
                return
            pending = pool.submit(next, items, end)
            yield item


PACK_IMAGES = 8  # images whose cells share batches; a field has 10-50 cells, a batch should be full


def packs_of(ids: Sequence[str], size: int = PACK_IMAGES) -> dict[str, int]:
    """{ID: pack number}: consecutive groups of `size` IDs in the order given (the sample
    submission's). Cells are batched within a pack, never across packs, so an image's batches
    (and its float sums) depend on its pack alone: a resumed predict redoes a pack that is partly
    cached and writes the bytes of an uninterrupted run."""
    return {image_id: k // size for k, image_id in enumerate(dict.fromkeys(ids))}


def _batched(items: Iterator[dict], cell_ens: FoldEnsemble, image_ens: FoldEnsemble | None,
             pack_of: dict[str, int]) -> Iterator[list]:
    """Per prepared image, in order: [(mask source key, ImageResult)]. The cells of a pack's images
    (per mask source) and their fields are predicted together, in full batches but the last
    (`kit.inference.EnsembleRunner`); on CPU a conv's output for a tile moves by ~1e-7 with the
    batch size and the tile's place in it, hence packs that resumes reproduce (`packs_of`).

    A MIL cell ensemble (``cell_ens.has_bag``) predicts each field's cells on their own: its bag
    head pools all of one field's cells (`FoldEnsemble.predict_with_bag`). Without an image model
    (`image_ens` None) the image probabilities are NaN (the bag score stands in)."""
    pending: list[dict] = []
    for item in items:
        if pending and pack_of[item["id"]] != pack_of[pending[0]["id"]]:
            yield from _predict_pack(pending, cell_ens, image_ens)
            pending = []
        pending.append(item)
    if pending:
        yield from _predict_pack(pending, cell_ens, image_ens)


def _predict_pack(pack: list[dict], cell_ens: FoldEnsemble, image_ens: FoldEnsemble | None) -> Iterator[list]:
    if image_ens is not None:
        image_probs = image_ens.predict(np.stack([item["field"] for item in pack]))
    else:
        image_probs = np.full((len(pack), NUM_CLASSES), np.nan, np.float32)
    cell_probs: list[dict] = [{} for _ in pack]  # {source key: (cell probs, bag probs or None)}
    for key in dict.fromkeys(k for item in pack for k in item["cells"]):
        owners = [n for n, item in enumerate(pack) if key in item["cells"]]
        tiles = [pack[n]["cells"][key][1] for n in owners]
        if cell_ens.has_bag:  # MIL: each field's cells in one pass, for the bag head
            for n, t in zip(owners, tiles):
                cell_probs[n][key] = cell_ens.predict_with_bag(t)
            continue
        probs = cell_ens.predict(np.concatenate(tiles)) if sum(map(len, tiles)) else np.zeros((0, NUM_CLASSES))
        for n, part in zip(owners, np.split(probs, np.cumsum([len(t) for t in tiles])[:-1])):
            cell_probs[n][key] = (part.astype(np.float32, copy=False), None)
    for n, item in enumerate(pack):
        yield [(key, ImageResult(item["id"], cell_ids, cell_probs[n][key][0], image_probs[n], visible, masks_text,
                                 item["width"], item["height"], cell_probs[n][key][1], scale, stain))
               for key, (cell_ids, _, visible, masks_text, scale, stain) in item["cells"].items()]


class Predictor:
    """Per-image inference for one run with its fold ensembles; results cached per image."""

    def __init__(self, run_dir: str | Path, cfg=None, *, tta: int | None = None, which: str | None = None,
                 device: str | None = None, batch_size: int | None = None, folds: Sequence[int] | None = None,
                 mask_cache: str | Path | None = None, engine: str | None = None, log=None):
        from kit.config import load_config
        from kit.device import resolve_device
        from kit.manifest import read_manifest

        self.run_dir = Path(run_dir)
        cfg_path = self.run_dir / "config.yaml"
        if cfg is None:
            if not cfg_path.is_file():
                raise KitError(f"{cfg_path} not found: is {self.run_dir} a run folder (train writes it)?")
            cfg = load_config(cfg_path)
        self.cfg = cfg
        self.manifest = read_manifest(self.run_dir) if cfg_path.is_file() else None
        self.tile_size = self.manifest.tile_size if self.manifest else cfg.data.tile_size
        self.field_size = self.manifest.field_size if self.manifest else cfg.data.field_size
        self.mask_cache_root = Path(mask_cache) if mask_cache else None
        self.tta = int(tta if tta is not None else cfg.predict.tta)
        self.which = which or cfg.predict.which
        self.batch_size = int(batch_size or cfg.predict.batch_size)
        from kit.pseudo import cell_dir_name

        # the model folders: the cell model of the last pseudo-label round; the image model when
        # the run has one (a MIL run may take its image score from the bag head alone)
        self.cell_dir = cell_dir_name(cfg.train.pseudo_rounds)
        self.has_image_model = any((self.run_dir / "image").glob(f"fold*/{self.which}.pt"))
        self.folders = (self.cell_dir, "image") if self.has_image_model else (self.cell_dir,)
        self.folds = (run_folds(self.run_dir, self.manifest, self.which, folds, self.folders) if self.manifest
                      else folds)
        self.device = resolve_device(device or cfg.train.device)
        self.engine = engine or cfg.predict.engine
        self.log = log
        self._ens: dict[str, FoldEnsemble] = {}

    def ensemble(self, kind: str) -> FoldEnsemble:
        if kind not in self._ens:
            from kit.cachekey import cache_key
            from kit.throughput import default_batch

            side = self.tile_size if kind == "cell" else self.field_size
            folder = self.cell_dir if kind == "cell" else kind
            onnx_key = cache_key("onnx", 1, {"kind": kind, "side": side, "folds": self.folds,
                                             "checkpoints": checkpoint_fingerprint(self.run_dir, self.which, self.folds,
                                                                                   (folder,))})
            # sigmoid (the default) for every loss: the probabilities training reports in oof.csv
            self._ens[kind] = FoldEnsemble(self.run_dir, kind, self.device, self.which, self.tta,
                                           default_batch(side, self.batch_size), folds=self.folds,
                                           subdir=self.cell_dir if kind == "cell" else None, side=side,
                                           engine=self.engine, onnx_path=self.run_dir / "predict" / f"{onnx_key}.onnx",
                                           log=self.log)
        return self._ens[kind]

    def estimate(self, sizes: dict[str, tuple[int, int]]) -> list[str]:
        """The runtime estimate of predicting fields of these sizes (`kit.runtime`), from the CPU stages
        measured on real fields and the CNN rates the throughput probe measured for these models."""
        from kit import runtime

        rates = {}
        for kind in KINDS if self.has_image_model else ("cell",):
            rec = self.ensemble(kind).runner_for().record
            if rec and rec.get("tiles_s"):
                rates[kind] = (float(rec["tiles_s"]), f"measured now by the throughput probe: {rec['name']}, "
                                                      f"load {rec.get('load', '?')}")
        n_folds = self.ensemble("cell").n_models
        est = runtime.config_estimate(self.cfg, runtime.size_mix(sizes=sizes), n_folds=n_folds, tta=self.tta,
                                      cell_rate=rates.get("cell"), image_rate=rates.get("image"),
                                      device=str(self.device))
        return est.lines() if est else []

    def run_masks(self, images_dir: str | Path, workers: int = 1):
        """The run's segmentation of `images_dir` (`kit.masks.CachedMasks`): the backend and options
        of its manifest, in its mask cache or under the `mask_cache` root given to the predictor."""
        from kit.masks import CachedMasks
        from kit.segment.cache import MaskCache

        if self.manifest is not None:
            cache = self.manifest.masks(self.mask_cache_root)
        else:
            cache = MaskCache(self.mask_cache_root or self.cfg.data.mask_cache, self.cfg.data.segment_backend)
        return CachedMasks(cache, images_dir, workers)

    def cache_dir(self, images_dir: Path, masks) -> Path:
        from kit.cachekey import cache_key

        key = cache_key("predict", PREDICT_CACHE_VERSION, {
            "images": str(Path(images_dir).resolve()),
            "checkpoints": checkpoint_fingerprint(self.run_dir, self.which, self.folds, self.folders),
            "tta": self.tta,
            "tile_size": self.tile_size,
            "field_size": self.field_size,
            "masks": masks.key,
            "cells": dataclasses.asdict(self.cfg.cells),
        })
        return self.run_dir / "predict" / key

    def predict_folder(self, images_dir: str | Path, ids: Sequence[str], masks=None, progress: bool = True,
                       stop_after: int | None = None, prefetch: bool | None = None,
                       workers: int = 1) -> dict[str, "ImageResult"]:
        """Results of every image in `ids` with the cells of `masks` (default: the run's segmentation);
        see `predict_sources`."""
        images_dir = Path(images_dir)
        masks = masks or self.run_masks(images_dir)
        return self.predict_sources(images_dir, ids, [masks], progress, stop_after, prefetch, workers)[0]

    def predict_sources(self, images_dir: str | Path, ids: Sequence[str], sources: Sequence,
                        progress: bool = True, stop_after: int | None = None, prefetch: bool | None = None,
                        workers: int = 1, failures: dict | None = None) -> list[dict[str, "ImageResult"]]:
        """Per mask source, the results of every image in `ids` (cached ones loaded, the rest
        predicted from one decode of each image and cached).

        With a `failures` dict, the sources after the first are optional: an image one of them
        cannot give cells for is left out of that source's results, and ``failures[key]`` lists
        ``(ID, message)`` (the first source, the submission's, always raises).

        `stop_after` stops after that many newly predicted images (tests simulate a kill with it).
        Images are predicted in packs of `PACK_IMAGES` (`packs_of`): a pack that is partly cached is
        predicted whole again, so a resumed run writes what an uninterrupted one does.
        `workers` > 1 decodes and cuts images in that many processes; with one, `prefetch` does it
        in a thread while the models run (default on CUDA only: on a CPU the thread competes with
        torch's own threads for the same cores, benchmarks/bench_predict.py measured it slower).
        """
        from tqdm import tqdm

        from kit.workers import pool_map

        images_dir = Path(images_dir)
        if prefetch is None:
            prefetch = self.device.type == "cuda"
        caches = [self.cache_dir(images_dir, s) for s in sources]
        pack_of = packs_of(ids)
        missing = [{i for i in pack_of if not prediction_path(c, i).is_file()} for c in caches]
        if stop_after is not None:  # the first `stop_after` images that are missing, as a kill would leave
            first = [i for i in pack_of if any(i in m for m in missing)][:stop_after]
            missing = [{i for i in m if i in first} for m in missing]
        # a pack with a missing image is predicted whole (its cached images are not written again)
        wanted = [{i for i in pack_of if pack_of[i] in {pack_of[j] for j in m}} for m in missing]
        todo = [i for i in pack_of if any(i in w for w in wanted)]
        if todo:
            out_dir = {s.key: c for s, c in zip(sources, caches)}
            optional = [failures is not None and k > 0 for k in range(len(sources))]
            for s, c, w, opt in zip(sources, caches, wanted, optional):
                mine = [i for i in todo if i in w]
                if mine:
                    try:
                        s.prepare(mine, progress)
                    except KitError as exc:
                        if not opt:
                            raise
                        failures.setdefault(s.key, []).append(("*", str(exc)))
                        w.clear()  # this source is skipped
                        continue
                    c.mkdir(parents=True, exist_ok=True)
                    self._write_cache_info(c, images_dir, s)
            field_size = self.field_size if self.has_image_model else None
            jobs = [(str(images_dir), i, [(s, opt) for s, w, opt in zip(sources, wanted, optional) if i in w],
                     self.tile_size, field_size, self.cfg.cells) for i in todo if any(i in w for w in wanted)]
            cell_ens = self.ensemble("cell")
            image_ens = self.ensemble("image") if self.has_image_model else None
            if workers > 1:
                items = pool_map(_predict_inputs, jobs, workers, window=2 * workers)
            else:
                items = map(_predict_inputs, jobs)
                if prefetch:
                    items = _read_ahead(items)
            bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress, file=sys.stderr)
            missing_of = {s.key: m for s, m in zip(sources, missing)}
            def noted(items):  # a mask source that failed for an image is reported, never stops the rest
                for item in items:
                    for key, message in item["failed"].items():
                        failures.setdefault(key, []).append((item["id"], message))
                    yield item

            for done in _batched(noted(items), cell_ens, image_ens, pack_of):
                for key, result in done:
                    if result.image_id in missing_of[key]:
                        result.save(prediction_path(out_dir[key], result.image_id))
                bar.update(1)
            bar.close()
        return [{i: ImageResult.load(prediction_path(c, i), i) for i in ids if prediction_path(c, i).is_file()}
                for c in caches]

    def _write_cache_info(self, cache: Path, images_dir: Path, masks) -> None:
        info = cache / "params.json"
        if not info.exists():
            with atomic_open(info, "w") as f:
                json.dump({"images": str(images_dir.resolve()), "masks": masks.key, "tta": self.tta,
                           "which": self.which, "folds": self.folds, "models": list(self.folders),
                           "tile_size": self.tile_size, "field_size": self.field_size,
                           "cells": dataclasses.asdict(self.cfg.cells)}, f, indent=2)


# --------------------------------------------------------------------------------------------
# combination and submission


def available_image_sources(results: dict[str, ImageResult]) -> list[str]:
    """``field`` / ``bag`` when every result has that image score."""
    rs = [r for r in results.values() if len(r.cell_ids)]
    out = []
    if rs and all(np.isfinite(r.image_probs).all() for r in rs):
        out.append("field")
    if rs and all(r.bag_probs is not None and np.isfinite(r.bag_probs).all() for r in rs):
        out.append("bag")
    return out


def combined_scores(results: dict[str, ImageResult], spec: CombineSpec, image_source: str = "auto") -> dict[str, np.ndarray]:
    """{ID: N x 19 combined confidences}, combined over all images at once (rank needs it).

    image_source: field | bag | mean | auto (kit.combine.resolve_image_source)."""
    from kit.combine import resolve_image_source

    order = [i for i, r in results.items() if len(r.cell_ids)]
    if not order:
        return {i: np.zeros((0, NUM_CLASSES)) for i in results}
    source = resolve_image_source(image_source, available_image_sources(results))
    cell = np.concatenate([results[i].cell_probs for i in order]).astype(np.float64)
    image = np.concatenate([np.repeat(results[i].image_score(source)[None], len(results[i].cell_ids), 0)
                            for i in order])
    visible = np.concatenate([results[i].visible for i in order]).astype(np.float64)
    groups = np.concatenate([np.full(len(results[i].cell_ids), i, dtype=object) for i in order])
    scale = np.concatenate([results[i].scale if results[i].scale is not None else np.ones(len(results[i].cell_ids))
                            for i in order]).astype(np.float64)
    stain = np.concatenate([results[i].stain if results[i].stain is not None else np.ones(len(results[i].cell_ids))
                            for i in order]).astype(np.float64)
    scores = combine(cell, image, spec, visible, groups=groups, scale=scale, stain=stain)
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
                      scores: dict[str, np.ndarray] | None = None, image_source: str = "auto") -> dict:
    """{ID: kit.submission.ImagePrediction} with one triple per (cell, class) at or above `min_confidence`."""
    from kit.submission import ImagePrediction

    scores = scores if scores is not None else combined_scores(results, spec, image_source)
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


def _refuse_folder(path: Path) -> None:
    if path.is_dir():
        raise ConfigError(f"submission path {path} is a folder: give a file name, e.g. {path / 'submission.csv'}")


def write_and_validate(path: str | Path, predictions: dict, ids: Sequence[str], sizes: dict | None,
                       sample: str | Path | None = None, images: str | Path | None = None,
                       image_sizes: dict | None = None) -> Path:
    """Write the submission to a temporary file beside `path`, validate that file, and only then
    rename it to `path`: a rejected file (DataError listing the problems) never replaces the
    previous one. `image_sizes` ({ID: (width, height)} of the decoded images) or the `images`
    folder (headers read) checks each row's size. Temp files of killed runs are removed first."""
    from kit.atomic import remove_stale_temps
    from kit.submission import validate_submission, write_submission

    path = Path(path)
    _refuse_folder(path)
    remove_stale_temps(path.parent, stem=path.stem)
    with atomic_path(path) as tmp:
        write_submission(tmp, predictions, ids, sizes)
        problems = validate_submission(tmp, sample=sample, images=images, image_sizes=image_sizes, check_masks=True)
        if problems:
            problems = [p.replace(str(tmp), str(path)).replace(tmp.name, path.name) for p in problems]
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DataError(f"{path}: the submission is invalid and was not written (a previous file there is "
                            "kept): " + "; ".join(problems[:5]) + more)
    return path


def predict(run_dir: str | Path, images_dir: str | Path, out: str | Path = "submission/submission.csv", *,
            ids_from: str | Path | None = None, spec: CombineSpec | None = None, tta: int | None = None,
            device: str | None = None, workers: int = 1, min_confidence: float = 0.0,
            folds: Sequence[int] | None = None, mask_cache: str | Path | None = None,
            progress: bool = True, engine: str | None = None) -> dict:
    """The whole `predict` command; returns {"submission", "images", "cells", "triples", "combine", "seconds"}."""
    from kit.layout import list_image_ids, read_sample_submission

    t0 = time.perf_counter()
    run_dir, images_dir = Path(run_dir), Path(images_dir)
    if not 0.0 <= min_confidence <= 1.0:  # also refuses nan, which would keep no triple at all
        raise ConfigError(f"--min-confidence must be a probability in [0, 1], got {min_confidence}")
    _refuse_folder(Path(out))  # before the work, not after it
    if not images_dir.is_dir():
        raise DataError(f"images folder not found: {images_dir}")
    if ids_from:
        ids, sizes = read_sample_submission(ids_from)
    else:
        ids, sizes = list_image_ids(images_dir), None
        if not ids:
            raise DataError(f"no images (<ID>_red/green/blue/yellow.png) in {images_dir}")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else None
    predictor = Predictor(run_dir, tta=tta, device=device, folds=folds, mask_cache=mask_cache, engine=engine, log=log)
    spec = spec or read_combine_spec(run_dir, predictor.cfg)
    if log:  # before the long work: the estimate from measured figures (kit.runtime)
        from kit.images import image_size

        known = sizes or {}
        for line in predictor.estimate({i: known.get(i) or image_size(images_dir, i) for i in ids
                                        if i in known or (images_dir / f"{i}_red.png").exists()}):
            log(line)
    results = predictor.predict_folder(images_dir, ids, predictor.run_masks(images_dir), progress=progress,
                                       workers=workers)
    missing = [i for i in ids if i not in results]
    if missing:  # e.g. listed in the sample submission but no image file
        raise DataError(f"no prediction for {len(missing)} image(s), e.g. {missing[0]}: are they in {images_dir}?")
    preds = build_predictions(results, spec, min_confidence, image_source=predictor.cfg.predict.image_source)
    path = write_and_validate(out, preds, ids, sizes, sample=ids_from,
                              image_sizes={i: (r.width, r.height) for i, r in results.items()})
    return {
        "submission": str(path),
        "images": len(ids),
        "cells": int(sum(len(r.cell_ids) for r in results.values())),
        "triples": int(sum(len(p.triples) for p in preds.values())),
        "combine": spec.name,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def parse_folds_option(text: str | None) -> list[int] | None:
    """``--folds 0,2`` -> [0, 2]; None stays None."""
    if text is None:
        return None
    try:
        folds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--folds: expected fold numbers separated by commas, got {clip(text)}") from None
    if not folds or any(f < 0 for f in folds):
        raise ConfigError(f"--folds: expected fold numbers >= 0, got {clip(text)}")
    return folds


def configure_predict(parser: argparse.ArgumentParser) -> None:
    from kit.cli import file_arg

    parser.add_argument("--run", required=True, type=Path, help="run folder (config.yaml, manifest.json, cell/ and image/ fold checkpoints)")
    parser.add_argument("--images", required=True, type=Path, help="folder of <ID>_{red,green,blue,yellow}.png images")
    parser.add_argument("--out", type=file_arg, default=Path("submission/submission.csv"), help="submission CSV (default submission/submission.csv)")
    parser.add_argument("--ids-from", type=Path, help="sample_submission.csv: the IDs, their order and sizes (default: every image in --images)")
    parser.add_argument("--tta", type=int, choices=(1, 2, 4, 8), help="flip TTA: 1 none, 2 +h-flip, 4 +v-flips, 8 all (default: the run's predict.tta)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: the run's train.device)")
    parser.add_argument("--folds", help="comma list of the folds to use (default: every fold of the run; a missing one is an error)")
    parser.add_argument("--mask-cache", type=Path, help="mask cache root for these images (default: the run's mask cache)")
    parser.add_argument("--workers", type=int, default=1, help="processes that decode, segment and tile images (default 1)")
    parser.add_argument("--combine", help="override the tuned combination, e.g. geometric:0.5 or image_only")
    parser.add_argument("--min-confidence", type=float, default=0.0, help="drop triples below this confidence, in [0, 1] (default 0: keep all 19 per cell)")
    parser.add_argument("--engine", choices=("auto", "baseline", "torch", "jit", "onnx", "compile"),
                        help="how the CNNs run (default: the run's predict.engine, auto = fastest measured here)")
    parser.set_defaults(func=_run_predict)


def parse_combine_option(text: str) -> CombineSpec:
    """``strategy[:weight[:negative[:border_power[:unstained]]]]`` -> CombineSpec."""
    parts = text.split(":")
    try:
        kwargs = {"strategy": parts[0]}
        if len(parts) > 1 and parts[1]:
            kwargs["weight"] = float(parts[1])
        if len(parts) > 2 and parts[2]:
            kwargs["negative"] = parts[2]
        if len(parts) > 3 and parts[3]:
            kwargs["border_power"] = float(parts[3])
        if len(parts) > 4 and parts[4]:
            kwargs["unstained"] = float(parts[4])
    except ValueError:
        raise ConfigError(f"--combine {clip(text)}: expected strategy[:weight[:negative[:border_power[:unstained]]]]") from None
    return CombineSpec(**kwargs)


def _run_predict(args) -> int:
    spec = parse_combine_option(args.combine) if args.combine else None
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    info = predict(args.run, args.images, args.out, ids_from=args.ids_from, spec=spec, tta=args.tta,
                   device=args.device, workers=args.workers, min_confidence=args.min_confidence,
                   folds=parse_folds_option(args.folds), mask_cache=args.mask_cache, engine=args.engine)
    print(f"wrote {info['submission']}: {info['images']} images, {info['cells']} cells, {info['triples']} triples "
          f"(combine {info['combine']}, {info['seconds']:.1f} s); validated")
    return 0
