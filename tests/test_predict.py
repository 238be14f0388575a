"""kit.predict: fold/TTA averaging, a valid 19-triples-per-cell submission, resume after a kill."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kit.combine import CombineSpec  # noqa: E402
from kit.config import load_config, save_config, to_dict  # noqa: E402
from kit.errors import ConfigError, KitError  # noqa: E402
from kit.labels import NUM_CLASSES  # noqa: E402
from kit.predict import (  # noqa: E402
    FoldEnsemble,
    Predictor,
    parse_combine_option,
    predict,
)
from kit.submission import read_submission, validate_submission  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, data_dir: Path, n_folds: int = 2) -> Path:
    """A run folder with randomly initialised ResNet-18 checkpoints (no training needed)."""
    from kit.models import build_from_config

    run = root / "run"
    cfg = load_config(None, [
        "model.backbone=resnet18", "data.tile_size=32", "data.field_size=64", f"data.data_dir={data_dir}",
        f"data.mask_cache={root / 'masks'}", "predict.batch_size=16", "train.device=cpu",
    ])
    cfg.run_dir = str(run)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    for kind in ("cell", "image"):
        for fold in range(n_folds):
            model = build_from_config(cfg.model(kind), pretrained=False)
            # random BN statistics: folds and images then give clearly different outputs
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
            path = run / kind / f"fold{fold}" / "best.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1}, path)
    return run


@pytest.fixture(scope="module")
def run_dir(tiny_dataset, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("predict_run"), tiny_dataset)


def test_dihedral_gives_eight_distinct_transforms():
    from kit.inference import dihedral_np as dihedral

    x = np.arange(12.0).reshape(1, 1, 3, 4)[..., :3]  # 3 x 3, no symmetry
    outs = [dihedral(x, k) for k in range(8)]
    assert np.array_equal(outs[0], x)
    assert np.array_equal(outs[1], x[..., ::-1])
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 8


def test_fold_ensemble_is_the_mean_over_folds_and_flips(run_dir):
    from kit.models import load_fold_models, preprocess

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, size=(5, 4, 32, 32), dtype=np.uint8)
    ens = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=2)  # batches of 2: a ragged last batch
    got = ens.predict(tiles)
    models = load_fold_models(run_dir, "cell", "cpu")
    assert len(models) == 2
    x = preprocess(torch.from_numpy(tiles))
    with torch.inference_mode():
        expected = sum(torch.sigmoid(m(v)) for m in models for v in (x, x.flip(-1))) / 4
    np.testing.assert_allclose(got, expected.numpy(), atol=2e-5)
    assert got.shape == (5, NUM_CLASSES)
    # the folds differ, so the mean is not just one model
    with torch.inference_mode():
        one = torch.sigmoid(models[0](x)).numpy()
    assert np.abs(got - one).max() > 1e-4


def test_predict_writes_a_valid_submission_with_every_class(run_dir, tiny_dataset, tmp_path):
    out = tmp_path / "sub" / "submission.csv"
    info = predict(run_dir, tiny_dataset / "test", out, ids_from=tiny_dataset / "sample_submission.csv",
                   progress=False)
    assert out.is_file()
    assert validate_submission(out, sample=tiny_dataset / "sample_submission.csv", images=tiny_dataset / "test") == []
    sub = read_submission(out)
    sample_ids = [line.split(",")[0] for line in (tiny_dataset / "sample_submission.csv").read_text().splitlines()[1:]]
    assert list(sub) == sample_ids
    assert info["cells"] > 0
    assert info["triples"] == NUM_CLASSES * info["cells"]
    for pred in sub.values():
        masks = {}
        for cls, conf, mask in pred.triples:
            masks.setdefault(mask, []).append(cls)
            assert 0.0 <= conf <= 1.0
        assert all(sorted(v) == list(range(NUM_CLASSES)) for v in masks.values())
    # a tuned strategy from combine.yaml is used; an explicit spec overrides it
    dropped = predict(run_dir, tiny_dataset / "test", tmp_path / "s2.csv", spec=CombineSpec("product"),
                      min_confidence=0.3, progress=False)
    assert dropped["triples"] < info["triples"]


def test_predict_resumes_after_interruption_with_the_same_result(tiny_dataset, tmp_path):
    run = make_run(tmp_path, tiny_dataset, n_folds=1)
    test_dir = tiny_dataset / "test"
    sample = tiny_dataset / "sample_submission.csv"
    predictor = Predictor(run)
    masks = predictor.run_masks(test_dir)
    ids = [line.split(",")[0] for line in sample.read_text().splitlines()[1:]]
    # "killed" after two images: their results are cached, the rest are not
    partial = predictor.predict_folder(test_dir, ids, masks, progress=False, stop_after=2)
    assert len(partial) == 2
    cache = predictor.cache_dir(test_dir, masks)
    done = sorted(cache.glob("*.npz"))
    assert len(done) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    (cache / ".half-written.tmp.npz").write_bytes(b"junk")  # what a kill during a write leaves
    resumed = tmp_path / "resumed.csv"
    predict(run, test_dir, resumed, ids_from=sample, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps  # reused, not recomputed
    assert len(list(cache.glob("[!.]*.npz"))) == len(ids)
    # uninterrupted run from scratch (prediction cache removed)
    for p in cache.glob("*"):
        p.unlink()
    fresh = tmp_path / "fresh.csv"
    predict(run, test_dir, fresh, ids_from=sample, progress=False)
    assert resumed.read_bytes() == fresh.read_bytes()


def test_prediction_cache_is_keyed_by_the_checkpoints(run_dir, tiny_dataset):
    predictor = Predictor(run_dir)
    masks = predictor.run_masks(tiny_dataset / "test")
    before = predictor.cache_dir(tiny_dataset / "test", masks)
    ckpt = run_dir / "cell" / "fold0" / "best.pt"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a retrained fold
    try:
        assert predictor.cache_dir(tiny_dataset / "test", masks) != before
        assert Predictor(run_dir, tta=2).cache_dir(tiny_dataset / "test", masks) != \
            predictor.cache_dir(tiny_dataset / "test", masks)
    finally:
        os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_results_carry_each_cells_stain_fraction_through_the_cache(run_dir, tiny_dataset):
    from kit.combine import stain_fraction
    from kit.predict import ImageResult, prediction_path

    predictor = Predictor(run_dir)
    test_dir = tiny_dataset / "test"
    masks = predictor.run_masks(test_dir)
    ids = sorted(p.name[: -len("_red.png")] for p in test_dir.glob("*_red.png"))[:2]
    results = predictor.predict_folder(test_dir, ids, masks, progress=False)
    for image_id in ids:
        r = results[image_id]
        _, _, table = masks.cache.load(image_id)
        expected = stain_fraction(table.set_index("cell_id").loc[r.cell_ids].reset_index())
        assert r.stain == pytest.approx(expected, abs=1e-6)
        assert r.stain.min() < 1.0 <= r.stain.max() + 1e-6  # not the inert all-ones fallback
        again = ImageResult.load(prediction_path(predictor.cache_dir(test_dir, masks), image_id), image_id)
        assert again.stain == pytest.approx(r.stain)


def test_parse_combine_option():
    assert parse_combine_option("geometric:0.3:max:0.5") == CombineSpec("geometric", 0.3, "max", 0.5)
    assert parse_combine_option("product::::0.3") == CombineSpec("product", unstained=0.3)
    assert parse_combine_option("image_only") == CombineSpec("image_only")
    with pytest.raises(KitError):
        parse_combine_option("geometric:x")


def test_missing_run_folder_is_a_user_error(tmp_path, tiny_dataset):
    with pytest.raises(KitError, match="config.yaml"):
        predict(tmp_path / "nope", tiny_dataset / "test", tmp_path / "s.csv", progress=False)


def test_predict_command_line(run_dir, tiny_dataset, tmp_path):
    out = tmp_path / "cli.csv"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "kit", "predict", "--run", str(run_dir), "--images", str(tiny_dataset / "test"),
         "--out", str(out), "--ids-from", str(tiny_dataset / "sample_submission.csv"), "--combine", "product"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "validated" in proc.stdout
    assert validate_submission(out, sample=tiny_dataset / "sample_submission.csv") == []


# ------------------------------------------------------------------------- reliability (issue 16)


def _with_manifest(run: Path, data_dir: Path, n_folds: int = 2) -> Path:
    """The run's manifest as `kit train` writes it: a folds file of the train IDs and its folds."""
    from kit.manifest import resolve_inputs, write_manifest

    ids = [line.split(",")[0] for line in (data_dir / "train.csv").read_text().splitlines()[1:]]
    folds = run.parent / "folds.csv"
    folds.write_text("ID,fold\n" + "".join(f"{i},{k % n_folds}\n" for k, i in enumerate(ids)))
    cfg = load_config(run / "config.yaml", [f"data.folds_file={folds}"])
    write_manifest(run, resolve_inputs(cfg))
    return run


def test_predict_refuses_a_run_with_a_missing_fold(tiny_dataset, tmp_path):
    """Issue 16.6: the run's folds come from its manifest; a missing checkpoint is an error."""
    run = _with_manifest(make_run(tmp_path, tiny_dataset), tiny_dataset)
    (run / "cell" / "fold1" / "best.pt").unlink()
    sample = tiny_dataset / "sample_submission.csv"
    with pytest.raises(KitError, match=r"cell/fold1/best.pt not found.*--folds 0"):
        predict(run, tiny_dataset / "test", tmp_path / "a.csv", ids_from=sample, progress=False)
    assert not (tmp_path / "a.csv").exists()
    info = predict(run, tiny_dataset / "test", tmp_path / "b.csv", ids_from=sample, folds=[0], progress=False)
    assert info["images"] == 4 and (tmp_path / "b.csv").is_file()
    with pytest.raises(KitError, match="fold1"):  # a named fold must exist too
        predict(run, tiny_dataset / "test", tmp_path / "c.csv", ids_from=sample, folds=[0, 1], progress=False)


def test_a_fixed_image_is_predicted_again_not_served_from_a_failure(tiny_dataset, tmp_path):
    """Issue 16.1: empty a channel, predict (error), restore it, predict again: the row has cells."""
    import shutil

    from kit.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "test", data / "test")
    shutil.copy(tiny_dataset / "sample_submission.csv", data / "sample_submission.csv")
    run = make_run(tmp_path, tiny_dataset, n_folds=1)
    image_id = (data / "sample_submission.csv").read_text().splitlines()[1].split(",")[0]
    channel = data / "test" / f"{image_id}_blue.png"
    backup = tmp_path / "backup.png"
    shutil.copy2(channel, backup)
    channel.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        predict(run, data / "test", tmp_path / "s.csv", ids_from=data / "sample_submission.csv", progress=False)
    shutil.move(backup, channel)
    predict(run, data / "test", tmp_path / "s.csv", ids_from=data / "sample_submission.csv", progress=False)
    assert read_submission(tmp_path / "s.csv")[image_id].triples


def test_a_rejected_submission_never_replaces_the_previous_one(run_dir, tiny_dataset, tmp_path):
    """Issue 16.7: the temporary file is validated, then renamed."""
    from kit.errors import DataError
    from kit.predict import write_and_validate
    from kit.submission import ImagePrediction

    out = tmp_path / "submission.csv"
    out.write_text("the previous good file\n")
    sample = tiny_dataset / "sample_submission.csv"
    ids = [line.split(",")[0] for line in sample.read_text().splitlines()[1:]]
    wrong = {i: ImagePrediction(64, 64, []) for i in ids}  # sizes the sample does not have
    with pytest.raises(DataError, match="submission is invalid and was not written"):
        write_and_validate(out, wrong, ids, None, sample=sample)
    assert out.read_text() == "the previous good file\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]  # no temp file left


def test_a_duplicated_id_in_ids_from_names_that_file(run_dir, tiny_dataset, tmp_path):
    """Issue 16.11: the error names the file with the duplicate (and its line), not the output."""
    from kit.errors import DataError

    lines = (tiny_dataset / "sample_submission.csv").read_text().splitlines()
    dup = tmp_path / "ids.csv"
    dup.write_text("\n".join(lines + [lines[1]]) + "\n")
    with pytest.raises(DataError) as err:
        predict(run_dir, tiny_dataset / "test", tmp_path / "out.csv", ids_from=dup, progress=False)
    assert str(dup) in str(err.value) and f"line {len(lines) + 1}" in str(err.value)
    assert "out.csv" not in str(err.value)


def test_temp_files_a_killed_write_left_beside_the_submission_are_removed(run_dir, tiny_dataset, tmp_path):
    """Issue 16.11: a later run cleans the hidden half-written file of a killed one."""
    out = tmp_path / "sub" / "submission.csv"
    out.parent.mkdir()
    stale = out.parent / ".submission.k1ll3d.tmp.csv"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (1, 1))
    predict(run_dir, tiny_dataset / "test", out, ids_from=tiny_dataset / "sample_submission.csv", progress=False)
    assert out.is_file() and not stale.exists()


def test_a_failing_optional_source_does_not_stop_the_prediction(run_dir, tiny_dataset, tmp_path):
    """The classification ceiling's true cells are optional: a missing true mask is reported, the
    submission's own predictions are all made (from the same decode)."""
    import shutil

    from kit.masks import TruthMasks

    truth = tmp_path / "truth"
    shutil.copytree(tiny_dataset / "truth", truth)
    ids = [line.split(",")[0] for line in (tiny_dataset / "sample_submission.csv").read_text().splitlines()[1:]]
    (truth / f"{ids[0]}_cell_mask.png").write_bytes(b"not a png")
    predictor = Predictor(run_dir)
    failures: dict = {}
    results, true_results = predictor.predict_sources(tiny_dataset / "test", ids,
                                                      [predictor.run_masks(tiny_dataset / "test"), TruthMasks(truth)],
                                                      progress=False, failures=failures)
    assert sorted(results) == sorted(ids) and sorted(true_results) == sorted(ids[1:])
    [(failed_id, message)] = failures[TruthMasks(truth).key]
    assert failed_id == ids[0] and "cell_mask.png" in message
    with pytest.raises(KitError, match="cell_mask.png"):  # without a failures dict every source must succeed
        predictor.predict_sources(tiny_dataset / "test", ids[:1], [predictor.run_masks(tiny_dataset / "test"),
                                                                   TruthMasks(truth)], progress=False)


def test_an_id_that_is_a_path_is_refused_and_nothing_is_written_there(run_dir, tiny_dataset, tmp_path, capsys):
    """Issue 16.2: `--ids-from` with the ID /some/dir/x exited 0, wrote /some/dir/x.npz and put the
    path into the submission. Now: one line naming the file and line, nothing written."""
    import shutil

    from kit.cli import main

    sample = tiny_dataset / "sample_submission.csv"
    first = sample.read_text().splitlines()[1].split(",")[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for c in ("red", "green", "blue", "yellow"):  # a readable sample where the ID points
        shutil.copy(tiny_dataset / "test" / f"{first}_{c}.png", elsewhere / f"x_{c}.png")
    before = sorted(p.name for p in elsewhere.iterdir())
    ids = tmp_path / "ids.csv"
    ids.write_text(f"ID,ImageWidth,ImageHeight,PredictionString\n{elsewhere}/x,256,256,\n")
    out = tmp_path / "sub.csv"
    rc = main(["predict", "--run", str(run_dir), "--images", str(tiny_dataset / "test"), "--out", str(out),
               "--ids-from", str(ids), "--mask-cache", str(tmp_path / "masks")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {ids}: line 2: ID '{elsewhere}/x' contains the path separator '/' "
                               "(an ID is a file-name stem)"]
    assert sorted(p.name for p in elsewhere.iterdir()) == before and not out.exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1.5", "-0.1"])
def test_min_confidence_must_be_a_probability(run_dir, tiny_dataset, tmp_path, capsys, value):
    """Issue 16.8: `--min-confidence nan` wrote a "validated" submission with 0 triples."""
    from kit.cli import main

    out = tmp_path / "sub.csv"
    rc = main(["predict", "--run", str(run_dir), "--images", str(tiny_dataset / "test"), "--out", str(out),
               "--ids-from", str(tiny_dataset / "sample_submission.csv"), f"--min-confidence={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "--min-confidence" in err[0], err
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):  # the function itself refuses it too
        predict(run_dir, tiny_dataset / "test", out, min_confidence=float(value), progress=False)


def test_a_folder_as_out_and_cuda_without_cuda_are_one_line_before_any_work(run_dir, tiny_dataset, tmp_path, capsys):
    """Issue 16.9: `predict --out <a directory>` failed only after every image was predicted;
    `--device cuda` without CUDA must be one line too."""
    from kit.cli import main

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder: give a file name"):  # the function, as the CLI
        predict(run_dir, tiny_dataset / "test", folder, mask_cache=tmp_path / "masks", progress=False)
    assert not (tmp_path / "masks").exists() and list(folder.iterdir()) == []
    if torch.cuda.is_available():
        return
    rc = main(["predict", "--run", str(run_dir), "--images", str(tiny_dataset / "test"), "--out",
               str(tmp_path / "s.csv"), "--device", "cuda", "--mask-cache", str(tmp_path / "masks")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: device 'cuda' requested but CUDA is not available here (use cpu or auto)"]


def test_fold_ensemble_gives_the_same_probabilities_on_every_engine(run_dir, monkeypatch):
    """predict's engines (the probe's choice, ONNX Runtime, TorchScript) against the plain baseline."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("KIT_THROUGHPUT_PROBE", "1")
    tiles = np.random.default_rng(1).integers(0, 255, size=(7, 4, 32, 32), dtype=np.uint8)
    base = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, engine="baseline").predict(tiles)
    for engine in ("auto", "onnx", "jit"):
        ens = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, engine=engine)
        assert np.abs(ens.predict(tiles) - base).max() <= 1e-5, engine
    assert ens.runner_for().path.engine == "jit"


def test_an_exported_onnx_ensemble_is_reused_without_building_the_models(run_dir, tmp_path, monkeypatch):
    """Second predict of a run whose ensemble ONNX Runtime runs on this machine: the export and its
    .json are read, the PyTorch fold models are never built, the probabilities are the same."""
    pytest.importorskip("onnxruntime")
    import kit.models

    monkeypatch.setenv("KIT_THROUGHPUT_PROBE", "1")
    monkeypatch.setenv("KIT_THROUGHPUT_CACHE", str(tmp_path / "throughput.json"))
    tiles = np.random.default_rng(2).integers(0, 255, size=(6, 4, 32, 32), dtype=np.uint8)
    onnx = tmp_path / "ens.onnx"
    first = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, side=32, engine="onnx", onnx_path=onnx)
    want = first.predict(tiles)
    info = json.loads(onnx.with_suffix(".json").read_text())
    assert onnx.is_file() and info["n_models"] == 2 and info["has_bag"] is False

    def no_models(*a, **k):
        raise AssertionError("the fold models were built")

    monkeypatch.setattr(kit.models, "load_fold_models", no_models)
    again = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, side=32, engine="onnx", onnx_path=onnx)
    assert np.array_equal(again.predict(tiles), want) and again.n_models == 2 and not again.has_bag
    # engine auto: only when this machine's cached probe chose ONNX for this model
    auto = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, side=32, engine="auto", onnx_path=onnx)
    with pytest.raises(AssertionError, match="were built"):  # no probe record yet: it must probe, with models
        auto.predict(tiles)
    from kit.throughput import cache_key, machine_info, write_cache_entry

    settings = {"batch_size": 4, "threads": 0, "allow_reduced": None, "compile": False}
    write_cache_entry(cache_key(machine_info(), info["signature"], "cpu", settings),
                      {"path": {"engine": "onnx", "batch_size": 4}, "name": "onnx", "tiles_s": 1.0})
    auto = FoldEnsemble(run_dir, "cell", "cpu", tta=2, batch_size=4, side=32, engine="auto", onnx_path=onnx)
    assert np.array_equal(auto.predict(tiles), want) and auto.runner_for().record["name"] == "onnx"
