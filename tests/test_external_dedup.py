"""`kit dedup`: planted duplicates (crops, flips, re-encodings, intensity changes) are grouped, others not."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from kit.external import dedup as dd
from kit.external import dedup_eval as ev


def blob_field(seed: int, size: int = 192) -> np.ndarray:
    """A field-like green channel: 10-30 cells of punctate texture on a dark background, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.zeros((size, size), np.float32)
    for _ in range(int(rng.integers(10, 30))):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(size / 20, size / 9)
        img += rng.uniform(0.2, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    texture = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 1.5)
    img *= 0.6 + 0.8 * texture
    return np.clip(img / img.max(), 0, 1)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup")
    bases = [(f"f{k:02d}", blob_field(k)) for k in range(30)]
    truth = ev.plant_set(root / "train", bases, seed=1, share=0.5)
    return root, truth


def test_candidate_search_matches_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, 16, 16)).astype(np.float32)
    grids = np.concatenate([base, np.stack([dd.d4(base[k], k % 8) for k in range(10)])])  # 10 rotated copies
    desc = grids.reshape(len(grids), -1)
    desc -= desc.mean(axis=1, keepdims=True)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    pi, pj, cos, ori = dd.candidate_pairs(desc, floor=0.3, top_k=2, block=7, db_block=11)
    assert (pi < pj).all()
    got = {(int(a), int(b)): float(c) for a, b, c in zip(pi, pj, cos)}
    n = len(desc)
    brute = np.full((n, n), -np.inf)
    for a in range(n):
        variants = np.stack([dd.d4(desc[a].reshape(16, 16), k).ravel() for k in range(8)])
        brute[a] = (variants @ desc.T).max(axis=0)
    expected = {(a, b) for a in range(n) for b in range(a + 1, n) if brute[a, b] >= 0.3}
    assert expected <= set(got)
    for k in range(10):  # every rotated copy is found with cosine 1 and the orientation that undoes it
        assert got[(k, 40 + k)] == pytest.approx(1.0, abs=1e-5)
    for (a, b), c in got.items():
        assert c == pytest.approx(brute[a, b], abs=1e-4)
    for a in range(n):  # each row's 2 nearest are candidates
        for b in np.argsort(-np.where(np.arange(n) == a, -np.inf, brute[a]))[:2]:
            assert (min(a, b), max(a, b)) in got


def test_verify_crop_flip_and_unrelated():
    a = dd.thumbnail(blob_field(3))
    other = dd.thumbnail(blob_field(4))
    crop = dd.thumbnail(ev._crop(np.random.default_rng(0), blob_field(3), 0.85, 0.85))
    assert dd.verify(a, a, 0)[0] == pytest.approx(1.0, abs=1e-4)
    flipped = np.ascontiguousarray(dd.d4(a, 5))
    assert dd.verify(flipped, a, 3)[0] < 0.99  # wrong orientation: not the identity ...
    inverse = next(k for k in range(8) if np.array_equal(dd.d4(flipped, k), a))
    assert dd.verify(flipped, a, inverse)[0] == pytest.approx(1.0, abs=1e-4)  # ... the inverse one is
    sim, scale = dd.verify(a, crop, 0)
    assert sim > 0.9 and scale in (0.8, 0.85, 0.9)
    assert dd.verify(a, other, 0)[0] < 0.7


def test_planted_duplicates_are_grouped_and_nothing_else(planted, tmp_path):
    root, truth = planted
    items = dd.list_items([root / "train"])
    thumbs, errors = dd.compute_features(items, tmp_path / "feat")
    result = dd.find_duplicates(items, thumbs, errors, threshold=0.9)
    s = ev.score(result.pairs, truth, 0.9)
    assert s["precision"] == 1.0, result.pairs.head(20)
    assert s["recall"] >= 0.9, s
    groups = result.groups
    planted_ids = {p.base for p in truth} | {p.copy for p in truth}
    assert set(groups.ID) <= planted_ids
    g = dict(zip(groups.ID, groups.group))
    found = [p for p in truth if p.copy in g and g.get(p.base) == g[p.copy]]
    assert len(found) >= 0.9 * len(truth)
    assert (groups.group_size >= 2).all() and not groups["drop"].any()


def test_command_outputs_exclude_test_resume_and_shards(planted, tmp_path, monkeypatch):
    root, truth = planted
    test_dir = tmp_path / "test"
    test_dir.mkdir()
    leaked = [p for p in truth if p.kind in ("d4", "intensity")]
    for p in leaked:  # the copy moves to the test folder: its base leaks into training
        for f in (root / "train").glob(f"{p.copy}_green.*"):
            (test_dir / f.name).write_bytes(f.read_bytes())
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for f in (root / "train").iterdir():
        if not any(f.name.startswith(p.copy + "_") for p in leaked):
            (train_dir / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "groups.csv"
    from kit.cli import main as kit_main

    assert kit_main(["dedup", "--images", str(train_dir), "--exclude-test", str(test_dir), "--out", str(out),
                     "--pairs-png", "3", "--quiet"]) == 0
    groups = pd.read_csv(out, dtype={"group": str})
    assert groups.columns.tolist() == ["ID", "group", "folder", "group_size", "is_test", "drop"]
    dropped = set(groups.ID[groups["drop"] == 1])
    assert dropped == {p.base for p in leaked}
    assert set(groups.ID[groups.is_test == 1]) == {p.copy for p in leaked}
    report = (tmp_path / "groups.report.txt").read_text()
    assert f"{len(leaked)} training images duplicate a test image" in report
    pngs = sorted((tmp_path / "groups_pairs").glob("*.png"))
    assert 3 <= len(pngs) <= 6
    img = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (256 + 40, 2 * 256 + 8)
    left, right = img[40:, :256].astype(float).ravel(), img[40:, 264:].astype(float).ravel()
    assert np.corrcoef(left, right)[0, 1] > 0.9  # the most similar pair, shown in the orientation that matched
    pairs = pd.read_csv(tmp_path / "groups.pairs.csv")
    assert pairs.similarity.is_monotonic_decreasing and (pairs.similarity >= 0.9).sum() >= len(truth) - 2

    # a rerun reads the feature cache: no image is decoded again
    def no_decode(*a, **k):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(dd, "_read_green", no_decode)
    assert kit_main(["dedup", "--images", str(train_dir), "--exclude-test", str(test_dir), "--out", str(out),
                     "--quiet"]) == 0
    assert pd.read_csv(out, dtype={"group": str}).equals(groups)
    monkeypatch.undo()

    # array jobs: two shards compute disjoint feature chunks into one folder, the final run only searches
    monkeypatch.setattr(dd, "CHUNK", 7)
    feat = tmp_path / "shared_features"
    for i in range(2):
        assert kit_main(["dedup", "--images", str(train_dir), "--out", str(tmp_path / "g2.csv"), "--features", str(feat),
                         "--shard", f"{i}/2", "--quiet"]) == 0
    n_items = len(dd.list_items([train_dir]))
    assert len(list(feat.glob("*.npz"))) == -(-n_items // 7)
    assert not (tmp_path / "g2.csv").exists()
    monkeypatch.setattr(dd, "_read_green", no_decode)
    assert kit_main(["dedup", "--images", str(train_dir), "--out", str(tmp_path / "g2.csv"), "--features", str(feat),
                     "--quiet"]) == 0
    assert len(pd.read_csv(tmp_path / "g2.csv")) >= len(truth)


def test_unreadable_image_matches_nothing_and_bad_options(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    g = blob_field(1)
    cv2.imwrite(str(d / "a_green.png"), (g * 255).astype(np.uint8))
    cv2.imwrite(str(d / "b_green.png"), (g * 255).astype(np.uint8))
    (d / "c_green.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    items = dd.list_items([d])
    thumbs, errors = dd.compute_features(items, tmp_path / "f")
    assert [bool(e) for e in errors] == [False, False, True]
    result = dd.find_duplicates(items, thumbs, errors)
    assert set(result.groups.ID) == {"a", "b"}
    result_cli = subprocess.run([sys.executable, "-m", "kit", "dedup", "--images", str(d), "--out",
                                 str(tmp_path / "g.txt")], cwd=REPO, capture_output=True, text=True)
    assert result_cli.returncode == 2 and "must end in .csv" in result_cli.stderr
    result_cli = subprocess.run([sys.executable, "-m", "kit", "dedup", "--images", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "g.csv")], cwd=REPO, capture_output=True, text=True)
    assert result_cli.returncode == 2 and "image folder not found" in result_cli.stderr
