"""Typed run configuration: YAML -> dataclasses, command-line overrides, resolved YAML out.

File format (YAML, every section and key optional; unknown keys are an error naming the key)::

    data:        {data_dir: data/synth, folds_file: folds/synth.csv, tile_size: 96, field_size: 256,
                  train_csv: ext/train_all.csv, extra_images: [ext/images]}   # Kaggle + external images
    model:       {backbone: resnet18}          # shorthand: applied to cell_model AND image_model
    cell_model:  {backbone: resnet50, pretrained: weights/resnet50-0676ba61.pth, dropout: 0.2}
    image_model: {batch_size: 8}               # per-model overrides of train.batch_size/epochs/lr
    train:       {epochs: 10, lr: 1.0e-3, loss: bce, folds: all, cell_mode: mil, pseudo_rounds: 1}
    predict:     {tta: 2, batch_size: 64}
    cells:       {border_nucleus_fraction: 0.5}    # the cell policy (kit.cell_policy)
    run_dir: runs/exp1

Overrides use the same dotted keys, e.g. ``train.epochs=3 model.backbone=resnet18 train.folds=[0,1]``;
values are parsed as YAML scalars/lists and checked against the field's type. Relative paths are
relative to the working directory. `load_config(..., explicit=keys)` also records which dotted keys
the file and the overrides set (a value equal to its default is still the user's choice).
`save_config` writes the fully resolved config (every key, ``cell_model``/``image_model`` spelled
out), so ``--config RUN_DIR/config.yaml`` reproduces a run; `kit.train` writes a run's
config.yaml once, and what the settings resolved to goes into its manifest (`kit.manifest`).
Presets ship inside the package (``kit/configs/<name>.yaml``): ``--config cpu`` or
``preset_path("default")``, so an installed kit has them too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kit.atomic import atomic_open
from kit.errors import ConfigError, clip


@dataclass
class DataConfig:
    """Where the inputs live and how they are cut into model inputs."""

    data_dir: str = "data"
    train_csv: str = ""  # "" -> <data_dir>/train.csv
    images_subdir: str = "train"
    extra_images: list[str] = field(default_factory=list)  # more train image folders (e.g. external images)
    folds_file: str = ""  # folds/<name>.csv (ID,fold); required by `train`
    mask_cache: str = "cache/masks"
    tile_cache: str = "cache/tiles"  # root of the tile cache: holds tiles-<size>-<key>/ folders (kit.cells)
    field_cache: str = "cache/fields"  # downscaled whole fields for the image model
    segment_backend: str = "classical"
    tile_size: int = 128  # cell tile side in px (model input of the cell model)
    field_size: int = 512  # whole field downscaled to this side (model input of the image model)
    single_label_only: bool = False  # train on single-label images only (validation keeps all)

    @property
    def labels_path(self) -> Path:
        return Path(self.train_csv) if self.train_csv else Path(self.data_dir) / "train.csv"

    @property
    def images_dir(self) -> Path:
        return Path(self.data_dir) / self.images_subdir

    @property
    def image_folders(self) -> list[Path]:
        """The train images' folders: ``images_dir`` first, then ``extra_images``."""
        return [self.images_dir, *map(Path, self.extra_images)]


@dataclass
class ModelConfig:
    """One classifier: backbone, head, and optional per-model overrides of the train section."""

    backbone: str = "resnet50"  # resnet18/34/50/101 (torchvision) or any timm name when installed
    pretrained: Union[str, None] = None  # local ImageNet weights file; None = random init
    dropout: float = 0.2
    pool: Literal["avg", "max", "catavgmax", "avgmax"] = "avg"  # catavgmax: avg and max concatenated
    embedding_dim: int = 0  # 0: the embedding is the pooled features; >0: Linear-BN-ReLU neck
    batch_size: Union[int, None] = None  # None -> train.batch_size
    epochs: Union[int, None] = None  # None -> train.epochs
    lr: Union[float, None] = None  # None -> train.lr


@dataclass
class TrainConfig:
    """Optimisation, shared by both models unless a model section overrides batch_size/epochs/lr."""

    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # peak learning rate (one-cycle max / cosine start)
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_pct: float = 0.25  # share of steps spent warming up (onecycle pct_start; cosine warmup)
    loss: Literal["bce", "focal", "ce_triplet"] = "bce"
    focal_gamma: float = 2.0
    triplet_weight: float = 1.0
    triplet_margin: float = 0.3
    imbalance: Literal["none", "pos_weight", "sampler"] = "pos_weight"
    pos_weight_max: float = 10.0  # clip of the per-class negatives/positives ratio
    augment: bool = True  # flips, 90-degree rotations, per-channel brightness/contrast
    workers: int = 2  # DataLoader worker processes (spawn); 0 = load in the main process
    seed: int = 42
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    channels_last: Union[bool, Literal["auto"]] = "auto"  # auto: the faster layout measured here (kit.throughput)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    folds: Union[Literal["all"], list[int]] = "all"
    max_cells_per_image: int = 0  # 0 = all cells; >0 caps the training cells taken per image
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # How the cell model learns from image labels (kit.mil, kit.pseudo):
    cell_mode: Literal["broadcast", "mil"] = "broadcast"  # broadcast: every cell gets its image's labels
    bag_size: int = 16  # mil: cells per bag (one image's cells; fewer when the image has fewer)
    bag_pool: Literal["max", "mean", "attention"] = "max"  # mil: pooling of the cells' features
    cell_loss_weight: float = 0.1  # mil: weight of the per-cell head's broadcast loss (2nd place: 0.1)
    pseudo_rounds: int = 0  # rounds of retraining the cell model on OOF-derived cell labels
    pseudo_soft: bool = False  # soft targets (OOF probability within the kept classes) instead of 0/1
    pseudo_threshold: float = 0.9  # a cell keeps class c above this OOF probability
    pseudo_std: float = 0.5  # ... or above its image's mean + this many standard deviations
    negative_aug: float = 0.0  # probability of a dimmed-green tile labelled Negative (9th place); 0 = off
    # training cells below this stain fraction get the unstained rule's targets (kit.combine); 0 = off
    unstained_targets: float = 0.0


@dataclass
class PredictConfig:
    """Inference settings. combine/combine_weight/combine_unstained are used only while the run has no combine.yaml
    (`tune-combine` writes that file; it never rewrites config.yaml)."""

    tta: int = 1  # 1 = none, 2 = + horizontal flip, 4 = + vertical flips, 8 = all dihedral
    batch_size: int = 64
    which: Literal["best", "last"] = "best"
    combine: str = "product"  # cell x image score combination (kit.combine)
    combine_weight: float = 0.5
    # cells below this fraction of their field's stained level count as unstained (kit.combine; 0 = off)
    combine_unstained: float = 0.3
    # how the CNNs run (kit.throughput): auto = the fastest path measured on this machine for this model
    engine: Literal["auto", "baseline", "torch", "jit", "onnx", "compile"] = "auto"
    # image score: field model, MIL bag head, their mean; auto = the field model when there is one, else bag
    image_source: Literal["auto", "field", "bag", "mean"] = "auto"


@dataclass
class CellPolicyConfig:
    """The cell policy applied at training and prediction (kit.cell_policy; 0 = rule off)."""

    border_nucleus_fraction: float = 0.0  # drop border cells whose nucleus < f x median interior nucleus
    min_signal_fraction: float = 0.0  # drop cells whose cell or nucleus signal < f x the field's median
    edge_area_fraction: float = 0.0  # border cells: confidence x min(1, area / (a x field area))
    inner_area_fraction: float = 0.0  # interior cells: the same


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    cell_model: ModelConfig = field(default_factory=ModelConfig)
    image_model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    cells: CellPolicyConfig = field(default_factory=CellPolicyConfig)
    run_dir: str = ""  # "" -> chosen by `train` (runs/<date>-<hash>)

    def model(self, kind: str) -> ModelConfig:
        """The ModelConfig of ``"cell"`` or ``"image"``."""
        if kind not in ("cell", "image"):
            raise ConfigError(f"kind must be 'cell' or 'image', got {kind!r}")
        return self.cell_model if kind == "cell" else self.image_model

    def train_for(self, kind: str) -> TrainConfig:
        """The train section with the model's batch_size/epochs/lr overrides applied."""
        m = self.model(kind)
        return dataclasses.replace(
            self.train,
            batch_size=m.batch_size or self.train.batch_size,
            epochs=m.epochs if m.epochs is not None else self.train.epochs,
            lr=m.lr if m.lr is not None else self.train.lr,
        )


# ---------------------------------------------------------------------------------------------
# Type checking of values from YAML / the command line


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked (and widened, int -> float) against type `tp`; ConfigError names `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. backbone names or paths YAML read as numbers
    else:
        raise TypeError(f"unsupported config type {tp!r} for {key}")
    raise ConfigError(f"config key {key}: expected {_type_name(tp)}, got {clip(value)}")


def _apply(obj: Any, values: dict, prefix: str, explicit: set | None = None) -> None:
    """Set the dataclass `obj`'s fields from the mapping `values` (recursively, type-checked);
    the dotted key of every value set goes into `explicit`."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'}: expected a mapping, got {clip(values)}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            known = sorted(names | ({"model"} if not prefix else set()))
            raise ConfigError(f"unknown config key {key} (known: {', '.join(known)})")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, key + ".", explicit)
        else:
            setattr(obj, name, _coerce(value, hints[name], key))
            if explicit is not None:
                explicit.add(key)


def _validate(cfg: Config) -> None:
    def positive(key: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):  # also catches nan
            raise ConfigError(f"config key {key}: must be a finite number > 0, got {value}")

    positive("data.tile_size", cfg.data.tile_size)
    positive("data.field_size", cfg.data.field_size)
    positive("train.epochs", cfg.train.epochs)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.lr", cfg.train.lr)
    positive("predict.batch_size", cfg.predict.batch_size)
    if cfg.train.workers < 0:
        raise ConfigError(f"config key train.workers: must be >= 0, got {cfg.train.workers}")
    if not 0.0 <= cfg.train.warmup_pct < 1.0:
        raise ConfigError(f"config key train.warmup_pct: must be in [0, 1), got {cfg.train.warmup_pct}")
    if not 0.0 <= cfg.predict.combine_unstained < 1.0:
        raise ConfigError(f"config key predict.combine_unstained: must be in [0, 1), got {cfg.predict.combine_unstained}")
    if cfg.predict.tta not in (1, 2, 4, 8):
        raise ConfigError(f"config key predict.tta: must be 1, 2, 4 or 8, got {cfg.predict.tta}")
    for kind in ("cell", "image"):
        m = cfg.model(kind)
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError(f"config key {kind}_model.dropout: must be in [0, 1), got {m.dropout}")
        for name in ("batch_size", "epochs", "lr"):
            v = getattr(m, name)
            if v is not None:
                positive(f"{kind}_model.{name}", v)
        if m.pool == "avgmax":  # the old name: timm's avgmax averages avg and max, this concatenates them
            warnings.warn(f"config key {kind}_model.pool: 'avgmax' is now called 'catavgmax' (avg and max "
                          "pooling concatenated, as timm names it); using catavgmax", DeprecationWarning, stacklevel=3)
            m.pool = "catavgmax"
    positive("train.bag_size", cfg.train.bag_size)
    if cfg.train.pseudo_rounds < 0:
        raise ConfigError(f"config key train.pseudo_rounds: must be >= 0, got {cfg.train.pseudo_rounds}")
    if not 0.0 <= cfg.train.unstained_targets < 1.0:
        raise ConfigError(f"config key train.unstained_targets: must be in [0, 1), got {cfg.train.unstained_targets}")
    if not 0.0 <= cfg.train.negative_aug < 1.0:
        raise ConfigError(f"config key train.negative_aug: must be in [0, 1), got {cfg.train.negative_aug}")
    if cfg.train.cell_loss_weight < 0:
        raise ConfigError(f"config key train.cell_loss_weight: must be >= 0, got {cfg.train.cell_loss_weight}")
    from kit.cell_policy import check_policy

    check_policy(cfg.cells)
    if isinstance(cfg.train.folds, list) and any(f < 0 for f in cfg.train.folds):
        raise ConfigError(f"config key train.folds: fold numbers must be >= 0, got {cfg.train.folds}")


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {clip(text)}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {clip(text)}: bad key {clip(key)}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {clip(text)}: cannot parse value: {_yaml_problem(exc)}") from None
    return key.split("."), value


def _yaml_problem(exc: "yaml.YAMLError") -> str:
    """A YAML error on one line: what is wrong and where (line, column)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def _nest(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def _expand_model_shorthand(values: dict) -> list[dict]:
    """A ``model`` section applies to both models: split it off, to be applied first."""
    values = dict(values)
    shared = values.pop("model", None)
    if shared is None:
        return [values]
    if not isinstance(shared, dict):
        raise ConfigError(f"config key model: expected a mapping, got {clip(shared)}")
    return [{"cell_model": dict(shared), "image_model": dict(shared)}, values]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *,
                explicit: set | None = None) -> Config:
    """Read a YAML config (None = defaults), apply ``key=value`` overrides, check every value.

    Raises ConfigError naming the file or key for a missing file, bad YAML, an unknown key or a
    value of the wrong type. `explicit`, when given, receives the dotted keys the user set.
    """
    cfg = Config()
    if path is not None:
        path = config_file(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text file (YAML): {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        try:
            for part in _expand_model_shorthand(values):
                _apply(cfg, part, "", explicit)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for text in overrides or []:
        parts, value = _parse_override(text)
        for part in _expand_model_shorthand(_nest(parts, value)):
            _apply(cfg, part, "", explicit)
    _validate(cfg)
    return cfg


PRESETS_DIR = Path(__file__).with_name("configs")


def preset_names() -> list[str]:
    """The config presets shipped with the kit (``kit/configs/<name>.yaml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of preset `name` (e.g. ``"default"``, ``"demo_cpu"``)."""
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no config preset {name!r}; the kit ships {preset_names()}")
    return path


def config_file(value: str | Path) -> Path:
    """A ``--config`` value as a file: an existing path, else the name of a preset."""
    path = Path(value)
    if path.is_file():
        return path
    if len(path.parts) == 1 and not path.suffix and (PRESETS_DIR / f"{path}.yaml").is_file():
        return PRESETS_DIR / f"{path}.yaml"
    raise ConfigError(f"config file not found: {path} (presets shipped with the kit: {', '.join(preset_names())})")


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (YAML/JSON-safe; stored inside checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> Config:
    """Inverse of `to_dict` (type-checked like `load_config`)."""
    cfg = Config()
    for part in _expand_model_shorthand(values):
        _apply(cfg, part, "")
    _validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically); returns the path."""
    path = Path(path)
    with atomic_open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=False)
    return path


def config_hash(cfg: Config, length: int = 12) -> str:
    """Short sha256 of everything that changes results (run_dir, workers and device left out)."""
    values = to_dict(cfg)
    values.pop("run_dir", None)
    values["train"].pop("workers", None)
    values["train"].pop("device", None)
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
