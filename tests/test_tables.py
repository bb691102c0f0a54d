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
