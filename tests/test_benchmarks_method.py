import shutil

import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.method import Validation, tuning_table
from cmce.config import load_config
from cmce.steps import RunLayout
from tests.conftest import SMOKE


def _ids(path, split):
    t = pq.read_table(path, columns=["id", "split"])
    return set(t.filter(pc.equal(t.column("split"), split)).column("id").to_pylist())


def _cells(row):
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _score(cell):  # R@1 + MAP@R, the selection criterion
    return sum(map(float, cell.split(" / ")[:2]))


def test_transformation_settings_are_tuned_on_a_validation_split_carved_from_train(smoke_run, tmp_path):
    lay, metrics = smoke_run
    root = tmp_path / "run"  # a copy: the tuning runs write next to the models
    for part in ("data", "models"):
        shutil.copytree(lay.root / part, root / part)
    own = RunLayout(root, lay.gallery_names)
    cfg = load_config(SMOKE, {"output_dir": str(root)})
    v = Validation(cfg, own, metrics, 0.25)
    grid = {"lam": (0.0, 0.3), "depth": (1, 2)}
    rows = tuning_table(v, grid)

    carved = root / "validation" / "run" / "data" / "dataset.parquet"
    assert _ids(carved, "train") | _ids(carved, "test") == _ids(own.dataset, "train")  # no test image seen

    search = [_cells(r) for r in rows if r.startswith("| λ |") or r.startswith("| depth |")]
    by_setting: dict[str, list] = {}
    for name, value, cell in search:
        by_setting.setdefault(name, []).append((float(value.split(" ")[0]), "chosen" in value, _score(cell)))
    # every grid value and the config's own value was tried
    assert {x for x, _, _ in by_setting["λ"]} == {0.0, 0.3, cfg.transform.lam}
    assert {x for x, _, _ in by_setting["depth"]} == {1, 2, cfg.transform.depth}
    chosen = {}
    for name, tried in by_setting.items():
        picks = [(x, score) for x, picked, score in tried if picked]
        assert len(picks) == 1 and picks[0][1] == max(score for _, _, score in tried)  # the validation argmax
        chosen[name] = picks[0][0]

    finals = {}  # label → (settings, validation, test); rows with equal settings share one row
    for r in rows:
        if r.startswith(("| config", "| tuned")):
            head, val, test = _cells(r)
            labels, settings = head.split(": ")
            finals.update({label: (settings, val, test) for label in labels.split(" and ")})
    assert sorted(finals) == ["config", "tuned", "tuned with λ = 0"]
    width = "" if chosen["depth"] == 1 else ", hidden width 64"  # a linear T has no hidden width
    assert finals["tuned"][0] == f"λ {chosen['λ']:g}, depth {chosen['depth']:g}{width}, epochs 10"
    assert finals["tuned with λ = 0"][0] == f"λ 0, depth {chosen['depth']:g}{width}, epochs 10"
    ens = metrics[f"asym_ensemble/{len(cfg.gallery_models)}"]
    assert finals["config"][2] == " / ".join(f"{100 * ens[x]:.2f}" for x in ("R@1", "MAP@R", "TAR@FAR=0.001"))
    assert _score(finals["tuned"][1]) >= _score(finals["config"][1])
    # test is touched only for the final settings: one refit per distinct one other than the config's
    refits = {p.name for p in (root / "tuned").iterdir()} if (root / "tuned").exists() else set()
    assert len(refits) == len({settings for settings, _, _ in finals.values()}) - 1


def test_compatibility_table_reports_cka_and_alignment_for_every_gallery_model(smoke_run):
    from benchmarks.method import compatibility_table, stored_embeddings

    lay, metrics = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = compatibility_table(cfg, lay, metrics, {n: stored_embeddings(lay, n) for n in lay.gallery_names})[2:]
    assert [r.split(" | ")[0].lstrip("| ").split(" ")[0] for r in rows] == lay.gallery_names
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        cka, cos = ([float(v) for v in c.split(" / ")] for c in cells[1:3])
        assert all(0.0 <= v <= 1.0 for v in cka) and all(-1.0 <= v <= 1.0 for v in cos)
        assert cos[0] > 0.5  # T was fitted on the train split: it aligns there
    # read back from the run's files, the values are those of embedding both splits again
    from cmce.checkpoint import load_embedding_model
    from cmce.embed import embed_split
    from cmce.metrics import linear_cka

    first = _cells(rows[0])
    q, g = (load_embedding_model(lay.model(n)) for n in (cfg.query_model.name, lay.gallery_names[0]))
    fresh = [linear_cka(embed_split(g, lay.dataset, s).embeddings, embed_split(q, lay.dataset, s).embeddings)
             for s in ("train", "test")]
    assert first[1] == " / ".join(f"{v:.2f}" for v in fresh)


def test_stored_embeddings_name_the_member_file_when_the_query_file_holds_other_ids(smoke_run, tmp_path):
    import pyarrow as pa
    import pytest

    from benchmarks.method import stored_embeddings
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
    from benchmarks.method import costs_table
    from cmce.checkpoint import load_embedding_model
    from cmce.models import count_parameters

    lay, _ = smoke_run
    cfg = load_config(SMOKE, {"output_dir": str(lay.root)})
    rows = {_cells(r)[0]: _cells(r) for r in costs_table(cfg, lay)[2:]}
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


def test_query_model_as_an_identity_member_reproduces_sym_query_alone(smoke_run, tmp_path):
    from benchmarks.method import _ensemble_of, query_member_ablation

    lay, metrics = smoke_run
    root = tmp_path / "run"
    for part in ("data", "models", "embeddings"):
        shutil.copytree(lay.root / part, root / part)
    own = RunLayout(root, lay.gallery_names)
    cfg = load_config(SMOKE, {"output_dir": str(root)})
    result = next(iter(query_member_ablation(cfg, own).values()))
    n = len(cfg.gallery_models)
    assert set(result) == {f"asym_ensemble/{n + 1}"}  # the config's members and the query model's
    member = root / "query_member" / "member_query.parquet"
    (tmp_path / "alone").mkdir()
    alone = _ensemble_of(cfg, own, own.model(cfg.query_model.name), [member], tmp_path / "alone")["asym_ensemble/1"]
    # with the identity transformation the query member alone is query→query retrieval
    for metric in ("R@1", "MAP@R", "TAR@FAR=0.001"):
        assert abs(alone[metric] - metrics["sym_query"][metric]) < 1e-6, metric


def test_main_assembles_every_requested_section(tmp_path, monkeypatch, capsys):
    import sys

    from benchmarks import method

    monkeypatch.setattr(sys, "argv", ["method", "--config", str(SMOKE), "--seeds", "0", "--ablations",
                                      "size,query_member", "--out", str(tmp_path), "--no-write"])
    method.main()
    out = capsys.readouterr().out
    for heading in ("### Every configuration", "### Rejection by uncertainty", "### Rejecting 10 % by uncertainty at "
                    "other operating points", "### Targets", "### Compatibility",
                    "### What averaging the members can remove", "### What the query model permits", "### Model costs",
                    "### Ablation: ensemble size N",
                    "### Ablation: the query model as one more gallery member"):
        assert heading in out, heading
    # one row per operating point, from the loosest FAR down
    points = out.split("other operating points")[1].split("### Targets")[0]
    assert [r.split(" | ")[0] for r in points.split("\n| ")[2:]] == ["0.1", "0.01", "0.001", "0.0001"]
    member_rows = out.split("### Ablation: the query model as one more gallery member")[1].split("\n| ")[2:]
    assert [r.split(" | ")[0] for r in member_rows][:3] == [
        "the query model alone (sym_query)", "the config's 2 (asym_ensemble/2)",
        "the query model + the config's 2 (identity T for the query model)"]


def test_levers_table_names_the_best_single_transformation_by_r1(smoke_run):
    from benchmarks.method import levers_table
    from benchmarks.report import shown

    _, metrics = smoke_run
    (row,) = levers_table({"(the config)": metrics}, 2)[2:]
    best = max((k for k in metrics if k.startswith("asym/")), key=lambda k: metrics[k]["R@1"])
    assert _cells(row) == ["(the config)", shown(metrics["asym_ensemble/2"]), shown(metrics[best]),
                           shown(metrics["sym_query"])]


def test_recorded_command_keeps_only_what_differs_from_the_defaults():
    from benchmarks.method import build_parser, recorded_command
    from benchmarks.report import ROOT

    p = build_parser()  # the benchmark's own parser and defaults
    args = p.parse_args(["--config", str(ROOT / "configs" / "emoji.yaml"), "--seeds", "0", "--ablations", "",
                         "--set", "train.epochs=18"])
    assert recorded_command(args, p) == ("python -m benchmarks.method --config configs/emoji.yaml --seeds 0 "
                                         "--ablations '' --set train.epochs=18")
    defaults = p.parse_args(["--val-fraction", "0.25", "--out", "elsewhere"])
    assert recorded_command(defaults, p) == "python -m benchmarks.method"


def test_targets_report_the_mean_difference_each_seeds_difference_and_the_unpaired_spread():
    from benchmarks.method import targets

    def run(level, gain):  # every configuration at `level`; the ensemble `gain` above; seeds differ in level
        base = {"R@1": level, "MAP@R": level, "TAR@FAR=0.001": level}
        out = {c: dict(base) for c in ("sym_query", "asym/a", "asym/b", "kd/a", "kd/b")}
        out["asym_ensemble/2"] = {k: v + gain for k, v in base.items()}
        out["rejection/uncertainty"] = {"verification_error@0": 0.8, "verification_error@0.1": 0.76}
        out["rejection/random"] = {"verification_error@0": 0.8, "verification_error@0.1": 0.8}
        return out

    rows = {_cells(r)[0]: _cells(r) for r in targets([run(0.2, 0.02), run(0.3, 0.02), run(0.4, 0.02)], 2)[2:]}
    r1 = rows["ensemble vs the query model alone (asym_ensemble/2 − sym_query, R@1)"]
    assert r1[1:] == ["+2.00", "+2.00, +2.00, +2.00", "≥ +0", "yes", "no"]  # every seed +2, within the spread
    tar = rows["ensemble vs the query model alone (asym_ensemble/2 − sym_query, TAR@FAR=0.001)"]
    assert tar[1:5] == ["+2.00", "+2.00, +2.00, +2.00", "≥ +5", "no"]
    rejection = rows["rejecting 10% most uncertain lowers verification error (relative)"]
    assert rejection[1:5] == ["5.00 ± 0.00 %", "5.00 %, 5.00 %, 5.00 %", "≥ 15 %", "no"]
    (one,) = [r for r in targets([run(0.2, 0.02)], 2) if "sym_query, R@1" in r]
    assert _cells(one)[-1] == "n/a (one seed)"


def _by_query_ids(lay: RunLayout, path, column: str):
    """`column` of a gallery-side file in the evaluation's query order, and the query embeddings, both unit."""
    import numpy as np

    from cmce.ensemble import normalize
    from cmce.tables import embedding_column, read_table, rows_of, string_column

    table, query = read_table(path), read_table(lay.eval_dir / "query.parquet")
    order = rows_of(string_column(table, "id", "g"), string_column(query, "id", "q"), "g")
    return (normalize(np.asarray(embedding_column(table, column, "g"))[order]),
            normalize(np.asarray(embedding_column(query, "embedding", "q"))))


def test_residual_table_measures_the_stored_members_and_the_served_gallery(smoke_run):
    import numpy as np

    from benchmarks.method import residual_table, stored_embeddings

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
