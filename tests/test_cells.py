"""Cell table, cell policy, tiles and the tile cache; real HPA masks when ../shared has them."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import REAL_PORTABLE_DIR, require
from kit.cells import build_tile_cache, cell_table, extract_tiles, filter_cells, load_tiles, tile_cache_dir
from kit.errors import ConfigError, DataError
from kit.images import to_uint8


def disk(labels, cy, cx, r, value):
    m = np.zeros(labels.shape, np.uint8)
    cv2.circle(m, (cx, cy), r, 1, -1)
    labels[m > 0] = value


@pytest.fixture
def layout():
    """Five cells: 1 inside, 2 on the left edge (nucleus cut in half), 3 in the bottom-right
    corner, 4 on the top edge with its nucleus inside, 5 a small sliver on the right edge."""
    cells = np.zeros((200, 300), np.int32)
    nuclei = np.zeros_like(cells)
    cells[60:140, 100:200] = 1
    disk(nuclei, 100, 150, 20, 1)
    cells[40:160, 0:60] = 2
    disk(nuclei, 100, 0, 20, 2)         # centre on the border: half visible
    cells[150:200, 240:300] = 3
    disk(nuclei, 185, 285, 14, 3)       # centre 15 px from both edges, cut a little
    cells[0:40, 100:220] = 4
    disk(nuclei, 20, 160, 10, 4)        # off the border
    cells[170:190, 290:300] = 5
    nuclei[175:185, 295:300] = 5
    return nuclei, cells


def test_cell_table_boxes_areas_and_border_flags(layout):
    nuclei, cells = layout
    t = cell_table(nuclei, cells).set_index("cell_id")
    assert list(t.index) == [1, 2, 3, 4, 5]
    assert tuple(t.loc[1, ["x0", "y0", "x1", "y1"]]) == (100, 60, 200, 140)  # end exclusive
    assert tuple(t.loc[2, ["x0", "y0", "x1", "y1"]]) == (0, 40, 60, 160)
    assert t.loc[1, "area"] == 80 * 100 and t.loc[1, "area"] == (cells == 1).sum()
    assert (t["nucleus_area"] == [(nuclei == k).sum() for k in t.index]).all()
    assert t["touches_border"].tolist() == [False, True, True, True, True]
    vis = t["nucleus_visible_fraction"]
    assert vis[1] == 1.0 and vis[4] == 1.0  # nucleus 4 is inside although its cell touches the edge
    assert vis[2] == pytest.approx(0.5, abs=0.05)
    assert 0.6 < vis[3] < 1.0


def test_cell_table_intensities_and_empty():
    nuclei = np.zeros((20, 20), np.int32)
    cells = np.zeros_like(nuclei)
    cells[5:15, 5:15] = 1
    nuclei[8:12, 8:12] = 1
    image = np.zeros((20, 20, 4), np.uint16)
    image[..., 0] = 65535
    image[8:12, 8:12, 2] = 32768
    t = cell_table(nuclei, cells, image)
    assert t.loc[0, "mean_red"] == pytest.approx(1.0)
    assert t.loc[0, "mean_blue"] == pytest.approx(0.5 * 16 / 100, rel=1e-3)
    assert t.loc[0, "nucleus_blue"] == pytest.approx(0.5, rel=1e-3)
    empty = cell_table(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32), np.zeros((8, 8, 4), np.uint8))
    assert len(empty) == 0 and "nucleus_visible_fraction" in empty.columns and "mean_red" in empty.columns


def test_filter_cells_policy(layout):
    nuclei, cells = layout
    image = np.zeros(cells.shape + (4,), np.uint8)
    image[..., 2] = np.where(nuclei > 0, 200, 0)
    image[..., 2][nuclei == 4] = 20  # a faint nucleus
    t = cell_table(nuclei, cells, image)
    assert len(filter_cells(t)) == 5  # all rules off by default
    # Median area of cells off the border is cell 1's (8000): cell 5 (200 px) and 3 (3000 px)
    # are small border cells at 0.5; cell 2 (7200) is not.
    kept = filter_cells(t, min_border_area_fraction=0.5)["cell_id"].tolist()
    assert kept == [1, 2, 4]
    assert filter_cells(t, min_nucleus_intensity=0.5)["cell_id"].tolist() == [1, 2, 3, 5]
    # Nucleus 5 (10 px along the edge, 5 deep) reads as a half disk: 50 / (pi 5^2) = 0.64.
    assert filter_cells(t, min_nucleus_visible_fraction=0.75)["cell_id"].tolist() == [1, 3, 4]
    # Several images: each uses its own median.
    two = pd.concat([t.assign(ID="a"), t.assign(ID="b", area=t["area"] * 10)], ignore_index=True)
    assert len(filter_cells(two, min_border_area_fraction=0.5)) == 6
    with pytest.raises(ConfigError, match="nucleus_blue"):
        filter_cells(cell_table(nuclei, cells), min_nucleus_intensity=0.5)


def test_extract_tiles_square_masked_and_ordered(layout):
    nuclei, cells = layout
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, cells.shape + (4,)).astype(np.uint8)
    table = cell_table(nuclei, cells)
    tiles, used = extract_tiles(image, cells, 64, table=table)
    assert tiles.shape == (5, 4, 64, 64) and tiles.dtype == np.uint8
    assert used["cell_id"].tolist() == [1, 2, 3, 4, 5]
    # Cell 1 is 100 wide, 80 high: the 100 px square adds 10 rows of background above and below.
    big, _ = extract_tiles(image, cells, 100, table=table[table.cell_id == 1])
    assert (big[0] == image[50:150, 100:200].transpose(2, 0, 1)).all()
    # Cell 4 (x 100..220, y 0..40) -> square y -40..80: 40 rows above the image are zero, and
    # cell 1's pixels (y 60..80, x 100..200) are zeroed unless mask_others=False.
    t4 = table[table.cell_id == 4]
    masked, _ = extract_tiles(image, cells, 120, table=t4)
    unmasked, _ = extract_tiles(image, cells, 120, mask_others=False, table=t4)
    assert (masked[0, :, :40] == 0).all() and (unmasked[0, :, :40] == 0).all()
    assert (masked[0, :, 100:120, 0:100] == 0).all()
    assert (unmasked[0, :, 100:120, 0:100] == image[60:80, 100:200].transpose(2, 0, 1)).all()
    assert (masked[0, :, 40:100] == image[0:60, 100:220].transpose(2, 0, 1)).all()
    # A border cell: the part of the square outside the image is zero.
    t2, _ = extract_tiles(image, cells, 120, table=table[table.cell_id == 2])
    assert (t2[0, :, :, :30] == 0).all() and (t2[0, :, :, 30:] > 0).any()
    # Order follows the table; 16-bit input goes through to_uint8.
    rev, used = extract_tiles(image, cells, 64, table=table.iloc[::-1])
    assert used["cell_id"].tolist() == [5, 4, 3, 2, 1] and (rev[::-1] == tiles).all()
    image16 = (image.astype(np.uint16) * 257 + rng.integers(-128, 128, image.shape)).astype(np.uint16)
    tiles16, _ = extract_tiles(image16, cells, 64, table=table)
    tiles8, _ = extract_tiles(to_uint8(image16), cells, 64, table=table)
    assert (tiles16 == tiles8).all()
    # Without a table: every cell, in id order.
    auto, auto_table = extract_tiles(image, cells, 64)
    assert auto_table["cell_id"].tolist() == [1, 2, 3, 4, 5] and (auto == tiles).all()
    empty, empty_table = extract_tiles(image, np.zeros_like(cells), 32)
    assert empty.shape == (0, 4, 32, 32) and len(empty_table) == 0


def _write_sample(folder, image_id, image):
    folder.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(("red", "green", "blue", "yellow")):
        cv2.imwrite(str(folder / f"{image_id}_{name}.png"), image[..., c])


def test_tile_cache_build_resume_and_load(tmp_path):
    from kit.segment.cache import MaskCache, segment_folder
    from test_segment import ellipse_field

    images = tmp_path / "images"
    ids = ["t0", "t1", "t2"]
    for i, image_id in enumerate(ids):
        _write_sample(images, image_id, ellipse_field(size=128, grid=2, seed=i)[0])
    _write_sample(images, "blank", np.zeros((64, 64, 4), np.uint8))
    _write_sample(images, "broken", np.zeros((64, 64, 4), np.uint8))
    (images / "broken_red.png").write_bytes(b"not a png")
    cache = MaskCache(tmp_path / "masks")
    with pytest.warns(UserWarning, match="could not be read"):
        segment_folder(images, ids[:2] + ["broken"], cache, progress=False)  # t2, blank: on demand
    out = build_tile_cache(images, ids + ["blank", "broken"], cache, tmp_path / "tiles", 48, progress=False)
    assert out == tile_cache_dir(tmp_path / "tiles", 48, cache) and out.name.startswith("tiles-48-")
    assert cache.has("t2")
    for image_id in ids:
        tiles, table = load_tiles(out, image_id)
        assert isinstance(tiles, np.memmap) and tiles.shape == (4, 4, 48, 48) and tiles.dtype == np.uint8
        assert table["cell_id"].tolist() == [1, 2, 3, 4]
        assert {"x0", "y0", "x1", "y1", "area", "touches_border", "nucleus_blue"} <= set(table.columns)
        image = cv2.imread(str(images / f"{image_id}_red.png"), cv2.IMREAD_UNCHANGED)
        full = np.stack([cv2.imread(str(images / f"{image_id}_{c}.png"), cv2.IMREAD_UNCHANGED)
                         for c in ("red", "green", "blue", "yellow")], axis=-1)
        assert image is not None
        expected, _ = extract_tiles(full, cache.load(image_id)[1], 48, table=cache.load(image_id)[2])
        assert (np.asarray(tiles) == expected).all()
    for empty_id in ("blank", "broken"):
        empty_tiles, empty_table = load_tiles(out, empty_id)
        assert empty_tiles.shape == (0, 4, 48, 48) and len(empty_table) == 0
    with pytest.raises(DataError, match="missing channel file"):  # never segmented: a user error
        build_tile_cache(images, ["absent"], cache, tmp_path / "tiles", 48, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert build_tile_cache(images, ids, cache, tmp_path / "tiles", 48, progress=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing redone
    assert build_tile_cache(images, ids[:1], cache, tmp_path / "tiles", 48, mask_others=False,
                            progress=False) != out
    with pytest.raises(DataError, match="no tiles"):
        load_tiles(out, "nope")


def test_real_hpa_masks_tiles_and_rle_round_trip():
    """The real 2048 px HPA field: 21 regions tile, tabulate and survive the RLE round trip."""
    folder = require(REAL_PORTABLE_DIR)
    green = cv2.imread(str(folder / "1000_A12_2_green.png"), cv2.IMREAD_UNCHANGED)
    cells = cv2.imread(str(folder / "1000_A12_2_cellmask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    nuclei = cv2.imread(str(folder / "1000_A12_2_nucleimask.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
    assert green.dtype == np.uint16 and cells.shape == (2048, 2048)
    image = np.zeros((2048, 2048, 4), np.uint16)
    image[..., 1] = green  # only the green channel exists for this field
    table = cell_table(nuclei, cells, image)
    assert table["cell_id"].tolist() == list(range(1, 22))
    assert (table["area"] >= table["nucleus_area"]).all()
    edge = np.unique(np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]]))
    assert set(table.loc[table.touches_border, "cell_id"]) == set(edge) - {0}
    tiles, used = extract_tiles(image, cells, 128, table=table)
    assert tiles.shape == (21, 4, 128, 128)
    assert (tiles[:, 1].reshape(21, -1).max(axis=1) > 0).all()  # every tile shows green signal
    assert tiles[:, [0, 2, 3]].max() == 0
    rle = pytest.importorskip("kit.rle")
    for k in used["cell_id"]:
        mask = cells == k
        text = rle.encode_binary_mask(mask)
        assert (rle.decode_binary_mask(text, 2048, 2048) == mask).all()
