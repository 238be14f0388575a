"""torch Datasets for the two classifiers, their augmentation and sampling, and the DataLoader worker init.

Inputs read here (written by `kit.prepare`):
- Tile cache folder (`kit.cells`): ``<tile_dir>/<ID>.npy`` (N x 4 x S x S uint8, read memory-mapped)
  and ``<tile_dir>/<ID>.csv`` (the cell table, column ``cell_id``, same row order).
- Field cache folder (`kit.fields`): ``<field_dir>/<ID>.npy``, one 4 x S x S uint8 array per image.
The folders of a run are in its manifest (`kit.manifest`).

Items are ``(uint8 tensor 4 x S x S, float32 target of 19)``; normalisation happens on the device
(kit.models.preprocess). A cell's target is its image's labels (weak labels).

Sampling: `EpochSampler` yields ``(index, augmentation_seed)`` pairs drawn from ``(seed, epoch)``
alone, sharded by rank for DDP. The augmentation of every item is therefore a pure function of
(seed, epoch, position): independent of the number of workers, and an interrupted run resumed from
its checkpoint sees exactly the batches it would have seen.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from kit.errors import DataError
from kit.workers import init_worker

__all__ = ["CellTileDataset", "FieldDataset", "EpochSampler", "augment", "balancing_weights", "worker_init_fn"]


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker setup: the kit's one worker init (`kit.workers.init_worker`: one thread each)."""
    init_worker()


# ---------------------------------------------------------------------------------------------
# Augmentation


def augment(x: np.ndarray, rng: np.random.Generator, intensity: float = 0.2) -> np.ndarray:
    """Random dihedral transform (flips, 90-degree rotations) and per-channel brightness/contrast.

    x: C x H x W uint8 (H == W for rotations). Per channel: brightness = a gain in
    [1 - intensity, 1 + intensity]; contrast = a stretch about the channel's mean by a factor in
    the same range. Both are multiplicative, so a faint protein channel (HPA green often averages a
    few grey levels) is scaled, never drowned by an additive shift, and black background stays black
    under the gain. Returns uint8 C x H x W.
    """
    k = int(rng.integers(4))
    if k:
        x = np.rot90(x, k, axes=(1, 2))
    if rng.random() < 0.5:
        x = x[:, :, ::-1]
    if intensity > 0:
        c = x.shape[0]
        gain = rng.uniform(1 - intensity, 1 + intensity, size=(c, 1, 1)).astype(np.float32)
        contrast = rng.uniform(1 - intensity, 1 + intensity, size=(c, 1, 1)).astype(np.float32)
        y = x.astype(np.float32)
        mean = y.mean(axis=(1, 2), keepdims=True)
        y = ((y - mean) * contrast + mean) * gain
        x = np.clip(y + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------------------------
# Sampling


class EpochSampler(Sampler):
    """Yields ``(index, aug_seed)`` for one epoch; order and seeds depend only on (seed, epoch).

    shuffle: a permutation per epoch; weights: draw len(dataset) samples with replacement with
    these probabilities (class-balancing sampler). With ``world > 1`` the list is padded to a
    multiple of world and rank r takes every world-th item from r (as DistributedSampler does).
    """

    def __init__(
        self,
        n: int,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        rank: int = 0,
        world: int = 1,
        augment: bool = True,
    ):
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.rank, self.world, self.augment = rank, world, augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.n, size=self.n, replace=True, p=self.weights / self.weights.sum())
        elif self.shuffle:
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        seeds = rng.integers(0, 2**31 - 1, size=self.n)
        total = len(self) * self.world
        if total > self.n:  # pad by wrapping so every rank gets the same number of items
            extra = total - self.n
            order = np.concatenate([order, order[:extra]])
            seeds = np.concatenate([seeds, seeds[:extra]])
        for i in range(self.rank, total, self.world):
            yield (int(order[i]), int(seeds[i]) if self.augment else None)


def balancing_weights(targets: np.ndarray, power: float = 0.5) -> np.ndarray:
    """Per-sample weights for a class-balancing sampler: the largest (N / count_c) ** power over
    the sample's labels (rare classes drawn more often)."""
    t = np.asarray(targets, dtype=bool)
    counts = t.sum(0).astype(np.float64)
    inv = np.where(counts > 0, (len(t) / np.maximum(counts, 1)) ** power, 0.0)
    w = (t * inv[None, :]).max(1)
    w[w == 0] = 1.0
    return w


# ---------------------------------------------------------------------------------------------
# Datasets


class CellTileDataset(Dataset):
    """Every cell of the given images; target = the image's multi-hot labels.

    ids / targets: image IDs and their N x 19 multi-hot labels. Images without a tiles file (no
    cell found) contribute nothing; `missing` lists them. max_cells_per_image > 0 keeps that many
    cells per image (a fixed random choice from `seed`). `policy` (kit.cell_policy): only the
    cells it keeps. `cell_targets` {(ID, cell_id): 19 targets} (pseudo-label rounds, kit.pseudo)
    replaces the broadcast target of the cells it lists. `negative_aug` p: with probability p
    (drawn from the item's augmentation seed) the green channel is dimmed to x U[0, 0.1] and the
    target becomes Negative only (9th place). `unstained` t > 0: a cell whose stain fraction
    (kit.combine.stain_fraction over the image's kept cells) is below t gets the unstained rule's
    target, as the rule scores it at prediction: locations x (1 - d), Negative max(Negative, d).
    """

    def __init__(
        self,
        tile_dir: str | Path,
        ids: Sequence[str],
        targets: np.ndarray,
        augment: bool = False,
        max_cells_per_image: int = 0,
        seed: int = 0,
        cache_size: int = 64,
        policy=None,
        cell_targets: dict | None = None,
        negative_aug: float = 0.0,
        unstained: float = 0.0,
    ):
        from kit.cell_policy import keep_mask
        from kit.combine import apply_unstained, stain_fraction

        self.tile_dir = Path(tile_dir)
        self.negative_aug = float(negative_aug)
        self.ids = list(ids)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.augment = augment
        self.cache_size = cache_size
        self.missing: list[str] = []
        img_idx, rows, cell_ids, stains = [], [], [], []
        rng = np.random.default_rng(seed)
        from kit.cells import load_tiles, tiles_done

        for i, image_id in enumerate(self.ids):
            if not tiles_done(self.tile_dir, image_id):
                self.missing.append(image_id)
                continue
            tiles, table = load_tiles(self.tile_dir, image_id)
            if tiles.ndim != 4 or tiles.shape[1] != 4 or tiles.dtype != np.uint8:
                raise DataError(f"{self.tile_dir / f'{image_id}.npy'}: expected N x 4 x S x S uint8 tiles, "
                                f"got {tiles.shape} {tiles.dtype}")
            n = int(tiles.shape[0])
            ids_here = table["cell_id"].to_numpy(np.int64)
            kept = np.flatnonzero(keep_mask(table, policy))
            keep = kept
            if max_cells_per_image and len(keep) > max_cells_per_image:
                keep = np.sort(rng.choice(keep, size=max_cells_per_image, replace=False))
            if unstained > 0:  # over the cells kept by the policy, as kit.predict computes it
                stain = np.ones(n)
                stain[kept] = stain_fraction(table.iloc[kept])
                stains.append(stain[keep])
            img_idx.append(np.full(len(keep), i, dtype=np.int32))
            rows.append(keep.astype(np.int32))
            cell_ids.append(ids_here[keep])
        cat = lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt)  # noqa: E731
        self.img_idx = cat(img_idx, np.int32)
        self.rows = cat(rows, np.int32)
        self.cell_ids = cat(cell_ids, np.int64)
        self.item_targets = self.targets[self.img_idx] if len(self.img_idx) else np.zeros((0, self.targets.shape[1]), np.float32)
        if cell_targets:
            for r, (i, k) in enumerate(zip(self.img_idx, self.cell_ids)):
                t = cell_targets.get((self.ids[int(i)], int(k)))
                if t is not None:
                    self.item_targets[r] = t
        if stains:
            apply_unstained(self.item_targets, np.concatenate(stains), unstained)
        self._maps: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self):  # memmaps are reopened in each worker
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state

    def sample_targets(self) -> np.ndarray:
        """N_cells x 19 targets (for pos_weight and the balancing sampler)."""
        return self.item_targets

    def image_ids(self) -> np.ndarray:
        """The image ID of every item, in item order."""
        return np.asarray(self.ids, dtype=object)[self.img_idx]

    def _tiles(self, i: int) -> np.ndarray:
        arr = self._maps.get(i)
        if arr is None:
            arr = np.load(self.tile_dir / f"{self.ids[i]}.npy", mmap_mode="r")
            self._maps[i] = arr
            if len(self._maps) > self.cache_size:  # bound the open memmaps (file descriptors)
                self._maps.popitem(last=False)
        return arr

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        i = int(self.img_idx[index])
        x = np.array(self._tiles(i)[self.rows[index]])
        y = self.item_targets[index]
        if self.augment and aug_seed is not None:
            rng = np.random.default_rng(aug_seed)
            x = augment(x, rng)
            if self.negative_aug > 0 and rng.random() < self.negative_aug:
                x[1] = (x[1] * rng.uniform(0.0, 0.1)).astype(np.uint8)
                y = np.zeros_like(y)
                y[-1] = 1.0  # Negative (class 18)
        return torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.float32))


class FieldDataset(Dataset):
    """Whole downscaled fields from the field cache; target = the image's multi-hot labels."""

    def __init__(self, field_dir: str | Path, ids: Sequence[str], targets: np.ndarray, augment: bool = False):
        self.field_dir = Path(field_dir)
        self.ids = list(ids)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.augment = augment
        missing = [i for i in self.ids if not (self.field_dir / f"{i}.npy").is_file()]
        if missing:
            raise DataError(f"field cache {self.field_dir} lacks {len(missing)} image(s), e.g. {missing[0]}")
        self.missing: list[str] = []

    def __len__(self) -> int:
        return len(self.ids)

    def sample_targets(self) -> np.ndarray:
        return self.targets

    def image_ids(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=object)

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        x = np.load(self.field_dir / f"{self.ids[index]}.npy")
        if self.augment and aug_seed is not None:
            x = augment(x, np.random.default_rng(aug_seed))
        return torch.from_numpy(x), torch.from_numpy(self.targets[index])
