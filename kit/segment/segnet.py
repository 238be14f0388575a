"""A tiny U-Net that turns a field at working scale into cell-foreground and cell-border maps.

Used by the ``learned`` segmentation backend (`kit.segment.learned`): its border probability is the
landscape of a watershed grown from the classical nucleus seeds, its foreground probability the
mask the cells may fill. This module imports torch; import it only where torch is needed.

Input: (N, C, H, W) float32, the channels of `INPUT_CHANNELS` at the working scale (1/4 of a
2048 px field), each normalised by `kit.segment.classical.normalize_channel` over the whole
field; ``*_seam`` channels are the same channel grey-eroded by 1 px at full resolution before
downscaling (thin dark seams between cells survive the reduction). Output: (N, 2, H, W) logits,
channel 0 = cell foreground, channel 1 = border between two touching cells. The network works
at half the input resolution inside (stride-2 stem) and upsamples its logits back, so H and W
must be multiples of `MULTIPLE` (the backend pads).

Weights file (``.npz``, no pickle): one float16 array per state-dict entry plus ``__config__``, a
JSON string with `widths`, `inputs` and the training record (data, seeds, steps, losses) written
by ``benchmarks/train_segnet.py``. Its sha256 (`kit.segment.learned.weights_sha256`) keys the mask cache.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegNet", "INPUT_CHANNELS", "MULTIPLE", "load_segnet", "save_segnet", "predict_maps"]

# (channel index in RGBY, eroded?) per input plane: red, yellow, blue, red and yellow eroded.
INPUT_CHANNELS = (("red", 0, False), ("yellow", 3, False), ("blue", 2, False),
                  ("red_seam", 0, True), ("yellow_seam", 3, True))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class SegNet(nn.Module):
    """Stride-2 stem, a U-Net of len(widths) levels, 1x1 head to 2 logits, x2 upsampling."""

    def __init__(self, in_channels: int = len(INPUT_CHANNELS), widths: tuple[int, ...] = (16, 32, 48, 64)):
        super().__init__()
        w = tuple(int(x) for x in widths)
        self.widths = w
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w[0], 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True))
        self.enc = nn.ModuleList([_block(w[0], w[0])] + [_block(w[k - 1], w[k]) for k in range(1, len(w))])
        self.dec = nn.ModuleList([_block(w[k] + w[k - 1], w[k - 1]) for k in range(len(w) - 1, 0, -1)])
        self.head = nn.Conv2d(w[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for k, enc in enumerate(self.enc):
            if k:
                x = F.max_pool2d(x, 2)
            x = enc(x)
            skips.append(x)
        for dec, skip in zip(self.dec, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = dec(torch.cat([x, skip], 1))
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False)


def _multiple(widths) -> int:
    return 2 ** len(widths)  # stem /2, then len - 1 poolings


MULTIPLE = _multiple((16, 32, 48, 64))


def save_segnet(model: SegNet, path: str | Path, record: dict) -> str:
    """Write `model` as float16 npz with its config and `record`; returns the file's sha256."""
    path = Path(path)
    arrays = {k: v.detach().cpu().numpy().astype(np.float16 if v.is_floating_point() else v.cpu().numpy().dtype)
              for k, v in model.state_dict().items()}
    config = {"widths": list(model.widths), "inputs": [c[0] for c in INPUT_CHANNELS], **record}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, __config__=np.array(json.dumps(config, sort_keys=True)), **arrays)
    tmp.replace(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@lru_cache(maxsize=4)
def _load(path: str, mtime_ns: int) -> tuple[SegNet, dict]:
    with np.load(path, allow_pickle=False) as z:
        config = json.loads(str(z["__config__"]))
        state = {k: torch.from_numpy(z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k])
                 for k in z.files if k != "__config__"}
    if config.get("inputs") != [c[0] for c in INPUT_CHANNELS]:
        raise ValueError(f"{path}: weights expect inputs {config.get('inputs')}, this kit feeds "
                         f"{[c[0] for c in INPUT_CHANNELS]}")
    model = SegNet(len(INPUT_CHANNELS), tuple(config["widths"]))
    model.load_state_dict(state)
    return model.eval(), config


def load_segnet(path: str | Path) -> tuple[SegNet, dict]:
    """The network in eval mode and its config from a weights file (loaded once per file version)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation network weights not found: {path} "
                                "(retrain with benchmarks/train_segnet.py, or pass weights=PATH)")
    return _load(str(path.resolve()), path.stat().st_mtime_ns)


def predict_maps(model: SegNet, planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(foreground, border) probabilities, float32 (H, W), of (C, H, W) input planes (padded here)."""
    c, h, w = planes.shape
    m = _multiple(model.widths)
    ph, pw = (-h) % m, (-w) % m
    x = torch.from_numpy(np.ascontiguousarray(planes, np.float32))[None]
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    with torch.inference_mode():
        prob = torch.sigmoid(model(x))[0, :, :h, :w].numpy()
    return prob[0], prob[1]
