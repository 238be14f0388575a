"""kit.atomic: a file appears under its name only once complete, with the mode open() would give."""
import os
import stat

import numpy as np
import pytest

from kit.atomic import atomic_open, atomic_path


def test_complete_file_appears_with_umask_mode(tmp_path):
    target = tmp_path / "sub" / "out.csv"
    with atomic_open(target) as f:
        f.write("a,b\n")
        assert not target.exists()  # not visible while being written
    assert target.read_text() == "a,b\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in target.parent.iterdir()] == ["out.csv"]  # no temporary left behind


def test_error_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_temporary_keeps_the_suffix_for_format_sniffing_writers(tmp_path):
    target = tmp_path / "arr.npy"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npy" and tmp.parent == tmp_path
        np.save(tmp, np.arange(3))
    assert np.load(target).tolist() == [0, 1, 2]


def test_atomic_open_refuses_read_mode(tmp_path):
    with pytest.raises(ValueError):
        with atomic_open(tmp_path / "x", "r"):
            pass
