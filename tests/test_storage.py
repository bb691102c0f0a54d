import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from cmce.storage import (
    STALE_TEMP_AGE_S,
    ForeignOutputError,
    TooLarge,
    atomic_dir,
    atomic_path,
    check_replaceable,
    clean_stale_temps,
    named_on_failure,
    read_regular,
    restore_dir,
    write_text,
)

OWN = ("x", "y", "z")  # the names the folders in these tests are made of


def test_a_file_stating_more_than_the_limit_is_refused_unread(tmp_path, monkeypatch):
    """serve polls meta.json twice a second: a 2 GB file must be refused by its size, not by reading 64 MB of it
    each time; a file that states no size (/proc) is still refused after reading one byte past the limit."""
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def fileno(self):
            return self.f.fileno()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr("cmce.storage.open_regular", lambda path: Counting(real_open(path, "rb")))
    with pytest.raises(TooLarge, match="more than 1,000 bytes"):
        read_regular(big, 1000)
    assert reads == []
    with pytest.raises(TooLarge):
        read_regular("/proc/self/maps", 10)
    assert reads == [11]


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


def test_a_failed_write_takes_back_the_folders_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "busy").mkdir()
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "kept" / "new" / "deeper" / "a.txt"):
        raise RuntimeError("refused")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "made" / "idx", OWN):
        raise RuntimeError("refused")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "busy" / "sub" / "a.txt"):
        (tmp_path / "busy" / "sub" / "other-writer").write_text("")  # a folder someone else now uses stays
        raise RuntimeError("refused")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "busy", "busy/sub", "busy/sub/other-writer", "kept"]
    write_text(tmp_path / "made" / "a.txt", "x")  # and a successful write keeps what it made
    assert (tmp_path / "made" / "a.txt").read_text() == "x"


def test_a_full_disk_names_the_output_and_leaves_the_old_one(tmp_path, monkeypatch):
    """pyarrow's and onnx's messages for a full disk name no file; torch's ('unexpected pos') not even the cause."""
    import errno

    import torch

    from cmce.checkpoint import save_checkpoint

    target = tmp_path / "g.parquet"
    write_text(target, "old")
    with pytest.raises(OSError, match=rf"^{target}: not written: No space left on device$"), atomic_path(target):
        raise OSError(errno.ENOSPC, "Error writing bytes to file")
    with pytest.raises(OSError, match="unrelated"), atomic_path(target):  # other errors pass as they are
        raise OSError(errno.ENOENT, "unrelated")

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 52032 vs 51928")

    monkeypatch.setattr(torch, "save", short_write)
    model = tmp_path / "m.pt"
    write_text(model, "old")
    with pytest.raises(OSError, match=rf"^{model}: not written: .*unexpected pos.*is the disk full"):
        save_checkpoint({"format": "x", "state_dict": {}}, model)
    assert target.read_text() == model.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.parquet", "m.pt"]


def test_a_replaced_folder_that_cannot_be_removed_is_named(tmp_path, monkeypatch, caplog):
    """An index folder with an immutable meta.json (`chattr +i`) was replaced, and its old copy left beside the
    new one as `.index.XXXX.tmp/` without a word."""
    import cmce.storage as storage

    target = tmp_path / "out"
    for version in ("old", "new"):
        with atomic_dir(target, OWN) as tmp:
            (tmp / "x").write_text(version)
        if version == "old":  # deleting the old copy fails as it does for an immutable file: nothing is removed
            monkeypatch.setattr(storage.shutil, "rmtree", lambda path, ignore_errors=False: None)
    assert (target / "x").read_text() == "new"
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert left and f"{left[0]}: the replaced copy could not be removed whole" in caplog.text


def test_an_output_file_that_cannot_be_replaced_is_refused_before_any_work(tmp_path, monkeypatch):
    """`train --out q.pt` over an immutable q.pt (`chattr +i`) trained 17 s, then failed on the rename naming its
    scratch file. Opening it to write says EPERM at once (simulated here: chattr needs a capability); a file only
    not writable by this user (EACCES) is still replaced by the rename, so it is not refused."""
    import errno

    import cmce.output_checks as checks

    out = tmp_path / "q.pt"
    out.write_bytes(b"x")
    real_open = os.open

    def refusing(error: int):
        def fake(path, flags, *args):
            if str(path) == str(out) and flags & os.O_WRONLY:
                raise OSError(error, os.strerror(error), str(path))
            return real_open(path, flags, *args)
        return fake

    monkeypatch.setattr(checks.os, "open", refusing(errno.EPERM))
    with pytest.raises(ValueError, match=r"q.pt: cannot be replaced: Operation not permitted \(an immutable"):
        checks.check_output(out)
    monkeypatch.setattr(checks.os, "open", refusing(errno.EACCES))
    checks.check_output(out)
    assert out.read_bytes() == b"x"


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target, OWN) as tmp:
        (tmp / "y").write_text("2")
        raise RuntimeError("crash")
    assert sorted(p.name for p in target.iterdir()) == ["x"]
    with atomic_dir(target, OWN) as tmp:
        (tmp / "z").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_dir_refuses_a_folder_holding_files_it_does_not_write_and_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "x").write_text("old output")
    ran = False
    with pytest.raises(ForeignOutputError, match=r"d: holds notes\.txt"), atomic_dir(target, OWN) as tmp:
        ran = True
        (tmp / "x").write_text("new")
    assert not ran  # refused before the step's work, not when swapping in
    assert sorted((p.name, p.read_text()) for p in target.iterdir()) == [("notes.txt", "mine"), ("x", "old output")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_gitignore_in_an_output_folder_is_allowed_and_carried_into_the_new_one(tmp_path):
    """DVC writes a .gitignore naming a stage's outputs into their folder; the swap keeps it."""
    target = tmp_path / "eval"
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("old")
    (target / ".gitignore").write_text("/x\n")
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("new")
    assert sorted((p.name, p.read_text()) for p in target.iterdir()) == [(".gitignore", "/x\n"), ("x", "new")]


def test_check_replaceable_accepts_missing_empty_and_own_folders_by_glob(tmp_path):
    check_replaceable(tmp_path / "missing", ("*.pt",))
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", ("*.pt",))
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "resnet.pt").write_bytes(b"")
    check_replaceable(tmp_path / "own", ("*.pt",))
    (tmp_path / "own" / "resnet.ckpt").write_bytes(b"")
    with pytest.raises(ForeignOutputError, match=r"resnet\.ckpt"):
        check_replaceable(tmp_path / "own", ("*.pt",))
    (tmp_path / "file").write_text("")
    with pytest.raises(ForeignOutputError, match="is a file"):
        check_replaceable(tmp_path / "file", ("*.pt",))


def _age(path, seconds: float = 2 * STALE_TEMP_AGE_S) -> None:
    """Backdate a file or a folder and everything in it."""
    t = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (t, t))


def test_stale_temps_of_the_target_are_removed_young_and_foreign_ones_kept(tmp_path):
    """Only cmce's own temporaries: a user's `.a.parquet.backup_1.tmp` (eight characters between the dots, as a
    temporary's random part has) was deleted an hour after it was made, a folder of that name with all it held."""
    target = tmp_path / "a.parquet"
    stale_file = tmp_path / ".a.parquet.cmce-k3x9_q0z.tmp"
    stale_dir = tmp_path / ".a.parquet.cmce-abcdefgh.tmp"
    young = tmp_path / ".a.parquet.cmce-young123.tmp"  # a writer that may still be running
    other_target = tmp_path / ".b.parquet.cmce-abcdefgh.tmp"
    longer_name = tmp_path / ".a.parquet.resume.cmce-abcdefgh.tmp"  # the temp of target a.parquet.resume
    not_ours = tmp_path / ".a.parquet.backup.tmp"
    users_file, users_folder = tmp_path / ".a.parquet.backup_1.tmp", tmp_path / ".a.parquet.snapshot.tmp"
    for p in (stale_file, young, other_target, longer_name, not_ours, users_file):
        p.write_bytes(b"half")
    for folder in (stale_dir, users_folder):
        folder.mkdir()
        (folder / "index.faiss").write_bytes(b"half")
    for p in (stale_file, stale_dir, other_target, longer_name, not_ours, users_file, users_folder):
        _age(p)
    write_text(target, "new")
    assert target.read_text() == "new"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(p.name for p in (target, young, other_target, longer_name, not_ours, users_file,
                                           users_folder))
    assert (users_folder / "index.faiss").read_bytes() == b"half"


def test_a_stale_temp_folder_with_a_file_still_being_written_is_kept(tmp_path):
    tmp_dir = tmp_path / ".index.cmce-abcdefgh.tmp"
    tmp_dir.mkdir()
    (tmp_dir / "index.faiss").write_bytes(b"growing")
    _age(tmp_dir)
    os.utime(tmp_dir / "index.faiss")  # written to just now
    assert clean_stale_temps(tmp_path / "index") == []
    _age(tmp_dir)
    assert clean_stale_temps(tmp_path / "index") == [tmp_dir]
    assert not tmp_dir.exists()


def _kill_between_the_two_renames(target):
    """What a run killed inside atomic_dir's swap leaves: the old folder moved aside, the new one
    still under its temporary name, nothing at the target."""
    new = target.with_name(f".{target.name}.cmce-abcdefgh.tmp")
    new.mkdir()
    (new / "x").write_text("new, never swapped in")
    os.replace(target, target.with_name(f".{target.name}.old"))


def test_next_atomic_dir_restores_a_folder_left_mid_swap_and_keeps_it_if_the_write_fails(tmp_path):
    target = tmp_path / "d"
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("old")
    _kill_between_the_two_renames(target)
    assert not target.exists()
    with pytest.raises(RuntimeError), atomic_dir(target, OWN) as tmp:
        raise RuntimeError("this run fails too")
    assert (target / "x").read_text() == "old"  # the previous complete folder is back
    assert not (tmp_path / ".d.old").exists()
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("newer")
    assert (target / "x").read_text() == "newer"
    _age(tmp_path / ".d.cmce-abcdefgh.tmp")
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("newest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_restore_dir_only_acts_when_the_target_is_missing(tmp_path):
    target = tmp_path / "d"
    assert restore_dir(target, OWN) is False  # nothing at all
    target.mkdir()
    (tmp_path / ".d.old").mkdir()
    assert restore_dir(target, OWN) is False  # a complete target wins; the .old is a leftover for atomic_dir
    with atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # the leftover .old is gone


def test_a_kill_during_the_deletion_of_the_old_folder_never_leaves_a_partial_old(tmp_path, monkeypatch):
    """The old folder is renamed to a temporary name before it is deleted, so a half-deleted folder is
    never left as `.d.old` (which a later run would restore)."""
    target = tmp_path / "d"
    for content in ("1", "2"):
        with atomic_dir(target, OWN) as tmp:
            (tmp / "x").write_text(content)
            (tmp / "y").write_text(content)

    def killed_midway(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()  # deleted one file, then the process died
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt), atomic_dir(target, OWN) as tmp:
        (tmp / "x").write_text("3")
        (tmp / "y").write_text("3")
    monkeypatch.undo()
    assert sorted(p.read_text() for p in target.iterdir()) == ["3", "3"]
    assert not (tmp_path / ".d.old").exists()
    half = [p for p in tmp_path.iterdir() if p.name != "d"]
    assert len(half) == 1 and half[0].name.startswith(".d.") and half[0].name.endswith(".tmp")


def test_a_replaced_output_keeps_its_mode(tmp_path):
    """A gallery kept 640 (one group may read it), replaced in place by add-member, became 644: readable by all; an
    index folder kept 700 became 755, its files 644."""
    import stat

    from cmce.storage import atomic_dir, atomic_path

    target = tmp_path / "g.parquet"
    target.write_bytes(b"old")
    target.chmod(0o640)
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o640
    folder = tmp_path / "index"
    folder.mkdir()
    (folder / "meta.json").write_text("{}")
    (folder / "meta.json").chmod(0o600)
    folder.chmod(0o700)
    with atomic_dir(folder, ("meta.json", "ids.parquet")) as tmp:
        (tmp / "meta.json").write_text('{"new": 1}')
        (tmp / "ids.parquet").write_bytes(b"x")  # a file the old folder did not have: the usual mode
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE((folder / "meta.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "ids.parquet").stat().st_mode) == 0o666 & ~_umask_now()
    target.chmod(0o040)  # one its owner may not read or write: the new file would be unreadable to its own user
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"newer")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_an_output_that_cannot_be_read_is_not_replaced_unchecked(tmp_path, monkeypatch):
    """A mode-000 file at --out was replaced without its kind checked (it could not be read), and the step then
    failed reading its own output back: exit 2, the file replaced."""
    import os

    from cmce import output_checks
    from cmce.output_checks import check_output

    out = tmp_path / "g.parquet"
    out.write_bytes(b"someone's data")
    real = os.access
    monkeypatch.setattr(output_checks.os, "access",
                        lambda p, mode: False if (Path(p) == out and mode == os.R_OK) else real(p, mode))
    with pytest.raises(ValueError, match=r"g.parquet: cannot be read, so what it holds cannot be checked"):
        check_output(out, writes="parquet", kinds=("gallery",))
    assert out.read_bytes() == b"someone's data"


def _umask_now() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_download_leaves_nothing_in_scratch_and_a_trailing_slash_is_the_same_download(monkeypatch):
    """A download that failed half-way (a server gone, a prefix replaced meanwhile) stayed in scratch, unknown to
    forget_download: a server retrying an s3:// index for days filled its disk. `s3://b/idx/` and `s3://b/idx` were
    two downloads of one prefix."""
    from cmce import s3, storage

    storage.clear_scratch()
    fetched = []

    def download(uri, dest, marker=None):
        dest.mkdir(parents=True)
        (dest / "index.faiss").write_bytes(b"half")
        fetched.append(uri)
        if len(fetched) == 1:
            raise TimeoutError(f"{uri}: no whole answer within 5 s")
        return dest

    monkeypatch.setattr(s3, "download", download)
    try:
        with pytest.raises(TimeoutError):
            storage.local_input("s3://b/idx", marker="meta.json")
        assert [p for p in storage.scratch_dir().rglob("*") if p.is_file()] == []
        first = storage.local_input("s3://b/idx/", marker="meta.json")
        assert storage.local_input("s3://b/idx", marker="meta.json") == first and len(fetched) == 2
        storage.forget_download("s3://b/idx/")
        assert not first.exists()
    finally:
        storage.clear_scratch()


def test_a_full_disk_inside_a_folder_output_names_the_output_not_its_temporary(tmp_path):
    """`evaluate --out eval` on a full disk said `.eval.cmce-e_5px3vy.tmp/recall.png: not written`: a path that
    is gone once the step has failed."""
    import errno

    from cmce.storage import NotWritten

    target = tmp_path / "eval"
    with pytest.raises(NotWritten) as err, atomic_dir(target, ("*.json",)) as tmp:
        write_text(tmp / "a.json", "{}")
        with named_on_failure(tmp / "b.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(err.value) == f"{target / 'b.json'}: not written: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
