"""Storage on S3: the CLI steps read and write s3:// URIs on a real S3 server on 127.0.0.1
(SeaweedFS `weed mini`, tests/s3server.py): the smoke chain, DVC and MLflow on the same server, faults,
and no credential in any log, message or MLflow param."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from cmce import s3 as cmce_s3
from cmce import s3_client
from cmce.cli import main
from cmce.index import IndexLoadError, load_index
from cmce.redaction import redact
from cmce.s3 import _inside
from cmce.storage import clear_scratch, local_input
from cmce.tables import embedding_array, with_metadata, write_table
from tests.conftest import SMOKE, dvc
from tests.fake_servers import EMPTY_LISTING, FakeObject, Quiet, s3_env, serving, stopped_when
from tests.s3server import WeedServer, free_ports

QUICK = ["--config", str(SMOKE), "--set", "train.epochs=1", "--set", "transform.epochs=1"]
INDEX_FILES = {"meta.json", "index.faiss", "ids.parquet", "rejected.parquet"}


def use_server(mp: pytest.MonkeyPatch, server: WeedServer) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "MLFLOW_TRACKING_URI"):
        mp.delenv(name, raising=False)
    for name, value in server.env().items():
        mp.setenv(name, value)


def new_bucket(server: WeedServer) -> str:
    name = f"cmce-{secrets.token_hex(4)}"
    server.client().create_bucket(Bucket=name)
    return name


def keys(server: WeedServer, bucket: str, prefix: str = "") -> set[str]:
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


def read_object(server: WeedServer, bucket: str, key: str) -> bytes:
    return server.client().get_object(Bucket=bucket, Key=key)["Body"].read()


def chain(root: str) -> list[list[str]]:
    """The smoke CLI chain (as in test_cli.py::test_step_by_step_cli_chain) with every path under `root`."""
    return [
        ["prepare-data", *QUICK, "--out", f"{root}/d.parquet"],
        ["train", *QUICK, "--dataset", f"{root}/d.parquet", "--model", "query", "--out", f"{root}/q.pt"],
        ["train", *QUICK, "--dataset", f"{root}/d.parquet", "--model", "vgg_b", "--out", f"{root}/g.pt"],
        ["fit-transform", *QUICK, "--dataset", f"{root}/d.parquet", "--query-model", f"{root}/q.pt",
         "--gallery-model", f"{root}/g.pt", "--out", f"{root}/t.pt",
         "--train-embeddings-out", f"{root}/train_g.parquet"],
        ["embed-gallery", "--dataset", f"{root}/d.parquet", "--query-model", f"{root}/q.pt",
         "--gallery-model", f"{root}/g.pt", "--transform", f"{root}/t.pt", "--out", f"{root}/gallery.parquet"],
        ["build-index", "--gallery", f"{root}/gallery.parquet", "--out", f"{root}/index", "--reject-fraction", "0"],
        ["evaluate", *QUICK, "--dataset", f"{root}/d.parquet", "--query-model", f"{root}/q.pt",
         "--gallery", f"{root}/gallery.parquet", "--transform-dir", f"{root}/tdir", "--out", f"{root}/eval"],
    ]


class Collect(logging.Handler):
    """Every record of every logger, formatted with its traceback: what a log file would hold."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def s3_chain(s3_server, tmp_path_factory):
    """The chain on s3:// (every log record kept), then on local paths."""
    tmp = tmp_path_factory.mktemp("s3chain")
    local = tmp / "local"
    (local / "tdir").mkdir(parents=True)
    scratch_parent = tmp / "tmpdir"
    scratch_parent.mkdir()
    root_logger, collect = logging.getLogger(), Collect()
    with pytest.MonkeyPatch.context() as mp:
        use_server(mp, s3_server)
        mp.setattr(tempfile, "tempdir", str(scratch_parent))  # where scratch goes, to check it is cleared
        bucket = new_bucket(s3_server)
        root = f"s3://{bucket}/run"
        level = root_logger.level
        root_logger.addHandler(collect)
        root_logger.setLevel(logging.DEBUG)
        try:
            for argv in chain(root):
                if argv[0] == "evaluate":  # --transform-dir: a prefix holding the transformation
                    s3_server.client().copy_object(Bucket=bucket, Key="run/tdir/t.pt",
                                                   CopySource={"Bucket": bucket, "Key": "run/t.pt"})
                assert main(argv) == 0, (argv[0], collect.lines[-5:])
        finally:
            root_logger.removeHandler(collect)
            root_logger.setLevel(level)
        scratch_left = list(scratch_parent.glob("cmce-*"))
    # the local reference: the same steps on local paths, from the same trained models (training twice
    # would only test that training is deterministic, which test_determinism.py does)
    for argv in chain(str(local)):
        if argv[0] == "train":
            out = Path(argv[argv.index("--out") + 1])
            out.write_bytes(read_object(s3_server, bucket, f"run/{out.name}"))
            continue
        if argv[0] == "evaluate":
            (local / "tdir" / "t.pt").write_bytes((local / "t.pt").read_bytes())
        assert main(argv) == 0, argv[0]
    return SimpleNamespace(bucket=bucket, root=root, local=local, logs=collect.lines, scratch_left=scratch_left,
                           n_gallery=pq.read_metadata(local / "gallery.parquet").num_rows)


def test_smoke_chain_on_s3_gives_the_local_run_byte_for_byte(s3_server, s3_chain):
    """Dataset, models, gallery Parquet, index and evaluation on s3://: the same metrics as the local run,
    and every artifact the same bytes (the steps are deterministic); nothing left in scratch."""
    b = s3_chain.bucket
    local_files = {p.relative_to(s3_chain.local).as_posix() for p in s3_chain.local.rglob("*") if p.is_file()}
    assert keys(s3_server, b, "run/") == {f"run/{f}" for f in local_files}
    assert {f"index/{f}" for f in INDEX_FILES} | {"gallery.parquet", "gallery_members/vgg_b.parquet",
                                                  "eval/metrics.json", "train_g.parquet"} <= local_files
    s3_metrics = json.loads(read_object(s3_server, b, "run/eval/metrics.json"))
    assert s3_metrics == json.loads((s3_chain.local / "eval" / "metrics.json").read_text())
    assert {"sym_query", "asym/vgg_b", "asym_ensemble/1"} <= set(s3_metrics)
    assert "rejection/uncertainty" not in s3_metrics  # one gallery model: no uncertainty to reject by
    for f in sorted(local_files - {"eval/versions.json"}):
        assert read_object(s3_server, b, f"run/{f}") == (s3_chain.local / f).read_bytes(), f
    # the record names where the gallery really is, not a scratch copy
    versions = json.loads(read_object(s3_server, b, "run/eval/versions.json"))
    assert versions["gallery"] == f"{s3_chain.root}/gallery.parquet"
    assert s3_chain.scratch_left == []


def test_search_on_an_s3_index_in_a_fresh_process(s3_server, s3_chain, capsys):
    """`cmce search --index s3://...` as a real process: the hits of the local index; no credential printed."""
    r = s3_chain.root
    res = subprocess.run([sys.executable, "-m", "cmce.cli", "search", "--index", f"{r}/index",
                          "--query-model", f"{r}/q.pt", "--dataset", f"{r}/d.parquet", "--limit", "3", "--k", "4"],
                         env={**os.environ, **s3_server.env(), "PYTHONPATH": os.pathsep.join(
                             [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")])},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    loc = s3_chain.local
    assert main(["search", "--index", str(loc / "index"), "--query-model", str(loc / "q.pt"),
                 "--dataset", str(loc / "d.parquet"), "--limit", "3", "--k", "4"]) == 0
    local_lines = capsys.readouterr().out.splitlines()
    assert res.stdout.splitlines() == local_lines and len(local_lines) == 3
    assert all(len(json.loads(line)["hits"]) == 4 for line in local_lines)
    assert "downloaded s3://" in res.stderr  # the log was captured: the check below can fail
    for text in (res.stdout, res.stderr):
        assert s3_server.secret_key not in text and s3_server.access_key not in text


def test_an_s3_index_is_read_by_its_meta_json_and_an_unfinished_one_is_refused_before_any_download(
        s3_server, s3_chain, monkeypatch):
    """Loading an index from a prefix reads its meta.json and the files it names, no listing (no probing of what
    the URI names); a prefix without meta.json (an upload that did not finish) is refused from one listing,
    nothing downloaded."""
    use_server(monkeypatch, s3_server)
    client = s3_client.client()
    unfinished = "elsewhere/unfinished_index"  # outside run/, whose keys another test compares with a local run
    for name in INDEX_FILES - {"meta.json"}:
        s3_server.client().copy_object(Bucket=s3_chain.bucket, Key=f"{unfinished}/{name}",
                                       CopySource={"Bucket": s3_chain.bucket, "Key": f"run/index/{name}"})
    calls: list[str] = []

    def record(event_name: str, **_: object) -> None:
        calls.append(event_name.rsplit(".", 1)[-1])

    client.meta.events.register("before-call.s3", record)
    try:
        loaded = load_index(f"{s3_chain.root}/index")
        complete_calls, calls[:] = list(calls), []
        with pytest.raises(IndexLoadError, match="unfinished_index: not a complete index"):
            load_index(f"s3://{s3_chain.bucket}/{unfinished}")
    finally:
        client.meta.events.unregister("before-call.s3", record)
        clear_scratch()
    assert complete_calls.count("ListObjectsV2") == 0
    assert complete_calls.count("HeadObject") == complete_calls.count("GetObject") == len(INDEX_FILES)  # per file
    assert calls == ["HeadObject", "ListObjectsV2"]  # its meta.json is looked for, then the prefix listed
    local = load_index(s3_chain.local / "index")
    assert loaded.ids == local.ids and loaded.meta == local.meta


def test_no_credential_in_the_logs_of_an_s3_run(s3_server, s3_chain):
    """Every record at every level, from every logger (boto3/botocore included), of the whole S3 chain."""
    text = "\n".join(s3_chain.logs)
    assert "uploaded s3://" in text and "downloaded s3://" in text  # the records are there
    assert s3_server.secret_key not in text
    assert s3_server.access_key not in text
    sdk_debug = [line for line in s3_chain.logs if line.split(".")[0].split(" ")[0] in
                 ("botocore", "boto3", "s3transfer", "urllib3") and line.split(" ")[1] == "DEBUG"]
    assert sdk_debug == []  # request and signing details stay unrecorded even under a DEBUG root logger


def test_dvc_remote_and_mlflow_artifacts_on_the_same_server(s3_server, s3_chain, tmp_path, monkeypatch):
    """DVC pushes to an s3:// remote and MLflow stores a step's artifacts under s3:// on the server the
    steps use; no credential in the DVC config or in any MLflow param, tag or artifact name."""
    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    bucket = new_bucket(s3_server)  # DVC never creates buckets
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    dataset = repo / "dataset.parquet"
    dataset.write_bytes(read_object(s3_server, s3_chain.bucket, "run/d.parquet"))
    for cmd in (["init", "-q"], ["add", "-q", "dataset.parquet"], ["remote", "add", "-d", "store", f"s3://{bucket}/dvc"],
                ["remote", "modify", "store", "endpointurl", s3_server.endpoint], ["push", "-q"]):
        res = dvc(repo, *cmd)
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-2000:])
    pushed = keys(s3_server, bucket, "dvc/")
    assert len(pushed) == 1 and next(iter(pushed)).startswith("dvc/files/md5/")
    assert read_object(s3_server, bucket, next(iter(pushed))) == dataset.read_bytes()
    config = (repo / ".dvc" / "config").read_text()
    assert s3_server.endpoint in config and s3_server.secret_key not in config and s3_server.access_key not in config

    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = tmp_path / "track.json"
    assert main(["track-start", "--config", str(SMOKE), "--mlflow-uri", uri, "--artifact-location",
                 f"s3://{bucket}/mlflow", "--out", str(track)]) == 0
    parent = json.loads(track.read_text())["run_id"]
    assert main(["--mlflow-parent", parent, "--mlflow-uri", uri, "build-index", "--gallery",
                 f"{s3_chain.root}/gallery.parquet", "--out", f"s3://{bucket}/index"]) == 0
    logged = [k for k in keys(s3_server, bucket, "mlflow/") if k.endswith("/artifacts/index/meta.json")]
    assert len(logged) == 1
    assert read_object(s3_server, bucket, logged[0]) == read_object(s3_server, bucket, "index/meta.json")

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("cmce").experiment_id])
    assert len(runs) == 2 and any(r.data.params for r in runs)
    recorded = json.dumps([[r.data.params, r.data.tags, [a.path for a in client.list_artifacts(r.info.run_id)]]
                           for r in runs])
    assert {r.data.tags.get("mlflow.runName") for r in runs} == {"cmce", "build-index"}
    assert s3_server.secret_key not in recorded and s3_server.access_key not in recorded


# --- faults -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_gallery(tmp_path_factory) -> Path:
    """A gallery file of ~32 MB of incompressible embeddings (a multipart upload of 7 parts of 5 MiB)."""
    rng = np.random.default_rng(0)
    n, dim = 30_000, 256
    table = pa.table({"id": [f"g{i:06d}" for i in range(n)], "label": rng.integers(0, 10, n).astype(np.int32),
                      "embedding": embedding_array(rng.standard_normal((n, dim), dtype=np.float32)),
                      "uncertainty": rng.random(n, dtype=np.float32)})
    meta = {"kind": "gallery", "split": "test", "query_model_sha256": "0" * 64,
            "members": [{"name": "m", "arch": "resnet", "sha256": "1" * 64, "transformation_sha256": "2" * 64}]}
    return write_table(with_metadata(table, meta), tmp_path_factory.mktemp("big") / "gallery.parquet")


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    """A server of this test's own, to be killed; small parts, one at a time, few retries."""
    server = WeedServer(tmp_path / "s3data").start()
    use_server(monkeypatch, server)
    monkeypatch.setenv("CMCE_S3_MULTIPART_THRESHOLD_MB", "8")
    monkeypatch.setenv("CMCE_S3_MULTIPART_CHUNK_MB", "5")
    monkeypatch.setenv("CMCE_S3_MAX_CONCURRENCY", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    yield server
    server.stop()


def kill_when_upload_starts(server: WeedServer, bucket: str, killed: list[float]) -> threading.Thread:
    """Watch the bucket from another client; SIGKILL the server as soon as a multipart upload is open."""
    watcher = server.client(fresh=True)

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if watcher.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                    server.kill()
                    killed.append(time.monotonic())
                    return
            except Exception:  # noqa: BLE001 - keep watching until the deadline
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("step", ["merge", "build-index"])
def test_server_killed_mid_upload_fails_clearly_and_a_rerun_succeeds(step, own_server, big_gallery, tmp_path,
                                                                      caplog):
    """The server dies while a large output is uploaded in parts: the step fails with a clear error, no
    object appears at the final key (for an index: no meta.json, so readers refuse the prefix), and once
    the server is back on the same data the same command succeeds."""
    bucket = new_bucket(own_server)
    out = f"s3://{bucket}/served/" + ("gallery.parquet" if step == "merge" else "index")
    argv = ["merge", str(big_gallery), "--out", out] if step == "merge" else \
        ["build-index", "--gallery", str(big_gallery), "--out", out]
    killed: list[float] = []
    watcher = kill_when_upload_starts(own_server, bucket, killed)
    assert main(argv) == 2
    watcher.join(timeout=60)
    assert killed, "the upload finished before the server could be killed"
    assert f"cmce {step}: {out}" in caplog.text and "cannot reach the S3 endpoint" in caplog.text

    own_server.start()  # same data directory, same ports
    left = keys(own_server, bucket)
    if step == "merge":
        assert left == set()
    else:
        assert "served/index/meta.json" not in left and "served/index/index.faiss" not in left
        if left:  # files uploaded before the large one: a prefix readers refuse
            with pytest.raises(IndexLoadError, match="not a complete index"):
                load_index(out)
    caplog.clear()
    assert main(argv) == 0, caplog.text
    if step == "merge":  # the bytes a local merge writes
        assert main(["merge", str(big_gallery), "--out", str(tmp_path / "merged.parquet")]) == 0
        assert read_object(own_server, bucket, "served/gallery.parquet") == (tmp_path / "merged.parquet").read_bytes()
    else:
        assert keys(own_server, bucket) == {f"served/index/{f}" for f in INDEX_FILES}
        assert load_index(out).index.ntotal == 30_000


@pytest.mark.parametrize("wrong", ["secret", "key-id"])
@pytest.mark.parametrize("direction", ["read", "write"])
def test_wrong_credentials_are_a_clear_error_without_the_secret(direction, wrong, s3_server, tmp_path, monkeypatch,
                                                                caplog):
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    s3_server.client().put_object(Bucket=bucket, Key="g.parquet", Body=b"not read")
    bad_secret = "wrong" + secrets.token_hex(12)
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN" + secrets.token_hex(4).upper())
    local = tmp_path / "out.parquet"
    uri = f"s3://{bucket}/g.parquet" if direction == "read" else f"s3://{bucket}/new/d.parquet"
    argv = ["add-member", "--gallery", uri, "--member", uri, "--out", str(local)] if direction == "read" else \
        ["prepare-data", "--config", str(SMOKE), "--out", uri]
    assert main(argv) == 2
    expected = "wrong secret access key" if wrong == "secret" else "does not know the access key id"
    assert f"{uri}: " in caplog.text and expected in caplog.text
    for secret in (s3_server.secret_key, bad_secret, s3_server.access_key):
        assert secret not in caplog.text
    assert keys(s3_server, bucket) == {"g.parquet"} and not local.exists()


@pytest.mark.parametrize("direction", ["read", "write", "write-after-s3-read"])
def test_missing_bucket_is_a_clear_error_and_nothing_is_written(direction, s3_server, s3_chain, tmp_path,
                                                                monkeypatch, caplog):
    """write-after-s3-read: the missing bucket was said only after the gallery had been downloaded."""
    use_server(monkeypatch, s3_server)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    missing = f"cmce-missing-{secrets.token_hex(4)}"
    local_index = tmp_path / "index"
    if direction == "read":
        uri = f"s3://{missing}/gallery.parquet"
        argv = ["build-index", "--gallery", uri, "--out", str(local_index)]
    else:
        uri = f"s3://{missing}/index"
        gallery = f"{s3_chain.root}/gallery.parquet" if direction == "write-after-s3-read" else \
            str(s3_chain.local / "gallery.parquet")
        argv = ["build-index", "--gallery", gallery, "--out", uri]
    caplog.set_level(logging.INFO)
    assert main(argv) == 2
    assert "downloaded" not in caplog.text
    assert f"{uri}: bucket '{missing}' does not exist" in caplog.text
    assert missing not in {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert not local_index.exists() and list((tmp_path / "tmp").glob("cmce-*")) == []


def test_unreachable_endpoint_is_a_clear_error(s3_server, s3_chain, tmp_path, monkeypatch, caplog):
    use_server(monkeypatch, s3_server)
    port = free_ports(1)[0]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    assert main(["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"), "--out", "s3://some/index"]) == 2
    assert f"s3://some/index: cannot reach the S3 endpoint http://127.0.0.1:{port}" in caplog.text


class Throttled:
    """A botocore `before-send` hook answering the first `failures` requests of one operation with
    503 SlowDown, as a throttled S3 server does; the request never reaches the server."""

    BODY = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"

    def __init__(self, failures: int):
        self.failures, self.answered = failures, 0

    def __call__(self, request, **_):
        from botocore.awsrequest import AWSResponse

        if self.answered >= self.failures:
            return None
        self.answered += 1
        body = self.BODY
        raw = SimpleNamespace(stream=lambda **_: iter([body]))
        return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, raw)


@pytest.mark.parametrize("failures, max_attempts, succeeds", [(2, 5, True), (9, 3, False)])
def test_transient_server_errors_are_retried_with_backoff(failures, max_attempts, succeeds, s3_server, tmp_path,
                                                          monkeypatch):
    from cmce import s3

    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(max_attempts))
    bucket = new_bucket(s3_server)
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(4096))
    uri = f"s3://{bucket}/blob.bin"
    throttle = Throttled(failures)
    events = s3_client.client().meta.events
    events.register("before-send.s3.PutObject", throttle)
    try:
        if succeeds:
            s3.upload_file(path, uri)
        else:
            with pytest.raises(OSError, match=rf"{uri}: S3 error while uploading: SlowDown"):
                s3.upload_file(path, uri)
    finally:
        events.unregister("before-send.s3.PutObject", throttle)
    if succeeds:  # failed twice, then the third attempt reached the server
        assert throttle.answered == failures
        assert read_object(s3_server, bucket, "blob.bin") == path.read_bytes()
    else:  # gave up after exactly AWS_MAX_ATTEMPTS attempts, and nothing was written
        assert throttle.answered == max_attempts
        assert keys(s3_server, bucket) == set()


def test_credentials_inside_a_uri_are_refused_and_not_echoed(tmp_path, caplog):
    uri = "s3://AKIAEXAMPLE:topsecretvalue@bucket/g.parquet"
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
    assert "credentials inside an s3:// URI are refused" in caplog.text
    assert "topsecretvalue" not in caplog.text and "AKIAEXAMPLE" not in caplog.text
    assert redact("see http://user:pw@host:9000/x and s3://k:s@b/y") == "see http://***@host:9000/x and s3://***@b/y"
    # a registered model's NAME@ALIAS is no user-info, however many slashes (it hid the name the user gave)
    assert redact("models://cmce-query@candidate and runs://r@x") == "models://cmce-query@candidate and runs://r@x"
    assert redact("xmodels://u:p@h") == "xmodels://***@h"
    # to the last `@` before the host, as URL parsers read it (the tail `ss20z` of `pa@ss20z` was shown)
    assert redact("http://bob:pa@ss20z@127.0.0.1:9/a?x=a@b") == "http://***@127.0.0.1:9/a?x=a@b"


def test_object_keys_cannot_leave_the_download_folder(tmp_path):
    assert _inside(tmp_path, "a/b.parquet", "s3://b/p") == tmp_path / "a" / "b.parquet"
    for rel in ("../x", "a/../../x", "/etc/passwd", ""):
        with pytest.raises(ValueError, match="leaves its prefix"):
            _inside(tmp_path, rel, "s3://b/p")


def test_no_credentials_in_the_code_or_configs():
    """Nothing that looks like an AWS key or a hard-coded secret in what ships (tests use random fakes)."""
    import re

    root = Path(__file__).resolve().parents[1]
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assigned = re.compile(r"(secret_access_key|aws_secret|password)\s*[=:]\s*['\"][^'\"$]{6,}['\"]", re.IGNORECASE)
    files = [p for d in ("src", "components", "pipeline", "containers", "configs", "lifecycle") for p in
             (root / d).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".sh", ".toml", ".cfg")]
    files += [root / f for f in ("dvc.yaml", "params.yaml", "pyproject.toml", "Makefile", ".dvc/config")
              if (root / f).exists()]
    assert len(files) > 20
    for path in files:
        text = path.read_text(errors="replace")
        assert not key_id.search(text), path
        assert not assigned.search(text), path


def test_errors_about_an_s3_input_name_its_uri(s3_server, tmp_path, monkeypatch, caplog):
    """A bad file read from S3 is reported under its URI, not under the scratch copy it was read from."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    s3_server.client().put_object(Bucket=bucket, Key="in/gallery.parquet", Body=b"not parquet at all")
    assert main(["build-index", "--gallery", f"s3://{bucket}/in/gallery.parquet", "--out", str(tmp_path / "i")]) == 2
    assert f"s3://{bucket}/in/gallery.parquet: not a readable Parquet file" in caplog.text
    assert "cmce-scratch" not in caplog.text and not (tmp_path / "i").exists()


def test_sibling_and_stem_of_paths_and_uris():
    from cmce.storage import sibling, stem

    assert sibling("s3://b/run/gallery.parquet", "gallery_members") == "s3://b/run/gallery_members"
    assert sibling("runs/x/gallery.parquet", "gallery_members") == str(Path("runs/x/gallery_members"))
    assert stem("s3://b/run/gallery.parquet") == stem("gallery.parquet") == "gallery"


def only_error(caplog: pytest.LogCaptureFixture) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("case", ["file over a prefix", "folder over an object", "file over another format",
                                  "Parquet over another kind", "folder holding other objects",
                                  "folder holding a folder named like its file", "ONNX over an index's meta.json",
                                  "checkpoint over another kind"])
def test_an_s3_output_is_checked_before_any_work_like_a_local_one(case, s3_server, s3_chain, tmp_path, monkeypatch,
                                                                   caplog, capsys):
    """export-query --out naming an index's prefix uploaded an object at the prefix's key, and the index could no
    longer be read; build-index --out naming an object uploaded a prefix under it (both exit 0)."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    put = s3_server.client().put_object
    local = s3_chain.local
    for f in INDEX_FILES:
        put(Bucket=bucket, Key=f"idx/{f}", Body=(local / "index" / f).read_bytes())
    put(Bucket=bucket, Key="q.onnx", Body=b"\x08\x08\x12\x07pytorch")
    put(Bucket=bucket, Key="gallery.parquet", Body=(local / "gallery.parquet").read_bytes())
    put(Bucket=bucket, Key="gallery", Body=(local / "gallery.parquet").read_bytes())  # told by its content alone
    put(Bucket=bucket, Key="model.pt", Body=(local / "q.pt").read_bytes())
    export = ["export-query", "--query-model", str(local / "q.pt"), "--out"]
    argv, expected = {
        "file over a prefix": ([*export, f"s3://{bucket}/idx"], "is a folder (a prefix holding objects)"),
        "folder over an object": (["build-index", "--gallery", str(local / "gallery.parquet"), "--out",
                                   f"s3://{bucket}/q.onnx"], "is an object (a file), not an output folder"),
        "file over another format": ([*export, f"s3://{bucket}/gallery"], "holds a Parquet file"),
        "Parquet over another kind": (["prepare-data", *QUICK, "--out", f"s3://{bucket}/gallery.parquet"],
                                      "holds a gallery Parquet file; this step writes a dataset file"),
        "folder holding other objects": (["build-index", "--gallery", str(local / "gallery.parquet"), "--out",
                                          f"s3://{bucket}/q"], "holds notes.txt, which this step does not write"),
        "folder holding a folder named like its file": (["build-index", "--gallery", str(local / "gallery.parquet"),
                                                         "--out", f"s3://{bucket}/f"],
                                                        "holds index.faiss/, which this step does not write"),
        "ONNX over an index's meta.json": ([*export, f"s3://{bucket}/idx/meta.json"],
                                           "its name says a JSON file; this step writes an ONNX file"),
        "checkpoint over another kind": (["fit-transform", *QUICK, "--dataset", str(local / "d.parquet"),
                                          "--query-model", str(local / "q.pt"), "--gallery-model", str(local / "g.pt"),
                                          "--out", f"s3://{bucket}/model.pt"],
                                         "holds a cmce-embedding-model/1 checkpoint file"),
    }[case]
    put(Bucket=bucket, Key="q/notes.txt", Body=b"not an index file")
    put(Bucket=bucket, Key="f/index.faiss/notes.txt", Body=b"a user's folder, deleted with the replaced index")
    before = {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)}
    caplog.clear()
    assert main(argv) == 2
    assert only_error(caplog).startswith(f"cmce {argv[0]}: {argv[-1]}: {expected}")
    assert {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)} == before
    assert capsys.readouterr().out == ""
    assert not any(r.name in ("cmce.export", "cmce.index", "cmce.data.prepare", "cmce.transform")
                   for r in caplog.records)
    assert load_index(f"s3://{bucket}/idx").index.ntotal > 0


def test_an_s3_output_of_its_own_kind_is_replaced(s3_server, s3_chain, monkeypatch):
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    gallery = s3_chain.local / "gallery.parquet"
    s3_server.client().put_object(Bucket=bucket, Key="g.parquet", Body=b"PAR1 a broken gallery file PAR1")
    assert main(["merge", str(gallery), "--out", f"s3://{bucket}/g.parquet"]) == 2  # not a cmce Parquet file
    s3_server.client().put_object(Bucket=bucket, Key="g.parquet", Body=gallery.read_bytes())
    assert main(["merge", str(gallery), "--out", f"s3://{bucket}/g.parquet"]) == 0
    assert main(["build-index", "--gallery", str(gallery), "--out", f"s3://{bucket}/idx"]) == 0
    assert main(["build-index", "--gallery", str(gallery), "--out", f"s3://{bucket}/idx/"]) == 0
    assert keys(s3_server, bucket) == {"g.parquet", *(f"idx/{f}" for f in INDEX_FILES)}


def test_shards_embedded_into_one_s3_members_folder_do_not_replace_each_other(s3_server, s3_chain, monkeypatch,
                                                                             caplog):
    """The per-model files are named by model alone, and the check of the shard a member file holds looked at a
    local --members-dir only: `--shard 1/2` into shard 0/2's s3:// folder replaced its object (both exit 0)."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    local = s3_chain.local
    members = f"s3://{bucket}/members"
    embed = ["embed-gallery", "--dataset", str(local / "d.parquet"), "--query-model", str(local / "q.pt"),
             "--gallery-model", str(local / "g.pt"), "--transform", str(local / "t.pt"), "--members-dir", members]
    assert main([*embed, "--shard", "0/2", "--out", f"s3://{bucket}/g0.parquet"]) == 0
    before = {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)}
    assert "members/vgg_b.parquet" in before
    for shard, writes in (("1/2", "shard 1/2"), (None, "the whole split")):
        caplog.clear()
        assert main([*embed, *(["--shard", shard] if shard else []), "--out", f"s3://{bucket}/g1.parquet"]) == 2
        assert only_error(caplog) == (f"cmce embed-gallery: {members}/vgg_b.parquet: holds shard 0/2 of its model's "
                                      f"embeddings, this run writes {writes}; give each shard its own --members-dir")
        assert {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)} == before
    assert not any(r.name == "cmce.embed" for r in caplog.records)  # refused before anything was embedded
    assert main([*embed, "--shard", "0/2", "--out", f"s3://{bucket}/g0.parquet"]) == 0  # its own shard again


def test_a_served_s3_index_follows_a_rebuild_in_the_bucket(s3_server, s3_chain, tmp_path, monkeypatch):
    """`cmce serve --index s3://…` served the copy it downloaded at start: a rebuild in the bucket was served only
    after a restart. It is followed by its meta.json: swapped in while clients search (none refused), and no
    download is kept in scratch (a server following daily rebuilds filled its disk)."""
    from tests.serve_world import Server, cmce_env

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    index, gallery = f"s3://{bucket}/served/index", str(s3_chain.local / "gallery.parquet")
    assert main(["build-index", "--gallery", gallery, "--out", index, "--reject-fraction", "0"]) == 0
    (tmp := tmp_path / "tmp").mkdir()
    server = Server(["--index", index, "--query-model", str(s3_chain.local / "q.pt"), "--reload-interval", "0.2"],
                    tmp_path / "serve.log", env={**cmce_env(), **s3_server.env(), "TMPDIR": str(tmp)})
    refused, stop = [], threading.Event()
    try:
        before = requests.get(f"{server.url}/version", timeout=10).json()
        assert before["n_indexed"] == s3_chain.n_gallery
        query = [[0.1] * before["dim"]]

        def search() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    answer = server.search(session, embeddings=query, query_model_sha256=before["query_model_sha256"])
                    if answer.status_code != 200:
                        refused.append(answer.text)

        client = threading.Thread(target=search)
        client.start()
        assert main(["build-index", "--gallery", gallery, "--out", index, "--index-type", "hnsw"]) == 0
        deadline = time.monotonic() + 60
        while (now := requests.get(f"{server.url}/version", timeout=10).json())["index_version"] == \
                before["index_version"]:
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.1)
        stop.set()
        client.join()
        ready = requests.get(f"{server.url}/readyz", timeout=10).json()
        kept = [p for p in tmp.rglob("*") if p.is_file()]  # while it serves: its scratch is removed at exit
    finally:
        stop.set()
        server.stop()
    assert server.line.startswith(f"serving {index} on http://")  # the URI, not its download's path
    assert (now["index_type"], now["n_indexed"]) == ("hnsw", s3_chain.n_gallery)
    assert ready["reloads"] == 1 and ready["last_reload_error"] is None
    assert refused == []
    assert kept == []
    assert f"now serving index {now['index_version'][:12]}" in server.log.read_text()


class Clock:
    """time, with a monotonic clock the test moves on by hand (a minute's audit without a minute's wait)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str):
        return getattr(time, name)


def test_a_served_s3_index_whose_files_change_under_its_meta_json_says_so(s3_server, s3_chain, monkeypatch):
    """Only meta.json was watched on S3: an index file deleted (a bucket's expiry rule) or replaced under it went
    unsaid while the loaded copy served, /readyz ready, and the next restart refused the index. The files are looked
    at once a minute and whenever meta.json changes: a rebuild's are not downloaded again to be checked, a refused
    one is loaded once, and a check that could not be made is made again after a while."""
    from cmce.serving import index_source, state
    from cmce.serving.state import RETRY_S, Holder, QueryModelSource

    use_server(monkeypatch, s3_server)
    clock = Clock()
    monkeypatch.setattr(index_source, "time", clock)
    monkeypatch.setattr(state, "time", clock)
    loads, checked, fail = [], [], []
    monkeypatch.setattr(index_source, "load_index", lambda *a, **kw: loads.append(a) or load_index(*a, **kw))

    def check_download(uri):
        checked.append(uri)
        if fail:
            raise TimeoutError(f"{uri}: {fail.pop()}")
        return local_input(uri)

    monkeypatch.setattr(index_source, "local_input", check_download)
    bucket = new_bucket(s3_server)
    index, gallery, c = f"s3://{bucket}/index", str(s3_chain.local / "gallery.parquet"), s3_server.client()
    assert main(["build-index", "--gallery", gallery, "--out", index]) == 0

    refusing = ["hnsw"]

    def accept(loaded) -> None:  # (as serve's --dataset check refuses an index of another dataset)
        if loaded.meta["index_type"] in refusing:
            raise ValueError(f"refused: {loaded.meta['index_type']}")

    holder = Holder(index, QueryModelSource(str(s3_chain.local / "q.pt"), Path), accept=accept)
    served, ids = holder.current, read_object(s3_server, bucket, "index/ids.parquet")

    def poll(after: float = 0.0) -> str | None:
        clock.now += after
        assert holder.check() is False and holder.current is served
        return holder.last_error

    assert main(["build-index", "--gallery", gallery, "--out", index, "--index-type", "hnsw"]) == 0
    assert [poll(), poll(10), poll(61)] == ["reload failed: refused: hnsw"] * 3 and len(loads) == 2  # loaded once
    refusing.clear()
    assert main(["build-index", "--gallery", gallery, "--out", index, "--config", str(SMOKE), "--index-type", "hnsw",
                 "--reject-fraction", "0", "--set", "index.hnsw.m=16"]) == 0
    assert holder.check() is True and len(loads) == 3 and holder.last_error is None
    served, ids = holder.current, read_object(s3_server, bucket, "index/ids.parquet")
    assert [poll(), poll(61)] == [None, None] and checked == []  # the rebuild's files: not downloaded to check

    rejected = read_object(s3_server, bucket, "index/rejected.parquet")
    for name in ("ids.parquet", "rejected.parquet"):
        c.delete_object(Bucket=bucket, Key=f"index/{name}")
    assert poll(10) is None  # looked at once a minute
    assert poll(51) == (f"{index}/ids.parquet: missing; {index}/rejected.parquet: missing: the index in the bucket is "
                        "damaged (a restart would refuse it); the loaded copy is served")  # both at once
    c.put_object(Bucket=bucket, Key="index/rejected.parquet", Body=rejected)
    c.put_object(Bucket=bucket, Key="index/ids.parquet", Body=ids[:-1] + bytes([ids[-1] ^ 1]))  # the same size
    assert poll(61).startswith(f"{index}/ids.parquet: does not match the checksum in meta.json: the index")
    c.put_object(Bucket=bucket, Key="index/ids.parquet", Body=ids)
    assert poll(61) is None and len(checked) == 1  # the bytes put back have the ETag that was served: not downloaded

    # the same bytes under another ETag (a multipart upload's): downloaded to check; a download that failed is tried
    # again after RETRY_S, not shown until the next change
    upload = c.create_multipart_upload(Bucket=bucket, Key="index/ids.parquet")["UploadId"]
    part = c.upload_part(Bucket=bucket, Key="index/ids.parquet", UploadId=upload, PartNumber=1, Body=ids)["ETag"]
    c.complete_multipart_upload(Bucket=bucket, Key="index/ids.parquet", UploadId=upload,
                                MultipartUpload={"Parts": [{"ETag": part, "PartNumber": 1}]})
    fail.append("no whole answer within 5 s")
    said = poll(61)
    assert said.startswith(f"{index}/ids.parquet: replaced under an unchanged meta.json, and could not be read to "
                           "check it"), said
    assert poll(1) == said and len(checked) == 2
    assert poll(RETRY_S) is None and len(checked) == 3
    assert [poll(61), poll(61)] == [None, None] and len(checked) == 3  # checked once, then trusted

    real_head = cmce_s3.object_head  # the files cannot be looked at: said, and looked at again a minute later
    monkeypatch.setattr(cmce_s3, "object_head", lambda uri, *a, **kw: (
        (_ for _ in ()).throw(PermissionError(f"{uri}: access denied")) if uri.endswith(".faiss")
        else real_head(uri, *a, **kw)))
    assert poll(61) == f"{index}: its files could not be looked at to check them: {index}/index.faiss: access denied"
    monkeypatch.setattr(cmce_s3, "object_head", real_head)
    assert poll(61) is None
    clear_scratch()


def test_a_served_s3_index_in_replacement_keeps_serving_the_loaded_one(s3_server, s3_chain, monkeypatch):
    """While meta.json is gone (a build-index between deleting it and writing the new one, or a deletion) the
    loaded index is served. Gone for UNREADABLE_POLLS polls and REPLACING_S seconds (a replacement copying large
    files into place takes a while) it is shown, once, and the problem clears once it is back."""
    from cmce.serving.state import UNREADABLE_POLLS, Holder, QueryModelSource

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    index = f"s3://{bucket}/index"
    assert main(["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"), "--out", index]) == 0
    holder = Holder(index, QueryModelSource(str(s3_chain.local / "q.pt"), Path))
    served = holder.current
    meta = read_object(s3_server, bucket, "index/meta.json")
    s3_server.client().delete_object(Bucket=bucket, Key="index/meta.json")
    for _ in range(UNREADABLE_POLLS + 2):  # within REPLACING_S: a replacement under way
        assert holder.check() is False and holder.current is served and holder.last_error is None
    holder.source.replacing_s = 0.0  # (as if REPLACING_S had passed)
    for _ in range(2):
        assert holder.check() is False and holder.current is served
        assert holder.last_error.startswith(f"{index}/meta.json: unreadable since ")
    s3_server.client().put_object(Bucket=bucket, Key="index/meta.json", Body=meta)
    assert holder.check() is False and holder.current is served and holder.last_error is None
    clear_scratch()


def test_a_served_s3_index_says_each_outage_and_what_it_refused(s3_server, s3_chain, monkeypatch, tmp_path):
    """What /readyz shows of an s3:// index held: wrong credentials were called "not found"; a second outage went
    unsaid (the first's report was never reset, meta.json having come back unchanged); a broken meta.json waited
    the 120 s meant for a replacement, and was downloaded again on every poll; an index refused for another query
    model was hidden for good by an outage's message once the endpoint was back."""
    from cmce.serving.state import UNREADABLE_POLLS, Holder, QueryModelSource
    from tests.serve_world import gallery_index, query_model

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    index, put = f"s3://{bucket}/index", s3_server.client().put_object
    assert main(["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"), "--out", index]) == 0
    holder = Holder(index, QueryModelSource(str(s3_chain.local / "q.pt"), Path))
    served, meta = holder.current, read_object(s3_server, bucket, "index/meta.json")

    def polls(n: int) -> str | None:
        for _ in range(n):
            assert holder.check() is False and holder.current is served
        return holder.last_error

    for _ in range(2):  # each outage is said
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        assert polls(UNREADABLE_POLLS - 1) is None
        said = polls(1)
        assert said.startswith(f"{index}/meta.json: unreadable since "), said
        assert said.endswith("wrong secret access key; check AWS_SECRET_ACCESS_KEY or the AWS profile"), said
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        assert polls(1) is None

    put(Bucket=bucket, Key="index/meta.json", Body=b"{")  # broken, not missing: said after the polls alone
    reads = []
    real = cmce_s3.read_range
    monkeypatch.setattr(cmce_s3, "read_range", lambda *args, **kw: reads.append(args) or real(*args, **kw))
    assert re.match(rf"{index}/meta.json: unreadable since [-0-9]+ [:0-9]+ UTC: Expecting", polls(UNREADABLE_POLLS))
    assert len(reads) == 1  # read once: its ETag did not change
    put(Bucket=bucket, Key="index/meta.json", Body=meta)
    assert polls(1) is None

    other = query_model(tmp_path / "other.pt", seed=7, dim=int(json.loads(meta)["dim"]))
    built = gallery_index(tmp_path / "work", other, tmp_path / "other-index")
    for name in sorted(p.name for p in built.iterdir() if p.name != "meta.json") + ["meta.json"]:  # as uploaded
        put(Bucket=bucket, Key=f"index/{name}", Body=(built / name).read_bytes())
    refused = polls(1)
    assert refused.startswith("reload failed:") and "query model" in refused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert polls(UNREADABLE_POLLS) != refused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert polls(1) == refused  # said again once the endpoint is back
    clear_scratch()


def test_a_new_meta_json_whose_read_failed_once_is_read_again(s3_server, s3_chain, monkeypatch):
    """A rebuild's meta.json whose HEAD answered but whose GET timed out once: that error was kept for its ETag, and
    the new index was not served until the next rebuild (/readyz showing the error all along)."""
    from cmce.serving.state import Holder, QueryModelSource

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    index, gallery = f"s3://{bucket}/index", str(s3_chain.local / "gallery.parquet")
    assert main(["build-index", "--gallery", gallery, "--out", index]) == 0
    holder = Holder(index, QueryModelSource(str(s3_chain.local / "q.pt"), Path))
    assert main(["build-index", "--gallery", gallery, "--out", index, "--index-type", "hnsw"]) == 0
    real, reads = cmce_s3.read_range, []

    def once_timed_out(*args, **kw):
        reads.append(args)
        if len(reads) == 1:
            raise TimeoutError(f"{args[0]}: no whole answer from the S3 endpoint within 5 s")
        return real(*args, **kw)

    monkeypatch.setattr(cmce_s3, "read_range", once_timed_out)
    assert holder.check() is False
    assert holder.check() is True and holder.current.index.meta["index_type"] == "hnsw" and len(reads) == 2
    assert holder.last_error is None
    clear_scratch()


def test_a_meta_json_replaced_after_its_head_is_not_read_in_its_place(s3_server, s3_chain, monkeypatch):
    """The poll's GET of meta.json was not tied to the HEAD before it: a meta.json replaced in between was read, and
    its version kept for the old ETag (taken for what the prefix holds, should that ETag come back)."""
    from cmce.serving.index_source import PrefixSource

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    put = s3_server.client().put_object
    put(Bucket=bucket, Key="index/meta.json", Body=b'{"v": 1}')
    source = PrefixSource(f"s3://{bucket}/index")
    first = source.identity()
    put(Bucket=bucket, Key="index/meta.json", Body=b'{"v": 2}')
    with pytest.raises(OSError, match=f"s3://{bucket}/index/meta.json: replaced while reading"):
        source.meta_bytes()
    assert source.identity() != first and source.meta_bytes() == b'{"v": 2}'


def test_a_download_longer_than_its_object_is_refused(tmp_path):
    """A server listing an object of 100 kB whose GET declared 50 TiB and streamed zeros fast: neither the deadline
    (bytes kept coming) nor the read timeout ended it; the step ran until it was killed, filling scratch."""
    stop = threading.Event()

    class Endless(FakeObject):
        size = 100_000

        def do_GET(self):  # noqa: N802 - http.server's name
            if "list-type=2" in self.path:
                self.send_listing()
                return
            self.begin(50 << 40)
            zeros = bytes(65536)
            with contextlib.suppress(OSError):
                while not stop.is_set():
                    self.wfile.write(zeros)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    try:
        with serving(Endless) as port:
            env = {**s3_env(port, TMPDIR=str(scratch)), "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
            res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", "s3://b/g.parquet",
                                  "--out", str(tmp_path / "index")], env=env, capture_output=True, text=True,
                                 timeout=120)
    finally:
        stop.set()
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert (f"s3://b/g.parquet: the S3 endpoint http://127.0.0.1:{port} sent more than the object's 100,000 bytes "
            "(its HEAD) while downloading; refused") in errors[0], errors
    assert list(scratch.iterdir()) == [] and not (tmp_path / "index").exists()


def test_a_web_server_answering_every_request_with_a_page_is_named_not_s3(tmp_path, monkeypatch, caplog):
    """An endpoint answering 200 `<html>hi</html>` to everything: its HEADs found an object at every key, its page
    parsed as an empty listing, and the key was blamed (`is a file; an index is the folder holding meta.json`,
    `is an object (a file), not an output folder`)."""
    class Page(Quiet):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.reply(200, b"<html>hi</html>", (("Content-Type", "text/html"), ("Content-Length", "15")))

        do_GET = do_PUT = do_HEAD

    gallery = tmp_path / "gallery.parquet"
    gallery.write_bytes(b"unused: refused before it is read")
    with serving(Page) as port:
        for name, value in s3_env(port).items():
            monkeypatch.setenv(name, value)
        for argv in (["search", "--index", "s3://b/index", "--query-model", "s3://b/q.pt", "--images", "s3://b/a.png"],
                     ["build-index", "--gallery", str(gallery), "--out", "s3://b/out"]):
            caplog.clear()
            assert main(argv) == 2
            assert f"the endpoint http://127.0.0.1:{port} is not an S3 server (its answer to a listing names no " \
                   "bucket" in only_error(caplog), only_error(caplog)


def test_an_endpoint_that_redirects_is_named_not_a_recursion_traceback(tmp_path, monkeypatch, caplog):
    """An endpoint answering 301 to another host: botocore asks for the bucket's region, is redirected again, and
    so on; a 2,997-line RecursionError traceback, exit 1."""
    class Redirecting(Quiet):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.reply(301, headers=(("Location", "http://127.0.0.1:9/latest/meta-data/"),))

        do_GET = do_PUT = do_HEAD

    out = tmp_path / "index"
    with serving(Redirecting) as port:
        for name, value in s3_env(port).items():
            monkeypatch.setenv(name, value)
        caplog.clear()
        assert main(["build-index", "--gallery", "s3://b/g.parquet", "--out", str(out)]) == 2
    assert (f"s3://b/g.parquet: the endpoint http://127.0.0.1:{port} answers with redirects without end while "
            "reading") in only_error(caplog)
    assert not out.exists()


@pytest.mark.parametrize("server", ["the filer of the S3 server", "a plain web server"])
def test_an_endpoint_that_is_not_s3_is_named_as_such(server, s3_server, s3_chain, tmp_path, monkeypatch, caplog):
    """AWS_ENDPOINT_URL_S3 naming an HTTP server that is not S3 read as `no such object`."""
    import http.server

    use_server(monkeypatch, s3_server)
    web = None
    if server == "a plain web server":
        web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
        threading.Thread(target=web.serve_forever, daemon=True).start()
        port = web.server_address[1]
    else:
        port = s3_server.ports["filer.port"]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    local = s3_chain.local
    try:
        for argv in (["search", "--index", f"s3://{s3_chain.bucket}/run/index", "--query-model", str(local / "q.pt"),
                      "--dataset", str(local / "d.parquet"), "--limit", "1"],
                     ["export-query", "--query-model", str(local / "q.pt"), "--out", f"s3://{s3_chain.bucket}/x.onnx"]):
            caplog.clear()
            assert main(argv) == 2
            assert f"the endpoint http://127.0.0.1:{port} is not an S3 server" in only_error(caplog)
    finally:
        if web is not None:
            web.shutdown()
            web.server_close()


def test_no_success_record_is_printed_for_an_upload_that_failed(s3_server, s3_chain, monkeypatch, caplog, capsys):
    """The record went to stdout when the step finished, before its output was uploaded: a failed upload
    left a success record behind (and exit 2)."""
    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = new_bucket(s3_server)
    argv = ["export-query", "--query-model", str(s3_chain.local / "q.pt"), "--out", f"s3://{bucket}/q.onnx"]
    throttle = Throttled(failures=1)
    events = s3_client.client().meta.events
    events.register("before-send.s3.PutObject", throttle)
    try:
        assert main(argv) == 2
    finally:
        events.unregister("before-send.s3.PutObject", throttle)
    assert throttle.answered == 1 and "SlowDown" in only_error(caplog)
    assert capsys.readouterr().out == "" and keys(s3_server, bucket) == set()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["out"] == f"s3://{bucket}/q.onnx"


def test_a_missing_aws_profile_is_named(s3_server, s3_chain, monkeypatch, caplog):
    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("AWS_PROFILE", "cmce-no-such-profile")
    out = f"s3://{s3_chain.bucket}/p.onnx"
    assert main(["export-query", "--query-model", str(s3_chain.local / "q.pt"), "--out", out]) == 2
    assert only_error(caplog) == (f"cmce export-query: {out}: AWS_PROFILE (or AWS_DEFAULT_PROFILE) names the profile "
                                  "'cmce-no-such-profile', which no AWS config or credentials file defines")


def test_the_test_server_takes_writes_in_more_buckets_than_the_suite_makes(s3_server):
    """Each bucket takes a volume of its own; `weed mini` sized its volume count by the free disk, so a machine
    with less free disk refused writes to the suite's later buckets (InternalError, not the code under test)."""
    client = s3_server.client()
    for _ in range(40):
        bucket = new_bucket(s3_server)
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
        assert read_object(s3_server, bucket, "k") == b"x"


# --- a ninth hostile round: the environment around S3 --------------------------------------------------


def test_a_missing_artifact_bucket_is_refused_before_the_experiment_or_a_run_is_made(s3_server, tmp_path,
                                                                                      monkeypatch, caplog):
    """`track-start --artifact-location s3://typo/...` pinned the experiment to the missing bucket and left a
    RUNNING run: every later track-start, the corrected one included, failed the same way."""
    from mlflow import MlflowClient

    use_server(monkeypatch, s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # MLflow's own variable names the endpoint here, as in a deployment
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server.endpoint)
    missing = f"cmce-missing-{secrets.token_hex(4)}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    track = tmp_path / "track.json"
    assert main(["track-start", "--config", str(SMOKE), "--mlflow-uri", uri, "--artifact-location",
                 f"s3://{missing}/mlflow", "--out", str(track)]) == 2
    assert f"artifact location s3://{missing}/mlflow: bucket '{missing}' does not exist" in caplog.text
    assert not track.exists()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("cmce") is None
    bucket = new_bucket(s3_server)
    assert main(["track-start", "--config", str(SMOKE), "--mlflow-uri", uri, "--artifact-location",
                 f"s3://{bucket}/mlflow", "--out", str(track)]) == 0
    experiment = client.get_experiment_by_name("cmce")
    assert experiment.artifact_location == f"s3://{bucket}/mlflow"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [json.loads(track.read_text())["run_id"]]
    assert any(k.endswith("/artifacts/config.json") for k in keys(s3_server, bucket, "mlflow/"))
    # the experiment's bucket gone later: refused naming where the experiment keeps its artifacts, no run left
    for key in keys(s3_server, bucket):
        s3_server.client().delete_object(Bucket=bucket, Key=key)
    s3_server.client().delete_bucket(Bucket=bucket)
    caplog.clear()
    assert main(["track-start", "--config", str(SMOKE), "--mlflow-uri", uri, "--out", str(tmp_path / "t2.json")]) == 2
    assert f"experiment 'cmce' keeps its artifacts at s3://{bucket}/mlflow" in caplog.text
    assert "does not exist" in caplog.text
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_dead_proxy_is_named_not_the_endpoint(s3_server, tmp_path, monkeypatch, caplog):
    """HTTP_PROXY left at a dead proxy: "cannot reach the S3 endpoint" named the endpoint, which was up."""
    use_server(monkeypatch, s3_server)
    port = free_ports(1)[0]
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://user:pw@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/gallery.parquet"
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
    assert f"{uri}: cannot reach the proxy http://***@127.0.0.1:{port} (HTTP_PROXY)" in caplog.text
    assert "pw@" not in caplog.text and not (tmp_path / "index").exists()


def test_a_stale_session_token_is_named(s3_server, tmp_path, monkeypatch, caplog):
    """A session token left beside valid keys: the error blamed the access key id, which was right."""
    use_server(monkeypatch, s3_server)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEXAMPLEexpired")
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/gallery.parquet"
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
    assert f"{uri}: " in caplog.text and "AWS_SESSION_TOKEN is set" in caplog.text
    assert "IQoJb3JpZ2luX2VjEXAMPLEexpired" not in caplog.text


def test_a_full_scratch_folder_names_the_download_and_tmpdir(s3_server, tmp_path, monkeypatch, caplog):
    """A full TMPDIR while an s3:// input downloaded: "[Errno 28] No space left on device", naming nothing."""
    if os.geteuid() != 0:
        pytest.skip("a small full file system needs mount (as root)")
    use_server(monkeypatch, s3_server)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(tiny)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tiny))  # what TMPDIR sets
        bucket = new_bucket(s3_server)
        s3_server.client().put_object(Bucket=bucket, Key="gallery.parquet", Body=secrets.token_bytes(256 << 10))
        uri = f"s3://{bucket}/gallery.parquet"
        assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
        assert f"{uri}: no space left in the scratch folder {tiny} (TMPDIR) while downloading" in caplog.text
        assert list(tiny.iterdir()) == [] and not (tmp_path / "index").exists()
    finally:
        clear_scratch()
        subprocess.run(["umount", str(tiny)], check=True)


@pytest.mark.parametrize("name", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"])
def test_whitespace_in_a_credential_is_named_not_the_endpoint(s3_server, tmp_path, monkeypatch, caplog, name):
    """A key with a trailing newline (a Kubernetes Secret made from a file): 12 s of retries, then "cannot reach
    the S3 endpoint (HTTPClientError)" while the endpoint was up."""
    use_server(monkeypatch, s3_server)
    value = os.environ.get(name) or "IQoJb3JpZ2luX2VjEXAMPLEtoken"
    monkeypatch.setenv(name, value + "\n")
    uri = f"s3://{new_bucket(s3_server)}/gallery.parquet"
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
    assert f"environment variable {name}: holds whitespace or a control character" in caplog.text
    assert value not in caplog.text and "endpoint" not in caplog.text


def test_an_output_key_over_s3s_limit_is_refused_before_any_work(s3_server, tmp_path, monkeypatch, caplog):
    """A key over 1,024 bytes was refused only at the upload (KeyTooLongError), after the whole step's work."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    long_key = "k" * 1100
    absent = tmp_path / "not-yet.parquet"  # the step would fail on it: the output check must come first
    assert main(["build-index", "--gallery", str(absent), "--out", f"s3://{bucket}/{long_key}/idx"]) == 2
    assert "the key is 1104 bytes; S3 keys are at most 1024 with the names of the folder's files" in caplog.text
    caplog.clear()
    near = "k" * 1015  # fits alone, not with the index's file names under it
    assert main(["build-index", "--gallery", str(absent), "--out", f"s3://{bucket}/{near}"]) == 2
    assert "S3 keys are at most 1024" in caplog.text
    caplog.clear()
    assert main(["combine", "--member", str(absent), "--out", f"s3://{bucket}/{long_key}.parquet"]) == 2
    assert "the key is 1108 bytes; S3 keys are at most 1024" in caplog.text and "KeyTooLong" not in caplog.text


def test_an_input_that_is_both_an_object_and_a_prefix_is_named_as_such(s3_server, tmp_path, monkeypatch, caplog):
    """`--index s3://b/both` with an object `both` and a whole index under `both/`: the object was read, and the
    error said "not a complete index ... build it again"."""
    from cmce.storage import clear_scratch, local_input

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    client = s3_server.client()
    for key in ("both", "both/meta.json", "both/ids.parquet"):
        client.put_object(Bucket=bucket, Key=key, Body=b"{}")
    uri = f"s3://{bucket}/both"
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "index")]) == 2
    assert f"{uri}: both an object and a prefix {uri}/ holding objects exist; give {uri}/ for the folder" in caplog.text
    try:
        assert sorted(p.name for p in local_input(f"{uri}/").iterdir()) == ["ids.parquet", "meta.json"]
    finally:
        clear_scratch()


@pytest.mark.parametrize("name", ["AWS_REGION", "AWS_DEFAULT_REGION"])
def test_a_region_that_is_no_region_name_is_named_as_a_setting(s3_server, tmp_path, monkeypatch, caplog, name):
    """AWS_REGION='us east 1': `s3://…: S3 error while reading: InvalidRegionError …`, a local setting framed as
    an error of the server."""
    use_server(monkeypatch, s3_server)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv(name, "us east 1")
    bucket = new_bucket(s3_server)
    caplog.clear()
    assert main(["build-index", "--gallery", f"s3://{bucket}/gallery.parquet", "--out", str(tmp_path / "idx")]) == 2
    error = only_error(caplog)
    assert f"environment variable {name}='us east 1': not a region name" in error and "S3 error" not in error
    assert not (tmp_path / "idx").exists()


def _profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, process: str) -> None:
    """An AWS profile `ci` whose credentials come from `process`, and no credentials in the environment."""
    config = tmp_path / "aws-config"
    config.write_text(f"[profile ci]\ncredential_process = {process}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ci")


def test_a_credential_process_that_prints_nothing_or_hangs_is_named(s3_server, tmp_path, monkeypatch, caplog):
    """A profile whose credential_process prints nothing: `cmce search: Expecting value: line 1 column 1 (char 0)`,
    no URI or profile named; one that hangs (`sleep 100`) kept the step silent for as long."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/gallery.parquet"
    argv = ["build-index", "--gallery", uri, "--out", str(tmp_path / "idx")]
    _profile(tmp_path, monkeypatch, "true")
    caplog.clear()
    assert main(argv) == 2
    assert f"{uri}: AWS profile 'ci': its credential_process printed no JSON credentials" in only_error(caplog)
    _profile(tmp_path, monkeypatch, "sleep 30")
    monkeypatch.setenv("CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S", "1")
    caplog.clear()
    started = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - started < 15
    assert (f"{uri}: AWS profile 'ci': its credential_process gave no credentials within 1 s "
            "(CMCE_S3_CREDENTIAL_PROCESS_TIMEOUT_S)") in only_error(caplog)
    assert not (tmp_path / "idx").exists()


def test_an_object_stored_gzip_encoded_is_decoded_and_another_coding_is_named(s3_server, tmp_path, monkeypatch):
    """An index whose meta.json was stored with `Content-Encoding: gzip` (`aws s3 cp --content-encoding gzip`):
    `not valid JSON: 'utf-8' codec can't decode byte 0x8b`, the coding never said."""
    import gzip

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    client = s3_server.client()
    meta = json.dumps({"files": {"ids.parquet": {}}}).encode()
    client.put_object(Bucket=bucket, Key="idx/meta.json", Body=gzip.compress(meta), ContentEncoding="gzip")
    client.put_object(Bucket=bucket, Key="idx/ids.parquet", Body=b"PAR1 plain")
    client.put_object(Bucket=bucket, Key="one.json", Body=gzip.compress(meta), ContentEncoding="gzip")
    client.put_object(Bucket=bucket, Key="br.json", Body=b"\x0b\x02\x80{}\x03", ContentEncoding="br")
    folder = cmce_s3.download(f"s3://{bucket}/idx", tmp_path / "idx", marker="meta.json")
    assert (folder / "meta.json").read_bytes() == meta and (folder / "ids.parquet").read_bytes() == b"PAR1 plain"
    assert cmce_s3.download(f"s3://{bucket}/one.json", tmp_path / "one.json").read_bytes() == meta
    with pytest.raises(ValueError, match=rf"s3://{bucket}/br.json: stored with Content-Encoding 'br'; only gzip"):
        cmce_s3.download(f"s3://{bucket}/br.json", tmp_path / "br.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "one.json"]  # nothing half-decoded left
    # a gzip bomb (70 MiB of zeros in ~70 KB) is refused, not decoded into scratch and memory
    client.put_object(Bucket=bucket, Key="bomb.json", Body=gzip.compress(bytes(70 << 20)), ContentEncoding="gzip")
    with pytest.raises(ValueError, match=rf"s3://{bucket}/bomb.json: .* refused as a decompression bomb"):
        cmce_s3.download(f"s3://{bucket}/bomb.json", tmp_path / "bomb.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "one.json"]


def test_an_unreachable_credentials_endpoint_is_named_not_the_s3_endpoint(s3_server, tmp_path, monkeypatch, caplog):
    """AWS_CONTAINER_CREDENTIALS_FULL_URI at a dead port, no keys: `cannot reach the S3 endpoint the configured
    endpoint`, blaming the S3 endpoint (which was up) in a garbled sentence."""
    use_server(monkeypatch, s3_server)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    dead = f"http://127.0.0.1:{free_ports(1)[0]}/creds"
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", dead)
    uri = f"s3://{new_bucket(s3_server)}/gallery.parquet"
    caplog.clear()
    assert main(["build-index", "--gallery", uri, "--out", str(tmp_path / "idx")]) == 2
    error = only_error(caplog)
    assert f"{uri}: the credentials endpoint {dead} (AWS_CONTAINER_CREDENTIALS_FULL_URI) could not be reached" in error
    assert "S3 endpoint" not in error and not (tmp_path / "idx").exists()
    monkeypatch.setattr(s3_client, "client", lambda: 1 / 0)  # no client can be made: the URL the environment names
    assert s3_client.endpoint_shown() == s3_server.endpoint


def test_a_container_credentials_host_botocore_refuses_is_named_by_its_variable(tmp_path, monkeypatch):
    """AWS_CONTAINER_CREDENTIALS_FULL_URI at a host botocore does not read from: `cmce search: Unsupported host
    'example.invalid'. Can only retrieve metadata from a loopback address…`, naming no variable."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://example.invalid/creds")
    with pytest.raises(ValueError, match=r"^environment variable AWS_CONTAINER_CREDENTIALS_FULL_URI="
                                         r"'http://example.invalid/creds': Unsupported host 'example.invalid'"):
        s3_client.client()


@pytest.mark.parametrize(("server", "signum"), [("silent", signal.SIGTERM), ("silent", signal.SIGINT),
                                                ("trickling", signal.SIGTERM)])
def test_a_stop_during_a_download_from_a_silent_server_is_not_held_by_its_retries(tmp_path, server, signum):
    """SIGTERM while a worker thread waited on a server that answers HEAD and LIST but never a GET: the step kept
    running through every retry (AWS_MAX_ATTEMPTS × read timeout; 100 s by default) before it stopped. One that
    sends the object a few bytes at a time (a slow link): the process logged its stop at once, then waited for the
    worker's read of 256 KB to end before it exited (112 s at 1.5 KB/s). A Ctrl-C (KeyboardInterrupt, Python's own
    handler) ends it as promptly."""
    got = threading.Event()

    class Silent(FakeObject):
        def do_GET(self):
            if "list-type=2" in self.path:
                self.send_listing()
                return
            got.set()
            if server == "silent":
                time.sleep(60)  # the object never comes
                return
            self.begin(4096)
            for _ in range(600):  # 5 bytes a second: the read under way never times out
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with serving(Silent) as port:
        env = s3_env(port, AWS_MAX_ATTEMPTS="5", CMCE_S3_READ_TIMEOUT_S="6", TMPDIR=str(scratch))
        returncode, took, err = stopped_when(got, ["build-index", "--gallery", "s3://b/g.parquet", "--out",
                                                   str(tmp_path / "index")], env, wait_s=0.5, signum=signum)
    # at most the read under way (6 s); five attempts took 30 s
    assert returncode == 128 + signum and took < 15, (returncode, took, err)
    assert f"interrupted ({signal.Signals(signum).name})" in err and "Traceback" not in err
    assert list(scratch.iterdir()) == [] and not (tmp_path / "index").exists()


@pytest.mark.parametrize("trickled", ["listing", "object"])
def test_a_server_trickling_its_answer_is_given_up_at_the_deadline(tmp_path, trickled):
    """An S3 endpoint that answers 200 and then sends its body a byte at a time never trips the read timeout
    (each read gets a byte): a listing, read by botocore in the step's own thread, or an object's download held
    `build-index` until it was killed. Each request, and each download's next 64 KiB, has CMCE_S3_DEADLINE_S
    (at least the read timeout + 5 s)."""
    class Trickling(FakeObject):
        size = 100000

        def do_GET(self):
            if "list-type=2" in self.path and trickled != "listing":
                self.send_listing()
                return
            self.begin(100000)
            for _ in range(600):  # 5 bytes a second, each read well within the read timeout
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    started = time.monotonic()
    with serving(Trickling) as port:
        env = {**s3_env(port, CMCE_S3_DEADLINE_S="3", CMCE_S3_READ_TIMEOUT_S="1", TMPDIR=str(scratch)),
               "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
        res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", "s3://b/g.parquet", "--out",
                              str(tmp_path / "index")], env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    action = "listing" if trickled == "listing" else "downloading"
    assert res.returncode == 2 and len(errors) == 1 and took < 40, (res.returncode, took, res.stderr[-2000:])
    assert (f"s3://b/g.parquet: no whole answer from the S3 endpoint http://127.0.0.1:{port} within 6 s while "
            f"{action} (CMCE_S3_DEADLINE_S): unreachable, silent or trickling" in errors[0]), errors
    assert list(scratch.iterdir()) == [] and not (tmp_path / "index").exists()


def test_a_stop_during_an_upload_removes_what_it_staged_after_the_upload_ends(tmp_path, s3_chain):
    """SIGTERM while a PUT's body was on its way (a slow link's proxy still relaying it): the step deleted what it
    had staged, then exited, and the PUT completed on the server after it, leaving an object nobody removes. The
    request under way is let end (its answer, within the read timeout), and what it wrote is removed after it."""

    put, events = threading.Event(), []

    class Slow(Quiet):
        protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue`, so that the client sends the body

        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.reply(200 if self.path.rstrip("/") == "/b" else 404)  # the bucket, not the output's key

        def do_GET(self):  # noqa: N802 - an empty listing: the output folder is new
            self.reply(200, EMPTY_LISTING)

        def do_DELETE(self):  # noqa: N802
            events.append(("deleted", self.path))
            self.reply(204)

        def do_PUT(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            put.set()
            time.sleep(3)  # the body still on its way
            events.append(("stored", self.path))
            self.reply(200, headers=(("ETag", '"0123"'),))

    with serving(Slow) as port:
        returncode, took, err = stopped_when(put, ["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"),
                                                   "--out", "s3://b/idx"], s3_env(port))
    assert returncode == 128 + 15 and took < 20, (returncode, took, err)
    assert err.rstrip().endswith("interrupted (SIGTERM); each output is whole or not written"), err
    stored = [path for what, path in events if what == "stored"]
    assert stored and all("/idx/.staging-" in path for path in stored), events
    for path in stored:  # each object the server stored is deleted, after it was stored
        assert events.index(("deleted", path)) > events.index(("stored", path)), events


def test_where_credentials_were_looked_for_in_vain_is_named(tmp_path, monkeypatch, caplog):
    """A credentials file variable naming a folder, or an instance-metadata endpoint that answers nothing: "no
    complete AWS credentials found" named neither, after seconds of metadata retries."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "false")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    assert main(["build-index", "--gallery", "s3://b/g.parquet", "--out", str(tmp_path / "index")]) == 2
    error = only_error(caplog)
    assert f"AWS_SHARED_CREDENTIALS_FILE='{tmp_path}' names a folder" in error, error
    assert f"AWS_CONFIG_FILE='{tmp_path / 'none'}' names no file" in error
    assert "AWS_EC2_METADATA_SERVICE_ENDPOINT=" in error and "gave none" in error


def _built_index(s3_server, s3_chain, monkeypatch, args=()):
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/idx"
    gallery = s3_chain.local / "gallery.parquet"
    assert main(["build-index", "--gallery", str(gallery), "--out", uri, *args]) == 0
    before = {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)}
    return bucket, uri, gallery, before


def test_a_stop_while_an_s3_index_uploads_leaves_the_old_one_whole(s3_server, s3_chain, monkeypatch, caplog):
    """SIGTERM while build-index replaced an s3:// index deleted its meta.json and left some files new, some old:
    the new files go up under a staging prefix, and a stop there leaves the old index as it was, nothing staged."""
    import signal

    bucket, uri, gallery, before = _built_index(s3_server, s3_chain, monkeypatch)
    real, sent = cmce_s3.upload_file, []

    def cut(path, to):
        if sent:
            signal.raise_signal(signal.SIGTERM)
        sent.append(to)
        return real(path, to)

    monkeypatch.setattr(cmce_s3, "upload_file", cut)
    caplog.clear()
    assert main(["build-index", "--gallery", str(gallery), "--out", uri, "--index-type", "hnsw"]) == 143
    assert only_error(caplog) == "cmce build-index: interrupted (SIGTERM); each output is whole or not written"
    assert ".staging-" in sent[0]
    assert {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)} == before
    assert cmce_s3.partial_uploads == []


def test_a_stop_during_the_commit_of_an_s3_index_waits_for_it(s3_server, s3_chain, monkeypatch, caplog):
    """A stop once every file is staged: the commit (server-side copies, then the marker) is finished first, so
    the new index is whole, then the step ends with the signal's status."""
    import signal

    bucket, uri, gallery, before = _built_index(s3_server, s3_chain, monkeypatch)
    real = cmce_s3.copy

    def copy_then_stop(src, dst):
        real(src, dst)
        if src.endswith("/ids.parquet"):  # once: a second signal would cut the commit
            signal.raise_signal(signal.SIGTERM)  # the handler cmce installed only records it here

    monkeypatch.setattr(cmce_s3, "copy", copy_then_stop)
    caplog.clear()
    assert main(["build-index", "--gallery", str(gallery), "--out", uri, "--index-type", "hnsw"]) == 143
    assert only_error(caplog) == "cmce build-index: interrupted (SIGTERM); each output is whole or not written"
    after = {k: read_object(s3_server, bucket, k) for k in keys(s3_server, bucket)}
    assert not any(".staging-" in k for k in after)
    assert after["idx/meta.json"] != before["idx/meta.json"]
    meta = json.loads(after["idx/meta.json"])
    assert meta["index_type"] == "hnsw", meta
    monkeypatch.setattr(cmce_s3, "copy", real)
    assert main(["search", "--index", uri, "--query-model", str(s3_chain.local / "q.pt"),
                 "--dataset", str(s3_chain.local / "d.parquet"), "--limit", "2"]) == 0


def test_a_second_stop_during_the_commit_cuts_it_and_says_so(s3_server, s3_chain, monkeypatch, caplog):
    """A commit crawling over a 60 B/s link held two Ctrl-Cs and a SIGTERM for minutes: the second signal stops
    it at once, and the last line names the folder as incomplete."""
    import signal

    bucket, uri, gallery, _ = _built_index(s3_server, s3_chain, monkeypatch)
    real = cmce_s3.copy

    def copy_then_stopped_twice(src, dst):
        real(src, dst)
        signal.raise_signal(signal.SIGINT)  # held: the commit goes on
        signal.raise_signal(signal.SIGINT)  # asked again: raised here

    monkeypatch.setattr(cmce_s3, "copy", copy_then_stopped_twice)
    caplog.clear()
    assert main(["build-index", "--gallery", str(gallery), "--out", uri]) == 130
    assert only_error(caplog) == (f"cmce build-index: interrupted (SIGINT); {uri} incomplete (its upload was cut), "
                                  "every other output whole or not written")
    left = keys(s3_server, bucket)
    assert "idx/meta.json" not in left and not any(".staging-" in k for k in left), left


def test_a_single_file_output_stopped_mid_upload_is_not_written(s3_server, s3_chain, monkeypatch, caplog):
    """`train --out s3://b/m/q.pt` stopped while its upload was on its way: the object appeared whole seconds after
    the step had said nothing was written. It goes up under a staging key and is copied into place."""
    import signal

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    real, sent = cmce_s3.upload_file, []

    def upload_then_stop(path, to):
        real(path, to)
        sent.append(to)
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cmce_s3, "upload_file", upload_then_stop)
    caplog.clear()
    argv = ["merge", str(s3_chain.local / "gallery.parquet"), "--out", f"s3://{bucket}/m/g.parquet"]
    assert main(argv) == 143
    assert only_error(caplog) == "cmce merge: interrupted (SIGTERM); each output is whole or not written"
    assert sent and "/m/.staging-" in sent[0] and keys(s3_server, bucket) == set()
    monkeypatch.setattr(cmce_s3, "upload_file", real)
    assert main(argv) == 0 and keys(s3_server, bucket) == {"m/g.parquet"}


def test_a_single_file_output_removes_what_a_killed_upload_of_it_staged(s3_server, s3_chain, monkeypatch):
    """A writer of `s3://b/m/g.parquet` killed between staging and commit left `m/.staging-<id>/g.parquet` for
    ever: a folder's replacement removed its leftovers, a single file's did not. The next upload of the same file
    removes them; another file's staging there (a writer beside it, perhaps still running) is kept."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    put = s3_server.client().put_object
    for key in ("m/.staging-dead00000001/g.parquet", "m/.staging-dead00000002/other.parquet",
                ".staging-dead00000003/g.parquet"):
        put(Bucket=bucket, Key=key, Body=b"staged by a killed writer")
    gallery = str(s3_chain.local / "gallery.parquet")
    assert main(["merge", gallery, "--out", f"s3://{bucket}/m/g.parquet"]) == 0
    assert keys(s3_server, bucket) == {"m/g.parquet", "m/.staging-dead00000002/other.parquet",
                                       ".staging-dead00000003/g.parquet"}
    assert main(["merge", gallery, "--out", f"s3://{bucket}/g.parquet"]) == 0  # at the bucket's root
    assert keys(s3_server, bucket) == {"m/g.parquet", "m/.staging-dead00000002/other.parquet", "g.parquet"}


def test_objects_named_like_staging_but_not_staged_by_cmce_are_kept(s3_server, s3_chain, monkeypatch, caplog):
    """Any `.staging-*` key was taken for an upload's leftovers: a user's `u/.staging-v2/g.parquet` was deleted by
    `merge ... --out s3://b/u/g.parquet`, even when it was the step's own input, and `.staging-keep/notes.txt`
    inside an output folder was deleted instead of refused as a file the step does not own."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    theirs = f"s3://{bucket}/u/.staging-v2/g.parquet"
    assert main(["merge", str(s3_chain.local / "gallery.parquet"), "--out", theirs]) == 0
    assert main(["merge", theirs, "--out", f"s3://{bucket}/u/g.parquet"]) == 0
    assert keys(s3_server, bucket) == {"u/.staging-v2/g.parquet", "u/g.parquet"}
    s3_server.client().put_object(Bucket=bucket, Key="v/.staging-keep/notes.txt", Body=b"mine")
    caplog.clear()
    assert main(["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"), "--out",
                 f"s3://{bucket}/v"]) == 2
    assert ".staging-keep" in caplog.text and "v/.staging-keep/notes.txt" in keys(s3_server, bucket)


def test_an_endpoint_that_freezes_mid_upload_is_said_in_one_line(s3_server, s3_chain, monkeypatch, caplog):
    """The endpoint stops answering while a step uploads: its staged objects cannot be removed either. That was a
    warning line before the error's; the error now says both."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)

    def frozen(*args):
        raise TimeoutError(f"{args[-1]}: no whole answer from the S3 endpoint within 5 s")

    monkeypatch.setattr(cmce_s3, "upload_file", frozen)
    monkeypatch.setattr(cmce_s3, "delete", frozen)
    caplog.clear()
    out = f"s3://{bucket}/m/g.parquet"
    assert main(["merge", str(s3_chain.local / "gallery.parquet"), "--out", out]) == 2
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said
    assert said[0].startswith(f"cmce merge: {out}: no whole answer from the S3 endpoint within 5 s; s3://{bucket}/m/"
                              ".staging-")
    assert "staged objects left behind" in said[0]


def test_an_s3_index_read_while_it_is_replaced_is_read_again(s3_server, s3_chain, monkeypatch, caplog):
    """A search beside a writer replacing the index got meta.json of one build and files of the next: refused as
    damaged, 4 times in 4. Such a read is downloaded again; a prefix that stays so is named, with the reason."""
    import cmce.index as cmce_index

    _, uri, _, _ = _built_index(s3_server, s3_chain, monkeypatch)
    real, calls = cmce_index._load_index, []

    def in_flux_once(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise cmce_index.IndexInFlux(f"{uri}/ids.parquet: missing, not a regular file, or does not match")
        return real(*args, **kwargs)

    monkeypatch.setattr(cmce_index, "_load_index", in_flux_once)
    assert cmce_index.load_index(uri).index.ntotal > 0 and len(calls) == 2
    monkeypatch.setattr(cmce_index, "_load_index", lambda *a, **k: (_ for _ in ()).throw(
        cmce_index.IndexInFlux(f"{uri}/ids.parquet: does not match")))
    with pytest.raises(IndexLoadError, match=r"read 3 times: is a build-index replacing it\?\)$"):
        cmce_index.load_index(uri)


def test_an_s3_prefix_given_as_a_file_is_named_a_folder(s3_server, s3_chain, monkeypatch, caplog):
    """`--gallery s3://b/idx/` (a prefix) was refused as `not a regular file (a pipe, device or socket)`."""
    _, uri, _, _ = _built_index(s3_server, s3_chain, monkeypatch)
    out = s3_chain.local.parent / "never_index"
    caplog.clear()
    assert main(["build-index", "--gallery", uri + "/", "--out", str(out)]) == 2
    assert only_error(caplog) == f"cmce build-index: {uri}: is a folder (or an S3 prefix), not a file", caplog.text
    assert not out.exists()


def test_a_failed_commit_of_an_s3_index_says_it_is_incomplete(s3_server, s3_chain, monkeypatch, caplog):
    """A copy refused half-way through the commit: the old marker is gone and S3 has no rename, so the last line
    names the folder as incomplete (readers refuse it: no marker), and nothing staged is left."""
    bucket, uri, gallery, _ = _built_index(s3_server, s3_chain, monkeypatch)

    def refused(src, dst):
        raise PermissionError(f"{src}: access denied (copying)")

    monkeypatch.setattr(cmce_s3, "copy", refused)
    caplog.clear()
    assert main(["build-index", "--gallery", str(gallery), "--out", uri]) == 2
    error = only_error(caplog)
    assert "access denied" in error and error.endswith(f"; {uri} incomplete (its upload was cut)"), error
    left = keys(s3_server, bucket)
    assert "idx/meta.json" not in left and not any(".staging-" in k for k in left)


def test_a_listing_that_never_ends_is_refused_past_a_bound(monkeypatch):
    """Every page of 1,000 new keys said there were more: `search --index s3://…` listed 1.36 M keys in 120 s, its
    memory growing, until it was killed (each page came in time, so the deadline never fired)."""
    pages = []

    class Endless(Quiet):
        def do_GET(self):  # noqa: N802 - every listing page: 1,000 new keys, and more to come
            pages.append(self.path)
            n = len(pages)
            keys = "".join(f"<Contents><Key>idx/k{n}-{i}</Key><Size>1</Size></Contents>" for i in range(1000))
            self.reply(200, ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name>'
                             f'<Prefix>idx/</Prefix><KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys>'
                             f'<IsTruncated>true</IsTruncated><NextContinuationToken>t{n}</NextContinuationToken>'
                             f'{keys}</ListBucketResult>').encode())

    monkeypatch.setattr(cmce_s3, "MAX_LISTED_KEYS", 5_000)
    with serving(Endless) as port:
        for name, value in s3_env(port).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=r"s3://b/idx: its listing goes past 5,000 objects"):
            cmce_s3.list_keys("s3://b/idx")
    assert len(pages) == 6


def test_training_to_an_s3_output_resumes_after_a_stop(s3_server, s3_chain, tmp_path, monkeypatch, caplog):
    """`cmce fit-transform --out s3://…` stopped after an epoch started over from epoch 1 when run again: its resume
    state lived in the scratch folder, removed as the command ended. It is kept as `<out>.resume` on S3 until the
    output is uploaded, and the rerun ends with the uninterrupted run's bytes. A foreign object there is refused."""
    import cmce.resume
    from cmce.resume import Resume

    use_server(monkeypatch, s3_server)
    monkeypatch.setattr(cmce.resume, "UPLOAD_EVERY_S", 0.0)  # every epoch's state uploaded (else at most once a minute)
    bucket, root = new_bucket(s3_server), s3_chain.root

    def fit(out: str) -> list[str]:
        return ["fit-transform", "--config", str(SMOKE), "--set", "transform.epochs=4", "--dataset",
                f"{root}/d.parquet", "--query-model", f"{root}/q.pt", "--gallery-model", f"{root}/g.pt", "--out", out]

    assert main(fit(str(tmp_path / "t.pt"))) == 0  # uninterrupted
    save = Resume.save

    def save_then_stop(self, *args):
        save(self, *args)
        if args[4] == 2:  # (module, optimizer, scheduler, generator, finished epochs, ...)
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Resume, "save", save_then_stop)
        assert main(fit(f"s3://{bucket}/t.pt")) == 130
    assert keys(s3_server, bucket) == {"t.pt.resume"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cmce"):
        assert main(fit(f"s3://{bucket}/t.pt")) == 0
    assert "after epoch 2 of 4" in caplog.text
    assert keys(s3_server, bucket) == {"t.pt"}  # the state removed once the output is up
    assert read_object(s3_server, bucket, "t.pt") == (tmp_path / "t.pt").read_bytes()

    with monkeypatch.context() as m:  # the output's upload fails: the state stays, and the rerun has nothing to train
        m.setattr(cmce_s3, "put_whole", lambda *_: (_ for _ in ()).throw(OSError("the endpoint went away")))
        assert main(fit(f"s3://{bucket}/v.pt")) == 2
    assert keys(s3_server, bucket) == {"t.pt", "v.pt.resume"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cmce"):
        assert main(fit(f"s3://{bucket}/v.pt")) == 0
    assert "after epoch 4 of 4" in caplog.text and keys(s3_server, bucket) == {"t.pt", "v.pt"}

    s3_server.client().put_object(Bucket=bucket, Key="u.pt.resume", Body=(s3_chain.local / "d.parquet").read_bytes())
    for extra, said in [([], f"s3://{bucket}/u.pt.resume: the resume file of --out holds a Parquet file, not a saved "
                             "training state; move it, or give another --out"),
                        (["--train-embeddings-out", f"s3://{bucket}/w.pt.resume"],
                         f"--train-embeddings-out s3://{bucket}/w.pt.resume and --out's resume file s3://{bucket}/"
                         f"w.pt.resume would write over each other")]:
        out = "u.pt" if not extra else "w.pt"
        caplog.clear()
        assert main([*fit(f"s3://{bucket}/{out}"), *extra]) == 2
        assert said in only_error(caplog) and "downloaded" not in caplog.text  # before any work
    assert keys(s3_server, bucket) == {"t.pt", "v.pt", "u.pt.resume"}
    assert read_object(s3_server, bucket, "u.pt.resume") == (s3_chain.local / "d.parquet").read_bytes()


@pytest.mark.parametrize(("argv", "said"), [
    (["export-query", "--query-model", "q.pt", "--check-index", "s3://b/idx", "--out", "s3://b/idx/q.onnx"],
     "--out s3://b/idx/q.onnx is inside the input folder --check-index s3://b/idx; write it elsewhere"),
    (["embed-gallery", "--dataset", "s3://b/m/resnet.parquet", "--query-model", "q.pt", "--gallery-model", "g.pt",
      "--transform", "t.pt", "--out", "s3://b/g.parquet", "--members-dir", "s3://b/m/"],
     "--members-dir s3://b/m/ would write over the input --dataset s3://b/m/resnet.parquet"),
    (["combine", "--members-dir", "s3://b/m", "--config", "c.yaml", "--out", "s3://b/m/g.parquet"],
     "--out s3://b/m/g.parquet is inside the input folder --members-dir s3://b/m; write it elsewhere"),
    (["embed-gallery", "--dataset", "d.parquet", "--query-model", "q.pt", "--gallery-model", "g.pt", "--transform",
      "t.pt", "--out", "s3://b/run/g.parquet", "--members-dir", "s3://b/run"],
     "--out s3://b/run/g.parquet and --members-dir s3://b/run would write over each other; give outputs apart"),
])
def test_an_s3_output_inside_an_s3_input_or_holding_one_is_refused_as_a_local_one_is(argv, said):
    """Only equal s3:// texts were compared: an output inside an input prefix (or a folder of per-model files
    written by name over the dataset in it) was taken, where the same local paths were refused."""
    from cmce.argument_paths import refuse_outputs_among_inputs
    from cmce.cli import build_parser

    with pytest.raises(ValueError) as err:
        refuse_outputs_among_inputs(build_parser().parse_args(argv))
    assert str(err.value) == said
    apart = ["build-index", "--gallery", "s3://b/run/gallery.parquet", "--out", "s3://b/run/index"]  # siblings
    assert refuse_outputs_among_inputs(build_parser().parse_args(apart)) == ["s3://b/run/gallery.parquet"]


def test_a_log_line_names_a_scratch_copy_by_its_uri(tmp_path):
    """`wrote /tmp/cmce-scratch-…/run1/data/dataset.parquet`: an s3:// run's log named files removed as it ended."""
    from cmce.errors import OneLineFormatter
    from cmce.storage import clear_scratch, stands_for

    stands_for(tmp_path / "run1", "s3://b/run1")
    record = logging.LogRecord("cmce", logging.INFO, __file__, 0, "wrote %s", (tmp_path / "run1" / "d.parquet",), None)
    try:
        assert OneLineFormatter("%(message)s").format(record) == "wrote s3://b/run1/d.parquet"
    finally:
        clear_scratch()


def test_a_run_on_s3_says_its_key_outputs_by_uri_once_uploaded_and_its_search_command_runs(s3_server, monkeypatch,
                                                                                            capsys):
    """A local `cmce run` printed its query model, index and the commands over them; an s3:// run printed none."""
    import shlex

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    root = f"s3://{bucket}/run1"
    assert main(["run", *QUICK, "--set", "kd.epochs=1", "--set", f"output_dir={root}"]) == 0
    said = capsys.readouterr().err
    assert f"query model   {root}/models/query.pt\n" in said and f"index         {root}/index\n" in said
    assert "cmce-scratch" not in said and "run1/index/meta.json" in keys(s3_server, bucket)
    search = shlex.split(next(line for line in said.splitlines() if " search " in line and "--dataset" in line))
    assert main(search[search.index("search"):]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 3 and all(hit["id"] != a["query"] for a in answers for hit in a["hits"])


def test_a_run_on_s3_checks_the_objects_already_under_its_prefix_before_any_work(s3_server, monkeypatch, tmp_path,
                                                                               caplog):
    """An s3:// `cmce run` checked its files only in its empty scratch copy: a Parquet file at a model's key was
    replaced by the model, and a foreign object in its index folder was kept beside the new index. Each is now
    refused before any work, as a local run refuses them."""
    import cmce.stages

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    root = f"s3://{bucket}/run"
    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "notes.parquet")
    monkeypatch.setattr(cmce.stages, "prepare_data", lambda *a, **kw: pytest.fail("work started"))
    for key, said in (("run/models/query.pt", f"{root}/models/query.pt: holds a Parquet file; this step writes a "
                                              "checkpoint file"),
                      ("run/index/notes.parquet", f"{root}/index: holds notes.parquet, which this step does not "
                                                  "write")):
        s3_server.client().upload_file(str(tmp_path / "notes.parquet"), bucket, key)
        caplog.clear()
        assert main(["run", *QUICK, "--set", f"output_dir={root}"]) == 2, key
        assert said in caplog.text, key
        assert read_object(s3_server, bucket, key) == (tmp_path / "notes.parquet").read_bytes()
        s3_server.client().delete_object(Bucket=bucket, Key=key)
    assert keys(s3_server, bucket) == set()


def test_the_bucket_of_an_output_is_checked_once_a_command(s3_server, s3_chain, monkeypatch):
    """Each s3:// output's bucket was checked up to three times (before the inputs, by the output's own check, as its
    scratch copy was made): three requests, and a bucket the user may not check warned about three times."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    heads = []

    def count(**_):
        heads.append(1)  # (returns None: the request is sent as usual)

    events = s3_client.client().meta.events
    events.register("before-send.s3.HeadBucket", count)
    export = ["export-query", "--query-model", str(s3_chain.local / "q.pt"), "--out"]
    try:
        assert main([*export, f"s3://{bucket}/q.onnx"]) == 0
        assert len(heads) == 1
        assert main([*export, f"s3://{bucket}/r.onnx"]) == 0
        assert len(heads) == 2  # checked again by the next command: a bucket may be gone since
    finally:
        events.unregister("before-send.s3.HeadBucket", count)


def test_a_run_folder_replaced_on_s3_never_shows_its_index_marker_beside_half_replaced_index_files(
        s3_server, monkeypatch, tmp_path):
    """`cmce run` to s3:// replaced its folder with one marker, eval/metrics.json: a rerun copied the new index files
    under the old index/meta.json, so a `cmce serve --index <run>/index` reloading then read an index whose files
    and manifest disagreed. Each marker is now deleted first and written after everything it completes."""
    from cmce.layout import RunLayout

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/run"

    def run_folder(version: str) -> Path:
        root = tmp_path / version
        for rel in ("data/dataset.parquet", "index/index.faiss", "index/ids.parquet", "index/rejected.parquet",
                    *RunLayout.COMPLETION_MARKERS):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(f"{version} {rel}")
        return root

    lay = RunLayout(tmp_path)  # the markers name the folders the run writes
    assert [tmp_path / m for m in RunLayout.COMPLETION_MARKERS] == [lay.index / "meta.json",
                                                                    lay.eval_dir / "metrics.json"]
    cmce_s3.upload_dir(run_folder("old"), uri, RunLayout.COMPLETION_MARKERS)
    seen, real = [], cmce_s3.copy

    def copy_and_look(src, dst):
        real(src, dst)
        index = {k: read_object(s3_server, bucket, k).decode().split()[0]
                 for k in keys(s3_server, bucket, "run/index/")}
        seen.append(index)

    monkeypatch.setattr(cmce_s3, "copy", copy_and_look)
    cmce_s3.upload_dir(run_folder("new"), uri, RunLayout.COMPLETION_MARKERS)
    for index in seen:  # a reader that finds the index's marker finds the files it names, all of one version
        if "run/index/meta.json" in index:
            assert set(index.values()) == {index["run/index/meta.json"]}, index
    assert len(seen) == 4  # the three index files and the dataset, by server-side copies; the markers after them
    after = {k: read_object(s3_server, bucket, k).decode() for k in keys(s3_server, bucket)}
    assert after == {f"run/{rel}": f"new {rel}" for rel in ("data/dataset.parquet", "index/index.faiss",
                                                             "index/ids.parquet", "index/rejected.parquet",
                                                             *RunLayout.COMPLETION_MARKERS)}


def test_a_commit_that_deleted_one_marker_and_failed_on_the_next_says_the_folder_is_incomplete(
        s3_server, monkeypatch, tmp_path):
    """With two markers the commit deleted eval/metrics.json, then failed deleting index/meta.json: the old run
    folder had lost its marker, but the step's last line did not call it incomplete."""
    from cmce.layout import RunLayout

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    uri = f"s3://{bucket}/run"
    local = tmp_path / "run"
    for rel in ("index/index.faiss", *RunLayout.COMPLETION_MARKERS):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_text(rel)
    cmce_s3.upload_dir(local, uri, RunLayout.COMPLETION_MARKERS)
    real = cmce_s3.delete

    def refuse_the_second(key):
        if key.endswith("index/meta.json"):
            raise OSError(f"{key}: Access Denied")
        real(key)

    monkeypatch.setattr(cmce_s3, "delete", refuse_the_second)
    monkeypatch.setattr(cmce_s3, "partial_uploads", [])
    with pytest.raises(OSError, match="Access Denied"):
        cmce_s3.upload_dir(local, uri, RunLayout.COMPLETION_MARKERS)
    assert cmce_s3.partial_uploads == [uri]


def test_an_s3_transforms_folder_holding_other_checkpoints_is_not_written_over(s3_server, s3_chain, monkeypatch,
                                                                                caplog):
    """upgrade-query-model checked that --transforms-out held only transformations on local folders only: on s3:// the
    gallery models there were overwritten with transformations, exit 0."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    local, client = s3_chain.local, s3_server.client()
    for name in ("q.pt", "g.pt"):
        client.upload_file(str(local / name), bucket, f"m/{name}")
    before = {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys(s3_server, bucket)}
    caplog.clear()
    assert main(["upgrade-query-model", *QUICK, "--dataset", str(local / "d.parquet"), "--gallery",
                 str(local / "gallery.parquet"), "--query-model", str(local / "q.pt"), "--train-embeddings",
                 str(local / "train_g.parquet"), "--transforms-out", f"s3://{bucket}/m",
                 "--out", str(local / "upgraded.parquet")]) == 2
    assert f"s3://{bucket}/m: holds g.pt, which is not a transformation" in caplog.text
    assert {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys(s3_server, bucket)} == before
    assert not (local / "upgraded.parquet").exists()


def test_fetch_data_to_an_s3_prefix_holding_files_is_refused(s3_server, monkeypatch, caplog):
    """fetch-data's importer checks the folder it fills, for s3:// an empty scratch copy: a user's digits.npz at
    the prefix was written over, exit 0. A prefix holding anything is refused; an empty one is filled."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="raw/digits.npz", Body=b"my own file")
    caplog.clear()
    assert main(["fetch-data", "--config", str(SMOKE), "--out", f"s3://{bucket}/raw"]) == 2
    assert f"s3://{bucket}/raw: holds digits.npz; fetch-data fills only an empty s3:// prefix" in caplog.text
    assert client.get_object(Bucket=bucket, Key="raw/digits.npz")["Body"].read() == b"my own file"
    assert main(["fetch-data", "--config", str(SMOKE), "--out", f"s3://{bucket}/fresh"]) == 0
    assert keys(s3_server, bucket, "fresh/") == {"fresh/digits.npz"}


def test_an_output_below_an_existing_object_is_refused(s3_server, s3_chain, monkeypatch, caplog):
    """`--out s3://b/run/q.pt/idx` beside the object `run/q.pt` made that key both an object and a prefix: every
    later reader of the model was refused (exit 0 here, exit 2 in each of them)."""
    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    s3_server.client().upload_file(str(s3_chain.local / "q.pt"), bucket, "run/q.pt")
    caplog.clear()
    assert main(["build-index", "--gallery", str(s3_chain.local / "gallery.parquet"), "--out",
                 f"s3://{bucket}/run/q.pt/idx"]) == 2
    assert f"s3://{bucket}/run/q.pt/idx: cannot be created: s3://{bucket}/run/q.pt is an object" in caplog.text
    assert keys(s3_server, bucket) == {"run/q.pt"}
