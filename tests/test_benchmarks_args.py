"""The benchmark command lines refuse values they cannot use when they are parsed: exit code 2 and one line naming
the flag, never a traceback from deep inside numpy, torch or faiss, a hang, or a silently empty table. Only the
parsers run here (the benchmarks themselves are slow)."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import (
    embedding,
    end_to_end,
    evaluation,
    export,
    index_types,
    levers,
    method,
    model_size,
    serving,
    serving_memory,
    training,
    upgrade,
)
from benchmarks.args import comma_list, float_in, int_in, one_of, positive_int, thread_counts
from tests.conftest import SMOKE

LEVERS_REQUIRED = ["--run", "runs/bench_method/seed0", "--try", "lam=0.1"]


def parse(module, argv: list[str]) -> argparse.Namespace:
    """The module's command line parsed as its main parses it (with its checks of flags that go together)."""
    p = module.build_parser()
    return module.parse_args(p, argv) if hasattr(module, "parse_args") else p.parse_args(argv)


BAD = [
    (index_types, ["--n", "0", "--no-write"], "--n"),
    (index_types, ["--n", "-5"], "--n"),
    (index_types, ["--n", "5"], "--n"),  # fewer than the 10 neighbours recall@10 looks for
    (index_types, ["--queries", "-1"], "--queries"),
    (index_types, ["--repeats", "0"], "--repeats"),
    (index_types, ["--dim", "0"], "--dim"),
    (index_types, ["--seed", "-1"], "--seed"),
    (index_types, ["--types", "flat,,bogus"], "--types"),
    (index_types, ["--types", "flat,bogus"], "--types"),
    (index_types, ["--types", "flat,hnsw,hnsw"], "--types"),
    (index_types, ["--types", "hnsw,flat"], "--types"),  # flat first: the baseline
    (index_types, ["--types", ""], "--types"),
    (index_types, ["--threads", "a,b"], "--threads"),
    (index_types, ["--threads", "0"], "--threads"),
    (index_types, ["--threads", "1,1"], "--threads"),
    (index_types, ["--nprobe", "0"], "--nprobe"),
    (index_types, ["--k-factor", "1001"], "--k-factor"),
    (index_types, ["--ef-search", "x"], "--ef-search"),
    (index_types, ["--m", "5"], "--m"),  # does not divide --dim 128
    (index_types, ["--queries", "10", "--batch1-queries", "11"], "--batch1-queries"),
    (embedding, ["--throughput-images", "0"], "--throughput-images"),
    (embedding, ["--repeats", "0"], "--repeats"),
    (embedding, ["--small", "-1"], "--small"),
    (embedding, ["--small", "100", "--large", "100"], "--small"),
    (embedding, ["--workers", "-1"], "--workers"),
    (embedding, ["--workers", "0,,1"], "--workers"),
    (embedding, ["--workers", "1,1"], "--workers"),
    (embedding, ["--threads", "0"], "--threads"),
    (embedding, ["--threads", "a,b"], "--threads"),
    (end_to_end, ["--images", "0"], "--images"),
    (end_to_end, ["--classes", "3"], "--classes"),
    (end_to_end, ["--images", "100", "--classes", "60"], "--images"),
    (end_to_end, ["--set", "train.epochs"], "--set"),
    (evaluation, ["--sizes", "0,100"], "--sizes"),
    (evaluation, ["--sizes", "100,,200"], "--sizes"),
    (evaluation, ["--sizes", "100,100"], "--sizes"),
    (evaluation, ["--sizes", "a"], "--sizes"),
    (evaluation, ["--dim", "0"], "--dim"),
    (evaluation, ["--per-class", "1"], "--per-class"),
    (evaluation, ["--repeats", "0"], "--repeats"),
    (evaluation, ["--dense-up-to", "-1"], "--dense-up-to"),
    (export, ["--repeats", "0"], "--repeats"),
    (export, ["--threads", "-1"], "--threads"),
    (export, ["--archs", "nosuch"], "--archs"),
    (export, ["--archs", "query_cnn", "query_cnn"], "--archs"),
    (levers, [*LEVERS_REQUIRED, "--seed", "-1"], "--seed"),
    (levers, [*LEVERS_REQUIRED, "--set", "novalue"], "--set"),
    (method, ["--seeds", "0,0"], "--seeds"),
    (method, ["--seeds", "0,,1"], "--seeds"),
    (method, ["--seeds", "-1"], "--seeds"),
    (method, ["--seeds", ""], "--seeds"),
    (method, ["--ablations", "size,bogus"], "--ablations"),
    (method, ["--ablations", "size,,lambda"], "--ablations"),
    (method, ["--val-fraction", "0"], "--val-fraction"),
    (method, ["--val-fraction", "1"], "--val-fraction"),
    (method, ["--val-fraction", "nan"], "--val-fraction"),
    (method, ["--set", "a=["], "--set"),  # not YAML: the parser's message spans lines, the error one
    (model_size, ["--sizes", "0"], "--sizes"),
    (model_size, ["--sizes", "28", "28"], "--sizes"),
    (model_size, ["--dim", "0"], "--dim"),
    (model_size, ["--width", "-3"], "--width"),
    (serving, ["--rows", "0"], "--rows"),
    (serving, ["--duration", "0"], "--duration"),
    (serving, ["--duration", "inf"], "--duration"),  # would never end
    (serving, ["--clients", "1,,8"], "--clients"),
    (serving, ["--clients", "0"], "--clients"),
    (serving_memory, ["--clients", "0"], "--clients"),
    (serving_memory, ["--repeats", "-2"], "--repeats"),
    (training, ["--images", "0"], "--images"),
    (training, ["--epochs", "0"], "--epochs"),
    (training, ["--repeats", "x"], "--repeats"),
]


@pytest.mark.parametrize(("module", "argv", "flag"), BAD,
                         ids=[f"{m.__name__.split('.')[-1]} {' '.join(a)}" for m, a, _ in BAD])
def test_a_bad_value_exits_2_with_one_line_naming_its_flag(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(module, argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").splitlines()[-1]
    assert "error: " in last and flag in last.split("error: ", 1)[1], err
    assert "Traceback" not in err and sum("error:" in line for line in err.splitlines()) == 1


VALID = [
    (index_types, ["--n", "3000", "--dim", "16", "--queries", "40", "--batch1-queries", "5", "--repeats", "1",
                   "--threads", "1,2", "--types", "flat,hnsw", "--seed", "0", "--nlist", "8", "--m", "4"]),
    (embedding, ["--throughput-images", "64", "--small", "10", "--large", "20", "--workers", "0", "--threads",
                 "ALL,1", "--repeats", "1"]),
    (end_to_end, ["--images", "400", "--classes", "40", "--set", "train.epochs=1"]),
    (evaluation, ["--sizes", "600,1200", "--repeats", "1", "--dense-up-to", "0"]),
    (export, ["--archs", "query_cnn", "--repeats", "1", "--threads", "0"]),
    (levers, [*LEVERS_REQUIRED, "--seed", "0", "--set", "train.epochs=1"]),
    (method, ["--seeds", "0", "--ablations", "", "--val-fraction", "0.5"]),
    (model_size, ["--sizes", "28", "96", "--dim", "64", "--width", "8"]),
    (serving, ["--rows", "2000", "--duration", "0.5", "--clients", "1,4"]),
    (serving_memory, ["--clients", "4", "--repeats", "1"]),
    (training, ["--images", "128", "--epochs", "1", "--repeats", "1"]),
    (upgrade, ["--out", "runs/elsewhere"]),
]


@pytest.mark.parametrize(("module", "argv"), VALID, ids=[m.__name__.split(".")[-1] for m, _ in VALID])
def test_valid_values_and_the_defaults_parse(module, argv):
    parse(module, argv)
    parse(module, LEVERS_REQUIRED if module is levers else [])  # every default passes its own type


def test_lists_are_read_into_values():
    args = parse(index_types, ["--types", "flat, hnsw", "--threads", "1,2"])
    assert args.types == ["flat", "hnsw"] and args.threads == [1, 2]
    assert parse(index_types, []).types == ["flat", "ivfpq", "hnsw"] and parse(index_types, []).threads is None
    assert parse(embedding, []).workers == [0, 1]
    assert parse(evaluation, []).sizes == [10_000, 30_000, 100_000]
    assert parse(serving, []).clients == [1, 8, 32]
    args = parse(method, ["--ablations", ""])
    assert args.ablations == [] and args.seeds == [0, 1, 2]


def test_type_helpers():
    assert int_in("[1, inf)")("3") == 3 and float_in("(0, 1)")("0.25") == 0.25
    for bad in ("0", "-1", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
            positive_int(bad)
    for bad in ("0", "1", "nan", "inf", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"in \(0, 1\)"):
            float_in("(0, 1)")(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"in \[8, 2048\], got '4096'"):
        int_in("[8, 2048]")("4096")
    names = comma_list(one_of(["a", "b"]), allow_empty=True)
    assert names("") == [] and names(" b , a ") == ["b", "a"]
    with pytest.raises(argparse.ArgumentTypeError, match="an empty item"):
        names("a,")
    with pytest.raises(argparse.ArgumentTypeError, match="'a' given twice"):
        names("a,b,a")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown name 'c'; valid: a, b"):
        names("a,c")
    with pytest.raises(argparse.ArgumentTypeError, match="empty one"):
        comma_list(positive_int)(" ")
    assert comma_list(positive_int, unique=False)("2,2") == [2, 2]
    assert embedding.thread_counts is thread_counts  # moved to benchmarks.args, still where its test imports it


def test_main_stops_at_the_command_line_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        index_types.main(["--n", "0", "--no-write"])  # printed an empty table before
    assert exit_.value.code == 2 and "argument --n:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        training.main(["--config", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2 and "config file not found" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(SystemExit) as exit_:
        training.main(["--set", "train.epochs=1", "--set", "train.epochs=2"])
    assert exit_.value.code == 2 and "--set train.epochs: given twice" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("module", [end_to_end, upgrade])
def test_a_bad_out_is_blamed_on_out_not_on_set(module, capsys):
    """The benchmark's own overrides went to the config as if from --set: `--out ' '` said
    `--set output_dir: must not be empty` to a user who gave no --set."""
    with pytest.raises(SystemExit) as exit_:
        module.main(["--out", " "])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.rstrip("\n").splitlines()[-1]
    assert "--out" in last and "--set" not in last, last


SMALL_END_TO_END = ["--images", "400", "--classes", "40", "--no-write", "--set", "train.epochs=1", "--set",
                    "kd.epochs=1", "--set", "transform.epochs=1", "--set", "train.batch_size=64"]


def test_a_set_of_what_the_benchmark_sets_itself_is_refused(tmp_path, capsys):
    """`method --set kd.enabled=false` ran with KD on, `end_to_end --set device=cpu` on `auto`, while the recorded
    command showed the --set: the benchmark's own setting won without a word."""
    small = [*SMALL_END_TO_END, "--out", str(tmp_path / "e2e")]  # what a regression would run: seconds
    for module, argv, said in ((method, ["--config", str(SMOKE), "--seeds", "0", "--ablations", "", "--out",
                                         str(tmp_path / "m"), "--no-write", "--set", "kd.enabled=false"],
                                "--set kd.enabled: this benchmark sets kd.enabled itself (kd.enabled=True)"),
                               (end_to_end, [*small, "--set", "device=cpu"],
                                "--set device: this benchmark sets device itself (its flag --device)")):
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        assert exit_.value.code == 2
        assert capsys.readouterr().err.rstrip("\n").splitlines()[-1].endswith(said)


def test_a_device_this_machine_lacks_is_one_line_not_a_traceback(monkeypatch, capsys):
    """`--device cuda` without CUDA: a DeviceError traceback (training, end_to_end), a CalledProcessError with the
    child's reason swallowed (evaluation)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for module, argv in ((training, ["--device", "cuda", "--no-write"]),
                         (evaluation, ["--device", "cuda", "--sizes", "10", "--repeats", "1", "--no-write"])):
        with pytest.raises(SystemExit) as exit_:
            module.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "Traceback" not in err
        assert "--device: cuda was asked for, but torch sees no CUDA device" in err.splitlines()[-1]


def test_end_to_end_refuses_an_out_an_interrupted_run_would_resume_from(tmp_path, capsys):
    """A rerun into the folder of an interrupted one resumed its training (`vgg epoch 2/4`): the epochs it kept were
    never timed, under a headline of every model's time."""
    (tmp_path / "run" / "models").mkdir(parents=True)
    (tmp_path / "run" / "models" / "vgg.pt.resume").write_bytes(b"state")
    with pytest.raises(SystemExit) as exit_:
        end_to_end.main([*SMALL_END_TO_END, "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "holds the resume state of an interrupted run (models/vgg.pt.resume)" in capsys.readouterr().err


def test_end_to_end_refuses_the_working_folder_as_out_before_writing_its_dataset(tmp_path, monkeypatch, capsys):
    """`--out .`: the synthetic dataset was written into the working folder, then the run refused it with a
    traceback (the check of the run folder came after the benchmark's own first write)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        end_to_end.main([*SMALL_END_TO_END, "--out", "."])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--out .: output_dir: . is the working folder" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_measuring_process_reports_its_own_peak_memory_not_its_parents(tmp_path):
    """getrusage's ru_maxrss is kept across exec: the embedding benchmark's step, started by a benchmark that had
    touched 1 GB, reported 1 GB for every gallery size. VmHWM is the process's own."""
    import subprocess
    import sys

    import numpy as np

    from benchmarks.report import ROOT

    ballast = np.ones(400 << 20 >> 3)  # 400 MiB touched here
    probe = ("import resource; from benchmarks.memory import peak_rss_mb; "
             "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                                               text=True, check=True).stdout.split())
    assert ballast.sum() > 0 and own < 200  # a bare interpreter
    assert inherited >= 400 or own < inherited  # what the benchmark printed before (where the kernel keeps it)


def test_model_size_and_upgrade_print_without_writing_when_asked(tmp_path, monkeypatch, capsys):
    """They always replaced their BENCHMARKS.md section: no --no-write (a smoke run replaced the committed table)."""
    import benchmarks.report as report

    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(report.write_section, "__defaults__", (bench, True))
    model_size.main(["--sizes", "28", "--dim", "16", "--width", "4", "--no-write"])
    assert "## Model size and FLOPs per architecture" in capsys.readouterr().out
    assert bench.read_text() == "# Benchmarks\n"
    assert parse(upgrade, ["--no-write"]).no_write
