"""Backend ``hpacellseg``: the HPA Cell Segmentator (the segmentation most HPA 2021 teams used).

Installing, offline (it is not on PyPI; its last release 0.1.8 names `pytorch_zoo` by a git URL,
which fails offline). On a machine with internet, once, build two wheels from the public sources:

    git clone https://github.com/CellProfiling/HPA-Cell-Segmentation      # release 0.1.8, Apache-2.0
    git clone https://github.com/haoxusci/pytorch_zoo                     # the DPN U-Net code
    sed -i '1i import setuptools' pytorch_zoo/setup.py                    # its setup.py lacks the import
    pip wheel --no-deps -w hpacellseg-wheels ./HPA-Cell-Segmentation ./pytorch_zoo

and fetch the two weight files of Zenodo record 4665863, saved as ``nuclei-model.pth`` and
``cell-model.pth`` (the 3-channel cell model). Then, offline (a Kaggle kernel: attach both folders
as datasets):

    pip install --no-deps hpacellseg-wheels/*.whl      # --no-deps: its other needs are the kit's own
    kit segment --images DIR --out MASKS --backend hpacellseg --option weights_dir=WEIGHTS_DIR

The weights folder is given by ``--option weights_dir=DIR`` or ``$KIT_HPACELLSEG_WEIGHTS``, or
each file by ``nuclei_model=PATH`` / ``cell_model=PATH``. A missing package, a missing
`pytorch_zoo` or a missing weight file is reported by name before the first image.

How it is called (the package's public API):
  seg = hpacellseg.cellsegmentator.CellSegmentator(nuclei_model, cell_model, scale_factor=0.25,
                                                   device=..., padding=..., multi_channel_model=True)
  nuc_preds = seg.pred_nuclei([blue, ...])
  cell_preds = seg.pred_cells([[red, ...], [yellow, ...], [blue, ...]])
  nuclei, cells = hpacellseg.utils.label_cell(nuc_preds[i], cell_preds[i])

Release 0.1.8 on the kit's pinned stack, and what this adapter does about it (no code of the
package is copied; compat shims are set on the package's own module globals for the duration of
one call and restored afterwards, never on numpy/scikit-image/torch themselves):
- ``skimage.transform.rescale(..., multichannel=True)``: the argument is gone since scikit-image
  0.19; the package's ``transform`` is swapped for a wrapper that passes ``channel_axis=-1``.
- ``np.bool`` in `label_cell`: removed in NumPy 1.24-1.26 (back as an alias in 2.x); where the
  package's ``np`` lacks it, it gets a numpy view that has it.
- ``remove_small_objects(x, n)`` / ``remove_small_holes(x, n)``: positional `min_size` /
  `area_threshold` are deprecated in scikit-image 0.26 in favour of `max_size` (which removes
  objects up to and including its value): they are translated to ``max_size=n - 1``.
- Its weight files are whole pickled models: recent torch refuses them unless
  ``weights_only=False``. The models are loaded here (only from the paths given: the package
  would download a missing file) and handed over as objects; unpickling needs `pytorch_zoo`
  importable (a clear error says so); attributes that newer torch modules expect on old pickles
  are filled in; a DataParallel wrapper is removed; the models are put in eval mode.
- Its U-Nets need sides divisible by 32 after scaling: 1728 px * 0.25 = 432 is not, so
  ``padding="auto"`` turns padding on for such shapes (without it, 1728 px fields crash).
- It resizes predictions back with (rows, cols) swapped; non-square images are resized back here.
- `label_cell` uses fixed full-resolution pixel thresholds (nuclei >= 2500 px, cells >= 5500 px):
  images are always passed at full resolution (`scale_factor` is applied inside the package).
- It handles one image shape per call: images are grouped by shape.
- It is slow on CPU (tens of seconds per 2048 px image): a warning says so once.
Channels are passed as uint8 (16-bit input goes through `kit.images.to_uint8`), as it was trained on.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import pickle
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
    "install its wheel and the pytorch_zoo wheel with `pip install --no-deps <HPA-Cell-Segmentation "
    "wheel> <pytorch_zoo wheel>` (build them once with `pip wheel --no-deps` from "
    "https://github.com/CellProfiling/HPA-Cell-Segmentation and https://github.com/haoxusci/pytorch_zoo; "
    "on Kaggle attach a dataset holding the wheels and pip install them from /kaggle/input/...), and put "
    f"its weights {WEIGHT_FILES[0]} and {WEIGHT_FILES[1]} (Zenodo record 4665863) in a folder given by "
    f"--option weights_dir=DIR or ${WEIGHTS_ENV}; see kit/segment/hpacellseg.py. "
    "Or use --backend classical, which needs neither"
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
                f"hpacellseg needs its weight files {WEIGHT_FILES[0]} and {WEIGHT_FILES[1]} (Zenodo record "
                f"4665863): pass --option weights_dir=DIR (or set ${WEIGHTS_ENV}); they are never downloaded"
            )
    missing = [p for p in paths if not p.is_file()]
    if missing:
        # The package would try to download to such a path; we are offline, so refuse here.
        raise ConfigError(
            "hpacellseg weight file not found: " + ", ".join(str(p) for p in missing)
            + f" (expected {WEIGHT_FILES[0]} and {WEIGHT_FILES[1]} from Zenodo record 4665863; attach "
            "them, e.g. as a Kaggle dataset, and point weights_dir at their folder)"
        )
    return paths[0], paths[1]


# ------------------------------------------------------------------ compat shims for release 0.1.8

class _RescaleCompat:
    """The package's ``skimage.transform`` with ``rescale(multichannel=...)`` translated."""

    def __init__(self, transform):
        self._transform = transform

    def __getattr__(self, name):
        return getattr(self._transform, name)

    def rescale(self, image, scale, *args, multichannel=None, **kwargs):
        if multichannel is not None and "channel_axis" not in kwargs:
            kwargs["channel_axis"] = -1 if multichannel else None
        return self._transform.rescale(image, scale, *args, **kwargs)


class _NumpyWithBool:
    """numpy as the package sees it, with the ``np.bool`` alias that NumPy 1.24-1.26 removed."""

    bool = bool

    def __init__(self, np_module):
        self._np = np_module

    def __getattr__(self, name):
        return getattr(self._np, name)


def _max_size_compat(fn):
    """``fn(ar, n)`` with positional min_size / area_threshold -> ``fn(ar, max_size=n - 1)``."""

    def call(ar, size=None, *args, **kwargs):
        if size is not None and "max_size" not in kwargs:
            kwargs["max_size"] = max(int(size) - 1, 0)  # old: removed < n; max_size removes <= its value
        return fn(ar, *args, **kwargs)

    return call


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _compat(cellsegmentator, utils):
    """Run the package on current libraries: shims on its module globals, restored on exit."""
    saved = []

    def swap(module, name, value):
        saved.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    try:
        transform = getattr(cellsegmentator, "transform", None)
        if transform is not None and not _takes(transform.rescale, "multichannel"):
            swap(cellsegmentator, "transform", _RescaleCompat(transform))
        np_module = getattr(utils, "np", None)
        if np_module is not None and not hasattr(np_module, "bool"):
            swap(utils, "np", _NumpyWithBool(np_module))
        for name in ("remove_small_objects", "remove_small_holes"):
            fn = getattr(utils, name, None)
            if fn is not None and _takes(fn, "max_size"):
                swap(utils, name, _max_size_compat(fn))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _load_model(path: Path, device: str):
    """One of the package's whole-model pickles, loaded without its download or torch's refusal."""
    import torch

    try:
        model = torch.load(str(path), map_location=device, weights_only=False)
    except ModuleNotFoundError as exc:
        raise KitError(
            f"{path}: the pickled model needs the module {exc.name!r}, which is not installed: install "
            "the pytorch_zoo wheel with `pip install --no-deps` (see kit/segment/hpacellseg.py)"
        ) from exc
    except (pickle.UnpicklingError, EOFError, RuntimeError, AttributeError) as exc:
        raise KitError(f"{path}: not a loadable HPA Cell Segmentator model file ({exc})") from exc
    if isinstance(model, torch.nn.DataParallel):
        model = model.module
    if not isinstance(model, torch.nn.Module):
        raise KitError(f"{path}: expected a whole pickled model (as on Zenodo record 4665863), "
                       f"got a {type(model).__name__}")
    for m in model.modules():  # attributes newer torch expects on modules pickled by old versions
        if isinstance(m, torch.nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None
        if isinstance(m, torch.nn.modules.conv._ConvNd) and not hasattr(m, "padding_mode"):
            m.padding_mode = "zeros"
    return model.eval()


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

    if device == "cpu" and not _warned_cpu:
        warnings.warn("hpacellseg runs on the CPU: expect tens of seconds per 2048 px image "
                      "(use a GPU, or --backend classical)", stacklevel=3)
        _warned_cpu = True
    # Loaded here, not by the package: it would download missing files, and recent torch's
    # weights_only default refuses its pickled models.
    models = [_load_model(p, device) for p in (nuclei_path, cell_path)]
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


def _run_group(seg, cellsegmentator, utils, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One call of the package for images of one shape."""
    shape = images[0].shape[:2]
    red = [to_uint8(im[..., 0]) for im in images]
    yellow = [to_uint8(im[..., 3]) for im in images]
    blue = [to_uint8(im[..., 2]) for im in images]
    with _compat(cellsegmentator, utils):
        nuc_preds = seg.pred_nuclei(blue)
        cell_preds = seg.pred_cells([red, yellow, blue])
        out = []
        for n_pred, c_pred in zip(nuc_preds, cell_preds):
            nuclei, cells = utils.label_cell(_fix_shape(np.asarray(n_pred), shape), _fix_shape(np.asarray(c_pred), shape))
            out.append((np.asarray(nuclei), np.asarray(cells)))
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
    cellsegmentator, utils = _import_package()
    nuclei_path, cell_path = _weight_paths(weights_dir, nuclei_model, cell_model)
    device = _resolve_device(device)
    results: list = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for shape, idx in groups.items():
        pad = _needs_padding(shape, scale_factor) if padding == "auto" else bool(padding)
        seg = _get_segmentator(nuclei_path, cell_path, device, scale_factor, pad, multi_channel_model)
        for i, res in zip(idx, _run_group(seg, cellsegmentator, utils, [images[i] for i in idx])):
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
    """Fail early: the package and pytorch_zoo import, and both weight files exist."""
    _import_package()
    try:
        importlib.import_module("pytorch_zoo")
    except ImportError:
        raise KitError(f"pytorch_zoo, which the HPA Cell Segmentator's model files need, is not installed; {INSTALL_HINT}") from None
    _weight_paths(options.get("weights_dir"), options.get("nuclei_model"), options.get("cell_model"))


segment_hpacellseg.batch = _batch
segment_hpacellseg.check = _check
segment_hpacellseg.cache_key = _cache_key
