"""A learned cell-cell boundary map for the classical segmenter: pixel features + a tiny MLP.

The classical watershed meets touching cells where red and yellow are dimmest; on confluent and
crowded fields the filament and ER texture has gaps as dark as the seams, and cells found with
the right nucleus are lost at IoU 0.6 on their outlines. Here each working-scale pixel gets a
probability of lying on a boundary between two cells, from a few filter responses (the approach
of ilastik's pixel classification), and the watershed's elevation is raised by it.

Features (`FEATURES`, all at the segmenter's working scale, lengths in units of the typical
nucleus radius r measured on the image, so a 1728, 2048 or 3072 px field is treated alike): for
the seam-preserving red and yellow channels, of L = log(smoothed channel + 0.05): L against its
local mean over r, the scale-normalised largest Hessian eigenvalue at 1 px, 2 px and 0.15 r
(a dark line is a large positive curvature across it), the smallest one at 2 px, the gradient
magnitude at 2 px, and the long-dim-line depth of the seam term; then the cytoplasm relief, the
distance to the nearest nucleus, to the edge of the nearest-nucleus partition (the line halfway
between two nuclei), to the background (distances / r, clipped at 4), inside-a-nucleus, and blue
against its local mean.

Model file (JSON, `kit/data/boundary_mlp.json`, written by `benchmarks/train_boundary.py`):
``{"version": 1, "features": [names, in the order above], "mean": [F], "std": [F],
"layers": [{"W": [[out] * in], "b": [out]}, ...], "trained_on": text, "command": text}``.
Layers are dense; ReLU between them, a sigmoid after the last (one output). Inputs are
standardised with `mean`/`std` first. Training data: synthetic fields with cell truth only
(`benchmarks/foreign_fields.py` tuning seeds and `kit synth`); no real field was trained on.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from kit.segment.classical import _blur

__all__ = ["FEATURES", "MODEL_PATH", "boundary_features", "boundary_probability", "load_model"]

MODEL_PATH = Path(__file__).resolve().parents[1] / "data" / "boundary_mlp.json"

FEATURES = tuple(f"{c}_{n}" for c in ("red", "yellow") for n in ("rel", "h1", "h2", "h2min", "hr", "grad", "line")) + (
    "relief", "d_nucleus", "d_partition", "d_background", "in_nucleus", "blue_rel")


def _local_mean(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian mean over `sigma` px, computed at 1/4 size when sigma is large (10x cheaper)."""
    h, w = x.shape
    if sigma < 8 or min(h, w) < 64:
        return _blur(x, sigma)
    small = cv2.resize(x, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
    return cv2.resize(_blur(small, sigma / 4.0), (w, h), interpolation=cv2.INTER_LINEAR)


def _hessian(g: np.ndarray, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(largest, smallest) Hessian eigenvalue of the already smoothed `g`, times s^2."""
    xx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3)
    yy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3)
    xy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3)
    tr = (xx + yy) * 0.5
    d = np.sqrt(((xx - yy) * 0.5) ** 2 + xy * xy)
    s2 = np.float32(s * s)
    return (tr + d) * s2, (tr - d) * s2


def _distance(mask: np.ndarray) -> np.ndarray:
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)


def boundary_features(red: np.ndarray, yellow: np.ndarray, blue: np.ndarray, relief: np.ndarray,
                      nuclei: np.ndarray, fg: np.ndarray, ref_radius: float,
                      lines: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(len(FEATURES), h, w) float32 feature planes (see the module docstring). `lines` are the seam
    term's long-dim-line depths of red and yellow (`classical._line_valleys`), reused here."""
    r = float(ref_radius)
    feats = np.empty((len(FEATURES), *nuclei.shape), np.float32)  # planes filled in place: no copy
    k = 0

    def put(x) -> None:
        nonlocal k
        feats[k] = x
        k += 1

    for ch, line in ((red, lines[0]), (yellow, lines[1])):
        L = np.log(_blur(ch, 0.7) + np.float32(0.05))
        put(L - _local_mean(L, r))
        put(_hessian(_blur(L, 1.0), 1.0)[0])
        g2 = _blur(L, 2.0)
        h2max, h2min = _hessian(g2, 2.0)
        put(h2max)
        put(h2min)
        sr = max(1.0, 0.15 * r)
        put(_hessian(_blur(L, sr), sr)[0])
        gx = cv2.Sobel(g2, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(g2, cv2.CV_32F, 0, 1, ksize=3)
        put(np.sqrt(gx * gx + gy * gy))
        put(line)
    put(relief)
    outside = nuclei == 0
    put(np.minimum(_distance(outside) / r, 4.0))
    # The nearest-nucleus partition: cv2 labels each pixel with its nearest zero-pixel component,
    # i.e. its nearest nucleus (touching nuclei count as one, which only blurs this one feature).
    _, part = cv2.distanceTransformWithLabels(outside.astype(np.uint8), cv2.DIST_L2, 5,
                                              labelType=cv2.DIST_LABEL_CCOMP)
    edge = np.zeros(part.shape, bool)
    edge[:, 1:] |= part[:, 1:] != part[:, :-1]
    edge[1:, :] |= part[1:, :] != part[:-1, :]
    put(np.minimum(_distance(~edge) / r, 4.0))
    put(np.minimum(_distance(fg) / r, 4.0))
    put(~outside)
    B = np.log(_blur(blue, 0.7) + np.float32(0.05))
    put(B - _local_mean(B, r))
    assert k == len(FEATURES)
    return feats


@lru_cache(maxsize=4)
def load_model(path: str | None = None) -> dict:
    """The MLP of `path` (default `MODEL_PATH`) as float32 arrays; checks the feature list."""
    p = Path(path) if path else MODEL_PATH
    try:
        spec = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"boundary model {p} is missing (it ships with the kit; re-create it with "
                                f"`python benchmarks/train_boundary.py`)") from None
    if spec.get("version") != 1 or tuple(spec.get("features", ())) != FEATURES:
        raise ValueError(f"boundary model {p}: version {spec.get('version')} / features do not match this kit's "
                         f"({len(FEATURES)} features, version 1)")
    layers = [(np.asarray(l["W"], np.float32), np.asarray(l["b"], np.float32)) for l in spec["layers"]]
    # Fold the standardisation into the first layer: ((x - mean) / std) @ W + b = x @ W' + b'.
    mean, std = np.asarray(spec["mean"], np.float32), np.asarray(spec["std"], np.float32)
    w0, b0 = layers[0]
    layers[0] = ((w0 / std[:, None]).astype(np.float32), (b0 - (mean / std) @ w0).astype(np.float32))
    return {"layers": layers}


def boundary_probability(features: np.ndarray, mask: np.ndarray, model: dict) -> np.ndarray:
    """P(boundary between two cells) per pixel of `mask` (0 elsewhere), float32 (h, w), from the
    (F, h, w) feature planes of `boundary_features`."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    # The whole grid at once, features as rows (a view, no gather: the foreground is most of a
    # confluent field): each layer is W^T @ X.
    x = features.reshape(features.shape[0], -1)
    *hidden, (w_out, b_out) = model["layers"]
    for w, b in hidden:
        x = w.T @ x
        x += b[:, None]
        np.maximum(x, 0.0, out=x)
    z = (w_out.T @ x)[0] + b_out[0]
    prob = 1.0 / (1.0 + np.exp(-z))
    return np.where(mask, prob.reshape(mask.shape), np.float32(0.0)).astype(np.float32, copy=False)
