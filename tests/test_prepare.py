"""kit.prepare: one decode per image writes whatever is missing (masks + table, tiles, field)."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kit import images
from kit.cells import load_tiles, prepare_tile_dir
from kit.fields import field_cache_dir, field_path
from kit.prepare import Plan, prepare_folder
from kit.segment.cache import MaskCache
from test_segment import ellipse_field, write_sample


@pytest.fixture
def counted_reads(monkeypatch):
    """Every channel file decoded (kit.images.read_channel is the one function that opens them)."""
    reads: Counter = Counter()
    real = images.read_channel

    def counting(path):
        reads[Path(path).name] += 1
        return real(path)

    monkeypatch.setattr(images, "read_channel", counting)
    return reads


def _plan(tmp_path: Path, cache: MaskCache, images_dir: Path) -> Plan:
    tile_dir = prepare_tile_dir(tmp_path / "tiles", 32, cache)
    return Plan(masks=cache, tile_dir=tile_dir, tile_size=32, field_dir=field_cache_dir(tmp_path / "fields", 64, images_dir),
                field_size=64)


def test_one_decode_per_image_writes_masks_tiles_and_field(tmp_path, counted_reads):
    images_dir = tmp_path / "images"
    ids = ["a", "b", "c"]
    for i, image_id in enumerate(ids):
        write_sample(images_dir, image_id, ellipse_field(size=96, grid=2, seed=i)[0])
    cache = MaskCache(tmp_path / "masks")
    plan = _plan(tmp_path, cache, images_dir)
    report = prepare_folder(images_dir, ids, plan, progress=False)
    assert report.failures() == [] and report.prepared == 3
    assert set(counted_reads.values()) == {1} and len(counted_reads) == 12  # 3 images x 4 channels, once each
    for image_id in ids:
        tiles, table = load_tiles(plan.tile_dir, image_id)
        assert tiles.shape == (4, 4, 32, 32) and table["cell_id"].tolist() == [1, 2, 3, 4]
        assert np.load(field_path(plan.field_dir, image_id)).shape == (4, 64, 64)
        assert cache.has(image_id, images.sample_source(images_dir, image_id).signature)
    assert {"decode", "segment", "tiles", "fields", "wall"} <= set(report.seconds)
    counted_reads.clear()
    again = prepare_folder(images_dir, ids, plan, progress=False)  # everything current: nothing decoded
    assert again.prepared == 0 and not counted_reads


def test_a_missing_part_alone_is_filled_from_one_decode(tmp_path, counted_reads):
    images_dir = tmp_path / "images"
    write_sample(images_dir, "a", ellipse_field(size=96, grid=2)[0])
    cache = MaskCache(tmp_path / "masks")
    prepare_folder(images_dir, ["a"], Plan(masks=cache), progress=False)  # masks only (kit segment)
    stamp = cache.path("a").stat().st_mtime_ns
    counted_reads.clear()
    plan = _plan(tmp_path, cache, images_dir)
    prepare_folder(images_dir, ["a"], plan, progress=False)
    assert sum(counted_reads.values()) == 4  # one decode for tiles and field; the masks are reused
    assert cache.path("a").stat().st_mtime_ns == stamp


def test_a_changed_image_is_redone_everywhere(tmp_path):
    images_dir = tmp_path / "images"
    write_sample(images_dir, "a", ellipse_field(size=96, grid=2)[0])
    cache = MaskCache(tmp_path / "masks")
    plan = _plan(tmp_path, cache, images_dir)
    prepare_folder(images_dir, ["a"], plan, progress=False)
    old = {p: p.stat().st_mtime_ns for p in (cache.path("a"), plan.tile_dir / "a.csv", field_path(plan.field_dir, "a"))}
    # replaced by another image whose files get an older mtime (e.g. moved back from a backup)
    write_sample(images_dir, "a", ellipse_field(size=96, grid=3, seed=5)[0])
    for p in images_dir.glob("a_*.png"):
        os.utime(p, ns=(10**18, 10**18 - 1))
    prepare_folder(images_dir, ["a"], plan, progress=False)
    assert all(p.stat().st_mtime_ns != t for p, t in old.items())
    assert load_tiles(plan.tile_dir, "a")[0].shape[0] == 9


def test_stale_temp_files_of_killed_runs_are_removed(tmp_path):
    images_dir = tmp_path / "images"
    write_sample(images_dir, "a", ellipse_field(size=96, grid=2)[0])
    cache = MaskCache(tmp_path / "masks")
    plan = _plan(tmp_path, cache, images_dir)
    plan.field_dir.mkdir(parents=True)
    old, live = plan.tile_dir / ".a.x1y2.tmp.npy", plan.field_dir / ".a.z3.tmp.npy"
    old.write_bytes(b"half")
    live.write_bytes(b"being written")
    os.utime(old, (1, 1))
    prepare_folder(images_dir, ["a"], plan, progress=False)
    assert not old.exists() and live.exists()  # a concurrent run's fresh temp file is left alone


def test_field_cache_folder_is_keyed_by_its_version(tmp_path, monkeypatch):
    from kit import fields

    before = field_cache_dir(tmp_path, 64, tmp_path)
    monkeypatch.setattr(fields, "FIELD_CACHE_VERSION", fields.FIELD_CACHE_VERSION + 1)
    assert field_cache_dir(tmp_path, 64, tmp_path) != before
    assert field_cache_dir(tmp_path, 32, tmp_path).name.startswith("fields-32-")
