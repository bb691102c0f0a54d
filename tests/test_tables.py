import pytest

from cmce.tables import TableError, id_rows, rows_of


def test_id_rows_give_each_wanted_ids_row_or_minus_one():
    assert id_rows(["c", "a", "b"], ["a", "x", "c"]).tolist() == [1, -1, 0]
    assert id_rows([], []).tolist() == []


def test_rows_of_returns_rows_that_gather_the_wanted_order():
    ids = ["c", "a", "b"]
    rows = rows_of(ids, ["b", "c", "a"], "f.parquet")
    assert [ids[r] for r in rows] == ["b", "c", "a"]


def test_rows_of_names_the_file_the_count_and_the_first_missing_id():
    with pytest.raises(TableError, match=r"^f\.parquet: lacks 2 of the 3 ids asked for \(first 'x'\)$"):
        rows_of(["a", "b"], ["a", "x", "y"], "f.parquet")


def test_a_null_row_in_a_fixed_size_list_column_is_named(tmp_path):
    """Arrow writes a null into a fixed-size list column and cannot read it back: the file was called "not a
    readable Parquet file" with a row that was not the null one, and no column."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cmce.tables import read_table

    values = pa.array(np.ones(5 * 4, np.float32))
    nulled = pa.FixedSizeListArray.from_arrays(values, 4, mask=pa.array([False, False, False, True, False]))
    table = pa.table({"id": list("abcde"), "label": [0] * 5, "embedding": nulled, "uncertainty": [0.0] * 5})
    path = tmp_path / "gallery.parquet"
    pq.write_table(table, path)
    message = f"{path}: column 'embedding' has null rows, which a fixed-size list column cannot hold"
    with pytest.raises(TableError, match=f"^{message}"):
        read_table(path)
    assert read_table(path, ["id"]).num_rows == 5  # the other columns read as before


def test_a_symbolic_link_to_nothing_is_named_as_such(tmp_path):
    """A link loop (`ln -s zz.pt zz.pt`) or a dangling link was "file not found" beside a file the user can see."""
    from cmce.tables import read_metadata

    (tmp_path / "loop.parquet").symlink_to("loop.parquet")
    (tmp_path / "dangling.parquet").symlink_to("gone.parquet")
    for name in ("loop.parquet", "dangling.parquet"):
        with pytest.raises(TableError, match="a symbolic link to nothing .*; file not found"):
            read_metadata(tmp_path / name)
    with pytest.raises(TableError, match=r"absent.parquet: file not found$"):
        read_metadata(tmp_path / "absent.parquet")


def test_a_snapshot_is_read_through_arrow_s_own_file_of_the_open_handle(tmp_path, monkeypatch):
    """Given the Python file object, arrow's I/O workers read it into buffers holding Python objects; one released
    after the interpreter had begun its exit aborted the process (`terminate called without an active exception`,
    exit 134 after a refusal, 7 times in 8 on a busy machine). The same open file, through arrow's own reader."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from cmce import tables

    member = {"arch": "resnet", "name": "r", "sha256": "1" * 64, "transformation_sha256": "2" * 64}
    meta = {"kind": "gallery", "members": [member], "query_model_sha256": "0" * 64, "split": "test"}
    path = tmp_path / "gallery.parquet"
    pq.write_table(tables.with_metadata(pa.table({"id": ["a", "b"]}), meta), path)
    given = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda source, **kw: given.append(source) or real(source, **kw))
    replaced = tmp_path / "other.parquet"
    pq.write_table(tables.with_metadata(pa.table({"id": ["x"]}), meta), replaced)
    real_open = tables.open_regular

    def open_then_replace(p):  # another version renamed over the name once it is open: the snapshot is the first
        handle = real_open(p)
        os.replace(replaced, p)
        return handle

    monkeypatch.setattr(tables, "open_regular", open_then_replace)
    meta, table, _ = tables.read_snapshot(path, ["id"], "gallery")
    assert isinstance(given[0], pa.NativeFile) and table.column("id").to_pylist() == ["a", "b"]
