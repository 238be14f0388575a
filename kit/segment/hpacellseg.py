"""Backend ``hpacellseg``: the HPA Cell Segmentator (the segmentation most HPA 2021 teams used).

Installing (it is not on PyPI):
  pip install --no-deps /path/to/HPA-Cell-Segmentation.zip    (or its wheel; source:
  https://github.com/CellProfiling/HPA-Cell-Segmentation). On Kaggle, attach a dataset holding the
  wheel/zip and install it in the notebook with ``pip install --no-deps /kaggle/input/<dataset>/...``.
Weights (two files, never downloaded here): ``nuclei-model.pth`` and ``cell-model.pth`` (the 3-channel
cell model) in one folder, given by ``--option weights_dir=DIR`` or the environment variable
``KIT_HPACELLSEG_WEIGHTS``; or each file by ``nuclei_model=PATH`` / ``cell_model=PATH``.

How it is called (the package's public API):
  seg = hpacellseg.cellsegmentator.CellSegmentator(nuclei_model, cell_model, scale_factor=0.25,
                                                   device=..., padding=..., multi_channel_model=True)
  nuc_preds = seg.pred_nuclei([blue, ...])
  cell_preds = seg.pred_cells([[red, ...], [yellow, ...], [blue, ...]])
  nuclei, cells = hpacellseg.utils.label_cell(nuc_preds[i], cell_preds[i])
Traps handled here:
- It downloads weights when a path does not exist: the paths are checked first, and the models are
  loaded here (``torch.load(..., weights_only=False)``; recent torch refuses the package's pickled
  models otherwise) and handed over as objects, so it never sees a path.
- Its U-Nets need sides divisible by 32 after scaling: 1728 px * 0.25 = 432 is not, so
  ``padding="auto"`` turns padding on for such shapes.
- `label_cell` uses fixed full-resolution pixel thresholds (nuclei >= 2500 px, cells >= 5500 px):
  images are always passed at full resolution (`scale_factor` is applied inside the package).
- It handles one image shape per call: images are grouped by shape.
- It is slow on CPU (tens of seconds per 2048 px image): a warning says so once.
Channels are passed as uint8 (16-bit input goes through `kit.images.to_uint8`), as it was trained on.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from kit.errors import ConfigError, KitError
from kit.images import to_uint8
from kit.segment import register_backend

__all__ = ["segment_hpacellseg", "INSTALL_HINT", "WEIGHT_FILES"]

WEIGHT_FILES = ("nuclei-model.pth", "cell-model.pth")
WEIGHTS_ENV = "KIT_HPACELLSEG_WEIGHTS"
INSTALL_HINT = (
    "the hpacellseg backend needs the HPA Cell Segmentator package, which is not on PyPI: "
    "install it with `pip install --no-deps <path to the HPA-Cell-Segmentation wheel or zip>` "
    "(source: https://github.com/CellProfiling/HPA-Cell-Segmentation; on Kaggle attach a dataset "
    "holding the wheel and pip install it from /kaggle/input/...), and put its weights "
    f"{WEIGHT_FILES[0]} and {WEIGHT_FILES[1]} in a folder given by --option weights_dir=DIR or "
    f"${WEIGHTS_ENV}; or use --backend classical, which needs neither"
)

_SEGMENTATORS: dict[tuple, object] = {}  # constructed once per process per setting (models are big)
_warned_cpu = False


def _import_package():
    try:
        from hpacellseg import cellsegmentator, utils
    except ImportError as exc:
        raise KitError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return cellsegmentator, utils


def _weight_paths(weights_dir, nuclei_model, cell_model) -> tuple[Path, Path]:
    folder = weights_dir or os.environ.get(WEIGHTS_ENV)
    paths = []
    for given, name in ((nuclei_model, WEIGHT_FILES[0]), (cell_model, WEIGHT_FILES[1])):
        if given:
            paths.append(Path(given).expanduser())
        elif folder:
            paths.append(Path(folder).expanduser() / name)
        else:
            raise ConfigError(
                f"hpacellseg needs its weight files {WEIGHT_FILES[0]} and {WEIGHT_FILES[1]}: pass "
                f"--option weights_dir=DIR (or set ${WEIGHTS_ENV}); they are never downloaded"
            )
    for p in paths:
        if not p.is_file():
            # The package would try to download to this path; we are offline, so refuse here.
            raise ConfigError(
                f"hpacellseg weight file not found: {p} (expected {WEIGHT_FILES[0]} and {WEIGHT_FILES[1]}; "
                "attach them, e.g. as a Kaggle dataset, and point weights_dir at their folder)"
            )
    return paths[0], paths[1]


def _resolve_device(device: str) -> str:
    from kit.device import resolve_device

    return str(resolve_device(device))


def _get_segmentator(nuclei_path: Path, cell_path: Path, device: str, scale_factor: float, padding: bool,
                     multi_channel_model: bool):
    global _warned_cpu
    key = (str(nuclei_path), str(cell_path), device, float(scale_factor), bool(padding), bool(multi_channel_model))
    if key in _SEGMENTATORS:
        return _SEGMENTATORS[key]
    cellsegmentator, _ = _import_package()
    import torch

    if device == "cpu" and not _warned_cpu:
        warnings.warn("hpacellseg runs on the CPU: expect tens of seconds per 2048 px image "
                      "(use a GPU, or --backend classical)", stacklevel=3)
        _warned_cpu = True
    # Loaded here, not by the package: it would download missing files, and recent torch's
    # weights_only default refuses its pickled models.
    models = [torch.load(str(p), map_location=device, weights_only=False) for p in (nuclei_path, cell_path)]
    seg = cellsegmentator.CellSegmentator(
        models[0], models[1], scale_factor=scale_factor, device=device, padding=padding,
        multi_channel_model=multi_channel_model,
    )
    _SEGMENTATORS[key] = seg
    return seg


def _needs_padding(shape: tuple[int, int], scale_factor: float) -> bool:
    return any(round(s * scale_factor) % 32 for s in shape)


def _fix_shape(pred: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The package resizes predictions back with (rows, cols) swapped; undo that for non-square images."""
    if pred.shape[:2] == tuple(shape):
        return pred
    import cv2

    return cv2.resize(pred, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def _run_group(seg, utils, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One call of the package for images of one shape."""
    shape = images[0].shape[:2]
    red = [to_uint8(im[..., 0]) for im in images]
    yellow = [to_uint8(im[..., 3]) for im in images]
    blue = [to_uint8(im[..., 2]) for im in images]
    try:
        nuc_preds = seg.pred_nuclei(blue)
        cell_preds = seg.pred_cells([red, yellow, blue])
        out = []
        for n_pred, c_pred in zip(nuc_preds, cell_preds):
            nuclei, cells = utils.label_cell(_fix_shape(np.asarray(n_pred), shape), _fix_shape(np.asarray(c_pred), shape))
            out.append((np.asarray(nuclei), np.asarray(cells)))
    except (AttributeError, TypeError) as exc:
        text = str(exc)
        if "multichannel" in text or "np.bool" in text or "'bool'" in text:
            raise KitError(
                f"the installed hpacellseg is too old for this scikit-image/numpy ({exc}); install a "
                "release that supports scikit-image >= 0.19 and numpy >= 1.24"
            ) from exc
        raise
    if len(out) != len(images):
        raise KitError(f"hpacellseg returned {len(out)} results for {len(images)} images")
    return out


def _batch(
    images: list[np.ndarray],
    *,
    weights_dir: str | None = None,
    nuclei_model: str | None = None,
    cell_model: str | None = None,
    device: str = "auto",
    scale_factor: float = 0.25,
    padding: str | bool = "auto",
    multi_channel_model: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Segment a list of images, one package call per image shape; results in input order."""
    if not images:
        return []
    _, utils = _import_package()
    nuclei_path, cell_path = _weight_paths(weights_dir, nuclei_model, cell_model)
    device = _resolve_device(device)
    results: list = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for shape, idx in groups.items():
        pad = _needs_padding(shape, scale_factor) if padding == "auto" else bool(padding)
        seg = _get_segmentator(nuclei_path, cell_path, device, scale_factor, pad, multi_channel_model)
        for i, res in zip(idx, _run_group(seg, utils, [images[i] for i in idx])):
            results[i] = res
    return results


@register_backend("hpacellseg")
def segment_hpacellseg(
    image: np.ndarray,
    *,
    weights_dir: str | None = None,
    nuclei_model: str | None = None,
    cell_model: str | None = None,
    device: str = "auto",
    scale_factor: float = 0.25,
    padding: str | bool = "auto",
    multi_channel_model: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one RGBY image with the HPA Cell Segmentator (see the module docstring)."""
    return _batch([image], weights_dir=weights_dir, nuclei_model=nuclei_model, cell_model=cell_model,
                  device=device, scale_factor=scale_factor, padding=padding,
                  multi_channel_model=multi_channel_model)[0]


def _cache_key(options: dict) -> dict:
    """Options that change the output: weight files by name and size (not where they live), no device."""
    key = {k: v for k, v in options.items() if k not in ("weights_dir", "nuclei_model", "cell_model", "device")}
    try:
        n, c = _weight_paths(options.get("weights_dir"), options.get("nuclei_model"), options.get("cell_model"))
        key["weights"] = [(p.name, p.stat().st_size) for p in (n, c)]
    except KitError:
        key["weights"] = None
    return key


def _check(options: dict) -> None:
    """Fail early: the package imports and both weight files exist."""
    _import_package()
    _weight_paths(options.get("weights_dir"), options.get("nuclei_model"), options.get("cell_model"))


segment_hpacellseg.batch = _batch
segment_hpacellseg.check = _check
segment_hpacellseg.cache_key = _cache_key
