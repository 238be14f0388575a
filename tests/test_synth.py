"""Synthetic data: layout, determinism, truth consistency, patterns, bit depths, sizes."""
from __future__ import annotations

import base64
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from pycocotools import mask as coco_mask

from conftest import REAL_TRAIN_CSV, require

# pycocotools 2.0.11 decode warns about numpy 2 copy semantics; harmless here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
from kit import synth
from kit.images import read_sample, to_float
from kit.labels import NEGATIVE, parse_label


def official_encode(mask: np.ndarray) -> str:
    """The competition's encode_binary_mask, verbatim in effect."""
    m = np.asfortranarray(mask.reshape(mask.shape[0], mask.shape[1], 1).astype(np.uint8))
    counts = coco_mask.encode(m)[0]["counts"]
    return base64.b64encode(zlib.compress(counts, zlib.Z_BEST_COMPRESSION)).decode("ascii")


def decode(text: str, h: int, w: int) -> np.ndarray:
    counts = zlib.decompress(base64.b64decode(text))
    return coco_mask.decode({"size": [h, w], "counts": counts}).astype(bool)


def read_u16(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.dtype == np.uint16, path
    return img


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- layout


def test_layout(tiny_dataset):
    train = pd.read_csv(tiny_dataset / "train.csv", dtype=str, keep_default_na=False)
    sub = pd.read_csv(tiny_dataset / "sample_submission.csv", dtype=str, keep_default_na=False)
    assert list(train.columns) == ["ID", "Label"] and len(train) == 12
    assert list(sub.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"] and len(sub) == 4
    assert (sub["PredictionString"] == "").all() and (sub["ImageWidth"] == "256").all()
    assert not set(train["ID"]) & set(sub["ID"])
    for split, ids in (("train", train["ID"]), ("test", sub["ID"])):
        for iid in ids:
            img = read_sample(tiny_dataset / split, iid)
            assert img.shape == (256, 256, 4) and img.dtype == np.uint8
            for kind in ("cell_mask", "nuclei_mask"):
                assert read_u16(tiny_dataset / "truth" / f"{iid}_{kind}.png").shape == (256, 256)
    for name in ("train_solution.csv", "test_solution.csv"):
        sol = pd.read_csv(tiny_dataset / name, dtype=str, keep_default_na=False)
        assert list(sol.columns) == ["ID", "ImageWidth", "ImageHeight", "PredictionString"]
    cells = pd.read_csv(tiny_dataset / "truth" / "cell_labels.csv", dtype=str, keep_default_na=False)
    assert list(cells.columns) == ["ID", "cell_id", "Label"]
    assert set(cells["ID"]) == set(train["ID"]) | set(sub["ID"])


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_and_worker_count_irrelevant(tmp_path):
    a = synth.generate_dataset(tmp_path / "a", n_train=2, n_test=1, size=128, seed=3, bit_depth=8)
    b = synth.generate_dataset(tmp_path / "b", n_train=2, n_test=1, size=128, seed=3, bit_depth=8, workers=2)
    ba, bb = all_bytes(a), all_bytes(b)
    # 6 PNGs per image, cell_labels.csv + images.csv, 4 CSVs, synth.json, one resume record per image
    assert len(ba) == 3 * 6 + 2 + 4 + 1 + 3 and ba == bb


def test_resume_skips_finished_images_and_refuses_other_arguments(tmp_path):
    from kit.errors import ConfigError

    kw = dict(n_train=3, n_test=1, size=96, seed=5)
    ref = all_bytes(synth.generate_dataset(tmp_path / "ref", **kw))
    d = synth.generate_dataset(tmp_path / "d", **kw)
    iids = [l.split(",")[0] for l in (d / "train.csv").read_text().split()[1:]]
    # an interrupted run: one image never finished, the CSVs not yet written
    for p in list((d / "train").glob(f"{iids[1]}_*")) + list((d / ".synth").rglob(f"{iids[1]}.json")):
        p.unlink()
    (d / "train.csv").unlink()
    done = d / "train" / f"{iids[0]}_green.png"
    done.write_bytes(b"sentinel")  # a finished image must not be redrawn
    synth.generate_dataset(d, **kw)
    assert done.read_bytes() == b"sentinel"
    done.write_bytes(ref[f"train/{iids[0]}_green.png"])
    assert all_bytes(d) == ref
    with pytest.raises(ConfigError, match="another dataset.*bit_depth"):
        synth.generate_dataset(d, **kw, bit_depth=16)


def _killed_during_write(out: Path, kw: dict, nth: int) -> None:
    """Run generate_dataset in a child process that is SIGKILLed at its `nth` atomic rename:
    the file being written is left as atomic_path's hidden temporary, as after a real kill."""
    import subprocess
    import sys

    code = f"""
import os, signal
import kit.atomic
n = [0]
real = os.replace
def replace(a, b):
    n[0] += 1
    if n[0] == {nth}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(a, b)
kit.atomic.os.replace = replace
from kit.synth import generate_dataset
generate_dataset({str(out)!r}, **{kw!r})
"""
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr


def test_resume_after_kill_during_an_image_write(tmp_path, capsys):
    """Issue 16 item 5: a kill during a PNG write leaves `.<ID>_<ch>.<rand>.tmp.png`; the rerun
    must take it for its own leftover (not "another dataset"), finish, and clean it up."""
    from kit.cli import main

    kw = dict(n_train=2, n_test=1, size=64, seed=3)
    ref = all_bytes(synth.generate_dataset(tmp_path / "ref", **kw))
    # synth.json is the 1st rename; image 1 writes 4 channels + 2 truth PNGs + its record, so the
    # 10th rename is the green channel of the second train image (in train/), the 13th its cell mask
    for nth, where in ((10, "train"), (13, "truth")):
        d = tmp_path / f"d{nth}"
        _killed_during_write(d, kw, nth)
        left = [p for p in (d / where).iterdir() if p.name.startswith(".") and p.name.endswith(".tmp.png")]
        assert len(left) == 1, sorted(p.name for p in (d / where).iterdir())
        args = ["synth", "--out", str(d), "--train", "2", "--test", "1", "--size", "64", "--seed", "3"]
        assert main(args) == 0, capsys.readouterr().err
        assert not left[0].exists(), (nth, left, sorted(p.name for p in (d / where).iterdir()))  # our own leftover is cleaned up
        assert all_bytes(d) == ref


def test_a_finished_images_lost_file_is_drawn_again(tmp_path):
    kw = dict(n_train=2, n_test=1, size=64, seed=3)
    d = synth.generate_dataset(tmp_path / "d", **kw)
    ref = all_bytes(d)
    lost = sorted((d / "train").glob("*_red.png"))[1]
    lost.unlink()
    (d / "truth" / lost.name.replace("_red.png", "_nuclei_mask.png")).unlink()
    synth.generate_dataset(tmp_path / "d", **kw)  # its record alone does not make it finished
    assert all_bytes(d) == ref


def test_size_mix(tmp_path):
    w = synth.size_weights([2048, 3072])
    assert abs(w[0] - 17955 / (17955 + 3842)) < 1e-9
    draws = [synth.image_size(0, "train", i, [2048, 3072]) for i in range(400)]
    assert set(draws) == {2048, 3072} and 0.7 < draws.count(2048) / 400 < 0.92
    d = synth.generate_dataset(tmp_path / "m", n_train=6, n_test=2, seed=1, sizes=[64, 96])
    sol = pd.read_csv(d / "train_solution.csv", dtype=str, keep_default_na=False)
    for r in sol.itertuples():
        img = read_sample(d / "train", r.ID)
        assert img.shape[:2] == (int(r.ImageHeight), int(r.ImageWidth))
        assert r.ImageWidth in ("64", "96")
    assert sol["ImageWidth"].nunique() == 2


def test_different_seed_different_data(tmp_path):
    a = synth.generate_dataset(tmp_path / "a", n_train=2, n_test=0, size=96, seed=1)
    b = synth.generate_dataset(tmp_path / "b", n_train=2, n_test=0, size=96, seed=2)
    ids_a = (a / "train.csv").read_text().split()[1:]
    ids_b = (b / "train.csv").read_text().split()[1:]
    assert ids_a != ids_b
    green = lambda d: sorted(p.read_bytes() for p in (d / "train").glob("*_green.png"))
    assert green(a) != green(b)


def test_draw_field_deterministic():
    f1 = synth.draw_field(np.random.default_rng([5, 0, 1]), 128)
    f2 = synth.draw_field(np.random.default_rng([5, 0, 1]), 128)
    assert np.array_equal(f1.image, f2.image) and np.array_equal(f1.cells, f2.cells)
    assert f1.cell_labels == f2.cell_labels


# ---------------------------------------------------------------------------------- truth


def test_truth_consistent(tiny_dataset):
    train = pd.read_csv(tiny_dataset / "train.csv", dtype=str, keep_default_na=False)
    image_label = dict(zip(train["ID"], train["Label"]))
    cells = pd.read_csv(tiny_dataset / "truth" / "cell_labels.csv", dtype=str, keep_default_na=False)
    cell_label = {(r.ID, int(r.cell_id)): parse_label(r.Label) for r in cells.itertuples()}
    n_subset = 0
    for split, sol_name in (("train", "train_solution.csv"), ("test", "test_solution.csv")):
        sol = pd.read_csv(tiny_dataset / sol_name, dtype=str, keep_default_na=False)
        for r in sol.itertuples():
            cm = read_u16(tiny_dataset / "truth" / f"{r.ID}_cell_mask.png")
            nm = read_u16(tiny_dataset / "truth" / f"{r.ID}_nuclei_mask.png")
            ids = [int(k) for k in np.unique(cm) if k]
            assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 3
            # one nucleus per cell, same id, inside its cell, in one piece
            assert [int(k) for k in np.unique(nm) if k] == ids
            assert np.array_equal(cm[nm > 0], nm[nm > 0])
            for k in ids:
                n_comp, _ = cv2.connectedComponents((nm == k).astype(np.uint8))
                assert n_comp == 2, f"{r.ID} nucleus {k} is in {n_comp - 1} pieces"
                n_comp, _ = cv2.connectedComponents((cm == k).astype(np.uint8), connectivity=4)
                assert n_comp == 2, f"{r.ID} cell {k} is in {n_comp - 1} pieces"
            # every solution mask is exactly one truth cell, with that cell's labels
            tokens = r.PredictionString.split()
            assert len(tokens) % 3 == 0
            got: dict[int, set[int]] = {}
            by_mask: dict[str, int] = {}
            for cls, conf, text in zip(tokens[0::3], tokens[1::3], tokens[2::3]):
                assert conf == "1"
                if text not in by_mask:
                    m = decode(text, int(r.ImageHeight), int(r.ImageWidth))
                    k = int(cm[m][0])
                    assert k > 0 and np.array_equal(m, cm == k)
                    by_mask[text] = k
                got.setdefault(by_mask[text], set()).add(int(cls))
            assert set(got) == set(ids)
            for k in ids:
                assert got[k] == set(cell_label[(r.ID, k)])
                assert got[k] == {NEGATIVE} or NEGATIVE not in got[k]
            # image label = union of the cells' location labels; 18 only if all cells are Negative
            locs = set().union(*got.values()) - {NEGATIVE}
            if split == "train":
                assert set(parse_label(image_label[r.ID])) == (locs or {NEGATIVE})
            n_subset += sum(got[k] != locs for k in ids)
    assert n_subset > 0, "no cell-to-cell heterogeneity at all"


def test_negative_image_has_only_negative_cells():
    f = synth.draw_field(np.random.default_rng(0), 128, labels=[NEGATIVE])
    assert f.image_labels == [NEGATIVE] and all(ls == [NEGATIVE] for ls in f.cell_labels)


def test_mitotic_spindle_only_in_mitotic_cells():
    for seed in range(4):
        f = synth.draw_field(np.random.default_rng(seed), 128, labels=[0, 11])
        assert 11 in f.image_labels and any(f.mitotic)
        for ls, mit in zip(f.cell_labels, f.mitotic):
            assert (11 in ls) == mit


def test_encode_masks_matches_official():
    rng = np.random.default_rng(0)
    lab = np.zeros((37, 53), np.uint16)
    lab[3:20, 5:30] = 1
    lab[15:37, 25:53] = 2
    lab[rng.random(lab.shape) < 0.05] = 3
    ids = [1, 2, 3]
    assert synth.encode_masks(lab, ids) == [official_encode(lab == k) for k in ids]
    try:
        from kit.rle import encode_binary_mask
    except ImportError:
        return
    assert synth.encode_masks(lab, ids)[1] == _text(encode_binary_mask(lab == 2))


def _text(x) -> str:
    return x.decode("ascii") if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------------- patterns


NUCLEAR = {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("cls", range(18))
def test_every_class_pattern_renders(cls):
    """Same geometry, one class at a time: the class adds green where it belongs."""
    kw = dict(size=192, n_cells=8, heterogeneity=False, n_mitotic=2 if cls == 11 else 0)
    f = synth.draw_field(np.random.default_rng(11), labels=[cls], **kw)
    neg = synth.draw_field(np.random.default_rng(11), labels=[NEGATIVE], **kw)
    assert np.array_equal(f.cells, neg.cells)
    shown = np.isin(f.cells, [k + 1 for k, ls in enumerate(f.cell_labels) if cls in ls])
    assert shown.any()
    # noiseless layers of the same geometry, textures and gains: the difference is the pattern
    extra = np.clip(f.clean[..., 1].astype(np.float64) - neg.clean[..., 1], 0, None)
    assert extra[shown].max() > 0.3 and extra[shown].mean() > 0.002  # clearly visible where shown
    assert extra[shown].mean() > 5 * extra[~shown].mean()  # and only there
    in_nuclei = extra[f.nuclei > 0].sum() / extra.sum()
    if cls == 1:  # the rim straddles the nuclear edge
        assert 0.3 < in_nuclei < 0.9, in_nuclei
    elif cls in NUCLEAR:
        assert in_nuclei > 0.6, in_nuclei
    elif cls != 11:  # the spindle surrounds the chromatin
        assert in_nuclei < 0.4, in_nuclei


def test_classes_differ_from_each_other():
    """Green of class a vs b on the same geometry differ clearly (patterns are not one fill)."""
    kw = dict(size=160, n_cells=6, heterogeneity=False, n_mitotic=0)
    greens = {c: synth.draw_field(np.random.default_rng(2), labels=[c], **kw).clean[..., 1]
              for c in (0, 1, 2, 6, 9, 13, 14, 16, 17)}
    unit = {c: (g - g.mean()) / (g.std() + 1e-9) for c, g in greens.items()}
    for a in unit:
        for b in unit:
            if a < b:
                corr = float((unit[a] * unit[b]).mean())
                assert corr < 0.9, (a, b, corr)


# ---------------------------------------------------------------------------------- depths, sizes


def test_16bit_matches_8bit(tmp_path):
    a = synth.generate_dataset(tmp_path / "a", n_train=1, n_test=0, size=96, seed=4, bit_depth=8)
    b = synth.generate_dataset(tmp_path / "b", n_train=1, n_test=0, size=96, seed=4, bit_depth=16)
    iid = (a / "train.csv").read_text().split()[1].split(",")[0]
    x8, x16 = read_sample(a / "train", iid), read_sample(b / "train", iid)
    assert x8.dtype == np.uint8 and x16.dtype == np.uint16
    assert np.abs(to_float(x8) - to_float(x16)).max() <= 0.5 / 255 + 1e-6
    assert x16.max() > 255 and len(np.unique(x16)) > len(np.unique(x8))


@pytest.mark.parametrize("size", [96, 256, 512])
def test_scale_invariant_geometry(size):
    counts, fracs = [], []
    for seed in range(3):
        f = synth.draw_field(np.random.default_rng([seed, size]), size)
        n = int(f.cells.max())
        counts.append(n)
        fracs.append(np.median(np.bincount(f.cells.ravel())[1:]) / size ** 2)
    assert all(4 <= n <= 45 for n in counts), counts
    assert 0.005 < np.median(fracs) < 0.08, fracs


def test_some_nuclei_touch_and_truth_stays_exact():
    """Crowded fields: some nuclei touch or nearly touch (within 2 px); still one piece each."""
    near = total = 0
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    for seed in range(3):
        f = synth.draw_field(np.random.default_rng([seed, 42]), 512, n_cells=30)
        n = int(f.nuclei.max())
        total += n
        for i in range(1, n + 1):
            m = (f.nuclei == i).astype(np.uint8)
            assert cv2.connectedComponents(m)[0] == 2
            assert np.all(f.cells[m > 0] == i)
            ring = cv2.dilate(m, k) > 0
            near += bool(np.any((f.nuclei[ring] > 0) & (f.nuclei[ring] != i)))
    assert 0.05 * total < near < 0.7 * total, (near, total)


def test_large_field():
    f = synth.draw_field(np.random.default_rng(1), 1728, n_cells=18)
    n = int(f.cells.max())
    assert 12 <= n <= 18
    assert 0.3 < (f.cells > 0).mean() < 0.98


# ---------------------------------------------------------------------------------- labels


def test_label_table_shipped_and_sampled():
    sets, p = synth.label_table()
    assert len(sets) > 300 and abs(p.sum() - 1) < 1e-9
    assert all(s == sorted(set(s)) and (s == [NEGATIVE] or NEGATIVE not in s) for s in sets)
    rng = np.random.default_rng(0)
    draws = [synth.draw_image_labels(rng) for _ in range(3000)]
    freq0 = np.mean([0 in d for d in draws])
    expect0 = sum(pi for s, pi in zip(sets, p) if 0 in s)
    assert abs(freq0 - expect0) < 0.04


def test_label_table_rebuilds_from_real_csv(tmp_path):
    real = require(REAL_TRAIN_CSV)
    out = synth.build_label_table(real, tmp_path / "label_sets.csv")
    assert out.read_bytes() == synth.LABEL_TABLE.read_bytes()


# ---------------------------------------------------------------------------------- CLI


def test_cli(tmp_path, capsys):
    from kit.cli import main

    assert main(["synth", "--out", str(tmp_path / "d"), "--train", "1", "--test", "1", "--size", "64"]) == 0
    assert len(list((tmp_path / "d" / "train").glob("*.png"))) == 4
    assert main(["synth", "--out", str(tmp_path / "e"), "--train", "0", "--test", "0"]) == 2
    assert "at least one image" in capsys.readouterr().err
    # rerunning into the same folder is fine; another dataset's files there are refused
    assert main(["synth", "--out", str(tmp_path / "d"), "--train", "1", "--test", "1", "--size", "64"]) == 0
    assert main(["synth", "--out", str(tmp_path / "d"), "--train", "1", "--test", "1", "--seed", "9"]) == 2
    assert "another dataset" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- styles, scale


def _check_truth(f) -> None:
    """The per-cell truth invariants every field keeps, whatever its style."""
    ids = [int(k) for k in np.unique(f.cells) if k]
    assert ids == list(range(1, len(ids) + 1)) == [int(k) for k in np.unique(f.nuclei) if k]
    assert np.array_equal(f.cells[f.nuclei > 0], f.nuclei[f.nuclei > 0])  # cell k contains nucleus k
    for k in ids:
        assert cv2.connectedComponents((f.nuclei == k).astype(np.uint8))[0] == 2, f"nucleus {k} in pieces"
        assert cv2.connectedComponents((f.cells == k).astype(np.uint8), connectivity=4)[0] == 2, f"cell {k}"
    assert len(f.cell_labels) == len(ids)
    locs = {l for ls in f.cell_labels for l in ls} - {NEGATIVE}
    assert set(f.image_labels) == (locs or {NEGATIVE})  # union; Negative only when every cell is
    assert all(ls == [NEGATIVE] or NEGATIVE not in ls for ls in f.cell_labels)


@pytest.mark.parametrize("style", sorted(synth.STYLES))
def test_every_style_keeps_the_truth_invariants_and_is_deterministic(style):
    for seed in range(3):
        f = synth.draw_field(np.random.default_rng([seed, 0, 9]), 192, style=style)
        assert f.style == style and f.field_px == 2048
        _check_truth(f)
    g = synth.draw_field(np.random.default_rng([2, 0, 9]), 192, style=style)
    assert np.array_equal(f.image, g.image) and np.array_equal(f.cells, g.cells)


def _mean(style: str, fn, n: int = 4, size: int = 256, **kw) -> float:
    return float(np.mean([fn(synth.draw_field(np.random.default_rng([s, 5]), size, style=style, **kw))
                          for s in range(n)]))


def test_styles_draw_what_they_say():
    cells = lambda f: int(f.cells.max())
    cover = lambda f: float((f.cells > 0).mean())
    assert _mean("confluent", cells) > 1.6 * _mean("default", cells)
    assert _mean("confluent", cover) > max(0.85, _mean("default", cover) + 0.15)
    mitotic = lambda f: float(np.mean(f.mitotic))
    assert _mean("mitotic", mitotic, n=3) > 0.15 > _mean("default", mitotic, n=3)
    # dim: darker cells in every channel
    level = lambda f: float(np.percentile(f.image[f.cells > 0], 99))
    assert _mean("dim", level) < 0.6 * _mean("default", level)

    # textured: more contrast inside the nuclei (chromatin and nucleoli), same geometry otherwise
    def nuc_contrast(f):
        b = f.clean[..., 2]
        inner = cv2.erode((f.nuclei > 0).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        return float(b[inner].std() / b[inner].mean())

    assert _mean("textured", nuc_contrast, n=3, size=384) > 1.3 * _mean("default", nuc_contrast, n=3, size=384)

    # irregular outlines: less convex cells
    def solidity(f):
        out = []
        for k in range(1, int(f.cells.max()) + 1):
            m = (f.cells == k).astype(np.uint8)
            c = max(cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)[0], key=cv2.contourArea)
            out.append(m.sum() / max(cv2.contourArea(cv2.convexHull(c)), 1))
        return float(np.median(out))

    assert _mean("irregular", solidity, n=3) < _mean("default", solidity, n=3) - 0.02

    # heterogeneous: more of the cells of a positive field show only part of its labels
    def partial(f):
        return float(np.mean([set(ls) != set(f.image_labels) for ls in f.cell_labels]))

    het = np.mean([partial(synth.draw_field(np.random.default_rng([s, 6]), 160, labels=[0, 14, 16],
                                            style="heterogeneous")) for s in range(4)])
    dft = np.mean([partial(synth.draw_field(np.random.default_rng([s, 6]), 160, labels=[0, 14, 16]))
                   for s in range(4)])
    assert het > dft + 0.2, (het, dft)


def test_size_means_microscope_resolution_from_1728_px():
    assert [synth.default_field_px(x) for x in (96, 256, 512, 1024, 1727, 1728, 2048, 3072)] == \
        [2048] * 5 + [1728, 2048, 3072]
    # a small image is a downscaled 2048 px field; with field_px it is a crop at full resolution
    whole = synth.draw_field(np.random.default_rng(3), 256)
    crop = synth.draw_field(np.random.default_rng(3), 256, field_px=512)
    assert whole.field_px == 2048 and crop.field_px == 512
    area = lambda f: np.median(np.bincount(f.cells.ravel())[1:]) * (f.field_px / 256) ** 2  # microscope px
    assert int(crop.cells.max()) < int(whole.cells.max())
    # the cells have the same size in microscope px, whatever the scale (within the field spread)
    ratios = [area(synth.draw_field(np.random.default_rng([s, 1]), 256, field_px=768))
              / area(synth.draw_field(np.random.default_rng([s, 1]), 256)) for s in range(6)]
    assert 0.4 < float(np.median(ratios)) < 2.5, ratios


def test_mixed_style_per_image_recorded_and_resumable(tmp_path):
    from kit.errors import ConfigError

    styles = [synth.image_style(4, "train", i, "mixed") for i in range(60)]
    assert styles == [synth.image_style(4, "train", i, "mixed") for i in range(60)]
    assert set(styles) == set(synth.STYLES) and 0.2 < styles.count("default") / 60 < 0.5
    kw = dict(n_train=4, n_test=1, size=96, seed=4, style="mixed")
    d = synth.generate_dataset(tmp_path / "m", **kw)
    rows = pd.read_csv(d / "truth" / "images.csv", dtype=str)
    assert list(rows.columns) == ["ID", "split", "size", "field_px", "style"]
    assert rows["style"].tolist() == [synth.image_style(4, s, i, "mixed") for s, i in
                                      [("train", 0), ("train", 1), ("train", 2), ("train", 3), ("test", 0)]]
    assert (rows["field_px"] == "2048").all()
    before = all_bytes(d)
    synth.generate_dataset(d, **kw)
    assert all_bytes(d) == before
    with pytest.raises(ConfigError, match="style"):
        synth.generate_dataset(d, **{**kw, "style": "hard"})
    with pytest.raises(ConfigError, match="--style"):
        synth.generate_dataset(tmp_path / "x", n_train=1, n_test=0, style="nope")


def _realism():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "realism.py"
    spec = importlib.util.spec_from_file_location("realism", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_realism_measures_what_the_truth_says():
    """benchmarks/realism.py finds nuclei from the blue channel alone: on synthetic fields its
    areas agree with the truth nuclei, and its cell figures with the truth masks."""
    realism = _realism()
    f = synth.draw_field(np.random.default_rng([0, 0, 0]), 512)
    st = realism.field_stats(synth.quantise(f.image, 8), f.cells, f.field_px)
    assert st["cells"] == int(f.cells.max())
    interior = [k for k in range(1, int(f.cells.max()) + 1) if not np.isin(k, np.concatenate(
        [f.cells[0], f.cells[-1], f.cells[:, 0], f.cells[:, -1]]))]
    true_nuc = np.median([(f.nuclei == k).sum() for k in interior]) * (f.field_px / 512) ** 2
    assert abs(st["nuc_px"] / true_nuc - 1) < 0.25, (st["nuc_px"], true_nuc)
    assert 0.8 < st["solidity"] <= 1.0 and 0 < st["cover"] < 1


REAL_FIELDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "hpa_real" / "kaggle2021_fields"


def test_default_fields_match_the_real_fields():
    """The default style against the four real Kaggle fields (reference masks): cell and nucleus
    areas (microscope px) and the nucleus/cell ratio of the synthetic fields lie within the real
    fields' range, and so does the cells-per-field median of the real train table."""
    require(REAL_FIELDS)
    realism = _realism()
    real = [realism.field_stats(img, cells) for _, img, cells in realism.real_kaggle_fields()]
    # 512 px images are 2048 px fields downscaled: the same geometry, areas scaled back
    syn = [realism.field_stats(synth.quantise(f.image, 8), f.cells, f.field_px)
           for f in (synth.draw_field(np.random.default_rng([s, 0, s]), 512) for s in range(8))]
    for key in ("cell_px", "nuc_px", "nc_ratio"):
        lo, hi = min(r[key] for r in real), max(r[key] for r in real)
        med = float(np.median([r[key] for r in syn]))
        assert lo <= med <= hi, (key, med, lo, hi)
    assert 13 <= np.median([r["cells"] for r in syn]) <= 24  # real train table: median 17 (IQR 13-24)
