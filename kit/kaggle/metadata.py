"""The kaggle CLI's rules for dataset-metadata.json and kernel-metadata.json, checked before it sees them.

Sources (kaggle-api, src/kaggle/api/kaggle_api_extended.py): ``dataset_create_new``: dataset slug
6-50 chars, title 6-50 chars, exactly one licence; ``kernels_push``: title >= 5 chars, ``code_file``
set and existing, ``id`` as ``{username}/{slug}``, language in python/r/rmarkdown, kernel_type
script/notebook, every dataset source as ``user/slug``; ``validate_kernel_string``: kernel slug >= 5
chars; a title that does not slugify to the id's slug gives a warning there. Kaggle's web UI further
caps titles at 50 chars and slugs to lowercase letters, digits and hyphens; both are checked here too.
Every problem is a string naming the file and the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from kit.errors import ConfigError

DEFAULT_COMPETITION = "hpa-single-cell-image-classification"
DEFAULT_PREFIX = "hpa-kit"
DEFAULT_LICENSE = "CC0-1.0"
KERNEL_META = "kernel-metadata.json"
DATASET_META = "dataset-metadata.json"
VALID_LANGUAGES = ("python", "r", "rmarkdown")
VALID_KERNEL_TYPES = ("script", "notebook")

_SLUG_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def slugify(title: str) -> str:
    """The slug Kaggle derives from a title: lowercase ASCII words joined by single hyphens."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def title_from_slug(slug: str) -> str:
    """"hpa-kit-infer" -> "Hpa Kit Infer": slugifies back to the slug, so kaggle-api does not warn."""
    return " ".join(w.capitalize() for w in slug.split("-"))


def _check_ref(ref: Any, field_name: str, where: str, *, min_slug: int, max_slug: int = 50) -> list[str]:
    if not isinstance(ref, str) or ref.count("/") != 1:
        return [f"{where}: field '{field_name}' must be 'user/slug', got {ref!r}"]
    user, slug = ref.split("/")
    problems = []
    if not user or not USER_RE.match(user):
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


def raise_problems(problems: list[str]) -> None:
    """One ConfigError listing every problem (nothing when the list is empty)."""
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else
                          f"{len(problems)} metadata problems:\n  " + "\n  ".join(problems))


def dataset_metadata(user: str, slug: str, title: str, license_name: str = DEFAULT_LICENSE,
                     description: str = "") -> dict:
    """A dataset-metadata.json for dataset ``user/slug``."""
    meta = {"title": title, "id": f"{user}/{slug}", "licenses": [{"name": license_name}]}
    if description:
        meta["description"] = description
    return meta


def kernel_metadata(user: str, slug: str, title: str, code_file: str, *, dataset_sources: list[str],
                    competition: str | None, gpu: bool, private: bool = True, kernel_type: str = "script") -> dict:
    """A kernel-metadata.json for kernel ``user/slug``, internet off."""
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
