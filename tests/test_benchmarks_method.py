from tests.conftest import SMOKE, table_cells


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


def test_recorded_command_keeps_only_what_differs_from_the_defaults():
    from benchmarks.method import build_parser, recorded_command
    from benchmarks.report import ROOT

    p = build_parser()  # the benchmark's own parser and defaults
    args = p.parse_args(["--config", str(ROOT / "configs" / "emoji.yaml"), "--seeds", "0", "--ablations", "",
                         "--set", "train.epochs=18", "--grow-from", "runs/em_n6x3"])
    assert recorded_command(args, p) == ("python -m benchmarks.method --config configs/emoji.yaml --seeds 0 "
                                         "--ablations '' --grow-from runs/em_n6x3 --set train.epochs=18")
    defaults = p.parse_args(["--val-fraction", "0.25", "--out", "elsewhere"])
    assert recorded_command(defaults, p) == "python -m benchmarks.method"


def test_targets_report_the_mean_difference_each_seeds_difference_and_both_spreads():
    from benchmarks.method import targets

    def run(level, gain):  # every configuration at `level`; the ensemble `gain` above; seeds differ in level
        base = {"R@1": level, "MAP@R": level, "TAR@FAR=0.001": level}
        out = {c: dict(base) for c in ("sym_query", "asym/a", "asym/b", "kd/a", "kd/b")}
        out["asym_ensemble/2"] = {k: v + gain for k, v in base.items()}
        out["rejection/uncertainty"] = {"verification_error@0": 0.8, "verification_error@0.1": 0.76}
        out["rejection/random"] = {"verification_error@0": 0.8, "verification_error@0.1": 0.8}
        return out

    rows = {table_cells(r)[0]: table_cells(r)
            for r in targets([run(0.2, 0.02), run(0.3, 0.02), run(0.4, 0.02)], 2)[2:]}
    r1 = rows["ensemble vs the query model alone (asym_ensemble/2 − sym_query, R@1)"]
    # every seed +2: within the unpaired spread (levels differ by seed), beyond the paired one (the differences agree)
    assert r1[1:] == ["+2.00", "+2.00, +2.00, +2.00", "≥ +0", "yes", "no / yes"]
    tar = rows["ensemble vs the query model alone (asym_ensemble/2 − sym_query, TAR@FAR=0.001)"]
    assert tar[1:5] == ["+2.00", "+2.00, +2.00, +2.00", "≥ +5", "no"]
    rejection = rows["rejecting 10% most uncertain lowers verification error (relative)"]
    assert rejection[1:5] == ["5.00 ± 0.00 %", "5.00 %, 5.00 %, 5.00 %", "≥ 15 %", "no"]
    # differences that disagree in sign are within the paired spread too
    (mixed,) = [r for r in targets([run(0.2, 0.04), run(0.3, -0.02), run(0.4, 0.01)], 2) if "sym_query, R@1" in r]
    assert table_cells(mixed)[1:3] == ["+1.00", "+4.00, -2.00, +1.00"] and table_cells(mixed)[-1] == "no / no"
    (one,) = [r for r in targets([run(0.2, 0.02)], 2) if "sym_query, R@1" in r]
    assert table_cells(one)[-1] == "n/a (one seed)"
