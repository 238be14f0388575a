"""Offline Kaggle kernels: bundle the kit, its wheels and a run's weights; validate; push.

Command ``python -m kit kernel build|push|estimate``.

``kernel build --run RUN_DIR --user USER --out build/kaggle`` lays out, ready for the kaggle CLI::

    build/kaggle/
      kit-build.json            what was built: ids, folders, figures (read by `kernel push`)
      code/                     dataset <user>/<prefix>-code
        dataset-metadata.json   {"title", "id", "licenses": [{"name": "CC0-1.0"}]}
        kit-bundle.json         manifest: kit wheel, pinned requirements, protected (never bundled) names
        requirements.txt        the pinned extras, one ``name==version`` a line
        wheels/*.whl            the kit wheel + one wheel per pinned extra (+ hpacellseg when given)
        hpacellseg-weights/     nuclei/cell model weights (only with --hpacellseg-weights)
        configs/train.yaml      the run's resolved config (the train kernel starts from it)
      weights/                  dataset <user>/<prefix>-weights
        dataset-metadata.json
        kit-weights.json        manifest: run id, folds, sha256 of every file
        run/config.yaml, run/manifest.json, run/combine.yaml, run/summary.json, run/train_metrics.json, run/{cell,image}/fold<k>/best.pt
      kernel/                   kernel <user>/<prefix>-infer: kernel-metadata.json + infer.py
      kernel-train/             kernel <user>/<prefix>-train (only with --train-kernel)

Inside Kaggle the kernel finds both datasets under ``/kaggle/input`` by their manifests, installs the
wheels with ``pip install --no-index --find-links`` while pinning the image's own torch stack (torch,
torchvision and everything they require: never replaced, never bundled), runs ``kit predict`` on the
competition's ``test/`` and writes ``/kaggle/working/submission.csv``.

Which wheels: the closure of `KERNEL_REQUIREMENTS` over the *installed* distributions of the building
environment (the versions the tests ran with), minus the torch stack. Each is gathered with
``pip download --no-deps --only-binary=:all:`` from ``--wheelhouse`` folders (offline, ``--no-index``)
or, with ``--index``, from pip's configured index; a wheel found nowhere is repacked from the installed
distribution when the target Python/platform is the building one (RECORD files, fresh hashes).

Metadata rules checked before the kaggle CLI sees them (kaggle-api, src/kaggle/api/kaggle_api_extended.py:
``dataset_create_new``: dataset slug 6-50 chars, title 6-50 chars, exactly one licence;
``kernels_push``: title >= 5 chars, ``code_file`` set and existing, ``id`` as ``{username}/{slug}``,
language in python/r/rmarkdown, kernel_type script/notebook, every dataset source as ``user/slug``;
``validate_kernel_string``: kernel slug >= 5 chars; a title that does not slugify to the id's slug gives
a warning there). Kaggle's web UI further caps titles at 50 chars and slugs to lowercase letters,
digits and hyphens; both are checked here too.

Credentials (``~/.kaggle/kaggle.json``, ``$KAGGLE_CONFIG_DIR``, ``$XDG_CONFIG_HOME/kaggle``,
``KAGGLE_USERNAME``/``KAGGLE_KEY``, ``KAGGLE_API_TOKEN``) are only ever tested for presence, never
read into output, and a build refuses to finish if a credential file or the key itself ended up in it.
``import kaggle`` authenticates at import, so the kit never imports it: it runs the ``kaggle`` executable.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import importlib.metadata as md
import json
import os
import pprint
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kit import __version__
from kit.atomic import atomic_open, atomic_path
from kit.errors import ConfigError, KitError

DEFAULT_COMPETITION = "hpa-single-cell-image-classification"
DEFAULT_PREFIX = "hpa-kit"
DEFAULT_LICENSE = "CC0-1.0"
KAGGLE_TIME_LIMIT_H = 9.0  # the competition's notebook limit (GPU and CPU)
DEFAULT_N_TEST = 559  # images in the competition's hidden test set

BUILD_MANIFEST = "kit-build.json"
BUNDLE_MANIFEST = "kit-bundle.json"
WEIGHTS_MANIFEST = "kit-weights.json"
KERNEL_META = "kernel-metadata.json"
DATASET_META = "dataset-metadata.json"

# What the kit imports at run time (predict and train), by distribution name. Their closure over the
# installed distributions, minus the torch stack, is what a code dataset bundles.
KERNEL_REQUIREMENTS = (
    "numpy", "pandas", "scipy", "scikit-learn", "iterative-stratification", "pycocotools",
    "opencv-python-headless", "scikit-image", "matplotlib", "pillow", "tqdm", "pyyaml",
)
# The Kaggle image's own stack: never bundled, and pinned to the installed versions by the kernel.
TORCH_ROOTS = ("torch", "torchvision")
_ALWAYS_PROTECTED = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")

_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
VALID_LANGUAGES = ("python", "r", "rmarkdown")
VALID_KERNEL_TYPES = ("script", "notebook")
REPO = Path(__file__).resolve().parents[1]
KERNEL_TEMPLATES = {"infer": REPO / "kernels/infer/infer.py", "train": REPO / "kernels/train/train.py"}
SETTINGS_BEGIN = "# >>> kit build settings"
SETTINGS_END = "# <<< kit build settings"


# --------------------------------------------------------------------------------------------------
# names, slugs, metadata validation


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``PyYAML`` -> ``pyyaml``, ``typing_extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title: lowercase ASCII words joined by single hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _check_ref(ref: Any, field_name: str, where: str, *, min_slug: int, max_slug: int = 50) -> list[str]:
    if not isinstance(ref, str) or ref.count("/") != 1:
        return [f"{where}: field '{field_name}' must be 'user/slug', got {ref!r}"]
    user, slug = ref.split("/")
    problems = []
    if not user or not _USER_RE.match(user):
        problems.append(f"{where}: field '{field_name}': user {user!r} is not a Kaggle user name")
    if not min_slug <= len(slug) <= max_slug:
        problems.append(
            f"{where}: field '{field_name}': slug {slug!r} has {len(slug)} characters; Kaggle needs {min_slug}-{max_slug}"
        )
    if not _SLUG_RE.match(slug):
        problems.append(
            f"{where}: field '{field_name}': slug {slug!r} may only hold lowercase letters, digits and single hyphens"
        )
    return problems


def _check_title(title: Any, where: str, *, min_len: int, max_len: int = 50) -> list[str]:
    if not isinstance(title, str) or not title.strip():
        return [f"{where}: field 'title' is missing"]
    if not min_len <= len(title) <= max_len:
        return [f"{where}: field 'title' {title!r} has {len(title)} characters; Kaggle needs {min_len}-{max_len}"]
    return []


def dataset_metadata_problems(meta: dict, where: str = DATASET_META) -> list[str]:
    """Every reason `kaggle datasets create` would reject this dataset-metadata.json (empty if none)."""
    problems = _check_ref(meta.get("id"), "id", where, min_slug=6)
    problems += _check_title(meta.get("title"), where, min_len=6)
    licenses = meta.get("licenses")
    if not isinstance(licenses, list) or len(licenses) != 1:
        n = len(licenses) if isinstance(licenses, list) else 0
        problems.append(f"{where}: field 'licenses' must hold exactly one licence, found {n}")
    elif not isinstance(licenses[0], dict) or not licenses[0].get("name"):
        problems.append(f"{where}: field 'licenses[0].name' is missing")
    return problems


def kernel_metadata_problems(meta: dict, folder: Path | None = None, where: str = KERNEL_META,
                             known_datasets: Iterable[str] | None = None) -> list[str]:
    """Every reason `kaggle kernels push` would reject this kernel-metadata.json (empty if none).

    `folder` (the kernel folder) lets the check see that ``code_file`` exists; `known_datasets`
    (the ids of the datasets built beside it) that every ``dataset_sources`` entry is one of them.
    """
    problems = _check_ref(meta.get("id"), "id", where, min_slug=5)
    problems += _check_title(meta.get("title"), where, min_len=5)
    code_file = meta.get("code_file")
    if not code_file:
        problems.append(f"{where}: field 'code_file' is missing")
    elif folder is not None and not (Path(folder) / code_file).is_file():
        problems.append(f"{where}: field 'code_file' names {code_file!r}, which is not in {folder}")
    if meta.get("language") not in VALID_LANGUAGES:
        problems.append(f"{where}: field 'language' must be one of {list(VALID_LANGUAGES)}, got {meta.get('language')!r}")
    if meta.get("kernel_type") not in VALID_KERNEL_TYPES:
        problems.append(
            f"{where}: field 'kernel_type' must be one of {list(VALID_KERNEL_TYPES)}, got {meta.get('kernel_type')!r}"
        )
    for key in ("is_private", "enable_gpu", "enable_internet"):
        if not isinstance(meta.get(key), bool):
            problems.append(f"{where}: field '{key}' must be set explicitly to true or false")
    if meta.get("enable_internet") is True:
        problems.append(f"{where}: field 'enable_internet' is true; the competition runs with the internet off")
    sources = meta.get("dataset_sources", [])
    if not isinstance(sources, list):
        problems.append(f"{where}: field 'dataset_sources' must be a list")
        sources = []
    known = set(known_datasets) if known_datasets is not None else None
    for i, ref in enumerate(sources):
        problems += _check_ref(ref, f"dataset_sources[{i}]", where, min_slug=6)
        if known is not None and ref not in known:
            problems.append(f"{where}: field 'dataset_sources[{i}]' = {ref!r} is none of the datasets built: {sorted(known)}")
    comps = meta.get("competition_sources", [])
    if not isinstance(comps, list) or any(not isinstance(c, str) or "/" in c or not c for c in comps):
        problems.append(f"{where}: field 'competition_sources' must be a list of competition slugs (no '/')")
    return problems


def kernel_title_warning(meta: dict) -> str | None:
    """kaggle-api warns when the title does not slugify to the id's slug; so do we."""
    ref, title = meta.get("id"), meta.get("title")
    if isinstance(ref, str) and "/" in ref and isinstance(title, str):
        if slugify(title) != ref.split("/")[1]:
            return (f"warning: kernel title {title!r} slugifies to {slugify(title)!r}, not to the id's slug "
                    f"{ref.split('/')[1]!r}; Kaggle may then create a kernel under another URL")
    return None


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} metadata problems:\n  " + "\n  ".join(problems))


def dataset_metadata(user: str, slug: str, title: str, license_name: str = DEFAULT_LICENSE,
                     description: str = "") -> dict:
    meta = {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": license_name}]}
    if description:
        meta["description"] = description
    return meta


def kernel_metadata(user: str, slug: str, title: str, code_file: str, *, dataset_sources: list[str],
                    competition: str | None, gpu: bool, private: bool = True, kernel_type: str = "script") -> dict:
    return {
        "id": f"{user}/{slug}",
        "title": title,
        "code_file": code_file,
        "language": "python",
        "kernel_type": kernel_type,
        "is_private": private,
        "enable_gpu": gpu,
        "enable_internet": False,  # explicit: code competitions reject kernels with internet on
        "dataset_sources": list(dataset_sources),
        "competition_sources": [competition] if competition else [],
        "kernel_sources": [],
        "model_sources": [],
    }


def _title_from_slug(slug: str) -> str:
    # "hpa-kit-infer" -> "Hpa Kit Infer": slugifies back to the slug, so kaggle-api does not warn.
    return " ".join(w.capitalize() for w in slug.split("-"))


# --------------------------------------------------------------------------------------------------
# runtime estimate

# Per-image figures used by `estimate_runtime`, with their sources. "here" = this project's dev
# machine (2 cores, AVX2, no GPU; docs: /work/shared/FACTS.md, medians on a shared machine).
# CNN speed is modelled as (backbone GFLOPs at 224 px) x (side/224)^2 / effective GFLOP/s.
BACKBONE_GFLOPS_224 = {  # torchvision model docs (GFLOPS at 224 x 224, 3 channels; the 4-channel stem adds 1-2%)
    "resnet18": 1.81, "resnet34": 3.66, "resnet50": 4.09, "resnet101": 7.80, "resnet152": 11.51,
    "efficientnet_b0": 0.39, "efficientnet_b3": 1.83, "densenet121": 2.83,
}
# CPU work per 2048 px field, one core (medians; the machine was shared, so these are upper-ish):
#   PNG decode of 4 channels: 16-bit 0.236 s (FACTS.md); classical segmentation at 1/4 scale 0.262 s,
#   cell table 0.174 s, tiles 0.127 s per 25 cells (benchmarks/bench_segment.py, run 2026-11-25 18:25 UTC,
#   3 synthetic 2048 px fields) -> 0.8 s. It does not shrink on a GPU machine (decoding and the
#   classical segmenter stay on the CPU).
CPU_S_PER_FIELD = 0.8
HARDWARE = {
    # effective_gflops: CNN inference throughput; hpacellseg_s: the HPA Cell Segmentator per field.
    "here-cpu": dict(effective_gflops=50.0, cpu_s_per_image=CPU_S_PER_FIELD, hpacellseg_s=30.0,
                     source="measured here, 2 cores: ResNet-50@224 ~11 tiles/s (45 GFLOP/s), ResNet-18@128 "
                            "~95 tiles/s (56 GFLOP/s) (FACTS.md); CPU work per field bench_segment.py; "
                            "hpacellseg on CPU: assumption"),
    "kaggle-cpu": dict(effective_gflops=100.0, cpu_s_per_image=CPU_S_PER_FIELD, hpacellseg_s=30.0,
                       source="assumption: a Kaggle CPU session has 4 cores, twice the CNN rate measured on 2 "
                              "here (FACTS.md); CPU work per field measured here (bench_segment.py)"),
    "t4": dict(effective_gflops=2000.0, cpu_s_per_image=CPU_S_PER_FIELD, hpacellseg_s=1.5,
               source="CNN: assumption, not measured: ~25% of the T4's 8.1 TFLOPS fp32 peak (NVIDIA T4 "
                      "datasheet), i.e. ~490 ResNet-50 tiles/s at 224 px; hpacellseg ~1.5 s/field (assumption); "
                      "CPU work per field measured here (bench_segment.py)"),
    "p100": dict(effective_gflops=2300.0, cpu_s_per_image=CPU_S_PER_FIELD, hpacellseg_s=1.5,
                 source="CNN: assumption, not measured: ~25% of the P100's 9.3 TFLOPS fp32 peak (NVIDIA P100 "
                        "datasheet); hpacellseg ~1.5 s/field (assumption); CPU work per field measured here"),
}
FIXED_OVERHEAD_S = 180.0  # pip install from the bundle + model loading (assumption; the kernel prints its own)


@dataclass
class Estimate:
    """A kernel runtime estimate; `lines()` is what `kernel build` prints."""

    n_images: int
    hardware: str
    seconds: float
    per_image_s: float
    parts: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    @property
    def fits(self) -> bool:
        return self.hours <= KAGGLE_TIME_LIMIT_H

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in self.parts.items())
        verdict = (f"fits in Kaggle's {KAGGLE_TIME_LIMIT_H:g} h with {KAGGLE_TIME_LIMIT_H - self.hours:.1f} h to spare"
                   if self.fits else f"WILL NOT FINISH within Kaggle's {KAGGLE_TIME_LIMIT_H:g} h limit")
        return [
            f"runtime estimate ({self.hardware}): {self.n_images} test images x {self.per_image_s:.2f} s/image "
            f"+ {FIXED_OVERHEAD_S:.0f} s set-up = {self.hours:.2f} h: {verdict}",
            f"  per image: {parts}",
            f"  figures: {self.source}",
        ]


def estimate_runtime(n_images: int = DEFAULT_N_TEST, *, hardware: str = "t4", cell_backbone: str = "resnet50",
                     image_backbone: str | None = None, tile_size: int = 128, field_size: int = 512,
                     n_folds: int = 5, cells_per_image: float = 25.0, tta: int = 1,
                     segmenter: str = "classical", mean_field_px: float = 2048.0) -> Estimate:
    """Seconds for `n_images` test fields on `hardware` (a `HARDWARE` key), from the figures above.

    Cost per image = CPU work (decode, segmentation, tiles; scaled by field area) + cell CNN
    (cells x folds x TTA tiles) + image CNN (folds x TTA fields), without overlap (an upper bound).
    """
    if hardware not in HARDWARE:
        raise ConfigError(f"--hardware {hardware!r}: choose one of {sorted(HARDWARE)}")
    hw = HARDWARE[hardware]

    def gflops(backbone: str, side: int) -> float:
        base = BACKBONE_GFLOPS_224.get(backbone, BACKBONE_GFLOPS_224["resnet50"])
        return base * (side / 224.0) ** 2

    area = (mean_field_px / 2048.0) ** 2
    cpu = hw["cpu_s_per_image"] * area
    seg = hw["hpacellseg_s"] * area if segmenter == "hpacellseg" else 0.0
    cell = cells_per_image * n_folds * tta * gflops(cell_backbone, tile_size) / hw["effective_gflops"]
    image = n_folds * tta * gflops(image_backbone or cell_backbone, field_size) / hw["effective_gflops"]
    parts = {"decode+classical seg+tiles": cpu, "cell CNN": cell, "image CNN": image}
    if seg:
        parts["hpacellseg"] = seg
    per_image = sum(parts.values())
    source = hw["source"]
    unknown = sorted({b for b in (cell_backbone, image_backbone or cell_backbone) if b not in BACKBONE_GFLOPS_224})
    if unknown:
        source += f"; no GFLOPs figure for {', '.join(unknown)}: ResNet-50's used"
    return Estimate(n_images, hardware, n_images * per_image + FIXED_OVERHEAD_S, per_image, parts, source)


def _run_figures(run_config: dict) -> dict:
    """The estimate's inputs read from a run's resolved config.yaml (missing keys keep defaults)."""
    out: dict[str, Any] = {}
    data = run_config.get("data") or {}
    cell = run_config.get("cell_model") or run_config.get("model") or {}
    image = run_config.get("image_model") or run_config.get("model") or {}
    if data.get("tile_size"):
        out["tile_size"] = int(data["tile_size"])
    if data.get("field_size"):
        out["field_size"] = int(data["field_size"])
    if data.get("segment_backend"):
        out["segmenter"] = str(data["segment_backend"])
    if cell.get("backbone"):
        out["cell_backbone"] = str(cell["backbone"])
    if image.get("backbone"):
        out["image_backbone"] = str(image["backbone"])
    tta = (run_config.get("predict") or {}).get("tta")
    if tta:
        out["tta"] = int(tta)
    return out


# --------------------------------------------------------------------------------------------------
# wheels


def _packaging(module: str, *names: str) -> tuple:
    """Objects from `packaging` (a dependency of scikit-image and matplotlib), else pip's vendored copy."""
    import importlib

    try:
        mod = importlib.import_module(f"packaging.{module}")
    except ImportError:
        mod = importlib.import_module(f"pip._vendor.packaging.{module}")
    return tuple(getattr(mod, n) for n in names)


def _requires(dist: md.Distribution, env: dict[str, str]) -> list[str]:
    """Names of the distributions `dist` requires in environment `env` (extras not requested are skipped)."""
    InvalidRequirement, Requirement = _packaging("requirements", "InvalidRequirement", "Requirement")
    names = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        names.append(canonical_name(req.name))
    return names


def _installed() -> dict[str, md.Distribution]:
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
    installed = _installed() if installed is None else installed
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
        stack.extend((dep, name) for dep in _requires(dist, env))
    return out


def protected_names(installed: dict[str, md.Distribution] | None = None) -> set[str]:
    """The torch stack: torch, torchvision and everything they require here, plus nvidia-*/triton/cuda-*."""
    installed = _installed() if installed is None else installed
    roots = [r for r in TORCH_ROOTS if r in installed]
    names = set(dependency_closure(roots, installed=installed)) if roots else set()
    return names | {n for n in installed if _ALWAYS_PROTECTED.match(n)} | set(TORCH_ROOTS)


def kernel_pins(extra: Iterable[str] = (), *, roots: Iterable[str] | None = None,
                python_version: str | None = None) -> tuple[dict[str, str], set[str]]:
    """(pins to bundle, protected names): the closure of `roots` (default KERNEL_REQUIREMENTS) + `extra`
    over the installed distributions, minus the torch stack."""
    installed = _installed()
    protected = protected_names(installed)
    roots = KERNEL_REQUIREMENTS if roots is None else tuple(roots)
    closure = dependency_closure([*roots, *extra], python_version=python_version, installed=installed)
    pins = {n: v for n, v in sorted(closure.items()) if n not in protected}
    return pins, protected


def _wheel_name_version(path: Path) -> tuple[str, str]:
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
    have = {_wheel_name_version(p): p for p in dest.glob("*.whl")}
    todo = [s for s in specs if (canonical_name(s.split("==")[0]), s.split("==")[1]) not in have]
    if not index:  # offline: ask pip only for what some wheelhouse has a file of (any tags)
        offered = {_wheel_name_version(p) for wh in wheelhouses for p in Path(wh).glob("*.whl")}
        todo = [s for s in todo if (canonical_name(s.split("==")[0]), s.split("==")[1]) in offered]
    if todo and (wheelhouses or index):
        res = _pip_download(todo, dest, wheelhouses=list(wheelhouses), index=index,
                            python_version=python_version, platforms=platforms)
        if res.returncode != 0:
            for spec in todo:
                _pip_download([spec], dest, wheelhouses=list(wheelhouses), index=index,
                              python_version=python_version, platforms=platforms)
    have = {_wheel_name_version(p): p for p in dest.glob("*.whl")}
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


def build_kit_wheel(dest: Path, source: Path = REPO) -> Path:
    """The kit as a pure-Python wheel in `dest`, built from a clean copy of the source (offline, no
    build isolation: the setuptools of this environment; the source tree gets no build/ or egg-info)."""
    if not (source / "pyproject.toml").is_file():
        raise ConfigError(f"{source}: no pyproject.toml; cannot build the kit wheel")
    dest.mkdir(parents=True, exist_ok=True)
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
        copy_atomic(wheels[0], final)
    return final


# --------------------------------------------------------------------------------------------------
# credentials (presence only; never read into output)


def credential_files() -> list[Path]:
    """Where the kaggle CLI looks for credentials, in its order."""
    paths = []
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        paths.append(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json")
    paths.append(Path.home() / ".kaggle" / "kaggle.json")
    paths.append(Path.home() / ".kaggle" / "access_token")
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    paths.append(Path(xdg) / "kaggle" / "kaggle.json")
    return paths


def have_credentials() -> str | None:
    """Where credentials were found (a description, never their value), or None."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME/KAGGLE_KEY)"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "environment (KAGGLE_API_TOKEN)"
    for p in credential_files():
        if p.is_file():
            return str(p)
    return None


def _secret_values() -> list[bytes]:
    """The credential values present (to check a bundle does not contain them); kept in memory only."""
    secrets = [os.environ.get(k, "") for k in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    for p in credential_files():
        try:
            text = p.read_text()
        except OSError:
            continue
        try:
            secrets.append(str(json.loads(text).get("key", "")))
        except (ValueError, AttributeError):
            secrets.append(text.strip())
    return [s.encode() for s in secrets if len(s) >= 8]


def check_no_credentials(root: Path) -> None:
    """Raise if a credential file, or a credential value, is anywhere under `root`."""
    secrets = _secret_values()
    for p in sorted(root.rglob("*")):
        if p.name in ("kaggle.json", "access_token") or p.name == ".kaggle":
            raise KitError(f"{p}: a Kaggle credential file is inside the bundle; remove it")
        if secrets and p.is_file() and p.stat().st_size < 50_000_000:
            data = p.read_bytes()
            if any(s in data for s in secrets):
                raise KitError(f"{p}: holds the Kaggle API key; remove it from the bundle")


# --------------------------------------------------------------------------------------------------
# build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """shutil.copy2 through kit.atomic: `dst` appears only once complete (a killed build leaves no half file)."""
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)
    return Path(dst)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _read_yaml(path: Path) -> dict:
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


def copy_run(run_dir: Path, dest: Path, *, include_last: bool = False, full_checkpoints: bool = False) -> dict:
    """Copy what inference needs from a run folder into `dest`; returns the weights manifest.

    Copies config.yaml (required), manifest.json, combine.yaml, summary.json, train_metrics.json and every ``<model>/fold<k>/best.pt``
    (``last.pt``, which also holds the optimizer state, only with `include_last`). best.pt is slimmed to
    what inference reads (`slim_checkpoint`) unless `full_checkpoints`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run {run_dir}: no config.yaml; not a run folder (runs/<id>/ from `kit train`)")
    names = ["best.pt", "last.pt"] if include_last else ["best.pt"]
    checkpoints = sorted(p for n in names for p in run_dir.glob(f"*/fold*/{n}"))
    if not any(p.name == "best.pt" for p in checkpoints):
        raise ConfigError(f"--run {run_dir}: no <model>/fold<k>/best.pt checkpoint; has the run finished a fold?")
    if dest.exists():
        shutil.rmtree(dest)
    files = [run_dir / "config.yaml"] + [run_dir / n for n in ("manifest.json", "combine.yaml", "summary.json",
                                                               "train_metrics.json") if (run_dir / n).is_file()]
    files += checkpoints
    manifest: dict[str, Any] = {"run_id": run_dir.resolve().name, "run_dir": "run", "folds": {}, "files": {},
                                "slim_checkpoints": not full_checkpoints}
    for src in files:
        rel = src.relative_to(run_dir)
        out = dest / "run" / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.name == "best.pt" and not full_checkpoints:
            slim_checkpoint(src, out)
        else:
            copy_atomic(src, out)
        manifest["files"][f"run/{rel.as_posix()}"] = _sha256(out)
        if src.name == "best.pt":
            manifest["folds"].setdefault(rel.parts[0], []).append(int(rel.parts[1][len("fold"):]))
    return manifest


def as_notebook(script: str) -> str:
    """A one-cell Jupyter notebook (nbformat 4) running `script` (its ``sys.exit(main())`` becomes ``main()``,
    which Jupyter does not report as an exit)."""
    code = script.replace("if __name__ == \"__main__\":\n    sys.exit(main())", "if __name__ == \"__main__\":\n    main()")
    nb = {
        "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "outputs": [],
                   "source": code.splitlines(keepends=True)}],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 4,
    }
    return json.dumps(nb, indent=1) + "\n"


def render_kernel(template: Path, settings: dict) -> str:
    """The kernel script with its settings block replaced by `settings`."""
    if not template.is_file():
        raise KitError(f"{template}: kernel template not found; run `kit kernel build` from a clone of the kit")
    text = template.read_text()
    start, end = text.find(SETTINGS_BEGIN), text.find(SETTINGS_END)
    if start < 0 or end < start:
        raise KitError(f"{template}: no '{SETTINGS_BEGIN}' ... '{SETTINGS_END}' block to fill")
    line_end = text.index("\n", start) + 1
    body = "SETTINGS = " + pprint.pformat(settings, width=100, sort_dicts=False) + "\n"
    return text[:line_end] + body + text[end:]


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


def build(opts: BuildOptions, log=print) -> dict:
    """Lay out the code dataset, the weights dataset and the kernel folder(s) under `opts.out`."""
    if not _USER_RE.match(opts.user or ""):
        raise ConfigError(f"--user {opts.user!r} is not a Kaggle user name")
    out = Path(opts.out)
    slugs = {"code": f"{opts.prefix}-code", "weights": f"{opts.prefix}-weights",
             "infer": f"{opts.prefix}-infer", "train": f"{opts.prefix}-train"}
    ids = {k: f"{opts.user}/{v}" for k, v in slugs.items()}
    datasets = {
        "code": dataset_metadata(opts.user, slugs["code"], f"{_title_from_slug(slugs['code'])}", opts.license_name,
                                 "The hpa-kit package and its pinned wheels for offline kernels (kit kernel build)."),
        "weights": dataset_metadata(opts.user, slugs["weights"], f"{_title_from_slug(slugs['weights'])}",
                                    opts.license_name, "Fold checkpoints and resolved config of one kit run."),
    }
    if opts.kernel_type not in VALID_KERNEL_TYPES:
        raise ConfigError(f"--kernel-type {opts.kernel_type!r}: choose one of {list(VALID_KERNEL_TYPES)}")
    ext = ".ipynb" if opts.kernel_type == "notebook" else ".py"
    kernels = {"infer": kernel_metadata(opts.user, slugs["infer"], _title_from_slug(slugs["infer"]), "infer" + ext,
                                        dataset_sources=[ids["code"], ids["weights"]], competition=opts.competition,
                                        gpu=opts.gpu, private=opts.private, kernel_type=opts.kernel_type)}
    if opts.train_kernel:
        kernels["train"] = kernel_metadata(opts.user, slugs["train"], _title_from_slug(slugs["train"]), "train" + ext,
                                           dataset_sources=[ids["code"]], competition=opts.competition,
                                           gpu=opts.gpu, private=opts.private, kernel_type=opts.kernel_type)
    # Validate everything before any file is written.
    problems = []
    for name, meta in datasets.items():
        problems += dataset_metadata_problems(meta, f"{name}/{DATASET_META}")
    for name, meta in kernels.items():
        problems += kernel_metadata_problems(meta, None, f"{_kernel_dir(name)}/{KERNEL_META}", set(ids[k] for k in datasets))
    _raise_problems(problems)
    for p in (opts.hpacellseg_wheel, opts.hpacellseg_weights):
        if p is not None and not Path(p).exists():
            raise ConfigError(f"{p}: not found")
    if opts.hpacellseg_wheel is not None and not str(opts.hpacellseg_wheel).endswith(".whl"):
        raise ConfigError(f"--hpacellseg-wheel {opts.hpacellseg_wheel}: not a .whl file")

    out.mkdir(parents=True, exist_ok=True)
    # weights dataset
    log(f"weights dataset: copying {opts.run_dir} -> {out / 'weights'}")
    weights_manifest = copy_run(Path(opts.run_dir), out / "weights", include_last=opts.include_last,
                                full_checkpoints=opts.full_checkpoints)
    weights_manifest.update(created=_now(), kit_version=__version__)
    _write_json(out / "weights" / WEIGHTS_MANIFEST, weights_manifest)
    _write_json(out / "weights" / DATASET_META, datasets["weights"])
    run_config = _read_yaml(Path(opts.run_dir) / "config.yaml")

    # code dataset
    code = out / "code"
    wheels = code / "wheels"
    target = opts.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    if (code / BUNDLE_MANIFEST).is_file() and json.loads((code / BUNDLE_MANIFEST).read_text()).get("python") != target:
        shutil.rmtree(wheels, ignore_errors=True)  # wheels of an earlier build for another Python
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"code dataset: building the kit wheel -> {wheels}")
    kit_wheel = build_kit_wheel(wheels)
    pins, protected = kernel_pins(opts.extra_packages, roots=opts.packages, python_version=opts.python_version)
    log(f"code dataset: gathering {len(pins)} pinned wheels (torch stack excluded: {len(protected)} names)")
    keep = {kit_wheel.name}
    sources = gather_wheels(pins, wheels, wheelhouses=opts.wheelhouses, index=opts.index,
                            python_version=opts.python_version, platforms=opts.platforms, log=log)
    wanted = {(n, v) for n, v in pins.items()}
    for whl in wheels.glob("*.whl"):
        if _wheel_name_version(whl) in wanted:
            keep.add(whl.name)
    hpacellseg = None
    if opts.hpacellseg_wheel is not None:
        copy_atomic(opts.hpacellseg_wheel, wheels / Path(opts.hpacellseg_wheel).name)
        hpacellseg = Path(opts.hpacellseg_wheel).name
        keep.add(hpacellseg)
    for whl in wheels.glob("*.whl"):  # stale wheels of an earlier build would confuse the resolver
        if whl.name not in keep:
            whl.unlink()
    weights_dir = None
    if opts.hpacellseg_weights is not None:
        weights_dir = "hpacellseg-weights"
        if (code / weights_dir).exists():
            shutil.rmtree(code / weights_dir)
        src = Path(opts.hpacellseg_weights)
        for f in sorted(src.rglob("*")) if src.is_dir() else [src]:
            if f.is_file():
                copy_atomic(f, code / weights_dir / (f.relative_to(src) if src.is_dir() else f.name))
    pretrained = _bundle_pretrained(run_config, code) if opts.train_kernel else {}
    with atomic_open(code / "requirements.txt") as f:
        f.write("# pinned extras of the kit for the Kaggle kernel (torch stack excluded; see kit-bundle.json)\n")
        f.writelines(f"{n}=={v}\n" for n, v in pins.items())
    (code / "configs").mkdir(exist_ok=True)
    copy_atomic(Path(opts.run_dir) / "config.yaml", code / "configs" / "train.yaml")
    bundle = {
        "kit_version": __version__,
        "created": _now(),
        "python": target,
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
    settings = {"competition": opts.competition, "code_dataset": slugs["code"], "weights_dataset": slugs["weights"],
                "predict_args": list(opts.predict_args)}
    for name, meta in kernels.items():
        kdir = out / _kernel_dir(name)
        kdir.mkdir(parents=True, exist_ok=True)
        s = dict(settings)
        if name == "train":
            s = {"competition": opts.competition, "code_dataset": slugs["code"], "fold": opts.train_fold,
                 "n_splits": opts.n_splits, "train_args": list(opts.train_args)}
        for old in kdir.glob(f"{name}.*"):  # the other kernel type of an earlier build
            old.unlink()
        text = render_kernel(KERNEL_TEMPLATES[name], s)
        with atomic_open(kdir / meta["code_file"]) as f:
            f.write(as_notebook(text) if opts.kernel_type == "notebook" else text)
        _write_json(kdir / KERNEL_META, meta)
        _raise_problems(kernel_metadata_problems(meta, kdir, f"{kdir}/{KERNEL_META}", set(ids[k] for k in datasets)))
        warning = kernel_title_warning(meta)
        if warning:
            log(warning)
    check_no_credentials(out)

    figures = {"n_images": opts.n_test, "hardware": opts.hardware or ("t4" if opts.gpu else "kaggle-cpu"),
               "n_folds": max((len(v) for v in weights_manifest["folds"].values()), default=1),
               **_run_figures(run_config)}
    estimate = estimate_runtime(figures.pop("n_images"), **figures)
    manifest = {
        "kit_version": __version__, "created": _now(), "user": opts.user, "competition": opts.competition,
        "datasets": {k: {"dir": k, "id": ids[k]} for k in datasets},
        "kernels": {k: {"dir": _kernel_dir(k), "id": ids[k]} for k in kernels},
        "estimate": {"hardware": estimate.hardware, "hours": round(estimate.hours, 3), "fits": estimate.fits},
    }
    _write_json(out / BUILD_MANIFEST, manifest)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"built {out}: {len(list(wheels.glob('*.whl')))} wheels, "
        f"{sum(len(v) for v in weights_manifest['folds'].values())} checkpoints, {size / 1e6:.1f} MB")
    for line in estimate.lines():
        log(line)
    return manifest


def _bundle_pretrained(run_config: dict, code: Path) -> dict:
    """Copy the run's local ImageNet weights files (model.pretrained) into the code dataset for the train
    kernel; ``{cell_model|image_model: relative path}``. A path that does not exist here is skipped."""
    out = {}
    for kind in ("cell_model", "image_model"):
        path = (run_config.get(kind) or {}).get("pretrained")
        if path and Path(path).is_file():
            dst = code / "pretrained" / Path(path).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.is_file() or dst.stat().st_size != Path(path).stat().st_size:
                copy_atomic(path, dst)
            out[kind] = f"pretrained/{dst.name}"
    return out


def _kernel_dir(name: str) -> str:
    return "kernel" if name == "infer" else f"kernel-{name}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# push


def push_commands(out: Path, *, mode: str = "auto", message: str = "kit kernel build") -> list[list[str]]:
    """The kaggle CLI commands that publish a build, in order (datasets first, then the kernels).

    `mode` "new" -> ``kaggle datasets create``, "update" -> ``kaggle datasets version``; "both" lists
    both alternatives for each dataset (dry-run display), "auto" decides later (see `push`).
    """
    manifest = load_build(out)
    cmds: list[list[str]] = []
    for name, d in manifest["datasets"].items():
        folder = str(Path(out) / d["dir"])
        create = ["kaggle", "datasets", "create", "-p", folder, "--dir-mode", "zip"]
        version = ["kaggle", "datasets", "version", "-p", folder, "-m", message, "--dir-mode", "zip"]
        if mode in ("new", "both", "auto"):
            cmds.append(create)
        if mode in ("update", "both"):
            cmds.append(version)
    for name, k in manifest["kernels"].items():
        cmds.append(["kaggle", "kernels", "push", "-p", str(Path(out) / k["dir"])])
    return cmds


def load_build(out: Path) -> dict:
    """Read and re-validate a build folder (metadata may have been edited by hand since)."""
    out = Path(out)
    path = out / BUILD_MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path} not found; run `python -m kit kernel build --out {out}` first")
    manifest = json.loads(path.read_text())
    problems = []
    ids = set()
    for name, d in manifest["datasets"].items():
        meta_path = out / d["dir"] / DATASET_META
        if not meta_path.is_file():
            problems.append(f"{meta_path}: missing")
            continue
        meta = json.loads(meta_path.read_text())
        ids.add(meta.get("id"))
        problems += dataset_metadata_problems(meta, str(meta_path))
    for name, k in manifest["kernels"].items():
        meta_path = out / k["dir"] / KERNEL_META
        if not meta_path.is_file():
            problems.append(f"{meta_path}: missing")
            continue
        problems += kernel_metadata_problems(json.loads(meta_path.read_text()), out / k["dir"], str(meta_path), ids)
    _raise_problems(problems)
    return manifest


def _kaggle_exe() -> str | None:
    exe = shutil.which("kaggle")
    if exe is None:
        cand = Path(sys.executable).with_name("kaggle")
        exe = str(cand) if cand.is_file() else None
    return exe


def _run_kaggle(args: list[str]) -> tuple[subprocess.CompletedProcess, str]:
    res = subprocess.run(args, capture_output=True, text=True)
    return res, (res.stdout + res.stderr).strip()


def _failed(res: subprocess.CompletedProcess, text: str) -> bool:
    # The kaggle CLI reports some failures ("Dataset creation error: ...", "Kernel push error: ...")
    # with exit status 0, so its words count too.
    return res.returncode != 0 or re.search(r"\berror\b", text, re.I) is not None


def push(out: Path, *, dry_run: bool = False, mode: str = "auto", message: str = "kit kernel build",
         log=print) -> int:
    """Print (dry run) or run the kaggle CLI commands of a build. Returns an exit code."""
    cmds = push_commands(out, mode="both" if dry_run and mode == "auto" else mode, message=message)
    if dry_run:
        log("# dry run: the commands `kernel push` would run (datasets first, then kernels).")
        if mode == "auto":
            log("# For each dataset: `datasets create` the first time, `datasets version` once it exists.")
        for c in cmds:
            log(shlex.join(c))
        return 0
    where = have_credentials()
    if where is None:
        raise KitError(
            "no Kaggle credentials: put kaggle.json (from kaggle.com > Settings > API) in ~/.kaggle/ (chmod 600) "
            "or set KAGGLE_USERNAME and KAGGLE_KEY; nothing was pushed. `--dry-run` prints the commands."
        )
    exe = _kaggle_exe()
    if exe is None:
        raise KitError("the kaggle CLI is not installed: `pip install kaggle` (only needed for push); nothing was pushed")
    log(f"credentials found ({where.split(' ')[0] if where.startswith('environment') else 'file'}); pushing")
    for c in cmds:
        log("$ " + shlex.join(c))
        res, text = _run_kaggle([exe, *c[1:]])
        exists = re.search(r"already (exists|in use)|\b409\b", text, re.I)
        if _failed(res, text) and mode == "auto" and c[1:3] == ["datasets", "create"] and exists:
            alt = ["datasets", "version", "-p", c[4], "-m", message, "--dir-mode", "zip"]
            log(f"  the dataset exists; $ {shlex.join(['kaggle', *alt])}")
            res, text = _run_kaggle([exe, *alt])
        if text:
            log("  " + text.replace("\n", "\n  "))
        if _failed(res, text):
            log(f"error: `{shlex.join(c)}` failed (status {res.returncode}); later commands were not run")
            return res.returncode or 1
    return 0


# --------------------------------------------------------------------------------------------------
# CLI


def configure_kernel(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,push,estimate}")
    b = sub.add_parser("build", help="lay out the code and weights datasets and the kernel folder(s)")
    b.add_argument("--run", required=True, type=Path, help="run folder (runs/<id>/ with config.yaml and */fold<k>/best.pt)")
    b.add_argument("--user", required=True, help="your Kaggle user name (owner of the datasets and kernels)")
    b.add_argument("--competition", default=DEFAULT_COMPETITION)
    b.add_argument("--out", type=Path, default=Path("build/kaggle"))
    b.add_argument("--prefix", default=DEFAULT_PREFIX, help="slug prefix: <prefix>-code, -weights, -infer, -train")
    b.add_argument("--license", dest="license_name", default=DEFAULT_LICENSE, help="dataset licence name (one)")
    b.add_argument("--wheelhouse", action="append", type=Path, default=[],
                   help="folder of wheels to take the pinned extras from (repeatable; offline: --no-index)")
    b.add_argument("--index", action="store_true", help="also let pip download from its configured index (network)")
    b.add_argument("--python-version", default=None,
                   help="the kernel's Python (e.g. 3.11) when it differs from this one; wheels are then chosen for it")
    b.add_argument("--platform", action="append", default=None, help="wheel platform tags with --python-version")
    b.add_argument("--extra-package", action="append", default=[], help="bundle this installed distribution too")
    b.add_argument("--package", action="append", default=None, dest="packages",
                   help="bundle only these distributions (+ what they require) instead of the kit's run-time set")
    b.add_argument("--hpacellseg-wheel", type=Path, default=None, help="wheel of the HPA Cell Segmentator")
    b.add_argument("--hpacellseg-weights", type=Path, default=None, help="folder with its nuclei/cell model weights")
    b.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True, help="kernel with a GPU (default)")
    b.add_argument("--public", action="store_true", help="make the kernel public (default private)")
    b.add_argument("--kernel-type", choices=VALID_KERNEL_TYPES, default="script",
                   help="script (default) or notebook (a one-cell .ipynb of the same code)")
    b.add_argument("--include-last", action="store_true", help="also bundle last.pt (with optimizer state)")
    b.add_argument("--full-checkpoints", action="store_true",
                   help="copy best.pt as is (default: only the weights and config inference reads, ~1/3 the size)")
    b.add_argument("--train-kernel", action="store_true", help="also lay out kernel-train/ (trains one fold)")
    b.add_argument("--train-fold", type=int, default=0, help="the fold the train kernel trains")
    b.add_argument("--n-splits", type=int, default=5, help="folds the train kernel cuts (same seed = same folds)")
    b.add_argument("--train-arg", action="append", default=[], help="extra `kit train` argument/override (repeatable)")
    b.add_argument("--n-test", type=int, default=DEFAULT_N_TEST, help="test images for the runtime estimate")
    b.add_argument("--hardware", choices=sorted(HARDWARE), default=None, help="hardware of the runtime estimate")
    b.add_argument("--predict-arg", action="append", default=[], help="extra argument passed to `kit predict`")
    b.set_defaults(func=_cmd_build)

    p = sub.add_parser("push", help="publish a build with the kaggle CLI (or print the commands)")
    p.add_argument("--out", type=Path, default=Path("build/kaggle"))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--new", dest="mode", action="store_const", const="new", help="datasets do not exist yet: create")
    g.add_argument("--update", dest="mode", action="store_const", const="update", help="datasets exist: new version")
    p.add_argument("-m", "--message", default="kit kernel build", help="dataset version message")
    p.set_defaults(func=_cmd_push, mode="auto")

    e = sub.add_parser("estimate", help="print the kernel runtime estimate for a run")
    e.add_argument("--run", type=Path, default=None)
    e.add_argument("--n-test", type=int, default=DEFAULT_N_TEST)
    e.add_argument("--hardware", choices=sorted(HARDWARE), default="t4")
    e.add_argument("--folds", type=int, default=None)
    e.set_defaults(func=_cmd_estimate)


def _cmd_build(args: argparse.Namespace) -> int:
    opts = BuildOptions(
        run_dir=args.run, user=args.user, out=args.out, competition=args.competition, prefix=args.prefix,
        license_name=args.license_name, wheelhouses=args.wheelhouse, index=args.index,
        python_version=args.python_version, extra_packages=args.extra_package, packages=args.packages,
        hpacellseg_wheel=args.hpacellseg_wheel, hpacellseg_weights=args.hpacellseg_weights, gpu=args.gpu,
        private=not args.public, kernel_type=args.kernel_type, include_last=args.include_last, full_checkpoints=args.full_checkpoints, train_kernel=args.train_kernel,
        train_fold=args.train_fold, n_splits=args.n_splits, train_args=args.train_arg, n_test=args.n_test, hardware=args.hardware, predict_args=args.predict_arg,
    )
    if args.platform:
        opts.platforms = args.platform
    build(opts)
    print(f"next: python -m kit kernel push --out {args.out} --dry-run")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    return push(args.out, dry_run=args.dry_run, mode=args.mode, message=args.message)


def _cmd_estimate(args: argparse.Namespace) -> int:
    figures: dict[str, Any] = {}
    if args.run is not None:
        figures = _run_figures(_read_yaml(Path(args.run) / "config.yaml"))
        folds = {p.parent.name for p in Path(args.run).glob("*/fold*/best.pt")}
        if folds:
            figures["n_folds"] = len(folds)
    if args.folds:
        figures["n_folds"] = args.folds
    for line in estimate_runtime(args.n_test, hardware=args.hardware, **figures).lines():
        print(line)
    return 0
