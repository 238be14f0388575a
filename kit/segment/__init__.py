"""Nucleus and cell segmentation behind one interface, with a registry of backends.

    nuclei, cells = segment_image(image, backend="classical", **options)

Input: an (H, W, 4) uint8 or uint16 RGBY array as `kit.images.read_sample` returns it
(red = microtubules, green = protein, blue = nuclei, yellow = ER).
Output: two int32 label images of shape (H, W) at the image's full resolution. Background is 0,
ids run 1..N without gaps, and cell k contains nucleus k (every returned cell has a nucleus;
cells whose nucleus was lost are dropped). An image without cells (blank, or pure noise) gives two
all-zero images, never an error.

Backends (`available_backends()`):
- ``classical`` (default, `kit.segment.classical`): thresholds and seeded watershed at reduced
  scale; needs no weights; about 0.1-0.3 s per 2048 px image on one core.
- ``hpacellseg`` (`kit.segment.hpacellseg`): the HPA Cell Segmentator (DPN U-Nets), when the
  package and its two weight files are installed; see that module for installation.

A backend is a function ``fn(image, **options) -> (nuclei, cells)`` registered by name:

    from kit.segment import register_backend

    @register_backend("mymodel")
    def segment_mymodel(image, *, threshold=0.5):
        ...
        return nuclei, cells

Keyword-only parameters with defaults are the backend's options; their resolved values key the mask
cache (`kit.segment.cache.MaskCache`). A backend may attach ``fn.batch(images, **options) -> list``
to process several images per call (used by `segment_images`), and ``fn.cache_key(options) -> dict``
to say which options change its output (e.g. to hash weight files by name and size, not by path),
and ``fn.check(options)`` to fail before a long run starts (missing package or weights).
`segment_image` checks and repairs every backend's output (shape, dtype, id matching, contiguous
ids), so a new backend only has to return plausible labels.
"""
from __future__ import annotations

import importlib
import inspect
import math
from typing import Callable, Iterable

import numpy as np

from kit.errors import ConfigError, DataError, clip
from kit.segment.quality import instance_f1, match_instances

__all__ = [
    "segment_image",
    "segment_images",
    "register_backend",
    "get_backend",
    "available_backends",
    "backend_options",
    "finalize_labels",
    "check_image",
    "instance_f1",
    "match_instances",
]

Backend = Callable[..., "tuple[np.ndarray, np.ndarray]"]

_REGISTRY: dict[str, Backend] = {}
# Built-in backends live in their own modules, imported on first use (hpacellseg imports torch).
_BUILTIN = {"classical": "kit.segment.classical", "hpacellseg": "kit.segment.hpacellseg"}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    """Decorator registering ``fn(image, **options) -> (nuclei, cells)`` under `name`."""

    def deco(fn: Backend) -> Backend:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_backend(name: str) -> Backend:
    """The backend function registered as `name` (imports built-in backends on demand)."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown segmentation backend {clip(name)}; available: {', '.join(available_backends())} "
            "(register your own with kit.segment.register_backend)"
        )
    return _REGISTRY[name]


def available_backends() -> list[str]:
    """Names of the built-in and registered backends."""
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def backend_options(name: str, options: dict | None = None) -> dict:
    """The backend's default options updated with `options`; unknown option names raise ConfigError."""
    fn = get_backend(name)
    defaults = {
        p.name: p.default
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty
    }
    options = dict(options or {})
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    unknown = sorted(set(options) - set(defaults))
    if unknown and not takes_any:
        raise ConfigError(
            f"unknown option(s) {', '.join(clip(u) for u in unknown)} for segmentation backend {clip(name)}; "
            f"known: {', '.join(sorted(defaults)) or 'none'}"
        )
    for key, value in options.items():
        if key in defaults:
            options[key] = _option_value(name, key, value, defaults[key])
    return {**defaults, **options}


def _option_value(backend: str, key: str, value, default):
    """`value` checked against the type of the option's default (a float option takes any finite
    number and becomes a float, so ``scale=1`` and ``scale=1.0`` share a cache key)."""
    def bad(expected: str):
        return ConfigError(f"option {key} of segmentation backend {backend!r}: expected {expected}, got {clip(value)}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    return value  # text and None defaults: the backend checks (e.g. hpacellseg's padding "auto" or a bool)


def check_image(image: np.ndarray) -> np.ndarray:
    """Check that `image` is an (H, W, 4) uint8/uint16 RGBY array; raises DataError otherwise."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 4:
        raise DataError(f"expected an (H, W, 4) RGBY image as read_sample returns, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise DataError(f"expected a uint8 or uint16 image, got {image.dtype}")
    return image


def segment_image(image: np.ndarray, backend: str = "classical", **options) -> tuple[np.ndarray, np.ndarray]:
    """Segment one RGBY image into (nuclei, cells) int32 label images (see the module docstring)."""
    image = check_image(image)
    fn = get_backend(backend)
    if image.shape[0] == 0 or image.shape[1] == 0:
        empty = np.zeros(image.shape[:2], np.int32)
        return empty, empty.copy()
    nuclei, cells = fn(image, **options)
    return finalize_labels(nuclei, cells, image.shape[:2], backend=backend)


def segment_images(
    images: Iterable[np.ndarray], backend: str = "classical", **options
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segment several images; uses the backend's ``batch`` function when it has one."""
    images = [check_image(im) for im in images]
    fn = get_backend(backend)
    batch = getattr(fn, "batch", None)
    if batch is None:
        return [segment_image(im, backend, **options) for im in images]
    results = batch(images, **options)
    return [finalize_labels(n, c, im.shape[:2], backend=backend) for (n, c), im in zip(results, images)]


def finalize_labels(
    nuclei: np.ndarray, cells: np.ndarray, shape: tuple[int, int], backend: str = "?"
) -> tuple[np.ndarray, np.ndarray]:
    """Enforce the output contract on a backend's labels.

    Nucleus pixels take the id of the cell they lie in (pixels outside every cell are dropped), cells
    without any nucleus pixel are dropped, and the remaining ids are renumbered 1..N in the order
    of their old ids. Returns int32 arrays.
    """
    nuclei = np.asarray(nuclei)
    cells = np.asarray(cells)
    if nuclei.shape != tuple(shape) or cells.shape != tuple(shape):
        raise ValueError(
            f"backend {backend!r} returned labels of shape {nuclei.shape} / {cells.shape} "
            f"for an image of shape {tuple(shape)}"
        )
    cells = cells.astype(np.int32, copy=False)
    if cells.size == 0 or cells.max(initial=0) <= 0:
        return np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    if cells.min() < 0:
        raise ValueError(f"backend {backend!r} returned negative cell labels")
    in_nucleus = (nuclei > 0) & (cells > 0)
    n_max = int(cells.max())
    present = np.bincount(cells.ravel(), minlength=n_max + 1) > 0
    has_nucleus = np.bincount(cells[in_nucleus], minlength=n_max + 1) > 0
    keep = present & has_nucleus
    keep[0] = False
    n_keep = int(keep.sum())
    if n_keep == n_max and keep[1:].all():  # already contiguous: skip the lookup (full-res, ~30 ms)
        new_cells = cells
    else:
        lut = np.zeros(n_max + 1, np.int32)
        lut[keep] = np.arange(1, n_keep + 1, dtype=np.int32)
        new_cells = lut[cells]
    new_nuclei = np.where(in_nucleus, new_cells, 0).astype(np.int32, copy=False)
    return new_nuclei, np.ascontiguousarray(new_cells)
