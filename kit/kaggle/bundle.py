"""`kernel build`: a finished run -> the code dataset, the weights dataset and the kernel folder(s).

``kernel build --run RUN_DIR --user USER --out build/kaggle`` lays out, ready for the kaggle CLI::

    build/kaggle/
      kit-build.json            what was built: ids, folders, figures, and every file written
                                (size + sha256; read by `kernel push`, which publishes nothing else)
      code/                     dataset <user>/<prefix>-code
        dataset-metadata.json   {"title", "id", "licenses": [{"name": "CC0-1.0"}]}
        kit-bundle.json         manifest: kit wheel, pinned requirements, protected (never bundled) names
        requirements.txt        the pinned extras, one ``name==version`` a line
        wheels/*.whl            the kit wheel + one wheel per pinned extra (+ hpacellseg when given)
        hpacellseg-weights/     nuclei/cell model weights (only with --hpacellseg-weights)
        pretrained/             the run's local ImageNet weights files (only with --train-kernel)
        configs/train.yaml      the run's resolved config (the train kernel starts from it)
      weights/                  dataset <user>/<prefix>-weights
        dataset-metadata.json
        kit-weights.json        manifest: run id, folds, sha256 of every file
        run/config.yaml, run/manifest.json, run/combine.yaml, run/summary.json, run/train_metrics.json,
        run/{cell,image}/fold<k>/best.pt
      kernel/                   kernel <user>/<prefix>-infer: kernel-metadata.json + infer.py
      kernel-train/             kernel <user>/<prefix>-train (only with --train-kernel)

The folder is built fresh beside ``--out`` and moved into place when complete (`kit.kaggle.staging`):
an earlier build there is replaced whole, and a file the kit did not write there stops the build
(``--force`` deletes it). Every name is validated (`kit.kaggle.metadata`) before anything is written,
and so is the run: its inputs are read through its manifest (`kit.manifest.read_manifest`), and every
fold the kernel's ``kit predict`` will use (the manifest's, or ``--predict-arg --folds``) must have its
checkpoints. The build refuses to finish if a credential file or the Kaggle key ended up in it.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kit import __version__
from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError
from kit.kaggle.credentials import check_no_credentials
from kit.kaggle.metadata import (DATASET_META, DEFAULT_COMPETITION, DEFAULT_LICENSE, DEFAULT_PREFIX, KERNEL_META,
                                 USER_RE, VALID_KERNEL_TYPES, dataset_metadata, dataset_metadata_problems,
                                 kernel_metadata, kernel_metadata_problems, kernel_title_warning, raise_problems,
                                 title_from_slug)
from kit.kaggle.render import as_notebook, render_kernel
from kit.kaggle.runtime import DEFAULT_N_TEST, Estimate, estimate_runtime, run_figures
from kit.kaggle.staging import (BUILD_MANIFEST, check_replaceable, record_files, sha256, staged,
                                unrecorded_files)
from kit.kaggle.wheels import build_kit_wheel, gather_wheels, kernel_pins, wheel_name_version

BUNDLE_MANIFEST = "kit-bundle.json"
WEIGHTS_MANIFEST = "kit-weights.json"


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """shutil.copy2 through kit.atomic: `dst` appears only once complete (a killed build leaves no half file)."""
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)
    return Path(dst)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def read_yaml(path: Path) -> dict:
    """A YAML mapping ({} for anything else); ConfigError naming the file when it is not YAML."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return data if isinstance(data, dict) else {}


# Checkpoint keys inference needs (kit.models.model_from_checkpoint reads model + config); the rest
# (optimizer moments: 2x the weights for AdamW, scheduler, scaler, RNG states) only serves resuming.
INFERENCE_KEYS = ("model", "config", "epoch", "epochs", "kind", "fold", "best_score", "best_epoch", "best_metrics",
                  "history")


def slim_checkpoint(src: Path, dst: Path) -> None:
    """Copy a kit checkpoint keeping only `INFERENCE_KEYS` (a third of the size after AdamW training)."""
    import torch  # only here: building a bundle otherwise needs no torch

    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{src}: not a readable kit checkpoint ({exc}); --full-checkpoints copies it as is") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ConfigError(f"{src}: not a kit checkpoint (no 'model' entry); --full-checkpoints copies it as is")
    with atomic_path(dst) as tmp:
        torch.save({k: v for k, v in ckpt.items() if k in INFERENCE_KEYS}, tmp)


def run_files(run_dir: Path, *, include_last: bool = False) -> list[Path]:
    """The files of a run folder that inference needs: config.yaml (required), manifest.json, combine.yaml,
    summary.json, train_metrics.json and every ``<model>/fold<k>/best.pt`` (``last.pt`` too with `include_last`)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml; not a run folder (runs/<id>/ from `kit train`)")
    names = ["best.pt", "last.pt"] if include_last else ["best.pt"]
    checkpoints = sorted(p for n in names for p in run_dir.glob(f"*/fold*/{n}"))
    if not any(p.name == "best.pt" for p in checkpoints):
        raise ConfigError(f"--run {run_dir}: no <model>/fold<k>/best.pt checkpoint; has the run finished a fold?")
    files = [run_dir / "config.yaml"] + [run_dir / n for n in ("manifest.json", "combine.yaml", "summary.json",
                                                               "train_metrics.json") if (run_dir / n).is_file()]
    return files + checkpoints


def _option(args: Sequence[str], name: str) -> str | None:
    """The value of option `name` in an argument list (``--name V`` or ``--name=V``; the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def run_inputs(run_dir: Path, predict_args: Sequence[str] = ()) -> tuple[Any, list[int] | None]:
    """The run's manifest (`kit.manifest.read_manifest`) and the folds the kernel's `kit predict` will use:
    those `--folds` names among `predict_args`, else the manifest's. Each must have its cell and image
    best.pt (KitError naming the first missing file), so a kernel that would stop on Kaggle is never
    built. Folds None: a run folder from before the manifest whose folds are unknown (every checkpoint)."""
    from kit.manifest import read_manifest
    from kit.predict import parse_folds_option, run_folds

    manifest = read_manifest(run_dir)
    return manifest, run_folds(Path(run_dir), manifest, "best", parse_folds_option(_option(predict_args, "--folds")))


def estimate_figures(run_dir: Path, manifest: Any, folds: list[int] | None) -> dict:
    """The runtime estimate's inputs for a run: tile and field sizes and the segmenter from its manifest,
    backbones and TTA from its config.yaml (settings, not inputs), and the number of folds predict uses."""
    run_dir = Path(run_dir)
    figures = run_figures(read_yaml(run_dir / "config.yaml"))
    figures.update(tile_size=int(manifest.tile_size), field_size=int(manifest.field_size),
                   segmenter=str(manifest.mask_backend))
    n_folds = len(folds) if folds else len({p.parent.name for p in run_dir.glob("*/fold*/best.pt")})
    if n_folds:
        figures["n_folds"] = n_folds
    return figures


def copy_run(run_dir: Path, dest: Path, *, include_last: bool = False, full_checkpoints: bool = False) -> dict:
    """Copy `run_files` of a run folder into `dest`/run; returns the weights manifest.

    best.pt is slimmed to what inference reads (`slim_checkpoint`) unless `full_checkpoints`.
    """
    run_dir = Path(run_dir)
    manifest: dict[str, Any] = {"run_id": run_dir.resolve().name, "run_dir": "run", "folds": {}, "files": {},
                                "slim_checkpoints": not full_checkpoints}
    for src in run_files(run_dir, include_last=include_last):
        rel = src.relative_to(run_dir)
        out = dest / "run" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.name == "best.pt" and not full_checkpoints:
            slim_checkpoint(src, out)
        else:
            copy_atomic(src, out)
        manifest["files"][f"run/{rel.as_posix()}"] = sha256(out)
        if src.name == "best.pt":
            manifest["folds"].setdefault(rel.parts[0], []).append(int(rel.parts[1][len("fold"):]))
    return manifest


@dataclass
class BuildOptions:
    run_dir: Path
    user: str
    out: Path = Path("build/kaggle")
    competition: str = DEFAULT_COMPETITION
    prefix: str = DEFAULT_PREFIX
    license_name: str = DEFAULT_LICENSE
    wheelhouses: list[Path] = field(default_factory=list)
    index: bool = False
    python_version: str | None = None
    platforms: list[str] = field(default_factory=lambda: ["manylinux2014_x86_64", "manylinux_2_28_x86_64"])
    extra_packages: list[str] = field(default_factory=list)
    packages: list[str] | None = None  # None -> KERNEL_REQUIREMENTS
    hpacellseg_wheel: Path | None = None
    hpacellseg_weights: Path | None = None
    gpu: bool = True
    private: bool = True
    include_last: bool = False
    full_checkpoints: bool = False
    train_kernel: bool = False
    train_fold: int = 0
    n_splits: int = 5
    train_args: list[str] = field(default_factory=list)
    kernel_type: str = "script"  # or "notebook" (a one-cell .ipynb of the same code)
    n_test: int = DEFAULT_N_TEST
    hardware: str | None = None  # None -> t4 with --gpu, kaggle-cpu without
    predict_args: list[str] = field(default_factory=list)
    force: bool = False  # replace --out even when it holds files the kit did not write (they are deleted)


def kernel_dir(name: str) -> str:
    """The build's folder of kernel `name`: ``kernel`` (infer) or ``kernel-<name>``."""
    return "kernel" if name == "infer" else f"kernel-{name}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build(opts: BuildOptions, log=print) -> dict:
    """Lay out the code dataset, the weights dataset and the kernel folder(s) as `opts.out`; returns
    the build manifest (kit-build.json)."""
    if not USER_RE.match(opts.user or ""):
        raise ConfigError(f"--user {opts.user!r} is not a Kaggle user name")
    out = Path(opts.out)
    slugs = {"code": f"{opts.prefix}-code", "weights": f"{opts.prefix}-weights",
             "infer": f"{opts.prefix}-infer", "train": f"{opts.prefix}-train"}
    ids = {k: f"{opts.user}/{v}" for k, v in slugs.items()}
    datasets = {
        "code": dataset_metadata(opts.user, slugs["code"], title_from_slug(slugs["code"]), opts.license_name,
                                 "The hpa-kit package and its pinned wheels for offline kernels (kit kernel build)."),
        "weights": dataset_metadata(opts.user, slugs["weights"], title_from_slug(slugs["weights"]),
                                    opts.license_name, "Fold checkpoints and resolved config of one kit run."),
    }
    if opts.kernel_type not in VALID_KERNEL_TYPES:
        raise ConfigError(f"--kernel-type {opts.kernel_type!r}: choose one of {list(VALID_KERNEL_TYPES)}")
    ext = ".ipynb" if opts.kernel_type == "notebook" else ".py"
    kernels = {"infer": kernel_metadata(opts.user, slugs["infer"], title_from_slug(slugs["infer"]), "infer" + ext,
                                        dataset_sources=[ids["code"], ids["weights"]], competition=opts.competition,
                                        gpu=opts.gpu, private=opts.private, kernel_type=opts.kernel_type)}
    if opts.train_kernel:
        kernels["train"] = kernel_metadata(opts.user, slugs["train"], title_from_slug(slugs["train"]), "train" + ext,
                                           dataset_sources=[ids["code"]], competition=opts.competition,
                                           gpu=opts.gpu, private=opts.private, kernel_type=opts.kernel_type)
    # Validate everything before any file is written.
    problems = []
    for name, meta in datasets.items():
        problems += dataset_metadata_problems(meta, f"{name}/{DATASET_META}")
    for name, meta in kernels.items():
        problems += kernel_metadata_problems(meta, None, f"{kernel_dir(name)}/{KERNEL_META}", set(ids[k] for k in datasets))
    raise_problems(problems)
    for p in (opts.hpacellseg_wheel, opts.hpacellseg_weights):
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{p}: not found")
    if opts.hpacellseg_wheel is not None and not str(opts.hpacellseg_wheel).endswith(".whl"):
        raise ConfigError(f"--hpacellseg-wheel {opts.hpacellseg_wheel}: not a .whl file")
    run_files(Path(opts.run_dir), include_last=opts.include_last)
    run_manifest, folds = run_inputs(Path(opts.run_dir), opts.predict_args)
    figures = estimate_figures(Path(opts.run_dir), run_manifest, folds)
    log(f"run {opts.run_dir}: folds {folds if folds is not None else '(every checkpoint)'}, segmentation "
        f"{run_manifest.mask_backend}, tiles {run_manifest.tile_size} px, fields {run_manifest.field_size} px"
        + (" (no manifest.json: read from config.yaml)" if run_manifest.legacy else ""))
    reads = [opts.run_dir, *opts.wheelhouses] + [p for p in (opts.hpacellseg_wheel, opts.hpacellseg_weights) if p]
    previous = check_replaceable(out, force=opts.force, keep=reads)
    if opts.force and out.is_dir():
        foreign = unrecorded_files(out, previous)
        if foreign:
            log(f"--force: {len(foreign)} file(s) in {out} that the kit did not write will be deleted")

    with staged(out) as stage:
        manifest, estimate = _lay_out(stage, out, opts, datasets, kernels, ids, slugs, previous, figures, log)
    files = manifest["files"]
    log(f"built {out}: {sum(1 for f in files if f.startswith('code/wheels/'))} wheels, "
        f"{sum(1 for f in files if f.endswith('.pt'))} checkpoints, "
        f"{sum(f['size'] for f in files.values()) / 1e6:.1f} MB")
    for line in estimate.lines():
        log(line)
    return manifest


def _lay_out(stage: Path, out: Path, opts: BuildOptions, datasets: dict, kernels: dict, ids: dict, slugs: dict,
             previous: dict | None, figures: dict, log) -> tuple[dict, Estimate]:
    """Write the whole build into the empty folder `stage` (which becomes `out`); returns the build
    manifest and the runtime estimate (from `figures`, see `estimate_figures`)."""
    # weights dataset
    log(f"weights dataset: copying {opts.run_dir} -> {out / 'weights'}")
    weights_manifest = copy_run(Path(opts.run_dir), stage / "weights", include_last=opts.include_last,
                                full_checkpoints=opts.full_checkpoints)
    weights_manifest.update(created=_now(), kit_version=__version__)
    _write_json(stage / "weights" / WEIGHTS_MANIFEST, weights_manifest)
    _write_json(stage / "weights" / DATASET_META, datasets["weights"])
    run_config = read_yaml(Path(opts.run_dir) / "config.yaml")  # settings: the ImageNet weights files

    # code dataset
    code = stage / "code"
    wheels = code / "wheels"
    wheels.mkdir(parents=True)
    target = opts.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    platforms = list(opts.platforms) if opts.python_version else None  # wheel tags matter only for another Python
    reused = _reuse_wheels(out, previous, wheels, {"python": target, "platforms": platforms})
    log(f"code dataset: building the kit wheel -> {out / 'code' / 'wheels'}")
    kit_wheel = build_kit_wheel(wheels)
    pins, protected = kernel_pins(opts.extra_packages, roots=opts.packages, python_version=opts.python_version)
    log(f"code dataset: gathering {len(pins)} pinned wheels (torch stack excluded: {len(protected)} names"
        + (f"; {reused} from the earlier build" if reused else "") + ")")
    keep = {kit_wheel.name}
    sources = gather_wheels(pins, wheels, wheelhouses=opts.wheelhouses, index=opts.index,
                            python_version=opts.python_version, platforms=opts.platforms, log=log)
    wanted = {(n, v) for n, v in pins.items()}
    keep |= {whl.name for whl in wheels.glob("*.whl") if wheel_name_version(whl) in wanted}
    hpacellseg = None
    if opts.hpacellseg_wheel is not None:
        copy_atomic(opts.hpacellseg_wheel, wheels / Path(opts.hpacellseg_wheel).name)
        hpacellseg = Path(opts.hpacellseg_wheel).name
        keep.add(hpacellseg)
    for whl in wheels.glob("*.whl"):  # reused wheels no pin wants would confuse the resolver
        if whl.name not in keep:
            whl.unlink()
    weights_dir = None
    if opts.hpacellseg_weights is not None:
        weights_dir = "hpacellseg-weights"
        src = Path(opts.hpacellseg_weights)
        for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if f.is_file():
                copy_atomic(f, code / weights_dir / (f.relative_to(src) if src.is_dir() else f.name))
    pretrained = _bundle_pretrained(run_config, code) if opts.train_kernel else {}
    with atomic_open(code / "requirements.txt") as f:
        f.write("# pinned extras of the kit for the Kaggle kernel (torch stack excluded; see kit-bundle.json)\n")
        f.writelines(f"{n}=={v}\n" for n, v in pins.items())
    copy_atomic(Path(opts.run_dir) / "config.yaml", code / "configs" / "train.yaml")
    bundle = {
        "kit_version": __version__,
        "created": _now(),
        "python": target,
        "platforms": platforms,
        "kit_wheel": kit_wheel.name,
        "requirements": [f"{n}=={v}" for n, v in pins.items()],
        "sources": sources,
        "protected": sorted(protected),
        "hpacellseg_wheel": hpacellseg,
        "hpacellseg_weights": weights_dir,
        "pretrained": pretrained,
    }
    _write_json(code / BUNDLE_MANIFEST, bundle)
    _write_json(code / DATASET_META, datasets["code"])

    # kernels
    for name, meta in kernels.items():
        kdir = stage / kernel_dir(name)
        kdir.mkdir(parents=True)
        if name == "train":
            settings = {"competition": opts.competition, "code_dataset": slugs["code"], "fold": opts.train_fold,
                        "n_splits": opts.n_splits, "train_args": list(opts.train_args)}
        else:
            settings = {"competition": opts.competition, "code_dataset": slugs["code"],
                        "weights_dataset": slugs["weights"], "predict_args": list(opts.predict_args)}
        text = render_kernel(name, settings)
        with atomic_open(kdir / meta["code_file"]) as f:
            f.write(as_notebook(text) if opts.kernel_type == "notebook" else text)
        _write_json(kdir / KERNEL_META, meta)
        raise_problems(kernel_metadata_problems(meta, kdir, f"{out / kernel_dir(name) / KERNEL_META}",
                                                set(ids[k] for k in datasets)))
        warning = kernel_title_warning(meta)
        if warning:
            log(warning)
    check_no_credentials(stage, shown_as=out)

    estimate = estimate_runtime(opts.n_test, hardware=opts.hardware or ("t4" if opts.gpu else "kaggle-cpu"), **figures)
    manifest = {
        "kit_version": __version__, "created": _now(), "user": opts.user, "competition": opts.competition,
        "datasets": {k: {"dir": k, "id": ids[k]} for k in datasets},
        "kernels": {k: {"dir": kernel_dir(k), "id": ids[k]} for k in kernels},
        "estimate": {"hardware": estimate.hardware, "hours": round(estimate.hours, 3), "fits": estimate.fits},
        "files": record_files(stage),  # everything above; `kernel push` publishes nothing else
    }
    _write_json(stage / BUILD_MANIFEST, manifest)
    return manifest, estimate


def _reuse_wheels(out: Path, previous: dict | None, wheels: Path, target: dict) -> int:
    """Link into `wheels` the pinned wheels an earlier build of `out` wrote for the same `target`
    (``python`` and ``platforms`` of its kit-bundle.json), when they are still as recorded (saves
    gathering them again); returns how many. The kit wheel is always rebuilt."""
    if not previous:
        return 0
    try:
        bundle = json.loads((out / "code" / BUNDLE_MANIFEST).read_text())
    except (OSError, ValueError):
        return 0
    if not isinstance(bundle, dict) or any(bundle.get(k) != v for k, v in target.items()):
        return 0
    n = 0
    for rel, meta in previous["files"].items():
        src = out / rel
        if (not rel.startswith("code/wheels/") or not rel.endswith(".whl") or src.name.startswith("hpa_kit-")
                or not src.is_file() or src.stat().st_size != meta.get("size") or sha256(src) != meta.get("sha256")):
            continue
        try:
            os.link(src, wheels / src.name)
        except OSError:
            shutil.copy2(src, wheels / src.name)
        n += 1
    return n


def _bundle_pretrained(run_config: dict, code: Path) -> dict:
    """Copy the run's local ImageNet weights files (model.pretrained) into the code dataset for the train
    kernel; ``{cell_model|image_model: relative path}``. A path that does not exist here is skipped."""
    out = {}
    for kind in ("cell_model", "image_model"):
        path = (run_config.get(kind) or {}).get("pretrained")
        if path and Path(path).is_file():
            dst = code / "pretrained" / Path(path).name
            if not dst.is_file():
                copy_atomic(path, dst)
            out[kind] = f"pretrained/{dst.name}"
    return out
