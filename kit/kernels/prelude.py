"""The standard-library prelude of both Kaggle kernels (infer.py, train.py), written once.

`kit kernel build` renders everything below the ``from __future__`` line into each kernel, between its
``# >>> kit prelude`` and ``# <<< kit prelude`` lines, so a kernel is one self-contained script. It
runs before the kit is installed, so it imports only the standard library (and pip's own vendored
``packaging`` when the image has no ``packaging``).

What it does for a kernel:
- finds, under the input root (``/kaggle/input``; env ``KAGGLE_INPUT_ROOT``), an attached dataset by
  the manifest file it holds (`find_dataset`), and the competition data (`find_competition`), even when
  Kaggle mounts them under other names; a ``<name>.zip`` that Kaggle kept unpacked is extracted (`unpacked`);
- installs the kit and its pinned extras from the code dataset's wheels (`install`) with ``pip install
  --no-index --find-links``: the kit wheel with ``--no-deps``, the extras from ``requirements.txt`` under
  a constraints file that pins the image's torch, torchvision and everything they require to the
  installed versions (`torch_stack_pins`), so the image's CUDA torch is never replaced (the bundle holds
  no torch at all); the HPA Cell Segmentator wheel and weights when bundled;
- gives the kernel a scratch folder for caches that is not saved output (`scratch_dir`; env
  ``KIT_SCRATCH_DIR``, default /kaggle/tmp or the system temp folder), the working folder
  (`working_dir`; env ``KAGGLE_WORKING_DIR``, default /kaggle/working), a timed `log` and `kit(...)`,
  which runs ``python -m kit ...`` and fails the kernel when it fails.
"""
from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TORCH_ROOTS = ("torch", "torchvision")
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
    """Writable space that is not kernel output: caches go here, not to /kaggle/working (saved, 20 GB cap)."""
    base = os.environ.get("KIT_SCRATCH_DIR") or ("/kaggle/tmp" if Path("/kaggle/tmp").is_dir() else tempfile.gettempdir())
    path = Path(base) / "kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def find_competition(slug: str, images: str, table: str) -> Path:
    """The competition folder holding the `images` folder and the `table` file (``test`` and
    ``sample_submission.csv``, or ``train`` and ``train.csv``): ``<root>/<slug>`` first, else any one
    or two levels down."""
    root = input_root()
    cands = [root / slug] + sorted(p.parent for p in root.glob(f"*/{table}"))
    cands += sorted(p.parent for p in root.glob(f"*/*/{table}"))
    for c in cands:
        if (c / images).is_dir() and (c / table).is_file():
            return c
    raise SystemExit(f"error: competition data ({images}/ and {table}) not found under {root}; "
                     f"add the '{slug}' competition as a data source")


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name (``PyYAML`` -> ``pyyaml``, ``typing_extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(dist: md.Distribution, env: dict[str, str] | None = None) -> list[str]:
    """Names of the distributions `dist` requires in marker environment `env` (default: this interpreter;
    extras not requested are skipped); `packaging`, else pip's vendored copy."""
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
        if req.marker is not None and not req.marker.evaluate({**(env or {}), "extra": ""}):
            continue
        names.append(canonical(req.name))
    return names


def torch_stack_pins() -> list[str]:
    """``name==version`` for torch, torchvision and their installed requirements (the image's own stack)."""
    pins: dict[str, str] = {}
    stack = list(TORCH_ROOTS)
    while stack:
        name = canonical(stack.pop())
        if name in pins:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        pins[name] = dist.version
        stack.extend(requirement_names(dist))
    return [f"{n}=={v}" for n, v in sorted(pins.items())]


def pip(*args: str) -> None:
    # --no-compile: byte-compiling every installed module costs more than half the install time;
    # Python compiles lazily what is imported.
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--disable-pip-version-check",
           "--no-input", "--quiet", "--no-compile", *args]
    log("$ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def install(code: Path) -> dict:
    """Install the code dataset's wheels, the image's torch stack pinned; returns its kit-bundle.json."""
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
    importlib.invalidate_caches()
    log("installed the kit " + md.version("hpa-kit"))
    return bundle


def kit(*args: str) -> None:
    """``python -m kit ARGS`` in the scratch folder; a failure fails the kernel."""
    cmd = [sys.executable, "-m", "kit", *args]
    log("$ python " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, cwd=scratch_dir())
