"""The run manifest: what a run was made from, written once by `train`, read by every later stage.

``RUN_DIR/manifest.json`` (JSON, written atomically by `kit.train.train_all` before the first fold)::

    kit_version   the kit that trained the run
    created       UTC time of writing
    data_dir      the dataset (Kaggle layout); images_dir its train images; labels_file train.csv
    extra_images_dirs  more folders of train images (external data); `image_folders()` = all of them
    folds_file    ID,fold table; folds_sha256 its sha256; folds the folds the run trains
    mask_cache    the mask cache folder the models' cells come from (<root>/<backend>-<key>),
                  mask_backend and mask_params (the backend's resolved options)
    tile_dir      the cell tiles (<root>/tiles-<S>-<key>), tile_size, mask_others
    field_dir     the downscaled fields (<root>/fields-<S>-<key>), field_size

`config.yaml` beside it holds the settings as the user gave them (written once, never rewritten);
the manifest holds what those settings resolved to. `combine` (the OOF cells and their truth),
`predict` (folds, segmentation backend and options, tile and field sizes), the ceilings and the
Kaggle kernels read run inputs only through `read_manifest`. For a run folder made before the
manifest existed, `read_manifest` derives the same record from its config.yaml (``legacy``).

`resolve_inputs(cfg)` is the one mapping from a config to these folders; the pipeline, `train`
and `train_fold` all use it, so they agree on where every stage file lives.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from kit.errors import ConfigError, KitError

__all__ = ["MANIFEST_NAME", "RunManifest", "resolve_inputs", "write_manifest", "read_manifest"]

MANIFEST_NAME = "manifest.json"
# Keys that must agree for a rerun into the same run folder (paths may move, e.g. to a Kaggle kernel).
_CONTENT_KEYS = ("folds_sha256", "folds", "mask_backend", "mask_params", "tile_size", "mask_others", "field_size")


@dataclass
class RunManifest:
    """One run's inputs (see the module docstring)."""

    data_dir: str
    images_dir: str
    labels_file: str
    folds_file: str
    folds_sha256: str
    folds: list[int] | None  # None: unknown (legacy run without a folds file)
    mask_cache: str
    mask_backend: str
    mask_params: dict
    tile_dir: str
    tile_size: int
    field_dir: str
    field_size: int
    mask_others: bool = True
    extra_images_dirs: list[str] = field(default_factory=list)
    kit_version: str = ""
    created: str = ""
    legacy: bool = field(default=False, compare=False)

    def masks(self, root: str | Path | None = None):
        """The run's `kit.segment.cache.MaskCache`: its own folder, or under `root` (another machine's
        cache for the same backend and options, e.g. a Kaggle kernel's scratch folder)."""
        from kit.segment.cache import MaskCache

        if root is not None:
            return MaskCache(root, self.mask_backend, self.mask_params)
        return MaskCache(Path(self.mask_cache).parent, self.mask_backend, self.mask_params, folder=self.mask_cache)

    def image_folders(self):
        """The train images' folders as one lookup (`kit.layout.ImageFolders`): images_dir first."""
        from kit.layout import ImageFolders

        return ImageFolders([self.images_dir, *self.extra_images_dirs])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("legacy")
        return d


def _run_folds(cfg, folds_file: Path) -> list[int]:
    """The folds `cfg.train.folds` selects from the folds file; ConfigError for a fold it lacks."""
    from kit import folds as kfolds

    table = kfolds.load_folds(folds_file)
    available = sorted(int(f) for f in table["fold"].unique())
    wanted = cfg.train.folds
    if wanted == "all":
        return available
    unknown = sorted(set(int(f) for f in wanted) - set(available))
    if unknown:
        raise ConfigError(f"config key train.folds: fold(s) {', '.join(map(str, unknown))} not in {folds_file} "
                          f"(it has folds {', '.join(map(str, available))})")
    return sorted(set(int(f) for f in wanted))


def resolve_inputs(cfg, *, folds: bool = True) -> RunManifest:
    """The stage folders and fold list a config resolves to (nothing is written).

    `folds=False` skips reading the folds file (for callers that only need the cache folders).
    """
    from kit import __version__
    from kit.cells import find_tile_dir
    from kit.folds import file_sha256
    from kit.fields import field_cache_dir
    from kit.segment.cache import MaskCache

    d = cfg.data
    masks = MaskCache(d.mask_cache, d.segment_backend)
    tile_dir, _ = find_tile_dir(d.tile_cache, d.tile_size, masks)
    folds_file = Path(d.folds_file) if d.folds_file else None
    run_folds, digest = None, ""
    if folds:
        if folds_file is None:
            raise ConfigError("config key data.folds_file is not set: make folds first "
                              f"(python -m kit folds --labels {d.labels_path} --out folds/NAME.csv)")
        if not folds_file.is_file():
            raise ConfigError(f"config key data.folds_file: {folds_file} not found")
        run_folds, digest = _run_folds(cfg, folds_file), file_sha256(folds_file)
    return RunManifest(
        data_dir=str(Path(d.data_dir).resolve()), images_dir=str(Path(d.images_dir).resolve()),
        labels_file=str(d.labels_path.resolve()), folds_file=str(folds_file.resolve()) if folds_file else "",
        folds_sha256=digest, folds=run_folds, mask_cache=str(masks.dir.resolve()), mask_backend=masks.backend,
        mask_params=json.loads(json.dumps(masks.params, default=str)), tile_dir=str(tile_dir.resolve()),
        tile_size=int(d.tile_size), field_dir=str(field_cache_dir(d.field_cache, d.field_size, d.image_folders).resolve()),
        field_size=int(d.field_size), extra_images_dirs=[str(Path(p).resolve()) for p in d.extra_images],
        kit_version=__version__,
    )


def write_manifest(run_dir: str | Path, manifest: RunManifest) -> Path:
    """Write ``RUN_DIR/manifest.json`` once. A rerun with the same inputs leaves it as it is; other
    inputs (other folds, segmentation, sizes) are a ConfigError naming what differs."""
    from kit.atomic import atomic_open

    path = Path(run_dir) / MANIFEST_NAME
    if path.is_file():
        old = read_manifest(run_dir)
        changed = [k for k in _CONTENT_KEYS if getattr(old, k) != getattr(manifest, k)]
        if changed:
            raise ConfigError(f"{path}: this run was made from other inputs ({', '.join(changed)} differ); "
                              "a run folder keeps its inputs: use a new run folder")
        return path
    manifest.created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    with atomic_open(path, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2)
        f.write("\n")
    return path


def read_manifest(run_dir: str | Path) -> RunManifest:
    """The run's manifest; for a run folder without one, derived from its config.yaml (legacy)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            known = {f.name for f in fields(RunManifest)}
            return RunManifest(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as exc:
            raise KitError(f"{path}: not a kit run manifest ({exc})") from None
    return _legacy_manifest(run_dir)


def _legacy_manifest(run_dir: Path) -> RunManifest:
    """What a run folder from before the manifest used: its config.yaml, and the mask folder its
    tile cache's ``params.json`` pinned (the pipeline then pointed data.tile_cache at the tiles)."""
    from kit.config import load_config
    from kit.folds import file_sha256

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise KitError(f"{cfg_path} not found: is {run_dir} a run folder (train writes it)?")
    cfg = load_config(cfg_path)
    m = resolve_inputs(cfg, folds=False)
    tiles = Path(cfg.data.tile_cache)
    if next(tiles.glob("*.npy"), None) is not None:
        m.tile_dir = str(tiles)
    params = tiles / "params.json"
    if params.is_file():
        try:
            info = json.loads(params.read_text())
        except ValueError:
            info = {}
        pinned = Path(info.get("mask_cache", ""))
        if info.get("mask_cache") and pinned.is_dir() and info.get("backend") == m.mask_backend:
            m.mask_cache, m.mask_params = str(pinned), info.get("backend_params", m.mask_params)
    folds_file = Path(cfg.data.folds_file) if cfg.data.folds_file else None
    if folds_file is not None and folds_file.is_file():
        try:
            m.folds, m.folds_sha256 = _run_folds(cfg, folds_file), file_sha256(folds_file)
        except KitError:
            m.folds = None
    m.kit_version, m.legacy = "unknown (no manifest.json)", True
    return m
