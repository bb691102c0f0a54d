"""End-to-end: `cmce run` on the smoke config, then the CLI steps and their error handling."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cmce.cli import build_parser, main
from cmce.metrics import retrieval_metrics
from cmce.tables import embedding_column
from tests.conftest import ROOT, SMOKE

GALLERY = ["resnet_a", "vgg_b"]


def test_metrics_json_has_every_configuration(smoke_run):
    lay, metrics = smoke_run
    on_disk = json.loads((lay.eval_dir / "metrics.json").read_text())
    assert on_disk.keys() == metrics.keys()
    for name, values in metrics.items():
        assert on_disk[name] == pytest.approx(values, nan_ok=True)
    expected = {"sym_query", "asym_ensemble/1", "asym_ensemble/2", "rejection/uncertainty", "rejection/random", "index"}
    for g in GALLERY:
        expected |= {f"sym_gallery/{g}", f"asym/{g}", f"kd/{g}"}
    assert set(on_disk) == expected
    assert set(on_disk["index"]) == {"indexed", "neighbour_recall@10", "R@1"}
    for name in expected - {"rejection/uncertainty", "rejection/random", "index"}:
        assert {"R@1", "R@2", "R@4", "R@8", "MAP@R", "TAR@FAR=0.01", "TAR@FAR=0.001", "TAR@FAR=0.0001"} <= set(
            on_disk[name]
        )
    assert set(on_disk["rejection/uncertainty"]) == {
        f"{p}@{r}" for p in ("retrieval_error", "verification_error", "unanswerable") for r in ("0", "0.1", "0.3")
    }
    assert on_disk["rejection/random"]["unanswerable@0"] == 0.0  # nothing rejected: every answered query stays
    # the models learned something: far above the 10% chance level of digits
    assert on_disk["sym_query"]["R@1"] > 0.6
    assert on_disk["sym_gallery/resnet_a"]["R@1"] > 0.5
    for f in ("results.md", "versions.json", "query.parquet", "summary.json", "recall.csv", "rejection.csv"):
        assert (lay.eval_dir / f).stat().st_size > 0
    for f in ("recall.png", "rejection.png"):
        assert (lay.eval_dir / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| asym_ensemble/2 |" in (lay.eval_dir / "results.md").read_text()


def test_metrics_recompute_from_the_two_parquet_files(smoke_run):
    lay, metrics = smoke_run
    q = pq.read_table(lay.eval_dir / "query.parquet")
    g = pq.read_table(lay.gallery)
    assert q.column("id").to_pylist() == g.column("id").to_pylist()
    scores = embedding_column(q, "embedding", "q")
    scores = scores / np.linalg.norm(scores, axis=1, keepdims=True) @ embedding_column(g, "embedding", "g").T
    np.fill_diagonal(scores, -np.inf)
    labels = g.column("label").to_numpy()
    m = retrieval_metrics(scores, labels, labels)
    for key in ("R@1", "MAP@R", "TAR@FAR=0.001"):
        assert m[key] == pytest.approx(metrics["asym_ensemble/2"][key], abs=1e-6)


def test_gallery_file_schema_and_versions(smoke_run):
    lay, _ = smoke_run
    table = pq.read_table(lay.gallery)
    assert {"id", "label", "embedding", "uncertainty", "ensemble_sum", "n_models", "raw_resnet_a", "raw_vgg_b"} <= set(
        table.column_names
    )
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    meta = json.loads(table.schema.metadata[b"cmce"])
    from cmce.checkpoint import load_embedding_model

    assert meta["query_model_sha256"] == load_embedding_model(lay.model("query")).sha256
    assert [m["name"] for m in meta["members"]] == GALLERY
    assert all(len(m["transformation_sha256"]) == 64 for m in meta["members"])
    assert (table.column("uncertainty").to_numpy() > 0).all()


def test_search_returns_hits_with_uncertainty(smoke_run, capsys):
    lay, _ = smoke_run
    rc = main(["search", "--index", str(lay.index), "--query-model", str(lay.model("query")),
               "--dataset", str(lay.dataset), "--limit", "3", "--k", "4"])
    assert rc == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(len(x["hits"]) == 4 for x in lines)
    scores = [h["score"] for h in lines[0]["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert all(h["uncertainty"] >= 0 for h in lines[0]["hits"])


def test_search_refuses_another_query_model(smoke_run, caplog):
    lay, _ = smoke_run
    rc = main(["search", "--index", str(lay.index), "--query-model", str(lay.kd_student("resnet_a")),
               "--dataset", str(lay.dataset), "--limit", "1"])
    assert rc == 2
    assert "index was built for query model" in caplog.text


def _search(capsys, lay, *argv: str) -> list[dict]:
    """`cmce search` on the smoke run's index and query model: its JSON lines."""
    capsys.readouterr()
    assert main(["search", "--index", str(lay.index), "--query-model", str(lay.model("query")), *argv]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_search_hits_carry_the_servers_label_and_class_name(smoke_run, tmp_path, capsys):
    """`cmce search` hits were {id, score, uncertainty}; the server's also name the item's label and class."""
    from cmce.data.readers import class_names

    lay, _ = smoke_run
    gallery = pq.read_table(lay.gallery, columns=["id", "label"])
    label_of = dict(zip(gallery.column("id").to_pylist(), gallery.column("label").to_pylist(), strict=True))
    classes = class_names(lay.dataset)
    hits = [h for line in _search(capsys, lay, "--dataset", str(lay.dataset), "--limit", "3") for h in line["hits"]]
    assert hits and all(h.keys() == {"id", "score", "uncertainty", "label", "class_name"} for h in hits)
    assert [(h["label"], h["class_name"]) for h in hits] == [(label_of[h["id"]], classes[label_of[h["id"]]])
                                                             for h in hits]
    image = tmp_path / "q.png"
    image.write_bytes(pq.read_table(lay.dataset, columns=["image"]).column("image")[0].as_py())
    (line,) = _search(capsys, lay, "--images", str(image), "--k", "2")
    assert [h["class_name"] for h in line["hits"]] == [None, None]  # no --dataset: no class names
    assert [h["label"] for h in line["hits"]] == [label_of[h["id"]] for h in line["hits"]]


def test_search_exclude_self_drops_the_query_from_its_own_hits(smoke_run, capsys):
    """The evaluation is leave-one-out; `search --dataset D` answered test queries with their own gallery item."""
    lay, _ = smoke_run
    given = ["--dataset", str(lay.dataset), "--limit", "20"]
    wider = _search(capsys, lay, *given, "--k", "4")
    excluded = _search(capsys, lay, *given, "--k", "3", "--exclude-self")
    assert any(h["id"] == line["query"] for line in wider for h in line["hits"])  # the case the flag is for
    for w, e in zip(wider, excluded, strict=True):
        assert e["query"] == w["query"] and len(e["hits"]) == 3
        assert e["hits"] == [h for h in w["hits"] if h["id"] != w["query"]][:3]


def test_search_refuses_a_missing_image_in_one_line_before_loading_anything(tmp_path, caplog):
    """`--images ../nope.png` failed with `[Errno 2] No such file or directory` once the model had loaded."""
    from tests.serve_world import cmce_env

    res = subprocess.run([sys.executable, "-m", "cmce", "search", "--index", str(tmp_path / "no-index"),
                          "--query-model", str(tmp_path / "no-model.pt"), "--images", "../nope.png"],
                         cwd=tmp_path, env=cmce_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert [line.split(" ", 2)[2] for line in res.stderr.splitlines() if " ERROR " in line] == [
        "ERROR cmce: cmce search: --images ../nope.png: no such file"]
    caplog.clear()
    assert main(["search", "--index", "I", "--query-model", "Q", "--images", "a.png", "--exclude-self"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "cmce search: --exclude-self applies to --dataset, not --images"]


def test_search_says_which_images_it_converted(smoke_run, tmp_path, caplog, capsys):
    """A 64×48 RGB JPEG was read as the 8×8 grey the query model takes without a word; one already so is silent."""
    from PIL import Image

    lay, _ = smoke_run
    rgb, grey, gif = tmp_path / "rgb.jpg", tmp_path / "grey.png", tmp_path / "moving.gif"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(rgb)
    Image.new("L", (8, 8), 128).save(grey)
    frames = [Image.new("L", (8, 8), v) for v in (0, 255, 128)]  # only the first was searched, unsaid
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    caplog.clear()
    assert len(_search(capsys, lay, "--images", str(rgb), str(grey), str(gif), "--k", "1")) == 3
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{rgb}: 64×48 RGB, read as the query model's 8×8 grey", f"{gif}: an animation or a multi-page image; its "
        "first frame is searched", f"{gif}: 8×8 palette, read as the query model's 8×8 grey"]


def test_every_flag_of_every_command_has_help_and_search_and_serve_say_their_defaults():
    """`search --help` showed `--index INDEX` and `--query-model QUERY_MODEL` bare, as were 35 flags of 15 other
    commands (`train --dataset DATASET --out OUT`), and neither --k's default nor serve's --host's."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    bare = {name: [a.option_strings[-1] for a in sp._actions if not a.help] for name, sp in sub.items()}
    assert {name: flags for name, flags in bare.items() if flags} == {}
    assert [a.option_strings for a in parser._actions if a.option_strings and not a.help] == []
    assert "(default 5)" in sub["search"].format_help() and "(default 127.0.0.1)" in sub["serve"].format_help()


def test_embed_member_with_corrupt_png_names_it_and_writes_nothing(smoke_run, tmp_path, caplog):
    lay, _ = smoke_run
    table = pq.read_table(lay.dataset)
    images = table.column("image").to_pylist()
    split = table.column("split").to_pylist()
    victim = [i for i, s in enumerate(split) if s == "test"][3]
    images[victim] = images[victim][:30]
    bad = tmp_path / "bad.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), bad)
    out = tmp_path / "member.parquet"
    rc = main(["embed-member", "--dataset", str(bad), "--query-model", str(lay.model("query")),
               "--gallery-model", str(lay.model("resnet_a")), "--transform", str(lay.transformation("resnet_a")),
               "--out", str(out)])
    assert rc == 2
    assert f"(id {table.column('id')[victim]}): corrupt or unreadable image" in caplog.text
    assert list(tmp_path.iterdir()) == [bad]


def test_transformation_for_another_model_is_refused(smoke_run, tmp_path, caplog):
    lay, _ = smoke_run
    rc = main(["embed-member", "--dataset", str(lay.dataset), "--query-model", str(lay.model("query")),
               "--gallery-model", str(lay.model("vgg_b")), "--transform", str(lay.transformation("resnet_a")),
               "--out", str(tmp_path / "m.parquet")])
    assert rc == 2 and "fitted for gallery model" in caplog.text
    assert not (tmp_path / "m.parquet").exists()


def test_bad_config_is_a_clear_error(tmp_path, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMOKE.read_text().replace("arch: vgg", "arch: vggg"))
    assert main(["prepare-data", "--config", str(cfg), "--out", str(tmp_path / "d.parquet")]) == 2
    assert "unknown architecture 'vggg'" in caplog.text
    assert not (tmp_path / "d.parquet").exists()


def test_a_vacuous_recall_k_is_refused_by_prepare_data_where_an_evaluation_follows(tmp_path, caplog):
    """The KFP and DVC pipelines refused `evaluate.recall_k: [..., 1000]` on a 539-image test split only at their
    evaluate step, after all the training: their prepare-data (`--will-evaluate`) refuses it before the dataset is
    written. Alone, prepare-data makes the dataset and warns (it may be made for other uses)."""
    vacuous = ["--config", str(SMOKE), "--set", "evaluate.recall_k=[1,1000]"]
    out = tmp_path / "d.parquet"
    assert main(["prepare-data", *vacuous, "--out", str(out), "--will-evaluate"]) == 2
    assert "evaluate.recall_k: R@1000 is 1 for every query with a match" in caplog.text and not out.exists()
    caplog.clear()
    assert main(["prepare-data", *vacuous, "--out", str(out)]) == 0
    assert "evaluate will refuse it" in caplog.text and out.exists()
    caplog.clear()  # `cmce run` wrote its dataset, then refused it
    assert main(["run", *vacuous, "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "R@1000 is 1 for every query" in caplog.text and not (tmp_path / "run" / "data" / "dataset.parquet").exists()


def test_index_settings_that_cannot_index_the_query_space_are_refused_by_prepare_data_where_an_evaluation_follows(
        tmp_path, caplog):
    """`index.ivfpq.m=7` for a 32-d query space: `cmce run` refused it before training, the KFP and DVC pipelines
    only at build-index, once every model had trained (and KFP retried it twice)."""
    bad = ["--config", str(SMOKE), "--set", "index.type=ivfpq", "--set", "index.ivfpq.m=7"]
    out = tmp_path / "d.parquet"
    assert main(["prepare-data", *bad, "--out", str(out), "--will-evaluate"]) == 2
    assert "index.ivfpq.m=7 must divide the embedding dimension 32" in caplog.text and not out.exists()


def test_the_pipelines_prepare_data_refuses_what_their_evaluate_would():
    """Both pipelines' prepare-data step is told that an evaluation follows."""
    import yaml

    from components import steps

    assert "PrepareInputs(will_evaluate=True)" in steps.prepare_data.component_spec.implementation.container.command[-1]
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["prepare_data"]
    assert "--will-evaluate" in stage["cmd"]


def test_every_subcommand_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"prepare-data", "train", "fit-transform", "embed-gallery", "build-index", "evaluate", "search",
            "run"} <= set(sub.choices)
    for name in sub.choices:
        res = subprocess.run([sys.executable, "-m", "cmce.cli", name, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "usage: cmce" in res.stdout, name


def test_step_by_step_cli_chain(smoke_run, tmp_path):
    """The per-step subcommands, wired as an orchestrator would call them, give a full evaluation."""
    lay, _ = smoke_run
    quick = ["--config", str(SMOKE), "--set", "train.epochs=1", "--set", "transform.epochs=2"]
    ds = tmp_path / "d.parquet"
    assert main(["prepare-data", *quick, "--out", str(ds)]) == 0
    q, g, t, s = tmp_path / "q.pt", tmp_path / "g.pt", tmp_path / "t.pt", tmp_path / "s.pt"
    assert main(["train", *quick, "--dataset", str(ds), "--model", "query", "--out", str(q)]) == 0
    assert main(["train", *quick, "--dataset", str(ds), "--model", "vgg_b", "--out", str(g)]) == 0
    assert main(["train", *quick, "--dataset", str(ds), "--kd-teacher", str(g), "--out", str(s)]) == 0
    # kd.enabled: false makes the same call a no-op (DVC's train_kd stages always run it)
    off = tmp_path / "off" / "s.pt"
    assert main(["train", *quick, "--set", "kd.enabled=false", "--dataset", str(ds), "--kd-teacher", str(g),
                 "--out", str(off)]) == 0
    assert not off.parent.exists()
    assert main(["fit-transform", *quick, "--dataset", str(ds), "--query-model", str(q), "--gallery-model", str(g),
                 "--out", str(t), "--train-embeddings-out", str(tmp_path / "train_g.parquet")]) == 0
    gallery = tmp_path / "gallery.parquet"
    assert main(["embed-gallery", "--dataset", str(ds), "--query-model", str(q), "--gallery-model", str(g),
                 "--transform", str(t), "--out", str(gallery)]) == 0
    assert (tmp_path / "gallery_members" / "vgg_b.parquet").exists()
    assert main(["build-index", "--gallery", str(gallery), "--out", str(tmp_path / "index"),
                 "--reject-fraction", "0"]) == 0
    assert main(["evaluate", *quick, "--dataset", str(ds), "--query-model", str(q), "--gallery", str(gallery),
                 "--transform", str(t), "--kd", str(s), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"sym_query", "sym_gallery/vgg_b", "asym/vgg_b", "asym_ensemble/1", "kd/vgg_b"} <= set(metrics)
    # --kd-dir finds students one folder down too (DVC's layout: kd/<teacher>/student.pt)
    (tmp_path / "kd" / "vgg_b").mkdir(parents=True)
    shutil.copyfile(s, tmp_path / "kd" / "vgg_b" / "student.pt")
    assert main(["evaluate", *quick, "--dataset", str(ds), "--query-model", str(q), "--gallery", str(gallery),
                 "--transform", str(t), "--kd-dir", str(tmp_path / "kd"), "--out", str(tmp_path / "eval_dir")]) == 0
    again = json.loads((tmp_path / "eval_dir" / "metrics.json").read_text())
    assert again.keys() == metrics.keys()
    for key in metrics:
        assert again[key] == pytest.approx(metrics[key], nan_ok=True), key
    # one member: the ensemble is that member's transformation
    assert metrics["asym_ensemble/1"]["R@1"] == metrics["asym/vgg_b"]["R@1"]
    train_emb = pq.read_table(tmp_path / "train_g.parquet")
    assert {"raw", "query"} <= set(train_emb.column_names)


def test_build_index_reads_the_index_section_of_a_config(tmp_path):
    from tests.test_index import clustered_gallery

    gallery, _ = clustered_gallery(tmp_path, n=1000, members=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("query_model: {name: q}\ngallery_models: [{name: g, arch: resnet}, {name: h, arch: vgg}]\n"
                   "index: {type: hnsw, reject_fraction: 0.1, hnsw: {m: 8, ef_search: 20}}\n")
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["index_params"]["factory"] == "HNSW8,Flat" and meta["search_params"] == {"ef_search": 20}
    assert meta["n_rejected"] == 100
    # flags override the config; without a config the defaults apply
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "b"),
                 "--index-type", "flat", "--reject-fraction", "0"]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["index_type"] == "flat" and meta["n_rejected"] == 0
    assert main(["build-index", "--gallery", str(gallery), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["index_type"] == "flat"
    assert main(["build-index", "--gallery", str(gallery), "--out", str(tmp_path / "d"), "--index-type", "annoy"]) != 0


def test_build_index_takes_a_file_of_the_index_section_alone(tmp_path, caplog, monkeypatch):
    """`--config` says "index type, rejection and the type's parameters", yet a file of `index:` alone was refused
    for lacking gallery_models: build-index reads no model. Its faults and overrides are named as a config's."""
    from cmce import config
    from tests.test_index import clustered_gallery

    gallery, _ = clustered_gallery(tmp_path, n=1000, members=2)
    cfg = tmp_path / "index.yaml"
    cfg.write_text("index: {type: hnsw, reject_fraction: 0.1, hnsw: {m: 8}}\n")
    reads = []
    monkeypatch.setattr(config, "read_config_text", lambda path, read=config.read_config_text: reads.append(path)
                        or read(path))
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "a"),
                 "--set", "index.hnsw.ef_search=20"]) == 0
    assert len(reads) == 1  # read once: the device is chosen, then the index built, from one reading
    monkeypatch.undo()
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["index_params"]["factory"] == "HNSW8,Flat" and meta["search_params"] == {"ef_search": 20}
    assert meta["n_rejected"] == 100
    refusals = [(["--set", "train.epochs=2"], "--set train.epochs: " + str(cfg) + " holds the index section alone"),
                (["--index-type", "annoy"], "--index-type: index.type: 'annoy' is not one of"),
                (["--set", "index.reject_fraction=1"], "--set index.reject_fraction must be in [0, 1)"),
                # the flag at fault alone, not "--set index.hnsw.m, --index-type"
                (["--index-type", "annoy", "--set", "index.hnsw.m=8"],
                 "cmce build-index: --index-type: index.type: 'annoy' is not one of")]
    for extra, said in refusals:
        caplog.clear()
        assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out",
                     str(tmp_path / "b"), *extra]) == 2
        assert said in caplog.text, caplog.text
    caplog.clear()  # a mapping for the section, as a whole config takes it
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "c"),
                 "--set", "index={type: flat}"]) == 0
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["index_type"] == "flat"
    for section in ("[]", "false"):  # built with the defaults, exit 0
        cfg.write_text(f"index: {section}\n")
        caplog.clear()
        assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "b")]) == 2
        assert f"{cfg}: index: expected a mapping" in caplog.text
    cfg.write_text("index: {type: flat}\n")
    caplog.clear()  # a key of thousands of letters is cut, as with a whole config
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "b"),
                 "--set", f"index.{'k' * 6000}=1"]) == 2
    assert "unknown key(s)" in caplog.text and len(caplog.text) < 1000
    cfg.write_text("index: {type: flat, nlist: 4}\n")  # the file's own fault is the file's
    caplog.clear()
    assert main(["build-index", "--config", str(cfg), "--gallery", str(gallery), "--out", str(tmp_path / "b")]) == 2
    assert f"{cfg}: index: unknown key(s) ['nlist']" in caplog.text
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, said", [
    (["--device", "cpu", "train", "--model", "query", "--set", "device=cuda"], "--set device and --device"),
    (["--threads", "2", "train", "--model", "query", "--set", "num_threads=1"], "--set num_threads and --threads"),
    (["build-index", "--set", "index.reject_fraction=0.2", "--reject-fraction", "0.3"],
     "--set index.reject_fraction and --reject-fraction"),
    (["build-index", "--set", "index={type: hnsw}", "--index-type", "flat"], "--set index.type and --index-type"),
])
def test_a_setting_given_by_set_and_by_its_flag_is_refused(tmp_path, caplog, argv, said):
    """`--set index.reject_fraction=0.2 --reject-fraction 0.3` used 0.3, `--device cpu … --set device=cuda` trained
    on the CPU, without a word; a key given twice to --set is refused, and so is this."""
    from tests.test_index import clustered_gallery

    gallery, _ = clustered_gallery(tmp_path, n=200, members=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(SMOKE.read_text())
    inputs = (["--gallery", str(gallery)] if "build-index" in argv else ["--dataset", str(tmp_path / "none.parquet")])
    assert main([*argv, "--config", str(cfg), *inputs, "--out", str(tmp_path / "out")]) == 2
    assert f"{said} both set" in caplog.text and not (tmp_path / "out").exists()


def test_a_mapping_set_beside_a_flag_of_another_key_of_its_section_is_taken(tmp_path):
    """`--set 'index={type: flat}' --reject-fraction 0.1` was refused as both setting index.reject_fraction: a
    mapping sets only its own keys (`train={epochs: 1}` changes only train.epochs)."""
    from cmce.index import load_index
    from tests.test_index import clustered_gallery

    gallery, _ = clustered_gallery(tmp_path, n=200, members=2)
    assert main(["build-index", "--config", str(SMOKE), "--set", "index={type: flat}", "--reject-fraction", "0.1",
                 "--gallery", str(gallery), "--out", str(tmp_path / "out")]) == 0
    meta = load_index(tmp_path / "out").meta
    assert (meta["index_type"], meta["reject_fraction"]) == ("flat", 0.1)


@pytest.mark.parametrize("soft, hard, said", [
    (7, 7, "ERROR cmce: cmce: the open-file limit is 7 (ulimit -n); a cmce step needs at least 64"),
    (20, 4096, "g.parquet"),  # a soft limit the hard one allows to raise is raised: the step goes on to its input
])
def test_an_open_file_limit_too_low_is_raised_or_named_before_the_libraries_load(tmp_path, soft, hard, said):
    """`ulimit -n 20` with loader workers: 117 worker tracebacks, exit 1; `ulimit -n 7`: `[Errno 24] Too many open
    files`, naming nothing."""
    import resource

    from tests.serve_world import cmce_env

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(tmp_path / "g.parquet"),
                          "--out", str(tmp_path / "index")], env=cmce_env(), capture_output=True, text=True,
                         preexec_fn=limit, timeout=120)
    errors = _errors_of(res.stderr)
    assert res.returncode == 2 and len(errors) == 1 and said in errors[0], res.stderr
    assert "open-file limit" not in res.stderr or soft == hard


def _errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_while_the_libraries_load_is_one_line(tmp_path, signum):
    """SIGINT during the seconds torch takes to import, before main could catch anything: a 20–33-line
    KeyboardInterrupt traceback (SIGTERM: exit 143 and no line). -X importtime shows when torch's import has begun;
    whenever the signal lands after that (in an import, or in main), the command says so in one line."""
    import re
    import signal
    import time

    from tests.serve_world import cmce_env

    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "cmce", "build-index", "--gallery",
                             str(tmp_path / "g.parquet"), "--out", str(tmp_path / "index")], env=cmce_env(),
                            stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # an import of torch's own has ended: torch's is under way
        lines.append(line)
        if re.search(r"\|\s+torch\b", line):
            break
    proc.send_signal(signum)
    started = time.monotonic()
    rest = proc.stderr.read()
    proc.wait(60)
    assert any("torch" in line for line in lines), lines[-5:]
    shown = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 128 + signum and time.monotonic() - started < 30, (proc.returncode, shown)
    assert "Traceback" not in rest and len(_errors_of(rest)) == 1, shown
    assert f"interrupted ({signal.Signals(signum).name})" in _errors_of(rest)[0], shown
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gallery, when", [("made", "cleanup"), ("missing", "cleanup"), ("made", "exit handler"),
                                           ("made", "thread joined at exit")])
def test_a_stop_as_the_command_ends_is_one_line_and_ends_it_at_once(tmp_path, gallery, when):
    """SIGTERM in the half second after a step had given its signals back (its output published, the interpreter
    ending): exit 143 and no line, so a caller saw a failed step and nothing said its output had been replaced.
    The stop is sent from the step's last cleanup (after main gave the signals back), from an exit handler (one a
    library registered while the command ran), or by a thread the exit waits for (which sleeps on: the stop must
    end the process, not wait for it)."""
    import time

    from tests.serve_world import cmce_env
    from tests.test_index import clustered_gallery

    made, _ = clustered_gallery(tmp_path, n=60)
    made.rename(tmp_path / "g.parquet") if gallery == "made" else made.unlink()
    stop = "os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)"
    hooks = {"cleanup": f"cli.clear_scratch = lambda: (clear(), exec({stop!r}))",
             "exit handler": f"cli.clear_scratch = lambda: (clear(), atexit.register(lambda: exec({stop!r})))",
             "thread joined at exit": "cli.clear_scratch = lambda: (clear(), threading.Thread(target=lambda: "
                                      "(time.sleep(0.5), exec(" + repr(stop) + "))).start())"}
    late = ("import atexit, os, signal, sys, threading, time; import cmce.cli as cli; from cmce.__main__ import entry\n"
            f"clear = cli.clear_scratch; {hooks[when]}; sys.argv[1:] = sys.argv[2:]; entry()")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-c", late, "cmce", "build-index", "--gallery", str(tmp_path / "g.parquet"),
                          "--out", str(tmp_path / "index")], env=cmce_env(), capture_output=True, text=True,
                         timeout=50)
    errors = _errors_of(res.stderr)
    assert res.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 40, res.stderr
    assert "Traceback" not in res.stderr and errors[-1].endswith(
        "cmce: interrupted (SIGTERM) as the command ended, after its work; each output is whole or not written"), errors
    assert len(errors) == (1 if gallery == "made" else 2), errors  # a refusal's own line first
    assert (tmp_path / "index" / "meta.json").exists() == (gallery == "made")


def test_a_memory_limit_too_low_for_the_libraries_is_one_line(tmp_path):
    """Under `ulimit -v 300000` libtorch cannot be mapped (and a little higher Python runs out while importing):
    an ImportError or MemoryError traceback of 30 lines, exit 1. One line naming the cause instead."""
    import resource

    from tests.serve_world import cmce_env

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (300_000 * 1024, resource.getrlimit(resource.RLIMIT_AS)[1]))

    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(tmp_path / "g.parquet"),
                          "--out", str(tmp_path / "index")], env=cmce_env(), capture_output=True, text=True,
                         timeout=120, preexec_fn=limited)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(_errors_of(res.stderr)) == 1 and "out of memory while loading its libraries" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_empty_thread_count_variable_means_the_libraries_default(tmp_path):
    """`OMP_NUM_THREADS=` (set, empty): libgomp printed `Invalid value for environment variable OMP_NUM_THREADS`
    twice, then the step ran. Empty is unset: the libraries' default, and no warning."""
    from tests.serve_world import cmce_env

    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(tmp_path / "g.parquet"),
                          "--out", str(tmp_path / "index")], env={**cmce_env(), "OMP_NUM_THREADS": ""},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "OMP_NUM_THREADS" not in res.stderr, res.stderr  # refused for the missing gallery
    assert len(_errors_of(res.stderr)) == 1 and "g.parquet" in _errors_of(res.stderr)[0], res.stderr


@pytest.mark.parametrize("value", ["0", "abc"])
def test_a_thread_count_variable_that_is_no_count_is_named_before_the_libraries_load(tmp_path, value):
    """OMP_NUM_THREADS=0 or abc: libgomp printed its `Invalid value` warning twice and the step ran (exit 0) with a
    thread count of its own choosing, which decides the bytes of a model."""
    from tests.serve_world import cmce_env

    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(tmp_path / "g.parquet"),
                          "--out", str(tmp_path / "index")], env={**cmce_env(), "OMP_NUM_THREADS": value},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"environment variable OMP_NUM_THREADS={value!r}: a thread count from 1 to 999999 expected" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, said", [
    # the typo was unnamed: "the following arguments are required: --config"
    (["train", "--confg", "c.yaml", "--model", "q", "--dataset", "d", "--out", "o"],
     "cmce train: unrecognized arguments: --confg (did you mean --config?) (see cmce train --help)"),
    # named with the top-level help: "(see cmce --help)", which lists no option of search
    (["search", "--index", "i", "--query-model", "q", "--image", "a.png"],
     "cmce search: unrecognized arguments: --image a.png (did you mean --images?) (see cmce search --help)"),
    (["--version"], "cmce: unrecognized arguments: --version (see cmce --help)"),  # was "required: command"
    (["search", "--index", "i", "--query-model", "q", "--dataset", "d", "--split", "tset"],  # was "is empty"
     "cmce search: argument --split: invalid choice: 'tset' (choose from 'train', 'test') (see cmce search --help)"),
    (["train", "--config", "c", "--model", "q", "--dataset", "d", "--out", "o", "--debug"],  # cmce's own option
     "cmce: argument --debug: an option of cmce itself; give it before train (see cmce --help)"),
    (["--bogus", "train", "--config", "c", "--model", "q", "--dataset", "d", "--out", "o"],  # not train's to name
     "cmce: unrecognized arguments: --bogus (see cmce --help)"),
    (["train", "--model", "q", "--dataset", "d", "--out", "o"],  # no unknown option: what is missing
     "cmce train: the following arguments are required: --config (see cmce train --help)"),
])
def test_an_unknown_option_is_named_by_the_command_it_was_given_to(argv, said, capsys):
    from cmce.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines() == [said]
