"""The wheels a code dataset bundles: the kit's run-time requirements closed over the installed
distributions (the versions the tests ran with), minus the torch stack, and the kit's own wheel.

Each pinned wheel is gathered with ``pip download --no-deps --only-binary=:all:`` from ``--wheelhouse``
folders (offline, ``--no-index``) or, with ``--index``, from pip's configured index; a wheel found
nowhere is repacked from the installed distribution when the target Python/platform is the building one
(RECORD files, fresh hashes). The torch stack (torch, torchvision and everything they require,
nvidia-*, triton, cuda-*) is never bundled: a Kaggle kernel keeps the image's own CUDA build.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import kit
from kit.atomic import atomic_path
from kit.errors import ConfigError, KitError
# The kernels' standard-library prelude is the one home of requirement parsing (the kernel pins the
# image's torch stack with it); the closure here walks the same requirements.
from kit.kernels.prelude import canonical as canonical_name
from kit.kernels.prelude import requirement_names

# What the kit imports at run time (predict and train), by distribution name. Their closure over the
# installed distributions, minus the torch stack, is what a code dataset bundles.
KERNEL_REQUIREMENTS = (
    "numpy", "pandas", "scipy", "scikit-learn", "iterative-stratification", "pycocotools",
    "opencv-python-headless", "scikit-image", "matplotlib", "pillow", "tqdm", "pyyaml",
)
# The Kaggle image's own stack: never bundled, and pinned to the installed versions by the kernel.
TORCH_ROOTS = ("torch", "torchvision")
_ALWAYS_PROTECTED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")


def _packaging(module: str, *names: str) -> tuple:
    """Objects from `packaging` (a dependency of scikit-image and matplotlib), else pip's vendored copy."""
    import importlib

    try:
        mod = importlib.import_module(f"packaging.{module}")
    except ImportError:
        mod = importlib.import_module(f"pip._vendor.packaging.{module}")
    return tuple(getattr(mod, n) for n in names)


def installed_distributions() -> dict[str, md.Distribution]:
    """``{canonical name: distribution}`` of everything importable here."""
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical_name(name), dist)  # first on sys.path wins, as for imports
    return found


def _marker_env(python_version: str | None) -> dict[str, str]:
    (default_environment,) = _packaging("markers", "default_environment")
    env = default_environment()
    if python_version:
        env["python_version"] = python_version
        env["python_full_version"] = python_version + ".0"
    return env


def dependency_closure(roots: Iterable[str], *, python_version: str | None = None,
                       installed: dict[str, md.Distribution] | None = None) -> dict[str, str]:
    """``{name: installed version}`` for `roots` and everything they require, from installed metadata.

    Raises ConfigError naming a root or requirement that is not installed here.
    """
    installed = installed_distributions() if installed is None else installed
    env = _marker_env(python_version)
    out: dict[str, str] = {}
    stack = [(canonical_name(r), None) for r in roots]
    while stack:
        name, parent = stack.pop()
        if name in out:
            continue
        dist = installed.get(name)
        if dist is None:
            via = f" (required by {parent})" if parent else ""
            raise ConfigError(f"{name}{via} is not installed in {sys.prefix}; the bundle pins installed versions")
        out[name] = dist.version
        stack.extend((dep, name) for dep in requirement_names(dist, env))
    return out


def protected_names(installed: dict[str, md.Distribution] | None = None) -> set[str]:
    """The torch stack: torch, torchvision and everything they require here, plus nvidia-*/triton/cuda-*."""
    installed = installed_distributions() if installed is None else installed
    roots = [r for r in TORCH_ROOTS if r in installed]
    names = set(dependency_closure(roots, installed=installed)) if roots else set()
    return names | {n for n in installed if _ALWAYS_PROTECTED.match(n)} | set(TORCH_ROOTS)


def kernel_pins(extra: Iterable[str] = (), *, roots: Iterable[str] | None = None,
                python_version: str | None = None) -> tuple[dict[str, str], set[str]]:
    """(pins to bundle, protected names): the closure of `roots` (default KERNEL_REQUIREMENTS) + `extra`
    over the installed distributions, minus the torch stack."""
    installed = installed_distributions()
    protected = protected_names(installed)
    roots = KERNEL_REQUIREMENTS if roots is None else tuple(roots)
    closure = dependency_closure([*roots, *extra], python_version=python_version, installed=installed)
    pins = {n: v for n, v in sorted(closure.items()) if n not in protected}
    return pins, protected


def wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name[:-4].split("-")
    return canonical_name(parts[0]), parts[1]


def _pip_download(specs: list[str], dest: Path, *, wheelhouses: list[Path], index: bool,
                  python_version: str | None, platforms: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), "--quiet"]
    if not index:
        cmd.append("--no-index")
    for wh in wheelhouses:
        cmd += ["--find-links", str(wh)]
    if python_version:
        cmd += ["--python-version", python_version, "--implementation", "cp"]
        for plat in platforms:
            cmd += ["--platform", plat]
    return subprocess.run(cmd + specs, capture_output=True, text=True)


def repack_installed(name: str, dest: Path) -> Path:
    """Rebuild the wheel of installed distribution `name` from its RECORD (offline last resort).

    Takes the files pip recorded under site-packages (not scripts or data outside it, which pip
    regenerates from entry_points.txt), drops byte-code and installer files, writes a fresh RECORD
    with sha256 hashes, and names the wheel with the tags of the dist-info's WHEEL file.
    """
    dist = md.distribution(name)
    files = dist.files or []
    dist_info = next((f.parts[0] for f in files if f.parts and f.parts[0].endswith(".dist-info")), None)
    if dist_info is None:
        raise ConfigError(f"cannot repack {name}: its RECORD lists no .dist-info folder")
    wheel_txt = (dist.read_text("WHEEL") or "")
    tags = [line.split(":", 1)[1].strip() for line in wheel_txt.splitlines() if line.startswith("Tag:")]
    if not tags:
        raise ConfigError(f"cannot repack {name}: its WHEEL file names no tag")
    py = sorted({t.split("-")[0] for t in tags})
    abi = sorted({t.split("-")[1] for t in tags})
    plat = sorted({t.split("-")[2] for t in tags})
    stem = f"{dist_info[: -len('.dist-info')].rsplit('-', 1)[0]}-{dist.version}"
    out = Path(dest) / f"{stem}-{'.'.join(py)}-{'.'.join(abi)}-{'.'.join(plat)}.whl"
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    records = []
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for f in files:
            if not f.parts or f.parts[0] == ".." or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            if f.parts[0] == dist_info and f.name in skip:
                continue
            src = Path(f.locate())
            if not src.is_file():
                continue
            data = src.read_bytes()
            arc = "/".join(f.parts)
            info = zipfile.ZipInfo(arc, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (src.stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED  # level 1 (writestr): faster than the default 6
            zf.writestr(info, data, compresslevel=1)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{arc},sha256={digest},{len(data)}")
        records.append(f"{dist_info}/RECORD,,")
        zf.writestr(zipfile.ZipInfo(f"{dist_info}/RECORD", date_time=(2020, 1, 1, 0, 0, 0)), "\n".join(records) + "\n")
    return out


def gather_wheels(pins: dict[str, str], dest: Path, *, wheelhouses: list[Path] = (), index: bool = False,
                  python_version: str | None = None, platforms: list[str] | None = None,
                  repack: bool = True, log=print) -> dict[str, str]:
    """Put one wheel per pin into `dest`; returns ``{name: where it came from}``.

    One ``pip download`` for all pins first (fast); on failure one per pin, so a single missing wheel
    is named; what pip cannot find is repacked from the installed distribution when the target is
    this interpreter (`python_version` None), else it is an error listing every missing wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    platforms = platforms or []
    specs = [f"{n}=={v}" for n, v in pins.items()]
    sources: dict[str, str] = {}
    have = {wheel_name_version(p): p for p in dest.glob("*.whl")}
    todo = [s for s in specs if (canonical_name(s.split("==")[0]), s.split("==")[1]) not in have]
    if not index:  # offline: ask pip only for what some wheelhouse has a file of (any tags)
        offered = {wheel_name_version(p) for wh in wheelhouses for p in Path(wh).glob("*.whl")}
        todo = [s for s in todo if (canonical_name(s.split("==")[0]), s.split("==")[1]) in offered]
    if todo and (wheelhouses or index):
        res = _pip_download(todo, dest, wheelhouses=list(wheelhouses), index=index,
                            python_version=python_version, platforms=platforms)
        if res.returncode != 0:
            for spec in todo:
                _pip_download([spec], dest, wheelhouses=list(wheelhouses), index=index,
                              python_version=python_version, platforms=platforms)
    have = {wheel_name_version(p): p for p in dest.glob("*.whl")}
    missing = []
    from tqdm import tqdm

    for name, version in tqdm(pins.items(), desc="wheels", unit="wheel", disable=None, leave=False):
        if (name, version) in have:
            sources[name] = "pip download" + (f" from {', '.join(map(str, wheelhouses))}" if wheelhouses else "")
            continue
        if repack and python_version is None:
            repack_installed(name, dest)
            sources[name] = "repacked from the installed distribution"
            continue
        missing.append(f"{name}=={version}")
    if missing:
        where = ", ".join(map(str, wheelhouses)) or "pip's index"
        raise ConfigError(
            f"no wheel for {', '.join(missing)} in {where} for Python {python_version or 'here'}; "
            f"add a --wheelhouse holding them (e.g. `pip download --only-binary=:all: --no-deps -d DIR "
            f"{' '.join(missing)}` on a machine with network), or pass --index"
        )
    repacked = [n for n, s in sources.items() if s.startswith("repacked")]
    if repacked:
        log(f"  repacked from installed distributions (no wheel found): {', '.join(repacked)}")
    return sources


def kit_source() -> Path | None:
    """The checkout the running kit is imported from (its pyproject.toml beside ``kit/``), or None when
    the kit runs from an installed distribution (a wheel or a plain ``pip install .``)."""
    root = Path(kit.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "hpa-kit"' in pyproject.read_text():
        return root
    return None


def build_kit_wheel(dest: Path, source: Path | None = None) -> Path:
    """The kit as a pure-Python wheel in `dest`.

    From a checkout (`source`, default `kit_source()`): built from a clean copy of the source (offline,
    no build isolation: the setuptools of this environment; the source tree gets no build/ or egg-info).
    From an installed kit: the installed distribution repacked (`repack_installed`), so `kit kernel
    build` works from a pip-installed kit too.
    """
    source = kit_source() if source is None else Path(source)
    dest.mkdir(parents=True, exist_ok=True)
    if source is None:
        dist = installed_distributions().get("hpa-kit")
        here = Path(kit.__file__).resolve()
        if dist is None or Path(dist.locate_file("kit/__init__.py")).resolve() != here:
            raise KitError(f"the kit at {here.parent} is neither a checkout (no pyproject.toml beside it) nor an "
                           "installed distribution of hpa-kit; cannot build the kit wheel")
        for old in dest.glob("hpa_kit-*.whl"):
            old.unlink()
        return repack_installed("hpa-kit", dest)
    if not (source / "pyproject.toml").is_file():
        raise ConfigError(f"{source}: no pyproject.toml; cannot build the kit wheel")
    with tempfile.TemporaryDirectory(prefix="kit-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            if (source / name).is_file():
                shutil.copy2(source / name, src / name)
        shutil.copytree(source / "kit", src / "kit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp*"))
        out = Path(tmp) / "out"
        res = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
             "--disable-pip-version-check", "--quiet", "-w", str(out), str(src)],
            capture_output=True, text=True,
        )
        wheels = list(out.glob("*.whl"))
        if res.returncode != 0 or len(wheels) != 1:
            raise KitError(f"building the kit wheel failed (needs setuptools>=70.1 in {sys.prefix}):\n{res.stderr[-2000:]}")
        for old in dest.glob("hpa_kit-*.whl"):
            old.unlink()
        final = dest / wheels[0].name
        with atomic_path(final) as tmp_final:
            shutil.copy2(wheels[0], tmp_final)
    return final
