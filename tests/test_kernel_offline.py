"""The inference kernel, end to end, in a simulated Kaggle with the network off.

What is simulated, and how:
- ``/kaggle/input`` and ``/kaggle/working``: a temporary root, handed to the kernel through
  ``KAGGLE_INPUT_ROOT`` / ``KAGGLE_WORKING_DIR`` (``KIT_SCRATCH_DIR`` for its caches), laid out as
  Kaggle mounts it: ``input/<competition>/{test/, sample_submission.csv}``, ``input/<code-dataset>/``,
  ``input/<weights-dataset>/`` (the folders `kit kernel build` wrote, hard-linked);
- the Kaggle image: a fresh virtual environment whose only third-party packages are torch,
  torchvision and what they require, exposed from this project's .venv through a ``.pth`` file that
  points at a folder of symlinks (a real venv with torch would take ~95 s and 6 GB). Everything
  else the kernel imports (the kit, pandas, scipy, OpenCV, scikit-image, ...) must come from the
  bundle's wheels, installed by the kernel itself;
- no network: the kernel process runs under ``unshare -rn`` (a new user + network namespace with no
  interface up) where this machine allows it, else with a ``sitecustomize`` that makes every
  ``socket.connect`` raise; the test prints which, and checks the block actually holds;
- the run: a real run folder in the format `kit train` writes (resolved config.yaml, combine.yaml and
  ``{cell,image}/fold<k>/best.pt`` checkpoints of real ResNet-18 models, untrained: the kernel's job
  is to run, not to score; training one takes ~2 minutes here), read by the real `kit predict`.
  ``KIT_KERNEL_TEST_RUN=RUN_DIR`` uses a trained run instead (e.g. one `python -m kit demo` wrote).
The bundle's wheels come from this machine's local wheel index (``/opt/pypi/files``, when present),
and what it lacks is repacked from the installed distributions (`kit.kaggle.wheels.repack_installed`);
nothing is downloaded.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kit import kaggle as kg

LOCAL_WHEELHOUSE = Path("/opt/pypi/files")

if sys.platform != "linux":
    pytest.skip("the simulated Kaggle (venv layout, unshare) is Linux-only", allow_module_level=True)
COMPETITION = kg.DEFAULT_COMPETITION


def _no_network_prefix(tmp: Path) -> tuple[list[str], dict[str, str], str]:
    """(command prefix, extra env, description) that cut the kernel process off the network."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-rn", "true"], capture_output=True).returncode == 0:
        return [unshare, "-rn"], {}, "unshare -rn (network namespace without interfaces)"
    guard = tmp / "netguard"
    guard.mkdir(exist_ok=True)
    (guard / "sitecustomize.py").write_text(
        "import socket\n"
        "def _blocked(*a, **k):\n"
        "    raise OSError(101, 'network disabled by the offline kernel test')\n"
        "socket.socket.connect = _blocked\n"
        "socket.socket.connect_ex = _blocked\n"
        "socket.create_connection = _blocked\n"
    )
    return [], {"PYTHONPATH": str(guard)}, "sitecustomize blocking socket.connect"


def _make_run(run: Path) -> Path:
    """A run folder as `kit train` writes it: resolved config + best.pt of 2 folds x 2 models (ResNet-18)."""
    import torch

    from kit.config import load_config, save_config, to_dict
    from kit.models import build_from_config

    cfg = load_config(None, ["model.backbone=resnet18", "data.tile_size=32", "data.field_size=64",
                             "train.device=cpu", "predict.batch_size=32"])
    for kind in ("cell", "image"):
        for fold in (0, 1):
            torch.manual_seed(fold)
            model = build_from_config(cfg.model(kind), pretrained=False)
            path = run / kind / f"fold{fold}" / "best.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1}, path)
            torch.save({"model": {}, "optimizer": {}}, path.with_name("last.pt"))
    save_config(cfg, run / "config.yaml")
    # as `kit tune-combine` writes it (kit.combine.CombineSpec fields)
    (run / "combine.yaml").write_text("strategy: geometric\nweight: 0.7\nnegative: complement\nborder_power: 0.0\n")
    return run


def _image_venv(root: Path) -> Path:
    """A fresh venv that sees only torch, torchvision and their requirements (symlinks + .pth)."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    exposed = root / "image-site-packages"
    exposed.mkdir()
    installed = kg.installed_distributions()
    stack = [n for n in kg.protected_names(installed) if n in installed]
    for name in stack:
        dist = installed[name]
        for top in {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] != ".."}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (exposed / top).exists() and top != "__pycache__":
                (exposed / top).symlink_to(src)
    (site / "kaggle_image.pth").write_text(str(exposed) + "\n")
    return venv


@pytest.fixture(scope="module")
def kaggle_sim(tmp_path_factory):
    """Build the bundle, lay out the simulated Kaggle, run the kernel once; return what a test checks."""
    from kit.synth import generate_dataset

    tmp = tmp_path_factory.mktemp("kaggle_sim")
    t0 = time.time()
    # KIT_KERNEL_TEST_RUN=runs/<id> runs the same simulation with a trained run (e.g. from `kit demo`).
    given = os.environ.get("KIT_KERNEL_TEST_RUN")
    run = Path(given) if given else _make_run(tmp / "runs" / "tiny")
    data = generate_dataset(tmp / "data", n_train=6, n_test=3, size=128, seed=5)
    home = tmp / "home"
    (home / ".kaggle").mkdir(parents=True)
    (home / ".kaggle" / "kaggle.json").write_text('{"username": "someone", "key": "fake-key-1234567890"}')
    out = tmp / "build"
    wheelhouses = [LOCAL_WHEELHOUSE] if LOCAL_WHEELHOUSE.is_dir() else []
    logged: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # a credentials file the build must not pick up
        kg.build(kg.BuildOptions(run_dir=run, user="someone", out=out, wheelhouses=wheelhouses, gpu=False,
                                 n_test=3, train_kernel=True, train_fold=1, n_splits=2,
                                 train_args=["train.workers=0", "train.epochs=1", "train.batch_size=64"]),
                 log=logged.append)
    t_build = time.time() - t0

    kroot = tmp / "kaggle"
    inp, work, scratch = kroot / "input", kroot / "working", kroot / "tmp"
    for d in (inp / COMPETITION, work, scratch):
        d.mkdir(parents=True)
    shutil.copytree(data / "test", inp / COMPETITION / "test", copy_function=os.link)
    shutil.copy2(data / "sample_submission.csv", inp / COMPETITION / "sample_submission.csv")
    shutil.copytree(data / "train", inp / COMPETITION / "train", copy_function=os.link)
    shutil.copy2(data / "train.csv", inp / COMPETITION / "train.csv")
    shutil.copytree(out / "code", inp / "hpa-kit-code", copy_function=os.link)
    shutil.copytree(out / "weights", inp / "hpa-kit-weights", copy_function=os.link)
    before = sorted(str(p.relative_to(inp)) for p in inp.rglob("*"))

    venv = _image_venv(tmp)
    prefix, extra_env, how = _no_network_prefix(tmp)
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.defpath}", "HOME": str(tmp / "kernel-home"), "LANG": "C.UTF-8",
        "KAGGLE_INPUT_ROOT": str(inp), "KAGGLE_WORKING_DIR": str(work), "KIT_SCRATCH_DIR": str(scratch),
        "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1", "TMPDIR": str(scratch), **extra_env,
    }
    t1 = time.time()
    proc = subprocess.run([*prefix, str(venv / "bin" / "python"), str(out / "kernel" / "infer.py")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    t_kernel = time.time() - t1
    probe = subprocess.run([*prefix, str(venv / "bin" / "python"), "-c",
                            "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"],
                           env=env, capture_output=True, text=True, timeout=60)
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import kit, torch, pandas; print(kit.__file__); print(torch.__file__); print(pandas.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    print(f"\nno network via: {how}; build {t_build:.1f} s, kernel {t_kernel:.1f} s\n{proc.stdout}")
    return dict(proc=proc, probe=probe, where=where, work=work, inp=inp, before=before, venv=venv, out=out,
                data=data, logged=logged, how=how, prefix=prefix, env=env, scratch=scratch)


def test_kernel_runs_offline_and_writes_a_valid_submission(kaggle_sim):
    proc = kaggle_sim["proc"]
    assert proc.returncode == 0, f"kernel failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    sub = kaggle_sim["work"] / "submission.csv"
    assert sub.is_file()
    from kit.cli import main

    sample = kaggle_sim["inp"] / COMPETITION / "sample_submission.csv"
    assert main(["validate-submission", str(sub), "--sample", str(sample)]) == 0
    import pandas as pd

    got = pd.read_csv(sub)
    assert list(got["ID"]) == list(pd.read_csv(sample)["ID"])
    assert got["PredictionString"].fillna("").str.len().gt(0).all()  # every synthetic field has cells
    assert "validate-submission" in proc.stdout and "done:" in proc.stdout


def test_kernel_used_the_bundle_and_kept_the_image_torch(kaggle_sim):
    lines = kaggle_sim["where"].stdout.split()
    assert kaggle_sim["where"].returncode == 0, kaggle_sim["where"].stderr
    kit_file, torch_file, pandas_file = (Path(p) for p in lines)
    site = next((kaggle_sim["venv"] / "lib").glob("python*/site-packages"))
    assert kit_file.is_relative_to(site), kit_file  # installed from the kit wheel, not the source tree
    assert pandas_file.is_relative_to(site), pandas_file  # installed from the bundle's wheels
    assert "image-site-packages" in str(torch_file)  # the image's torch, untouched
    assert not (site / "torch").exists() and not list(site.glob("torch-*.dist-info"))
    assert not any("torch" in p.name for p in (kaggle_sim["out"] / "code" / "wheels").glob("*.whl"))
    # the read-only input was not written to (predict caches went to the scratch folder)
    after = sorted(str(p.relative_to(kaggle_sim["inp"])) for p in kaggle_sim["inp"].rglob("*"))
    assert after == kaggle_sim["before"]
    assert not any((kaggle_sim["out"]).rglob("kaggle.json"))
    # the exposed image packages (symlinks into this project's .venv) are intact: pip never removes a
    # distribution outside the environment it installs into, and the constraints kept it from trying
    exposed = kaggle_sim["venv"].parent / "image-site-packages"
    assert all(p.exists() for p in exposed.iterdir())
    assert (Path(torch_file).parent / "__init__.py").is_file()


def test_kernel_process_had_no_network(kaggle_sim):
    probe = kaggle_sim["probe"]
    assert probe.returncode != 0 and ("OSError" in probe.stderr or "unreachable" in probe.stderr), probe.stderr


def test_train_kernel_trains_its_fold_offline(kaggle_sim):
    """The train kernel (kit/kernels/train.py) in the same simulated Kaggle: folds, segmentation + tiles, one fold of both models."""
    env = {**kaggle_sim["env"], "KAGGLE_WORKING_DIR": str(kaggle_sim["work"].parent / "working-train")}
    proc = subprocess.run([*kaggle_sim["prefix"], str(kaggle_sim["venv"] / "bin" / "python"),
                           str(kaggle_sim["out"] / "kernel-train" / "train.py")],
                          cwd=kaggle_sim["work"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train kernel failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    run = Path(env["KAGGLE_WORKING_DIR"]) / "run"
    assert (run / "config.yaml").is_file()
    for kind in ("cell", "image"):
        assert (run / kind / "fold1" / "best.pt").is_file()
        assert not (run / kind / "fold0").exists()  # one fold per kernel run
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["data_dir"].startswith(str(kaggle_sim["inp"]))  # pointed at the competition data
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["workers"] == 0  # the build's train args
