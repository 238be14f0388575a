"""The kit as an installed package: a wheel built from the checkout, installed into a fresh venv outside
it, runs `kit kernel build` there (kernel templates and config presets are package data).

The wheel test (marker ``wheel``: ``pytest -m wheel``; it runs in the default suite too) works offline:
``pip wheel --no-deps --no-build-isolation --no-index .`` with the setuptools of this venv, on a copy of
the files git knows (so the checkout gets no build/ or egg-info), and a venv without pip whose only
third-party packages are this venv's, seen through a ``.pth`` file, so nothing is downloaded and only
the kit itself comes from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from kit.config import load_config, preset_names, preset_path, to_dict
from kit.errors import ConfigError


def test_config_presets_ship_in_the_package_and_resolve_by_name_or_checkout_path():
    assert {"cpu", "default", "demo_cpu"} <= set(preset_names())
    assert preset_path("default") == REPO / "kit" / "configs" / "default.yaml"
    # one copy of each file: configs/ in a checkout is a link to the package's presets
    assert (REPO / "configs").resolve() == (REPO / "kit" / "configs").resolve()
    by_name, by_path = load_config("default"), load_config(REPO / "configs" / "default.yaml")
    assert to_dict(by_name) == to_dict(by_path) and by_name.model("cell").backbone == "resnet50"
    assert load_config("demo_cpu").model("cell").backbone == "resnet18"
    assert load_config("cpu").train.device == "cpu"
    with pytest.raises(ConfigError, match=r"presets shipped with the kit: (.+, )?default, demo_cpu"):
        load_config("no-such-preset")
    with pytest.raises(ConfigError, match="no config preset 'gpu'"):
        preset_path("gpu")


def _copy_checkout(dst: Path) -> None:
    """The files a clone has (git's tracked + untracked-not-ignored files), else the whole tree."""
    dst.mkdir(parents=True)
    res = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True) if shutil.which("git") else None
    if res is None or res.returncode != 0:
        shutil.copytree(REPO, dst, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "*.egg-info"))
        return
    for rel in sorted(set(res.stdout.decode().split("\0")) - {""}):
        src = REPO / rel
        if src.is_symlink() or src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel, follow_symlinks=False)


def _fake_run(run: Path) -> Path:
    """A run folder with config.yaml and one fold checkpoint per model (placeholder weights)."""
    import torch

    (run).mkdir(parents=True)
    (run / "config.yaml").write_text("data: {tile_size: 64}\ncell_model: {backbone: resnet18}\n")
    for kind in ("cell", "image"):
        (run / kind / "fold0").mkdir(parents=True)
        torch.save({"model": {"w": torch.zeros(4)}, "config": {}, "epoch": 1}, run / kind / "fold0" / "best.pt")
    return run


@pytest.mark.wheel
def test_kernel_build_runs_from_a_wheel_installed_outside_the_checkout(tmp_path):
    t0 = time.time()
    src = tmp_path / "checkout"
    _copy_checkout(src)
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "--disable-pip-version-check", "--quiet", "-w", str(dist), "."],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (wheel,) = dist.glob("hpa_kit-*-py3-none-any.whl")
    t_wheel = time.time() - t0

    # a fresh venv outside the checkout that sees this venv's packages (not the kit: it has none)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    vsite = next((venv / "lib").glob("python*/site-packages"))
    (vsite / "shared_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    vpy = venv / "bin" / "python"
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}{os.defpath}", "HOME": str(home), "LANG": "C.UTF-8",
           "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1", "TMPDIR": str(tmp_path)}
    work = tmp_path / "elsewhere"  # not the checkout: `import kit` must find the installed one
    work.mkdir()
    res = subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile",
                          "--disable-pip-version-check", "--quiet", str(wheel)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    probe = subprocess.run([str(vpy), "-c", "import kit, kit.config; print(kit.__file__); "
                            "print(kit.config.preset_path('default')); print(kit.config.load_config('demo_cpu').model('cell').backbone)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    kit_file, preset, backbone = probe.stdout.split()
    assert Path(kit_file).is_relative_to(vsite) and Path(preset).is_relative_to(vsite), probe.stdout
    assert backbone == "resnet18"

    # `kit kernel build` there, on a tiny run folder, with the installed console script
    run = _fake_run(tmp_path / "runs" / "tiny")
    out = tmp_path / "build"
    res = subprocess.run([str(venv / "bin" / "kit"), "kernel", "build", "--run", str(run), "--user", "someone",
                          "--out", str(out), "--package", "tqdm", "--train-kernel", "--no-gpu", "--n-test", "10"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "runtime estimate (kaggle-cpu): 10 test images" in res.stdout
    wheels = sorted(p.name for p in (out / "code" / "wheels").glob("*.whl"))
    assert len(wheels) == 2 and wheels[0] == wheel.name and wheels[1].startswith("tqdm-"), wheels
    with zipfile.ZipFile(out / "code" / "wheels" / wheel.name) as zf:  # the installed kit, repacked
        names = set(zf.namelist())
    assert {"kit/kaggle/bundle.py", "kit/kernels/prelude.py", "kit/configs/default.yaml"} <= names
    for script, setting in ((out / "kernel" / "infer.py", "'weights_dataset': 'hpa-kit-weights'"),
                            (out / "kernel-train" / "train.py", "'fold': 0")):
        text = script.read_text()
        compile(text, str(script), "exec")
        assert setting in text and "def install(code: Path)" in text  # settings filled, prelude rendered
    assert (out / "code" / "configs" / "train.yaml").read_text() == (run / "config.yaml").read_text()
    assert json.loads((out / "kit-build.json").read_text())["kernels"]["train"]["id"] == "someone/hpa-kit-train"
    res = subprocess.run([str(venv / "bin" / "kit"), "kernel", "push", "--out", str(out), "--dry-run"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and f"kaggle kernels push -p {out}/kernel-train" in res.stdout, res.stderr
    assert not list(REPO.glob("*.egg-info"))  # the build ran in the copy
    print(f"\nwheel built in {t_wheel:.1f} s; whole test {time.time() - t0:.1f} s")
