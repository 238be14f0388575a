"""kit.runtime: the runtime estimate from measured stage figures, scaled to a size mix; kit bench's table."""
from __future__ import annotations

import json

import pytest

from kit import runtime

FIGURES = {
    "machine": {"cpu": "test cpu"}, "when": "now", "load": "0.1", "backend": "classical",
    "fields": [{}, {}],
    "per_mpx": {"decode": 0.05, "segment": 0.04, "field": 0.01, "rle": 0.005},
    "per_cell": {"tiles": 0.004, "submission": 0.002},
    "cells_per_field": {"2048": 20.0, "3072": 30.0, "source": "test"},
}


def test_size_mix_from_a_sample_submission(tmp_path):
    csv = tmp_path / "sample.csv"
    csv.write_text("ID,ImageWidth,ImageHeight,PredictionString\na,2048,2048,\nb,1728,1728,\nc,2048,2048,\n")
    assert runtime.size_mix(csv) == {1728: 1, 2048: 2}
    assert runtime.size_mix() == {1728: 68, 2048: 462, 3072: 29}
    assert sum(runtime.size_mix().values()) == 559


def test_cells_per_field_says_when_it_is_scaled():
    assert runtime.cells_per_field(2048, FIGURES) == (20.0, "real train table")
    cells, how = runtime.cells_per_field(1728, FIGURES)
    assert cells == pytest.approx(20.0 * (1728 / 2048) ** 2) and "not measured" in how


def test_estimate_scales_with_the_work_and_labels_every_part():
    one = runtime.estimate_predict({2048: 10}, FIGURES, cell_tiles_s=100.0, image_fields_s=10.0, n_folds=1)
    mp = 2048 * 2048 / 1e6
    assert one.parts["decode"] == pytest.approx(10 * mp * 0.05)
    assert one.parts["tiles"] == pytest.approx(10 * 20 * 0.004)
    assert one.parts["cell CNN"] == pytest.approx(10 * 20 / 100.0)
    assert one.seconds == pytest.approx(sum(one.parts.values()))
    five = runtime.estimate_predict({2048: 10}, FIGURES, cell_tiles_s=100.0, image_fields_s=10.0, n_folds=5, tta=2)
    assert five.parts["cell CNN"] == pytest.approx(10 * one.parts["cell CNN"])
    assert five.parts["decode"] == one.parts["decode"]
    double = runtime.estimate_predict({2048: 20}, FIGURES, cell_tiles_s=100.0, image_fields_s=10.0)
    assert double.seconds == pytest.approx(2 * one.seconds)
    lines = "\n".join(one.lines())
    assert all(k in lines for k in one.parts) and "anchor" in lines and "WARNING" not in lines
    assert set(one.labels) == set(one.parts)


def test_estimate_warns_when_it_would_take_hours():
    slow = runtime.estimate_predict(runtime.size_mix(), FIGURES, cell_tiles_s=1.0, image_fields_s=0.5, n_folds=5)
    text = "\n".join(slow.lines())
    assert slow.hours > runtime.KAGGLE_LIMIT_H
    assert "WARNING" in text and "Kaggle" in text
    assert "not measured" in text  # the 1728 px fields' cells are scaled by area


def test_config_estimate_uses_the_cnn_table_or_says_it_was_not_measured():
    from kit.config import load_config

    cfg = load_config(None, ["model.backbone=resnet18", "data.tile_size=64", "data.field_size=128"])
    figs = dict(FIGURES, cnn={"resnet18@64": {"tiles_s": 200.0, "path": "onnx b64", "achieved_gflops": 30.0},
                              "resnet18@128": {"tiles_s": 20.0, "path": "onnx b4", "achieved_gflops": 25.0}})
    est = runtime.config_estimate(cfg, {2048: 10}, n_folds=2, figures=figs)
    assert est.parts["cell CNN"] == pytest.approx(10 * 20 * 2 / 200.0)
    assert "onnx b64" in est.labels["cell CNN"]
    cfg50 = load_config(None, ["model.backbone=resnet50", "data.tile_size=64", "data.field_size=128"])
    scaled = runtime.config_estimate(cfg50, {2048: 10}, n_folds=1, figures=figs)
    assert "not measured" in scaled.labels["cell CNN"]
    assert scaled.parts["cell CNN"] > est.parts["cell CNN"] / 2  # ResNet-50 costs more per tile than ResNet-18
    assert runtime.config_estimate(cfg, {2048: 1}, n_folds=1, figures={}) is None


def test_measure_stages_on_small_fields(tiny_dataset):
    figs = runtime.measure_stages(tiny_dataset / "test", tile_size=32, field_size=64)
    assert len(figs["fields"]) == 4
    row = figs["fields"][0]
    assert {"decode_s", "segment_s", "tiles_s", "field_s", "rle_s", "submission_s", "decode_wall_s"} <= set(row)
    assert row["side"] == 256 and row["cells"] > 0
    assert all(v >= 0 for v in figs["per_mpx"].values()) and figs["per_mpx"]["segment"] > 0


def test_shipped_figures_were_measured_on_real_fields():
    figs = runtime.load_figures()
    assert figs, "kit/data/runtime_figures.json is missing: python -m kit bench --fields ... --figures-out it"
    assert len(figs["fields"]) >= 4 and {f["side"] for f in figs["fields"]} >= {2048, 3072}
    assert figs["per_mpx"]["decode"] > 0 and figs["per_mpx"]["segment"] > 0
    assert "resnet50@128" in figs["cnn"] or any(k.startswith("resnet18@") for k in figs["cnn"])


def test_bench_table_and_json(tmp_path):
    torch = pytest.importorskip("torch")
    from kit.bench import format_table, gflops_per_tile, run_bench
    from kit.models import BACKBONES, build_model, register_backbone

    if "tiny_bench_cnn" not in BACKBONES:
        @register_backbone("tiny_bench_cnn")
        def _tiny(in_chans: int):
            nn = torch.nn
            return nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                 nn.ReLU(inplace=True)), 8

    gf = gflops_per_tile(build_model("resnet18"), 224)
    assert gf == pytest.approx(2 * 1.82, rel=0.05)  # torchvision: 1.81 GMACs at 224 px (3 channels)
    res = run_bench(["tiny_bench_cnn"], 32, 48, "cpu", repeats=1, tile_batches=(4, 8), field_batches=(2,),
                    onnx=False, peak_n=256, log=lambda s: None)
    assert res["peak_gflops_fp32"] > 0
    kinds = {(r["kind"], r["mode"]) for r in res["rows"]}
    assert kinds == {("cell", "infer"), ("cell", "train"), ("image", "infer")}
    for kind in ("cell", "image"):
        rows = [r for r in res["rows"] if r["kind"] == kind and r["mode"] == "infer"]
        assert sum(r["chosen"] for r in rows) == 1 and any(r["baseline"] for r in rows)
        chosen = next(r for r in rows if r["chosen"])
        assert chosen["ratio"] >= 1.0 and chosen["max_abs_diff"] <= 1e-5
    table = format_table(res)
    assert "baseline" in table and "chosen" in table and "% peak" in table
    json.dumps(res)  # JSON-serialisable
    del torch


def test_the_kaggle_estimate_figures_come_from_the_same_measurements():
    figs = dict(FIGURES, cnn={"resnet50@128": {"tiles_s": 20.0, "path": "onnx b32", "achieved_gflops": 54.0},
                              "resnet50@512": {"tiles_s": 1.0, "path": "onnx b2", "achieved_gflops": 43.0}})
    seconds, label = runtime.cpu_s_per_field(figs)
    full = runtime.estimate_predict({2048: 1}, figs, cell_tiles_s=1e9, image_fields_s=1e9)
    assert seconds == pytest.approx(full.seconds, rel=1e-6) and "CPU time measured" in label
    gflops, label = runtime.measured_gflops(figs, "resnet50")
    assert gflops == 54.0 and "resnet50@128" in label
    assert runtime.cpu_s_per_field({}) is None and runtime.measured_gflops({}) is None
