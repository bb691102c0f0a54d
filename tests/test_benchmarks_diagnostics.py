import shutil

import pyarrow.parquet as pq

from cmce.config import load_config
from cmce.layout import RunLayout
from tests.conftest import SMOKE, table_cells


def test_compatibility_table_reports_cka_and_alignment_for_every_gallery_model(smoke_run):
    from benchmarks.diagnostics import compatibility_table, stored_embeddings

    lay, metrics = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = compatibility_table(cfg, lay, metrics, {n: stored_embeddings(lay, n) for n in lay.gallery_names})[2:]
    assert [r.split(" | ")[0].lstrip("| ").split(" ")[0] for r in rows] == lay.gallery_names
    for row in rows:
        cells = table_cells(row)
        cka, cos = ([float(v) for v in c.split(" / ")] for c in cells[1:3])
        assert all(0.0 <= v <= 1.0 for v in cka) and all(-1.0 <= v <= 1.0 for v in cos)
        assert cos[0] > 0.5  # T was fitted on the train split: it aligns there
    # read back from the run's files, the values are those of embedding both splits again
    from cmce.checkpoint import load_embedding_model
    from cmce.embed import embed_split
    from cmce.metrics import linear_cka

    first = table_cells(rows[0])
    q, g = (load_embedding_model(lay.model(n)) for n in (cfg.query_model.name, lay.gallery_names[0]))
    fresh = [linear_cka(embed_split(g, lay.dataset, s).embeddings, embed_split(q, lay.dataset, s).embeddings)
             for s in ("train", "test")]
    assert first[1] == " / ".join(f"{v:.2f}" for v in fresh)


def test_stored_embeddings_name_the_member_file_when_the_query_file_holds_other_ids(smoke_run, tmp_path):
    import pyarrow as pa
    import pytest

    from benchmarks.diagnostics import stored_embeddings
    from cmce.tables import TableError

    lay, _ = smoke_run
    root = tmp_path / "run"
    shutil.copytree(lay.root, root)
    own = RunLayout(root, lay.gallery_names)
    name = lay.gallery_names[0]
    test = stored_embeddings(own, name)["test"]
    assert test[0].shape[0] == test[1].shape[0]  # rows paired as read back
    query = own.eval_dir / "query.parquet"
    table = pq.read_table(query)
    ids = table.column("id").to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index("id"), "id", pa.array(["stray", *ids[1:]])), query)
    lacks = rf"{own.member(name)}: lacks 1 of the {len(ids)} ids asked for \(first 'stray'\)"
    with pytest.raises(TableError, match=lacks):
        stored_embeddings(own, name)


def test_costs_table_sums_the_gallery_side_and_compares_the_query_model(smoke_run):
    from benchmarks.diagnostics import costs_table
    from cmce.checkpoint import load_embedding_model
    from cmce.models import count_parameters

    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = {table_cells(r)[0]: table_cells(r) for r in costs_table(cfg, lay)[2:]}
    number = lambda text: int(text.replace(",", ""))  # noqa: E731
    members = [rows[f"{g.name} ({g.arch}) + its T"] for g in cfg.gallery_models]
    ensemble = rows[f"the ensemble of {len(cfg.gallery_models)}"]
    assert number(ensemble[2]) == sum(number(m[2]) for m in members)
    assert number(ensemble[3]) == sum(number(m[3]) for m in members)
    query = rows[f"{cfg.query_model.name} ({cfg.query_model.arch})"]
    assert number(query[2]) == count_parameters(load_embedding_model(lay.model(cfg.query_model.name)).net)
    # each member row is the backbone plus its transformation, so more than the backbone alone
    first = cfg.gallery_models[0]
    assert number(members[0][2]) > count_parameters(load_embedding_model(lay.model(first.name)).net)
    assert float(rows["**query model / ensemble**"][2]) == round(number(query[2]) / number(ensemble[2]), 3)
    assert all(f"KD student of {g.name}" in rows for g in cfg.gallery_models)


def _by_query_ids(lay: RunLayout, path, column: str):
    """`column` of a gallery-side file in the evaluation's query order, and the query embeddings, both unit."""
    import numpy as np

    from cmce.method import normalize
    from cmce.tables import embedding_column, read_table, rows_of, string_column

    table, query = read_table(path), read_table(lay.eval_dir / "query.parquet")
    order = rows_of(string_column(table, "id", "g"), string_column(query, "id", "q"), "g")
    return (normalize(np.asarray(embedding_column(table, column, "g"))[order]),
            normalize(np.asarray(embedding_column(query, "embedding", "q"))))


def test_residual_table_measures_the_stored_members_and_the_served_gallery(smoke_run):
    import numpy as np

    from benchmarks.diagnostics import residual_table, stored_embeddings

    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = residual_table(cfg, lay, {n: stored_embeddings(lay, n) for n in lay.gallery_names})
    value = {r.split(" | ")[0].lstrip("| "): float(r.split(" | ")[1].rstrip(" |")) for r in rows if r.startswith("| ")
             and not r.startswith(("| gallery side", "|---"))}
    residuals = {}
    for spec in cfg.gallery_models:
        member, query = _by_query_ids(lay, lay.member(spec.name), "transformed")
        residuals[spec.name] = member - query
        assert abs(value[f"{spec.name}'s T"] - (residuals[spec.name] ** 2).sum(axis=1).mean()) < 1e-4
    served, query = _by_query_ids(lay, lay.gallery, "embedding")
    n = len(cfg.gallery_models)
    assert abs(value[f"the ensemble of {n}, as served"] - ((served - query) ** 2).sum(axis=1).mean()) < 1e-4
    independent = value[f"the ensemble, were the members' residuals independent (their mean / {n})"]
    assert abs(independent - np.mean([value[f"{s.name}'s T"] for s in cfg.gallery_models]) / n) < 2e-4
    a, b = (r / np.linalg.norm(r, axis=1, keepdims=True) for r in residuals.values())
    assert f"residuals: {(a * b).sum(axis=1).mean():.2f} " in rows[-1]
