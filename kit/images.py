"""Reading one HPA sample: four channel files -> one H x W x 4 array.

Files: ``<folder>/<ID>_<channel>.<ext>`` with channel in red (microtubules), green (protein of
interest), blue (nuclei), yellow (ER) and ext one of png, tif, tiff, jpg, jpeg (Kaggle ships PNG,
the HPA website TIFF or JPEG). A colour file for one channel (the website's JPEGs are RGB, tinted in
the channel's colour; yellow = red + green) becomes one plane: the mean of the planes carrying the
tint (`tint_planes`), so the JPEG's chroma bleed into the other planes is not read as signal.

Array format returned by `read_sample`: shape (H, W, 4), channel order red, green, blue, yellow,
dtype of the files, i.e. ``uint8`` for 8-bit and ``uint16`` for 16-bit images (a sample whose
channels mix depths is promoted to uint16 with 8-bit channels scaled by 257, so full scale stays
full scale). Use `to_float` (values in [0, 1]) or `to_uint8` to get one representation for both
depths: both scale by the dtype's full range, never by the image's own maximum, so a faint image
stays faint.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kit.errors import DataError

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


class ImageReadError(DataError):
    """A channel file that is missing, unreadable, truncated or inconsistent; names the file."""


def channel_path(folder: str | Path, image_id: str, channel: str) -> Path:
    """Path of one channel file, trying each known extension; raises ImageReadError if absent."""
    folder = Path(folder)
    for ext in EXTENSIONS:
        path = folder / f"{image_id}_{channel}{ext}"
        if path.is_file():
            return path
    raise ImageReadError(f"missing channel file: {folder / f'{image_id}_{channel}.png'}")


def read_channel(path: str | Path) -> np.ndarray:
    """Read one channel as a 2-D uint8 or uint16 array.

    A colour file (the HPA website serves each channel as a tinted RGB JPEG) becomes the maximum
    over its colour planes; other integer depths are clipped into uint16.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"missing channel file: {path}")
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"empty file: {path}")
    if data[:8].tobytes() == b"\x89PNG\r\n\x1a\n" and not data[-12:].tobytes().endswith(b"IEND\xaeB`\x82"):
        # libpng decodes a truncated PNG without complaint (missing rows come out black).
        raise ImageReadError(f"truncated PNG file (no IEND chunk): {path}")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageReadError(f"unreadable or truncated image file: {path}")
    if img.ndim == 3:  # an RGB(A) file for one channel: the HPA website serves tinted JPEGs
        img = tint_planes(img)
    if img.dtype not in (np.uint8, np.uint16):
        if img.dtype.kind == "f":
            img = np.clip(img, 0.0, 1.0) * 65535.0 if img.max() <= 1.0 else np.clip(img, 0, 65535)
        else:  # int8/int16/int32/uint32 TIFFs: clip, a bare astype would wrap around
            img = np.clip(img, 0, 65535)
        img = img.astype(np.uint16)
    return img


def tint_planes(img: np.ndarray) -> np.ndarray:
    """One channel from a colour file tinted in its colour: the mean of the planes that carry it.

    The HPA website stores each channel as an RGB(A) JPEG tinted red, green, blue or yellow
    (yellow = red + green, both planes equal). The tint's planes are those whose mean is at least
    half the brightest plane's; the others hold only JPEG chroma bleed (up to ~10% of full scale
    in the dark parts), which the maximum over planes would add to the signal. A grey image saved
    as colour (R = G = B) keeps its values. Works on the file's colour order (cv2: BGR) as planes
    are chosen by content, not by name.
    """
    planes = img[..., :3] if img.shape[2] >= 3 else img[..., :1]
    step = max(1, int(np.sqrt(planes.shape[0] * planes.shape[1] / 65536)))
    means = planes[::step, ::step].reshape(-1, planes.shape[2]).mean(axis=0)
    use = np.flatnonzero(means >= 0.5 * means.max()) if means.max() > 0 else np.arange(planes.shape[2])
    if use.size == 1:
        return np.ascontiguousarray(planes[..., int(use[0])])
    acc = planes[..., use].astype(np.uint32).sum(axis=2)
    return ((acc + use.size // 2) // use.size).astype(img.dtype)


def read_sample(folder: str | Path, image_id: str) -> np.ndarray:
    """Read ``<ID>_{red,green,blue,yellow}`` from `folder` into an (H, W, 4) array (see module doc)."""
    paths = [channel_path(folder, image_id, c) for c in CHANNELS]  # a missing file fails before any decode
    return stack_channels([read_channel(p) for p in paths], names=[str(p) for p in paths])


def stack_channels(channels: list[np.ndarray], names: list[str] | None = None) -> np.ndarray:
    """Stack four 2-D channels (RGBY) into (H, W, 4), checking shapes and unifying depth."""
    names = names or list(CHANNELS)
    shape = channels[0].shape
    for name, ch in zip(names, channels):
        if ch.shape != shape:
            raise ImageReadError(
                f"channel shape mismatch: {name} is {ch.shape[1]}x{ch.shape[0]}, "
                f"{names[0]} is {shape[1]}x{shape[0]}"
            )
    if any(ch.dtype == np.uint16 for ch in channels):
        channels = [ch.astype(np.uint16) * 257 if ch.dtype == np.uint8 else ch for ch in channels]
    return np.ascontiguousarray(np.stack(channels, axis=-1))


def full_scale(image: np.ndarray) -> int:
    """255 for uint8, 65535 for uint16."""
    if image.dtype == np.uint8:
        return 255
    if image.dtype == np.uint16:
        return 65535
    raise TypeError(f"expected uint8 or uint16 image, got {image.dtype}")


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 image -> float32 in [0, 1], scaled by the dtype's full range."""
    return image.astype(np.float32) * (1.0 / full_scale(image))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 image -> uint8 (16-bit values rounded from v / 257)."""
    if image.dtype == np.uint8:
        return image
    full_scale(image)
    return ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
