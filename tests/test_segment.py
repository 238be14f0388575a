"""Segmentation: classical backend, registry, id contract, mask cache, shards, resume (hpacellseg: test_hpacellseg.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from kit.errors import ConfigError, DataError
from kit.segment import (
    available_backends,
    backend_options,
    finalize_labels,
    get_backend,
    instance_f1,
    register_backend,
    segment_image,
    segment_images,
)
from kit.segment.cache import MaskCache, parse_shard, segment_folder, shard_ids

REPO = Path(__file__).resolve().parents[1]


def ellipse_field(size=256, grid=3, seed=0, bits=8, noise=0.02, gain=1.0):
    """Touching elliptical cells on a grid, each with an elliptical nucleus -> (image, nuclei, cells)."""
    rng = np.random.default_rng(seed)
    cells = np.zeros((size, size), np.int32)
    nuclei = np.zeros((size, size), np.int32)
    step = size / grid
    k = 0
    for i in range(grid):
        for j in range(grid):
            k += 1
            cy = int((i + 0.5) * step + rng.uniform(-0.08, 0.08) * step)
            cx = int((j + 0.5) * step + rng.uniform(-0.08, 0.08) * step)
            a = int(step * 0.52)
            b = int(a * rng.uniform(0.75, 1.0))
            ang = float(rng.uniform(0, 180))
            m = np.zeros((size, size), np.uint8)
            cv2.ellipse(m, (cx, cy), (a, b), ang, 0, 360, 1, -1)
            cells[(m > 0) & (cells == 0)] = k
            m[:] = 0
            cv2.ellipse(m, (cx, cy), (int(a * 0.4), int(b * 0.4)), ang, 0, 360, 1, -1)
            nuclei[m > 0] = k
    edge = cv2.dilate(cells.astype(np.float32), np.ones((3, 3))) != cv2.erode(cells.astype(np.float32), np.ones((3, 3)))
    img = np.zeros((size, size, 4), np.float32)
    img[..., 0] = (cells > 0) * 0.4 * np.where(edge, 0.3, 1.0)
    img[..., 1] = (cells > 0) * 0.2
    img[..., 2] = (nuclei > 0) * 0.8
    img[..., 3] = (cells > 0) * 0.35 * np.where(edge, 0.3, 1.0)
    img = (cv2.GaussianBlur(img, (0, 0), 1.0) + rng.normal(0, noise, img.shape).astype(np.float32)) * gain
    full = 255 if bits == 8 else 65535
    img = (np.clip(img, 0, 1) * full).astype(np.uint8 if bits == 8 else np.uint16)
    return img, nuclei, cells


def check_contract(image, nuclei, cells):
    assert nuclei.dtype == np.int32 and cells.dtype == np.int32
    assert nuclei.shape == cells.shape == image.shape[:2]
    n = int(cells.max())
    assert set(np.unique(cells)) == set(range(n + 1))  # ids 1..N without gaps
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()  # nucleus k lies in cell k
    assert set(np.unique(nuclei[inside])) == set(range(1, n + 1))  # every cell has its nucleus


# ------------------------------------------------------------------------ classical backend

@pytest.mark.parametrize("bits,gain", [(8, 1.0), (16, 1.0), (16, 0.02)])  # 0.02: a faint 16-bit image
def test_classical_finds_cells_with_matching_ids(bits, gain):
    image, true_nuclei, true_cells = ellipse_field(size=256, seed=1, bits=bits, gain=gain)
    nuclei, cells = segment_image(image)
    check_contract(image, nuclei, cells)
    assert instance_f1(cells, true_cells)["f1"] >= 0.9
    assert instance_f1(nuclei, true_nuclei)["f1"] >= 0.9


def test_classical_keeps_dim_nuclei_and_splits_touching_ones():
    image, true_nuclei, true_cells = ellipse_field(size=512, grid=4, seed=0, bits=16)
    # Nuclei from 10% to 100% brightness (DAPI varies with the cell cycle and the optics).
    gains = np.random.default_rng(0).uniform(0.1, 1.0, true_nuclei.max() + 1)
    gains[0] = 1.0
    near = cv2.dilate(true_nuclei.astype(np.float32), np.ones((5, 5))).astype(int)
    image[..., 2] = (image[..., 2] * gains[near]).astype(np.uint16)
    nuclei, cells = segment_image(image)
    check_contract(image, nuclei, cells)
    assert instance_f1(cells, true_cells)["f1"] == 1.0
    # Two overlapping round nuclei in one blob (a figure eight) become two nuclei and two cells.
    blue = np.zeros((256, 256), np.uint8)
    cv2.circle(blue, (100, 128), 30, 200, -1)
    cv2.circle(blue, (150, 128), 30, 200, -1)
    red = np.zeros((256, 256), np.uint8)
    cv2.ellipse(red, (125, 128), (100, 70), 0, 0, 360, 90, -1)
    pair = np.stack([red, np.zeros_like(red), blue, red // 2], axis=-1)
    nuclei, cells = segment_image(pair)
    check_contract(pair, nuclei, cells)
    assert cells.max() == 2 and nuclei[128, 100] != nuclei[128, 150]


def test_classical_reduced_scale_matches_full_scale():
    image, _, true_cells = ellipse_field(size=1024, grid=3, seed=2)
    n4, c4 = segment_image(image, scale=0.25, min_work_side=0)
    n1, c1 = segment_image(image, scale=1.0)
    check_contract(image, n4, c4)
    assert c4.shape == (1024, 1024)
    assert instance_f1(c4, true_cells)["f1"] == 1.0
    assert instance_f1(c1, true_cells)["f1"] == 1.0
    # 1/4 scale loses a little boundary precision on this toy (0.87 vs 0.96 at full resolution),
    # far above the 0.6 the metric asks
    assert instance_f1(c4, true_cells)["mean_iou"] >= 0.85
    assert instance_f1(c1, true_cells)["mean_iou"] >= instance_f1(c4, true_cells)["mean_iou"] - 0.02


def test_classical_on_synthetic_dataset(tiny_dataset):
    from kit.images import read_sample

    ids = pd.read_csv(tiny_dataset / "train.csv")["ID"].tolist()[:4]
    tp = n_pred = n_true = 0
    for image_id in ids:
        image = read_sample(tiny_dataset / "train", image_id)
        nuclei, cells = segment_image(image)
        check_contract(image, nuclei, cells)
        truth = cv2.imread(str(tiny_dataset / "truth" / f"{image_id}_cell_mask.png"), cv2.IMREAD_UNCHANGED)
        s = instance_f1(cells, truth.astype(np.int32))
        tp, n_pred, n_true = tp + s["tp"], n_pred + s["n_pred"], n_true + s["n_true"]
    assert 2 * tp / (n_pred + n_true) >= 0.9


@pytest.mark.parametrize("image", [
    np.zeros((128, 128, 4), np.uint8),
    np.full((128, 96, 4), 40000, np.uint16),
    np.random.default_rng(0).integers(0, 256, (256, 256, 4)).astype(np.uint8),
    np.zeros((0, 0, 4), np.uint8),
    np.zeros((5, 300, 4), np.uint16),
], ids=["black", "constant16", "noise", "empty", "sliver"])
def test_blank_or_noise_image_gives_no_cells(image):
    nuclei, cells = segment_image(image)
    assert nuclei.shape == cells.shape == image.shape[:2]
    assert cells.dtype == np.int32
    assert cells.max(initial=0) == 0 and nuclei.max(initial=0) == 0


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError, match="RGBY"):
        segment_image(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(DataError, match="uint8 or uint16"):
        segment_image(np.zeros((64, 64, 4), np.float32))


# ------------------------------------------------------------------------ contract and registry

def test_finalize_labels_repairs_backend_output():
    cells = np.zeros((20, 20), np.int32)
    nuclei = np.zeros((20, 20), np.int32)
    cells[0:10, 0:10] = 5      # its nucleus, labelled 1, takes the cell's id
    nuclei[2:5, 2:5] = 1
    cells[0:10, 10:20] = 7     # no nucleus: dropped
    cells[10:20, 0:15] = 9     # nucleus 3 sticks out of the cell: clipped to it
    nuclei[12:15, 12:18] = 3
    nuclei[16:19, 17:19] = 4   # a nucleus in the background: dropped
    n, c = finalize_labels(nuclei, cells, (20, 20))
    assert sorted(np.unique(c)) == [0, 1, 2]
    assert (c[0:10, 0:10] == 1).all() and (c[0:10, 10:20] == 0).all() and (c[10:20, :15] == 2).all()
    assert (n[2:5, 2:5] == 1).all() and (n[12:15, 12:15] == 2).all() and n[:, 15:].max() == 0
    assert (n > 0).sum() == 9 + 9
    with pytest.raises(ValueError, match="shape"):
        finalize_labels(nuclei[:5], cells, (20, 20))


def test_registry_plugs_in_a_new_backend():
    calls = []

    @register_backend("test-squares")
    def squares(image, *, half=8):
        calls.append(half)
        cells = np.zeros(image.shape[:2], np.int32)
        cells[: 2 * half, : 2 * half] = 3
        nuclei = np.zeros_like(cells)
        nuclei[half // 2: half, half // 2: half] = 3
        return nuclei, cells

    assert "test-squares" in available_backends() and "classical" in available_backends()
    assert get_backend("test-squares") is squares
    assert backend_options("test-squares") == {"half": 8}
    image = np.zeros((32, 32, 4), np.uint8)
    nuclei, cells = segment_image(image, "test-squares", half=4)
    assert calls == [4] and cells.max() == 1 and cells[:8, :8].all() and nuclei.max() == 1
    results = segment_images([image, image[:16, :16]], "test-squares")
    assert [r[1].shape for r in results] == [(32, 32), (16, 16)]
    with pytest.raises(ConfigError, match="unknown option"):
        backend_options("test-squares", {"size": 3})
    with pytest.raises(ConfigError, match="unknown segmentation backend"):
        segment_image(image, "no-such-backend")


def test_instance_f1():
    a = np.zeros((10, 10), np.int32)
    a[:5, :5] = 1
    a[5:, 5:] = 2
    assert instance_f1(a, a)["f1"] == 1.0
    b = a.copy()
    b[5:, 5:] = 0
    b[0:5, 5:10] = 7  # a false positive
    r = instance_f1(b, a)
    assert (r["tp"], r["precision"], r["recall"]) == (1, 0.5, 0.5)
    shifted = np.roll(a, 2, axis=1)  # IoU 3/7 < 0.6
    assert instance_f1(shifted, a)["tp"] == 0
    assert instance_f1(np.zeros_like(a), np.zeros_like(a))["f1"] == 1.0


# ------------------------------------------------------------------------ mask cache

def write_sample(folder: Path, image_id: str, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(("red", "green", "blue", "yellow")):
        assert cv2.imwrite(str(folder / f"{image_id}_{name}.png"), image[..., c])


def test_mask_cache_layout_and_round_trip(tmp_path):
    cache = MaskCache(tmp_path, "classical")
    assert cache.dir.parent == tmp_path and cache.dir.name.startswith("classical-")
    # Defaults written out explicitly key the same folder; a changed option another one.
    assert MaskCache(tmp_path, "classical", {"scale": 0.25}).dir == cache.dir
    assert MaskCache(tmp_path, "classical", {"scale": 0.5}).dir != cache.dir
    with pytest.raises(ConfigError):
        MaskCache(tmp_path, "classical", {"scael": 0.5})
    image, _, _ = ellipse_field(size=128, grid=2)
    nuclei, cells, table = cache.segment_and_save("img1", image)
    assert cache.path("img1") == cache.dir / "img1.npz" and cache.has("img1") and not cache.has("img2")
    n2, c2, t2 = cache.load("img1")
    assert n2.dtype == np.int32 and (n2 == nuclei).all() and (c2 == cells).all()
    pd.testing.assert_frame_equal(t2, table, check_dtype=False)
    assert {"cell_id", "x0", "y0", "x1", "y1", "area", "nucleus_area", "touches_border",
            "nucleus_visible_fraction", "mean_blue"} <= set(t2.columns)
    with np.load(cache.path("img1"), allow_pickle=False) as z:
        assert z["cells"].dtype == np.uint16  # stored compact, read as int32
    # ids past uint16 are stored as int32 and read back exactly
    big = np.zeros((8, 8), np.int32)
    big[2:4, 2:4] = 70000
    cache.save("big", big, big, table)
    with np.load(cache.path("big"), allow_pickle=False) as z:
        assert z["cells"].dtype == np.int32
    assert (cache.load("big")[1] == big).all()
    cache.path("big").unlink()
    assert cache.ids() == ["img1"]
    with pytest.raises(DataError, match="not in the mask cache"):
        cache.load("img2")


def test_shards_cover_every_image_once():
    ids = [f"id{i:03d}" for i in range(23)]
    shards = [shard_ids(reversed(ids), f"{i}/4") for i in range(4)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(ids) and len(flat) == len(set(flat))
    assert shard_ids(ids, None) == sorted(ids)
    assert parse_shard(" 2 / 5 ") == (2, 5)
    for bad in ("4/4", "1", "a/b", "-1/3", "0/0"):
        with pytest.raises(ConfigError):
            parse_shard(bad)


def test_segment_folder_skips_done_and_survives_bad_files(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        write_sample(images, f"s{i}", ellipse_field(size=128, grid=2, seed=i)[0])
    write_sample(images, "blank", np.zeros((128, 128, 4), np.uint8))
    write_sample(images, "broken", ellipse_field(size=128, grid=2)[0])
    data = (images / "broken_blue.png").read_bytes()
    (images / "broken_blue.png").write_bytes(data[: len(data) // 2])  # truncated PNG
    cache = MaskCache(tmp_path / "cache")
    ids = ["s0", "s1", "s2", "blank", "broken", "missing"]
    with pytest.warns(UserWarning, match="could not be read"):
        done = segment_folder(images, ids, cache, progress=False)
    assert done == sorted(set(ids) - {"missing"})  # a missing file is left to do, not cached
    assert cache.load("blank")[1].max() == 0 and len(cache.load("blank")[2]) == 0
    nb, cb, tb = cache.load("broken")
    assert cb.size == 0 and len(tb) == 0 and "truncated" in cache.error("broken")
    assert cache.error("s0") is None and cache.load("s0")[1].max() == 4
    mtimes = {i: cache.path(i).stat().st_mtime_ns for i in done}
    with pytest.warns(UserWarning):
        assert segment_folder(images, ids, cache, progress=False) == done
    assert {i: cache.path(i).stat().st_mtime_ns for i in done} == mtimes  # nothing redone
    assert (cache.dir / "params.json").exists()


def test_segment_folder_workers_match_serial(tmp_path):
    images = tmp_path / "images"
    for i in range(3):
        write_sample(images, f"w{i}", ellipse_field(size=128, grid=2, seed=10 + i, bits=16)[0])
    serial = MaskCache(tmp_path / "a")
    pooled = MaskCache(tmp_path / "b")
    ids = ["w0", "w1", "w2"]
    assert segment_folder(images, ids, serial, progress=False) == ids
    assert segment_folder(images, ids, pooled, workers=2, progress=False) == ids
    for i in ids:
        for x, y in zip(serial.load(i)[:2], pooled.load(i)[:2]):
            assert (x == y).all()


def _run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "kit", "segment", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_segment_command_resumes_after_kill(tmp_path):
    images = tmp_path / "images"
    ids = [f"k{i}" for i in range(6)]
    for i, image_id in enumerate(ids):
        write_sample(images, image_id, ellipse_field(size=768, grid=3, seed=20 + i)[0])
    out = tmp_path / "cache"
    proc = _run_cli(["--images", str(images), "--out", str(out), "--quiet"])
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*/*.npz")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sorted(p.name for p in out.glob("*/*.npz"))
    assert 1 <= len(first) < len(ids), "the run should have been killed mid-way"
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*/*.npz")}
    proc = _run_cli(["--images", str(images), "--out", str(out), "--quiet"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    assert "6/6 images" in stdout.decode()
    for p in out.glob("*/*.npz"):  # finished files were skipped, not rewritten
        if p.name in finished:
            assert p.stat().st_mtime_ns == finished[p.name]
    # Identical to an uninterrupted run.
    clean = MaskCache(tmp_path / "clean")
    segment_folder(images, ids, clean, progress=False)
    resumed = MaskCache(out)
    assert resumed.dir.name == clean.dir.name
    for image_id in ids:
        a, b = resumed.load(image_id), clean.load(image_id)
        assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
        pd.testing.assert_frame_equal(a[2], b[2])
    visible = sorted(p.name for p in resumed.dir.iterdir() if not p.name.startswith("."))
    assert visible == sorted([f"{i}.npz" for i in ids] + ["params.json"])


def test_segment_command_shards_and_errors(tmp_path, capsys):
    from kit.cli import main

    images = tmp_path / "images"
    for i in range(3):
        write_sample(images, f"c{i}", ellipse_field(size=128, grid=2, seed=i)[0])
    out = tmp_path / "cache"
    for i in range(2):
        assert main(["segment", "--images", str(images), "--out", str(out), "--shard", f"{i}/2", "--quiet"]) == 0
    assert sorted(MaskCache(out).ids()) == ["c0", "c1", "c2"]
    assert main(["segment", "--images", str(images), "--out", str(out), "--shard", "2/2"]) == 2
    assert "shard" in capsys.readouterr().err
    assert main(["segment", "--images", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["segment", "--images", str(images), "--out", str(out), "--backend", "nope"]) == 2
    # --tiles: images segmented now get their tiles in the same pass, cached ones afterwards.
    assert main(["segment", "--images", str(images), "--out", str(out), "--option", "scale=0.5",
                 "--shard", "0/2", "--quiet"]) == 0
    assert main(["segment", "--images", str(images), "--out", str(out), "--option", "scale=0.5",
                 "--tiles", "32", "--quiet"]) == 0
    tile_dirs = list(out.glob("tiles-32-*"))
    assert len(tile_dirs) == 1 and sorted(p.name for p in tile_dirs[0].glob("*.npy")) == ["c0.npy", "c1.npy", "c2.npy"]
    from kit.cells import extract_tiles, load_tiles
    from kit.images import read_sample

    cache = MaskCache(out, "classical", {"scale": 0.5})
    for image_id in ("c0", "c1"):  # c0 tiled from the cache, c1 in the segmenting pass: same result
        tiles, table = load_tiles(tile_dirs[0], image_id)
        nuclei, cells, cached_table = cache.load(image_id)
        expected, _ = extract_tiles(read_sample(images, image_id), cells, 32, table=cached_table)
        assert (np.asarray(tiles) == expected).all() and len(table) == len(cached_table)


# ------------------------------------------------------------------------ plugins

PLUGIN = '''
import numpy as np
from kit.segment import register_backend


@register_backend("plugin-squares")
def squares(image, *, side=16):
    cells = np.zeros(image.shape[:2], np.int32)
    cells[:side, :side] = 1
    cells[-side:, -side:] = 2
    nuclei = np.where((cells > 0) & (image[..., 2] > 0), cells, 0)
    return nuclei, cells
'''


def test_plugin_backend_in_spawned_workers(tmp_path, monkeypatch):
    """A team's own segmenter: a module registering a backend, used by the CLI with 2 workers."""
    from kit.cli import main

    (tmp_path / "my_segmenter.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = tmp_path / "images"
    for i in range(3):
        write_sample(images, f"p{i}", np.full((64, 64, 4), 50, np.uint8))
    out = tmp_path / "cache"
    assert main(["segment", "--images", str(images), "--out", str(out), "--plugin", "my_segmenter",
                 "--backend", "plugin-squares", "--option", "side=8", "--workers", "2", "--quiet"]) == 0
    cache = MaskCache(out, "plugin-squares", {"side": 8})
    assert cache.ids() == ["p0", "p1", "p2"]
    nuclei, cells, table = cache.load("p1")
    assert table["area"].tolist() == [64, 64] and table["touches_border"].all()
    assert main(["segment", "--images", str(images), "--out", str(out), "--plugin", "no_such_module_x"]) == 2


def test_line_valleys_pick_a_long_seam_out_of_short_texture():
    """A straight, shallow dim line (a seam between touching cells) scores above dark texture gaps.

    The field is bright, with many short dark dashes twice as deep as the seam: a pixel-wise
    darkness map cannot tell them apart, the darkest long line through each pixel can.
    """
    from kit.segment.classical import _line_valleys

    rng = np.random.default_rng(0)
    img = np.full((200, 200), 0.6, np.float32)
    for _ in range(300):  # short, deep texture gaps
        y, x = rng.integers(5, 195, 2)
        a = rng.uniform(0, np.pi)
        dy, dx = 3 * np.sin(a), 3 * np.cos(a)
        cv2.line(img, (int(x - dx), int(y - dy)), (int(x + dx), int(y + dy)), 0.25, 1)
    img[:, 99:101] *= 0.7  # the seam: 30% dimmer, the whole height
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    v = _line_valleys(img, 21)
    seam = v[20:180, 99:101].mean()
    away = np.percentile(np.r_[v[20:180, 20:90].ravel(), v[20:180, 110:180].ravel()], 95)
    assert seam > 1.5 * away, (seam, away)
    # pixel-wise darkness alone would not rank the seam first: more texture pixels than seam
    # pixels are darker than the seam
    off_seam = np.r_[img[:, :95].ravel(), img[:, 105:].ravel()]
    assert (off_seam < img[20:180, 99:101].mean()).sum() > img[:, 99:101].size


def test_seam_term_places_boundaries_between_touching_textured_cells():
    """On a confluent field of the independent generator (tuning seed, not a held-out one), the seam
    term of the cell watershed finds clearly more cells at IoU 0.6 than the relief alone."""
    sys.path.insert(0, str(REPO))
    from benchmarks.foreign_fields import draw_field, score_field

    field = draw_field(1, "confluent", size=1728)  # 1728 px: the default 1/4 working scale
    _, cells = segment_image(field["image"], boundary=0.0)
    _, plain = segment_image(field["image"], seam_line=0.0, boundary=0.0)
    f1, f1_plain = score_field(cells, field)["f1"], score_field(plain, field)["f1"]
    assert f1 >= f1_plain + 0.05, (f1, f1_plain)


def test_fill_holes_matches_scipy_on_random_masks():
    """The cv2 flood-fill hole filling gives exactly scipy's binary_fill_holes (4-connected background)."""
    from scipy import ndimage as ndi

    from kit.segment.classical import _fill_holes

    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.random((int(rng.integers(3, 50)), int(rng.integers(3, 50)))) < rng.uniform(0.3, 0.8)
        assert np.array_equal(_fill_holes(m), ndi.binary_fill_holes(m))
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7] = True
    ring[3:6, 3:6] = False
    assert _fill_holes(ring)[4, 4] and not _fill_holes(ring)[0, 0]
