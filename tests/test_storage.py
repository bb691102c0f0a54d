import os
import stat

import pytest

from cmce.storage import atomic_dir, atomic_path, write_text


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    old_umask = os.umask(0o022)
    try:
        write_text(target, "new")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    with atomic_dir(target) as tmp:
        (tmp / "z").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
