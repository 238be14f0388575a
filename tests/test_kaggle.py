"""kit.kaggle: metadata validation, bundle layout, the build folder, credentials, push commands, runtime
estimate, kernel rendering.

Builds here bundle one tiny pure-Python distribution (tqdm) instead of the kit's full run-time set,
so each takes about a second; the full set is exercised by tests/test_kernel_offline.py.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO
from kit import kaggle as kg
from kit.kaggle import runtime, staging
from kit.errors import ConfigError, KitError

SECRET = "0123456789abcdef0123456789abcdef"


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run folder with the files `kit train` writes (checkpoint contents are placeholders)."""
    run = tmp_path / "runs" / "exp1"
    (run / "cell" / "fold0").mkdir(parents=True)
    (run / "cell" / "fold1").mkdir(parents=True)
    (run / "image" / "fold0").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "data: {tile_size: 96, field_size: 256, segment_backend: classical}\n"
        "cell_model: {backbone: resnet18}\nimage_model: {backbone: resnet34}\npredict: {tta: 2}\n"
    )
    (run / "combine.yaml").write_text("strategy: product\n")
    (run / "summary.json").write_text("{}")
    import torch

    for i, p in enumerate(("cell/fold0", "cell/fold1", "image/fold0")):
        ckpt = {"model": {"w": torch.full((8,), float(i))}, "config": {"run_dir": str(run)}, "epoch": 3,
                "optimizer": {"state": {0: {"exp_avg": torch.zeros(1000)}}}, "rng": {"python": [1, 2]}}
        torch.save(ckpt, run / p / "best.pt")
        torch.save(ckpt, run / p / "last.pt")
        (run / p / "epochs.csv").write_text("epoch\n0\n")
    return run


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def with_credentials(no_credentials):
    cred = no_credentials / ".kaggle" / "kaggle.json"
    cred.parent.mkdir()
    cred.write_text(json.dumps({"username": "someone", "key": SECRET}))
    cred.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return cred


def small_build(run: Path, out: Path, **kw) -> dict:
    opts = kg.BuildOptions(run_dir=run, user="someone", out=out, packages=["tqdm"], **kw)
    return kg.build(opts, log=lambda *_: None)


def valid_kernel_meta(folder: Path | None = None) -> dict:
    meta = kg.kernel_metadata("someone", "hpa-kit-infer", "Hpa Kit Infer", "infer.py",
                              dataset_sources=["someone/hpa-kit-code"], competition=kg.DEFAULT_COMPETITION, gpu=True)
    if folder is not None:
        (folder / "infer.py").write_text("print('hi')\n")
    return meta


# ----------------------------------------------------------------------------------------------
# metadata validation (rules of kaggle-api's dataset_create_new / kernels_push)


def test_valid_metadata_has_no_problems(tmp_path):
    assert kg.dataset_metadata_problems(kg.dataset_metadata("someone", "hpa-kit-code", "Hpa Kit Code")) == []
    meta = valid_kernel_meta(tmp_path)
    assert kg.kernel_metadata_problems(meta, tmp_path, known_datasets={"someone/hpa-kit-code"}) == []
    assert meta["enable_internet"] is False and meta["language"] == "python" and meta["kernel_type"] == "script"


@pytest.mark.parametrize("change, field_name, words", [
    ({"id": "someone-hpa-kit-code"}, "'id'", "user/slug"),
    ({"id": "someone/abcde"}, "'id'", "6-50"),  # dataset slugs: 6-50 (kernel slugs: >= 5)
    ({"id": "someone/" + "a" * 51}, "'id'", "6-50"),
    ({"id": "someone/HPA_kit_code"}, "'id'", "lowercase"),
    ({"title": "HPA"}, "'title'", "6-50"),
    ({"title": "x" * 51}, "'title'", "6-50"),
    ({"licenses": []}, "'licenses'", "exactly one"),
    ({"licenses": [{"name": "CC0-1.0"}, {"name": "MIT"}]}, "'licenses'", "exactly one"),
])
def test_dataset_metadata_problems_name_the_field(change, field_name, words):
    meta = {**kg.dataset_metadata("someone", "hpa-kit-code", "Hpa Kit Code"), **change}
    problems = kg.dataset_metadata_problems(meta, "code/dataset-metadata.json")
    assert problems, change
    assert any(field_name in p and words in p and p.startswith("code/dataset-metadata.json") for p in problems), problems


@pytest.mark.parametrize("change, field_name, words", [
    ({"id": "someone/abcd"}, "'id'", "5-50"),
    ({"id": "/hpa-kit-infer"}, "'id'", "user name"),
    ({"title": "Hpa"}, "'title'", "5-50"),
    ({"code_file": "missing.py"}, "'code_file'", "not in"),
    ({"code_file": ""}, "'code_file'", "missing"),
    ({"language": "julia"}, "'language'", "python"),
    ({"kernel_type": "app"}, "'kernel_type'", "script"),
    ({"enable_internet": True}, "'enable_internet'", "internet off"),
    ({"enable_gpu": "true"}, "'enable_gpu'", "explicitly"),
    ({"dataset_sources": ["someone/other-dataset"]}, "'dataset_sources[0]'", "none of the datasets built"),
    ({"dataset_sources": ["hpa-kit-code"]}, "'dataset_sources[0]'", "user/slug"),
    ({"competition_sources": ["kaggle/hpa"]}, "'competition_sources'", "slugs"),
])
def test_kernel_metadata_problems_name_the_field(tmp_path, change, field_name, words):
    meta = {**valid_kernel_meta(tmp_path), **change}
    problems = kg.kernel_metadata_problems(meta, tmp_path, "kernel/kernel-metadata.json", {"someone/hpa-kit-code"})
    assert any(field_name in p and words in p for p in problems), problems


def test_title_that_does_not_slugify_to_the_id_warns():
    meta = kg.kernel_metadata("someone", "hpa-kit-infer", "My HPA kernel", "infer.py", dataset_sources=[],
                              competition=None, gpu=False)
    assert "my-hpa-kernel" in kg.kernel_title_warning(meta)
    meta["title"] = "Hpa Kit Infer"
    assert kg.kernel_title_warning(meta) is None


def test_build_rejects_bad_names_before_writing_anything(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        small_build(fake_run, out, prefix="HPA_Kit")
    assert "field 'id'" in str(err.value) and "lowercase" in str(err.value)
    with pytest.raises(ConfigError, match="6-50"):
        small_build(fake_run, out, prefix="p" * 44)  # <prefix>-weights: 52 characters
    with pytest.raises(ConfigError, match="--user"):
        kg.build(kg.BuildOptions(run_dir=fake_run, user="not a user", out=out, packages=["tqdm"]), log=lambda *_: None)
    assert not out.exists()


def test_build_needs_a_run_folder_with_checkpoints(tmp_path, no_credentials):
    empty = tmp_path / "run"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.yaml"):
        small_build(empty, tmp_path / "out")
    (empty / "config.yaml").write_text("{}\n")
    with pytest.raises(ConfigError, match="best.pt"):
        small_build(empty, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# bundle layout


def test_build_lays_out_three_folders_ready_for_the_kaggle_cli(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    manifest = small_build(fake_run, out, train_kernel=True)
    assert manifest["datasets"] == {"code": {"dir": "code", "id": "someone/hpa-kit-code"},
                                    "weights": {"dir": "weights", "id": "someone/hpa-kit-weights"}}
    assert manifest["kernels"]["infer"] == {"dir": "kernel", "id": "someone/hpa-kit-infer"}
    # weights: best.pt of every model and fold, config, combine; never last.pt or training logs
    files = sorted(str(p.relative_to(out / "weights")) for p in (out / "weights").rglob("*") if p.is_file())
    assert files == sorted([
        "dataset-metadata.json", "kit-weights.json", "run/config.yaml", "run/combine.yaml", "run/summary.json",
        "run/cell/fold0/best.pt", "run/cell/fold1/best.pt", "run/image/fold0/best.pt"])
    wm = json.loads((out / "weights" / "kit-weights.json").read_text())
    assert wm["folds"] == {"cell": [0, 1], "image": [0]} and wm["run_id"] == "exp1"
    import torch

    slim = torch.load(out / "weights/run/cell/fold1/best.pt", weights_only=True)
    assert sorted(slim) == ["config", "epoch", "model"]  # optimizer and RNG states dropped
    assert torch.equal(slim["model"]["w"], torch.full((8,), 1.0))
    assert wm["files"]["run/cell/fold1/best.pt"] == staging.sha256(out / "weights/run/cell/fold1/best.pt")
    # code: the kit wheel, the pinned wheel, the manifest, pinned requirements; no torch anywhere
    wheels = sorted(p.name for p in (out / "code/wheels").glob("*.whl"))
    assert len(wheels) == 2 and wheels[0].startswith("hpa_kit-") and wheels[1].startswith("tqdm-")
    bundle = json.loads((out / "code/kit-bundle.json").read_text())
    import tqdm
    assert bundle["requirements"] == [f"tqdm=={tqdm.__version__}"]
    assert "torch" in bundle["protected"] and "torchvision" in bundle["protected"]
    assert (out / "code/requirements.txt").read_text().splitlines()[1:] == bundle["requirements"]
    # metadata: what the kaggle CLI reads, valid by our rules, with the fields the issue names
    km = json.loads((out / "kernel/kernel-metadata.json").read_text())
    assert km["enable_internet"] is False and km["enable_gpu"] is True and km["is_private"] is True
    assert km["dataset_sources"] == ["someone/hpa-kit-code", "someone/hpa-kit-weights"]
    assert km["competition_sources"] == [kg.DEFAULT_COMPETITION]
    assert (out / "kernel" / km["code_file"]).is_file()
    tm = json.loads((out / "kernel-train/kernel-metadata.json").read_text())
    assert tm["code_file"] == "train.py" and tm["dataset_sources"] == ["someone/hpa-kit-code"]
    dm = json.loads((out / "code/dataset-metadata.json").read_text())
    assert dm["licenses"] == [{"name": "CC0-1.0"}] and dm["id"] == "someone/hpa-kit-code"
    assert kg.load_build(out)["kernels"]["train"]["id"] == "someone/hpa-kit-train"


def test_include_last_and_full_checkpoints_keep_the_training_state(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out, include_last=True, full_checkpoints=True)
    for name in ("best.pt", "last.pt"):
        assert (out / "weights/run/cell/fold0" / name).read_bytes() == (fake_run / "cell/fold0" / name).read_bytes()


def test_a_checkpoint_that_is_not_one_is_named(fake_run, tmp_path, no_credentials):
    (fake_run / "image/fold0/best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="image/fold0/best.pt"):
        small_build(fake_run, tmp_path / "out")


def test_kernel_script_gets_the_build_settings_and_compiles(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out, prefix="my-hpa", competition="hpa-single-cell-image-classification",
                predict_args=["--tta", "2"], train_kernel=True)
    text = (out / "kernel/infer.py").read_text()
    assert "'code_dataset': 'my-hpa-code'" in text and "'weights_dataset': 'my-hpa-weights'" in text
    assert "'predict_args': ['--tta', '2']" in text
    compile(text, "infer.py", "exec")
    train = (out / "kernel-train/train.py").read_text()
    assert "'fold': 0" in train
    compile(train, "train.py", "exec")


def test_the_kit_wheel_is_pure_python_with_package_data_and_no_torch(tmp_path):
    whl = kg.build_kit_wheel(tmp_path)
    assert whl.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(whl) as zf:
        names = set(zf.namelist())
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "kit/kaggle/__init__.py" in names and "kit/cli.py" in names
    # package data: tables, the kernel templates with their prelude and README, the config presets
    data_files = [p.relative_to(REPO).as_posix() for pattern in ("kit/data/*.csv", "kit/kernels/*", "kit/configs/*.yaml")
                  for p in REPO.glob(pattern) if p.is_file() and "__pycache__" not in p.parts]
    assert {"kit/kernels/infer.py", "kit/kernels/train.py", "kit/kernels/prelude.py", "kit/kernels/README.md",
            "kit/configs/default.yaml"} <= set(data_files)
    assert set(data_files) <= names
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    hard = [r for r in requires if "extra ==" not in r]
    assert hard and not any("torch" in r for r in hard), hard
    assert not list(REPO.glob("*.egg-info"))


# ----------------------------------------------------------------------------------------------
# the build folder: built fresh, moved into place, nothing of the user's lost or published


def _stage_leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.kit-*"))


def test_build_refuses_an_out_folder_holding_a_users_file(fake_run, tmp_path, no_credentials, capsys):
    out = tmp_path / "out"
    user_file = out / "weights" / "resnet50-0676ba61.pth"
    user_file.parent.mkdir(parents=True)
    user_file.write_bytes(b"the user's ImageNet weights")
    from kit.cli import main

    args = ["kernel", "build", "--run", str(fake_run), "--user", "someone", "--out", str(out), "--package", "tqdm"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(user_file) in err and "did not write" in err and "--force" in err
    assert user_file.read_bytes() == b"the user's ImageNet weights"  # kept, and nothing else written there
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["weights", "weights/resnet50-0676ba61.pth"]
    assert _stage_leftovers(out) == []
    # --force replaces the folder (the user asked for it): only what the build wrote remains
    assert main(args + ["--force"]) == 0
    assert not user_file.exists()
    record = json.loads((out / "kit-build.json").read_text())["files"]
    assert sorted(record) == sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                                    if p.is_file() and p.name != "kit-build.json")
    assert record["weights/run/config.yaml"]["sha256"] == staging.sha256(out / "weights/run/config.yaml")


def test_rebuild_replaces_an_earlier_build_whole(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out, train_kernel=True)
    tqdm_wheel = next((out / "code/wheels").glob("tqdm-*.whl"))
    logged: list[str] = []
    kg.build(kg.BuildOptions(run_dir=fake_run, user="someone", out=out, packages=["tqdm"]), log=logged.append)
    assert not (out / "kernel-train").exists()  # nothing of the earlier build survives
    assert list(kg.load_build(out)["kernels"]) == ["infer"]
    assert any("1 from the earlier build" in line for line in logged), logged  # its wheels were reused
    assert (out / "code/wheels" / tqdm_wheel.name).is_file()
    assert _stage_leftovers(out) == []


def test_a_failed_build_leaves_the_earlier_one_as_it_was(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (fake_run / "image/fold0/best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="image/fold0/best.pt"):
        small_build(fake_run, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _stage_leftovers(out) == []


def test_build_removes_the_staging_folder_of_a_killed_build(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    dead = tmp_path / ".out.kit-build-999999999-abcd"  # no such process
    (dead / "code").mkdir(parents=True)
    alive = tmp_path / f".out.kit-build-{os.getpid()}-abcd"  # a build still running
    alive.mkdir()
    small_build(fake_run, out)
    assert not dead.exists() and alive.is_dir()


def test_build_never_replaces_a_folder_it_reads_or_a_file(fake_run, tmp_path, no_credentials):
    with pytest.raises(ConfigError, match="which the build reads"):
        small_build(fake_run, fake_run.parent, force=True)  # --out runs/ would delete the run
    assert (fake_run / "config.yaml").is_file()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        small_build(fake_run, tmp_path / "a-file")


def test_push_never_publishes_a_file_the_build_did_not_write(fake_run, tmp_path, with_credentials, monkeypatch,
                                                            capsys):
    out = tmp_path / "out"
    small_build(fake_run, out)
    notes = out / "code" / "notes.txt"
    notes.write_text("private notes")
    from kit.cli import main

    assert main(["kernel", "push", "--out", str(out), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert str(notes) in err and "not written by `kit kernel build`" in err
    calls = tmp_path / "calls.txt"
    _fake_kaggle(tmp_path / "bin", calls, monkeypatch)
    with pytest.raises(ConfigError, match="notes.txt"):
        kg.push(out, mode="new", log=lambda *_: None)
    assert not calls.exists()  # nothing was run
    notes.unlink()
    wheel = next((out / "code/wheels").glob("tqdm-*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="changed since the build"):
        kg.push_commands(out)
    # a rebuild over it needs no --force: every file there is one the build wrote
    small_build(fake_run, out)
    assert len(kg.push_commands(out, mode="new")) == 3


# ----------------------------------------------------------------------------------------------
# kernel templates: settings and the one shared prelude


def test_both_kernels_hold_the_one_prelude(fake_run, tmp_path, no_credentials):
    from kit.kaggle import render

    out = tmp_path / "out"
    small_build(fake_run, out, train_kernel=True)
    body = render.prelude_body()
    assert "def install(code: Path)" in body and "def torch_stack_pins()" in body and '"""' in body
    for path, name in ((out / "kernel/infer.py", "infer"), (out / "kernel-train/train.py", "train")):
        text = path.read_text()
        assert text.count(body) == 1, path  # rendered in whole, once
        template = render.template_text(name)
        assert "def install(" not in template and "def find_dataset(" not in template  # written once, in the prelude
        assert text.index("from __future__") < text.index(body)  # the kernel's own __future__ line comes first
    with pytest.raises(KitError, match="no kernel template"):
        render.render_kernel("nope", {})


def test_prelude_finds_the_datasets_and_the_competition(tmp_path, monkeypatch, capsys):
    import kit.kernels.prelude as prelude

    root = tmp_path / "input"
    (root / "renamed-by-kaggle" / "inner").mkdir(parents=True)
    (root / "renamed-by-kaggle" / "inner" / "kit-bundle.json").write_text("{}")
    comp = root / "nested" / "hpa"
    (comp / "test").mkdir(parents=True)
    (comp / "sample_submission.csv").write_text("ID\n")
    monkeypatch.setenv("KAGGLE_INPUT_ROOT", str(root))
    monkeypatch.setenv("KIT_SCRATCH_DIR", str(tmp_path / "scratch"))
    assert prelude.find_dataset("kit-bundle.json", "hpa-kit-code") == root / "renamed-by-kaggle" / "inner"
    assert prelude.find_competition("hpa-single-cell-image-classification", "test", "sample_submission.csv") == comp
    with pytest.raises(SystemExit, match="train/ and train.csv"):
        prelude.find_competition("hpa-single-cell-image-classification", "train", "train.csv")
    with pytest.raises(SystemExit, match="attach the 'hpa-kit-weights' dataset"):
        prelude.find_dataset("kit-weights.json", "hpa-kit-weights")
    with zipfile.ZipFile(root / "renamed-by-kaggle" / "wheels.zip", "w") as zf:  # Kaggle kept the archive
        zf.writestr("wheels/x-1-py3-none-any.whl", b"w")
    got = prelude.unpacked(root / "renamed-by-kaggle", "wheels")
    assert (got / "x-1-py3-none-any.whl").read_bytes() == b"w"
    assert any(p.startswith("torch==") for p in prelude.torch_stack_pins())


# ----------------------------------------------------------------------------------------------
# credentials


def test_a_bundle_never_holds_credentials(fake_run, tmp_path, with_credentials):
    (fake_run / "kaggle.json").write_text(with_credentials.read_text())  # a careless copy in the run folder
    out = tmp_path / "out"
    logged: list[str] = []
    kg.build(kg.BuildOptions(run_dir=fake_run, user="someone", out=out, packages=["tqdm"]), log=logged.append)
    for p in out.rglob("*"):
        assert p.name != "kaggle.json"
        if p.is_file():
            data = p.read_bytes()
            assert SECRET.encode() not in data, p
            if p.suffix == ".whl":
                with zipfile.ZipFile(p) as zf:
                    for n in zf.namelist():
                        assert "kaggle.json" not in n and SECRET.encode() not in zf.read(n), (p, n)
    assert not any(SECRET in line for line in logged)


def test_check_no_credentials_catches_a_planted_file_or_key(tmp_path, with_credentials):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "notes.txt").write_text("nothing here")
    kg.check_no_credentials(bundle)
    (bundle / "notes.txt").write_text(f"key = {SECRET}")
    with pytest.raises(KitError, match="API key") as err:
        kg.check_no_credentials(bundle)
    assert SECRET not in str(err.value)
    (bundle / "notes.txt").unlink()
    (bundle / "sub").mkdir()
    (bundle / "sub" / "kaggle.json").write_text("{}")
    with pytest.raises(KitError, match="credential file"):
        kg.check_no_credentials(bundle)


def test_credentials_are_found_by_file_or_environment(no_credentials, monkeypatch):
    assert kg.have_credentials() is None
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    where = kg.have_credentials()
    assert where.startswith("environment") and SECRET not in where
    monkeypatch.delenv("KAGGLE_KEY")
    assert kg.have_credentials() is None
    cfg = no_credentials / "cfg"
    cfg.mkdir()
    (cfg / "kaggle.json").write_text("{}")
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(cfg))
    assert kg.have_credentials() == str(cfg / "kaggle.json")


# ----------------------------------------------------------------------------------------------
# push


def test_dry_run_prints_the_exact_commands(fake_run, tmp_path, with_credentials, capsys):
    out = tmp_path / "out"
    small_build(fake_run, out)
    from kit.cli import main

    assert main(["kernel", "push", "--out", str(out), "--dry-run"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
    assert lines == [
        f"kaggle datasets create -p {out}/code --dir-mode zip",
        f"kaggle datasets version -p {out}/code -m 'kit kernel build' --dir-mode zip",
        f"kaggle datasets create -p {out}/weights --dir-mode zip",
        f"kaggle datasets version -p {out}/weights -m 'kit kernel build' --dir-mode zip",
        f"kaggle kernels push -p {out}/kernel",
    ]
    assert main(["kernel", "push", "--out", str(out), "--dry-run", "--update", "-m", "new folds"]) == 0
    printed = capsys.readouterr().out
    assert "datasets create" not in printed and f"kaggle datasets version -p {out}/weights -m 'new folds'" in printed
    assert SECRET not in printed


def test_push_revalidates_hand_edited_metadata(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out)
    meta_path = out / "kernel/kernel-metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["enable_internet"] = True
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="enable_internet"):
        kg.push(out, dry_run=True, log=lambda *_: None)


def test_push_without_credentials_says_so_and_runs_nothing(fake_run, tmp_path, no_credentials, monkeypatch, capsys):
    out = tmp_path / "out"
    small_build(fake_run, out)
    calls = tmp_path / "calls.txt"
    _fake_kaggle(tmp_path / "bin", calls, monkeypatch)
    from kit.cli import main

    assert main(["kernel", "push", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no Kaggle credentials" in err and "nothing was pushed" in err
    assert not calls.exists()


def test_push_runs_the_kaggle_executable_in_order(fake_run, tmp_path, with_credentials, monkeypatch, capsys):
    out = tmp_path / "out"
    small_build(fake_run, out)
    calls = tmp_path / "calls.txt"
    _fake_kaggle(tmp_path / "bin", calls, monkeypatch, fail_create="weights")
    assert kg.push(out, mode="auto") == 0
    ran = calls.read_text().splitlines()
    assert ran == [
        f"datasets create -p {out}/code --dir-mode zip",
        f"datasets create -p {out}/weights --dir-mode zip",  # exists already ...
        f"datasets version -p {out}/weights -m kit kernel build --dir-mode zip",  # ... so a new version
        f"kernels push -p {out}/kernel",
    ]
    assert SECRET not in capsys.readouterr().out


def test_push_stops_at_a_failure_the_cli_reports_with_status_0(fake_run, tmp_path, with_credentials, monkeypatch):
    out = tmp_path / "out"
    small_build(fake_run, out)
    calls = tmp_path / "calls.txt"
    _fake_kaggle(tmp_path / "bin", calls, monkeypatch, fail_kernel=True)
    logged: list[str] = []
    assert kg.push(out, mode="new", log=logged.append) == 1
    assert any("kernels push" in l and "failed" in l for l in logged), logged


def _fake_kaggle(bindir: Path, calls: Path, monkeypatch, fail_create: str = "", fail_kernel: bool = False) -> None:
    """A `kaggle` executable that records its arguments; `datasets create` of `fail_create` says it exists."""
    bindir.mkdir()
    exe = bindir / "kaggle"
    exe.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"if sys.argv[1:3] == ['datasets', 'create'] and {fail_create!r} and sys.argv[4].endswith({fail_create!r}):\n"
        "    print('Dataset creation error: The requested title is already in use')\n"  # status 0, as kaggle does
        f"if sys.argv[1:3] == ['kernels', 'push'] and {fail_kernel!r}:\n"
        "    print('Kernel push error: something')\n"
    )
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


# ----------------------------------------------------------------------------------------------
# runtime estimate


def test_estimate_grows_with_work_and_says_when_it_will_not_finish():
    small = kg.estimate_runtime(559, hardware="t4", cell_backbone="resnet18", tile_size=128, n_folds=1)
    big = kg.estimate_runtime(559, hardware="t4", cell_backbone="resnet50", tile_size=256, n_folds=5, tta=8)
    assert small.fits and small.seconds < big.seconds
    assert "fits in Kaggle's 9 h" in small.lines()[0]
    cpu = kg.estimate_runtime(559, hardware="kaggle-cpu", cell_backbone="resnet101", tile_size=384, n_folds=5, tta=8)
    assert not cpu.fits and "WILL NOT FINISH" in cpu.lines()[0]
    # twice the images, about twice the time (less the fixed set-up)
    double = kg.estimate_runtime(1118, hardware="t4", cell_backbone="resnet18", tile_size=128, n_folds=1)
    assert double.seconds - runtime.FIXED_OVERHEAD_S == pytest.approx(2 * (small.seconds - runtime.FIXED_OVERHEAD_S))
    with pytest.raises(ConfigError, match="--hardware"):
        kg.estimate_runtime(10, hardware="tpu")


def test_estimate_uses_this_machines_measured_figures_where_there_are_some():
    from kit import runtime as measured

    figures = measured.load_figures()
    if not figures.get("per_mpx") or not figures.get("cnn"):
        pytest.skip("kit/data/runtime_figures.json has no measured CPU/CNN figures")
    table = runtime.HARDWARE["here-cpu"]
    none = runtime.measured_hardware("here-cpu", "resnet50", figures={})
    assert none["cpu_s_per_image"] == table["cpu_s_per_image"] and none["effective_gflops"] == table["effective_gflops"]
    hw = runtime.measured_hardware("here-cpu", "resnet50", figures=figures)
    assert hw["cpu_s_per_image"] == pytest.approx(measured.cpu_s_per_field(figures)[0])
    # kit bench counts 2 FLOPs per multiply-add, the GFLOPs table counts multiply-adds
    assert hw["effective_gflops"] == pytest.approx(measured.measured_gflops(figures, "resnet50")[0] / 2)
    assert "measured by kit bench" in hw["source"]
    t4 = runtime.measured_hardware("t4", figures=figures)  # a GPU's CNN rate is not this CPU's
    assert t4["effective_gflops"] == runtime.HARDWARE["t4"]["effective_gflops"]
    assert t4["cpu_s_per_image"] == hw["cpu_s_per_image"]


def test_build_prints_the_estimate_from_the_run_config(fake_run, tmp_path, no_credentials):
    logged: list[str] = []
    kg.build(kg.BuildOptions(run_dir=fake_run, user="someone", out=tmp_path / "out", packages=["tqdm"], gpu=False,
                             n_test=100), log=logged.append)
    line = next(l for l in logged if l.startswith("runtime estimate"))
    assert "(kaggle-cpu)" in line and "100 test images" in line
    expected = kg.estimate_runtime(100, hardware="kaggle-cpu", cell_backbone="resnet18", image_backbone="resnet34",
                                   tile_size=96, field_size=256, tta=2, n_folds=2)
    assert f"{expected.hours:.2f} h" in line


def _write_run_manifest(run: Path, folds: list[int], tile_size: int = 80, field_size: int = 320) -> None:
    """The manifest `kit train` writes, with sizes other than the config's (the manifest is what counts)."""
    from kit.manifest import RunManifest, write_manifest

    write_manifest(run, RunManifest(
        data_dir="/data", images_dir="/data/train", labels_file="/data/train.csv", folds_file="/folds.csv",
        folds_sha256="0" * 64, folds=folds, mask_cache="/cache/masks/classical-abc", mask_backend="classical",
        mask_params={}, tile_dir="/cache/tiles/tiles-80-abc", tile_size=tile_size, field_dir="/cache/fields/f",
        field_size=field_size, kit_version="0"))


def test_build_reads_the_run_inputs_from_its_manifest(fake_run, tmp_path, no_credentials, capsys):
    _write_run_manifest(fake_run, folds=[0])
    logged: list[str] = []
    out = tmp_path / "out"
    kg.build(kg.BuildOptions(run_dir=fake_run, user="someone", out=out, packages=["tqdm"], gpu=False, n_test=100),
             log=logged.append)
    assert (out / "weights/run/manifest.json").read_bytes() == (fake_run / "manifest.json").read_bytes()
    assert any(l.startswith(f"run {fake_run}: folds [0], segmentation classical, tiles 80 px") for l in logged), logged
    # sizes from the manifest, backbones and TTA from config.yaml, the folds predict will use
    expected = kg.estimate_runtime(100, hardware="kaggle-cpu", cell_backbone="resnet18", image_backbone="resnet34",
                                   tile_size=80, field_size=320, tta=2, n_folds=1)
    line = next(l for l in logged if l.startswith("runtime estimate"))
    assert f"{expected.hours:.2f} h" in line
    from kit.cli import main

    assert main(["kernel", "estimate", "--run", str(fake_run), "--hardware", "kaggle-cpu", "--n-test", "100"]) == 0
    assert f"{expected.hours:.2f} h" in capsys.readouterr().out


def test_build_refuses_a_run_whose_folds_lack_checkpoints(fake_run, tmp_path, no_credentials):
    _write_run_manifest(fake_run, folds=[0, 1])  # image/fold1/best.pt was never trained
    with pytest.raises(KitError, match="image/fold1/best.pt not found") as err:
        small_build(fake_run, tmp_path / "out")
    assert "--folds 0" in str(err.value)
    assert not (tmp_path / "out").exists()
    # the folds the kernel's predict is told to use are the ones that must be complete
    manifest = small_build(fake_run, tmp_path / "out", predict_args=["--folds", "0"])
    assert "'predict_args': ['--folds', '0']" in (tmp_path / "out/kernel/infer.py").read_text()
    assert manifest["estimate"]["hours"] > 0


# ----------------------------------------------------------------------------------------------
# wheels


def test_repacked_wheel_installs_and_matches_the_installed_files(tmp_path):
    import tqdm

    whl = kg.repack_installed("tqdm", tmp_path)
    assert whl.name == f"tqdm-{tqdm.__version__}-py3-none-any.whl"
    target = tmp_path / "target"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                          "--disable-pip-version-check", "--target", str(target), str(whl)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    original = Path(tqdm.__file__).parent
    for name in ("std.py", "__init__.py"):
        assert (target / "tqdm" / name).read_bytes() == (original / name).read_bytes()


def test_closure_excludes_the_torch_stack():
    pins, protected = kg.kernel_pins(roots=["pandas", "scikit-image"])
    assert "pandas" in pins and "scikit-image" in pins
    assert "numpy" not in pins and "numpy" in protected  # numpy comes with the image's torchvision
    assert not any(n.startswith(("torch", "nvidia-", "triton")) for n in pins)
    with pytest.raises(ConfigError, match="not installed"):
        kg.dependency_closure(["surely-not-installed-dist"])


def test_missing_wheel_for_another_python_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="tqdm==") as err:
        kg.gather_wheels({"tqdm": "0.0.1"}, tmp_path / "w", wheelhouses=[tmp_path], python_version="3.10")
    assert "--wheelhouse" in str(err.value)


def test_hpacellseg_wheel_and_weights_are_bundled(fake_run, tmp_path, no_credentials):
    whl = tmp_path / "hpacellseg-0.1.8-py3-none-any.whl"
    whl.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: only copied here
    weights = tmp_path / "hpa-weights"
    weights.mkdir()
    (weights / "nuclei-model.pth").write_bytes(b"n")
    (weights / "cell-model.pth").write_bytes(b"c")
    out = tmp_path / "out"
    small_build(fake_run, out, hpacellseg_wheel=whl, hpacellseg_weights=weights)
    bundle = json.loads((out / "code/kit-bundle.json").read_text())
    assert bundle["hpacellseg_wheel"] == whl.name and (out / "code/wheels" / whl.name).is_file()
    assert sorted(p.name for p in (out / "code" / bundle["hpacellseg_weights"]).iterdir()) == ["cell-model.pth",
                                                                                             "nuclei-model.pth"]
    with pytest.raises(ConfigError, match="not found"):
        small_build(fake_run, out, hpacellseg_weights=tmp_path / "nowhere")


def test_notebook_kernels_hold_the_same_code_in_one_cell(fake_run, tmp_path, no_credentials):
    out = tmp_path / "out"
    small_build(fake_run, out, kernel_type="notebook")
    meta = json.loads((out / "kernel/kernel-metadata.json").read_text())
    assert meta["kernel_type"] == "notebook" and meta["code_file"] == "infer.ipynb"
    nb = json.loads((out / "kernel/infer.ipynb").read_text())
    assert nb["nbformat"] == 4 and len(nb["cells"]) == 1
    code = "".join(nb["cells"][0]["source"])
    compile(code, "infer.ipynb", "exec")
    assert "'code_dataset': 'hpa-kit-code'" in code and "sys.exit(main())" not in code
    assert not (out / "kernel/infer.py").exists()


def test_wheels_for_another_python_come_from_the_wheelhouse(tmp_path):
    import tqdm

    house = tmp_path / "house"
    kg.repack_installed("tqdm", house)  # a pure-Python wheel fits any CPython 3
    sources = kg.gather_wheels({"tqdm": tqdm.__version__}, tmp_path / "w", wheelhouses=[house], python_version="3.10",
                               log=lambda *_: None)
    assert sources["tqdm"].startswith("pip download") and len(list((tmp_path / "w").glob("tqdm-*.whl"))) == 1
