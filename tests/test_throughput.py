"""kit.throughput / kit.engines / kit.inference: the selection rule, equal probabilities on every
path, the probe cache, batching across images. Speed itself is measured by `kit bench`, never here."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from kit import throughput as tp  # noqa: E402
from kit.errors import ConfigError  # noqa: E402
from kit.models import build_model, preprocess, register_backbone  # noqa: E402


def _conv_bn(c_in: int, c_out: int) -> list:
    return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


# conv-BN-ReLU twice: BatchNorm folding (TorchScript, ONNX Runtime) and layouts all apply
register_backbone("tiny_perf_cnn")(lambda in_chans: (nn.Sequential(*_conv_bn(in_chans, 8), *_conv_bn(8, 16)), 16))


def _models(n=2, backbone="tiny_perf_cnn"):
    torch.manual_seed(0)
    models = []
    for _ in range(n):
        m = build_model(backbone)
        for mod in m.modules():  # non-trivial BatchNorm statistics, so folding them is tested
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
        models.append(m.eval())
    return models


def _tiles(n=12, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 4, side, side), dtype=np.uint8)


def _plain(models, tiles):
    """The plain loop every path must reproduce."""
    with torch.no_grad():
        x = preprocess(torch.from_numpy(tiles))
        return (sum(torch.sigmoid(m(x)) for m in models) / len(models)).numpy()


def _m(path, seconds, diff=0.0, error=""):
    return tp.Measurement(path, list(seconds), path.batch_size, diff, error)


# ------------------------------------------------------------------------------ the rule

def test_choose_keeps_the_baseline_unless_a_candidate_is_clearly_faster():
    base = tp.baseline_path(32)
    fast = dataclasses.replace(base, engine="onnx")
    slight = dataclasses.replace(base, channels_last=True)
    # 3% faster: inside the margin -> baseline
    assert tp.choose([_m(base, [1.0] * 3), _m(slight, [0.97] * 3)], base).path == base
    # slower -> baseline, never the slower one
    assert tp.choose([_m(base, [1.0] * 3), _m(fast, [1.5] * 3)], base).path == base
    # clearly faster and equal probabilities -> adopted; the fastest of several
    got = tp.choose([_m(base, [1.0] * 3), _m(slight, [0.8] * 3), _m(fast, [0.5] * 3, 2e-6)], base)
    assert got.path == fast


def test_choose_rejects_faster_paths_with_other_probabilities_or_errors():
    base = tp.baseline_path(32)
    wrong = dataclasses.replace(base, engine="jit")
    broken = dataclasses.replace(base, engine="compile")
    amp = dataclasses.replace(base, amp="bfloat16", channels_last=True)
    ms = [_m(base, [1.0] * 3), _m(wrong, [0.2] * 3, 1e-3), _m(broken, [], float("inf"), "no compiler"),
          _m(amp, [0.3] * 3, 4e-3)]
    assert tp.choose(ms, base).path == base  # wrong probabilities, error, reduced precision not allowed
    assert tp.choose(ms, base, allow_reduced=True).path == amp  # AMP within REDUCED_ATOL when allowed
    far = _m(amp, [0.3] * 3, 0.2)
    assert tp.choose([ms[0], far], base, allow_reduced=True).path == base
    with pytest.raises(ValueError):
        tp.choose([_m(wrong, [0.2] * 3)], base)  # no baseline in the same run


def test_candidates_per_device(monkeypatch):
    base = tp.baseline_path(64)
    cpu = tp.engine_candidates("cpu", base, onnx=True)
    assert cpu[0] == base and len(set(cpu)) == len(cpu)
    assert {p.engine for p in cpu} == {"torch", "jit", "onnx"}
    assert {(p.channels_last, p.inference_mode) for p in cpu if p.engine == "torch"} == {
        (False, False), (False, True), (True, False), (True, True)}
    assert not any(p.amp or p.cudnn_benchmark for p in cpu)
    assert any(p.amp == "bfloat16" for p in tp.engine_candidates("cpu", base, onnx=False, reduced_precision=True))
    cuda = tp.engine_candidates("cuda", base, onnx=True)
    assert "onnx" not in {p.engine for p in cuda}
    assert {p.amp for p in cuda} == {"", "float16", "bfloat16"}
    assert any(p.cudnn_benchmark for p in cuda)
    monkeypatch.setattr(tp, "compile_available", lambda device_type: True)
    assert any(p.engine == "compile" for p in tp.engine_candidates("cpu", base, onnx=False, compile=True))
    assert not any(p.engine == "compile" for p in tp.engine_candidates("cpu", base, onnx=False))
    assert {p.batch_size for p in tp.batch_candidates(base, (16, 128))} == {64, 16, 128}
    assert {p.threads for p in tp.thread_candidates(base, cores=4)} == {0, 2, 3, 4}


def test_path_round_trips_through_its_dict():
    p = tp.InferencePath(engine="onnx", batch_size=16, threads=2)
    assert tp.InferencePath.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert "onnx" in p.name and "b16" in p.name


# ------------------------------------------------------------------------------ equal probabilities

@pytest.mark.parametrize("path", [
    tp.InferencePath(batch_size=8),
    tp.InferencePath(channels_last=True, inference_mode=True, batch_size=8),
    tp.InferencePath(engine="jit", batch_size=8),
    tp.InferencePath(engine="jit", channels_last=True, batch_size=8),
    tp.InferencePath(engine="onnx", batch_size=8, threads=1),
], ids=lambda p: p.name)
def test_every_path_gives_the_plain_loops_probabilities(path, tmp_path):
    if path.engine == "onnx":
        pytest.importorskip("onnxruntime")
    from kit.engines import build_runner

    models, tiles = _models(2), _tiles(12)
    onnx_path = tmp_path / "ens.onnx" if path.engine == "onnx" else None
    run = build_runner(models, path, "cpu", tiles, onnx_path=onnx_path)
    got = run(tiles)
    assert got.shape == (12, 19) and got.dtype == np.float32
    assert np.abs(got - _plain(models, tiles)).max() <= tp.EXACT_ATOL
    if onnx_path is not None:  # the exported graph is cached and reloaded
        assert onnx_path.is_file()
        again = build_runner(models, path, "cpu", tiles, onnx_path=onnx_path)(tiles)
        assert np.abs(again - got).max() <= tp.EXACT_ATOL
    # the caller's models are untouched (a path works on copies)
    assert all(next(m.parameters()).is_contiguous() for m in models)


def test_probe_measures_the_baseline_and_never_picks_a_slower_or_different_path():
    models, tiles = _models(2), _tiles(8)
    rec = tp.probe(models, tiles, "cpu", batch_size=8, rounds=1, batch_sizes=(4, 8))
    names = [r["name"] for stage in rec["stages"] for r in stage]
    assert tp.baseline_path(8).name in names
    assert rec["ratio"] >= 1.0  # the rule: the choice is the baseline or faster than it in the same run
    assert rec["max_abs_diff"] <= tp.EXACT_ATOL
    assert tp.InferencePath.from_dict(rec["path"]).name == rec["name"]


def test_a_probe_budget_keeps_stage_one_and_skips_the_stages_that_do_not_fit(monkeypatch):
    models, tiles = _models(1), _tiles(8)
    kw = dict(batch_size=8, rounds=3, batch_sizes=(4, 8), onnx=False)
    full = tp.probe(models, tiles, "cpu", **kw)
    assert len(full["stages"]) == 3 and full["skipped_stages"] == []
    assert all(r["rounds_run"] == 3 for r in full["stages"][0])
    tight = tp.probe(models, tiles, "cpu", budget_s=1e-6, **kw)
    assert len(tight["stages"]) == 1 and tight["skipped_stages"] == [2, 3]
    assert all(r["rounds_run"] == 1 for r in tight["stages"][0])  # one round always runs, then the budget
    assert tight["ratio"] >= 1.0 and tight["max_abs_diff"] <= tp.EXACT_ATOL  # the rule still holds
    monkeypatch.setenv("KIT_THROUGHPUT_BUDGET_S", "0")
    assert tp.probe_budget_s() is None
    monkeypatch.setenv("KIT_THROUGHPUT_BUDGET_S", "12.5")
    assert tp.probe_budget_s() == 12.5
    monkeypatch.setenv("KIT_THROUGHPUT_BUDGET_S", "soon")
    with pytest.raises(ConfigError, match="KIT_THROUGHPUT_BUDGET_S"):
        tp.probe_budget_s()
    monkeypatch.delenv("KIT_THROUGHPUT_BUDGET_S")
    assert tp.probe_budget_s() == tp.PROBE_BUDGET_S


def test_inference_path_probes_once_per_machine_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_THROUGHPUT_CACHE", str(tmp_path / "tp.json"))
    monkeypatch.delenv("KIT_THROUGHPUT_PROBE", raising=False)
    calls = []
    chosen = tp.InferencePath(engine="jit", batch_size=32)

    def fake_probe(models, example, device, **kw):
        calls.append(example.shape)
        return {"path": chosen.to_dict(), "name": chosen.name, "ratio": 1.5, "max_abs_diff": 0.0, "probe_s": 0}

    monkeypatch.setattr(tp, "probe", fake_probe)
    models, tiles = _models(1), _tiles(4)
    assert tp.inference_path(models, tiles, "cpu", batch_size=32) == chosen
    assert tp.inference_path(models, tiles, "cpu", batch_size=32) == chosen
    assert len(calls) == 1  # cached
    tp.inference_path(models, _tiles(4, side=48), "cpu", batch_size=32)  # another input size: probes again
    assert len(calls) == 2
    assert json.loads((tmp_path / "tp.json").read_text())
    # explicit choices and the switch-off never probe
    assert tp.inference_path(models, tiles, "cpu", engine="onnx", batch_size=16).engine == "onnx"
    assert tp.inference_path(models, tiles, "cpu", engine="baseline", batch_size=16) == tp.baseline_path(16)
    monkeypatch.setenv("KIT_THROUGHPUT_PROBE", "0")
    assert tp.inference_path(models, _tiles(4, side=40), "cpu", batch_size=8) == tp.baseline_path(8)
    assert len(calls) == 2
    from kit.errors import ConfigError

    with pytest.raises(ConfigError, match="predict.engine"):
        tp.inference_path(models, tiles, "cpu", engine="tensorrt")


def test_training_layout_is_a_measured_choice():
    out = tp.training_layout(_models(1)[0], _tiles(4), "cpu", rounds=1)
    assert set(out) == {"channels_last", "amp", "cudnn_benchmark", "ratio"}
    assert out["amp"] is False and out["cudnn_benchmark"] is False  # CPU
    assert out["channels_last"] == (out["ratio"] >= 1 / (1 - tp.MARGIN))


# ------------------------------------------------------------------------------ batching, TTA

def test_ensemble_runner_runs_folds_and_tta_on_one_batch():
    from kit.inference import EnsembleRunner, dihedral_np

    models, tiles = _models(2), _tiles(10)
    t = torch.from_numpy(tiles)
    torch_ref = [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]  # the first four, as torch ops
    for k in range(4):
        assert np.array_equal(dihedral_np(tiles, k), torch_ref[k].numpy())
    calls = []
    runner = EnsembleRunner(models, "cpu", tta=4, path=tp.InferencePath(batch_size=16), example=tiles)
    inner = runner._run
    runner._run = lambda b: (calls.append(len(b)), inner(b))[1]
    got = runner.predict(tiles)
    want = np.mean([_plain(models, np.ascontiguousarray(dihedral_np(tiles, k))) for k in range(4)], axis=0)
    assert np.abs(got - want).max() <= tp.EXACT_ATOL
    assert calls == [16, 16, 8]  # 4 tiles x 4 TTA per call; every fold on the same batch
    assert runner.predict(tiles[:0]).shape == (0, 19)


def test_cells_of_a_pack_share_batches_and_a_resumed_pack_gives_the_same_bits():
    from kit.inference import EnsembleRunner
    from kit.predict import _batched, packs_of

    class Ens:  # what kit.predict.FoldEnsemble offers _batched, with its calls counted
        has_bag = False  # not a MIL ensemble (kit.mil)

        def __init__(self, runner):
            self.runner, self.sizes = runner, []

        def predict(self, t):
            self.sizes.append(len(t))
            return self.runner.predict(t)

    # ResNet-18 at 32 px: a tile's float sums change with the batch size and the tile's place in it
    models = _models(1, backbone="resnet18")
    cell = Ens(EnsembleRunner(models, "cpu", path=tp.InferencePath(batch_size=8), example=_tiles(4)))
    image = Ens(EnsembleRunner(models, "cpu", path=tp.InferencePath(batch_size=8), example=_tiles(1, side=48)))
    counts = [3, 0, 7, 12, 1, 5, 6, 2, 9]
    ids = [f"img{i}" for i in range(len(counts))]

    def item(i):
        return {"id": ids[i], "width": 32, "height": 32, "field": _tiles(1, side=48, seed=100 + i)[0],
                "cells": {"m": (list(range(1, counts[i] + 1)), _tiles(counts[i], seed=i), None, [], None, None)}}

    pack_of = packs_of(ids, size=4)
    assert [pack_of[i] for i in ids] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
    whole = {done[0][1].image_id: done[0][1] for done in _batched(map(item, range(len(ids))), cell, image, pack_of)}
    assert list(whole) == ids  # every image once, in order
    assert cell.sizes == [22, 14, 9] and image.sizes == [4, 4, 1]  # one call per pack, cut in batches of 8
    for i, n in enumerate(counts):
        want = _plain(models, _tiles(n, seed=i)) if n else np.zeros((0, 19))
        assert np.abs(whole[ids[i]].cell_probs - want).max(initial=0.0) <= tp.EXACT_ATOL
    # a resume that predicts pack 1 again (and pack 2) gets the very same bits as the whole run
    again = {d[0][1].image_id: d[0][1] for d in _batched(map(item, range(4, len(ids))), cell, image, pack_of)}
    for i in ids[4:]:
        assert np.array_equal(again[i].cell_probs, whole[i].cell_probs)
        assert np.array_equal(again[i].image_probs, whole[i].image_probs)
    # what packing across a pack's boundary would have given instead: other bits for some image
    shifted = {d[0][1].image_id: d[0][1] for d in _batched(map(item, range(3, len(ids))), cell, image,
                                                            packs_of(ids[3:], size=4))}
    assert any(not np.array_equal(shifted[i].cell_probs, whole[i].cell_probs) for i in ids[4:])


def test_training_layout_is_cached_per_machine_and_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KIT_THROUGHPUT_CACHE", str(tmp_path / "tp.json"))
    model = _models(1)[0]
    first = tp.training_layout(model, _tiles(4), "cpu", rounds=1, cache=True)
    calls = []
    monkeypatch.setattr(tp, "interleaved", lambda *a, **k: calls.append(1))
    assert tp.training_layout(model, _tiles(4), "cpu", rounds=1, cache=True) == first
    assert not calls
