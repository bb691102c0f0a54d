"""`cmce serve` over HTTP: a real uvicorn process on 127.0.0.1, a real client (requests)."""

from __future__ import annotations

import calendar
import concurrent.futures
import contextlib
import functools
import io
import json
import logging
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from cmce.checkpoint import load_embedding_model
from cmce.cli import build_parser, main
from cmce.data.codec import decode_image
from cmce.data.loader import split_source
from cmce.data.readers import class_names
from cmce.embed import embed_batch
from cmce.index import load_index, search
from cmce.storage import file_sha256
from tests.serve_world import CLASSES, Server, b64, cmce_env, dataset, gallery_dataset, gallery_index, png, query_model

LIMITS = ["--max-queries", "4", "--max-k", "10", "--max-body-bytes", "20000"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = query_model(root / "query.pt")
    index = gallery_index(root / "work", model, root / "index")
    ds = dataset(root / "dataset.parquet")
    server = Server(["--index", str(index), "--query-model", str(model), "--dataset", str(ds), *LIMITS],
                    root / "serve.log")
    yield root, model, index, server
    server.stop()


def label_of(gallery_id: str) -> int:
    return int(gallery_id[1:]) % len(CLASSES)  # gallery_index labels row i with i % len(CLASSES)


def test_search_by_embedding_equals_the_index_search(world):
    _, model_path, index, server = world
    model = load_embedding_model(model_path)
    images = torch.from_numpy(np.stack([decode_image(png(s), 1, 8, "q") for s in range(4)]))
    queries = embed_batch(model, images)
    expected = search(load_index(index, model.sha256), queries, 7)
    res = server.search(embeddings=queries.tolist(), query_model_sha256=model.sha256, k=7)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["query_model_sha256"] == model.sha256
    for q, result in enumerate(body["results"]):
        hits = result["hits"]
        assert [h["id"] for h in hits] == expected.ids[q]
        np.testing.assert_allclose([h["score"] for h in hits], expected.scores[q], atol=1e-6)
        np.testing.assert_allclose([h["uncertainty"] for h in hits], expected.uncertainty[q], atol=1e-7)
        assert [h["label"] for h in hits] == [label_of(h["id"]) for h in hits]
        assert [h["class_name"] for h in hits] == [CLASSES[h["label"]] for h in hits]


def test_search_by_image_equals_cmce_search(world):
    root, model, index, server = world
    files = []
    for s in range(3):
        files.append(root / f"query{s}.png")
        files[-1].write_bytes(png(100 + s))
    out = subprocess.run([sys.executable, "-m", "cmce", "search", "--index", str(index), "--query-model", str(model),
                          "--images", *map(str, files), "--k", "5"], capture_output=True, text=True, env=cmce_env(),
                         timeout=300)
    assert out.returncode == 0, out.stderr
    expected = [json.loads(line) for line in out.stdout.splitlines()]
    res = server.search(images=[b64(f.read_bytes()) for f in files], k=5)
    assert res.status_code == 200, res.text
    for want, got in zip(expected, res.json()["results"], strict=True):
        assert [h["id"] for h in got["hits"]] == [h["id"] for h in want["hits"]]
        np.testing.assert_allclose([h["score"] for h in got["hits"]], [h["score"] for h in want["hits"]], atol=2e-6)
        assert [h["class_name"] for h in got["hits"]] == [CLASSES[label_of(h["id"])] for h in want["hits"]]


def test_health_readiness_and_version(world):
    _, model, index, server = world
    assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = requests.get(f"{server.url}/readyz", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    version = requests.get(f"{server.url}/version", timeout=10).json()
    meta = json.loads((index / "meta.json").read_text())
    assert version["query_model_sha256"] == file_sha256(model) == meta["query_model_sha256"]
    assert version["gallery_sha256"] == meta["gallery_sha256"] and version["index_files"] == meta["files"]
    assert [m["name"] for m in version["members"]] == ["m0", "m1"] and version["dim"] == 16
    assert ready.json()["index_version"] == version["index_version"]


def refused(server: Server, status: int, field: str, needle: str, **body) -> None:
    res = server.search(**body)
    assert res.status_code == status, res.text
    assert res.json()["field"] == field and needle in res.json()["error"], res.json()


def test_refusals_name_the_field(world):
    _, model, _, server = world
    sha, row = file_sha256(model), [0.5] * 16
    refused(server, 409, "query_model_sha256", "serves query model", embeddings=[row], query_model_sha256="a" * 64)
    refused(server, 422, "query_model_sha256", "required with embeddings", embeddings=[row])
    refused(server, 422, "embeddings[1]", "expects dimension 16", embeddings=[row, row[:15]], query_model_sha256=sha)
    refused(server, 422, "embeddings[0]", "all zeros", embeddings=[[0.0] * 16], query_model_sha256=sha)
    # over float32's range: refused, without numpy's two-line overflow warning in the server's log
    refused(server, 422, "embeddings[0]", "too large to normalise", embeddings=[[1e39] + [0.1] * 15],
            query_model_sha256=sha)
    assert "RuntimeWarning" not in server.log.read_text()
    for odd in ("1_000", True):  # a string or a boolean read as a number (200)
        refused(server, 422, "embeddings[0][3]", "valid number", embeddings=[[0.5] * 3 + [odd] + [0.5] * 12],
                query_model_sha256=sha)
    assert server.search(embeddings=[[1] * 16], query_model_sha256=sha).status_code == 200  # integers are numbers
    refused(server, 413, "embeddings", "more than the 4", embeddings=[row] * 5, query_model_sha256=sha)
    refused(server, 422, "k", "over the 10", embeddings=[row], query_model_sha256=sha, k=11)
    refused(server, 422, "k", "greater than or equal to 1", embeddings=[row], query_model_sha256=sha, k=0)
    refused(server, 422, "images[1]", "not valid base64", images=[b64(png(0)), "%%"])
    refused(server, 422, "images[0]", "corrupt or unreadable image", images=[b64(b"not an image")])
    big = io.BytesIO()
    Image.new("L", (2100, 2100)).save(big, format="PNG")  # 4.4 M pixels in a few kB: over --max-image-pixels
    refused(server, 422, "images[0]", "too many pixels", images=[b64(big.getvalue())])
    refused(server, 422, "body", "exactly one of", images=[b64(png(0))], embeddings=[row], query_model_sha256=sha)
    # images pinned to another query model than the one that would embed them (the pin was ignored: 200)
    refused(server, 409, "query_model_sha256", "images sent for query model", images=[b64(png(0))],
            query_model_sha256="0" * 64)
    for pin in ("abc", ""):  # an empty pin was ignored (200), and refused with embeddings
        refused(server, 422, "query_model_sha256", "64 hex digits", images=[b64(png(0))], query_model_sha256=pin)
    assert server.search(images=[b64(png(0))], query_model_sha256=sha).status_code == 200
    # a key given twice: the last won silently (a wrong pin, then the right one: 200)
    for body, key in ((f'{{"embeddings": [{row}], "k": 1, "k": 2, "query_model_sha256": "{sha}"}}', "k"),
                      (f'{{"embeddings": [{row}], "query_model_sha256": "{"0" * 64}", "query_model_sha256": "{sha}"}}',
                       "query_model_sha256")):
        res = requests.post(f"{server.url}/search", data=body, headers={"content-type": "application/json"}, timeout=10)
        assert res.status_code == 422 and res.json() == {
            "error": f"{key}: given twice in one JSON object; give it once", "field": key}, res.text
    refused(server, 422, "body", "exactly one of")
    refused(server, 422, "size", "Extra inputs", images=[b64(png(0))], size=3)
    for text, field, needle in (('{"embeddings": [[NaN' + ", 1" * 15 + "]], " + f'"query_model_sha256": "{sha}"}}',
                                 "embeddings[0]", "not finite"),
                                ("{", "body", "not valid JSON"), ("[1]", "body", "a JSON object")):
        res = requests.post(f"{server.url}/search", data=text, headers={"content-type": "application/json"}, timeout=10)
        assert res.status_code == 422 and res.json()["field"] == field and needle in res.json()["error"], res.text


def test_oversized_bodies_are_refused_before_parsing(world):
    server = world[3]
    for body in (b"x" * 30000, iter([b"x" * 8000] * 4)):  # declared length, then chunked (no length)
        res = requests.post(f"{server.url}/search", data=body, headers={"content-type": "application/json"},
                            timeout=10)
        assert res.status_code == 413 and res.json()["field"] == "body", res.text
    assert server.search(images=[b64(png(0))]).status_code == 200  # the server still answers


def test_class_names_from_the_dataset_columns_without_metadata(tmp_path):
    assert class_names(dataset(tmp_path / "d.parquet", with_metadata=False)) == CLASSES


def test_reload_while_clients_loop_switches_without_a_failed_request(tmp_path):
    model = query_model(tmp_path / "query.pt")
    other = query_model(tmp_path / "other.pt", seed=9)
    index = gallery_index(tmp_path / "work", model, tmp_path / "index", seed=0, prefix="a")
    server = Server(["--index", str(index), "--query-model", str(model), "--reload-interval", "0.1"],
                    tmp_path / "serve.log")
    sha, query = file_sha256(model), [[float(x) for x in np.random.default_rng(3).normal(size=16)]]
    seen: list[list[tuple[str, str]]] = [[] for _ in range(4)]
    failures: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    res = server.search(session, embeddings=query, query_model_sha256=sha, k=5)
                    if res.status_code != 200:
                        failures.append(res.text)
                        continue
                    body = res.json()
                    prefixes = {h["id"][0] for h in body["results"][0]["hits"]}
                    if len(prefixes) != 1:
                        failures.append(f"one answer mixes galleries: {body}")
                    seen[i].append((body["index_version"], prefixes.pop()))
                except requests.RequestException as err:
                    failures.append(repr(err))

    def wait_for(prefix: str) -> None:
        deadline = time.monotonic() + 60
        while not all(s and s[-1][1] == prefix for s in seen):
            assert time.monotonic() < deadline, f"clients never saw gallery {prefix!r}: {[s[-1:] for s in seen]}"
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for("a")
        gallery_index(tmp_path / "work", model, index, seed=1, prefix="b")  # build-index's swap, live
        wait_for("b")
        # an index for another query model: refused, the old one keeps serving, the error is reported
        gallery_index(tmp_path / "work", other, index, seed=2, prefix="z")
        deadline = time.monotonic() + 60
        while not (requests.get(f"{server.url}/readyz", timeout=10).json()["last_reload_error"] or ""):
            assert time.monotonic() < deadline, "the failed reload was never reported"
            time.sleep(0.05)
        time.sleep(0.3)
        gallery_index(tmp_path / "work", model, index, seed=3, prefix="c")
        wait_for("c")
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    assert failures == []
    order = "abc"
    for answers in seen:
        prefixes = [p for _, p in answers]
        assert [order.index(p) for p in prefixes] == sorted(order.index(p) for p in prefixes), "went back"
        assert len({v for v, _ in answers}) == len(set(prefixes)) == 3  # one version per gallery, never "z"
    log = server.log.read_text()
    assert "reload failed: " in log and "still serving index" in log and "built for query model" in log


def taken_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_bad_input_exits_2_with_one_line_before_serving(world, tmp_path, caplog):
    _, model, index, _ = world
    other = query_model(tmp_path / "other.pt", seed=9)
    busy = taken_port()
    cases = [
        (["--index", str(tmp_path / "missing"), "--query-model", str(model)], "missing: not a complete index"),
        (["--index", str(index), "--query-model", str(other)], "index was built for query model"),
        (["--index", str(index), "--query-model", str(tmp_path / "nope.pt")], "nope.pt"),
        (["--index", str(index), "--query-model", str(model), "--dataset", str(tmp_path / "no.parquet")],
         "no.parquet: dataset file not found"),
        (["--index", str(index), "--query-model", str(model), "--port", str(busy.getsockname()[1])],
         "cannot listen there"),
    ]
    # any free port: the port is checked first, and a server of the developer's own on 8000 failed every case
    cases = [(argv if "--port" in argv else [*argv, "--port", "0"], needle) for argv, needle in cases]
    try:
        for argv, needle in cases:
            caplog.clear()
            with caplog.at_level(logging.INFO):
                assert main(["serve", *argv]) == 2, argv
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0], (argv, errors)
            if needle == "cannot listen there":  # named before the model loads (its `computing on cpu` came first)
                assert [r.getMessage() for r in caplog.records] == errors
    finally:
        busy.close()


def test_following_the_production_alias_serves_the_promoted_query_model(tmp_path):
    """upgrade-query-model rebuilds the index for a new query model (refused while the alias names the old one);
    the promotion gate moves `production`; the server then serves the new pair without a restart."""
    pytest.importorskip("mlflow")
    from cmce.tracking import log_step, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "serve", {})
    old, new = query_model(tmp_path / "old.pt", seed=0), query_model(tmp_path / "new.pt", seed=1)
    old_sha, new_sha = file_sha256(old), file_sha256(new)
    log_step(uri, parent, "train", register=[("cmce-query", old, old_sha)])
    log_step(uri, parent, "gate", promote=[("cmce-query", old_sha)])
    index = gallery_index(tmp_path / "work", old, tmp_path / "index", prefix="o")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**cmce_env(), "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(scratch)}
    server = Server(["--index", str(index), "--query-model", "models:/cmce-query@production", "--reload-interval",
                     "0.1"], tmp_path / "serve.log", env=env)
    row = [0.5] * 16

    def served() -> str:
        return requests.get(f"{server.url}/version", timeout=10).json()["query_model_sha256"]

    try:
        assert served() == old_sha
        log_step(uri, parent, "upgrade", register=[("cmce-query", new, new_sha)])  # @candidate, not served
        gallery_index(tmp_path / "work", new, index, seed=1, prefix="n")
        deadline = time.monotonic() + 60
        while not requests.get(f"{server.url}/readyz", timeout=10).json()["last_reload_error"]:
            assert time.monotonic() < deadline, "the index for the unpromoted query model was not refused"
            time.sleep(0.05)
        assert served() == old_sha
        hits = server.search(embeddings=[row], query_model_sha256=old_sha).json()["results"][0]["hits"]
        assert hits[0]["id"][0] == "o"
        log_step(uri, parent, "gate", promote=[("cmce-query", new_sha)])
        while served() != new_sha:
            assert time.monotonic() < deadline + 60, "the server never followed the alias"
            time.sleep(0.05)
        assert server.search(embeddings=[row], query_model_sha256=old_sha).status_code == 409
        res = server.search(embeddings=[row], query_model_sha256=new_sha)
        assert res.status_code == 200 and res.json()["results"][0]["hits"][0]["id"][0] == "n"
        assert server.search(images=[b64(png(0))]).json()["query_model_sha256"] == new_sha
        # the other order: the alias moves first; its index comes later
        third = query_model(tmp_path / "third.pt", seed=2)
        third_sha = file_sha256(third)
        log_step(uri, parent, "upgrade", register=[("cmce-query", third, third_sha)])
        log_step(uri, parent, "gate", promote=[("cmce-query", third_sha)])
        while "built for query model" not in (requests.get(f"{server.url}/readyz", timeout=10).json()
                                              ["last_reload_error"] or ""):
            assert time.monotonic() < deadline + 120, "the promoted model without its index was not refused"
            time.sleep(0.05)
        assert served() == new_sha
        gallery_index(tmp_path / "work", third, index, seed=2, prefix="t")
        while served() != third_sha:
            assert time.monotonic() < deadline + 180, "the server never served the promoted model with its index"
            time.sleep(0.05)
        hits = server.search(embeddings=[row], query_model_sha256=third_sha).json()["results"][0]["hits"]
        assert hits[0]["id"][0] == "t"
        # the replaced models' downloads are removed (by the poll, just after the swap)
        removed_by = time.monotonic() + 30
        while len(downloads := [p for p in scratch.glob("cmce-scratch-*/model-*/**/*") if p.is_file()]) != 1:
            assert time.monotonic() < removed_by, downloads
            time.sleep(0.05)
        assert file_sha256(downloads[0]) == third_sha
    finally:
        server.stop()


def test_the_listening_socket_turns_nagle_off():
    """Accepted connections inherit it: without it each keep-alive answer waited for a delayed ACK (~40 ms)."""
    from cmce.serving.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()


def test_benchmark_runs_tiny_and_writes_its_section(tmp_path):
    from benchmarks.serving import main as bench

    out = tmp_path / "BENCHMARKS.md"
    assert bench(["--rows", "300", "--duration", "0.3", "--clients", "1,2", "--markdown", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "|---" not in line][1:]
    assert [r.split(" | ")[:2] for r in rows[:4]] == [["| embedding", "1"], ["| embedding", "2"],
                                                      ["| image (embedded on the server)", "1"],
                                                      ["| image (embedded on the server)", "2"]]
    assert "index rebuilt" in rows[4] and "s3:// index rebuilt" in rows[5]  # (the dev extra has the S3 server)
    for r in rows:
        answered, p50, p99, qps, failed = r.strip(" |").split(" | ")[2:]
        assert int(answered) > 0 and 0 < float(p50) <= float(p99) and float(qps) > 0 and failed == "0", r


def test_requests_shaped_past_the_schema_get_the_json_error_form(world):
    """A lone surrogate in a string made the refusal itself fail (500); JSON nested past the parser's depth
    answered FastAPI's own {"detail"} form; `"k": true` was taken as k = 1."""
    _, model, _, server = world
    sha, row = file_sha256(model), [0.5] * 16
    res = requests.post(f"{server.url}/search", data='{"embeddings": [[0.5]], "query_model_sha256": "\\ud800abc"}',
                        headers={"content-type": "application/json"}, timeout=10)
    assert 400 <= res.status_code < 500 and res.json()["field"] == "query_model_sha256", res.text
    refused(server, 422, "k", "valid integer", embeddings=[row], query_model_sha256=sha, k=True)
    refused(server, 422, "k", "valid integer", embeddings=[row], query_model_sha256=sha, k=2.5)
    refused(server, 422, "k", "valid integer", embeddings=[row], query_model_sha256=sha, k="3")
    huge = server.search(embeddings=[row], query_model_sha256=sha, k=1e308)  # not echoed back as 309 digits
    assert huge.status_code == 422 and huge.json()["field"] == "k" and len(huge.text) < 300, huge.text
    three = server.search(embeddings=[row], query_model_sha256=sha, k=3.0)  # JSON does not tell 3.0 from 3
    assert three.status_code == 200 and len(three.json()["results"][0]["hits"]) == 3, three.text
    deep = "[" * 100_000 + "]" * 100_000
    res = requests.post(f"{server.url}/search", data=f'{{"embeddings": {deep}}}',
                        headers={"content-type": "application/json"}, timeout=30)
    assert 400 <= res.status_code < 500 and res.json()["field"] in ("body", "embeddings"), res.text[:300]
    assert server.search(embeddings=[row], query_model_sha256=sha).status_code == 200  # still serving


@pytest.mark.parametrize("flags, needle", [
    (["--reload-interval", "0.0001"], "argument --reload-interval: must be 0 (never) or within [0.1, 3600]"),
    (["--max-queries", "4096", "--max-k", "10000"], "allows more than 1,000,000 hits in one answer"),
    (["--max-body-bytes", "1000", "--max-bodies-bytes", "999"], "--max-bodies-bytes 999 is less than --max-body-bytes"),
    (["--max-image-pixels", "50000000"], "--max-request-pixels 32000000 is less than --max-image-pixels 50000000"),
])
def test_limits_that_no_machine_could_serve_are_refused(world, caplog, capsys, flags, needle):
    _, model, index, _ = world
    caplog.clear()
    with caplog.at_level(logging.INFO):
        try:
            rc = main(["serve", "--index", str(index), "--query-model", str(model), "--port", "0", *flags])
        except SystemExit as exc:  # the parser's refusals
            rc = exc.code
    assert rc == 2
    assert needle in capsys.readouterr().err + " ".join(r.getMessage() for r in caplog.records)


def test_an_index_folder_broken_for_good_is_reported_and_the_old_one_served(world, tmp_path):
    """A meta.json unreadable once is a swap in progress; unreadable poll after poll, the folder is broken."""
    from cmce.serving.state import UNREADABLE_POLLS, Holder, QueryModelSource

    _, model, index, _ = world
    folder = Path(shutil.copytree(index, tmp_path / "index"))
    holder = Holder(folder, QueryModelSource(str(model), Path))
    served = holder.current
    (folder / "meta.json").write_text("{garbage")
    began = int(time.time())
    for _ in range(UNREADABLE_POLLS - 1):
        assert not holder.check() and holder.last_error is None
        time.sleep(0.6)
    assert not holder.check() and "meta.json: unreadable since " in holder.last_error
    # since the first poll that found it unreadable (said once, a count of polls stayed the one it was said with)
    said = re.search(r"since (\S+ \S+) UTC", holder.last_error)[1]
    assert calendar.timegm(time.strptime(said, "%Y-%m-%d %H:%M:%S")) in (began, began + 1), (said, began)
    assert holder.current is served
    # a 2 GB sparse meta.json was read whole on every poll (2 GB more memory) and never reported
    shutil.copy(index / "meta.json", folder / "meta.json")
    assert not holder.check() and holder.last_error is None
    with open(folder / "meta.json", "wb") as f:
        f.truncate(2 << 30)
    for _ in range(UNREADABLE_POLLS):
        holder.check()
    assert "more than such a file holds" in holder.last_error and holder.current is served


def test_health_probes_may_use_head(world):
    _, _, _, server = world
    for path in ("/healthz", "/readyz", "/version"):
        res = requests.head(f"{server.url}{path}", timeout=10)
        assert res.status_code == 200 and not res.content, path


def test_the_sha256_tag_is_the_whole_digest_in_any_case(world):
    _, model, _, server = world
    sha, row = file_sha256(model), [0.5] * 16
    refused(server, 422, "query_model_sha256", "whole sha256: 64 hex digits", embeddings=[row],
            query_model_sha256=sha[:12])
    assert server.search(embeddings=[row], query_model_sha256=sha.upper()).status_code == 200


@pytest.mark.parametrize("raw", [
    b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 9\r\n\r\nabc",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # a TLS ClientHello sent to the plain port
    b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # a request line over h11's buffer limit
    b"GET /healthz\r\n",  # HTTP/0.9: no version, no head to end (closed unanswered once the head deadline passed)
])
def test_requests_that_are_not_http_get_the_json_error_form(world, raw):
    """uvicorn answered these itself, in plain text, before any route saw them."""
    server = world[3]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(raw)
        reply = b""
        try:
            while chunk := conn.recv(65536):
                reply += chunk
        except ConnectionResetError:  # closed with part of the request unread: the kernel resets after the answer
            pass
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower(), reply
    error = json.loads(body)
    assert error["field"] == "request" and error["error"].startswith("request: malformed HTTP"), error


def readyz(server: Server) -> dict:
    return requests.get(f"{server.url}/readyz", timeout=10).json()


def wait_for_ready(server: Server, what: str, test: Callable[[dict], bool], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while not test(state := readyz(server)):
        assert time.monotonic() < deadline, f"{what}: /readyz stayed {state}; log: {server.log.read_text()[-2000:]}"
        time.sleep(0.05)
    return state


def test_an_index_copied_in_file_by_file_is_served_once_whole(tmp_path):
    """meta.json first, the other files later: the half-copied folder is refused, and each change of its files
    is tried again (a failed version was kept refused until meta.json changed, so the whole one never loaded)."""
    model = query_model(tmp_path / "query.pt")
    index = gallery_index(tmp_path / "work", model, tmp_path / "index", prefix="a")
    other = gallery_index(tmp_path / "work", model, tmp_path / "other", seed=1, prefix="b")
    server = Server(["--index", str(index), "--query-model", str(model), "--reload-interval", "0.1"],
                    tmp_path / "serve.log")
    served = readyz(server)["index_version"]
    try:
        shutil.rmtree(index)
        index.mkdir()
        shutil.copy(other / "meta.json", index)
        state = wait_for_ready(server, "the half-copied index refused",
                               lambda s: "ids.parquet: missing" in (s["last_reload_error"] or ""))
        assert state["index_version"] == served
        shutil.copy(other / "ids.parquet", index)
        wait_for_ready(server, "the folder tried again once a file came",
                       lambda s: "index.faiss: missing" in (s["last_reload_error"] or ""))
        for name in ("index.faiss", "rejected.parquet"):
            shutil.copy(other / name, index)
        state = wait_for_ready(server, "the whole index loaded", lambda s: s["index_version"] != served)
        assert state["last_reload_error"] is None and state["reloads"] == 1
        hits = server.search(embeddings=[[0.5] * 16], query_model_sha256=file_sha256(model)).json()
        assert {h["id"][0] for h in hits["results"][0]["hits"]} == {"b"}
    finally:
        server.stop()


def test_a_reload_error_is_cleared_once_the_folder_holds_the_served_version_again(tmp_path):
    """The folder replaced by a file (reported after its polls), then the very version served put back: the
    error stayed in /readyz for good, as nothing was loaded."""
    model = query_model(tmp_path / "query.pt")
    index = gallery_index(tmp_path / "work", model, tmp_path / "index")
    saved = shutil.copytree(index, tmp_path / "saved")
    server = Server(["--index", str(index), "--query-model", str(model), "--reload-interval", "0.1"],
                    tmp_path / "serve.log")
    served = readyz(server)["index_version"]
    try:
        shutil.rmtree(index)
        index.write_text("not a folder")
        wait_for_ready(server, "the broken folder reported",
                       lambda s: "meta.json: unreadable since" in (s["last_reload_error"] or ""))
        index.unlink()
        shutil.copytree(saved, index)
        state = wait_for_ready(server, "the error cleared", lambda s: s["last_reload_error"] is None)
        assert state["index_version"] == served and state["reloads"] == 0
    finally:
        server.stop()
    assert "serve: resolved: " in server.log.read_text()


def test_a_damaged_file_under_an_unchanged_meta_json_is_shown_while_the_loaded_copy_serves(tmp_path):
    """index.faiss cut to 100 bytes under the served folder, meta.json unchanged: the poll compared meta.json's
    version only, /readyz said `last_reload_error: null` while the folder a restart loads was broken."""
    model = query_model(tmp_path / "query.pt")
    index = gallery_index(tmp_path / "work", model, tmp_path / "index")
    whole = (index / "index.faiss").read_bytes()
    server = Server(["--index", str(index), "--query-model", str(model), "--reload-interval", "0.1"],
                    tmp_path / "serve.log")
    served = readyz(server)["index_version"]
    try:
        with open(index / "index.faiss", "r+b") as f:
            f.truncate(100)
        state = wait_for_ready(server, "the damage shown", lambda s: s["last_reload_error"] is not None)
        assert "index.faiss: missing, not a regular file, or does not match the checksum in meta.json" in \
            state["last_reload_error"] and "the loaded copy is served" in state["last_reload_error"]
        assert state["index_version"] == served and state["ready"]
        hits = server.search(embeddings=[[0.5] * 16], query_model_sha256=file_sha256(model))
        assert hits.status_code == 200  # the copy in memory still answers
        (index / "index.faiss").write_bytes(whole)
        state = wait_for_ready(server, "the damage cleared", lambda s: s["last_reload_error"] is None)
        assert state["index_version"] == served and state["reloads"] == 0
    finally:
        server.stop()


def test_an_unreadable_alias_is_shown_while_it_lasts_and_logged_once(tmp_path):
    """The production alias deleted: the same warning was logged on every poll, /readyz did not mention it, and
    an old error stayed there after the alias came back."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from cmce.tracking import log_step, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "serve", {})
    model = query_model(tmp_path / "query.pt")
    log_step(uri, parent, "train", register=[("cmce-query", model, file_sha256(model))])
    log_step(uri, parent, "gate", promote=[("cmce-query", file_sha256(model))])
    index = gallery_index(tmp_path / "work", model, tmp_path / "index")
    server = Server(["--index", str(index), "--query-model", "models:/cmce-query@production", "--reload-interval",
                     "0.1"], tmp_path / "serve.log", env={**cmce_env(), "MLFLOW_TRACKING_URI": uri})
    served = readyz(server)["index_version"]
    try:
        client = MlflowClient(uri, uri)
        version = client.get_model_version_by_alias("cmce-query", "production").version
        client.delete_registered_model_alias("cmce-query", "production")
        state = wait_for_ready(server, "the deleted alias shown",
                               lambda s: "cannot read the alias" in (s["last_reload_error"] or ""))
        assert "models:/cmce-query@production" in state["last_reload_error"] and state["index_version"] == served
        time.sleep(1.0)  # ten polls more, each finding the alias still gone
        client.set_registered_model_alias("cmce-query", "production", version)
        state = wait_for_ready(server, "the restored alias cleared", lambda s: s["last_reload_error"] is None)
        assert state["index_version"] == served and state["reloads"] == 0
    finally:
        server.stop()
    log = server.log.read_text()
    warned = [line for line in log.splitlines() if " WARNING " in line and "cannot read the alias" in line]
    assert len(warned) == 1 and log.count("serve: resolved: ") == 1, log


def test_an_unexpected_poll_error_is_logged_once_and_cleared(world, tmp_path, caplog):
    """The poller logged an error no reload anticipated (with its traceback) on every poll."""
    from cmce.serving.state import Holder, QueryModelSource

    _, model, index, _ = world
    holder = Holder(Path(shutil.copytree(index, tmp_path / "index")), QueryModelSource(str(model), Path))
    failing = threading.Event()
    failing.set()
    real_check = holder.check

    def check() -> bool:
        if failing.is_set():
            raise RuntimeError("boom")
        return real_check()

    holder.check = check
    with caplog.at_level(logging.INFO):
        holder.start(0.01)
        try:
            deadline = time.monotonic() + 30
            while "boom" not in (holder.last_error or ""):
                assert time.monotonic() < deadline, "the poll error was never reported"
                time.sleep(0.01)
            time.sleep(0.2)  # many more polls, each failing the same way
            failing.clear()
            while holder.last_error is not None:
                assert time.monotonic() < deadline, "the poll error was never cleared"
                time.sleep(0.01)
        finally:
            holder.stop()
    reported = [(r.levelno, bool(r.exc_info)) for r in caplog.records if "boom" in r.getMessage()]
    assert reported == [(logging.ERROR, True), (logging.INFO, False)]  # once, with its traceback; then resolved


def test_an_unchanged_folder_is_not_parsed_again_on_each_poll(world, tmp_path, monkeypatch):
    """A 100 MB meta.json kept an idle server at 30 % CPU: every 0.5 s poll read and parsed it again."""
    import cmce.serving.index_source as index_source
    from cmce.serving.state import Holder, QueryModelSource

    _, model, index, _ = world
    folder = Path(shutil.copytree(index, tmp_path / "index"))
    holder = Holder(folder, QueryModelSource(str(model), Path))
    reads = []
    real = index_source.read_regular
    monkeypatch.setattr(index_source, "read_regular", lambda path, limit=None: reads.append(path) or real(path, limit))
    for _ in range(5):
        assert holder.check() is False
    assert len(reads) == 1
    meta = folder / "meta.json"
    meta.write_text(meta.read_text() + " ")  # the same version, rewritten: read once more, nothing reloaded
    for _ in range(3):
        assert holder.check() is False
    assert len(reads) == 2 and holder.reloads == 0


def promoted_until(model: Path, released: threading.Event, wait_s: float, must_release: bool):
    """(source, version): a query-model source following an alias now at "v1"; set version[0] = "v2" to promote,
    whose download hangs until `released` is set (a store that stopped answering), at most `wait_s` seconds."""
    from cmce.checkpoint import load_embedding_model
    from cmce.serving.state import QueryModelSource

    version = ["v1"]

    class Promoted(QueryModelSource):
        def key(self) -> str:
            return version[0]

        def load(self, key: str):
            if key == "v2" and not released.wait(wait_s):
                assert not must_release, "the store was never answering again"
            return load_embedding_model(model)

    return Promoted(str(model), Path), version


def test_a_download_the_poll_waits_on_is_shown_while_it_lasts(world, tmp_path):
    """An S3 outage while the server downloaded a promoted model held the poll in MLflow's own retries for minutes,
    and /readyz said `last_reload_error: null`, `reloads: 0` all that time."""
    from cmce.serving.state import Holder

    _, model, index, _ = world
    released = threading.Event()
    source, version = promoted_until(model, released, 30, must_release=True)
    holder = Holder(Path(shutil.copytree(index, tmp_path / "index")), source)
    assert holder.in_progress is None
    version[0] = "v2"
    holder.start(0.01)
    try:
        deadline = time.monotonic() + 30
        while (busy := holder.in_progress) is None or busy["for_s"] < 0.2:
            assert time.monotonic() < deadline, "the download was never shown"
            time.sleep(0.01)
        assert busy["what"] == "loading the query model v2" and holder.reloads == 0
        released.set()
        while holder.reloads == 0:
            assert time.monotonic() < deadline, "the promoted model was never served"
            time.sleep(0.01)
        assert holder.current.model_key == "v2"
    finally:
        released.set()
        holder.stop()
    assert holder.in_progress is None  # the poll thread has ended


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGRTMIN + 2, signal.SIGIO,
                                    signal.SIGABRT])
def test_sigterm_stops_the_server_cleanly_and_removes_its_downloads(tmp_path, signum):
    """uvicorn re-raised SIGTERM after its graceful shutdown: the process died with the model it had downloaded
    from the registry left in its scratch folder, and exit status 143. SIGALRM and SIGXCPU (a CPU-time limit),
    and a real-time signal (`kill -s RTMIN+2`), killed it at once, the download left behind."""
    pytest.importorskip("mlflow")
    from cmce.tracking import log_step, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = start_parent_run(uri, "serve", {})
    model = query_model(tmp_path / "q.pt")
    log_step(uri, parent, "train", register=[("cmce-query", model, file_sha256(model))])
    index = gallery_index(tmp_path / "work", model, tmp_path / "index")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    server = Server(["--index", str(index), "--query-model", "models:/cmce-query@candidate"], tmp_path / "serve.log",
                    env={**cmce_env(), "MLFLOW_TRACKING_URI": uri, "TMPDIR": str(scratch)})
    assert [p.name for p in scratch.iterdir() if p.name.startswith("cmce-scratch-")]  # the download is there
    server.proc.send_signal(signum)
    try:
        assert server.proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        server.stop()
    assert not [p for p in scratch.iterdir() if p.name.startswith("cmce-scratch-")]


def test_sighup_under_load_stops_the_server_gracefully(world, tmp_path):
    """SIGHUP was raised inside the event loop: one request got a 500 (or a dropped connection) and the server
    kept running."""
    _, model, index, _ = world
    server = Server(["--index", str(index), "--query-model", str(model)], tmp_path / "serve.log")
    sha, row = file_sha256(model), [0.5] * 16
    failures, stop = [], threading.Event()

    def client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    res = server.search(session, embeddings=[row], query_model_sha256=sha)
                except requests.ConnectionError:
                    return  # the server has closed
                if res.status_code != 200:
                    failures.append(res.status_code)

    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGHUP)
    try:
        assert server.proc.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()[-2000:]
    finally:
        stop.set()
        thread.join()
        server.stop()
    assert failures == [] and "Traceback" not in (tmp_path / "serve.log").read_text()


def raw_exchange(server: Server, raw: bytes) -> tuple[bytes, bytes, bool]:
    """Send `raw` on one connection: the response head, its body, and whether the server then closed it."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(raw)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < content_length(reply):
            reply += conn.recv(65536)
        conn.settimeout(2)
        try:
            closed = conn.recv(1) == b""
        except (TimeoutError, ConnectionResetError) as err:
            closed = isinstance(err, ConnectionResetError)
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.lower(), body, closed


def content_length(reply: bytes) -> int:
    for line in reply.partition(b"\r\n\r\n")[0].lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_http_framing_below_the_routes_is_read_or_refused_naming_its_part(world):
    """An absolute-form target (which servers must accept) was 404; a body framed by both Content-Length and
    chunked coding was answered on a connection kept open; a gzip body was "error parsing the body"; 404 and 405
    named the field `body`; a key holding a lone surrogate was "content-type application/json expected"."""
    _, model, _, server = world
    body = json.dumps({"embeddings": [[0.5] * 16], "query_model_sha256": file_sha256(model)}).encode()
    length = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    head, answer, closed = raw_exchange(server, f"POST {server.url}/search HTTP/1.1\r\nHost: x\r\n".encode()
                                        + length + body)
    assert head.startswith(b"http/1.1 200") and json.loads(answer)["results"], answer
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    head, answer, closed = raw_exchange(server, b"POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                        + length + chunked)
    assert head.startswith(b"http/1.1 400") and closed and json.loads(answer)["field"] == "request", answer
    import gzip

    res = requests.post(f"{server.url}/search", data=gzip.compress(body), timeout=10,
                        headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert res.status_code == 415 and res.json() == {"error": "content-encoding: gzip: only an uncompressed body "
                                                               "is read", "field": "content-encoding"}
    res = requests.get(f"{server.url}/search", timeout=10)
    assert res.status_code == 405 and res.json()["field"] == "method" and res.headers["allow"] == "POST", res.text
    res = requests.post(f"{server.url}/serch", data=body, timeout=10)
    assert res.status_code == 404 and res.json()["field"] == "path" and "POST /search" in res.json()["error"]
    res = requests.post(f"{server.url}/search", data=body[:-1] + b', "\\ud800x": 1}', timeout=10,
                        headers={"content-type": "application/json"})
    assert res.status_code == 422 and "is not valid Unicode" in res.json()["error"], res.text
    res = requests.post(f"{server.url}/search", data=body, timeout=10, headers={
        "content-type": "application/json", "connection": "Upgrade", "upgrade": "websocket"})
    assert res.status_code == 200 and "WebSocket" not in server.log.read_text()  # no advice to install a library
    # HTTP/2 with prior knowledge (its preface): a 404 naming the path `/*`, which the client never sent
    head, answer, closed = raw_exchange(server, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert head.startswith(b"http/1.1 505") and closed and json.loads(answer) == {
        "error": "request: HTTP/2.0 is not spoken here: HTTP/1.1 only (no HTTP/2 with prior knowledge)",
        "field": "request"}, answer
    # a chunk declaring 2^64 bytes: 408 "too slow" once the body deadline passed; 413 as its size line arrives now
    head, answer, closed = raw_exchange(server, b"POST /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                        b"Content-Type: application/json\r\n\r\n10000000000000000\r\n")
    assert head.startswith(b"http/1.1 413") and closed and json.loads(answer) == {
        "error": f"request body over 20000 bytes (--max-body-bytes): a chunk declares {2 ** 64} bytes",
        "field": "body"}, answer
    assert server.search(**json.loads(body)).status_code == 200  # still serving


def test_a_client_that_half_closes_after_its_request_gets_the_answer(world):
    """A client that shut its writing side once the request was sent (shutdown(SHUT_WR), `nc -N`) got no answer in
    9 tries of 10: the server closed the connection at the EOF. A request cut short by the EOF is still dropped.
    Two requests pipelined before the half-close are both answered."""
    _, model, _, server = world
    body = json.dumps({"embeddings": [[0.5] * 16], "query_model_sha256": file_sha256(model)}).encode()
    request = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(body))
    host, port = server.url.removeprefix("http://").split(":")
    closing = request.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")  # got no answer either
    for sent, answered in [(request + body, True)] * 10 + [(closing + body, True)] * 5 + [(request + body[:-1], False)]:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(sent)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):  # the server closes the connection after the answer
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") == answered and (reply == b"") != answered, reply
        if answered:
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["results"], reply
    # pipelined: two requests in one write, then the half-close; the second was dropped 6 times in 10 (GET+GET: 4 in 5)
    version = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    for sent in [request + body + version, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + version] * 10:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(sent)
            conn.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        assert reply.count(b"HTTP/1.1 200 OK") == 2 and b"index_version" in reply.rpartition(b"\r\n\r\n")[2], reply


@pytest.mark.parametrize("signals", [1, 2])
def test_a_stop_while_a_body_is_still_arriving_cuts_it_without_a_traceback(world, tmp_path, signals):
    """A client sending its body slowly when SIGTERM came: after the graceful timeout the request was cancelled
    with a 25-line "Exception in ASGI application" traceback in the log of a routine stop. A second SIGTERM (a
    service manager's, when a stop hangs) was ignored: it now ends the 10 s graceful wait at once."""
    _, model, index, _ = world
    server = Server(["--index", str(index), "--query-model", str(model)], tmp_path / "serve.log")
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"embeddings\": ")
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        try:
            if signals == 2:  # once the first is taken: two signals before the handler runs are one
                deadline = time.monotonic() + 30
                while "Shutting down" not in (tmp_path / "serve.log").read_text() and time.monotonic() < deadline:
                    time.sleep(0.05)
                server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=30 if signals == 1 else 8) == 0  # the graceful wait is 10 s
        finally:
            server.stop()
        reply = conn.recv(65536)
    log = (tmp_path / "serve.log").read_text()
    assert reply.startswith(b"HTTP/1.1 503") and b"the server stopped before the request body arrived" in reply
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]


def test_a_reloaded_index_is_checked_against_the_dataset_as_the_first_was(tmp_path, caplog):
    """--dataset was checked against the index at start-up only: an index rebuilt from another dataset was swapped
    in, and its hits carried the first dataset's class names."""
    model = query_model(tmp_path / "query.pt")
    ours, theirs = gallery_dataset(tmp_path / "ours.parquet", prefix="a"), gallery_dataset(tmp_path / "theirs.parquet",
                                                                                             prefix="b")
    index = gallery_index(tmp_path / "work", model, tmp_path / "index", prefix="a", source=split_source(ours, "test"))
    server = Server(["--index", str(index), "--query-model", str(model), "--dataset", str(ours), "--reload-interval",
                     "0.1"], tmp_path / "serve.log")
    served, sha = readyz(server)["index_version"], file_sha256(model)
    try:
        gallery_index(tmp_path / "work", model, index, seed=1, prefix="b", source=split_source(theirs, "test"))
        state = wait_for_ready(server, "the index of another dataset refused or served",
                               lambda s: s["reloads"] or s["last_reload_error"])
        assert state["reloads"] == 0 and state["index_version"] == served, state
        assert f"--dataset {ours}: its 'test' split is not the one" in state["last_reload_error"]
        hits = server.search(embeddings=[[0.5] * 16], query_model_sha256=sha).json()["results"][0]["hits"]
        assert {h["id"][0] for h in hits} == {"a"}
        time.sleep(0.5)  # polls that find the same refused folder
        gallery_index(tmp_path / "work", model, index, seed=2, prefix="a", source=split_source(ours, "test"))
        state = wait_for_ready(server, "the dataset's own rebuilt index served", lambda s: s["reloads"] == 1)
        assert state["last_reload_error"] is None and state["index_version"] != served
        # the dataset file replaced too: the class names served are still those read at start-up
        shutil.copy(theirs, ours)
        gallery_index(tmp_path / "work", model, index, seed=3, prefix="b", source=split_source(theirs, "test"))
        state = wait_for_ready(server, "the index of the replaced dataset refused", lambda s: s["last_reload_error"])
        assert state["reloads"] == 1 and "class names would be wrong" in state["last_reload_error"]
    finally:
        server.stop()
    refusals = [line for line in server.log.read_text().splitlines() if "class names would be wrong" in line]
    assert [" ERROR " in line for line in refusals] == [True, False, True] and "resolved: " in refusals[1], refusals
    ours = gallery_dataset(tmp_path / "ours.parquet", prefix="a")
    with caplog.at_level(logging.INFO):  # at start-up too: one line, before the server starts
        assert main(["serve", "--index", str(index), "--query-model", str(model), "--dataset", str(ours),
                     "--port", "0"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "class names would be wrong" in errors[0], errors


def test_images_are_searched_upright_as_their_exif_orientation_says(world):
    """A phone photo stores its pixels turned with an EXIF Orientation tag: it was searched as stored, so it found
    other hits than the same picture stored upright."""
    server = world[3]
    upright = np.random.default_rng(5).integers(0, 256, (8, 8), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to view
    plain, turned = io.BytesIO(), io.BytesIO()
    Image.fromarray(upright).save(plain, format="PNG")
    Image.fromarray(np.rot90(upright)).save(turned, format="PNG", exif=exif)
    res = server.search(images=[b64(plain.getvalue()), b64(turned.getvalue())], k=5)
    assert res.status_code == 200, res.text
    want, got = (r["hits"] for r in res.json()["results"])
    assert [h["id"] for h in got] == [h["id"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-6)


def test_an_animation_is_searched_by_its_first_frame_and_the_answer_says_so(world):
    """`cmce search` warned that only an animation's first frame is searched; the server answered it in silence."""
    server = world[3]
    first, later = (np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8) for seed in (6, 7))
    still, animated = io.BytesIO(), io.BytesIO()
    Image.fromarray(first).save(still, format="PNG")
    Image.fromarray(first).save(animated, format="GIF", save_all=True, append_images=[Image.fromarray(later)])
    res = server.search(images=[b64(still.getvalue()), b64(animated.getvalue())], k=5)
    assert res.status_code == 200, res.text
    assert res.json()["warnings"] == ["images[1]: an animation or a multi-page image; its first frame is searched",
                                      "images[1]: 8×8 palette, read as the query model's 8×8 grey"]
    want, got = (r["hits"] for r in res.json()["results"])
    assert [h["id"] for h in got] == [h["id"] for h in want]
    assert server.search(images=[b64(still.getvalue())], k=5).json()["warnings"] == []


def test_an_image_of_another_size_or_mode_is_converted_and_the_answer_says_so(world):
    """`cmce search` warned that a colour photo or an image of another size is converted to what the query model
    reads (a colour photo searched with a grey model is a likely mistake); the server converted in silence."""
    server = world[3]
    grey = np.random.default_rng(8).integers(0, 256, (8, 8), dtype=np.uint8)
    pngs = []
    for img in (Image.fromarray(grey), Image.fromarray(grey).convert("RGB"), Image.fromarray(grey).resize((16, 12))):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(b64(buf.getvalue()))
    res = server.search(images=pngs, k=5)
    assert res.status_code == 200, res.text
    assert res.json()["warnings"] == ["images[1]: 8×8 RGB, read as the query model's 8×8 grey",
                                      "images[2]: 16×12 grey, read as the query model's 8×8 grey"]
    exact, colour = (r["hits"] for r in res.json()["results"][:2])
    assert [h["id"] for h in colour] == [h["id"] for h in exact]  # grey as RGB converts back to the same pixels


@pytest.mark.parametrize("stdout", ["closed", "a pipe nobody reads"])
def test_serve_with_standard_output_closed_logs_where_it_listens(world, tmp_path, stdout):
    """`cmce serve ... >&-` (how some init scripts start daemons): printing the URL to the missing standard output
    was a traceback, and no server; `cmce serve ... | true` died of the broken pipe without a word (exit 141)."""
    _, model, index, _ = world
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "cmce", "serve", "--index", str(index), "--query-model", str(model), "--port", "0"]
    with open(log, "w") as stderr:
        if stdout == "closed":
            proc = subprocess.Popen(["sh", "-c", 'exec "$@" >&-', "sh", *command], stderr=stderr, env=cmce_env())
        else:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=cmce_env())
            proc.stdout.close()  # the reader is gone before the server writes its line
    try:
        deadline = time.monotonic() + 120
        while not (found := re.search(r" on (http://\S+)$", log.read_text(), re.MULTILINE)):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        while True:
            try:
                assert requests.get(f"{found[1]}/readyz", timeout=10).json()["ready"] is True
                break
            except (requests.ConnectionError, requests.Timeout):  # bound, not yet listening; slow to answer
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in log.read_text(), log.read_text()[-2000:]


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_an_ipv6_address_is_printed_as_a_usable_url(world, tmp_path):
    """`--host ::1` printed http://::1:PORT, which no client can parse."""
    _, model, index, _ = world
    server = Server(["--index", str(index), "--query-model", str(model), "--host", "::1"], tmp_path / "serve.log",
                    timeout_s=60)
    try:
        assert server.url.startswith("http://[::1]:")
        assert requests.get(f"{server.url}/healthz", timeout=10).json() == {"status": "ok"}
    finally:
        server.stop()


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_host_is_refused_not_every_interface(world, capsys, host):
    """`--host "$HOST"` with HOST unset bound every interface (0.0.0.0) without a word."""
    _, model, index, _ = world
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", "--index", str(index), "--query-model", str(model), "--host", host])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --host: empty" in err and err.count("\n") == 1, err


def test_wrapped_base64_and_numbers_past_the_digit_limit(world):
    """Base64 wrapped every 76 characters (what `base64 FILE` prints) was "not valid base64"; an integer of 5,000
    digits (over Python's limit) was 400 "There was an error parsing the body", hiding the cause."""
    _, model, _, server = world
    text = b64(png(7, size=64))  # long enough to wrap many times
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    assert "\n" in wrapped.strip()
    res, ref = server.search(images=[wrapped.replace("\n", "\r\n")], k=3), server.search(images=[text], k=3)
    assert res.status_code == ref.status_code == 200 and res.json() == ref.json(), res.text
    refused(server, 422, "images[0]", "not valid base64", images=[wrapped.replace("\n", "\n*")])
    sha = file_sha256(model)
    for body in ('{"images": ["x"], "k": 1' + "0" * 5000 + "}",
                 f'{{"embeddings": [[{"9" * 5001}' + ", 1" * 15 + f']], "query_model_sha256": "{sha}"}}'):
        res = requests.post(f"{server.url}/search", data=body, headers={"content-type": "application/json"}, timeout=10)
        assert res.status_code == 422 and res.json() == {
            "error": f"body: not readable JSON: a number with more than {sys.get_int_max_str_digits()} digits",
            "field": "body"}, res.text
    assert server.search(embeddings=[[0.5] * 16], query_model_sha256=sha).status_code == 200  # still serving


def test_the_digit_limit_holds_when_the_environment_lifts_it(world, tmp_path):
    """PYTHONINTMAXSTRDIGITS=0 in the server's environment: a request holding a 3-million-digit number was converted
    for 175 s in the event loop, and no client got any answer meanwhile."""
    _, model, index, _ = world
    server = Server(["--index", str(index), "--query-model", str(model)], tmp_path / "serve.log",
                    env={**cmce_env(), "PYTHONINTMAXSTRDIGITS": "0"})
    try:
        body = '{"embeddings": [[0.5]], "k": 1' + "0" * 1_000_000 + "}"  # unlimited: ~20 s of conversion
        started = time.monotonic()
        res = requests.post(f"{server.url}/search", data=body, headers={"content-type": "application/json"},
                            timeout=60)
        assert res.status_code == 422 and "a number with more than 4300 digits" in res.json()["error"], res.text
        assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_a_pipe_named_meta_json_is_reported_not_waited_on(world, tmp_path):
    """meta.json replaced by a FIFO: the reload thread blocked in open() for ever, reporting nothing and never
    loading the good build swapped in after it."""
    import os

    from cmce.serving.state import UNREADABLE_POLLS, Holder, QueryModelSource

    _, model, index, _ = world
    folder = Path(shutil.copytree(index, tmp_path / "index"))
    holder = Holder(folder, QueryModelSource(str(model), Path))
    served = holder.current
    (folder / "meta.json").unlink()
    os.mkfifo(folder / "meta.json")

    def polls(n: int) -> None:
        done = threading.Event()
        thread = threading.Thread(target=lambda: ([holder.check() for _ in range(n)], done.set()), daemon=True)
        thread.start()
        assert done.wait(30), "a poll blocked on the pipe"

    polls(UNREADABLE_POLLS)
    assert "not a regular file" in holder.last_error and holder.current is served
    shutil.rmtree(folder)
    shutil.copytree(index, folder)
    polls(1)
    assert holder.last_error is None and holder.current.version == served.version


@pytest.fixture
def in_process_server(world):
    """`make(**ServeOptions fields)`: the server serve() runs, in a thread of this process (its state visible); of
    world's index, or of what `holder` serves."""
    import uvicorn

    from cmce.serving.app import create_app
    from cmce.serving.server import ServeOptions, _Server, bind, url, uvicorn_config
    from cmce.serving.state import Holder, QueryModelSource

    _, model, world_index, _ = world
    running = []

    def make(body_wait_s: float = 5.0, holder: Holder | None = None, **fields) -> tuple[uvicorn.Server, str]:
        opts = ServeOptions(world_index, str(model), **fields)
        holder = holder or Holder(world_index, QueryModelSource(str(model), Path))
        app = create_app(holder, opts.limits, body_wait_s=body_wait_s)
        sock = bind("127.0.0.1", 0)
        server = _Server(uvicorn_config(app, opts))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return server, url(sock)

    yield make
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(30)
        sock.close()


def closed_by_server(conn: socket.socket, within_s: float) -> bytes | None:
    """What the server sent before closing `conn` within `within_s` seconds; None if it kept it open."""
    conn.settimeout(within_s)
    reply = b""
    try:
        while chunk := conn.recv(65536):
            reply += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return reply


def test_connections_that_send_nothing_are_capped_and_closed(in_process_server):
    """20,200 connections that never sent a byte exhausted the file descriptors: /healthz timed out, the idle
    sockets were never closed, and asyncio logged a traceback ~10,000 times a second. Now a connection that has not
    sent a whole request head within the deadline is closed, and those over the cap are answered 503 at once."""
    server, url = in_process_server(max_connections=8, head_timeout_s=3.0)  # ample time to fill the cap first
    host, port = url.removeprefix("http://").split(":")
    address = (host, int(port))
    first = time.monotonic()
    held = [socket.create_connection(address, timeout=10) for _ in range(7)]
    try:
        held[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # a head that never ends (slowloris)
        keep_alive = socket.create_connection(address, timeout=10)  # answered, then trickles its next head
        held.append(keep_alive)
        keep_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert keep_alive.recv(65536).startswith(b"HTTP/1.1 200")
        keep_alive.sendall(b"GET /heal")
        deadline = time.monotonic() + 10
        while len(server.server_state.connections) < 8:
            assert time.monotonic() < deadline, "the connections never reached the server"
            time.sleep(0.01)
        for _ in range(5):  # over the cap: answered and closed at once, not held
            with socket.create_connection(address, timeout=10) as extra:
                reply = closed_by_server(extra, 5)
            assert reply is not None and reply.startswith(b"HTTP/1.1 503"), reply
            assert json.loads(reply.partition(b"\r\n\r\n")[2])["field"] == "request"
        for conn in held:  # each closed once its deadline passed, the half-sent heads included
            assert closed_by_server(conn, 10) is not None
        assert time.monotonic() - first >= 3.0  # at the deadline, not at once
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        for conn in held:
            conn.close()


def test_refusals_of_the_http_layer_are_counted_in_metrics(in_process_server):
    """Answers written by the HTTP layer before any request reached the app (over the connection cap, an HTTP/0.9
    line, a head h11 cannot parse) were in no counter: an operator could not alert on a full connection cap."""
    server, url = in_process_server(max_connections=4)
    host, port = url.removeprefix("http://").split(":")
    address = (host, int(port))
    for raw in (b"GET /healthz\r\n", b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"):
        with socket.create_connection(address, timeout=10) as conn:
            conn.sendall(raw)
            assert (closed_by_server(conn, 10) or b"").startswith(b"HTTP/1.1 400")
    held = [socket.create_connection(address, timeout=10) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while len(server.server_state.connections) < 4:
            assert time.monotonic() < deadline, "the connections never reached the server"
            time.sleep(0.01)
        with socket.create_connection(address, timeout=10) as extra:
            assert (closed_by_server(extra, 5) or b"").startswith(b"HTTP/1.1 503")
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 10
    while server.server_state.connections:  # else the scrape itself may find the cap full, and be refused
        assert time.monotonic() < deadline, "the server never saw the held connections close"
        time.sleep(0.01)
    scrape = requests.get(f"{url}/metrics", timeout=10).text
    counted = dict(re.findall(r'^cmce_http_refused_total\{reason="(\w+)"\} (\S+)$', scrape, re.M))
    assert counted == {"http09": "1.0", "malformed": "1.0", "connection_cap": "1.0"}, scrape


def test_accept_errors_out_of_descriptors_are_logged_once_a_minute(caplog):
    """asyncio logs each failed accept() with its traceback; out of file descriptors that was ~10,000 a second
    (108 MB of log in 25 s)."""
    import asyncio

    from cmce.serving.server import accept_errors_logged_once_per_minute

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.INFO, "asyncio"), accept_errors_logged_once_per_minute():
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
            loop.call_exception_handler({"message": "another loop error", "exception": OSError(1, "other")})
    finally:
        loop.close()
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == 2 and "another loop error" in records[1].getMessage(), [r.getMessage() for r in records]
    assert records[0].exc_info is None and "Too many open files" in records[0].getMessage()
    assert "\n" not in records[0].getMessage()


def test_a_superseded_download_of_the_followed_model_is_removed(world, tmp_path):
    """A server following models:/cmce-query@candidate while the alias moved 62 times kept a downloaded copy of
    every model it had loaded (37) until it stopped. Only cmce's own downloads go, never a file the user named."""
    from cmce.serving.state import Holder, QueryModelSource
    from cmce.storage import scratch_dir, stands_for

    _, model, index, _ = world
    other, third = query_model(tmp_path / "other.pt", seed=1), query_model(tmp_path / "third.pt", seed=2)
    refused = tmp_path / "refused.pt"
    refused.write_bytes(b"not a checkpoint")  # a version the load check refuses (a transformation, say)
    files = {"v1": model, "v2": model, "v3": other, "v4": third, "v5": model, "v6": refused}  # v2, v5: one file
    downloads: dict[str, Path] = {}

    def download(key: str) -> Path:
        if key.endswith("v5"):
            return model  # the user's own file, not a download
        folder = Path(tempfile.mkdtemp(prefix="model-", dir=scratch_dir()))
        path = folder / "query.pt"
        shutil.copyfile(files[key.rsplit("/", 1)[1]], path)
        stands_for(path, key)
        downloads[key] = folder
        return path

    alias = ["v1"]

    class Alias(QueryModelSource):
        def key(self) -> str:
            return f"models:/cmce-query/{alias[0]}"

    holder = Holder(Path(shutil.copytree(index, tmp_path / "index")), Alias("models:/cmce-query@candidate", download))

    def left() -> set[str]:
        return {key.rsplit("/", 1)[1] for key, folder in downloads.items() if folder.exists()}

    for version, served, kept in [("v2", "v2", {"v2"}),  # swapped in: v1's copy removed
                                  ("v3", "v2", {"v2", "v3"}),  # no index for v3 yet: its model waits
                                  ("v4", "v2", {"v2", "v4"}),  # the alias moved on before: v3's copy removed
                                  ("v2", "v2", {"v2"}),  # moved back to the served one: v4's copy removed
                                  ("v5", "v5", set()), ("v1", "v1", {"v1"}),
                                  ("v6", "v1", {"v1"})]:  # refused: its copy removed at once (8 piled up)
        alias[0] = version
        holder.check()
        assert holder.current.model_key.endswith(served) and left() == kept, (version, left())
    assert model.is_file() and holder.current.model.sha256 == file_sha256(model)


def test_an_eps_query_is_refused_naming_its_format(world):
    """A query image in EPS made the server run Ghostscript on it (a 500 with a traceback when gs failed)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(buf, format="EPS")
    res = world[3].search(images=[b64(buf.getvalue())])
    assert res.status_code == 422 and res.json()["error"].startswith("images[0]: EPS images are not decoded"), res.text


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR announces width x height pixels and which holds none: a bomb as its header shows it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(
        b"IEND", b"")


def test_every_oversize_image_is_refused_naming_max_image_pixels(world):
    """A PNG announcing 20000 × 20000 (or a GIF whose logical screen is 60000 × 60000) was refused by Pillow's own
    bomb check, in its words: "exceeds limit of 178956970 pixels, could be decompression bomb DOS attack"; one of
    2100 × 2100 named --max-image-pixels. Every image over the flag's limit is now refused naming it."""
    gif = io.BytesIO()
    Image.new("L", (1, 1)).save(gif, format="GIF")
    screen = gif.getvalue()[:6] + struct.pack("<HH", 60000, 60000) + gif.getvalue()[10:]
    for data, pixels in ((png_header(2100, 2100), "2100 × 2100 = 4,410,000"), (png_header(3000, 3000), "9,000,000"),
                         (png_header(20000, 20000), "400,000,000"), (screen, "3,600,000,000")):
        res = world[3].search(images=[b64(png(0)), b64(data)])
        assert res.status_code == 422 and res.json() == {
            "error": f"images[1]: refused, too many pixels: {pixels}, over --max-image-pixels (4,000,000)",
            "field": "images[1]"}, res.text


def test_a_newline_in_the_index_path_cannot_split_the_url_line(world, tmp_path):
    """`cmce serve --index "idx<newline>on http:/evil:1"` printed the URL line in two: its start was forgeable."""
    _, model, index, _ = world
    forged = tmp_path / "idx\non http:"
    forged.mkdir()
    copy = shutil.copytree(index, forged / "evil:1")
    server = Server(["--index", str(copy), "--query-model", str(model)], tmp_path / "serve.log")  # reads one line
    try:
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        server.stop()


def test_the_connection_cap_and_head_deadline_are_flags(world, tmp_path):
    """`cmce serve --max-connections N --head-timeout S`: the cap and deadline the server applies, set from the
    command line (a file limit alone decided them)."""
    _, model, index, _ = world
    server = Server(["--index", str(index), "--query-model", str(model), "--max-connections", "1", "--head-timeout",
                     "3"], tmp_path / "serve.log")
    host, port = server.url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            time.sleep(0.3)  # reaches the server before the next one, which must come before its 3 s are out
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                reply = closed_by_server(extra, 5)
            assert reply is not None and reply.startswith(b"HTTP/1.1 503"), reply
            started = time.monotonic()
            assert closed_by_server(idle, 10) is not None and time.monotonic() - started < 7  # not the default 10 s
    finally:
        server.stop()


def test_a_request_body_that_stops_arriving_is_timed_out_like_a_head(in_process_server, world):
    """A whole head with `Content-Length: 100` and no body got round the head deadline: 20 such connections held
    the cap for as long as the client liked (one still open after 90 s). A body that keeps coming is read."""
    server, url = in_process_server(head_timeout_s=1.0)
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as stalled:
        stalled.sendall(head % 100 + b'{"embeddings": ')
        started = time.monotonic()
        reply = closed_by_server(stalled, 10)
        assert reply is not None and reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 5, reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["field"] == "body"
    _, model, _, _ = world
    body = json.dumps({"embeddings": [[0.5] * 16], "query_model_sha256": file_sha256(model)}).encode()
    body += b" " * (2000 - len(body))  # 2000 bytes: 2 s + 4 s at 500 bytes/s for the whole body, 3.6 s needed
    _, url = in_process_server(head_timeout_s=2.0)  # each 0.6 s gap well within it (on a loaded machine too), the
    host, port = url.removeprefix("http://").split(":")  # whole body past it
    part = len(body) // 6 + 1
    with socket.create_connection((host, int(port)), timeout=10) as steady:
        steady.sendall(head % len(body))
        for k in range(0, len(body), part):  # each part within the deadline of the one before
            time.sleep(0.6)
            steady.sendall(body[k:k + part])
        assert steady.recv(65536).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("framing,piece", [
    (b"Content-Length: 100", b" "),
    (b"Transfer-Encoding: chunked", b"1;" + b"e" * 598 + b"\r\n \r\n")])  # 600 bytes on the wire, 1 of body
def test_a_request_body_trickled_under_the_deadline_is_timed_out_by_its_rate(in_process_server, framing, piece):
    """A body sent one byte every few seconds met the deadline of each chunk and held its connection for ever: after
    `--head-timeout` a body must come at 500 bytes/s on average; bytes of the body, not chunk extensions."""
    server, url = in_process_server(head_timeout_s=1.0)
    host, port = url.removeprefix("http://").split(":")
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n\r\n" % framing
    with socket.create_connection((host, int(port)), timeout=10) as trickle:
        trickle.sendall(head)
        started, reply = time.monotonic(), None
        for _ in range(20):  # 6 s at most; each piece well within the 1 s deadline of the one before
            time.sleep(0.3)
            try:
                trickle.sendall(piece)
            except OSError:
                break
            trickle.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                reply = trickle.recv(65536)
                break
        trickle.settimeout(10)
        reply = reply or trickle.recv(65536)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3, reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["field"] == "body"


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


def test_a_body_in_chunks_too_small_is_refused_once_they_are_many(world):
    """2 MB of body sent as one-byte chunks (12 MB on the wire) took 14 s of the server's CPU, /healthz waiting up to
    4.7 s, and was answered 200. Past 4096 pieces a body must average 64 bytes a piece: a 400 naming why, at once.
    A short body in tiny chunks, and a long one in chunks of a few hundred bytes, are read as before."""
    _, model, _, server = world
    host, port = server.url.removeprefix("http://").split(":")
    query = json.dumps({"embeddings": [[0.5] * 16], "query_model_sha256": file_sha256(model)}).encode()
    head = b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    long = query + b" " * (19000 - len(query))  # under --max-body-bytes 20000
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head + chunked(long, 1))
        reply = closed_by_server(conn, 10)
    assert reply is not None and reply.startswith(b"HTTP/1.1 400"), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2]) == {
        "error": "body: sent in more than 4096 pieces (chunks or packets) averaging under 64 bytes; send it in larger "
                 "chunks", "field": "body"}
    for body, size in ((query, 1), (long, 256)):
        head_, answer, _ = raw_exchange(server, head + chunked(body, size))
        assert head_.startswith(b"http/1.1 200") and json.loads(answer)["results"], (size, answer)


def test_a_client_that_never_reads_its_answers_is_closed_after_the_deadline(in_process_server, world):
    """22 clients pipelining searches with large answers and never reading them held the connection cap for as long
    as they liked: other clients got 503 for 110 s, and the server's memory grew."""
    server, url = in_process_server(head_timeout_s=1.0)
    host, port = url.removeprefix("http://").split(":")
    _, model, _, _ = world
    body = json.dumps({"embeddings": [[0.5 + i / 100] * 16 for i in range(64)], "k": 100,
                       "query_model_sha256": file_sha256(model)}).encode()
    request = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
               % len(body)) + body  # answered with ~0.5 MB: far more than the socket buffers hold
    with socket.socket() as stalled:
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((host, int(port)))
        stalled.settimeout(10)  # a server that stops reading this socket blocks sendall: TimeoutError
        started, cut = time.monotonic(), None
        try:
            while time.monotonic() - started < 20:  # answers pile up far past what socket buffers hold
                stalled.sendall(request)
        except OSError as err:
            cut = err
        assert isinstance(cut, ConnectionResetError | BrokenPipeError), cut  # closed by the server
        assert time.monotonic() - started < 10
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200


def test_a_trailing_slash_is_not_redirected_to_the_host_the_request_names(world):
    """`GET /healthz/` with `Host: evil.example` was answered 307 to http://evil.example/healthz (and a POST to
    /search/ likewise): a client that follows redirects sent its query to whatever host the request named."""
    _, _, _, server = world
    for method, path in (("GET", "/healthz/"), ("POST", "/search/")):
        res = requests.request(method, f"{server.url}{path}", headers={"host": "evil.example"}, timeout=10,
                               allow_redirects=False)
        assert res.status_code == 404 and "location" not in res.headers and res.json()["field"] == "path", res.text


def test_a_stop_does_not_wait_for_ever_on_a_blocked_poll(world, tmp_path, caplog):
    """A promoted model downloading from an S3 store that had stopped answering held the stopped server for 150 s
    (it logged `stopped (SIGTERM)`, then swapped the new model in, then exited)."""
    from cmce.serving.state import Holder

    _, model, index, _ = world
    blocked = threading.Event()  # the store never answers (within the test)
    source, version = promoted_until(model, blocked, 60, must_release=False)
    holder = Holder(Path(shutil.copytree(index, tmp_path / "index")), source)
    version[0] = "v2"
    holder.start(0.01)
    deadline = time.monotonic() + 30
    while holder.in_progress is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        holder.stop(wait_s=0.5)
    assert time.monotonic() - started < 5 and "stopping without the reload poll, still loading the query model v2" \
        in caplog.text
    blocked.set()


def test_a_password_in_a_registry_url_is_not_shown_by_readyz_or_the_log(world, caplog):
    """A poll failure of a server following models:/NAME@ALIAS at `http://alice:pw@…`: /readyz showed the password
    to every client, and the log line held it too."""
    from cmce.serving.state import Holder, QueryModelSource

    _, model, index, _ = world
    holder = Holder(index, QueryModelSource(str(model), Path))
    with caplog.at_level(logging.WARNING):
        holder._report("alias", "models:/q@c: API request to http://alice:s3cr3tPW@127.0.0.1:1/api failed",
                       logging.WARNING)
    assert holder.last_error == "models:/q@c: API request to http://***@127.0.0.1:1/api failed"
    assert "s3cr3tPW" not in caplog.text


def test_bodies_held_at_once_are_bounded_and_a_request_without_room_is_told_to_retry(in_process_server, world,
                                                                                      monkeypatch):
    """40 requests of 8 MB at once took up to 1.5 GB (a parsed body is several times its size): the whole bodies being
    answered at once are bounded by --max-bodies-bytes; a request finding no room waits, then is answered 503 with
    Retry-After, and is served once room is given back. A body still arriving holds no room."""
    import cmce.serving.app as app_module
    from cmce.serving.queries import Limits

    release, entered = threading.Event(), threading.Event()
    real_answer = app_module.answer

    def held_answer(served, queries, k, classes):  # the first search holds its body's room until released
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return real_answer(served, queries, k, classes)

    monkeypatch.setattr(app_module, "answer", held_answer)
    server, url = in_process_server(body_wait_s=1.0, limits=Limits(max_body_bytes=2000, max_bodies_bytes=2000))
    _, model, _, _ = world
    body = json.dumps({"embeddings": [[0.5] * 16], "query_model_sha256": file_sha256(model)}).encode()
    big = body + b" " * (2000 - len(body))
    post = functools.partial(requests.post, f"{url}/search", headers={"content-type": "application/json"}, timeout=30)
    host, port = url.removeprefix("http://").split(":")
    with concurrent.futures.ThreadPoolExecutor(1) as pool, socket.create_connection((host, int(port))) as arriving:
        arriving.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body[:10]))  # still arriving: no room held
        holding = pool.submit(post, data=big)
        assert entered.wait(30)  # its whole body is held while it is answered
        started = time.monotonic()
        waited = post(data=body)
        assert waited.status_code == 503 and waited.headers["retry-after"] == "1", waited.text
        assert waited.json()["field"] == "body" and "--max-bodies-bytes (2000 bytes)" in waited.json()["error"]
        assert time.monotonic() - started >= 1.0  # it waited for room before giving up
        release.set()
        assert holding.result().status_code == 200
        arriving.sendall(body[10:])
        assert arriving.recv(65536).startswith(b"HTTP/1.1 200")
    for data in (body, iter([body[:50], body[50:]])):  # room given back; a chunked body too
        answered = post(data=data)
        assert answered.status_code == 200, answered.text


def test_a_body_budget_serves_in_turn_and_holds_nothing_it_gave_up():
    import asyncio

    from cmce.serving.budget import BodyBudget

    async def scenario() -> None:
        budget = BodyBudget(100)
        assert await budget.take(60, 0.1) and budget.free == 40
        assert not await budget.take(50, 0.05) and budget.free == 40  # no room in time: nothing held
        big = asyncio.create_task(budget.take(90, 5))
        await asyncio.sleep(0.01)
        small = asyncio.create_task(budget.take(10, 5))  # fits, but waits its turn behind the first
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done()
        budget.give(60)
        assert await big and await small and budget.free == 0
        cancelled = asyncio.create_task(budget.take(30, 5))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        budget.give(100)  # in the same turn as the cancel: room granted to a request that is gone is given back
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert budget.free == 100

    asyncio.run(scenario())


def test_a_request_without_a_body_never_waits_behind_queued_bodies():
    """Every request passes the body budget; a probe's GET (0 bytes) queued behind bodies waiting for room, and past
    the wait was answered 503: with the budget full a few seconds, Kubernetes took the pod out of service."""
    import asyncio

    from cmce.serving.budget import BodyBudget

    async def scenario() -> None:
        budget = BodyBudget(100)
        assert await budget.take(100, 0.1)
        waiting = asyncio.create_task(budget.take(100, 5))
        await asyncio.sleep(0.01)
        assert await asyncio.wait_for(budget.take(0, 5), 0.5) and not waiting.done()
        budget.give(100)
        assert await waiting and budget.free == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(("body", "status", "field", "said"), [
    ({"embeddings": [["x"] * 100_000] * 3, "query_model_sha256": "0" * 64}, 422, "embeddings[0][0]", "valid number"),
    # over --max-queries as well: refused for that before pydantic reads a row
    ({"embeddings": [0.5] * 100_000, "query_model_sha256": "0" * 64}, 413, "embeddings", "more than the 64"),
    ({"images": list(range(100_000))}, 413, "images", "more than the 64"),
    ({"images": [], **{f"x{i}": 1 for i in range(100_000)}}, 422, "x0", "Extra inputs"),
])
def test_a_body_of_many_wrong_values_is_refused_by_its_first_with_one_error(in_process_server, body, status, field,
                                                                            said):
    """pydantic listed every wrong value of a body on the event loop, though the answer names the first: 5 MB of
    strings where numbers go stalled every request and probe for 13 s, and 8 MB took 2.3 GB."""
    from pydantic import ValidationError

    from cmce.serving.app import SearchRequest

    with pytest.raises(ValidationError) as err:
        SearchRequest.model_validate(body)
    assert err.value.error_count() <= 2  # the field's list, and `null`, the union's other member
    _, url = in_process_server()
    res = requests.post(f"{url}/search", json=body, timeout=60)
    assert res.status_code == status and res.json()["field"] == field and said in res.json()["error"], res.text


@pytest.mark.parametrize(("field", "rows"), [("embeddings", [["x"]] + [[1]] * 1_000_000), ("images", [7] * 65)])
def test_too_many_queries_are_refused_before_their_rows_are_validated(in_process_server, field, rows):
    """--max-queries was checked by the route, after pydantic had validated every row on the event loop: 2 M
    one-value rows (8 MB) held every request and probe for 1.3 s, then got the 413. Now a body over it is refused as
    it is read: its first row, invalid, is not reached (a 422 naming it would mean the rows were validated first)."""
    _, url = in_process_server()
    res = requests.post(f"{url}/search", json={field: rows, "query_model_sha256": "0" * 64}, timeout=60)
    assert res.status_code == 413 and res.json()["field"] == field, res.text
    assert f"{len(rows)} queries, more than the 64 a request may hold (--max-queries)" in res.json()["error"]


def test_the_pixels_of_a_requests_images_together_are_bounded_before_any_is_decoded(in_process_server,
                                                                                      monkeypatch):
    """Each image was bounded alone (--max-image-pixels): 64 PNGs of 2000×2000 in 1.7 MB were all decoded, 5.6 s
    of CPU for one request. Their headers' pixels together are now held to --max-request-pixels, before a decode."""
    import cmce.serving.queries
    from cmce.serving.queries import Limits

    big = io.BytesIO()
    Image.new("L", (1000, 1000)).save(big, format="PNG")  # 1 M pixels in a few kB
    _, url = in_process_server(limits=Limits(max_request_pixels=2_500_000))
    assert requests.post(f"{url}/search", json={"images": [b64(big.getvalue())] * 2}, timeout=60).status_code == 200
    decoded = []
    real, load = cmce.serving.queries.decode_image_as_found, Image.Image.load
    monkeypatch.setattr(cmce.serving.queries, "decode_image_as_found",
                        lambda *a, **kw: decoded.append(1) or real(*a, **kw))
    monkeypatch.setattr(Image.Image, "load", lambda self, *a: decoded.append(2) or load(self, *a))  # Pillow's decode
    res = requests.post(f"{url}/search", json={"images": [b64(big.getvalue())] * 3}, timeout=60)
    assert res.status_code == 413 and res.json() == {
        "error": "images: 3,000,000 pixels in images[0..2], more than the 2,500,000 a request may hold "
                 "(--max-request-pixels)", "field": "images"}, res.text
    assert not decoded


def test_a_sized_body_over_the_limit_arriving_with_its_head_is_refused_as_such(in_process_server):
    """A Content-Length body over --max-body-bytes sent with its head was refused 413 as "a chunk declares 0
    bytes": there is no chunk. Refused as the same body arriving later is."""
    from cmce.serving.queries import Limits

    _, url = in_process_server(limits=Limits(max_body_bytes=1000))
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        # past the limit and still arriving (1,500 of 2,000 bytes): all of it read at once by the server, so its
        # close after the answer leaves nothing unread (which would reset the connection and lose the answer)
        conn.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2000\r\n\r\n" + b" " * 1500)
        reply = closed_by_server(conn, 10)
    assert reply is not None and reply.startswith(b"HTTP/1.1 413"), reply
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error == "body: request body over 1000 bytes (--max-body-bytes)", error


def scraped(base: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """GET /metrics parsed by prometheus_client's parser of the format it came in: {(sample, sorted labels): value}."""
    from prometheus_client import parser
    from prometheus_client.openmetrics import parser as openmetrics

    answer = requests.get(f"{base}/metrics", headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    fmt = openmetrics if answer.headers["content-type"].startswith("application/openmetrics-text") else parser
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in fmt.text_string_to_metric_families(answer.text) for s in family.samples}


def test_metrics_count_every_answer_and_show_the_served_index(world, in_process_server, tmp_path):
    """GET /metrics (Prometheus): requests by endpoint, method and status (a middleware's refusal too; a path or
    method outside the API as "other", whatever the client sends), queries by input, and the served index as the
    reload poll leaves it: items, version, reloads, a problem while /readyz shows one."""
    from cmce.serving.queries import Limits
    from cmce.serving.state import UNREADABLE_POLLS, Holder, QueryModelSource, Served

    _, model, index, _ = world
    folder = Path(shutil.copytree(index, tmp_path / "index"))
    holder = Holder(folder, QueryModelSource(str(model), Path))
    _, base = in_process_server(holder=holder, limits=Limits(max_body_bytes=4096))
    sha = requests.get(f"{base}/version", timeout=10).json()["query_model_sha256"]
    assert requests.post(f"{base}/search", json={"embeddings": [[0.1] * 16, [0.3] * 16],
                                                  "query_model_sha256": sha, "k": 2}, timeout=10).status_code == 200
    assert requests.post(f"{base}/search", json={"images": [b64(png(1))], "k": 2}, timeout=10).status_code == 200
    assert requests.post(f"{base}/search", data=b"x" * 5000, timeout=10).status_code == 413  # BodyLimit's refusal
    for path in ("/nope", "/nope/1", "/search/../etc", "/docs"):  # /docs: a page of CDN scripts, off
        assert requests.get(f"{base}{path}", timeout=10).status_code == 404
    schema = requests.get(f"{base}/openapi.json", timeout=10).json()  # the API's schema, for client generators
    assert set(schema["paths"]) == {"/search", "/healthz", "/readyz", "/version", "/metrics"}
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) == 5  # GET and HEAD shared one id: client generators refuse duplicates
    assert {"images", "embeddings", "query_model_sha256", "k"} <= set(schema["components"]["schemas"]["SearchRequest"]
                                                                      ["properties"])
    assert requests.request("BREW", f"{base}/version", timeout=10).status_code == 405
    with pytest.MonkeyPatch.context() as mp:  # a fault of the server's own: the answer operators alert on
        mp.setattr(Served, "describe", lambda _: 1 / 0)
        assert requests.get(f"{base}/version", timeout=10).status_code == 500
    got = scraped(base)
    requests_total = {labels: v for (name, labels), v in got.items() if name == "cmce_http_requests_total"}
    assert requests_total == {
        (("endpoint", "/version"), ("method", "GET"), ("status", "200")): 1.0,
        (("endpoint", "/search"), ("method", "POST"), ("status", "200")): 2.0,
        (("endpoint", "/search"), ("method", "POST"), ("status", "413")): 1.0,
        (("endpoint", "other"), ("method", "GET"), ("status", "404")): 4.0,
        (("endpoint", "/openapi.json"), ("method", "GET"), ("status", "200")): 1.0,
        (("endpoint", "/version"), ("method", "other"), ("status", "405")): 1.0,
        (("endpoint", "/version"), ("method", "GET"), ("status", "500")): 1.0,
    }
    assert got[("cmce_http_request_duration_seconds_count", (("endpoint", "/search"),))] == 3.0
    assert got[("cmce_search_queries_total", (("input", "embeddings"),))] == 2.0
    assert got[("cmce_search_queries_total", (("input", "images"),))] == 1.0
    served = holder.current
    assert got[("cmce_index_items", ())] == len(served.index.ids) == 300
    info = (("index_type", "flat"), ("index_version", served.version), ("query_model_sha256", sha))
    assert (got[("cmce_index_info", info)], got[("cmce_index_reloads_total", ())]) == (1.0, 0.0)
    assert got[("cmce_index_problem", ())] == 0.0
    assert not [name for name, _ in got if name.endswith("_created")]

    gallery_index(tmp_path / "work", model, folder, rows=120, seed=1)  # a rebuild, swapped in by the poll
    assert holder.check() is True
    (folder / "meta.json").write_text("{")  # then a broken meta.json: the problem /readyz shows
    for _ in range(UNREADABLE_POLLS):
        holder.check()
    got = scraped(base, accept="application/openmetrics-text; version=1.0.0")  # OpenMetrics, when asked for
    info = (("index_type", "flat"), ("index_version", holder.current.version), ("query_model_sha256", sha))
    assert got[("cmce_index_items", ())] == 120 and got[("cmce_index_info", info)] == 1.0
    assert got[("cmce_index_reloads_total", ())] == 1.0
    assert got[("cmce_index_problem", ())] == 1.0
    assert not [name for name, _ in got if name.endswith("_created")]
    assert requests.get(f"{base}/readyz", timeout=10).json()["last_reload_error"] is not None


def test_a_malformed_target_or_accept_header_is_answered_not_a_500(in_process_server):
    """`GET http://[::1/search` (a host urlsplit cannot parse) and a scrape asking for OpenMetrics `version=abc` were
    500s in plain text with a traceback in the log, and the first was not counted. Now: 400 in the API's form,
    counted; the scrape gets the Prometheus text format, as a scraper that asks for nothing does."""
    _, base = in_process_server()
    head, answer, closed = raw_exchange(SimpleNamespace(url=base),
                                        b"GET http://[::1/search HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"http/1.1 400") and closed, head
    assert json.loads(answer) == {"error": "request: the request target 'http://[::1/search' is not a valid "
                                           "absolute URL", "field": "request"}, answer
    res = requests.get(f"{base}/metrics", headers={"accept": "application/openmetrics-text; version=abc"},
                       timeout=10)
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain"), res.text
    got = scraped(base)
    assert got[("cmce_http_requests_total", (("endpoint", "other"), ("method", "GET"), ("status", "400")))] == 1.0


def test_a_load_that_failed_in_transfer_is_tried_again_after_a_while(world, tmp_path, monkeypatch):
    """A failed load is tried again only once the source changes: an S3 index whose download timed out once (a
    503, a slow endpoint) was not served until the next rebuild. A transfer's error (OSError) is retried after
    RETRY_S; an index refused for what it is (a ValueError) waits for a change."""
    import cmce.serving.state as state
    from cmce.serving.state import RETRY_S, Holder, QueryModelSource

    _, model, index, _ = world
    folder = Path(shutil.copytree(index, tmp_path / "index"))
    holder = Holder(folder, QueryModelSource(str(model), Path))
    gallery_index(tmp_path / "work", model, folder, rows=90, seed=2)
    real, calls = holder.source.load, []

    def load(*args):
        calls.append(args)
        if len(calls) == 1:
            raise TimeoutError(f"{folder}: no whole answer within 5 s")
        return real(*args)

    monkeypatch.setattr(holder.source, "load", load)
    assert holder.check() is False and "no whole answer" in holder.last_error
    assert holder.check() is False and len(calls) == 1  # within RETRY_S
    later = time.monotonic() + RETRY_S + 1
    monkeypatch.setattr(state, "time", SimpleNamespace(monotonic=lambda: later))  # RETRY_S on
    assert holder.check() is True and len(calls) == 2 and len(holder.current.index.ids) == 90
    assert holder.last_error is None
