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

Headers (`read_image_info`, `image_size`): size, depth and integrity of a file without decoding
its pixels (PNG IHDR/IEND, classic TIFF IFD and strip extents, JPEG SOF/EOI; a few hundred bytes).
"""
from __future__ import annotations

import os
import struct
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from kit.errors import DataError
from kit.ids import check_id

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
EXTENSIONS: tuple[str, ...] = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


class ImageReadError(DataError):
    """A channel file that is missing, unreadable, truncated or inconsistent; names the file."""


def channel_path(folder: str | Path, image_id: str, channel: str) -> Path:
    """Path of one channel file, trying each known extension; raises ImageReadError if absent
    (DataError for an ID that is not a file-name stem: `kit.ids`)."""
    folder = Path(folder)
    check_id(image_id)
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


class SampleSource(NamedTuple):
    """What a cache entry made from a sample is tied to: its four channel files as they are now."""

    signature: str  # JSON: [[file name, size, mtime_ns], ...] in channel order
    newest_ns: int  # the latest mtime_ns of the four


def sample_source(folder: str | Path, image_id: str) -> SampleSource:
    """Name, size and mtime of each channel file (ImageReadError naming the first missing one).

    A cache entry stores the signature and is reused only while it still matches, so an entry made
    from a file that was damaged, replaced or copied over is recomputed, never served.
    """
    items = []
    for c in CHANNELS:
        path = channel_path(folder, image_id, c)
        st = path.stat()
        items.append([path.name, st.st_size, st.st_mtime_ns])
    return SampleSource(json.dumps(items, separators=(",", ":")), max(i[2] for i in items))


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


# --------------------------------------------------------------------------------------------
# Image headers: size, depth and integrity without decoding the pixels
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageInfo:
    """What a file's header says: size, bits per sample, samples per pixel, container format."""

    width: int
    height: int
    bit_depth: int
    samples: int
    format: str  # "png", "tiff", "jpeg", or "decoded" when the header was not parsed


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_TIFF_TYPE_SIZE = {1: 1, 3: 2, 4: 4, 16: 8}
_TIFF_TYPE_CODE = {1: "B", 3: "H", 4: "I", 16: "Q"}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def read_image_info(path: str | Path, check_end: bool = True) -> ImageInfo:
    """Read an image file's header (and with `check_end`, check the file is complete).

    Parses PNG, classic TIFF and JPEG headers directly (a few hundred bytes read); any other file
    is decoded with cv2. Raises ImageReadError naming the file when it is missing, empty, not an
    image, or truncated (PNG without IEND, TIFF strips beyond the end, JPEG without EOI).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size == 0:
                raise ImageReadError(f"empty file: {path}")
            head = f.read(64)
            if head.startswith(_PNG_SIGNATURE):
                return _png_info(path, f, head, size, check_end)
            if head[:4] in (b"II*\x00", b"MM\x00*"):
                return _tiff_info(path, f, head, size, check_end)
            if head[:2] == b"\xff\xd8":
                return _jpeg_info(path, f, size, check_end)
    except FileNotFoundError:
        raise ImageReadError(f"missing file: {path}") from None
    except (struct.error, OSError, ValueError) as exc:
        raise ImageReadError(f"unreadable image header ({exc}): {path}") from None
    # Anything else (BigTIFF, other formats, or a non-image): let cv2 decide.
    img = read_channel(path)
    return ImageInfo(img.shape[1], img.shape[0], 16 if img.dtype == np.uint16 else 8, 1, "decoded")


def _png_info(path: Path, f, head: bytes, size: int, check_end: bool) -> ImageInfo:
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise ImageReadError(f"truncated PNG file (no IHDR header): {path}")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if width == 0 or height == 0 or colour not in _PNG_SAMPLES:
        raise ImageReadError(f"invalid PNG header ({width}x{height}, colour type {colour}): {path}")
    if check_end:
        f.seek(max(size - 12, 0))
        if f.read(12) != _PNG_IEND:
            raise ImageReadError(f"truncated PNG file (no IEND chunk): {path}")
    return ImageInfo(width, height, depth, _PNG_SAMPLES[colour], "png")


def _tiff_info(path: Path, f, head: bytes, size: int, check_end: bool) -> ImageInfo:
    order = "<" if head[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", head[4:8])
    if ifd + 2 > size:
        raise ImageReadError(f"truncated TIFF file (first IFD beyond the end): {path}")
    f.seek(ifd)
    (n,) = struct.unpack(order + "H", f.read(2))
    entries = f.read(12 * n)
    if len(entries) < 12 * n:
        raise ImageReadError(f"truncated TIFF file (IFD cut short): {path}")
    tags: dict[int, list[int]] = {}
    for i in range(n):
        tag, typ, count = struct.unpack(order + "HHI", entries[12 * i : 12 * i + 8])
        if typ not in _TIFF_TYPE_SIZE or tag not in (256, 257, 258, 277, 273, 279, 324, 325):
            continue
        nbytes = _TIFF_TYPE_SIZE[typ] * count
        raw = entries[12 * i + 8 : 12 * i + 12]
        if nbytes > 4:
            (offset,) = struct.unpack(order + "I", raw)
            if offset + nbytes > size:
                raise ImageReadError(f"truncated TIFF file (tag {tag} beyond the end): {path}")
            f.seek(offset)
            raw = f.read(nbytes)
        tags[tag] = list(struct.unpack(f"{order}{count}{_TIFF_TYPE_CODE[typ]}", raw[:nbytes]))
    if 256 not in tags or 257 not in tags:
        raise ImageReadError(f"invalid TIFF header (no image width/height): {path}")
    width, height = tags[256][0], tags[257][0]
    depth = tags.get(258, [1])[0]
    samples = tags.get(277, [1])[0]
    if check_end:
        for off_tag, len_tag in ((273, 279), (324, 325)):
            offsets, lengths = tags.get(off_tag, []), tags.get(len_tag, [])
            if offsets and lengths and max(o + c for o, c in zip(offsets, lengths)) > size:
                raise ImageReadError(f"truncated TIFF file (image data beyond the end): {path}")
    return ImageInfo(width, height, depth, samples, "tiff")


def _jpeg_info(path: Path, f, size: int, check_end: bool) -> ImageInfo:
    f.seek(2)
    info = None
    while info is None:
        marker = f.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise ImageReadError(f"truncated or invalid JPEG file (no frame header): {path}")
        code = marker[1]
        if code == 0xFF:  # fill byte
            f.seek(-1, os.SEEK_CUR)
            continue
        if code == 0x01 or 0xD0 <= code <= 0xD7:
            continue
        (length,) = struct.unpack(">H", f.read(2))
        if code in _JPEG_SOF:
            precision, height, width, samples = struct.unpack(">BHHB", f.read(6))
            info = ImageInfo(width, height, precision, samples, "jpeg")
        else:
            f.seek(length - 2, os.SEEK_CUR)
    if check_end:
        f.seek(max(size - 64, 0))
        if not f.read(64).rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise ImageReadError(f"truncated JPEG file (no end-of-image marker): {path}")
    return info


def image_size(folder: str | Path, image_id: str) -> tuple[int, int]:
    """(width, height) of a sample from the header of its first channel file (red first).

    Raises ImageReadError naming the file when no channel file exists or the header is unreadable.
    """
    folder = Path(folder)
    check_id(image_id)
    for channel in CHANNELS:
        for ext in EXTENSIONS:
            path = folder / f"{image_id}_{channel}{ext}"
            if path.is_file():
                info = read_image_info(path, check_end=False)
                return info.width, info.height
    raise ImageReadError(f"missing channel file: {folder / f'{image_id}_red.png'}")

