"""Multiple-instance learning of cell labels from image labels (``train.cell_mode: mil``).

A bag is up to ``train.bag_size`` cells (default 16) of one image. All of them go through one
backbone (`kit.models.Classifier`: features, pooling, neck); two heads read the cells' embeddings:

* the **cell head** (the Classifier's own ``fc``): one 19-logit row per cell, trained on the
  broadcast image label with a small weight (``train.cell_loss_weight``, 0.1 as in 2nd place);
* the **bag head** (``bag_fc``): pooled cell embeddings (``train.bag_pool``: ``max`` as 2nd
  place, ``mean`` as 8th, ``attention`` as 3rd place's gated attention, Ilse et al. 2018) -> 19
  logits, trained on the image label.

Both losses flow into the shared backbone, so the image label teaches the cell pathway which cells
carry it (the bag head's gradient reaches the cell head through the embedding it reads). At
prediction ``model(tiles)`` is the cell head (the cell score, as for a broadcast model) and
`bag_probs` pools *all* of a field's cells into one bag (the image score), so one model yields
both inputs of `kit.combine`.

Batches (`CellBagDataset`): ``((tiles B x N x 4 x S x S uint8, mask B x N bool), (image target
B x 19, cell targets B x N x 19))``; padded slots are zero tiles with mask False. Cells are drawn
per (seed, epoch, position) as every other augmentation (kit.torchdata.EpochSampler), so resume is
exact; a bag takes a random subset when the image has more cells than ``bag_size``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from kit.errors import ConfigError
from kit.labels import NUM_CLASSES
from kit.models import Classifier

BAG_POOLS = ("max", "mean", "attention")


class AttentionPool(nn.Module):
    """Gated attention pooling over a bag: weights softmax(w . (tanh(V h) * sigmoid(U h)))."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        score = self.w(torch.tanh(self.v(emb)) * torch.sigmoid(self.u(emb))).squeeze(-1)
        score = score.float().masked_fill(~mask, float("-inf"))
        weights = torch.softmax(score, dim=1).to(emb.dtype)
        return (weights.unsqueeze(-1) * emb).sum(1)


class MILClassifier(Classifier):
    """A Classifier (the cell head) plus a bag head over pooled cell embeddings (module doc).

    ``model(x)`` with x ``B x 4 x S x S``: cell logits (as Classifier). ``model(x, mask)`` with x
    the ``B*N`` cells of B bags flattened and mask ``B x N``: (cell logits B x N x 19, bag logits
    B x 19); the one call DDP sees, so every parameter takes part in each step.
    """

    def __init__(self, *args, bag_pool: str = "max", **kwargs):
        super().__init__(*args, **kwargs)
        if bag_pool not in BAG_POOLS:
            raise ConfigError(f"config key train.bag_pool: must be one of {', '.join(BAG_POOLS)}, got {bag_pool!r}")
        self.bag_pool = bag_pool
        self.attention = AttentionPool(self.embedding_dim) if bag_pool == "attention" else None
        self.bag_fc = nn.Linear(self.embedding_dim, self.fc.out_features)

    def pool_bag(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B x N x D embeddings, B x N mask -> B x D pooled (padding ignored)."""
        if self.bag_pool == "max":
            return emb.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
        if self.bag_pool == "mean":
            m = mask.unsqueeze(-1).to(emb.dtype)
            return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.attention(emb, mask)

    def bag_logits(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.bag_fc(self.dropout(self.pool_bag(emb, mask)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_embedding: bool = False):
        if mask is None:
            return super().forward(x, return_embedding=return_embedding)
        b, n = mask.shape
        logits, emb = super().forward(x, return_embedding=True)
        emb = emb.reshape(b, n, -1)
        return logits.reshape(b, n, -1), self.bag_logits(emb, mask)


class MILLoss(nn.Module):
    """bag loss(bag logits, image label) + cell_weight x cell loss(cell logits, cell targets) over
    the real cells of each bag; `base` is any kit.losses loss without an embedding."""

    needs_embedding = False

    def __init__(self, base: nn.Module, cell_weight: float = 0.1):
        super().__init__()
        if getattr(base, "needs_embedding", False):
            raise ConfigError("train.cell_mode=mil works with train.loss bce or focal, not ce_triplet")
        self.base = base
        self.cell_weight = float(cell_weight)

    def forward(self, outputs, targets, embedding=None):
        cell_logits, bag_logits = outputs
        bag_t, cell_t, mask = targets
        loss = self.base(bag_logits, bag_t)
        if self.cell_weight > 0 and bool(mask.any()):
            loss = loss + self.cell_weight * self.base(cell_logits[mask], cell_t[mask])
        return loss


class CellBagDataset(Dataset):
    """One bag per image from a CellTileDataset's cells (same tiles, policy, targets).

    cells: a kit.torchdata.CellTileDataset (its items give tiles and per-cell targets, already
    filtered by the cell policy and relabelled by pseudo rounds); image_targets: M x 19 of its
    images. Items ``((tiles N x 4 x S x S, mask N), (image target, cell targets N x 19, mask N))``
    where N = bag_size."""

    def __init__(self, cells, image_targets: np.ndarray, bag_size: int = 16, augment: bool = False):
        if bag_size < 1:
            raise ConfigError(f"config key train.bag_size: must be >= 1, got {bag_size}")
        self.cells = cells
        self.image_targets = np.asarray(image_targets, dtype=np.float32)
        self.bag_size = int(bag_size)
        self.augment = augment
        order = np.argsort(cells.img_idx, kind="stable")
        self.images = np.unique(cells.img_idx)
        self.members = np.split(order, np.flatnonzero(np.diff(cells.img_idx[order])) + 1) if len(order) else []
        self.ids = list(cells.ids)
        self.missing = list(cells.missing)

    def __len__(self) -> int:
        return len(self.images)

    def sample_targets(self) -> np.ndarray:
        return self.image_targets[self.images]

    def image_ids(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=object)[self.images]

    def __getitem__(self, key):
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        members = self.members[index]
        rng = np.random.default_rng(aug_seed if aug_seed is not None else index)
        if len(members) > self.bag_size:
            members = np.sort(rng.choice(members, size=self.bag_size, replace=False)) if self.augment \
                else members[: self.bag_size]
        seeds = rng.integers(0, 2**31 - 1, size=len(members))
        first_x, first_y = self.cells[(int(members[0]), int(seeds[0]) if self.augment and aug_seed is not None else None)]
        tiles = torch.zeros((self.bag_size, *first_x.shape), dtype=first_x.dtype)
        cell_t = torch.zeros((self.bag_size, NUM_CLASSES), dtype=torch.float32)
        mask = torch.zeros(self.bag_size, dtype=torch.bool)
        tiles[0], cell_t[0], mask[0] = first_x, first_y, True
        for j in range(1, len(members)):
            x, y = self.cells[(int(members[j]), int(seeds[j]) if self.augment and aug_seed is not None else None)]
            tiles[j], cell_t[j], mask[j] = x, y, True
        target = torch.from_numpy(self.image_targets[self.images[index]])
        return (tiles, mask), (target, cell_t, mask)


def bag_probs_by_image(model: MILClassifier, emb: torch.Tensor, img_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, M x 19 bag-head probabilities) pooling every cell of each image at once."""
    uniq = np.unique(img_idx)
    out = np.zeros((len(uniq), NUM_CLASSES), np.float32)
    with torch.no_grad():
        for r, i in enumerate(uniq):
            e = emb[torch.from_numpy(np.flatnonzero(img_idx == i))].unsqueeze(0)
            mask = torch.ones(e.shape[:2], dtype=torch.bool, device=e.device)
            out[r] = torch.sigmoid(model.bag_logits(e, mask).float())[0].cpu().numpy()
    return uniq, out


def is_mil(model: nn.Module) -> bool:
    return isinstance(model, MILClassifier)


def predict_cells_and_bag(models: Sequence[nn.Module], tiles: np.ndarray, device, tta: int = 1,
                          batch_size: int = 64, activation: str = "sigmoid") -> tuple[np.ndarray, np.ndarray]:
    """(N x 19 cell probabilities, 19 bag probabilities) of one field's N cell tiles (uint8
    N x 4 x S x S) from MIL fold models: both averaged over the models and the first `tta`
    dihedral transforms (`kit.inference.dihedral_np`, as predict's TTA); the bag head of each
    (model, transform) pools the embeddings of all N cells, as in training."""
    from kit.inference import dihedral_np
    from kit.models import preprocess

    device = torch.device(device)
    n = len(tiles)
    out = np.zeros((n, NUM_CLASSES), np.float32)
    use_amp = device.type == "cuda"
    embs: dict = {}
    with torch.inference_mode():
        for start in range(0, n, max(1, int(batch_size))):
            chunk = tiles[start:start + batch_size]
            acc = torch.zeros((len(chunk), NUM_CLASSES), dtype=torch.float32, device=device)
            for k in range(tta):
                xk = preprocess(torch.from_numpy(np.ascontiguousarray(dihedral_np(chunk, k))).to(device))
                with torch.autocast(device.type, enabled=use_amp):
                    for m, model in enumerate(models):
                        logits, emb = model(xk, return_embedding=True)
                        embs.setdefault((m, k), []).append(emb.float())
                        logits = logits.float()
                        acc += torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits)
            out[start:start + len(chunk)] = (acc / (tta * len(models))).cpu().numpy()
        bag = torch.zeros(NUM_CLASSES, dtype=torch.float32, device=device)
        for (m, _), parts in embs.items():
            e = torch.cat(parts).unsqueeze(0)
            mask = torch.ones(e.shape[:2], dtype=torch.bool, device=device)
            bag += torch.sigmoid(models[m].bag_logits(e, mask).float())[0]
    return out, (bag / max(1, len(embs))).cpu().numpy()


def write_bag_oof(path: Path, ids: Sequence[str], probs: np.ndarray) -> None:
    """``ID,p0..p18`` of the bag head (the MIL model's image score) on validation images."""
    import pandas as pd

    from kit.atomic import atomic_open

    df = pd.DataFrame({"ID": list(ids)})
    for c in range(NUM_CLASSES):
        df[f"p{c}"] = probs[:, c]
    with atomic_open(path, "w", newline="") as f:
        df.to_csv(f, index=False, float_format="%.6g")
