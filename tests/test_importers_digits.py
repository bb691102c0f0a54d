"""The digits importer reading a fetched digits.npz: a damaged or edited copy fails naming the file and what is
wrong, never as a traceback, a PIL error or an image silently left out of the dataset."""

import os
from pathlib import Path

import numpy as np
import pytest

from cmce.config import DataConfig
from cmce.data.prepare import prepare_dataset
from cmce.data.readers import open_dataset
from cmce.data.schema import DataError
from cmce.importers.digits import digits_arrays, fetch_digits, import_digits


def fetched(tmp_path: Path, **change) -> Path:
    x, y = digits_arrays()
    arrays = {"images": x, "labels": y.copy()}
    for name, edit in change.items():
        arrays[name] = edit(arrays[name])
    raw = tmp_path / "raw"
    raw.mkdir()
    np.savez(raw / "digits.npz", **arrays)
    return raw


def relabel(row: int, label: int):
    def edit(y: np.ndarray) -> np.ndarray:
        y[row] = label
        return y
    return edit


@pytest.mark.parametrize("change, message", [
    ({"labels": relabel(3, -7)}, "labels[3] is -7; digits labels are 0..9"),
    ({"labels": relabel(5, 10)}, "labels[5] is 10; digits labels are 0..9"),
    ({"labels": lambda y: y[:1792]}, "1797 images but 1792 labels"),
    ({"images": lambda x: x.astype(np.float64) * 1e6}, "'images' has dtype float64, values 0.0..255000000.0; "
                                                       "expected uint8 pixels 0..255"),
    ({"images": lambda x: x.astype(np.int16) - 1}, "'images' has dtype int16, values -1..254; expected uint8"),
    ({"labels": lambda y: y.astype(np.float32)}, "'labels' has dtype float32; expected integer class numbers"),
    ({"images": lambda x: x.reshape(len(x), -1)}, "'images' has shape (1797, 64) and 'labels' (1797,)"),
])
def test_an_edited_digits_npz_is_refused_naming_the_file(tmp_path, change, message):
    raw = fetched(tmp_path, **change)
    with pytest.raises(DataError) as err:
        import_digits(raw)
    assert str(err.value).startswith(f"{raw / 'digits.npz'}: {message}")


def test_a_label_outside_the_classes_is_not_dropped_by_prepare(tmp_path):
    raw = fetched(tmp_path, labels=relabel(5, 10))
    out = tmp_path / "d.parquet"
    with pytest.raises(DataError, match=r"digits\.npz: labels\[5\] is 10"):
        prepare_dataset(DataConfig(source="digits", image_size=8), out, raw_dir=raw)
    assert not out.exists()


def test_a_truncated_digits_npz_is_refused_naming_the_file(tmp_path):
    raw = fetch_digits(tmp_path / "raw")
    npz = raw / "digits.npz"
    npz.write_bytes(npz.read_bytes()[:50000])
    with pytest.raises(DataError, match=rf"^{npz}: cannot read the digits arrays: "):
        import_digits(raw)
    npz.write_bytes(b"")
    with pytest.raises(DataError, match=rf"^{npz}: cannot read the digits arrays: "):
        import_digits(raw)


def test_a_digits_npz_that_is_a_device_or_a_bare_array_is_refused(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    os.symlink("/dev/zero", raw / "digits.npz")  # np.load read it as pickled data: a misleading word
    with pytest.raises(DataError, match=r"digits\.npz: cannot read the digits arrays: not a regular file"):
        import_digits(raw)
    (raw / "digits.npz").unlink()
    with open(raw / "digits.npz", "wb") as f:
        np.save(f, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DataError, match=r"digits\.npz: not a \.npz archive of 'images' and 'labels' arrays"):
        import_digits(raw)


def test_a_fetched_copy_imports_as_sklearn_digits(tmp_path):
    raw = fetch_digits(tmp_path / "raw")
    fresh, copy = import_digits(None), import_digits(raw)
    assert copy.images == fresh.images and np.array_equal(copy.labels, fresh.labels)
    out = prepare_dataset(DataConfig(source="digits", image_size=8), tmp_path / "d.parquet", raw_dir=raw)
    assert open_dataset(out).metadata.num_rows == len(fresh.ids)


def test_an_npz_declaring_huge_images_is_refused_before_they_are_read(tmp_path):
    """A 389 kB digits.npz of 4 × 10,000 × 10,000 zeros was decompressed whole (1.2 GB) and imported past
    data.max_image_pixels, exit 0."""
    from cmce.data.codec import pixel_limit

    (tmp_path / "bomb").mkdir()
    np.savez_compressed(tmp_path / "bomb" / "digits.npz", images=np.zeros((4, 3000, 3000), np.uint8),
                        labels=np.ones(4, np.int64))
    with pixel_limit(1000), pytest.raises(DataError, match=r"bomb/digits.npz: refused, too many pixels: 3000 × 3000 "
                                                           r"= 9,000,000, over data.max_image_pixels \(1,000\)"):
        import_digits(tmp_path / "bomb")
    (tmp_path / "flat").mkdir()
    np.savez(tmp_path / "flat" / "digits.npz", images=np.zeros((4, 0, 8), np.uint8), labels=np.ones(4, np.int64))
    with pytest.raises(DataError, match="flat/digits.npz: 'images' of 0 × 8 pixels"):
        import_digits(tmp_path / "flat")
    # 200 million 1 × 1 images in 389 kB held prepare-data for an hour, encoding one PNG each at 10 GB and growing
    (tmp_path / "many").mkdir()
    np.savez_compressed(tmp_path / "many" / "digits.npz", images=np.zeros((2_000_001, 1, 1), np.uint8),
                        labels=np.ones(2_000_001, np.int64))
    with pytest.raises(DataError, match="many/digits.npz: states 2,000,001 images, over the 2,000,000"):
        import_digits(tmp_path / "many")


def test_fetch_refuses_a_folder_holding_other_files_or_another_digits_npz(tmp_path):
    """The other sources refuse a folder they did not fill; digits wrote into any, and replaced a digits.npz of the
    user's (exit 0)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match=r"mine: exists and holds other files \(notes.txt\)"):
        fetch_digits(mine)
    (mine / "notes.txt").unlink()
    (mine / "digits.npz").write_text("mine")
    with pytest.raises(DataError, match="it is not a digits.npz that fetch-data wrote"):
        fetch_digits(mine)
    assert (mine / "digits.npz").read_text() == "mine"
    (mine / "digits.npz").unlink()
    (mine / ".digits.npz.cmce-abcd1234.tmp").write_text("left by a killed fetch")  # not counted as foreign
    os.utime(mine / ".digits.npz.cmce-abcd1234.tmp", (1, 1))  # old: the next write clears it (a young one may run)
    fetch_digits(mine)
    fetch_digits(mine)  # its own file: fetched again
    assert sorted(p.name for p in mine.iterdir()) == ["digits.npz"]
    (mine / ".digits.npz.backup_1.tmp").write_text("the user's")  # named like a temporary, without cmce's mark
    with pytest.raises(DataError, match=r"holds other files \(.digits.npz.backup_1.tmp\)"):
        fetch_digits(mine)
