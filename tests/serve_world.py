"""A tiny serving world for tests/test_serve.py and benchmarks/serving.py: an untrained query model (serving
does not care how good it is), galleries and indexes built for it, PNG queries, and a real `cmce serve`
process on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import torch
from PIL import Image

from cmce.checkpoint import EmbeddingModel, save_embedding_model
from cmce.data.schema import DATASET_SCHEMA
from cmce.embed import combine_members, member_metadata, member_schema, member_table
from cmce.index import build_index
from cmce.models import EmbeddingNet
from cmce.storage import file_sha256

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "star", "heart", "moon"]


def query_model(path: Path, seed: int = 0, dim: int = 16, size: int = 8, width: int = 4) -> Path:
    torch.manual_seed(seed)
    net = EmbeddingNet("query_cnn", 1, dim, width).eval()
    save_embedding_model(EmbeddingModel("query", "query_cnn", net, torch.randn(len(CLASSES), dim), 16.0, 1, size, dim),
                         path, width)
    return path


def gallery_index(work: Path, model: Path, out: Path, rows: int = 300, seed: int = 0, prefix: str = "g",
                  dim: int = 16, index_type: str = "flat", source: dict | None = None) -> Path:
    """Two members of random transformed embeddings for `model`, combined and indexed (swapped) into `out`.
    `source`: the dataset split they record as embedded from (see gallery_dataset)."""
    rng = np.random.default_rng(seed)
    work.mkdir(parents=True, exist_ok=True)
    ids = [f"{prefix}{i}" for i in range(rows)]
    labels = np.arange(rows) % len(CLASSES)
    centres = rng.normal(size=(len(CLASSES), dim))
    members = []
    for m in range(2):
        meta = member_metadata(f"m{m}", "resnet", f"{m}" * 64, f"{m + 2}" * 64, file_sha256(model), "test", source)
        t = centres[labels] + 0.5 * rng.normal(size=(rows, dim))
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        table = member_table(ids, labels, rng.normal(size=(rows, 4)), t, member_schema(4, dim, meta))
        pq.write_table(table, work / f"{prefix}_m{m}.parquet")
        members.append(work / f"{prefix}_m{m}.parquet")
    gallery = combine_members(members, work / f"{prefix}_gallery.parquet")
    return build_index(gallery, out, index_type=index_type)


def png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dataset(path: Path, with_metadata: bool = True) -> Path:
    """A dataset file whose class names label the hits (its images are never read by the server)."""
    labels = list(range(len(CLASSES)))
    table = pa.table({"id": [f"d{i}" for i in labels], "label": pa.array(labels, pa.int32()),
                      "class_name": CLASSES, "split": ["test"] * len(labels), "image": [png(i) for i in labels]},
                     schema=DATASET_SCHEMA)
    if with_metadata:
        table = table.replace_schema_metadata({"cmce": json.dumps({"classes": CLASSES})})
    pq.write_table(table, path)
    return path


def gallery_dataset(path: Path, rows: int = 300, prefix: str = "g") -> Path:
    """A dataset whose test split holds the ids and labels that gallery_index(rows=rows, prefix=prefix) embeds."""
    labels = [i % len(CLASSES) for i in range(rows)]
    table = pa.table({"id": [f"{prefix}{i}" for i in range(rows)], "label": pa.array(labels, pa.int32()),
                      "class_name": [CLASSES[label] for label in labels], "split": ["test"] * rows,
                      "image": [png(0)] * rows}, schema=DATASET_SCHEMA)
    pq.write_table(table.replace_schema_metadata({"cmce": json.dumps({"classes": CLASSES})}), path)
    return path


def cmce_env() -> dict[str, str]:
    """This checkout's code first, whatever the installed package points at."""
    paths = [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class Server:
    """`cmce serve ARGS --port 0` in a subprocess: its URL read from the line it prints, ready once /readyz is."""

    def __init__(self, args: list[str], log: Path, timeout_s: float = 120.0, env: dict[str, str] | None = None):
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "cmce", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True, env=env or cmce_env())
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in self.proc.stdout:
                lines.put(line)
            lines.put("")  # it exited

        threading.Thread(target=read, daemon=True).start()
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            line = ""
        if " on http://" not in line:
            self.stop()
            raise RuntimeError(f"cmce serve did not start: {line!r} {log.read_text()[-3000:]}")
        self.line, self.url = line, line.rsplit(" on ", 1)[1].strip()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # until the deadline: a loaded machine is slow
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cmce serve not ready: {log.read_text()[-3000:]}")
            time.sleep(0.05)

    def search(self, session: requests.Session | None = None, timeout: float = 30, **body) -> requests.Response:
        return (session or requests).post(f"{self.url}/search", json=body, timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
