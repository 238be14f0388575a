"""Kaggle training kernel of the HPA single-cell kit: trains ONE fold (internet off).

A Kaggle session lasts at most 9-12 hours, so each fold is its own kernel run: build with
``python -m kit kernel build ... --train-kernel --train-fold K`` (or edit ``SETTINGS["fold"]``), push,
and repeat per fold. Steps (each prints its time):
1. finds the code dataset (``kit-bundle.json``) and the competition data (``train/`` + ``train.csv``)
   under the input root (``/kaggle/input``; env ``KAGGLE_INPUT_ROOT``);
2. installs the kit from the bundled wheels exactly as kernels/infer/infer.py does (the image's torch
   stack pinned, nothing downloaded);
3. ``kit folds`` (the config's seed; same labels + seed = the same folds as at home), then
   ``kit train --fold K`` from the bundled config, with the data paths pointed at this machine: it
   segments, tiles and downscales every train image from one decode (mask, tile and field caches in
   a scratch folder, not in the saved output) and writes the run's manifest;
4. leaves the run folder in ``/kaggle/working/run`` (env ``KAGGLE_WORKING_DIR``): attach this kernel's
   output as a dataset to collect the folds, then build the inference kernel from them.

Only the standard library is imported before step 2.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

# >>> kit build settings (rewritten by `python -m kit kernel build`)
SETTINGS = {
    "competition": "hpa-single-cell-image-classification",
    "code_dataset": "hpa-kit-code",
    "fold": 0,
    "n_splits": 5,
    "train_args": [],
}
# <<< kit build settings


T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


def input_root() -> Path:
    return Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))


def working_dir() -> Path:
    path = Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def scratch_dir() -> Path:
    import tempfile

    base = os.environ.get("KIT_SCRATCH_DIR") or ("/kaggle/tmp" if Path("/kaggle/tmp").is_dir() else tempfile.gettempdir())
    path = Path(base) / "kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_dataset(marker: str, preferred: str) -> Path:
    root = input_root()
    if (root / preferred / marker).is_file():
        return root / preferred
    for depth in range(1, 5):
        hits = sorted(root.glob("/".join(["*"] * depth) + "/" + marker))
        if hits:
            return hits[0].parent
    raise SystemExit(f"error: no attached dataset under {root} holds {marker}; attach the '{preferred}' dataset")


def find_competition(slug: str) -> Path:
    root = input_root()
    for c in [root / slug] + sorted(p.parent for p in root.glob("*/train.csv")):
        if (c / "train").is_dir() and (c / "train.csv").is_file():
            return c
    raise SystemExit(f"error: competition data (train/ and train.csv) not found under {root}; "
                     f"add the '{slug}' competition as a data source")


def run(*args: str) -> None:
    import subprocess

    log("$ " + " ".join(args))
    subprocess.run([sys.executable, *args], check=True, cwd=scratch_dir())


def install(code: Path) -> dict:
    """pip install the bundle, the image's torch stack pinned (see kernels/infer/infer.py)."""
    import importlib.metadata as md
    import re

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement

    pins: dict[str, str] = {}
    stack = ["torch", "torchvision"]
    while stack:
        name = canonical(stack.pop())
        if name in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        pins[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    if "torch" not in pins:
        raise SystemExit("error: torch is not installed in this image; the kit uses the image's torch")
    constraints = scratch_dir() / "constraints.txt"
    constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())))
    bundle = json.loads((code / "kit-bundle.json").read_text())
    wheels = code / "wheels"
    if not wheels.is_dir():
        wheels = sorted(code.rglob(bundle["kit_wheel"]))[0].parent
    pip = ["-m", "pip", "install", "--no-index", "--disable-pip-version-check", "--no-input", "--quiet",
           "--no-compile", "--find-links", str(wheels)]
    run(*pip, "--no-deps", str(wheels / bundle["kit_wheel"]))
    run(*pip, "-r", str(code / "requirements.txt"), "-c", str(constraints))
    if bundle.get("hpacellseg_wheel"):
        run(*pip, "--no-deps", str(wheels / bundle["hpacellseg_wheel"]))
    if bundle.get("hpacellseg_weights"):
        os.environ.setdefault("KIT_HPACELLSEG_WEIGHTS", str(code / bundle["hpacellseg_weights"]))
    importlib.invalidate_caches()
    return bundle


def main() -> int:
    code = find_dataset("kit-bundle.json", SETTINGS["code_dataset"])
    comp = find_competition(SETTINGS["competition"])
    log(f"code dataset {code}; competition data {comp}; fold {SETTINGS['fold']}")
    bundle = install(code)
    import yaml  # from the bundle

    config = code / "configs" / "train.yaml"
    cfg = yaml.safe_load(config.read_text()) or {}
    seed = int((cfg.get("train") or {}).get("seed", 42))
    cache = scratch_dir() / "cache"
    folds = scratch_dir() / "folds" / "train.csv"
    run("-m", "kit", "folds", "--labels", str(comp / "train.csv"), "--n-splits", str(SETTINGS["n_splits"]),
        "--seed", str(seed), "--out", str(folds))
    overrides = [  # `kit train` makes the masks, tiles and fields from one decode of each image (kit.prepare)
        f"data.data_dir={comp}", f"data.train_csv={comp / 'train.csv'}", "data.images_subdir=train",
        f"data.folds_file={folds}", f"data.mask_cache={cache / 'masks'}", f"data.tile_cache={cache / 'tiles'}",
        f"data.field_cache={cache / 'fields'}", "train.device=auto",
    ]
    for kind in ("cell_model", "image_model"):  # bundled ImageNet weights, when the build found them
        pre = (bundle.get("pretrained") or {}).get(kind)
        overrides.append(f"{kind}.pretrained={code / pre}" if pre else f"{kind}.pretrained=null")
    run_dir = working_dir() / "run"
    run("-m", "kit", "train", "--config", str(config), "--fold", str(SETTINGS["fold"]), "--run-dir", str(run_dir),
        *overrides, *SETTINGS.get("train_args", []))
    from kit.manifest import read_manifest

    manifest = read_manifest(run_dir)
    log(f"done: {run_dir} (folds {manifest.folds}; masks {manifest.mask_cache}, tiles {manifest.tile_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
