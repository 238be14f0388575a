"""Kaggle inference kernel of the HPA single-cell kit (internet off).

What it does, in order (every step prints what it found and how long it took):
1. finds, under the input root (``/kaggle/input``; env ``KAGGLE_INPUT_ROOT``), the code dataset (the
   folder holding ``kit-bundle.json``), the weights dataset (``kit-weights.json``) and the competition
   data (``<competition>/test/`` + ``sample_submission.csv``);
2. installs the kit and its pinned extras from the code dataset's wheels with
   ``pip install --no-index --find-links`` -- the kit wheel with ``--no-deps``, the extras from
   ``requirements.txt`` under a constraints file that pins the image's torch, torchvision and
   everything they require to the installed versions, so the image's CUDA torch is never replaced
   (the bundle holds no torch at all);
3. reads the run's inputs from its manifest (`kit.manifest.read_manifest`: folds, segmentation backend
   and options, sizes) and runs ``python -m kit predict`` on the test images with the weights dataset's
   run folder (mirrored, files symlinked, into a scratch folder: /kaggle/input is read-only and predict
   caches per image; the test masks go to the scratch folder with ``--mask-cache``; env
   ``KIT_SCRATCH_DIR``, default /kaggle/tmp or the system temp folder), on the GPU when there is one,
   writing ``submission.csv`` in the working folder (``/kaggle/working``; env ``KAGGLE_WORKING_DIR``);
4. validates it with ``python -m kit validate-submission``; a failed check fails the kernel.

Only the standard library is imported before step 2. ``kit kernel build`` fills the settings block
below; the datasets are found by their manifests even when Kaggle mounts them under other names.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# >>> kit build settings (rewritten by `python -m kit kernel build`)
SETTINGS = {
    "competition": "hpa-single-cell-image-classification",
    "code_dataset": "hpa-kit-code",
    "weights_dataset": "hpa-kit-weights",
    "predict_args": [],
}
# <<< kit build settings

TORCH_ROOTS = ("torch", "torchvision")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f} s] {msg}", flush=True)


def unpacked(parent: Path, name: str) -> Path:
    """``parent/name``, or the scratch extraction of ``parent/name.zip`` when Kaggle kept the archive that
    ``kaggle datasets create --dir-mode zip`` uploaded (it normally unpacks it)."""
    if (parent / name).exists() or not (parent / f"{name}.zip").is_file():
        return parent / name
    import zipfile

    dest = scratch_dir() / "unzipped" / parent.name
    with zipfile.ZipFile(parent / f"{name}.zip") as zf:
        zf.extractall(dest)
    return dest / name if (dest / name).exists() else dest


def input_root() -> Path:
    return Path(os.environ.get("KAGGLE_INPUT_ROOT", "/kaggle/input"))


def working_dir() -> Path:
    path = Path(os.environ.get("KAGGLE_WORKING_DIR", "/kaggle/working"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_dataset(marker: str, preferred: str) -> Path:
    """The folder holding `marker`: ``<root>/<preferred>/`` first, else any folder up to 4 levels down."""
    root = input_root()
    direct = root / preferred / marker
    if direct.is_file():
        return direct.parent
    for depth in range(1, 5):
        hits = sorted(root.glob("/".join(["*"] * depth) + "/" + marker))
        if hits:
            return hits[0].parent
    raise SystemExit(f"error: no attached dataset under {root} holds {marker}; attach the '{preferred}' dataset")


def find_competition(slug: str) -> Path:
    root = input_root()
    cands = [root / slug] + sorted(p.parent for p in root.glob("*/sample_submission.csv"))
    cands += sorted(p.parent for p in root.glob("*/*/sample_submission.csv"))
    for c in cands:
        if (c / "test").is_dir() and (c / "sample_submission.csv").is_file():
            return c
    raise SystemExit(f"error: competition data (test/ and sample_submission.csv) not found under {root}; "
                     f"add the '{slug}' competition as a data source")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(dist: md.Distribution) -> list[str]:
    """Names a distribution requires here (unrequested extras skipped); pip's vendored `packaging`."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement
    names = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except Exception:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        names.append(_canonical(req.name))
    return names


def torch_stack_pins() -> list[str]:
    """``name==version`` for torch, torchvision and their installed requirements (the image's own stack)."""
    pins: dict[str, str] = {}
    stack = list(TORCH_ROOTS)
    while stack:
        name = _canonical(stack.pop())
        if name in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        pins[name] = dist.version
        stack.extend(_requirement_names(dist))
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def pip(*args: str) -> None:
    # --no-compile: byte-compiling every installed module costs more than half the install time;
    # Python compiles lazily what is imported.
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
           "--no-input", "--quiet", "--no-compile", *args]
    log("$ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def install(code: Path) -> dict:
    bundle = json.loads((code / "kit-bundle.json").read_text())
    wheels = unpacked(code, "wheels")
    if not (wheels / bundle["kit_wheel"]).is_file():
        hits = sorted(code.rglob(bundle["kit_wheel"]))
        if not hits:
            raise SystemExit(f"error: {bundle['kit_wheel']} not found under {code}")
        wheels = hits[0].parent
    pins = torch_stack_pins()
    if not any(p.startswith("torch==") for p in pins):
        raise SystemExit("error: torch is not installed in this image; the kit uses the image's torch")
    log(f"image's torch stack kept as is: {', '.join(p for p in pins if p.split('==')[0] in TORCH_ROOTS)}")
    constraints = scratch_dir() / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    pip("--find-links", str(wheels), "--no-deps", str(wheels / bundle["kit_wheel"]))
    pip("--find-links", str(wheels), "-r", str(code / "requirements.txt"), "-c", str(constraints))
    if bundle.get("hpacellseg_wheel"):
        pip("--find-links", str(wheels), "--no-deps", str(wheels / bundle["hpacellseg_wheel"]))
    if bundle.get("hpacellseg_weights"):
        os.environ.setdefault("KIT_HPACELLSEG_WEIGHTS", str(code / bundle["hpacellseg_weights"]))
    log("installed the kit " + md.version("hpa-kit"))
    return bundle


def scratch_dir() -> Path:
    """Writable space that is not kernel output: caches go here, not to /kaggle/working (saved, 20 GB cap)."""
    base = os.environ.get("KIT_SCRATCH_DIR") or ("/kaggle/tmp" if Path("/kaggle/tmp").is_dir() else tempfile.gettempdir())
    path = Path(base) / "kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def writable_run(run_dir: Path) -> Path:
    """A writable mirror of the read-only run folder: real folders, symlinked files.

    `kit predict` caches per-image results under RUN_DIR/predict/, and /kaggle/input is read-only.
    """
    mirror = scratch_dir() / "run"
    if mirror.exists():
        shutil.rmtree(mirror)
    for src in sorted(run_dir.rglob("*")):
        dst = mirror / src.relative_to(run_dir)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src.resolve(), dst)
    return mirror


def kit(*args: str) -> None:
    cmd = [sys.executable, "-m", "kit", *args]
    log("$ python " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=scratch_dir())


def main() -> int:
    code = find_dataset("kit-bundle.json", SETTINGS["code_dataset"])
    weights = find_dataset("kit-weights.json", SETTINGS["weights_dataset"])
    comp = find_competition(SETTINGS["competition"])
    log(f"code dataset {code}; weights dataset {weights}; competition data {comp}")
    install(code)
    importlib.invalidate_caches()
    run_dir = writable_run(unpacked(weights, json.loads((weights / "kit-weights.json").read_text()).get("run_dir", "run")))
    from kit.manifest import read_manifest  # installed from the bundle a moment ago

    manifest = read_manifest(run_dir)
    log(f"run trained by kit {manifest.kit_version}: folds {manifest.folds}, segmentation {manifest.mask_backend}, "
        f"tiles {manifest.tile_size} px, fields {manifest.field_size} px")
    out = working_dir() / "submission.csv"
    n_images = len({p.name.rsplit("_", 1)[0] for p in (comp / "test").glob("*_green.*")})
    extra = list(SETTINGS.get("predict_args", []))
    if "--device" not in extra:
        extra += ["--device", "auto"]  # the run's train.device may say cpu; use the kernel's GPU when there is one
    if "--workers" not in extra:
        extra += ["--workers", str(max(1, min(4, os.cpu_count() or 1)))]
    t = time.time()
    kit("predict", "--run", str(run_dir), "--images", str(comp / "test"), "--out", str(out),
        "--ids-from", str(comp / "sample_submission.csv"), "--mask-cache", str(scratch_dir() / "cache" / "masks"), *extra)
    took = time.time() - t
    log(f"predict: {n_images} images in {took:.1f} s ({took / max(n_images, 1):.2f} s/image)")
    kit("validate-submission", str(out), "--sample", str(comp / "sample_submission.csv"))
    log(f"done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
