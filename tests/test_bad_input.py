"""The bad-input matrix (RELIABILITY.md): every case drives the `cmce` CLI and checks that it exits with
code 2, that the logged error names the file and the field / column / row at fault, that an output
already at --out is unchanged byte for byte, and that no temporary file is left behind.

Models here are untrained (random weights, seconds to build): the checks under test read versions,
shapes and values, not quality.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cmce.checkpoint import (
    EMBEDDING_FORMAT,
    CheckpointError,
    EmbeddingModel,
    load_embedding_model,
    save_embedding_model,
)
from cmce.cli import main
from cmce.config import ConfigError, load_config
from cmce.data.codec import decode_image
from cmce.embed import member_metadata, member_schema, member_table
from cmce.errors import signal_name
from cmce.models import EmbeddingNet
from cmce.storage import file_sha256, scratch_dir
from cmce.tables import embedding_array, embedding_column, read_metadata
from cmce.transform import Transformation, build_mlp, save_transformation
from tests.conftest import SMOKE

TINY = ["--set", "data.max_train_per_class=6", "--set", "data.max_test_per_class=4"]  # 60 train, 40 test images
PREVIOUS = b"previous output: must survive a failed step\n"
NOISE = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)  # incompressible: a 4 kB PNG, cut at 2 kB


# ---------------------------------------------------------------- fixtures
@dataclass
class World:
    root: Path
    dataset: Path
    query: Path
    other_query: Path
    gallery_models: list[Path]
    transforms: list[Path]
    transform_other_query: Path  # T for gallery_models[0], fitted against other_query
    members: list[Path]
    gallery: Path
    index: Path


def tiny_model(path: Path, name: str, arch: str, dim: int, seed: int, role: str | None = None) -> Path:
    torch.manual_seed(seed)
    net = EmbeddingNet(arch, 1, dim, 4).eval()
    meta = {"history": [{"epoch": 1}], **({"role": role} if role else {})}  # no role: a checkpoint from before roles
    m = EmbeddingModel(name, arch, net, torch.randn(10, dim), 16.0, 1, 8, dim, meta=meta)
    save_embedding_model(m, path, 4)
    return path


def tiny_transform(path: Path, gallery: Path, gallery_name: str, query: Path, in_dim: int, out_dim: int) -> Path:
    t = Transformation(build_mlp(in_dim, out_dim, 16, 2).eval(), gallery_name, file_sha256(gallery),
                       file_sha256(query), in_dim, out_dim, 16, 2, history=[{"epoch": 1, "loss": 0.0}])
    save_transformation(t, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_input")
    ds = root / "dataset.parquet"
    assert main(["prepare-data", "--config", str(SMOKE), *TINY, "--out", str(ds)]) == 0
    q = tiny_model(root / "q.pt", "query", "query_cnn", 8, seed=0)
    q2 = tiny_model(root / "q2.pt", "query", "query_cnn", 8, seed=1)
    g = [tiny_model(root / "resnet_a.pt", "resnet_a", "resnet", 12, seed=2),
         tiny_model(root / "vgg_b.pt", "vgg_b", "vgg", 10, seed=3)]
    t = [tiny_transform(root / "t_resnet_a.pt", g[0], "resnet_a", q, 12, 8),
         tiny_transform(root / "t_vgg_b.pt", g[1], "vgg_b", q, 10, 8)]
    t_q2 = tiny_transform(root / "t_resnet_a_q2.pt", g[0], "resnet_a", q2, 12, 8)
    gallery, members_dir, index = root / "gallery.parquet", root / "members", root / "index"
    assert main(["embed-gallery", "--dataset", str(ds), "--query-model", str(q), "--gallery-model", str(g[0]),
                 "--transform", str(t[0]), "--gallery-model", str(g[1]), "--transform", str(t[1]),
                 "--members-dir", str(members_dir), "--out", str(gallery)]) == 0
    assert main(["build-index", "--gallery", str(gallery), "--out", str(index)]) == 0
    members = [members_dir / "resnet_a.parquet", members_dir / "vgg_b.parquet"]
    return World(root, ds, q, q2, g, t, t_q2, members, gallery, index)


# ---------------------------------------------------------------- helpers
def snapshot(path: Path) -> dict[str, bytes] | None:
    if path.is_file():
        return {"": path.read_bytes()}
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return None


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of atomic_path / atomic_dir."""
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old"))]


def previous_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PREVIOUS)
    return path


def previous_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("metrics.json", "query.parquet", "results.md"):  # an earlier evaluation's files
        (path / name).write_bytes(PREVIOUS)
    return path


def fails(caplog: pytest.LogCaptureFixture, argv: list, out: Path, *needles: str) -> str:
    """Run `cmce argv`; require exit code 2, every needle in the logged error, `out` untouched
    (whatever was there before, or nothing) and no temporary files next to it."""
    before = snapshot(out)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main([str(a) for a in argv])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    assert snapshot(out) == before
    assert leftovers(out.parent) == []
    return errors[0]


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def image_folder(root: Path, classes: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in classes.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{i}.png").write_bytes(encode(Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8))))
    return root


def imagefolder_args(root: Path) -> list:
    return ["--config", str(SMOKE), "--set", "data.source=imagefolder", "--set", f"data.path={root}"]


def png_bomb(side: int = 30000) -> bytes:
    """A valid PNG header announcing side x side pixels, with no pixel data: what a decompression bomb
    looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def rewrite(src: Path, dst: Path, **columns) -> Path:
    """Copy a Parquet file, replacing (array) or dropping (None) columns; the cmce metadata is kept."""
    table = pq.read_table(src)
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        table = table.remove_column(i) if values is None else table.set_column(i, name, values)
    pq.write_table(table.replace_schema_metadata(pq.read_schema(src).metadata), dst)
    return dst


def rewrite_member(src: Path, dst: Path, ids=None, raw=None, transformed=None) -> Path:
    """A per-model file built with the project's own schema helpers from `src`, with parts replaced."""
    table = pq.read_table(src)
    meta = read_metadata(src)
    ids = table.column("id").to_pylist() if ids is None else ids
    raw = embedding_column(table, "raw", "src") if raw is None else raw
    transformed = embedding_column(table, "transformed", "src") if transformed is None else transformed
    g = meta["gallery_model"]
    meta = member_metadata(g["name"], g["arch"], g["sha256"], meta["transformation_sha256"],
                           meta["query_model_sha256"], meta["split"], meta.get("source"))
    schema = member_schema(raw.shape[1], transformed.shape[1], meta)
    pq.write_table(member_table(ids, table.column("label").to_numpy(), raw, transformed, schema), dst)
    return dst


def embed_member_args(w: World, dataset: Path | None = None, query: Path | None = None,
                      gallery_model: Path | None = None, transform: Path | None = None) -> list:
    return ["embed-member", "--dataset", dataset or w.dataset, "--query-model", query or w.query,
            "--gallery-model", gallery_model or w.gallery_models[0], "--transform", transform or w.transforms[0]]


def evaluate_args(w: World, gallery: Path | None = None, query: Path | None = None,
                  transforms: list[Path] | None = None) -> list:
    args = ["evaluate", "--config", SMOKE, "--dataset", w.dataset, "--query-model", query or w.query,
            "--gallery", gallery or w.gallery]
    for t in transforms or w.transforms:
        args += ["--transform", t]
    return args


# ---------------------------------------------------------------- images
@pytest.mark.parametrize(
    "name,data,message",
    [
        ("bad.png", b"\x89PNG\r\n\x1a\n" + b"not a png" * 8, "corrupt or unreadable image"),
        ("bad.png", encode(Image.fromarray(NOISE))[:2000], "corrupt or unreadable image: image file is truncated"),
        ("bad.jpg", encode(Image.fromarray(NOISE), "JPEG")[:2000],
         "corrupt or unreadable image: image file is truncated"),
        ("bad.png", b"", "empty (zero-byte) image"),
        ("bad.png", png_bomb(), "refused, too many pixels: 900,000,000, over data.max_image_pixels (40,000,000)"),
        ("bad.tif", encode(Image.new("F", (8, 8), 0.5), "TIFF"), "unsupported image mode 'F'"),
        ("bad.tif", encode(Image.new("I", (8, 8), 70000), "TIFF"), "32-bit integer image with values outside"),
    ],
    ids=["corrupt", "truncated-png", "truncated-jpeg", "zero-byte", "decompression-bomb", "float-mode",
         "int32-beyond-16-bit"],
)
def test_unreadable_image_in_imagefolder(tmp_path, caplog, name, data, message):
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    (root / "dog" / name).write_bytes(data)
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out, f"{root / 'dog' / name}: {message}")


def test_a_folder_that_cannot_be_listed_is_named_not_left_out(tmp_path, caplog, monkeypatch):
    """A class folder (or one under it) that could not be listed (chmod 000, for a user bound by permissions) was
    skipped without a word: prepare-data wrote the dataset without its images, exit 0."""
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    (root / "dog" / "more").mkdir()
    shutil.copyfile(root / "dog" / "0.png", root / "dog" / "more" / "0.png")
    real = os.scandir
    for shut in (root / "dog" / "more", root / "cat"):
        def scandir(path=".", shut=shut):
            if Path(path) == shut:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
        out = previous_file(tmp_path / "out" / "dataset.parquet")
        fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
              f"{shut}: cannot be listed (Permission denied): its images would be left out")


def test_a_dataset_written_inside_its_imagefolder_is_refused(tmp_path, caplog):
    """prepare-data --out <root>/cat/ds.parquet wrote into the class folder; the next import skipped it by name."""
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    kept = snapshot(root)
    out = root / "cat" / "dataset.parquet"
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"--out {out} is inside the data folder data.path {root}")
    assert snapshot(root) == kept


def test_a_folder_with_a_colon_in_its_name_is_no_uri(tmp_path, caplog):
    """A path holding `:/` was taken for a URI and compared as text only: prepare-data wrote its dataset over one of
    the images it read (`--raw col:/d --out col:/d/cat/0.png`) and over its own config, exit 0."""
    root = image_folder(tmp_path / "col:" / "d", {"cat": 4, "dog": 4})
    kept = snapshot(root)
    over = root / "cat" / "0.png"
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--raw", root, "--out", over], over,
          f"--out {over} is inside the input folder --raw {root}")
    inside = root / "cat" / "dataset.parquet"
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", inside], inside,
          f"--out {inside} is inside the data folder data.path {root}")
    assert snapshot(root) == kept
    config = tmp_path / "col:" / "c.yaml"
    config.write_text(SMOKE.read_text())
    fails(caplog, ["prepare-data", "--config", config, "--out", tmp_path / "col:" / "." / "c.yaml"], config, "--out")


def test_prepare_data_raw_names_the_imagefolder_it_reads(tmp_path, caplog):
    """`--raw OTHER` was ignored for an ImageFolder (data.path was read, exit 0), and it turned off the refusal of an
    --out inside data.path. --raw is the root read, as for the benchmark sources."""
    base = image_folder(tmp_path / "base", {"cat": 2, "dog": 2})
    other = image_folder(tmp_path / "other", {"cat": 3, "dog": 3, "eel": 3})
    out = tmp_path / "out" / "dataset.parquet"
    assert main(["prepare-data", *imagefolder_args(base), "--raw", str(other), "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 9
    inside = other / "cat" / "dataset.parquet"
    fails(caplog, ["prepare-data", *imagefolder_args(base), "--raw", other, "--out", inside], inside,
          f"--out {inside} is inside the input folder --raw {other}")
    single = image_folder(tmp_path / "single", {"cat": 1, "dog": 1})  # each image goes to train: no test split
    fails(caplog, ["prepare-data", *imagefolder_args(base), "--raw", single, "--out", out], out,
          f"{single}: the heldout protocol with data.heldout_fraction=")  # named data.path, which was not read


def test_a_relative_data_path_is_named_as_the_absolute_path_read(tmp_path, caplog, monkeypatch):
    """A relative data.path is read from the working folder (as the shipped configs and dvc repro expect); the
    message named only `../images`, leaving the user to guess from where (the config file's folder?)."""
    image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    out = tmp_path / "out" / "dataset.parquet"
    fails(caplog, ["prepare-data", *imagefolder_args(Path("../imagez")), "--out", out], out,
          f"{tmp_path / 'work' / '..' / 'imagez'}: ImageFolder root is not a directory")
    assert main(["prepare-data", *imagefolder_args(Path("../images")), "--out", str(out)]) == 0
    assert pq.read_table(out).num_rows == 8


def test_an_image_over_the_pixel_limit_is_refused_naming_it(tmp_path, caplog):
    """Below Pillow's own limit (which only warns), above data.max_image_pixels: refused from the header."""
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    big = root / "dog" / "big.png"
    big.write_bytes(encode(Image.new("L", (300, 200))))
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--set", "data.max_image_pixels=50000", "--out", out],
          out, f"{big}: refused, too many pixels: 300 × 200 = 60,000, over data.max_image_pixels (50,000)")
    assert main(["prepare-data", *[str(a) for a in imagefolder_args(root)], "--out", str(out)]) == 0  # default


def test_an_image_file_larger_than_the_pixel_limit_allows_is_refused_unread(tmp_path, caplog):
    """A 5 GB sparse file named big.png ran the import out of memory (a MemoryError traceback): no image within
    data.max_image_pixels takes that many bytes, so it is refused from its size, unread."""
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    big = root / "dog" / "big.png"
    size = 50_000 * 8 + (16 << 20) + 1  # 8 bytes a pixel and 16 MiB of metadata, plus one byte
    with open(big, "wb") as f:
        f.truncate(size)  # sparse: no disk used
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--set", "data.max_image_pixels=50000", "--out", out],
          out, f"{big}: a file of {size:,} bytes, more than an image of data.max_image_pixels (50,000) pixels takes")


def test_image_modes_are_converted(tmp_path):
    """Grey, RGB(A), palette, bilevel, 16-bit and 32-bit-integer grey, CMYK: all imported, decoded to the
    model's channels with a fixed scale (16-bit: x·255/65535; transparency on white)."""
    root = image_folder(tmp_path / "images", {"plain": 4})
    (root / "modes").mkdir()
    cases = {
        "l.png": (Image.new("L", (6, 5), 100), "PNG", 100),
        "rgb.png": (Image.new("RGB", (6, 5), (100, 100, 100)), "PNG", 100),
        "rgba.png": (Image.new("RGBA", (6, 5), (0, 0, 0, 0)), "PNG", 255),
        "la.png": (Image.new("LA", (6, 5), (0, 0)), "PNG", 255),
        "bilevel.png": (Image.new("1", (6, 5), 1), "PNG", 255),
        "palette.png": (Image.new("P", (6, 5), 0), "PNG", 0),
        "grey16.png": (Image.new("I;16", (6, 5), 32896), "PNG", 128),
        "int32.tif": (Image.new("I", (6, 5), 65535), "TIFF", 255),
        "cmyk.tif": (Image.new("CMYK", (6, 5), (0, 0, 0, 0)), "TIFF", 255),
    }
    for name, (img, fmt, _) in cases.items():
        (root / "modes" / name).write_bytes(encode(img, fmt))
    out = tmp_path / "dataset.parquet"
    assert main(["prepare-data", *imagefolder_args(root), "--out", str(out)]) == 0
    table = pq.read_table(out)
    images = dict(zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True))
    for name, (_, _, grey) in cases.items():
        blob = images[f"modes/{name}"]
        assert np.all(decode_image(blob, 1, 8, name) == grey), name
        assert decode_image(blob, 3, 8, name).shape == (3, 8, 8)


def test_single_image_classes_are_said_in_one_line(tmp_path, caplog):
    """297 classes of one image each printed 297 warning lines: one line gives the count and the first three."""
    root = image_folder(tmp_path / "images", {**{f"c{i:02d}": 1 for i in range(40)}, "cat": 2, "dog": 2})
    with caplog.at_level(logging.WARNING):
        main(["prepare-data", *imagefolder_args(root), "--out", str(tmp_path / "d.parquet")])
    said = [r.getMessage() for r in caplog.records if "single image" in r.getMessage()]
    assert said == [f"{root}: 40 class(es) have a single image ('c00', 'c01', 'c02', …); such an image cannot be "
                    "both query and gallery"]


def test_single_image_class_is_kept_in_train_with_a_warning(tmp_path, caplog):
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4, "bird": 1})
    out = tmp_path / "dataset.parquet"
    with caplog.at_level(logging.WARNING):
        assert main(["prepare-data", *imagefolder_args(root), "--out", str(out)]) == 0
    assert f"{root}: 1 class(es) have a single image ('bird')" in caplog.text
    table = pq.read_table(out)
    split = dict(zip(table.column("id").to_pylist(), table.column("split").to_pylist(), strict=True))
    assert split["bird/0.png"] == "train"
    assert {"train", "test"} <= set(split.values())


def test_a_cap_of_zero_images_a_class_is_refused_at_load(tmp_path, caplog):
    out = previous_file(tmp_path / "dataset.parquet")
    fails(caplog, ["prepare-data", "--config", SMOKE, "--set", "data.max_test_per_class=0", "--out", out], out,
          "--set data.max_test_per_class must be in [1, inf), got 0")


def test_empty_split_in_an_imagefolder(tmp_path, caplog):
    root = tmp_path / "images"
    image_folder(root / "train", {"cat": 3, "dog": 3})
    (root / "test" / "cat").mkdir(parents=True)  # an official split with nothing in it
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out, str(root),
          "leaves the 'test' split empty")


def test_a_split_folder_of_images_without_class_folders_is_named(tmp_path, caplog):
    """tt/train/img0..7.png and tt/test/img0..7.png (no class folders) was refused as `tt: no class folders
    found`, though tt holds two folders: the split folder is named, with what it holds."""
    root = tmp_path / "tt"
    for part in ("train", "test"):
        (root / part).mkdir(parents=True)
        for i in range(8):
            (root / part / f"img{i}.png").write_bytes(encode(Image.new("L", (8, 8), 10 * i)))
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root / 'train'}: holds 8 images but no class folders; an official split (train/, test/) holds one folder")
    image_folder(root / "train", {"cat": 2})  # test/ still has none
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root / 'test'}: holds 8 images but no class folders")


def test_empty_split_in_a_dataset_file(world, tmp_path, caplog):
    split = pq.read_table(world.dataset).column("split")
    ds = rewrite(world.dataset, tmp_path / "train_only.parquet", split=pa.array(["train"] * len(split)))
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, dataset=ds), "--out", out], out, f"{ds}: split 'test' is empty")


@pytest.mark.parametrize("split", ["test", "train"])
def test_duplicate_ids_in_a_dataset_file(world, tmp_path, caplog, split):
    table = pq.read_table(world.dataset)
    ids = table.column("id").to_pylist()
    rows = [i for i, s in enumerate(table.column("split").to_pylist()) if s == split]
    ids[rows[5]] = ids[rows[2]]
    ds = rewrite(world.dataset, tmp_path / "dup.parquet", id=pa.array(ids))
    out = previous_file(tmp_path / ("out.parquet" if split == "test" else "out.pt"))
    argv = (embed_member_args(world, dataset=ds) if split == "test"
            else ["train", "--config", SMOKE, "--dataset", ds, "--model", "query"])
    fails(caplog, [*argv, "--out", out], out, f"{ds}: split '{split}' has duplicate id {ids[rows[2]]!r}")


def test_a_very_long_duplicate_id_is_shown_cut(world, tmp_path, caplog):
    """A 5 MB id given twice was echoed whole: one 5 MB log line."""
    table = pq.read_table(world.dataset)
    ids = table.column("id").to_pylist()
    rows = [i for i, s in enumerate(table.column("split").to_pylist()) if s == "train"]
    ids[rows[0]] = ids[rows[1]] = "x" * 5_000_000
    ds = rewrite(world.dataset, tmp_path / "long.parquet", id=pa.array(ids))
    out = tmp_path / "out.pt"
    error = fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out,
                  f"{ds}: split 'train' has duplicate id {'x' * 80!r}… (5,000,000 characters)")
    assert len(error) < 1000


def test_shards_whose_columns_differ_name_the_column(world, tmp_path, caplog):
    """`columns differ from <shard 0>` named neither the column nor its type."""
    shards = [tmp_path / f"shard{i}.parquet" for i in range(2)]
    for i, shard in enumerate(shards):
        assert main([*map(str, embed_member_args(world)), "--shard", f"{i}/2", "--out", str(shard)]) == 0
    table = pq.read_table(shards[1])
    wide = table.set_column(table.schema.get_field_index("label"), "label", table.column("label").cast(pa.int64()))
    pq.write_table(wide.replace_schema_metadata(table.schema.metadata), shards[1])
    out = tmp_path / "merged.parquet"
    fails(caplog, ["merge", shards[0], shards[1], "--out", out], out,
          f"{shards[1]}: columns differ from {shards[0]} (label: int64, not int32)")


def test_train_split_with_a_single_class(world, tmp_path, caplog):
    labels = pq.read_table(world.dataset).column("label")
    ds = rewrite(world.dataset, tmp_path / "one_class.parquet", label=pa.array([3] * len(labels), pa.int32()),
                 class_name=pa.array(["3"] * len(labels), pa.string()))
    out = previous_file(tmp_path / "query.pt")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out,
          f"{ds}: the train split needs at least 2 classes, got 1")


def test_negative_label_in_a_dataset_file(world, tmp_path, caplog):
    table = pq.read_table(world.dataset)
    labels = table.column("label").to_numpy().copy()
    labels[table.column("split").to_pylist().index("train")] = -1
    ds = rewrite(world.dataset, tmp_path / "negative.parquet", label=pa.array(labels, pa.int32()))
    out = previous_file(tmp_path / "query.pt")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out,
          f"{ds}: column 'label' has a negative value -1")


def test_a_classifier_the_labels_and_embedding_dim_make_too_large_is_refused_before_a_model_is_built(
        world, tmp_path, caplog, monkeypatch):
    table = pq.read_table(world.dataset)
    labels = table.column("label").to_numpy().copy()
    labels[table.column("split").to_pylist().index("train")] = (1 << 20) - 1  # the largest label a dataset may hold
    ds = without_classes(rewrite(world.dataset, tmp_path / "many_classes.parquet", label=pa.array(labels, pa.int32())))
    monkeypatch.setattr("cmce.train.EmbeddingNet", None)  # building one would fail the test with a TypeError
    out = previous_file(tmp_path / "query.pt")
    fails(caplog, ["train", "--config", SMOKE, "--set", "query_model.embedding_dim=512", "--dataset", ds,
                   "--model", "query", "--out", out], out,
          f"{ds}: labels up to 1048575 and query's embedding_dim 512 imply a classifier of 536,870,912 parameters")


def test_a_kd_student_a_teacher_makes_too_large_is_refused_before_it_is_built(world, tmp_path, caplog, monkeypatch):
    teacher = tiny_model(tmp_path / "wide.pt", "wide", "query_cnn", 65536, seed=0)  # each size in its range
    monkeypatch.setattr("cmce.train.EmbeddingNet", None)  # building one would fail the test with a TypeError
    out = previous_file(tmp_path / "kd_wide.pt")
    fails(caplog, ["train", "--config", SMOKE, "--set", "query_model.width=1024", "--kd-teacher", teacher,
                   "--dataset", world.dataset, "--out", out], out,
          f"{teacher}: its embedding_dim 65536 and query's width 1024 imply a KD student of")


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_null_image_cell_is_refused_naming_the_file_and_id(world, tmp_path, caplog, split):
    table = pq.read_table(world.dataset)
    row = table.column("split").to_pylist().index(split)
    images = table.column("image").to_pylist()
    images[row] = None
    ds = rewrite(world.dataset, tmp_path / "null_image.parquet", image=pa.array(images, table.column("image").type))
    needle = f"{ds} (id {table.column('id')[row].as_py()}): no image (the image cell is null)"
    if split == "train":  # the loader's path: rows indexed first, decoded per batch
        out = previous_file(tmp_path / "query.pt")
        fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out, needle)
    else:  # the streamed path (iter_split_batches), which embeds the test split
        out = previous_file(tmp_path / "member.parquet")
        fails(caplog, [*embed_member_args(world, dataset=ds), "--out", out], out, needle)


def test_decode_image_refuses_what_is_not_bytes():
    from cmce.data.schema import DataError

    for data in (None, 12, "png"):
        with pytest.raises(DataError, match=r"^d.parquet \(id x\): no image"):
            decode_image(data, 1, 8, "d.parquet (id x)")


def test_duplicate_ids_in_a_gallery_file(world, tmp_path, caplog):
    ids = pq.read_table(world.gallery).column("id").to_pylist()
    ids[7] = ids[1]
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", id=pa.array(ids))
    out = shutil.copytree(world.index, tmp_path / "index")
    fails(caplog, ["build-index", "--gallery", gallery, "--out", out], out,
          f"{gallery}: column 'id' has duplicate id {ids[1]!r}")


def test_duplicate_ids_in_member_files(world, tmp_path, caplog):
    ids = pq.read_table(world.members[0]).column("id").to_pylist()
    ids[9] = ids[0]
    members = [rewrite_member(m, tmp_path / m.name, ids=ids) for m in world.members]
    out = previous_file(tmp_path / "gallery.parquet")
    fails(caplog, ["combine", "--member", members[0], "--member", members[1], "--out", out], out,
          f"{members[0]}: column 'id' has duplicate id {ids[0]!r}")


def test_paths_escaping_the_imagefolder_root(tmp_path, caplog):
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    outside = image_folder(tmp_path / "elsewhere", {"secret": 2})
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    # a link inside its class folder is fine; into another class it labels one image twice (exit 0 before)
    (root / "dog" / "alias.png").symlink_to(root / "dog" / "0.png")
    assert main(["prepare-data", *imagefolder_args(root), "--out", str(tmp_path / "ok.parquet")]) == 0
    (root / "dog" / "alias.png").unlink()
    (root / "dog" / "alias.png").symlink_to(root / "cat" / "0.png")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root / 'dog' / 'alias.png'}: a link out of its class folder dog (to {root / 'cat' / '0.png'})")
    (root / "dog" / "alias.png").unlink()
    os.link(root / "cat" / "1.png", root / "dog" / "hard.png")  # a hard link: the same file, another name
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          "dog/hard.png and cat/1.png are one file (hard-linked)")
    (root / "dog" / "hard.png").unlink()
    split = tmp_path / "split"  # a test class folder linked to its train folder: no hard link there
    shutil.copytree(root / "cat", split / "train" / "cat")
    shutil.copytree(root / "dog", split / "train" / "dog")
    (split / "test").mkdir()
    (split / "test" / "cat").symlink_to("../train/cat")
    shutil.copytree(root / "dog", split / "test" / "dog")
    fails(caplog, ["prepare-data", *imagefolder_args(split), "--out", out], out,
          "test/cat/0.png and train/cat/0.png are one file (linked)")
    # an image file linked to outside the root
    (root / "dog" / "leak.png").symlink_to(outside / "secret" / "0.png")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root / 'dog' / 'leak.png'}: resolves to", "outside the ImageFolder root")
    (root / "dog" / "leak.png").unlink()
    # a whole class folder linked to outside the root
    (root / "secret").symlink_to(outside / "secret", target_is_directory=True)
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root / 'secret'}: resolves to", "outside the ImageFolder root")


# ---------------------------------------------------------------- Parquet
def test_dataset_file_missing_column(world, tmp_path, caplog):
    ds = rewrite(world.dataset, tmp_path / "no_image.parquet", image=None)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, dataset=ds), "--out", out], out, f"{ds}: missing column 'image'")


def test_dataset_file_wrong_dtype(world, tmp_path, caplog):
    labels = pq.read_table(world.dataset).column("label").to_pylist()
    ds = rewrite(world.dataset, tmp_path / "str_label.parquet", label=pa.array([str(x) for x in labels]))
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, dataset=ds), "--out", out], out,
          f"{ds}: column 'label' has type string, expected int32")


def test_dataset_file_that_is_not_parquet(world, tmp_path, caplog):
    ds = tmp_path / "dataset.parquet"
    ds.write_bytes(b"PAR1 this is not a parquet file")
    out = previous_file(tmp_path / "model.pt")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out,
          f"{ds}: not a readable Parquet file")


def gallery_column(world: World, name: str) -> np.ndarray:
    return embedding_column(pq.read_table(world.gallery), name, "g").copy()


@pytest.mark.parametrize(
    "column,values,message",
    [
        ("uncertainty", None, "missing column 'uncertainty'"),
        ("embedding", "ragged lists", "column 'embedding' holds lists of 2 lengths (7 to 8): embeddings of one "
                                      "dimension expected"),
        ("uncertainty", "strings", "column 'uncertainty' has type string, expected a float"),
        ("embedding", "inf at row 5", "column 'embedding' has NaN/inf values in 1 rows (first: row 5)"),
        ("uncertainty", "NaN at row 3", "column 'uncertainty' has NaN/inf values in 1 rows (first: row 3)"),
        ("label", "strings", "column 'label' has type string, expected an integer"),
        ("embedding", "3e38 at row 4", "column 'embedding': row 4 is not finite (or too large to normalise)"),
        ("embedding", "zeros at row 2", "column 'embedding': row 2 is all zeros"),
    ],
    ids=["missing-column", "embedding-ragged", "uncertainty-string", "embedding-inf", "uncertainty-nan",
         "label-string", "embedding-norm-overflows", "embedding-zero"],
)
def test_bad_gallery_file_for_build_index(world, tmp_path, caplog, column, values, message):
    table = pq.read_table(world.gallery)
    n = table.num_rows
    if values == "ragged lists":  # float64 lists of one length are read (another tool's writing)
        rows = gallery_column(world, "embedding").astype(np.float64).tolist()
        arr = pa.array([row[:-1] if i == 3 else row for i, row in enumerate(rows)])
    elif values == "strings":
        arr = pa.array([str(v) for v in table.column(column).to_pylist()])
    elif values == "inf at row 5":
        emb = gallery_column(world, "embedding")
        emb[5, 0] = np.inf
        arr = embedding_array(emb)
    elif values in ("3e38 at row 4", "zeros at row 2"):
        emb = gallery_column(world, "embedding")  # 3e38 is a float32, its norm is not
        emb[4 if values.startswith("3e38") else 2] = 3e38 if values.startswith("3e38") else 0.0
        arr = embedding_array(emb)
    elif values == "NaN at row 3":
        unc = table.column("uncertainty").to_numpy().copy()
        unc[3] = np.nan
        arr = pa.array(unc)
    else:
        arr = None
    assert n > 5
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", **{column: arr})
    out = shutil.copytree(world.index, tmp_path / "index")
    fails(caplog, ["build-index", "--gallery", gallery, "--out", out], out, f"{gallery}: {message}")


def test_gallery_file_that_is_not_parquet_or_not_a_gallery(world, tmp_path, caplog):
    out = shutil.copytree(world.index, tmp_path / "index")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"\x00" * 64)
    fails(caplog, ["build-index", "--gallery", garbage, "--out", out], out, f"{garbage}: not a readable Parquet file")
    fails(caplog, ["build-index", "--gallery", world.members[0], "--out", out], out,
          f"{world.members[0]}: not a gallery file (kind='gallery_member')")


@pytest.mark.parametrize(
    "part,message",
    [
        ("transformed dim", "column 'transformed' has dimension 7, expected 8"),
        ("transformed NaN", "column 'transformed' has NaN/inf values in 1 rows (first: row 3)"),
        ("raw inf", "column 'raw' has NaN/inf values in 1 rows (first: row 11)"),
        ("no transformed", "missing column 'transformed'"),
    ],
    ids=["transformed-dim", "transformed-nan", "raw-inf", "missing-column"],
)
def test_bad_member_file_for_combine(world, tmp_path, caplog, part, message):
    table = pq.read_table(world.members[1])
    raw, transformed = embedding_column(table, "raw", "m").copy(), embedding_column(table, "transformed", "m").copy()
    bad = tmp_path / "vgg_b.parquet"
    if part == "transformed dim":
        rewrite_member(world.members[1], bad, transformed=transformed[:, :7])
    elif part == "transformed NaN":
        transformed[3, 1] = np.nan
        rewrite_member(world.members[1], bad, transformed=transformed)
    elif part == "raw inf":
        raw[11, 0] = -np.inf
        rewrite_member(world.members[1], bad, raw=raw)
    else:
        rewrite(world.members[1], bad, transformed=None)
    out = previous_file(tmp_path / "gallery.parquet")
    fails(caplog, ["combine", "--member", world.members[0], "--member", bad, "--out", out], out, f"{bad}: {message}")


def test_gallery_embedding_dimension_differs_from_the_query_model(world, tmp_path, caplog):
    emb = gallery_column(world, "embedding")
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", embedding=embedding_array(emb[:, :5]))
    out = previous_dir(tmp_path / "eval")
    fails(caplog, evaluate_args(world, gallery=gallery) + ["--out", out], out,
          f"{gallery}: column 'embedding' has dimension 5, expected 8")


def test_raw_embedding_dimension_differs_from_the_transformation(world, tmp_path, caplog):
    raw = gallery_column(world, "raw_resnet_a")
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", raw_resnet_a=embedding_array(raw[:, :11]))
    out = previous_dir(tmp_path / "eval")
    fails(caplog, evaluate_args(world, gallery=gallery) + ["--out", out], out,
          f"{gallery}: column 'raw_resnet_a' has dimension 11, expected 12")


# ---------------------------------------------------------------- models, transformations, indexes, configs
def test_transformation_for_another_gallery_model(world, tmp_path, caplog):
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=world.gallery_models[1]), "--out", out], out,
          f"{world.transforms[0]}: transformation was fitted for gallery model")


def test_transformation_for_another_query_model(world, tmp_path, caplog):
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, transform=world.transform_other_query), "--out", out], out,
          f"{world.transform_other_query}: transformation was fitted for query model")
    out_dir = previous_dir(tmp_path / "eval")
    fails(caplog, evaluate_args(world, transforms=[world.transform_other_query, world.transforms[1]])
          + ["--out", out_dir], out_dir, f"{world.transform_other_query}: transformation was fitted for query model")


def test_gallery_built_for_another_query_model(world, tmp_path, caplog):
    out = previous_dir(tmp_path / "eval")
    fails(caplog, evaluate_args(world, query=world.other_query) + ["--out", out], out,
          f"{world.gallery}: gallery was transformed for query model")


def test_index_searched_with_another_query_model(world, caplog):
    fails(caplog, ["search", "--index", world.index, "--query-model", world.other_query, "--dataset", world.dataset,
                   "--limit", "2"], world.index, f"{world.index}: index was built for query model")


def test_a_gallery_given_for_the_dataset_is_named_as_a_gallery(world, tmp_path, caplog):
    """`--dataset gallery.parquet` (two arguments swapped) was only `missing column 'class_name'`."""
    said = f"{world.gallery}: missing column 'class_name': it holds a cmce gallery file, not a dataset"
    fails(caplog, ["search", "--index", world.index, "--query-model", world.query, "--dataset", world.gallery,
                   "--limit", "2"], world.index, said)
    grown = tmp_path / "grown.parquet"
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.gallery, "--gallery", world.dataset,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0], "--out", grown], grown)


def test_index_with_damaged_files(world, tmp_path, caplog):
    index = shutil.copytree(world.index, tmp_path / "index")
    (index / "meta.json").write_text("{ not json")
    fails(caplog, ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset], index,
          f"{index / 'meta.json'}: not valid JSON")
    shutil.copy(world.index / "meta.json", index / "meta.json")
    (index / "index.faiss").write_bytes((world.index / "index.faiss").read_bytes()[:-8])
    fails(caplog, ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset], index,
          f"{index / 'index.faiss'}: missing, not a regular file, or does not match the checksum")


# ---------------------------------------------------------------- output folders that are not the step's own
def test_build_index_refuses_an_output_folder_of_other_files(world, tmp_path, caplog):
    """--out naming the gallery's own folder (or a run root) must not delete what is in it."""
    folder = tmp_path / "run"
    folder.mkdir()
    gallery = Path(shutil.copy(world.gallery, tmp_path / "gallery.parquet"))  # inside it: refused as an input
    (folder / "notes.txt").write_text("mine")
    fails(caplog, ["build-index", "--gallery", gallery, "--out", folder], folder,
          f"{folder}: holds notes.txt, which this step does not write")
    for named in ("index.faiss", ".gitignore"):  # a folder named like a file it writes (or keeps) was deleted whole
        held = tmp_path / named.strip(".")
        (held / named).mkdir(parents=True)
        (held / named / "mine.txt").write_text("mine")
        fails(caplog, ["build-index", "--gallery", gallery, "--out", held], held,
              f"{held}: holds {named}/, which this step does not write")
    index = shutil.copytree(world.index, tmp_path / "index")  # an earlier index is replaced as before
    assert main(["build-index", "--gallery", str(gallery), "--out", str(index), "--reject-fraction", "0.2"]) == 0
    assert snapshot(index) != snapshot(world.index)


def test_evaluate_refuses_an_output_folder_of_other_files_before_the_work(world, tmp_path, caplog, monkeypatch):
    import cmce.evaluate

    def never(*args, **kwargs):
        raise AssertionError("evaluate ran before refusing its output folder")

    monkeypatch.setattr(cmce.evaluate, "load_embedding_model", never)
    out = previous_dir(tmp_path / "run")
    (out / "gallery.parquet").write_bytes(PREVIOUS)
    fails(caplog, evaluate_args(world) + ["--out", out], out, f"{out}: holds gallery.parquet")


# ---------------------------------------------------------------- rejection and --set values
@pytest.mark.parametrize("fraction", ["1.5", "-0.1", "1"])
def test_reject_fraction_outside_zero_one(world, tmp_path, caplog, fraction):
    out = shutil.copytree(world.index, tmp_path / "index")
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", out, "--reject-fraction", fraction], out,
          f"--reject-fraction: index.reject_fraction must be in [0, 1), got {float(fraction)}")


def test_rejection_needs_at_least_two_gallery_members(world, tmp_path, caplog):
    """With one member the uncertainty is 0 everywhere: rejecting would drop the first rows on file."""
    single = tmp_path / "single.parquet"
    assert main(["combine", "--member", str(world.members[0]), "--out", str(single)]) == 0
    out = shutil.copytree(world.index, tmp_path / "index")
    fails(caplog, ["build-index", "--gallery", single, "--out", out, "--reject-fraction", "0.1"], out,
          f"{single}: 1 gallery member(s); rejecting by uncertainty needs at least 2")
    assert main(["build-index", "--gallery", str(single), "--out", str(out), "--reject-fraction", "0"]) == 0


def test_set_value_that_is_not_yaml(tmp_path, caplog):
    out = previous_file(tmp_path / "dataset.parquet")
    fails(caplog, ["prepare-data", "--config", SMOKE, "--set", "train.epochs=[", "--out", out], out,
          "--set train.epochs: value '[' is not valid YAML")


def test_garbage_checkpoint_names_the_file(world, tmp_path, caplog):
    """Text where a checkpoint belongs makes torch's unpickler raise KeyError, not an unpickling error."""
    bad = tmp_path / "q.pt"
    bad.write_text("hello")
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, query=bad), "--out", out], out, f"{bad}: not a loadable checkpoint")


def test_dataset_with_damaged_pages_names_the_file(world, tmp_path, caplog):
    """A valid footer over damaged data pages: the error names the dataset, not only the codec."""
    data = bytearray(world.dataset.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    start, end = 8, len(data) - footer  # the pages, between the magic bytes and the footer
    data[start + (end - start) // 4 : end - 16] = bytes(end - 16 - start - (end - start) // 4)
    ds = tmp_path / "dataset.parquet"
    ds.write_bytes(bytes(data))
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, dataset=ds), "--out", out], out, f"{ds}: ", "not readable")


def test_config_naming_an_unknown_architecture(tmp_path, caplog):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(SMOKE.read_text().replace("arch: vgg", "arch: vggg"))
    out = previous_file(tmp_path / "dataset.parquet")
    fails(caplog, ["prepare-data", "--config", cfg, "--out", out], out,
          f"{cfg}: ", "gallery_models.vgg_b.arch: unknown architecture 'vggg'; valid names")


def test_checkpoint_naming_an_unknown_architecture(world, tmp_path, caplog):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    bad = tmp_path / "resnet_a.pt"
    torch.save({**obj, "arch": "resnet9000"}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out,
          f"{bad}: field 'arch': unknown architecture 'resnet9000'")


def test_checkpoint_lacking_a_field_or_of_the_wrong_kind(world, tmp_path, caplog):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    bad = tmp_path / "resnet_a.pt"
    torch.save({k: v for k, v in obj.items() if k != "embedding_dim"}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out,
          f"{bad}: checkpoint lacks field(s) ['embedding_dim']")
    fails(caplog, [*embed_member_args(world, gallery_model=world.transforms[0]), "--out", out], out,
          f"{world.transforms[0]}: expected a {EMBEDDING_FORMAT} checkpoint, got 'cmce-transformation/1'")


class _OpensAFile:
    """Unpickling this calls open(path, "w"): what a hostile checkpoint could do with any callable."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_with_pickled_code_is_refused_without_running_it(world, tmp_path, caplog):
    marker = tmp_path / "was_unpickled"
    hostile = tmp_path / "hostile.pt"
    torch.save({"format": EMBEDDING_FORMAT, "payload": _OpensAFile(marker)}, hostile)
    assert not marker.exists()
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=hostile), "--out", out], out,
          f"{hostile}: not a cmce checkpoint: it holds pickled objects that a weights-only load refuses")
    assert not marker.exists()


def test_truncated_checkpoint(world, tmp_path, caplog):
    """Cut short (a partial copy), it was `not a loadable checkpoint: ValueError: negative seek value -468`."""
    data = world.query.read_bytes()
    out = previous_file(tmp_path / "member.parquet")
    for cut in (500, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"q{cut}.pt"
        bad.write_bytes(data[:cut])
        fails(caplog, [*embed_member_args(world, query=bad), "--out", out], out,
              f"{bad}: the checkpoint's archive has no end record: truncated (a copy cut short?); copy it again")


def test_exit_code_and_message_of_the_installed_command(world, tmp_path):
    """The process itself exits with 2 and prints the error on stderr (no traceback)."""
    garbage = tmp_path / "gallery.parquet"
    garbage.write_bytes(b"not parquet")
    out = shutil.copytree(world.index, tmp_path / "index")
    before = snapshot(out)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "cmce.cli", "build-index", "--gallery", str(garbage), "--out",
                          str(out)], capture_output=True, text=True, env=env)
    assert res.returncode == 2
    assert f"{garbage}: not a readable Parquet file" in res.stderr
    assert "Traceback" not in res.stderr
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_search_with_no_neighbours_is_refused_by_the_parser(world, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["search", "--index", str(world.index), "--query-model", str(world.query), "--dataset",
              str(world.dataset), "--k", "0"])
    assert exc.value.code == 2
    assert "argument --k: must be at least 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- an output that is an input
def _inputs_kept(*paths: Path) -> dict:
    return {p: snapshot(p) for p in paths}


def _alias(path: Path, link: str) -> Path:
    """`path` itself, or a new symbolic or hard link to it."""
    if link == "same path":
        return path
    alias = path.with_name(f"{link.replace(' ', '_')}_{path.name}")
    (alias.symlink_to if link == "symlink" else alias.hardlink_to)(path)
    return alias


@pytest.mark.parametrize("link", ["same path", "symlink", "hard link"])
def test_an_output_that_is_an_input_is_refused_before_any_work(world, tmp_path, caplog, link):
    query = Path(shutil.copyfile(world.query, tmp_path / "q.pt"))
    dataset = Path(shutil.copyfile(world.dataset, tmp_path / "d.parquet"))
    kept = _inputs_kept(query, dataset)
    out = _alias(query, link)
    fails(caplog, ["fit-transform", "--config", SMOKE, "--dataset", dataset, "--query-model", query,
                   "--gallery-model", world.gallery_models[0], "--out", out], out,
          f"--out {out} would write over the input --query-model {query}")
    out = _alias(dataset, link)
    fails(caplog, ["train", "--config", SMOKE, "--model", "query", "--dataset", dataset, "--out", out], out,
          f"--out {out} would write over the input --dataset {dataset}")
    assert _inputs_kept(query, dataset) == kept


def test_an_index_folder_holding_its_gallery_is_refused(world, tmp_path, caplog):
    folder = tmp_path / "served"
    folder.mkdir()
    gallery = Path(shutil.copyfile(world.gallery, folder / "gallery.parquet"))
    kept = _inputs_kept(gallery)
    fails(caplog, ["build-index", "--gallery", gallery, "--out", folder], folder,
          f"--out {folder} would write over the input --gallery {gallery}")
    assert _inputs_kept(gallery) == kept


def test_an_output_inside_an_input_folder_is_refused(world, tmp_path, caplog):
    """evaluate --index I --out I/eval wrote its folder into the index; the next build-index of I then refused
    the stranger it held."""
    index = Path(shutil.copytree(world.index, tmp_path / "index"))
    kept = snapshot(index)
    out = index / "eval"
    fails(caplog, [*evaluate_args(world), "--index", index, "--out", out], out,
          f"--out {out} is inside the input folder --index {index}; write it elsewhere")
    assert snapshot(index) == kept


def test_the_lifecycle_steps_may_still_replace_the_gallery_they_grow(world, tmp_path):
    single = tmp_path / "single.parquet"
    assert main(["combine", "--member", str(world.members[0]), "--out", str(single)]) == 0
    assert main(["add-member", "--gallery", str(single), "--member", str(world.members[1]),
                 "--out", str(single)]) == 0
    assert read_metadata(single)["members"] == read_metadata(world.gallery)["members"]


@pytest.mark.parametrize("layout", [pa.list_(pa.float64()), pa.large_list(pa.float32()), pa.list_(pa.float16())])
def test_a_gallery_rewritten_by_another_tool_is_indexed_as_the_written_one(world, tmp_path, caplog, layout):
    """pandas and Polars write list<double>: the same vectors were refused ("expected fixed_size_list<float32>").
    A step that extends the file names its column instead."""
    def rewrite(path: Path, to: Path) -> Path:
        table = pq.read_table(path)
        fields = [pa.field(f.name, layout) if pa.types.is_fixed_size_list(f.type) else f for f in table.schema]
        pq.write_table(table.cast(pa.schema(fields, metadata=table.schema.metadata)), to)
        return to

    gallery = rewrite(world.gallery, tmp_path / "rewritten.parquet")
    kept = _inputs_kept(gallery)
    assert main(["build-index", "--gallery", str(gallery), "--out", str(tmp_path / "index")]) == 0
    from cmce.index import load_index

    mine, theirs = load_index(world.index), load_index(tmp_path / "index")
    assert theirs.ids == mine.ids
    tolerance = 1e-3 if layout.value_type == pa.float16() else 1e-6
    np.testing.assert_allclose(theirs.index.reconstruct_n(0, theirs.index.ntotal),
                               mine.index.reconstruct_n(0, mine.index.ntotal), atol=tolerance)
    assert _inputs_kept(gallery) == kept
    assert main(["combine", "--member", str(world.members[0]), "--out", str(tmp_path / "single.parquet")]) == 0
    single = rewrite(tmp_path / "single.parquet", tmp_path / "single_rewritten.parquet")
    out = tmp_path / "grown.parquet"
    fails(caplog, ["add-member", "--gallery", single, "--member", world.members[1], "--out", out], out,
          f"{single}: column 'embedding' has type", "not one rewritten by another tool")


# ---------------------------------------------------------------- numeric flags and checkpoint fields
@pytest.mark.parametrize("flag,value,message", [("--batch-size", "0", "must be at least 1, got 0"),
                                                ("--batch-size", "-8", "must be at least 1, got -8"),
                                                ("--workers", "-1", "must be from 0 to 64, got -1")])
def test_a_numeric_flag_out_of_range_is_one_line_naming_it(world, tmp_path, capsys, flag, value, message):
    out = tmp_path / "member.parquet"
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in embed_member_args(world)] + ["--out", str(out), flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: {message}" in err
    assert not out.exists()


@pytest.mark.parametrize("flag,value,message", [("--threads", "-1", "must be from 1 to 1024, got -1"),
                                                ("--limit", "-1", "must be at least 0, got -1")])
def test_search_flags_out_of_range(world, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main([*([flag, value] if flag == "--threads" else []), "search", "--index", str(world.index),
              "--query-model", str(world.query), "--dataset", str(world.dataset),
              *([flag, value] if flag == "--limit" else [])])
    assert exc.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("field,value", [("in_channels", -1), ("width", 10**7), ("embedding_dim", 0),
                                         ("image_size", 2.5), ("name", "../../x")])
def test_a_crafted_checkpoint_field_is_refused_before_a_model_is_built(world, tmp_path, caplog, field, value):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    bad = tmp_path / "resnet_a.pt"
    torch.save({**obj, field: value}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out, f"{bad}: field '{field}'")


@pytest.mark.parametrize("field,value,message", [
    ("arch", ["resnet"], "field 'arch' must be non-empty text, got ['resnet']"),
    ("arch", 7, "field 'arch' must be non-empty text, got 7"),
    ("scale", "abc", "field 'scale' must be a positive finite number, got 'abc'"),
    ("scale", float("nan"), "field 'scale' must be a positive finite number, got nan"),
    ("scale", True, "field 'scale' must be a positive finite number, got True"),
    ("scale", -1.0, "field 'scale' must be a positive finite number, got -1.0"),
    ("name", ["query"], "field 'name': ['query'] is not a model name"),
    ("meta", [1], "field 'meta' must be a mapping, got [1]"),
    ("meta", {"history": "x"}, "field 'meta' 'history' must be a list of {name: number} rows, got 'x'"),
    ("meta", {"history": [{"loss": "x"}]}, "field 'meta' 'history' must be a list of {name: number} rows"),
    ("meta", {"teacher_sha256": 12345}, "field 'meta' 'teacher_sha256' must be a sha256 (64 lowercase hex digits), "
                                        "got 12345"),
    ("classifier", torch.zeros(10, 8, dtype=torch.long), "field 'classifier' is a torch.int64 tensor"),
    ("classifier", [[0.0] * 8], "classifier is a list, not a dense tensor"),
    ("state_dict", [], "field 'state_dict' is a list, not a mapping"),
    ("width", 4.0, "field 'width' must be an integer in [1, 4096], got 4.0"),
    ("in_channels", True, "field 'in_channels' must be an integer in [1, 3], got True"),
    ("in_channels", 2, "field 'in_channels' must be 1 or 3 (grey or RGB, what the image decoder gives), got 2"),
])
def test_a_checkpoint_field_of_the_wrong_type_is_refused_naming_it(world, tmp_path, caplog, field, value, message):
    """Every field an embedding model (query, gallery, KD student) is read from, checked before use."""
    obj = torch.load(world.query, weights_only=True)
    bad = tmp_path / "q.pt"
    torch.save({**obj, field: value}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, query=bad), "--out", out], out, f"{bad}: {message}")


def test_a_checkpoint_whose_sizes_together_are_too_large_is_refused_before_a_model_is_built(world, tmp_path,
                                                                                           caplog, monkeypatch):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    bad = tmp_path / "resnet_a.pt"
    torch.save({**obj, "width": 4096, "embedding_dim": 65536}, bad)
    built = []
    monkeypatch.setattr("cmce.checkpoint.EmbeddingNet", lambda *a, **k: built.append(a) or EmbeddingNet(*a, **k))
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out,
          f"{bad}: fields 'width' 4096 and 'embedding_dim' 65536 (arch 'resnet') imply a network of",
          "parameters; the limit is 268,435,456")
    assert all(width <= 4 for *_, width in built)  # only the (tiny) query model was built


@pytest.mark.parametrize("field,value,message", [
    ("query_model_sha256", 12345, "field 'query_model_sha256' must be a sha256 (64 lowercase hex digits), got 12345"),
    ("gallery_model_sha256", "abc", "field 'gallery_model_sha256' must be a sha256 (64 lowercase hex digits), "
                                    "got 'abc'"),
    ("gallery_model_sha256", "A" * 64, "field 'gallery_model_sha256' must be a sha256 (64 lowercase hex digits)"),
    ("gallery_model", None, "field 'gallery_model': None is not a model name"),
    ("gallery_model", "../x", "field 'gallery_model': '../x' is not a model name"),
    ("history", {"loss": 1}, "field 'history' must be a list of {name: number} rows"),
    ("depth", 2.0, "field 'depth' must be an integer in [1, 64], got 2.0"),
    ("depth", [2], "field 'depth' must be an integer in [1, 64], got [2]"),
    ("in_dim", "8", "field 'in_dim' must be an integer in [1, 65536], got '8'"),
    ("state_dict", None, "field 'state_dict' is a NoneType, not a mapping"),
])
def test_a_transformation_field_of_the_wrong_type_is_refused_naming_it(world, tmp_path, caplog, field, value,
                                                                       message):
    obj = torch.load(world.transforms[0], weights_only=True)
    bad = tmp_path / "t.pt"
    torch.save({**obj, field: value}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, transform=bad), "--out", out], out, f"{bad}: {message}")


def test_a_transformation_whose_sizes_together_are_too_large_is_refused(world, tmp_path, caplog, monkeypatch):
    obj = torch.load(world.transforms[0], weights_only=True)
    bad = tmp_path / "t.pt"
    torch.save({**obj, "hidden_dim": 65536, "depth": 64}, bad)
    monkeypatch.setattr("cmce.transform.build_mlp", None)  # building it would fail the test with a TypeError
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, transform=bad), "--out", out], out,
          f"{bad}: fields 'hidden_dim' 65536 and 'depth' 64 imply an MLP of", "the limit is 268,435,456")


def test_a_whole_pickled_module_is_refused_in_one_plain_line(world, tmp_path, caplog):
    """torch.save(net): torch's refusal is a page with terminal colour codes and advice to load unsafely."""
    bad = tmp_path / "q.pt"
    torch.save(EmbeddingNet("query_cnn", 1, 8, 4), bad)
    out = previous_file(tmp_path / "member.parquet")
    error = fails(caplog, [*embed_member_args(world, query=bad), "--out", out], out,
                  f"{bad}: not a cmce checkpoint: it holds pickled objects that a weights-only load refuses "
                  "(cmce.models.EmbeddingNet)")
    assert "\x1b" not in error and "weights_only" not in error and "\n" not in error


def test_a_crafted_transformation_size_is_refused(world, tmp_path, caplog):
    obj = torch.load(world.transforms[0], weights_only=True)
    bad = tmp_path / "t.pt"
    torch.save({**obj, "hidden_dim": 10**9}, bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, transform=bad), "--out", out], out,
          f"{bad}: field 'hidden_dim' must be an integer in [1, 65536], got 1000000000")


@pytest.mark.parametrize("raw,message", [(b"{not json", "its cmce metadata is not JSON"),
                                         (b"[1, 2]", "its cmce metadata is a JSON list, not an object"),
                                         (None, "its cmce metadata holds key 'kind' given twice in one JSON object"),
                                         (b"[" * 100_000 + b"]" * 100_000, "its cmce metadata is not JSON")])
def test_gallery_metadata_that_is_not_a_json_object(world, tmp_path, caplog, raw, message):
    table = pq.read_table(world.gallery)
    gallery = tmp_path / "gallery.parquet"
    if raw is None:  # a key twice: the last value was read silently
        raw = table.schema.metadata[b"cmce"].replace(b'"kind":', b'"kind": "query", "kind":', 1)
        assert raw != table.schema.metadata[b"cmce"]
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cmce": raw}), gallery)
    fails(caplog, ["build-index", "--gallery", gallery, "--out", tmp_path / "index"], tmp_path / "index",
          f"{gallery}: {message}")
    fails(caplog, [*evaluate_args(world, gallery=gallery), "--out", tmp_path / "eval"], tmp_path / "eval",
          f"{gallery}: {message}")


def test_gallery_metadata_with_the_cmce_key_twice_is_refused(world, tmp_path, caplog):
    """pyarrow reads the first of two `cmce` entries; another reader may take the second, so such a file names two
    provenances and none is believed."""
    table = pq.read_table(world.gallery)
    second = json.dumps({**json.loads(table.schema.metadata[b"cmce"]), "query_model": "another"}).encode()
    schema = table.schema.with_metadata(pa.KeyValueMetadata([*table.schema.metadata.items(), (b"cmce", second)]))
    gallery = tmp_path / "gallery.parquet"
    pq.write_table(table.cast(schema), gallery)
    fails(caplog, ["build-index", "--gallery", gallery, "--out", tmp_path / "index"], tmp_path / "index",
          f"{gallery}: its Parquet schema holds the cmce metadata key more than once")


def test_a_shard_of_a_gallery_is_not_indexed_evaluated_or_grown_as_if_whole(world, tmp_path, caplog):
    """Shard 0/2 of two members, combined (as documented), was indexed with exit 0: half the gallery, its rejection
    taken within the half, then searched without a word."""
    members = []
    for k in range(2):
        member = tmp_path / f"m{k}.parquet"
        assert main([str(a) for a in embed_member_args(world, gallery_model=world.gallery_models[k],
                                                          transform=world.transforms[k])]
                    + ["--shard", "0/2", "--out", str(member)]) == 0
        members += ["--member", str(member)]
    shard = tmp_path / "shard.parquet"
    assert main(["combine", *members, "--out", str(shard)]) == 0
    message = f"{shard}: shard 0/2 of a gallery; {{}} takes a whole gallery: merge the shards first"
    fails(caplog, ["build-index", "--gallery", shard, "--out", tmp_path / "index"], tmp_path / "index",
          message.format("build-index"))
    fails(caplog, [*evaluate_args(world, gallery=shard), "--out", tmp_path / "eval"], tmp_path / "eval",
          message.format("evaluate"))
    added = tmp_path / "added.parquet"
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", shard,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0], "--out", added], added,
          message.format("add-gallery-model"))


# ---------------------------------------------------------------- index metadata, empty galleries, full disks
def _search(world: World, index: Path) -> list:
    return ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset, "--limit", "2"]


def test_index_metadata_without_its_keys_or_with_foreign_search_params(world, tmp_path, caplog):
    import json

    index = shutil.copytree(world.index, tmp_path / "index")
    meta = json.loads((world.index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    fails(caplog, _search(world, index), index, f"{index}/meta.json: lacks key(s) ['files']")
    (index / "meta.json").write_text(json.dumps({**meta, "search_params": {"nprobe": 4}}))  # a flat index has none
    fails(caplog, _search(world, index), index, f"{index}/meta.json: search_params {{'nprobe': 4}} do not apply")


def test_an_empty_gallery_is_not_indexed(world, tmp_path, caplog):
    table = pq.read_table(world.gallery)
    empty = tmp_path / "empty.parquet"
    pq.write_table(table.slice(0, 0), empty)
    out = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", empty, "--out", out], out, f"{empty}: the gallery has no rows")


def test_a_failed_index_write_is_one_line_and_leaves_no_index(world, tmp_path, caplog, monkeypatch):
    import faiss

    def refused(index, writer):
        raise RuntimeError("Error in faiss::write_index\n'idx' failed: don't know how to serialize this type of index")

    monkeypatch.setattr(faiss, "write_index", refused)
    out = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", out], out,
          f"{out}: could not write the index: 'idx' failed: don't know how to serialize")


def test_an_index_cut_by_a_file_size_limit_is_not_published(world, tmp_path):
    """Under `ulimit -f` faiss's writer only printed `index.faiss close error: File too large` and returned: the
    index was published cut short over the previous one, meta.json holding the cut file's hash, exit 0."""
    import resource

    from tests.serve_world import cmce_env

    out = shutil.copytree(world.index, tmp_path / "index")
    before = snapshot(out)
    limit = (out / "index.faiss").stat().st_size // 2

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(world.gallery), "--out",
                          str(out)], capture_output=True, text=True, env=cmce_env(), timeout=300,
                         preexec_fn=small_files)
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert res.returncode == 2 and len(errors) == 1, res.stderr[-2000:]
    assert f"{out}: not written: File too large" in errors[0], errors
    assert "close error" not in res.stderr and "Traceback" not in res.stderr
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["file", "class folder"])
def test_a_name_that_is_not_utf8_is_named_in_the_error(tmp_path, caplog, where):
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    png = encode(Image.fromarray(NOISE[:8, :8]))
    if where == "file":
        (root / "dog" / os.fsdecode(b"caf\xe9.png")).write_bytes(png)
        shown = ascii(os.fsdecode(b"dog/caf\xe9.png"))
    else:
        folder = root / os.fsdecode(b"ch\xe2t")
        folder.mkdir()
        (folder / "0.png").write_bytes(png)
        shown = ascii(os.fsdecode(b"ch\xe2t"))
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          f"{root}: {shown}: the name is not valid UTF-8; rename it")


# ---------------------------------------------------------------- a fresh hostile trial's wrong cases
def test_index_files_named_in_meta_json_are_never_paths(world, tmp_path, caplog):
    import json

    index = shutil.copytree(world.index, tmp_path / "index")
    meta = json.loads((index / "meta.json").read_text())
    for name in ("../../../../etc/passwd", "/dev/zero"):
        (index / "meta.json").write_text(json.dumps({**meta, "files": {**meta["files"], name: "0" * 64}}))
        fails(caplog, _search(world, index), index, f"{index}/meta.json: 'files' must name exactly")


def test_negative_uncertainty_is_refused(world, tmp_path, caplog):
    unc = pq.read_table(world.gallery).column("uncertainty").to_numpy().copy()
    unc[:] = -5.0
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", uncertainty=pa.array(unc))
    out = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", gallery, "--out", out, "--reject-fraction", "0.1"], out,
          f"{gallery}: column 'uncertainty' has negative values (first: row 0)")


def test_a_diverged_training_run_writes_no_model(world, tmp_path, caplog):
    out = tmp_path / "q.pt"
    fails(caplog, ["train", "--config", SMOKE, *TINY, "--set", "train.lr=1e30", "--set", "train.epochs=3",
                   "--model", "query", "--dataset", world.dataset, "--out", out], out,
          "query: epoch ", ": loss nan: training diverged, nothing written")  # stopped at the epoch


def test_an_infinite_loss_with_finite_weights_stops_at_its_epoch_and_keeps_the_model_at_out(world, tmp_path, caplog):
    """A loss scale of 1e37 gives an infinite loss while the weights stay finite: the model was written over --out,
    exit 2, then refused by every step for the infinity in its history. The epoch is named, --out kept."""
    out = shutil.copy(world.query, tmp_path / "q.pt")
    fails(caplog, ["train", "--config", SMOKE, *TINY, "--set", "train.scale=1e37", "--set", "train.epochs=1",
                   "--model", "query", "--dataset", world.dataset, "--out", out], out,
          "query: epoch 1: loss inf", "training diverged, nothing written")
    t = shutil.copy(world.transforms[0], tmp_path / "t.pt")
    fails(caplog, ["fit-transform", "--config", SMOKE, *TINY, "--set", "transform.scale=3e38", "--set",
                   "transform.lam=1e-35", "--set", "transform.epochs=1", "--dataset", world.dataset, "--query-model",
                   world.query, "--gallery-model", world.gallery_models[0], "--out", t], t,
          "epoch 1: loss inf", "training diverged, nothing written")


def test_a_model_its_loader_would_refuse_is_not_written_over_out(world, tmp_path, caplog):
    """The check runs on the written file before it replaces --out (a history row with an infinity, say)."""
    model = load_embedding_model(world.query)
    model.meta = {**model.meta, "history": [{"epoch": 1, "loss": float("inf")}]}
    out = shutil.copy(world.query, tmp_path / "q.pt")
    before = out.read_bytes()
    with pytest.raises(CheckpointError, match=rf"^{out}: not written: field 'meta' 'history' must be a list of "):
        save_embedding_model(model, out, 4)
    assert out.read_bytes() == before and leftovers(tmp_path) == []


def test_a_kd_teacher_whose_student_name_would_be_too_long_is_refused_before_training(world, tmp_path, caplog):
    """A gallery model named with 62-64 characters makes a student `kd_<name>` longer than a model name: refused
    once trained, after its --out (a model) had been replaced and its resume state deleted."""
    teacher = tiny_model(tmp_path / "long.pt", "a" * 64, "resnet", 12, seed=2, role="gallery")
    out = shutil.copy(world.query, tmp_path / "kd.pt")
    fails(caplog, ["train", "--config", SMOKE, *TINY, "--set", "kd.epochs=1", "--kd-teacher", teacher, "--dataset",
                   world.dataset, "--out", out], out, f"--kd-teacher {teacher}: its KD student's name:",
          "the teacher's name has 64 characters; at most 61")
    long = {"arch": "resnet", "embedding_dim": 12, "width": 4, "seed": 9}
    with pytest.raises(ConfigError, match=r"gallery_models.b{62}.name: with kd.enabled its KD student is named "):
        load_config(SMOKE, {f"gallery_models.{'b' * 62}": long})
    assert load_config(SMOKE, {f"gallery_models.{'b' * 62}": long, "kd.enabled": False})  # no student, no limit


def test_dot_dots_after_a_missing_folder_of_an_output_are_taken_before_any_check(world, tmp_path, caplog,
                                                                                 monkeypatch):
    """`--out missing/../ds.parquet` left `missing/` behind, empty (mkdir made it for the kernel to climb out of), and
    its check found no file through the missing folder: a gallery at `missing/../g.pt` was replaced by a model. Folders
    that exist (a link among them) are still the kernel's to climb."""
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-data", "--config", str(SMOKE), *TINY, "--out", "missing/deeper/../../ds.parquet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.parquet"]
    gallery = Path(shutil.copy(world.gallery, tmp_path / "g.pt"))
    fails(caplog, ["train", "--config", SMOKE, "--set", "train.epochs=1", "--model", "query", "--dataset",
                   tmp_path / "ds.parquet", "--out", "missing/../g.pt"], gallery,
          "train: g.pt: holds a Parquet file; this step writes a checkpoint file")
    (tmp_path / "real" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "inner")
    assert main(["prepare-data", "--config", str(SMOKE), *TINY, "--out", "link/../ds2.parquet"]) == 0
    assert (tmp_path / "real" / "ds2.parquet").is_file() and not (tmp_path / "ds2.parquet").exists()


def test_a_gate_with_no_metrics_is_refused(tmp_path, caplog):
    out = previous_file(tmp_path / "dataset.parquet")
    fails(caplog, ["prepare-data", "--config", SMOKE, "--set", "lifecycle.gate.metrics=[]", "--out", out], out,
          "lifecycle.gate.metrics: must list at least one value")


def test_mlflow_parent_without_a_tracking_uri_is_refused_before_any_work(world, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "index"
    fails(caplog, ["--mlflow-parent", "deadbeef", "build-index", "--gallery", world.gallery, "--out", out], out,
          "--mlflow-parent needs --mlflow-uri or MLFLOW_TRACKING_URI")


def test_an_output_folder_that_is_a_symlink_or_holds_an_input(world, tmp_path, caplog):
    real = shutil.copytree(world.index, tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", link], link, f"{link}: is a symbolic link")
    work = tmp_path / "work"
    work.mkdir()
    gallery = Path(shutil.copyfile(world.gallery, work / "member_x.parquet"))
    kept = _inputs_kept(gallery)
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", gallery,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0],
                   "--out", tmp_path / "grown.parquet", "--work-dir", work], tmp_path / "grown.parquet",
          f"--work-dir {work} would write over the input --gallery {gallery}")
    assert _inputs_kept(gallery) == kept
    # two outputs, one inside the other: refused before the fit and the embedding, not after them
    v2 = tmp_path / "v2"
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", world.gallery,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0],
                   "--out", v2 / "gallery.parquet", "--index-out", v2], v2,
          f"--out {v2 / 'gallery.parquet'} and --index-out {v2} would write over each other")


@pytest.mark.parametrize("flag,value", [("--workers", "5000"), ("--threads", "100000")])
def test_flags_beyond_their_upper_bound(world, tmp_path, capsys, flag, value):
    args = [str(a) for a in embed_member_args(world)] + ["--out", str(tmp_path / "m.parquet")]
    with pytest.raises(SystemExit) as exc:
        main([flag, value, *args] if flag == "--threads" else [*args, flag, value])
    assert exc.value.code == 2 and f"argument {flag}: must be from " in capsys.readouterr().err


# ---------------------------------------------------------------- output paths checked before any work
@pytest.mark.parametrize("index_out, message", [
    ("file", "is a file, not an output folder"),
    ("foreign", "which this step does not write"),
    pytest.param("read_only", "is read-only",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")),
])
def test_a_lifecycle_step_checks_every_output_before_it_replaces_the_gallery(world, tmp_path, caplog,
                                                                            index_out, message):
    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery.parquet"))
    new_model = tiny_model(tmp_path / "extra_c.pt", "extra_c", "resnet", 12, seed=4)
    kept = _inputs_kept(gallery)
    target = tmp_path / "index"
    if index_out == "file":
        target.write_bytes(PREVIOUS)
    else:
        shutil.copytree(world.index, target)
        if index_out == "foreign":
            (target / "notes.txt").write_text("mine")
        else:
            target.chmod(0o555)
    try:
        fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", gallery,
                       "--query-model", world.query, "--gallery-model", new_model, "--out", gallery,
                       "--work-dir", tmp_path / "work", "--index-out", target], target, f"{target}: ", message)
    finally:
        if target.is_dir():
            target.chmod(0o755)
    assert _inputs_kept(gallery) == kept and not (tmp_path / "work").exists()


@pytest.mark.parametrize("out, message", [
    ("", "--out '': empty; give a value"),
    ("folder/", "is a folder; this output is a file"),
    ("x" * 230 + ".parquet", "the file name is longer than 200 bytes"),
    ("a_file/gallery.parquet", "cannot be created: "),
])
def test_output_paths_that_cannot_be_written_are_named_before_any_work(world, tmp_path, caplog, monkeypatch,
                                                                      out, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a_file").write_bytes(PREVIOUS)
    fails(caplog, ["combine", "--member", world.members[0], "--out", out], tmp_path / "folder", message)


# ---------------------------------------------------------------- tracking and the model registry
def test_a_parent_run_that_cannot_take_the_step_is_refused_before_any_work(world, tmp_path, caplog, monkeypatch):
    from cmce.tracking import end_run, start_parent_run
    from cmce.tracking_store import mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_parent_run(uri, "parent", {})
    out = tmp_path / "index"
    build = ["build-index", "--gallery", world.gallery, "--out", out]
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", "0" * 32, *build], out, f"--mlflow-parent {'0' * 32}: "
          "not found at")
    absent = tmp_path / "elsewhere" / "mlflow.db"
    fails(caplog, ["--mlflow-uri", f"sqlite:///{absent}", "--mlflow-parent", run_id, *build], out,
          "no tracking database there")
    assert not absent.parent.exists()  # nothing is created outside the output folder
    end_run(uri, run_id)
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", run_id, *build], out, "the run is FINISHED")
    deleted = start_parent_run(uri, "deleted", {})
    mlflow_client(uri).delete_run(deleted)  # its status stays RUNNING
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", deleted, *build], out, "the run is deleted")


def sqlite_file(path: Path, kind: str) -> Path:
    """A file where a tracking store is expected that is none: another application's database, text, random
    bytes, a folder, an empty file."""
    import sqlite3

    if kind == "foreign":
        with contextlib.closing(sqlite3.connect(path)) as con, con:
            con.execute("CREATE TABLE users (id INTEGER, name TEXT)")
    elif kind == "text":
        path.write_text("not a database\n")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "folder":
        path.mkdir()
    else:
        path.touch()
    return path


@pytest.mark.parametrize("kind, message", [
    ("foreign", "is a sqlite database of another application (no MLflow tables)"),
    ("text", "is not a sqlite database"),
    ("random", "is not a sqlite database"),
    ("folder", "is a folder or special file, not an MLflow sqlite store"),
    ("empty", "is empty, not an MLflow tracking store"),
])
def test_a_sqlite_file_that_is_no_mlflow_store_is_named_and_left_alone(world, tmp_path, caplog, monkeypatch, kind,
                                                                        message):
    """MLflow migrated its tables into another application's database, and retried a folder for 100 s."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = sqlite_file(tmp_path / "store.db", kind)
    before = snapshot(db)
    uri = f"sqlite:///{db}"
    out = tmp_path / "index"
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", "0" * 32, "build-index", "--gallery", world.gallery,
                   "--out", out], out, uri, message)
    if kind != "empty":  # a new parent run may go into an empty file; into nothing else
        track = tmp_path / "track.json"
        fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", uri, "--out", track], track, uri, message)
    assert snapshot(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.db"]


@pytest.mark.parametrize("uri, message", [
    ("./mlruns", "a folder is no tracking store this MLflow accepts"),
    ("postgresql+psycopg2://u@127.0.0.1:1/db", "its database driver is not installed: "),
    ("mysql+nosuchdriver://u@127.0.0.1:1/db", "Can't load plugin"),
])
def test_a_tracking_uri_mlflow_cannot_use_is_named(world, tmp_path, caplog, monkeypatch, uri, message):
    """A database URI without its driver was an ImportError traceback from deep in MLflow; a folder, MLflow's
    paragraph about its filesystem backend."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(sys.modules, "psycopg2", None)  # not installed, whatever this machine has
    out = tmp_path / "index"
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", "0" * 32, "build-index", "--gallery", world.gallery,
                   "--out", out], out, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, message", [
    ("a_file/mlflow.db", "a_file is not a folder"),
    ("/proc/mlflow.db", "cannot be created in /proc"),  # no file can be made there, not even by root
])
def test_a_new_store_that_cannot_be_made_is_named_without_retries(tmp_path, caplog, monkeypatch, where, message):
    """MLflow retried opening a sqlite file it could not create for two minutes, then a traceback."""
    if where.startswith("/proc") and not Path("/proc/self").exists():
        pytest.skip("no /proc here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "a_file").write_bytes(PREVIOUS)
    track = tmp_path / "track.json"
    fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", f"sqlite:///{where}", "--out", track], track,
          f"sqlite:///{tmp_path / where}", message)  # a relative store is named by the absolute path it is read at
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_a_locked_store_is_named_without_waiting_on_retries(world, tmp_path, caplog, monkeypatch):
    import sqlite3

    from cmce.tracking import start_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("cmce.tracking_store.LOCK_WAIT_S", 0.2)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_id = start_parent_run(uri, "parent", {})
    out = tmp_path / "index"
    build = ["--mlflow-uri", uri, "--mlflow-parent", run_id, "build-index", "--gallery", world.gallery, "--out", out]
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")  # another process writing, or stuck
        fails(caplog, build, out, f"{uri}: the store is locked by another process")
        other.execute("ROLLBACK")


def test_a_store_beside_a_journal_left_by_a_crashed_writer_is_used(world, tmp_path, caplog, monkeypatch):
    """sqlite rolls such a journal back at its first write, but the read-only look refused the store ("attempt
    to write a readonly database"); another application's database beside a journal is still named."""
    from cmce.tracking import start_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_id = start_parent_run(uri, "parent", {})
    (tmp_path / "mlflow.db-journal").write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "index"
    assert main(["--mlflow-uri", uri, "--mlflow-parent", run_id, "build-index", "--gallery", str(world.gallery),
                 "--out", str(out)]) == 0
    assert (out / "meta.json").exists()
    foreign = sqlite_file(tmp_path / "other.db", "foreign")
    (tmp_path / "other.db-journal").write_bytes(np.random.default_rng(1).bytes(4096))
    before = snapshot(foreign)
    fails(caplog, ["--mlflow-uri", f"sqlite:///{foreign}", "--mlflow-parent", run_id, "build-index", "--gallery",
                   world.gallery, "--out", tmp_path / "index2"], tmp_path / "index2", "of another application")
    assert snapshot(foreign) == before


def test_a_step_whose_tracking_fails_says_its_outputs_are_written(world, tmp_path, caplog, monkeypatch):
    """The store locked while the step ran: the step's outputs are there, its run is not; one line says which."""
    import sqlite3

    import sqlalchemy

    from cmce import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("cmce.tracking_store.LOCK_WAIT_S", 0.2)
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_id = tracking.start_parent_run(uri, "parent", {})
    other = contextlib.closing(sqlite3.connect(db, isolation_level=None))
    check_parent_run = tracking.check_parent_run

    def lock_after_the_check(*args):
        check_parent_run(*args)
        other.thing.execute("BEGIN EXCLUSIVE")  # another process, while the step runs

    monkeypatch.setattr(tracking, "check_parent_run", lock_after_the_check)

    def tracked(out: Path) -> str:
        caplog.clear()
        assert main(["--mlflow-uri", uri, "--mlflow-parent", run_id, "build-index", "--gallery", str(world.gallery),
                     "--out", str(out)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert (out / "meta.json").is_file()
        return errors[0]

    with other:
        assert "build-index: its outputs are written but not tracked: " in tracked(tmp_path / "index")
        assert "the store is locked by another process" in caplog.text
        other.thing.execute("ROLLBACK")
    monkeypatch.setattr(tracking, "check_parent_run", check_parent_run)

    def database_error(*args, **kwargs):  # as MLflow's engine raises it when the lock comes after the look
        raise sqlalchemy.exc.OperationalError("UPDATE runs", {}, sqlite3.OperationalError("database is locked"))

    monkeypatch.setattr(tracking, "log_step", database_error)
    error = tracked(tmp_path / "index2")
    assert f"{uri}: build-index: its outputs are written but not tracked: " in error and "database is locked" in error


def test_a_registry_that_is_not_there_is_named_not_created(world, tmp_path, caplog, monkeypatch):
    """A models:/ argument read against a sqlite path with no store made a 1 MB registry in the working folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///registry.db")
    out = tmp_path / "unused"
    fails(caplog, ["search", "--index", world.index, "--dataset", world.dataset, "--query-model",
                   "models:/cmce-query@production"], out, "sqlite:///registry.db: no tracking database there")
    fails(caplog, ["serve", "--index", world.index, "--query-model", "models:/cmce-query@production", "--port", "0"],
          out, "models:/cmce-query@production", "sqlite:///registry.db: no tracking database there")
    fails(caplog, ["track-end", "--mlflow-parent", "0" * 32], out, "sqlite:///registry.db: no tracking database")
    assert list(tmp_path.iterdir()) == []


def test_tracking_flags_before_track_start_and_track_end_are_not_dropped(tmp_path, monkeypatch, capsys):
    """`cmce --mlflow-uri URI track-start` ignored URI (the subcommand's own flag defaulted over it) and made
    ./runs/mlflow.db instead."""
    import json

    from cmce.tracking_store import mlflow_client

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert main(["--mlflow-uri", uri, "track-start", "--config", str(SMOKE)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["uri"] == uri and not (tmp_path / "runs").exists()
    assert main(["--mlflow-uri", uri, "--mlflow-parent", info["run_id"], "track-end"]) == 0
    assert mlflow_client(uri).get_run(info["run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("flag, env, message", [
    (None, "  ", "MLFLOW_TRACKING_URI '  ' is blank"),
    (" ", None, "--mlflow-uri ' ': empty; give a value"),
    (None, "sqlite:///m.db ", "MLFLOW_TRACKING_URI 'sqlite:///m.db ' has spaces at its start or end"),
    # a scheme MLflow has no store for failed in the first task that opened a run, retried for minutes
    (None, "ftp://127.0.0.1/x", "MLFLOW_TRACKING_URI ftp://127.0.0.1/x: MLflow keeps no runs at a ftp: URI"),
    ("databricks", None, "--mlflow-uri databricks: no Databricks workspace configured (DATABRICKS_HOST"),
    (None, "http://[::1:80", "MLFLOW_TRACKING_URI http://[::1:80: not a valid URL (Invalid IPv6 URL)"),
    # SQLAlchemy opens `app db.sqlite`, cmce's checks read `app%20db.sqlite`: another application's file was migrated
    ("sqlite:///app%20db.sqlite", None, "--mlflow-uri sqlite:///app%20db.sqlite: holds a % escape"),
])
def test_a_blank_tracking_uri_is_named(world, tmp_path, caplog, monkeypatch, flag, env, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABRICKS_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.databrickscfg
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    track = tmp_path / "track.json"
    fails(caplog, ["track-start", "--config", SMOKE, *(["--mlflow-uri", flag] if flag else []), "--out", track],
          track, message)
    assert list(tmp_path.iterdir()) == []


def test_registered_models_are_fetched_into_scratch_and_unknown_ones_named(world, tmp_path, caplog, monkeypatch,
                                                                          capsys):
    import tempfile

    from cmce.registry import register_version
    from cmce.tracking import start_parent_run
    from cmce.tracking_store import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where a leak would show
    (tmp_path / "tmp").mkdir()
    run_id = start_parent_run(uri, "parent", {})
    client = mlflow_client(uri)
    client.log_artifact(run_id, str(world.query), artifact_path="registered/q")
    source = f"{client.get_run(run_id).info.artifact_uri}/registered/q"
    register_version(client, "q", source, run_id, file_sha256(world.query))
    search = ["search", "--index", world.index, "--dataset", world.dataset, "--limit", "2", "--query-model"]
    assert main([str(a) for a in search] + ["models:/q@candidate"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    out = tmp_path / "unused"
    fails(caplog, [*search, "models:/absent@candidate"], out, "models:/absent@candidate: ")
    fails(caplog, [*search, "models:/q/../../x"], out, "models:/q/../../x: ")
    client.log_artifact(run_id, str(world.transforms[0]), artifact_path="registered/t")
    register_version(client, "t", f"{client.get_run(run_id).info.artifact_uri}/registered/t", run_id,
                     file_sha256(world.transforms[0]))
    error = fails(caplog, [*search, "models:/t@candidate"], out, "models:/t@candidate: expected a ")
    assert str(tmp_path) not in error  # the registered model is named, not its download
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_registered_file_changed_since_its_registration_is_refused(world, tmp_path, caplog, monkeypatch):
    """A registry fetch believed the artifact store: another model's file copied over a registered query model was
    used (exported, searched with), exit 0. The file must hash to the version's sha256 tag."""
    import shutil as sh
    from urllib.parse import urlparse

    from cmce.registry import register_version
    from cmce.tracking import start_parent_run
    from cmce.tracking_store import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = start_parent_run(uri, "parent", {}, artifact_location=str(tmp_path / "artifacts"))
    client = mlflow_client(uri)
    client.log_artifact(run_id, str(world.query), artifact_path="registered/q")
    source = f"{client.get_run(run_id).info.artifact_uri}/registered/q"
    register_version(client, "q", source, run_id, file_sha256(world.query))
    search = ["search", "--index", world.index, "--dataset", world.dataset, "--limit", "1", "--query-model",
              "models:/q@candidate"]
    assert main([str(a) for a in search]) == 0
    sh.copyfile(world.other_query, Path(urlparse(source).path) / world.query.name)
    fails(caplog, search, tmp_path / "unused", "models:/q@candidate: the registered file's sha256 is "
          f"{file_sha256(world.other_query)[:12]}, but version 1 was registered as {file_sha256(world.query)[:12]}")


def test_a_registered_model_is_read_under_pythonwarnings_error(world, tmp_path):
    """PYTHONWARNINGS=error (as CI jobs set it) turned SQLAlchemy's deprecation notice inside MLflow's registry into
    `models:/…: registry …: The noload loader strategy is deprecated`: every registered model was refused."""
    from cmce.registry import register_version
    from cmce.tracking import start_parent_run
    from cmce.tracking_store import mlflow_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_parent_run(uri, "parent", {})
    client = mlflow_client(uri)
    client.log_artifact(run_id, str(world.query), artifact_path="registered/q")
    register_version(client, "q", f"{client.get_run(run_id).info.artifact_uri}/registered/q", run_id,
                     file_sha256(world.query))
    env = {**os.environ, "PYTHONWARNINGS": "error", "MLFLOW_TRACKING_URI": uri,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "cmce", "search", "--index", str(world.index), "--dataset",
                          str(world.dataset), "--limit", "1", "--query-model", "models:/q@candidate"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0 and len(res.stdout.splitlines()) == 1, res.stderr[-2000:]


def test_a_deleted_working_folder_is_named_before_torch_dies_of_it(tmp_path):
    """In a working folder deleted under the shell, `import torch` ended the process with MKL's "Cannot load
    libtorch_cpu.so" (a broken install, it seemed), before cmce said a word."""
    src = str(Path(__file__).resolve().parents[1] / "src")  # no empty entry: Python cannot make one absolute here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    (tmp_path / "gone").mkdir()
    res = subprocess.run(["sh", "-c", 'cd gone && rmdir ../gone && exec "$0" -m cmce build-index --help',
                          sys.executable], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr == "cmce: the working folder no longer exists (deleted or moved); cd to an existing folder\n"


# ---------------------------------------------------------------- weights, labels, flags, interrupts
@pytest.mark.parametrize("tamper, message", [
    ("sparse", "is a torch.sparse_coo tensor, not a dense tensor"),
    ("nan", "holds NaN or infinite values"),
    ("no_classes", "field 'classifier' has shape (0, 12)"),
    ("list", "is a list, not a dense tensor"),
    ("meta", "is a meta tensor: a shape with no values"),  # was a traceback from Tensor.item()
])
def test_checkpoint_weights_are_checked_naming_the_file(world, tmp_path, caplog, tamper, message):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    state = dict(obj["state_dict"])
    key = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    if tamper == "sparse":
        state[key] = state[key].to_sparse()
    elif tamper == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif tamper == "list":
        state[key] = state[key].tolist()
    elif tamper == "meta":
        state[key] = state[key].to("meta")
    bad = tmp_path / "resnet_a.pt"
    torch.save({**obj, "state_dict": state, **({"classifier": torch.zeros(0, 12)} if tamper == "no_classes" else {})},
               bad)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out, f"{bad}: ", message)


def test_a_label_beyond_the_class_limit_is_refused_before_training(world, tmp_path, caplog):
    from cmce.data.readers import MAX_CLASSES

    table = pq.read_table(world.dataset)
    labels = table.column("label").to_numpy().copy()
    labels[0] = 2**31 - 1  # one classifier row per label up to the largest: 2^31 × dim floats
    dataset = without_classes(rewrite(world.dataset, tmp_path / "dataset.parquet", label=pa.array(labels, pa.int32())))
    out = tmp_path / "q.pt"
    fails(caplog, ["train", "--config", SMOKE, "--model", "query", "--dataset", dataset, "--out", out], out,
          f"{dataset}: column 'label' has the value 2147483647; labels are class numbers 0..{MAX_CLASSES - 1}")


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", SMOKE, "--model", "query", "--kd-teacher", "T.pt", "--dataset", "D", "--out", "O"],
     "give --model NAME or --kd-teacher CHECKPOINT (one of them)"),
    (["search", "--index", "I", "--query-model", "Q", "--images", "a.png", "--dataset", "D"],
     "give --images FILE... or --dataset FILE (one of them)"),
    (["search", "--index", "I", "--query-model", "Q", "--images", "a.png", "--split", "train"],
     "cmce search: --split applies to --dataset, not --images"),  # was ignored: the images were searched
    (["search", "--index", "I", "--query-model", "Q", "--images", "a.png", "b.png", "--limit", "1"],
     "cmce search: --limit applies to --dataset, not --images"),  # searched a.png alone, said nothing
    (["search", "--index", "I", "--query-model", "Q", "--images", "a.png", "--split", "test", "--limit", "0"],
     "cmce search: --split, --limit apply to --dataset, not --images"),  # the defaults, given: still refused
])
def test_flags_that_exclude_each_other(tmp_path, caplog, argv, message):
    fails(caplog, argv, tmp_path / "O", message)


def test_dataset_metadata_with_a_key_twice_is_named(world, tmp_path, caplog):
    """The last of two values of a key in a dataset's cmce metadata was read without a word."""
    import re

    table = pq.read_table(world.dataset)
    raw = table.schema.metadata[b"cmce"]
    key = re.match(rb'\{"([^"]+)": ', raw).group(1)
    dataset = tmp_path / "dataset.parquet"
    twice = raw.replace(b'"' + key + b'": ', b'"' + key + b'": 0, "' + key + b'": ', 1)
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cmce": twice}), dataset)
    out = tmp_path / "q.pt"
    fails(caplog, ["train", "--config", SMOKE, *TINY, "--set", "train.epochs=1", "--dataset", dataset, "--model",
                   "query", "--out", out], out,
          f"{dataset}: its cmce metadata is not usable JSON: key '{key.decode()}' given twice in one JSON object")


def test_index_metadata_with_a_key_twice_or_a_cut_sha256_is_named(world, tmp_path, caplog):
    """`"dim": 32, "dim": 48` in meta.json was read as 48 and blamed on the query model; a query_model_sha256 cut
    to 12 digits was refused as "built for query model 92195e9e8b60, but query model 92195e9e8b60 was given"."""
    import json

    meta = json.loads((world.index / "meta.json").read_text())
    twice = shutil.copytree(world.index, tmp_path / "twice")
    (twice / "meta.json").write_text(json.dumps(meta).replace('"dim": ', '"dim": 48, "dim": ', 1))
    fails(caplog, _search(world, twice), twice, f"{twice}/meta.json: key 'dim' given twice in one JSON object")
    cut = shutil.copytree(world.index, tmp_path / "cut")
    (cut / "meta.json").write_text(json.dumps({**meta, "query_model_sha256": meta["query_model_sha256"][:12]}))
    fails(caplog, _search(world, cut), cut,
          f"{cut}/meta.json: query_model_sha256 is \"{meta['query_model_sha256'][:12]}\", not a sha256")
    deep = shutil.copytree(world.index, tmp_path / "deep")  # a RecursionError's traceback
    (deep / "meta.json").write_text("[" * 200_000 + "]" * 200_000)
    fails(caplog, _search(world, deep), deep, f"{deep}/meta.json: not valid JSON: nested too deeply to read")


def test_an_index_search_parameter_faiss_cannot_hold(world, tmp_path, caplog):
    import json

    index = shutil.copytree(world.index, tmp_path / "index")
    meta = json.loads((world.index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({**meta, "search_params": {"ef_search": 10**12}}))
    fails(caplog, _search(world, index), index, f"{index}/meta.json: search_params")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGALRM,
                                    signal.SIGXCPU, signal.SIGQUIT, signal.SIGSTKFLT, signal.SIGRTMIN + 2,
                                    signal.SIGIO, signal.SIGABRT])
def test_an_interrupt_is_one_line_and_leaves_no_partial_output(world, tmp_path, caplog, monkeypatch, signum):
    """SIGTERM (a kill, a pod stopped) left the half-written temporary file in place: only Ctrl-C cleaned up.
    SIGALRM and SIGXCPU (a batch system's CPU-time limit), SIGSTKFLT and the real-time signals ended the process
    with no line and no cleanup."""
    import cmce.embed


    calls = {"n": 0}
    real = cmce.embed.embed_batch

    def interrupted(*args, **kwargs):  # the signal arrives in the middle of the gallery: some batches written
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cmce.embed, "embed_batch", interrupted)
    out = previous_file(tmp_path / "member.parquet")
    caplog.clear()
    with caplog.at_level(logging.INFO), _default_action(signum):  # not an earlier test's SIGALRM watchdog
        rc = main([str(a) for a in embed_member_args(world)] + ["--out", str(out), "--batch-size", "8"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    name = signal_name(signum)  # SIGRTMIN+2 for a real-time signal
    assert rc == 128 + signum and errors == [f"cmce embed-member: interrupted ({name}); each output is whole or not "
                                             "written"]
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handlers go with it
    assert out.read_bytes() == PREVIOUS and leftovers(tmp_path) == []


def test_a_signal_the_caller_ignores_stays_ignored(world, tmp_path, caplog, monkeypatch):
    """`nohup cmce train …` then SIGHUP (the terminal closed): nohup had set SIGHUP to be ignored so that the
    command outlives its terminal, and cmce's own handler stopped it (exit 129, the training lost)."""
    import cmce.embed

    real, calls = cmce.embed.embed_batch, {"n": 0}

    def hung_up(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGHUP)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmce.embed, "embed_batch", hung_up)
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        out = tmp_path / "member.parquet"
        assert main([str(a) for a in embed_member_args(world)] + ["--out", str(out), "--batch-size", "8"]) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert calls["n"] > 2 and out.exists()


@pytest.mark.parametrize("after", ["finishes", "fails_later", "writes_nothing"])
def test_a_stop_signal_a_library_swallows_still_stops_the_step(world, tmp_path, caplog, monkeypatch, after):
    """SIGTERM landing in pyarrow's lazy import of pandas: its exception was swallowed in the C extension's init,
    and the step went on to write its index and exit 0 (3 tries in 7), or failed later on the half-imported
    module with a 40-line traceback (`partially initialized module 'pandas'`)."""
    import cmce.stages

    real = cmce.stages.build_gallery_index

    def swallowing(*args, **kwargs):
        try:  # what a C extension's init does with an exception raised inside it
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException:  # noqa: BLE001, S110 - the library's, not ours
            pass
        if after == "fails_later":
            raise AttributeError("partially initialized module 'pandas' has no attribute '_pandas_datetime_CAPI'")
        return real(*args, **kwargs) if after == "finishes" else None

    monkeypatch.setattr(cmce.stages, "build_gallery_index", swallowing)
    out = Path(shutil.copytree(world.index, tmp_path / "index"))
    before = snapshot(out)
    caplog.clear()
    with caplog.at_level(logging.INFO), _default_action(signal.SIGTERM):
        rc = main(["build-index", "--gallery", str(world.gallery), "--out", str(out), "--reject-fraction", "0.3"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 128 + signal.SIGTERM and errors == ["cmce build-index: interrupted (SIGTERM); each output is whole "
                                                     "or not written"], errors
    assert snapshot(out) == before and leftovers(tmp_path) == []  # the new index was not renamed in
    from cmce.errors import received_signal

    assert received_signal() is None  # the process goes on: its later commits are not stopped
    monkeypatch.undo()
    assert main(["build-index", "--gallery", str(world.gallery), "--out", str(tmp_path / "next")]) == 0  # forgotten


@contextlib.contextmanager
def _default_action(signum: int):
    """`signum` with its default action (SIGINT: Python's own handler) for the block."""
    previous = signal.signal(signum, signal.SIG_DFL) if signum != signal.SIGINT else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def test_a_callers_sigalrm_watchdog_keeps_its_handler(world, tmp_path, monkeypatch):
    """SIGALRM ends a command with cleanup only where nobody handles it: a caller timing the command with its own
    handler (as these tests do) still gets its handler called."""
    import cmce.embed

    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    real = cmce.embed.embed_batch

    def alarmed(*args, **kwargs):
        if not fired:
            os.kill(os.getpid(), signal.SIGALRM)
        return real(*args, **kwargs)

    monkeypatch.setattr(cmce.embed, "embed_batch", alarmed)
    try:
        assert main([str(a) for a in embed_member_args(world)] + ["--out", str(tmp_path / "m.parquet")]) == 0
        assert fired == [True] and signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("tamper, message", [
    ("fewer_ids", "index.faiss holds 40 vectors of dimension 8, ids.parquet 39 rows"),
    ("no_label", "ids.parquet: missing column 'label'"),
    ("dup_ids", "ids.parquet: column 'id' has duplicate id"),
])
def test_index_files_rewritten_with_matching_checksums_are_still_checked_together(world, tmp_path, caplog,
                                                                                 tamper, message):
    """meta.json can be rewritten with the new checksums: the files must still agree with each other."""
    import json

    index = shutil.copytree(world.index, tmp_path / "index")
    ids = pq.read_table(index / "ids.parquet")
    if tamper == "fewer_ids":
        ids = ids.slice(1)
    elif tamper == "no_label":
        ids = ids.drop_columns(["label"])
    else:
        ids = ids.set_column(0, "id", pa.array([ids.column("id")[0].as_py()] * ids.num_rows))
    pq.write_table(ids, index / "ids.parquet")
    meta = json.loads((index / "meta.json").read_text())
    meta["files"]["ids.parquet"] = file_sha256(index / "ids.parquet")
    meta["sizes"]["ids.parquet"] = (index / "ids.parquet").stat().st_size  # a consistent meta.json, other content
    (index / "meta.json").write_text(json.dumps(meta))
    fails(caplog, _search(world, index), index, f"{index}", message)


def test_a_faiss_file_claiming_more_bytes_than_it_holds_is_refused_without_allocating_them(world, tmp_path):
    """A flat index.faiss whose codes' length (bytes 37-44) was edited to 2 GB, meta.json's checksum rewritten to
    match: faiss allocated the 2 GB before finding them missing (17 GB for an edited HNSW file: an OOM kill, no
    line). No vector read may be longer than the file."""
    import json

    index = shutil.copytree(world.index, tmp_path / "index")
    faiss_file = index / "index.faiss"
    data = bytearray(faiss_file.read_bytes())
    assert data[:4] == b"IxFI" and int.from_bytes(data[37:45], "little") == (len(data) - 45) // 4  # in 4-byte words
    data[37:45] = (1 << 29).to_bytes(8, "little")
    faiss_file.write_bytes(data)
    meta = json.loads((index / "meta.json").read_text())
    meta["files"]["index.faiss"] = file_sha256(faiss_file)
    (index / "meta.json").write_text(json.dumps(meta))
    from tests.serve_world import cmce_env

    child = subprocess.Popen([sys.executable, "-m", "cmce", *map(str, _search(world, index))], env=cmce_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak (RUSAGE_CHILDREN: the largest of any)
    peak_mb = usage.ru_maxrss / 1024
    assert os.waitstatus_to_exitcode(status) == 2 and "Traceback" not in err, err
    assert f"{index}/index.faiss: not a readable faiss index: it declares more than the file can hold" in err
    assert peak_mb < 1500, peak_mb  # the 2 GB never allocated (cmce's own imports take about 500 MB)


def test_search_refuses_an_index_built_from_another_version_of_the_gallery(world, tmp_path, caplog, capsys):
    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery.parquet"))
    search = [*_search(world, world.index), "--gallery", gallery]
    assert main([str(a) for a in search]) == 0 and len(capsys.readouterr().out.splitlines()) == 2
    grown = tmp_path / "grown.parquet"
    assert main(["combine", "--member", str(world.members[0]), "--out", str(grown)]) == 0
    shutil.copyfile(grown, gallery)  # the gallery moved on; the index did not
    fails(caplog, search, tmp_path / "unused", f"{world.index}: index was built from gallery version",
          "rebuild the index from it")


# ---------------------------------------------------------------- a second hostile round: classes found by trial
def _with_alarm(seconds: int):
    """A hang fails the test (SIGALRM) instead of stalling the suite."""
    import signal

    def alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)


def _no_alarm():
    import signal

    signal.alarm(0)


def test_query_images_of_any_kind_are_searched_without_noise_and_a_folder_is_named(world, tmp_path, caplog, capsys):
    """A grey JPEG or a 16-bit PNG given to `search --images` printed torch's 3-line `NumPy array is not writable`
    warning (PIL's read-only buffer); a folder failed with a bare `[Errno 21] Is a directory`."""
    import warnings

    images = []
    for name, mode, fmt in (("grey.jpg", "L", "JPEG"), ("deep.png", "I;16", "PNG")):
        pixels = NOISE[:8, :8] if mode == "L" else NOISE[:8, :8].astype(np.uint16) * 257
        Image.fromarray(pixels).save(tmp_path / name, format=fmt)
        images.append(str(tmp_path / name))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["search", "--index", str(world.index), "--query-model", str(world.query), "--images",
                     *images, "--k", "1"]) == 0
    assert [str(w.message) for w in seen if issubclass(w.category, UserWarning)] == []
    assert len(capsys.readouterr().out.splitlines()) == 2
    folder = tmp_path / "imgs"
    folder.mkdir()
    fails(caplog, ["search", "--index", world.index, "--query-model", world.query, "--images", folder],
          tmp_path / "unused", f"--images {folder}: is a folder; give its image files (e.g. {folder}/*.png)")


def test_pipes_and_devices_are_neither_read_nor_written(world, tmp_path, caplog):
    """A FIFO as --config hung (no writer), /dev/zero as an image exhausted memory, and renaming an output
    over a device node replaced it (as root): inputs must be files or folders, outputs never special files."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _with_alarm(30)
    try:
        fails(caplog, ["prepare-data", "--config", fifo, "--out", tmp_path / "d.parquet"], tmp_path / "d.parquet",
              f"{fifo}: is not a regular file or folder")
        fails(caplog, ["search", "--index", world.index, "--query-model", world.query, "--images", fifo],
              tmp_path / "unused", f"{fifo}: is not a regular file or folder")
        fails(caplog, ["combine", "--member", world.members[0], "--out", fifo], tmp_path / "unused",
              f"{fifo}: is a device, pipe or socket")
    finally:
        _no_alarm()
    assert fifo.is_fifo()


def _truncated(world: World, path: Path, rows: int) -> Path:
    table = pq.read_table(world.gallery)
    pq.write_table(table.slice(0, rows).replace_schema_metadata(table.schema.metadata), path)
    return path


def test_a_gallery_that_is_not_the_whole_split_is_neither_indexed_evaluated_nor_promoted(world, tmp_path, caplog):
    """A 1-row slice of a gallery kept its metadata: it was indexed, evaluated at R@1 = 100 % and promoted."""
    small = _truncated(world, tmp_path / "small.parquet", 1)
    fails(caplog, ["build-index", "--gallery", small, "--out", tmp_path / "index"], tmp_path / "index",
          f"{small}: holds 1 rows that are not the 'test' split it records")
    fails(caplog, [*evaluate_args(world, gallery=small), "--out", tmp_path / "eval"], tmp_path / "eval",
          f"{small}: holds 1 rows that are not the 'test' split of {world.dataset}")
    out = tmp_path / "decision.json"
    fails(caplog, ["gate", "--config", SMOKE, "--dataset", world.dataset, "--baseline-query-model", world.query,
                   "--baseline-gallery", world.gallery, "--query-model", world.query, "--gallery", small,
                   "--out", out], out, f"{small}: holds 1 rows that are not the 'test' split of {world.dataset}")
    table = pq.read_table(world.gallery)  # the same rows, shuffled: the message says reordering is one cause
    shuffled = tmp_path / "shuffled.parquet"
    order = np.random.default_rng(0).permutation(table.num_rows)
    pq.write_table(table.take(order).replace_schema_metadata(table.schema.metadata), shuffled)
    fails(caplog, ["build-index", "--gallery", shuffled, "--out", tmp_path / "index"], tmp_path / "index",
          f"{shuffled}: holds {table.num_rows} rows that are not the 'test' split it records",
          "its rows were reordered (sorted or shuffled)")


def test_a_gate_on_a_gallery_of_another_dimension_names_its_column(world, tmp_path, caplog):
    """A candidate gallery cut to 7 of the query model's 8 dimensions: the gate embedded the split, then failed with
    "queries (n, 8) and gallery (n, 7) must be 2-d with one dimension", naming no file."""
    emb = embedding_column(pq.read_table(world.gallery), "embedding", "gallery")[:, :7]
    cut = rewrite(world.gallery, tmp_path / "cut.parquet", embedding=embedding_array(emb))
    out = tmp_path / "decision.json"
    fails(caplog, ["gate", "--config", SMOKE, "--dataset", world.dataset, "--baseline-query-model", world.query,
                   "--baseline-gallery", world.gallery, "--query-model", world.query, "--gallery", cut, "--out", out],
          out, f"{cut}: column 'embedding' has dimension 7, expected 8")


def test_members_or_galleries_with_other_labels_for_the_same_ids(world, tmp_path, caplog):
    table = pq.read_table(world.members[1])
    labels = table.column("label").to_numpy().copy()
    labels[3] += 100
    member = rewrite(world.members[1], tmp_path / "vgg_b.parquet", label=pa.array(labels, pa.int32()))
    out = tmp_path / "g.parquet"
    fails(caplog, ["combine", "--member", world.members[0], "--member", member, "--out", out], out,
          f"{member}: labels differ from {world.members[0]} for the same ids")
    gallery = rewrite(world.gallery, tmp_path / "gallery.parquet", label=pa.array(labels, pa.int32()))
    fails(caplog, [*evaluate_args(world, gallery=gallery), "--out", tmp_path / "eval"], tmp_path / "eval",
          f"{gallery}: id ", f"the dataset {world.dataset} says")
    # indexed, served, gated: every hit of the edited row named another class, exit 0
    fails(caplog, ["build-index", "--gallery", gallery, "--out", tmp_path / "index"], tmp_path / "index",
          f"{gallery}: labels differ from those of the 'test' split it records")
    decision = tmp_path / "decision.json"
    fails(caplog, ["gate", "--config", SMOKE, "--dataset", world.dataset, "--baseline-query-model", world.query,
                   "--baseline-gallery", world.gallery, "--query-model", world.query, "--gallery", gallery,
                   "--out", decision], decision, f"{gallery}: labels differ from those of the 'test' split of")
    # every member relabelled alike: they agree with each other, not with the split they record
    alike = [rewrite(m, tmp_path / f"alike_{m.name}", label=pa.array(labels, pa.int32())) for m in world.members]
    fails(caplog, ["combine", "--member", alike[0], "--member", alike[1], "--out", out], out,
          f"{alike[0]}, {alike[1]}: labels differ from those of the split they record")
    one = tmp_path / "one.parquet"
    assert main(["combine", "--member", str(alike[0]), "--out", str(one)]) == 2  # checked as a whole split too
    assert main(["combine", "--member", str(world.members[0]), "--out", str(one)]) == 0
    relabelled = rewrite(one, tmp_path / "one_relabelled.parquet", label=pa.array(labels, pa.int32()))
    grown = tmp_path / "grown.parquet"
    fails(caplog, ["add-member", "--gallery", relabelled, "--member", alike[1], "--out", grown], grown,
          f"{relabelled}: labels differ from those of the 'test' split it records")


def test_a_dataset_replaced_while_it_is_embedded_writes_nothing(world, tmp_path, caplog, monkeypatch):
    import cmce.embed

    dataset = Path(shutil.copyfile(world.dataset, tmp_path / "dataset.parquet"))
    real = cmce.embed.iter_embeddings

    def replaced_midway(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 1:  # another version renamed over it, as writers of datasets do
                shutil.copyfile(world.dataset, tmp_path / "other.parquet")
                os.replace(tmp_path / "other.parquet", dataset)
            yield item

    monkeypatch.setattr(cmce.embed, "iter_embeddings", replaced_midway)
    out = previous_file(tmp_path / "member.parquet")
    fails(caplog, [*embed_member_args(world, dataset=dataset), "--out", out, "--batch-size", "8"], out,
          f"{dataset}: was replaced or changed while this step read it")


def test_a_gallery_replaced_while_it_is_evaluated_writes_nothing(world, tmp_path, caplog, monkeypatch):
    """evaluate opens the gallery three times (metadata, rows, sha256): a gallery replaced in between gave
    metrics of one version beside the versions.json of another, exit 0. Every command now watches its inputs."""
    import cmce.evaluate

    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery.parquet"))
    real = cmce.evaluate.served_gallery  # its metadata read

    def replaced_after_the_first_read(path, *args, **kwargs):
        meta = real(path, *args, **kwargs)
        if Path(path) == gallery:  # another version renamed over it, as writers do
            shutil.copyfile(world.gallery, tmp_path / "other.parquet")
            os.replace(tmp_path / "other.parquet", gallery)
        return meta

    monkeypatch.setattr(cmce.evaluate, "served_gallery", replaced_after_the_first_read)
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world, gallery=gallery), "--out", out], out,
          f"{gallery}: was replaced or changed while this step read it")


@pytest.mark.parametrize("split, ids, message", [
    ("val", None, "column 'split' has the value 'val'; a dataset's splits are ['train', 'test']"),
    (None, "", "split 'test' has an empty id"),
])
def test_dataset_rows_no_step_would_read_are_refused(world, tmp_path, caplog, split, ids, message):
    table = pq.read_table(world.dataset)
    test_rows = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == "test")
    if split is not None:
        values = table.column("split").to_pylist()
        values[test_rows[0]] = split
        dataset = rewrite(world.dataset, tmp_path / "dataset.parquet", split=pa.array(values))
    else:
        values = table.column("id").to_pylist()
        values[test_rows[0]] = ids
        dataset = rewrite(world.dataset, tmp_path / "dataset.parquet", id=pa.array(values))
    out = tmp_path / "member.parquet"
    fails(caplog, [*embed_member_args(world, dataset=dataset), "--out", out], out, f"{dataset}: ", message)


def test_symlink_loops_and_control_characters_make_one_line(world, tmp_path, caplog):
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    fails(caplog, ["build-index", "--gallery", loop, "--out", tmp_path / "index"], tmp_path / "index",
          "is a loop of symbolic links")
    forged = f"{tmp_path}/missing\n2026-12-05 INFO cmce.index: built flat index"
    error = fails(caplog, ["build-index", "--gallery", forged, "--out", tmp_path / "index"], tmp_path / "index",
                  "missing\\n2026-12-05 INFO")
    assert "\n" not in error


def test_merging_files_of_different_kinds_says_so(world, tmp_path, caplog):
    out = tmp_path / "merged.parquet"
    fails(caplog, ["merge", world.gallery, world.members[0], "--out", out], out,
          "files of different kinds ['gallery', 'gallery_member']")


def test_an_s3_endpoint_that_never_answers_fails_within_its_timeouts(world, tmp_path, caplog, monkeypatch):
    """It accepts the connection and never replies: each attempt ends at the read timeout (20 s by default;
    1 s here), and the step with it."""
    import socket
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "b")
    monkeypatch.setenv("CMCE_S3_READ_TIMEOUT_S", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    start = time.monotonic()
    _with_alarm(60)
    try:
        fails(caplog, ["build-index", "--gallery", "s3://bucket/gallery.parquet", "--out", tmp_path / "index"],
              tmp_path / "index", "s3://bucket/gallery.parquet")
    finally:
        _no_alarm()
        listener.close()
    assert time.monotonic() - start < 30


def test_a_model_trained_as_the_other_kind_is_refused_where_one_kind_is_taken(world, tmp_path, caplog):
    """A gallery model exported for the edge, or given as the query model of a transformation, ran without a word:
    checkpoints now record the role they were trained for."""
    from cmce.checkpoint import load_embedding_model

    gallery_model = tiny_model(tmp_path / "big.pt", "resnet_a", "resnet", 12, seed=2, role="gallery")
    query_model = tiny_model(tmp_path / "small.pt", "query", "query_cnn", 8, seed=0, role="query")
    out = tmp_path / "q.onnx"
    fails(caplog, ["export-query", "--query-model", gallery_model, "--out", out], out,
          f"--query-model {gallery_model}: a gallery model 'resnet_a'", "a query model is expected")
    t = tmp_path / "t.pt"
    fit = ["fit-transform", "--config", SMOKE, "--dataset", world.dataset, "--out", t]
    fails(caplog, [*fit, "--query-model", gallery_model, "--gallery-model", world.gallery_models[0]], t,
          f"--query-model {gallery_model}: a gallery model")
    fails(caplog, [*fit, "--query-model", world.query, "--gallery-model", query_model], t,
          f"--gallery-model {query_model}: a query model 'query'", "a gallery model is expected")
    student = tmp_path / "student.pt"
    fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--kd-teacher", query_model, "--out",
                   student], student, f"--kd-teacher {query_model}: a query model 'query'",
          "a gallery model is expected")
    trained = tmp_path / "trained_query.pt"
    assert main(["train", "--config", str(SMOKE), *TINY, "--set", "train.epochs=1", "--dataset", str(world.dataset),
                 "--model", "query", "--out", str(trained)]) == 0
    assert load_embedding_model(trained).meta["role"] == "query"
    kd = tiny_model(tmp_path / "kd.pt", "kd_resnet_a", "query_cnn", 8, seed=3, role="kd_student")
    fails(caplog, [*fit, "--query-model", world.query, "--gallery-model", kd], t,  # a query-side copy
          f"--gallery-model {kd}: a KD student 'kd_resnet_a'", "a gallery model is expected")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--kd-teacher", kd, "--out", student],
          student, f"--kd-teacher {kd}: a KD student", "a gallery model is expected")
    added = tmp_path / "added.parquet"
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", world.gallery,
                   "--query-model", world.query, "--gallery-model", kd, "--out", added], added,
          f"{kd}: a KD student 'kd_resnet_a'", "a gallery model is expected")


@pytest.mark.parametrize("change,message", [
    (lambda c: c[:3], "its classifier has 3 classes, but the train split has labels up to 9"),
    (lambda c: c * 0, "field 'classifier' has all-zero rows for 10 train class(es) (first: label 0)")])
def test_a_query_classifier_that_cannot_score_the_train_labels_is_refused(world, tmp_path, caplog, change, message):
    """The transformation's CE term scores against the frozen query classifier: 3 rows for 10 labels were torch's
    `Target 9 is out of bounds` traceback; zero rows made the term a constant ln 10 that trained nothing (exit 0)."""
    obj = torch.load(world.query, weights_only=True)
    query = tmp_path / "query.pt"
    torch.save({**obj, "classifier": change(obj["classifier"])}, query)
    t = tmp_path / "t.pt"
    fails(caplog, ["fit-transform", "--config", SMOKE, "--dataset", world.dataset, "--query-model", query,
                   "--gallery-model", world.gallery_models[0], "--out", t], t, f"--query-model {query}: {message}")


def test_a_checkpoint_with_bytes_appended_is_named_as_damaged(world, tmp_path, caplog):
    """torch reads past appended bytes: search blamed the index ("built for another query model") and export-query
    wrote an ONNX stamped with a sha256 that no index has (exit 0)."""
    query = tmp_path / "q.pt"
    query.write_bytes(world.query.read_bytes() + np.random.default_rng(0).bytes(300))
    out = tmp_path / "q.onnx"
    fails(caplog, ["export-query", "--query-model", query, "--out", out], out,
          f"{query}: 300 byte(s) follow the end of the checkpoint's archive")
    fails(caplog, ["search", "--index", world.index, "--query-model", query, "--dataset", world.dataset,
                   "--limit", "1"], tmp_path / "unused", f"{query}: 300 byte(s) follow the end")


def test_a_checkpoint_with_compressed_entries_is_refused_before_anything_is_decompressed(world, tmp_path, caplog):
    """torch.save stores its entries; a checkpoint re-packed with deflate was read: 625 KB holding 600 MB of zeros
    took 1 GB of memory and exported with exit 0 (a decompression bomb)."""
    import zipfile

    query = tmp_path / "q.pt"
    with zipfile.ZipFile(world.query) as src, zipfile.ZipFile(query, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    out = tmp_path / "q.onnx"
    fails(caplog, ["export-query", "--query-model", query, "--out", out], out,
          f"{query}: ", "in the checkpoint's archive is stored compressed, which torch.save never does")


def _flip_in_entry(path: Path, entry_prefix: str) -> str:
    """Flip one bit inside the first entry of the zip archive at `path` whose name holds `entry_prefix`, leaving its
    stored CRC-32 as it was (bit rot, not a rewrite); returns the entry's name."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if entry_prefix in i.filename and i.file_size > 8)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0x40
    path.write_bytes(bytes(data))
    return info.filename


def test_a_flipped_bit_in_a_checkpoint_or_a_gallery_page_is_named_as_damage(world, tmp_path, caplog):
    """torch does not check its archive's CRCs, and a Parquet page that still decodes gave a changed embedding:
    export-query wrote an ONNX of the changed weights ("parity" against the same weights), upgrade-query-model
    a gallery with one row changed (exit 0). Checkpoints' entry CRCs and galleries' page checksums are checked."""
    query = Path(shutil.copyfile(world.query, tmp_path / "q.pt"))
    entry = _flip_in_entry(query, "/data/")
    out = tmp_path / "q.onnx"
    fails(caplog, ["export-query", "--query-model", query, "--out", out], out,
          f"{query}: damaged: the checksum of '{entry}' in the checkpoint's archive does not match its bytes")
    import zipfile

    local = Path(shutil.copyfile(world.query, tmp_path / "q_local.pt"))  # the local header's CRC field: a new sha256
    with zipfile.ZipFile(local) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(local.read_bytes())
    data[info.header_offset + 14] ^= 0x01
    local.write_bytes(bytes(data))
    fails(caplog, ["search", "--index", world.index, "--query-model", local, "--dataset", world.dataset, "--limit",
                   "1"], tmp_path / "unused",
          f"{local}: damaged: the local header of '{info.filename}' disagrees with the checkpoint's archive directory")
    gallery = bytearray(world.gallery.read_bytes())
    group = pq.ParquetFile(world.gallery).metadata.row_group(0)
    chunk = next(c for c in map(group.column, range(group.num_columns)) if c.path_in_schema.startswith("embedding."))
    gallery[chunk.data_page_offset + chunk.total_compressed_size - 10] ^= 0x40  # among the embeddings' values
    bad = tmp_path / "gallery.parquet"
    bad.write_bytes(bytes(gallery))
    index = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", bad, "--out", index], index, f"{bad}: damaged: ",
          "CRC checksum verification failed")


def test_one_gallery_model_under_two_names_is_refused(world, tmp_path, caplog):
    """A member file whose model name was changed (bit rot in the footer that still decodes, or a hand edit) kept
    its model's sha256: combine and add-member took it as a third model, and the ensemble weighed vgg_b twice."""
    import json

    table = pq.read_table(world.members[1])
    meta = json.loads(table.schema.metadata[b"cmce"])
    renamed = tmp_path / "zgg_b.parquet"
    meta["gallery_model"] = {**meta["gallery_model"], "name": "zgg_b"}
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cmce": json.dumps(meta)}), renamed)
    sha = meta["gallery_model"]["sha256"][:12]
    out = tmp_path / "g.parquet"
    fails(caplog, ["combine", "--member", world.members[0], "--member", world.members[1], "--member", renamed,
                   "--out", out], out, f"gallery model {sha} (as 'vgg_b' and 'zgg_b') given twice")
    fails(caplog, ["add-member", "--gallery", world.gallery, "--member", renamed, "--out", out], out,
          f"{renamed}: gallery model {sha} (as 'vgg_b' and 'zgg_b') is already a member of {world.gallery}")
    # the same weights saved again under a new name: a new sha256 too, but the same embeddings
    meta["gallery_model"] = {**meta["gallery_model"], "sha256": "f" * 64}
    resaved = tmp_path / "vgg_q.parquet"
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cmce": json.dumps(meta)}), resaved)
    fails(caplog, ["combine", "--member", world.members[0], "--member", world.members[1], "--member", resaved,
                   "--out", out], out, f"{resaved}: its embeddings equal those of {world.members[1]}: one gallery")
    fails(caplog, ["add-member", "--gallery", world.gallery, "--member", resaved, "--out", out], out,
          f"{resaved}: its embeddings equal those of {world.gallery} (member vgg_b): one gallery model under two names")


@pytest.mark.parametrize("flag", ["--transform-dir", "--members-dir", "--train-embeddings"])
def test_a_named_pipe_inside_an_input_folder_is_named_not_waited_on(world, tmp_path, flag):
    """A FIFO among a folder's files (`--members-dir m/` holding `vgg_b.parquet` as a pipe): the step hung in the
    Parquet reader's open, deaf to SIGTERM, until SIGKILL."""
    folder = tmp_path / "folder"
    folder.mkdir()
    if flag == "--transform-dir":
        shutil.copy(world.transforms[0], folder / "t_resnet_a.pt")
        os.mkfifo(folder / "t_vgg_b.pt")
        argv = [*evaluate_args(world)[:-2 * len(world.transforms)], flag, folder, "--out", tmp_path / "eval"]
        fifo = folder / "t_vgg_b.pt"
    elif flag == "--members-dir":
        shutil.copy(world.members[0], folder / "resnet_a.parquet")
        os.mkfifo(folder / "vgg_b.parquet")
        argv = ["combine", "--config", SMOKE, flag, folder, "--out", tmp_path / "g.parquet"]
        fifo = folder / "vgg_b.parquet"
    else:
        os.mkfifo(folder / "vgg_b.parquet")
        argv = ["upgrade-query-model", "--config", SMOKE, *TINY, "--dataset", world.dataset, "--gallery", world.gallery,
                "--query-model", world.query, flag, folder, "--transforms-out", tmp_path / "t", "--out",
                tmp_path / "g.parquet"]
        fifo = folder / "vgg_b.parquet"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "cmce", *map(str, argv)], env=env, capture_output=True, text=True,
                          timeout=120)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert f"{fifo}: in {flag if flag != '--train-embeddings' else folder}, is not a regular file" in errors[0]


def test_an_output_file_is_replaced_only_by_a_file_of_its_format_and_kind(world, tmp_path, caplog):
    """fit-transform --out naming a gallery replaced the gallery with a checkpoint (exit 0)."""
    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery"))  # named for no format: told by content
    fails(caplog, ["fit-transform", "--config", SMOKE, "--dataset", world.dataset, "--query-model", world.query,
                   "--gallery-model", world.gallery_models[0], "--out", gallery], gallery,
          f"{gallery}: holds a Parquet file; this step writes a checkpoint file")
    model = Path(shutil.copyfile(world.query, tmp_path / "model"))
    fails(caplog, ["combine", "--member", world.members[0], "--out", model], model,
          f"{model}: holds a checkpoint file; this step writes a Parquet file")
    again = tmp_path / "again.parquet"  # a file of the step's own kind is its earlier output: replaced
    assert main(["combine", "--member", str(world.members[0]), "--out", str(again)]) == 0
    assert main(["combine", "--member", str(world.members[1]), "--out", str(again)]) == 0
    # and of its own kind: a gallery never replaces a dataset or a member file, nor a Parquet file cmce did not write
    dataset = Path(shutil.copyfile(world.dataset, tmp_path / "dataset.parquet"))
    fails(caplog, ["combine", "--member", world.members[0], "--out", dataset], dataset,
          f"{dataset}: holds a dataset Parquet file; this step writes a gallery file")
    member = Path(shutil.copyfile(world.members[1], tmp_path / "member.parquet"))
    fails(caplog, ["combine", "--member", world.members[0], "--out", member], member,
          f"{member}: holds a gallery_member Parquet file; this step writes a gallery file")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    fails(caplog, ["embed-member", "--dataset", world.dataset, "--query-model", world.query, "--gallery-model",
                   world.gallery_models[0], "--transform", world.transforms[0], "--out", foreign], foreign,
          f"{foreign}: holds a non-cmce Parquet file; this step writes a gallery_member file")


def test_conflicting_transformations_and_a_model_given_as_a_student(world, tmp_path, caplog):
    other = tiny_transform(tmp_path / "t_resnet_a.pt", world.gallery_models[0], "resnet_a", world.query, 12, 8)
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world, transforms=[other, *world.transforms]), "--out", out], out,
          "a second, different transformation for gallery model resnet_a")
    fails(caplog, [*evaluate_args(world), "--kd", world.gallery_models[0], "--out", out], out,
          f"{world.gallery_models[0]}: not a KD student (its checkpoint records no teacher)")


def test_a_set_key_that_is_not_a_dotted_name_is_named_as_the_flag(tmp_path, caplog):
    out = tmp_path / "d.parquet"
    error = fails(caplog, ["prepare-data", "--config", SMOKE, "--set", "gallery_models[0].name=x", "--out", out], out,
                  "--set 'gallery_models[0].name': not a key")
    assert str(SMOKE) not in error


# ---------------------------------------------------------------- a third hostile round
def test_passwords_in_a_tracking_uri_never_reach_the_log_and_a_dead_server_is_one_line(world, tmp_path, caplog,
                                                                                      monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = "http://user:hunter2@127.0.0.1:1"  # nothing listens on port 1
    out = tmp_path / "index"
    error = fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", "0" * 32, "build-index", "--gallery", world.gallery,
                           "--out", out], out, "--mlflow-parent", "cannot be read from http://***@127.0.0.1:1")
    assert "hunter2" not in caplog.text and "hunter2" not in error
    track = tmp_path / "track.json"
    fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", uri, "--out", track], track,
          "http://***@127.0.0.1:1")
    assert "hunter2" not in caplog.text


def test_members_are_checked_before_anything_is_fitted_or_embedded(world, tmp_path, caplog):
    """A model already in the gallery (or the query model itself) was refused only after its fit and embedding,
    which left their files in the work folder of an earlier good run."""
    work = tmp_path / "work"
    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery.parquet"))
    for model, needle in ((world.gallery_models[0], "a gallery model named 'resnet_a' is already in"),
                          (world.query, "is the query model itself")):
        fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", gallery,
                       "--query-model", world.query, "--gallery-model", model, "--out", tmp_path / "grown.parquet",
                       "--work-dir", work], tmp_path / "grown.parquet", f"{model}: ", needle)
        assert not work.exists()
    members = tmp_path / "members"
    fails(caplog, ["embed-gallery", "--dataset", world.dataset, "--query-model", world.query,
                   "--gallery-model", world.gallery_models[0], "--transform", world.transforms[0],
                   "--gallery-model", world.gallery_models[0].parent / "vgg_b.pt",
                   "--transform", world.transform_other_query, "--members-dir", members,
                   "--out", tmp_path / "g.parquet"], tmp_path / "g.parquet", "fitted for")
    assert not members.exists() or not list(members.iterdir())


def test_a_torchrun_environment_without_its_other_ranks_fails_within_the_timeout(world, tmp_path, caplog,
                                                                                 monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _train_fails_under({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "CMCE_DDP_TIMEOUT_S": "3"},
                       f"torchrun rendezvous at 127.0.0.1:{port} failed", world, tmp_path, caplog, monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "abc")
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", tmp_path / "i"], tmp_path / "i",
          "WORLD_SIZE='abc': not a rank count")


def test_a_torchrun_port_where_another_service_answers_fails_within_the_timeout(world, tmp_path):
    """MASTER_PORT naming an HTTP server's port: c10d's first ping waited for its answer without a deadline, and
    rank 1 hung for good whatever CMCE_DDP_TIMEOUT_S said. Run as a process: the hang is in C++, past SIGALRM."""
    import http.server
    import threading
    import time

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CMCE_DDP_TIMEOUT_S": "3"}
    out = tmp_path / "q.pt"
    start = time.monotonic()
    try:
        res = subprocess.run([sys.executable, "-m", "cmce", "train", "--config", str(SMOKE), "--dataset",
                              str(world.dataset), "--model", "query", "--out", str(out)], env=env,
                             capture_output=True, text=True, timeout=90)
    finally:
        server.shutdown()
        server.server_close()
    assert res.returncode == 2, res.stderr[-2000:]
    assert time.monotonic() - start < 60
    errors = [line for line in res.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"torchrun rendezvous at 127.0.0.1:{port} failed" in errors[0], res.stderr[-2000:]
    assert not out.exists()


def test_serve_refuses_class_names_from_another_dataset(world, tmp_path, caplog):
    table = pq.read_table(world.dataset)
    ids = table.column("id").to_pylist()
    first_test = table.column("split").to_pylist().index("test")
    ids[first_test] = "another-image"
    other = rewrite(world.dataset, tmp_path / "other.parquet", id=pa.array(ids))
    fails(caplog, ["serve", "--index", world.index, "--query-model", world.query, "--dataset", other, "--port", "0"],
          tmp_path / "unused", f"--dataset {other}: its 'test' split is not the one the index's gallery was embedded")


def test_search_with_another_datasets_queries_names_no_class(world, tmp_path, caplog, capsys):
    """`search --dataset` labelled every hit with the class names of the dataset its queries came from: a digits
    index searched with Fashion-MNIST answered `digits-0985 … "class_name": "Dress"`. The queries are searched;
    the class names, not the index's, are left out, and said so once."""
    table = pq.read_table(world.dataset)
    ids = table.column("id").to_pylist()
    ids[table.column("split").to_pylist().index("test")] = "another-image"
    other = rewrite(world.dataset, tmp_path / "other.parquet", id=pa.array(ids))
    for dataset, named in ((world.dataset, True), (other, False)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert main(["search", "--index", str(world.index), "--query-model", str(world.query),
                         "--dataset", str(dataset), "--limit", "3", "--k", "2"]) == 0
        hits = [h for line in capsys.readouterr().out.splitlines() for h in json.loads(line)["hits"]]
        assert len(hits) == 6 and all((h["class_name"] is not None) == named for h in hits), hits
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warned == ([] if named else [f"--dataset {other}: its 'test' split is not the one the index's gallery "
                                            "was embedded from (another dataset or version); class names would be "
                                            "wrong; the hits' class_name is left null"]), warned


def test_search_with_a_dataset_that_cannot_be_read_is_refused_as_it_is(world, tmp_path, caplog):
    """Only a readable dataset of another version leaves the class names out: a missing file or a gallery given as
    --dataset was first warned about as 'another dataset', the hits to be unnamed, before the error."""
    for dataset, said in ((tmp_path / "none.parquet", "dataset file not found"), (world.gallery, "")):
        fails(caplog, ["search", "--index", world.index, "--query-model", world.query, "--dataset", dataset],
              tmp_path / "unused", str(dataset), said)
        assert not [r for r in caplog.records if "class_name is left null" in r.getMessage()]


def test_a_gate_on_a_rank_no_gallery_can_miss_is_refused(world, tmp_path, caplog):
    out = tmp_path / "decision.json"
    fails(caplog, ["gate", "--config", SMOKE, "--set", "lifecycle.gate.metrics=[R@100000]", "--dataset", world.dataset,
                   "--baseline-query-model", world.query, "--baseline-gallery", world.gallery,
                   "--query-model", world.query, "--gallery", world.gallery, "--out", out], out,
          "lifecycle.gate.metrics: ['R@100000'] cannot regress where a query is answered from")
    rows = pq.ParquetFile(world.gallery).metadata.num_rows  # the test split: its own image left out, and the
    answered_from = rows - math.ceil(0.1 * rows) - 1  # 10 % the config's index rejects
    fails(caplog, ["gate", "--config", SMOKE, "--set", f"lifecycle.gate.metrics=[R@1, R@{answered_from}]",
                   "--set", f"evaluate.recall_k=[1, {answered_from - 1}]", "--dataset", world.dataset,
                   "--baseline-query-model", world.query, "--baseline-gallery", world.gallery,
                   "--query-model", world.query, "--gallery", world.gallery, "--out", out], out,
          f"lifecycle.gate.metrics: ['R@{answered_from}'] cannot regress where a query is answered from "
          f"{answered_from} gallery items")


def test_a_typo_in_a_gallery_models_override_is_not_a_new_model(tmp_path, caplog):
    out = tmp_path / "d.parquet"
    fails(caplog, ["prepare-data", "--config", SMOKE, "--set", "gallery_models.resnt_a.width=16", "--out", out], out,
          "gallery_models.resnt_a: lacks 'arch'")


def test_subnormal_rows_are_normalised_in_float64():
    from cmce.method import normalize

    rows = np.zeros((2, 4), np.float32)
    rows[0, :2], rows[1, :2] = 1.4e-45, 1.0
    out = normalize(rows)
    np.testing.assert_allclose(out[0], out[1])  # the direction of [1e-45, 1e-45, 0, 0] is that of [1, 1, 0, 0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-6)


# ---------------------------------------------------------------- a fourth hostile round
def test_a_transforms_folder_holding_other_checkpoints_is_not_replaced(world, tmp_path, caplog):
    """--transforms-out pointed at a models folder: every *.pt counted as the step's own, and the query model
    and KD students were deleted, the gallery models overwritten with transformations (exit 0)."""
    models = tmp_path / "models"
    models.mkdir()
    for p in (world.query, *world.gallery_models):
        shutil.copyfile(p, models / p.name)
    kept = _inputs_kept(models)
    fails(caplog, ["upgrade-query-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", world.gallery,
                   "--query-model", world.other_query, "--train-embeddings", world.members[0],
                   "--transforms-out", models, "--out", tmp_path / "g.parquet"], tmp_path / "g.parquet",
          f"{models}: holds ", "which is not a transformation")
    assert _inputs_kept(models) == kept


@pytest.mark.parametrize("value", ["abc", "nan", "-5", "1e300"])
def test_a_rendezvous_timeout_that_is_not_a_duration_is_named(world, tmp_path, caplog, monkeypatch, value):
    for key, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29599", "CMCE_DDP_TIMEOUT_S": value}.items():
        monkeypatch.setenv(key, v)
    out = tmp_path / "q.pt"
    fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query", "--out", out], out,
          f"CMCE_DDP_TIMEOUT_S={value!r}: seconds from 1 to 86400 expected")


def test_an_empty_heldout_split_names_the_fraction(tmp_path, caplog):
    out = tmp_path / "d.parquet"
    fails(caplog, ["prepare-data", "--config", SMOKE, *TINY, "--set", "data.heldout_fraction=0.0001", "--out", out],
          out, "data.heldout_fraction=0.0001", "leaves the 'test' split empty")


def test_an_onnx_export_given_as_a_checkpoint_says_what_it_is(world, tmp_path, caplog):
    fake = tmp_path / "q.pt"
    fake.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(64))  # how an ONNX protobuf begins
    out = tmp_path / "m.parquet"
    fails(caplog, [*embed_member_args(world, query=fake), "--out", out], out,
          f"{fake}: not a loadable checkpoint: not a torch checkpoint file")


def test_a_folder_of_checkpoints_given_as_one_is_named_a_folder(world, tmp_path, caplog):
    """The models folder given for a model was "not a torch checkpoint file (an ONNX export, say, ...)"."""
    (models := tmp_path / "models").mkdir()
    for name in ("query.pt", "resnet_a.pt"):
        (models / name).write_bytes(world.query.read_bytes())
    out = tmp_path / "m.parquet"
    fails(caplog, [*embed_member_args(world, query=models), "--out", out], out,
          f"{models}: is a folder; give a checkpoint file (it holds query.pt, resnet_a.pt)")


def test_fetch_data_into_a_folder_of_other_files_names_its_out(tmp_path, caplog):
    """It said "point data.path at an empty or missing folder" to a user who had given --out."""
    (out := tmp_path / "configs").mkdir()
    (out / "a.yaml").write_text("x: 1\n")
    fails(caplog, ["fetch-data", "--config", SMOKE, "--set", "data.source=fashion_mnist", "--out", out], out,
          f"{out}: exists and is not empty, but holds no Fashion-MNIST IDX files; give an empty or missing folder "
          "(data.path, or fetch-data's --out)")


def test_a_folder_given_as_the_config_is_named_so(world, tmp_path, caplog):
    """`--config /tmp` was "TMPDIR /tmp is inside the input folder --config /tmp", and with --out inside it
    "--out ... is inside the input folder --config /tmp": never that --config must be a file."""
    for out in (tmp_path / "m.pt", tmp_path.parent / "m.pt"):
        fails(caplog, ["train", "--config", tmp_path, "--dataset", world.dataset, "--model", "query", "--out", out],
              out, f"--config {tmp_path}: is a folder; give the YAML config file")


# ---------------------------------------------------------------- a fifth hostile round
def test_a_registered_model_without_a_registry_writes_nothing_in_the_working_folder(world, tmp_path, caplog,
                                                                                   monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    fails(caplog, ["search", "--index", world.index, "--query-model", "models:/cmce-query@candidate",
                   "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused",
          "models:/cmce-query@candidate: a registered model needs a registry")
    assert list(tmp_path.iterdir()) == []


def test_a_one_member_gallery_reports_no_rejection_by_uncertainty(world, tmp_path, caplog):
    import json

    single = tmp_path / "single.parquet"
    assert main(["combine", "--member", str(world.members[0]), "--out", str(single)]) == 0
    out = tmp_path / "eval"
    assert main([str(a) for a in evaluate_args(world, gallery=single, transforms=[world.transforms[0]])]
                + ["--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "asym_ensemble/1" in metrics and "rejection/uncertainty" not in metrics  # its uncertainty is 0 everywhere


def test_a_run_into_a_folder_whose_index_holds_a_foreign_file_is_refused_before_training(smoke_run, tmp_path,
                                                                                          caplog):
    """The refusal came at the index, after the models, transformations and gallery had been replaced: the
    folder then held new models beside the old index and evaluation."""
    lay, _ = smoke_run
    root = Path(shutil.copytree(lay.root, tmp_path / "run"))
    (root / "index" / "NOTES.txt").write_text("mine")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    caplog.clear()
    assert main(["run", "--config", str(SMOKE), "--set", f"output_dir={root}"]) == 2
    assert f"{root / 'index'}: holds NOTES.txt" in caplog.text
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_member_files_are_named_by_model_and_never_replace_another_kind(world, tmp_path, caplog):
    """Two gallery checkpoints both saved as model.pt wrote one member file (and the step then failed with a
    misleading duplicate name); --members-dir naming the stored train embeddings replaced them, exit 0."""
    models = []
    for name, model in zip("ab", world.gallery_models, strict=True):
        (tmp_path / name).mkdir()
        models.append(Path(shutil.copyfile(model, tmp_path / name / "model.pt")))
    argv = ["embed-gallery", "--dataset", world.dataset, "--query-model", world.query,
            *[a for m in models for a in ("--gallery-model", m)],
            *[a for t in world.transforms for a in ("--transform", t)]]
    assert main([str(a) for a in [*argv, "--out", tmp_path / "g.parquet", "--members-dir", tmp_path / "m"]]) == 0
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["resnet_a.parquet", "vgg_b.parquet"]
    stored = tmp_path / "train"
    stored.mkdir()
    meta = {"cmce": '{"kind": "train_embeddings"}'}
    pq.write_table(pa.table({"id": ["x"]}).replace_schema_metadata(meta), stored / "resnet_a.parquet")
    kept = _inputs_kept(stored / "resnet_a.parquet")
    out = tmp_path / "g2.parquet"
    fails(caplog, [*argv, "--out", out, "--members-dir", stored], out,
          f"{stored / 'resnet_a.parquet'}: holds a train_embeddings Parquet file; this step writes a gallery_member")
    assert _inputs_kept(stored / "resnet_a.parquet") == kept


# ---------------------------------------------------------------- environment variables, checked before any work
@pytest.mark.parametrize("name, value, expected", [
    ("AWS_MAX_ATTEMPTS", "1000000", "an integer from 1 to 10 expected"),  # at a dead endpoint: a hang
    ("CMCE_S3_MULTIPART_CHUNK_MB", "4", "an integer from 5 to 5120 expected"),
    ("CMCE_S3_MAX_CONCURRENCY", "abc", "an integer from 1 to 64 expected"),
    ("CMCE_S3_READ_TIMEOUT_S", "0", "an integer from 1 to 300 expected"),
    ("CMCE_S3_MULTIPART_THRESHOLD_MB", "1e3", "an integer from 1 to 5120 expected"),
    ("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "999", "an integer from 1 to 10 expected"),
    ("AWS_RETRY_MODE", "forever", "one of standard, adaptive, legacy expected"),
    ("CMCE_S3_DEADLINE_S", "0", "an integer from 2 to 3600 expected"),
    ("AWS_ENDPOINT_URL_S3", "127.0.0.1:9000", "an http:// or https:// URL expected"),
    ("AWS_ENDPOINT_URL", "http://host:notaport", "an http:// or https:// URL expected"),
    ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000/b", "the server's URL without a path expected"),  # "no such object"
    ("AWS_CA_BUNDLE", "/no/such/ca.pem", "no such certificate file"),
    ("AWS_REQUEST_CHECKSUM_CALCULATION", "bogus", "when_supported or when_required expected"),
])
def test_an_s3_setting_out_of_range_is_refused_before_any_work(name, value, expected, world, tmp_path, caplog, capsys,
                                                              monkeypatch):
    """CMCE_S3_MULTIPART_CHUNK_MB=4 was refused only at the upload, after the export had printed its success
    record; AWS_MAX_ATTEMPTS=1000000 at a dead endpoint hung. No server is needed: nothing is sent."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv(name, value)
    _with_alarm(60)
    try:
        fails(caplog, ["export-query", "--query-model", world.query, "--out", "s3://bucket/q.onnx"],
              tmp_path / "unused", f"environment variable {name}=", expected)
    finally:
        _no_alarm()
    assert capsys.readouterr().out == ""
    assert not any(r.name == "cmce.export" for r in caplog.records)  # refused before the export


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK=5: must be below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: at least 1 rank expected"),
    ({"RANK": "0", "WORLD_SIZE": "-1"}, "WORLD_SIZE='-1': not a rank count"),
    ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2: must be below LOCAL_WORLD_SIZE=2"),
    ({"LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3: from 1 to WORLD_SIZE=2 expected"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2: must be below WORLD_SIZE=2"),
    ({"MASTER_PORT": "99999"}, "MASTER_PORT='99999': a TCP port from 1 to 65535 expected"),
    ({"RANK": "1.0"}, "RANK='1.0': not a rank count"),
    ({"MASTER_ADDR": "no-such-host.invalid"}, "MASTER_ADDR='no-such-host.invalid': the host cannot be resolved"),
])
def test_inconsistent_torchrun_variables_are_refused_before_joining(env, expected, world, tmp_path, caplog,
                                                                   monkeypatch):
    """RANK=5 WORLD_SIZE=2 waited the whole rendezvous timeout and printed c10d's frames; WORLD_SIZE=0 failed
    inside the TCPStore. Refused at once, naming the variable (the timeout here would fail the test)."""
    base = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29599",
            "CMCE_DDP_TIMEOUT_S": "120"}
    _train_fails_under({**base, **env}, f"environment variable {expected}", world, tmp_path, caplog, monkeypatch)


def _train_fails_under(env: dict[str, str], needle: str, world: World, tmp_path: Path,
                       caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cmce train` under the torchrun variables `env` (others unset) fails with `needle`, within 60 s."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "q.pt"
    _with_alarm(60)
    try:
        fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query", "--out", out], out,
              needle)
    finally:
        _no_alarm()


def test_a_file_given_twice_to_a_repeatable_flag_is_named_before_any_work(world, tmp_path, caplog):
    """`upgrade-query-model --train-embeddings A A` fitted for 12 s, then said B's embeddings were missing,
    naming neither the repeat nor the flag; the same file under another spelling is the same file."""
    out = tmp_path / "gallery.parquet"
    member = world.members[0]
    fails(caplog, ["combine", "--member", member, "--member", member, "--out", out], out,
          f"--member {member}: given twice; give each file once")
    other = f"{member.parent}/./{member.name}"
    fails(caplog, ["combine", "--member", member, "--member", other, "--out", out], out,
          f"--member {other}: given twice (as {member}); give each file once")


def test_an_empty_positional_argument_is_named_as_in_the_usage_line(tmp_path, caplog):
    out = tmp_path / "gallery.parquet"
    fails(caplog, ["merge", "", "--out", out], out, "cmce merge: SHARD_FILE '': empty; give a value")


def test_a_step_says_when_it_does_not_track_to_its_mlflow_uri(world, tmp_path, caplog):
    """`cmce --mlflow-uri URI build-index ...` exited 0 without a word and recorded nothing (a step is tracked only
    under --mlflow-parent), while `cmce run` tracks to the same URI: the user believed the step tracked."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["--mlflow-uri", uri, "build-index", "--gallery", str(world.gallery), "--out",
                     str(tmp_path / "index")]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--mlflow-uri" in r.getMessage()]
    assert said == ["cmce build-index: --mlflow-uri is read by a step only with --mlflow-parent RUN_ID or for "
                    "models:/ arguments: this one records nothing in MLflow (`cmce run` tracks itself)"]
    assert not (tmp_path / "mlflow.db").exists()
    caplog.clear()  # without the flag, or where it is read, nothing is said
    with caplog.at_level(logging.INFO):
        assert main(["build-index", "--gallery", str(world.gallery), "--out", str(tmp_path / "index2")]) == 0
    assert not [r for r in caplog.records if "--mlflow-uri" in r.getMessage()]


@pytest.mark.parametrize("flag", ["--gallery", "--out", "--config"])
def test_an_empty_argument_is_named_by_its_flag(world, tmp_path, caplog, monkeypatch, flag):
    """`--gallery ""` (an unset shell variable) was read as the working folder: `.: is a folder (or an S3 prefix),
    not a file`, naming neither the flag nor the empty value."""
    monkeypatch.chdir(tmp_path)
    argv = {"--gallery": str(world.gallery), "--out": str(tmp_path / "index"), "--config": str(SMOKE)}
    argv[flag] = "" if flag != "--config" else "  "
    out = tmp_path / "index"
    fails(caplog, ["build-index", *[part for pair in argv.items() for part in pair]], out,
          f"cmce build-index: {flag} {argv[flag]!r}: empty; give a value")


def test_an_output_that_is_a_symbolic_link_is_refused_and_home_is_expanded(world, tmp_path, caplog, monkeypatch):
    """--out /dev/stdout (a link) exited 0 having replaced the system's link by a regular file; `~` in a path
    was checked literally (./~) while pyarrow read $HOME."""
    from cmce.config import load_config

    target = tmp_path / "real.parquet"
    target.write_bytes(b"kept")
    link = tmp_path / "link.parquet"
    link.symlink_to(target)
    fails(caplog, ["combine", "--member", world.members[0], "--out", link], link,
          f"{link}: is a symbolic link; give the path it points to")
    assert link.is_symlink() and target.read_bytes() == b"kept"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["combine", "--member", str(world.members[0]), "--out", "~/g.parquet"]) == 0
    assert (tmp_path / "home" / "g.parquet").is_file() and not (tmp_path / "~").exists()
    assert load_config(SMOKE, {"output_dir": "~/runs"}).output_dir == str(tmp_path / "home" / "runs")
    out = tmp_path / "~nosuchuser" / "g.parquet"  # was written there, in the working folder
    fails(caplog, ["combine", "--member", world.members[0], "--out", "~nosuchuser/g.parquet"], out,
          "cmce combine: --out ~nosuchuser/g.parquet: no such user's home folder")
    fails(caplog, ["merge", "~nosuchuser/s.parquet", "--out", tmp_path / "m.parquet"], tmp_path / "m.parquet",
          "cmce merge: SHARD_FILE ~nosuchuser/s.parquet: no such user's home folder")  # as in the usage line
    with pytest.raises(ValueError, match="output_dir: ~nosuchuser/runs: no such user's home folder"):
        load_config(SMOKE, {"output_dir": "~nosuchuser/runs"})
    # registry and S3 spellings cmce does not read are named, not looked for as files
    fails(caplog, ["combine", "--member", world.members[0], "--out", "s3://b//g.parquet"], out,
          "s3://b//g.parquet: an empty path segment (//) in the key")
    for uri in ("s3://b/r/./g.parquet", "s3://b/r/../g.parquet"):  # was the server's `400: Bad Request` alone
        fails(caplog, ["combine", "--member", world.members[0], "--out", uri], out,
              f"{uri}: a `.` or `..` segment in the key (S3 keys are names, not paths); write the key without it")
    fails(caplog, [*embed_member_args(world, gallery_model="runs:/0123/model.pt"), "--out", out], out,
          "runs:/0123/model.pt: a checkpoint is a path, an s3:// object or models:/NAME@ALIAS")
    mounted = tmp_path / "volume"  # a mounted volume cannot be renamed aside: EBUSY after the whole build
    mounted.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mounted or real_ismount(p))
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", mounted], mounted,
          f"{mounted}: is a mount point, which cannot be replaced; give a folder inside it")


def test_weights_that_do_not_fit_the_architecture_name_the_keys(world, tmp_path, caplog):
    """The line stopped at torch's heading ('Error(s) in loading state_dict for EmbeddingNet:'), before the keys."""
    obj = torch.load(world.gallery_models[0], weights_only=True)
    obj["state_dict"]["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "resnet_a.pt"
    torch.save(obj, bad)
    out = tmp_path / "m.parquet"
    fails(caplog, [*embed_member_args(world, gallery_model=bad), "--out", out], out,
          f"{bad}: weights do not match architecture 'resnet': Error(s) in loading state_dict for EmbeddingNet: "
          "Unexpected key(s) in state_dict: \"extra.weight\"")


def test_a_checkpoint_is_replaced_only_by_one_of_its_kind(world, tmp_path, caplog):
    """fit-transform --out naming a gallery model replaced the model by a transformation, exit 0 (and train
    --out a transformation by a model)."""
    model = Path(shutil.copyfile(world.gallery_models[1], tmp_path / "vgg_b.pt"))
    fails(caplog, ["fit-transform", "--config", SMOKE, "--set", "transform.epochs=1", "--dataset", world.dataset,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0], "--out", model], model,
          f"{model}: holds a cmce-embedding-model/1 checkpoint file; this step writes a cmce-transformation/1 file")
    transform = Path(shutil.copyfile(world.transforms[1], tmp_path / "t.pt"))
    fails(caplog, ["train", "--config", SMOKE, "--set", "train.epochs=1", "--dataset", world.dataset, "--model",
                   "query", "--out", transform], transform,
          f"{transform}: holds a cmce-transformation/1 checkpoint file; this step writes a cmce-embedding-model/1")


def test_a_checkpoint_in_torchs_legacy_format_is_named_as_such(world, tmp_path, caplog):
    obj = torch.load(world.gallery_models[0], weights_only=True)
    legacy = tmp_path / "resnet_a.pt"
    torch.save(obj, legacy, _use_new_zipfile_serialization=False)
    out = tmp_path / "m.parquet"
    fails(caplog, [*embed_member_args(world, gallery_model=legacy), "--out", out], out,
          f"{legacy}: not a loadable checkpoint: torch's legacy (pre-1.6) format, which cmce does not read")


def test_a_run_into_a_folder_holding_another_models_transformation_is_refused_before_training(smoke_run, tmp_path,
                                                                                               caplog):
    """A stale transforms/resnet_c.pt was left beside the run's own: `evaluate --transform-dir` then refused it."""
    lay, _ = smoke_run
    root = Path(shutil.copytree(lay.root, tmp_path / "run"))
    shutil.copyfile(root / "transforms" / "resnet_a.pt", root / "transforms" / "resnet_c.pt")
    caplog.clear()
    assert main(["run", "--config", str(SMOKE), "--set", f"output_dir={root}"]) == 2
    assert f"{root / 'transforms'}: holds resnet_c.pt, of gallery models this config does not have" in caplog.text


def test_a_run_into_a_folder_holding_other_files_at_its_output_names_is_refused_before_any_work(smoke_run, tmp_path,
                                                                                                caplog):
    """`cmce run` checked only its index and eval folders: a dataset at a member's path was replaced by the member
    file, exit 0, and a folder at a model's path failed once the models before it had trained."""
    lay, _ = smoke_run
    for where, put, said in (
            ("embeddings/gallery/vgg_b.parquet", lambda p: shutil.copyfile(lay.dataset, p),
             "holds a dataset Parquet file; this step writes a gallery_member file"),
            ("models/kd_resnet_a.pt", lambda p: p.mkdir(), "is a folder; this output is a file"),
            ("transforms/vgg_b.pt", lambda p: shutil.copyfile(lay.model("vgg_b"), p),
             "holds a cmce-embedding-model/1 checkpoint file; this step writes a cmce-transformation/1 file")):
        root = tmp_path / where.replace("/", "_")
        (root / where).parent.mkdir(parents=True)
        put(root / where)
        kept = sorted(p.relative_to(root) for p in root.rglob("*"))
        caplog.clear()
        assert main(["run", "--config", str(SMOKE), "--set", f"output_dir={root}"]) == 2, where
        assert f"cmce run: {root / where}: {said}" in caplog.text
        assert sorted(p.relative_to(root) for p in root.rglob("*")) == kept, where  # no dataset prepared, nothing


def test_json_and_onnx_outputs_are_told_apart_from_other_formats(world, tmp_path, caplog):
    """export-query --out an index's meta.json replaced it by an ONNX model, and train --out an ONNX export by a
    checkpoint, both exit 0: only Parquet and checkpoints were recognised."""
    meta = shutil.copy(world.index / "meta.json", tmp_path / "meta")  # named for no format: told by its content
    fails(caplog, ["export-query", "--query-model", world.query, "--out", meta], meta,
          f"{meta}: holds a JSON file; this step writes an ONNX file")
    onnx_file = tmp_path / "q.onnx"
    assert main(["export-query", "--query-model", str(world.query), "--out", str(onnx_file)]) == 0
    assert main(["export-query", "--query-model", str(world.query), "--out", str(onnx_file)]) == 0  # its own kind
    # an ONNX model cmce did not export (no cmce-query-onnx metadata): replaced, exit 0
    import onnx
    from onnx import TensorProto, helper

    foreign = tmp_path / "detector.onnx"
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "detector",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(foreign))
    fails(caplog, ["export-query", "--query-model", world.query, "--out", foreign], foreign,
          f"{foreign}: holds a non-cmce ONNX file; this step writes a cmce-query-onnx/1 file")
    exported = shutil.copy(onnx_file, tmp_path / "q_export")
    fails(caplog, ["train", "--config", SMOKE, "--set", "train.epochs=1", "--dataset", world.dataset, "--model",
                   "query", "--out", exported], exported,
          f"{exported}: holds an ONNX file; this step writes a checkpoint file")
    # a new file named as another format: an ONNX model written as q.pt, a checkpoint as model.onnx, exit 0
    for argv, out, said in (
            (["export-query", "--query-model", world.query], tmp_path / "q.pt", "a checkpoint file; this step writes "
                                                                                "an ONNX file, so give a name ending "
                                                                                "in .onnx"),
            (["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query"], tmp_path / "m.onnx",
             "an ONNX file; this step writes a checkpoint file, so give a name ending in .pt"),
            (["export-query", "--query-model", world.query], world.index / "meta.json",
             "a JSON file; this step writes an ONNX file, so give a name ending in .onnx")):  # there already, too
        fails(caplog, [*argv, "--out", out], out, f"{out}: its name says {said}")


def test_shards_of_two_versions_of_a_dataset_are_not_merged(world, tmp_path, caplog):
    """A relabelled copy has the same ids, so the ids digest let its shard merge with one of the original: a
    member with labels of two versions, exit 0."""
    table = pq.read_table(world.dataset)
    test_rows = np.flatnonzero(table.column("split").to_numpy(zero_copy_only=False) == "test")
    labels = table.column("label").to_numpy().copy()
    labels[test_rows[-1]] = (labels[test_rows[-1]] + 1) % (labels.max() + 1)
    names = table.column("class_name").to_pylist()  # the row moves to the other class, name and all
    names[test_rows[-1]] = names[int(np.flatnonzero(labels == labels[test_rows[-1]])[0])]
    relabelled = tmp_path / "relabelled.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
                   .set_column(table.schema.get_field_index("class_name"), "class_name", pa.array(names, pa.string())),
                   relabelled)
    shards = [tmp_path / "sh0.parquet", tmp_path / "sh1.parquet"]
    for k, (dataset, shard) in enumerate(zip([world.dataset, relabelled], shards, strict=True)):
        assert main([str(a) for a in embed_member_args(world, dataset=dataset)] + ["--shard", f"{k}/2", "--out",
                                                                                   str(shard)]) == 0
    out = tmp_path / "merged.parquet"
    fails(caplog, ["merge", *shards, "--out", out], out, f"{shards[1]}: metadata differs from {shards[0]}")


def test_merged_shards_replace_only_a_file_of_their_own_kind(world, tmp_path, caplog):
    """merge called its output a gallery or a member file, whichever its shards were: member shards replaced a
    gallery, and gallery shards a member file (exit 0)."""
    shards = [tmp_path / f"s{k}.parquet" for k in range(2)]
    for k, shard in enumerate(shards):
        assert main([str(a) for a in embed_member_args(world)] + ["--shard", f"{k}/2", "--out", str(shard)]) == 0
    gallery = Path(shutil.copyfile(world.gallery, tmp_path / "gallery.parquet"))
    fails(caplog, ["merge", *shards, "--out", gallery], gallery,
          f"{gallery}: holds a gallery Parquet file; this step writes a gallery_member file")
    member = Path(shutil.copyfile(world.members[1], tmp_path / "member.parquet"))
    assert main(["combine", "--member", str(shards[0]), "--out", str(tmp_path / "g0.parquet")]) == 0
    assert main(["combine", "--member", str(shards[1]), "--out", str(tmp_path / "g1.parquet")]) == 0
    fails(caplog, ["merge", tmp_path / "g0.parquet", tmp_path / "g1.parquet", "--out", member], member,
          f"{member}: holds a gallery_member Parquet file; this step writes a gallery file")
    assert main(["merge", *map(str, shards), "--out", str(tmp_path / "member2.parquet")]) == 0  # a new file: written


def without_source(src: Path, dst: Path, **columns) -> Path:
    """`src` rewritten with `columns`, its metadata without `source` (a file of no known dataset, whose ids and
    labels no digest checks)."""
    rewrite(src, dst, **columns)
    table = pq.read_table(dst)
    meta = {k: v for k, v in read_metadata(dst).items() if k != "source"}
    pq.write_table(table.replace_schema_metadata({b"cmce": json.dumps(meta).encode()}), dst)
    return dst


def test_merge_refuses_a_null_or_repeated_id_and_a_label_beyond_32_bits_naming_the_file(world, tmp_path, caplog):
    """A null or integer id was a traceback; an id repeated within one shard was merged (the count logged short by
    one) and refused only by build-index; an int64 label of 2**32 + 1 was stored as 1 by merge and build-index."""
    ids = pq.read_table(world.gallery).column("id").to_pylist()
    labels = pq.read_table(world.gallery).column("label").to_numpy().astype(np.int64)
    out = tmp_path / "merged.parquet"
    cases = {"null": (pa.array([None, *ids[1:]], pa.string()), None, "column 'id' has 1 null rows"),
             "integer": (pa.array(range(len(ids)), pa.int64()), None, "column 'id' has type int64, expected string"),
             "repeated": (pa.array([ids[0], *ids[:-1]], pa.string()), None, f"column 'id' has duplicate id '{ids[0]}'"),
             "wide label": (None, pa.array([2**32 + 1, *labels[1:]], pa.int64()),
                            "column 'label' has 4294967297, beyond the 32-bit integers cmce's files store")}
    for case, (id_column, label_column, said) in cases.items():
        columns = {**({"id": id_column} if id_column is not None else {}),
                   **({"label": label_column} if label_column is not None else {})}
        shard = without_source(world.gallery, tmp_path / f"{case.replace(' ', '_')}.parquet", **columns)
        fails(caplog, ["merge", shard, "--out", out], out, f"{shard}: {said}")
    wide = tmp_path / "wide_label.parquet"
    index = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", wide, "--out", index], index, f"{wide}: column 'label' has 4294967297")


def test_add_gallery_model_names_its_work_files_by_the_model(world, tmp_path):
    """Two gallery models both saved as model.pt, added one after the other with one --work-dir: the second
    overwrote the first's transformation, train embeddings and member file (named by the file, not the model)."""
    work = tmp_path / "work"
    gallery = world.gallery
    for k, name in enumerate(("resnet_c", "resnet_d")):
        model = tiny_model(tmp_path / name[-1] / "model.pt", name, "resnet", 12, seed=5 + k, role="gallery")
        out = tmp_path / f"g{k}.parquet"
        assert main(["add-gallery-model", "--config", str(SMOKE), *TINY, "--set", "transform.epochs=1",
                     "--dataset", str(world.dataset), "--query-model", str(world.query), "--gallery", str(gallery),
                     "--gallery-model", str(model), "--out", str(out), "--work-dir", str(work)]) == 0
        gallery = out
    assert sorted(p.name for p in work.iterdir()) == sorted(f"{kind}_{n}.{ext}" for n in ("resnet_c", "resnet_d")
                                                             for kind, ext in (("transform", "pt"),
                                                                               ("train", "parquet"),
                                                                               ("member", "parquet")))


def test_a_label_under_two_class_names_is_named(world, tmp_path, caplog):
    """Rows of one label with two class names (an edited or merged dataset) were read without a word."""
    table = pq.read_table(world.dataset)
    labels = table.column("label").to_numpy()
    names = table.column("class_name").to_pylist()
    label = int(labels[0])
    for row in np.flatnonzero(labels == label)[:2]:
        names[row] = "renamed"
    bad = tmp_path / "dataset.parquet"
    pq.write_table(table.set_column(table.schema.get_field_index("class_name"), "class_name",
                                    pa.array(names, pa.string())), bad)
    out = tmp_path / "member.parquet"
    fails(caplog, [*embed_member_args(world, dataset=bad), "--out", out], out,
          f"{bad}: label {label} has several class names (", "'renamed'")


def test_a_shard_combined_with_a_whole_member_is_named_as_a_shard(world, tmp_path, caplog):
    """The refusal gave the two files' row counts sorted, so they read opposite to the file order, and never
    said that one was a shard."""
    shard = tmp_path / "vgg_s0.parquet"
    assert main([str(a) for a in embed_member_args(world)] + ["--shard", "0/2", "--out", str(shard)]) == 0
    out = tmp_path / "g.parquet"
    fails(caplog, ["combine", "--member", world.members[1], "--member", shard, "--out", out], out,
          f"members cover different parts of the split ({world.members[1]}: the whole split; {shard}: shard 0/2)",
          "merge each member's shards first")


@pytest.mark.parametrize("error, rc, logged", [
    (OSError(28, "No space left on device"), 2, "cmce search: standard output: not written: No space left on device"),
    (BrokenPipeError(32, "Broken pipe"), 128 + signal.SIGPIPE, None),
])
def test_standard_output_that_fails_is_named_and_a_closed_pipe_is_quiet(world, caplog, monkeypatch, error, rc, logged):
    """`> /dev/full` was `[Errno 28] No space left on device` naming nothing; `| head` an error line."""
    class Failing:
        def write(self, text):
            raise error

        def flush(self):
            pass

        def fileno(self):
            return os.open(os.devnull, os.O_WRONLY)

    monkeypatch.setattr(sys, "stdout", Failing())
    caplog.clear()
    assert main([str(a) for a in _search(world, world.index)]) == rc
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ([logged] if logged else [])


def test_a_partial_torchrun_environment_is_refused_not_run_alone(world, tmp_path, caplog, monkeypatch):
    """RANK=1 WORLD_SIZE=2 without MASTER_PORT trained alone as rank 0 of 1, exit 0, and said nothing."""
    _train_fails_under({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"},
                       "cmce train: WORLD_SIZE=2 asks for several ranks, but MASTER_PORT is not set", world, tmp_path,
                       caplog, monkeypatch)


def test_a_world_size_that_is_no_count_is_named_as_such(world, tmp_path, caplog, monkeypatch):
    """WORLD_SIZE=abc was said to ask for several ranks, blaming RANK, MASTER_ADDR and MASTER_PORT for being unset."""
    _train_fails_under({"WORLD_SIZE": "abc"}, "cmce train: environment variable WORLD_SIZE='abc': not a rank count",
                       world, tmp_path, caplog, monkeypatch)


def test_an_index_meta_json_of_gigabytes_is_refused_unread(world, tmp_path, caplog):
    """A 3 GB sparse meta.json was read whole before it was refused (6.6 GB of memory); at 20 GB under a memory
    limit, `out of memory`, naming neither the file nor the index."""
    index = Path(shutil.copytree(world.index, tmp_path / "index"))
    with open(index / "meta.json", "r+b") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    fails(caplog, _search(world, index), tmp_path / "unused",
          f"{index}/meta.json: more than {64 << 20:,} bytes, more than such a file holds")


def test_an_index_file_of_another_size_than_meta_json_says_is_refused_unread(world, tmp_path, caplog, monkeypatch):
    """A 20 GB sparse index.faiss was hashed whole before it was refused (72 s): meta.json records each file's
    size, compared first."""
    import cmce.index as index_module

    index = shutil.copytree(world.index, tmp_path / "index")
    with open(index / "index.faiss", "r+b") as f:
        f.truncate(20 << 30)  # sparse
    hashed = []
    monkeypatch.setattr(index_module, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    fails(caplog, _search(world, index), tmp_path / "unused",  # not the index: its snapshot would read 20 GB
          f"{index}/index.faiss: missing, not a regular file, or does not match the checksum in meta.json (its size "
          "is 21,474,836,480 bytes, meta.json records")
    assert hashed == []


def test_an_index_file_that_cannot_be_read_is_named(tmp_path):
    """ids.parquet replaced by a link to /proc/self/mem under a served index: `[Errno 5] Input/output error`,
    naming no file."""
    from cmce.index import check_files

    (tmp_path / "ids.parquet").symlink_to("/proc/self/mem")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/ids.parquet: unreadable \(Input/output error\)$"):
        check_files(tmp_path, {"files": {"ids.parquet": "0" * 64}}, str(tmp_path))


def test_a_users_folder_named_like_the_swap_aside_is_left_alone(world, tmp_path, caplog):
    """atomic_dir moves the previous output aside to `.<name>.old` while it swaps: a user's backup of that name was
    deleted by the next build (exit 0), put in place of a missing output, or (a file) left a temporary behind."""
    out, aside = tmp_path / "index", tmp_path / ".index.old"
    build = ["build-index", "--gallery", str(world.gallery), "--out", str(out)]

    def refused(needle: str) -> None:
        caplog.clear()
        assert main(build) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and needle in errors[0], errors
        assert [p for p in leftovers(tmp_path) if p != aside] == []

    assert main(build) == 0
    shutil.copytree(out, aside)
    (aside / "NOTE.txt").write_text("my backup")
    kept, index_kept = snapshot(aside), snapshot(out)
    refused(f"{aside}: a folder of other files, where this step moves the previous index aside")
    assert snapshot(aside) == kept and snapshot(out) == index_kept
    shutil.rmtree(out)  # and with no output there, the backup is not taken for an interrupted swap
    refused(f"{aside}: a folder of other files")
    assert snapshot(aside) == kept and not out.exists()
    shutil.rmtree(aside)
    aside.write_bytes(b"a tarball")
    refused(f"{aside}: a file or link")
    assert aside.read_bytes() == b"a tarball" and not out.exists()
    aside.unlink()
    assert main(build) == 0
    shutil.copytree(out, aside)  # an earlier version the step itself left: replaced as before
    assert main(build) == 0 and not aside.exists()


def test_a_swap_that_waits_for_another_processs_lock_says_so(world, tmp_path, caplog):
    """A search stopped with Ctrl-Z holds its shared lock on the index's parent folder: the next build waited
    without a word, which looked like a hang."""
    import fcntl
    import threading
    import time

    out = tmp_path / "index"
    build = ["build-index", "--gallery", str(world.gallery), "--out", str(out)]
    assert main(build) == 0
    rc = []
    held = os.open(tmp_path, os.O_RDONLY)  # flock locks an open file: another open of the folder contends
    try:
        caplog.set_level(logging.INFO)
        fcntl.flock(held, fcntl.LOCK_SH)
        thread = threading.Thread(target=lambda: rc.append(main(build)))
        thread.start()
        deadline = time.monotonic() + 60
        while not any("waiting for another process" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline and thread.is_alive(), [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        assert thread.is_alive()  # still waiting, and has said what for
        fcntl.flock(held, fcntl.LOCK_UN)
        thread.join(60)
    finally:
        os.close(held)
    assert rc == [0]
    said = next(r.getMessage() for r in caplog.records if "waiting for another process" in r.getMessage())
    assert said == f"{out}: waiting for another process that is reading or swapping it (it holds a lock on {tmp_path})"


# ---------------------------------------------------------------- a ninth hostile round: environment and registry
def _store_with_a_registered_query_model(root: Path, source: str) -> str:
    """A tracking store whose cmce-query@candidate is registered from `source` (never downloaded here)."""
    from mlflow import MlflowClient

    from cmce.tracking import ALIAS, QUERY_MODEL, start_parent_run

    root.mkdir()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    start_parent_run(uri, "parent", {})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model(QUERY_MODEL)
    version = client.create_model_version(QUERY_MODEL, source=source)
    client.set_registered_model_alias(QUERY_MODEL, ALIAS, version.version)
    return uri


def test_a_registry_variable_gets_the_checks_of_the_tracking_uri(world, tmp_path, caplog, monkeypatch):
    """MLFLOW_REGISTRY_URI=sqlite:///reg.db left in the environment: MLflow made a new reg.db in the working
    folder and looked the model up there, never in --mlflow-uri's registry."""
    registered = tmp_path / "registered" / "cmce-query"  # a registered version is a folder holding the file
    registered.mkdir(parents=True)
    shutil.copyfile(world.query, registered / "query.pt")
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(registered))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///reg.db")
    fails(caplog, ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model",
                   "models:/cmce-query@candidate", "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused",
          "MLFLOW_REGISTRY_URI=sqlite:///reg.db: no tracking database there")
    assert list(work.iterdir()) == []
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # the same store named twice is no conflict
    assert main(["--mlflow-uri", uri, "search", "--index", str(world.index), "--query-model",
                 "models:/cmce-query@candidate", "--dataset", str(world.dataset), "--limit", "1"]) == 0


def test_a_tracking_uri_that_is_not_mlflow_is_named_by_a_registered_model(world, tmp_path, caplog, monkeypatch):
    """An HTTP server that is not MLflow answered the registry's request with a 404: the error named the API
    path, not the --mlflow-uri at fault."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        fails(caplog, ["--mlflow-uri", url, "search", "--index", world.index, "--query-model",
                       "models:/cmce-query@candidate", "--dataset", world.dataset, "--limit", "1"],
              tmp_path / "unused", f"models:/cmce-query@candidate: registry {url}: ", "404")
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_mlflow_s3_endpoint_is_named(world, tmp_path, caplog, monkeypatch):
    """Registered artifacts on S3 behind a dead MLFLOW_S3_ENDPOINT_URL: "Could not connect to the endpoint URL",
    the variable that named it unsaid."""
    import socket

    uri = _store_with_a_registered_query_model(tmp_path / "store", "s3://models/reg/cmce-query")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    fails(caplog, ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model",
                   "models:/cmce-query@candidate", "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused",
          "models:/cmce-query@candidate: ", f"MLFLOW_S3_ENDPOINT_URL='http://127.0.0.1:{port}'")


def test_query_arguments_on_a_sqlite_store_are_refused(world, tmp_path, caplog, monkeypatch):
    """`sqlite:///x.db?mode=ro`: SQLAlchemy's sqlite driver ignores query arguments (a warning), and the store the
    user asked to keep unwritten was written."""
    from cmce.tracking import start_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    db = tmp_path / "mlflow.db"
    run_id = start_parent_run(f"sqlite:///{db}", "parent", {})
    before = snapshot(db)
    uri = f"sqlite:///{db}?mode=ro"
    track = tmp_path / "track.json"
    fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", uri, "--out", track], track,
          uri, "query arguments (mode=ro) are not applied")
    out = tmp_path / "index"
    fails(caplog, ["--mlflow-uri", uri, "--mlflow-parent", run_id, "build-index", "--gallery", world.gallery,
                   "--out", out], out, "query arguments (mode=ro)")
    assert snapshot(db) == before


# ---------------------------------------------------------------- [72ah]
@pytest.mark.parametrize("out,verb", [(".", "is"), ("./", "is"), ("..", "holds"), ("HERE", "is")])
def test_an_output_that_is_the_working_folder_is_refused_naming_its_flag(world, tmp_path, caplog, monkeypatch,
                                                                          out, verb):
    """`build-index --out .` failed with `PosixPath('.') has an empty name`: a Python repr, no flag named."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    out = str(here) if out == "HERE" else out
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", out], here,
          f"build-index: --out {out} {verb} the working folder; give the name of the file or folder to write")
    fails(caplog, [*evaluate_args(world), "--out", out], here, f"--out {out} {verb} the working folder")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query", "--out", out], here,
          f"--out {out} {verb} the working folder")
    fails(caplog, ["run", "--config", SMOKE, "--set", f"output_dir={out}"], here,  # it wrote the run among them
          f"output_dir: {out} {verb} the working folder; give a folder for the run's outputs")
    assert list(here.iterdir()) == []


def test_a_run_whose_output_dir_is_a_file_is_refused_naming_the_key(tmp_path, caplog):
    """`--set output_dir=<a file>` failed with `[Errno 20] Not a directory: '<file>/data'`, a path never given."""
    notes = previous_file(tmp_path / "notes.txt")
    fails(caplog, ["run", "--config", SMOKE, "--set", f"output_dir={notes}"], notes,
          f"output_dir: {notes} is a file; give a folder for the run's outputs")
    fails(caplog, ["run", "--config", SMOKE, "--set", f"output_dir={notes}/run"], notes,
          f"output_dir: {notes}/run cannot be created: {notes} is a file")


@pytest.mark.parametrize("argv,flag", [
    (["train", "--config", "a.yaml", "--config", "b.yaml", "--dataset", "d", "--model", "q", "--out", "o"],
     "--config"),
    (["train", "--config=a.yaml", "--dataset", "d", "--dataset", "d", "--model", "q", "--out", "o"], "--dataset"),
    (["--device", "cpu", "--device", "cuda", "train", "--config", "a.yaml", "--dataset", "d", "--model", "q",
      "--out", "o"], "--device"),
    (["build-index", "--gallery", "g", "--out", "o", "--index-type", "flat", "--index-type", "hnsw"],
     "--index-type"),
    (["--mlflow-uri", "a", "track-start", "--config", "c.yaml", "--mlflow-uri", "b"], "--mlflow-uri"),
])
def test_a_single_valued_option_given_twice_is_refused_at_parse_time(capsys, argv, flag):
    """`--config a.yaml --config b.yaml` trained with b.yaml alone, a.yaml ignored without a word."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: given twice" in err, err


def test_options_that_take_lists_may_still_be_repeated():
    from cmce.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--config", "c", "--set", "a=1", "--set", "b=2", "--dataset", "d",
                                      "--query-model", "q", "--gallery", "g", "--transform", "t1", "--transform",
                                      "t2", "--kd", "s1", "--kd", "s2", "--out", "o"])
    assert (args.set, args.transform, args.kd) == (["a=1", "b=2"], ["t1", "t2"], ["s1", "s2"])
    args = build_parser().parse_args(["embed-gallery", "--dataset", "d", "--query-model", "q", "--gallery-model",
                                      "g1", "--transform", "t1", "--gallery-model", "g2", "--transform", "t2",
                                      "--out", "o"])
    assert (args.gallery_model, args.transform) == (["g1", "g2"], ["t1", "t2"])
    assert build_parser().parse_args(["merge", "a", "b", "--out", "o"]).shard_file == ["a", "b"]
    # one parser parses twice: what the first parse saw does not count against the second
    parser = build_parser()
    for _ in range(2):
        assert parser.parse_args(["--device", "cpu", "merge", "a", "--out", "o"]).device == "cpu"


def test_evaluate_refuses_a_recall_k_the_gallery_cannot_miss(world, tmp_path, caplog):
    """`evaluate.recall_k=[1,1000]` on a 539-item gallery reported R@1000 = 1.0 for every configuration, a column
    that measures nothing (the gate refuses such a metric). A run refuses it before it writes its dataset;
    prepare-data alone warns of it (the pipelines' runs refuse it there: --will-evaluate)."""
    items = pq.ParquetFile(world.gallery).metadata.num_rows
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world), "--set", f"evaluate.recall_k=[1, {items - 1}]", "--out", out], out,
          f"evaluate.recall_k: R@{items - 1} is 1 for every query with a match on a gallery of {items} items, less "
          f"each query's own image ({world.gallery}); give K below {items - 1}")  # leave-one-out: K = n - 1 too
    root = tmp_path / "run"
    fails(caplog, ["run", "--config", SMOKE, *TINY, "--set", f"output_dir={root}", "--set",
                   f"evaluate.recall_k=[1, {items}, 100000]"], root,
          f"evaluate.recall_k: R@{items}, R@100000 is 1 for every query with a match on a gallery of {items} items, "
          "less each query's own image (the test split the data settings give)")  # before its dataset is written
    # the first step of every runner (cmce run, the KFP and DVC pipelines) says it at once
    caplog.clear()
    assert main(["prepare-data", "--config", str(SMOKE), *TINY, "--set", f"evaluate.recall_k=[{items}]", "--out",
                 str(tmp_path / "dataset.parquet")]) == 0
    assert f"evaluate.recall_k: R@{items} is 1 for every query" in caplog.text and "evaluate will refuse" in caplog.text


@pytest.mark.parametrize("model,key", [("vgg_b", "gallery_models.vgg_b"), ("query", "query_model")])
def test_a_data_fraction_that_leaves_one_class_is_named(world, tmp_path, caplog, model, key):
    """`data_fraction=0.001` left one training image: "the train split needs at least 2 classes, got 1" blamed
    the dataset, whose train split has 10."""
    out = tmp_path / "model.pt"
    fails(caplog, ["train", "--config", SMOKE, "--set", f"{key}.data_fraction=0.001", "--dataset", world.dataset,
                   "--model", model, "--out", out], out,
          f"{key}.data_fraction 0.001 keeps 1 of the 60 train images of {world.dataset}, of 1 class; training needs "
          "at least 2 classes, so raise it")


@pytest.mark.parametrize("uri", ["s3a://b/q.onnx", "S3://b/q.onnx", "gs://bucket/q.onnx", "s3:/b/q.onnx"])
def test_an_output_uri_of_another_scheme_is_refused_not_written_as_a_local_path(world, tmp_path, caplog,
                                                                                 monkeypatch, uri):
    """`--out s3a://b/q.onnx` (or S3://, gs://) was written to ./s3a:/b/q.onnx in the working folder, exit 0,
    and the record said it went to that URI."""
    monkeypatch.chdir(tmp_path)
    scheme = uri.split(":")[0]
    fails(caplog, ["export-query", "--query-model", world.query, "--out", uri], tmp_path / f"{scheme}:",
          f"--out {uri}: {scheme}: URIs are not supported")
    fails(caplog, ["build-index", "--gallery", world.gallery, "--out", uri], tmp_path / f"{scheme}:", "--out")
    fails(caplog, _search(world, uri), tmp_path / f"{scheme}:", f"--index {uri}: {scheme}: URIs")
    fails(caplog, ["search", "--index", world.index, "--query-model", "gs://b/q.pt", "--dataset", world.dataset],
          tmp_path / "gs:", "--query-model gs://b/q.pt: a checkpoint is a path, an s3:// object")
    assert list(tmp_path.iterdir()) == []


def test_storage_refuses_a_uri_of_another_scheme_for_any_caller(tmp_path):
    from cmce.output_checks import check_output
    from cmce.storage import local_input, local_output

    with pytest.raises(ValueError, match="the output s3a://b/k: s3a: URIs are not supported"):
        check_output("s3a://b/k")
    with pytest.raises(ValueError, match="the input gs://b/k: gs: URIs are not supported"):
        local_input("gs://b/k")
    with pytest.raises(ValueError, match="S3: URIs"), local_output("S3://b/k"):
        pass
    assert check_output(tmp_path / "a:b") is None  # a colon in a local name is no scheme


def test_a_dead_proxy_before_an_mlflow_http_store_is_named(world, tmp_path, caplog, monkeypatch):
    """A dead HTTP_PROXY in front of an MLflow HTTP store: urllib3 retry warnings, then an error line cut off
    mid-word (`Caused by ProxyError('Unable `), the variable unsaid."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    uri = "http://127.0.0.1:1"
    fails(caplog, ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model",
                   "models:/cmce-query@candidate", "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused",
          f"{uri}: cannot reach the proxy http://127.0.0.1:{port} (HTTP_PROXY)", "NO_PROXY")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and "Retrying" in r.getMessage()]


def test_an_error_line_is_cut_at_a_words_end():
    from cmce.errors import first_line

    assert first_line(ValueError("Caused by ProxyError('Unable to connect')"), 28) == "Caused by…"
    assert first_line(ValueError("short enough\nsecond"), 30) == "short enough"


def test_a_registered_version_with_a_model_card_beside_its_checkpoint_is_loaded(world, tmp_path, monkeypatch):
    """A version holding the checkpoint, a README and a JSON card: "expected one checkpoint file, found 3", and a gate
    that had moved @production to it left a production alias no step could load."""
    from cmce.registry import resolve_model_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copyfile(world.query, artifacts / "query.pt")
    (artifacts / "README.txt").write_text("model card")
    (artifacts / "card.json").write_text('{"note": 1}')
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(artifacts))
    local = resolve_model_uri("models:/cmce-query@candidate", uri)
    assert local.name == "query.pt" and file_sha256(local) == file_sha256(world.query)
    (artifacts / "query.pt").unlink()
    with pytest.raises(ValueError, match=r"expected one checkpoint file in the registered version, found 0"):
        resolve_model_uri("models:/cmce-query@candidate", uri)
    for name in ("a.pt", "b.pt"):  # two checkpoints: refused, and its download removed at once (a server following
        shutil.copyfile(world.query, artifacts / name)  # the alias kept one copy per move until it stopped)
    before = set(scratch_dir().iterdir())
    with pytest.raises(ValueError, match=r"expected one checkpoint file in the registered version, found 2"):
        resolve_model_uri("models:/cmce-query@candidate", uri)
    assert set(scratch_dir().iterdir()) == before


def test_a_registered_version_that_cannot_be_downloaded_names_why(world, tmp_path, monkeypatch):
    """A version folder whose checkpoint is a link out of it: the error stopped at MLflow's "The following
    failures occurred while downloading one or more artifacts from X:", the cause cut off."""
    from cmce.registry import resolve_model_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / "query.pt").symlink_to(world.query)
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(artifacts))
    with pytest.raises(ValueError) as err:
        resolve_model_uri("models:/cmce-query@candidate", uri)
    assert str(err.value).endswith("File query.pt; Invalid path: resolved path is outside the artifact directory")


def test_an_uncertainty_column_its_running_sum_contradicts_is_refused(world, tmp_path, caplog):
    """The gallery's `uncertainty` reversed (rows, embeddings and metadata kept): build-index rejected other items
    and evaluate reported other rejection curves, exit 0; `n_models` of 3 in a 2-member gallery passed too."""
    table = pq.read_table(world.gallery)
    unc = table.column("uncertainty").to_numpy()[::-1].copy()
    reversed_unc = rewrite(world.gallery, tmp_path / "reversed.parquet", uncertainty=pa.array(unc, pa.float32()))
    out = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", reversed_unc, "--out", out], out,
          f"{reversed_unc}: column 'uncertainty' of id ", "is not the spread its 'ensemble_sum' of 2 member(s) implies")
    fails(caplog, [*evaluate_args(world, gallery=reversed_unc), "--out", tmp_path / "eval"], tmp_path / "eval",
          f"{reversed_unc}: column 'uncertainty' of id ", "is not the spread of its members' transformed embeddings")
    three = rewrite(world.gallery, tmp_path / "three.parquet",
                    n_models=pa.array([3] * table.num_rows, table.schema.field("n_models").type))
    fails(caplog, ["build-index", "--gallery", three, "--out", out], out,
          f"{three}: column 'n_models' holds [3], but the metadata names 2 member(s)")


def test_log_lines_escape_control_characters(world, tmp_path):
    """`--out "o/p3\\n"` logged `built flat index at o/p3` on one line and the rest on the next, and a key with
    ESC sequences reached the operator's terminal: every record is one line, its control characters escaped."""
    from tests.serve_world import cmce_env

    out = tmp_path / "idx\n2026-01-01 00:00:00,000 INFO cmce: forged\x1b[31m"
    res = subprocess.run([sys.executable, "-m", "cmce", "build-index", "--gallery", str(world.gallery), "--out",
                          str(out)], capture_output=True, text=True, env=cmce_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stderr.splitlines()
    assert all(line[:4].isdigit() for line in lines), lines  # each starts with its own timestamp
    assert "\x1b" not in res.stderr and any("idx\\n2026-01-01" in line and "\\x1b[31m" in line for line in lines)


def test_an_output_named_dash_is_refused(world, tmp_path, caplog, monkeypatch):
    """`--out -` (the usual name of standard output) wrote a file called "-" in the working folder, exit 0."""
    monkeypatch.chdir(tmp_path)
    fails(caplog, ["export-query", "--query-model", world.query, "--out", "-"], tmp_path / "-",
          "--out -: outputs are files or folders here, not standard output")
    assert list(tmp_path.iterdir()) == []


def test_an_index_of_another_dimension_than_its_query_model_is_named(world, tmp_path, caplog):
    """A gallery cut to 31 values (its metadata naming the right query model) was indexed, then every search
    failed with `query embeddings have shape (1, 32), the index expects dimension 31`, naming no file; with its
    running sum left at 32 values it was indexed too (the sum was not compared with the embedding)."""
    table = pq.read_table(world.gallery)
    full = embedding_column(table, "embedding", "g")
    dim = full.shape[1]
    cut = embedding_array(full[:, :-1].copy())
    uneven = rewrite(world.gallery, tmp_path / "uneven.parquet", embedding=cut)
    out = tmp_path / "index"
    fails(caplog, ["build-index", "--gallery", uneven, "--out", out], out,
          f"{uneven}: column 'ensemble_sum' has dimension {dim}, expected {dim - 1}")
    short = rewrite(world.gallery, tmp_path / "short.parquet", embedding=cut, ensemble_sum=None, n_models=None)
    assert main(["build-index", "--gallery", str(short), "--out", str(out)]) == 0
    fails(caplog, ["search", "--index", out, "--query-model", world.query, "--dataset", world.dataset, "--limit",
                   "1"], tmp_path / "unused", f"{out}: holds {dim - 1}-dimensional vectors, but its query model ",
          f"embeds {dim} dimensions; rebuild the index")


def test_a_value_of_the_wrong_type_in_an_index_meta_json_is_named(world, tmp_path, caplog):
    """`"n_indexed": "485"` was reported as "files of different builds", every number shown agreeing."""
    index = Path(shutil.copytree(world.index, tmp_path / "index"))
    meta = json.loads((index / "meta.json").read_text())
    for key, value, shown in [("n_indexed", str(meta["n_indexed"]), f'"{meta["n_indexed"]}", expected an integer'),
                              ("dim", True, "true, expected an integer"),
                              ("search_params", [], "[], expected an object"),
                              ("source", "x", '"x", expected an object'), ("split", [1], "[1], expected a string")]:
        (index / "meta.json").write_text(json.dumps({**meta, key: value}))
        fails(caplog, ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset,
                       "--limit", "1"], tmp_path / "unused", f"{index}/meta.json: {key} is {shown}")


def test_output_a_narrow_encoding_cannot_hold_is_escaped_not_a_failed_step(monkeypatch):
    """PYTHONIOENCODING=ascii: `serve` on a folder named `índice` loaded, bound, then exited 2 with "'ascii' codec
    can't encode character" naming nothing, because its `serving … on http://…` line could not be printed."""
    from cmce.commands import _say

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    _say("serving /data/índice ü/idx on http://127.0.0.1:8080\n", or_log=True)
    _say("{\"query\": \"x\"}\n")
    assert raw.getvalue() == b"serving /data/\\xedndice \\xfc/idx on http://127.0.0.1:8080\n{\"query\": \"x\"}\n"


def test_a_dataset_setting_given_to_a_step_that_reads_a_made_dataset_is_said(world, tmp_path, caplog):
    """`cmce train --set data.max_train_per_class=1` trained on the whole train split: the setting applies only
    when a dataset is made, and the step took it without a word."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(SMOKE), "--set", "train.epochs=1", "--set", "data.max_train_per_class=1",
                     "--set", "data={protocol: disjoint}", "--dataset", str(world.dataset), "--model", "query",
                     "--out", str(tmp_path / "q.pt")]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "not read by" in r.getMessage()]
    assert said == ["cmce train: --set data.protocol, data.max_train_per_class: not read by this step (a dataset is "
                    "read as it was made); it applies when a dataset is made: fetch-data, prepare-data, run"], said


def test_a_version_registered_from_the_checkpoint_file_itself_is_loaded(world, tmp_path, monkeypatch):
    """A version whose source is the checkpoint file (`runs:/RUN/cmce-query/query.pt` as mlflow.register_model
    makes it, or a file path): "expected one checkpoint file in the registered version, found 0"."""
    from mlflow import MlflowClient

    from cmce.registry import resolve_model_uri
    from cmce.tracking import start_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_parent_run(uri, "parent", {})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.log_artifact(run_id, str(world.query), artifact_path="cmce-query")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    client.create_registered_model("cmce-query")
    for alias, source in (("run", f"runs:/{run_id}/cmce-query/{world.query.name}"), ("path", str(world.query)),
                          ("text", str(tmp_path / "notes.txt")), ("http", "http://127.0.0.1:9/art")):
        client.set_registered_model_alias("cmce-query", alias,
                                          client.create_model_version("cmce-query", source=source).version)
    for alias in ("run", "path"):
        assert file_sha256(resolve_model_uri(f"models:/cmce-query@{alias}", uri)) == file_sha256(world.query)
    with pytest.raises(ValueError, match=r"models:/cmce-query@text: the registered version's source .*notes\.txt is "
                                         "a file but not a cmce checkpoint"):
        resolve_model_uri("models:/cmce-query@text", uri)
    with pytest.raises(ValueError, match=r"^models:/cmce-query@http: the registered version could not be read from "
                                         r"its source http://127.0.0.1:9/art \("):  # "not enough values to unpack"
        resolve_model_uri("models:/cmce-query@http", uri)


def _mark_version(uri: str, name: str, version: str, status: str, message: str) -> None:
    """What a registry shows while a registration copies its files, or after the copy failed (MLflow's own
    stores mark a version READY at once; a server with an async copy does not)."""
    import sqlite3

    con = sqlite3.connect(uri.removeprefix("sqlite:///"))
    with con:
        con.execute("UPDATE model_versions SET status = ?, status_message = ? WHERE name = ? AND version = ?",
                    (status, message, name, int(version)))
    con.close()


@pytest.mark.parametrize("status", ["FAILED_REGISTRATION", "PENDING_REGISTRATION"])
def test_a_version_whose_registration_did_not_finish_is_refused(world, tmp_path, caplog, monkeypatch, status):
    """A version FAILED_REGISTRATION or PENDING_REGISTRATION was used without a word: by search, by the server
    following an alias onto it, and by the promotion gate's look-up of the served checkpoint."""
    from mlflow import MlflowClient

    from cmce.registry import resolve_model_uri, version_by_sha
    from cmce.serving.state import Holder, QueryModelSource

    registered = tmp_path / "registered"
    registered.mkdir()
    shutil.copyfile(world.query, registered / "query.pt")
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(registered))
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_model_version_tag("cmce-query", "1", "sha256",
                                                                           file_sha256(world.query))
    _mark_version(uri, "cmce-query", "1", status, "artifact copy failed: timeout")
    expected = f"version 1 of cmce-query is {status} (artifact copy failed: timeout), not READY"
    fails(caplog, ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model",
                   "models:/cmce-query@candidate", "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused",
          "models:/cmce-query@candidate: ", expected)
    fails(caplog, ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model", "models:/cmce-query/1",
                   "--dataset", world.dataset, "--limit", "1"], tmp_path / "unused", expected)
    assert version_by_sha(MlflowClient(tracking_uri=uri), "cmce-query", file_sha256(world.query)) is None
    # a server following the alias: version 1 served, the alias then moved onto a version whose registration failed
    _mark_version(uri, "cmce-query", "1", "READY", "")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    holder = Holder(world.index, QueryModelSource("models:/cmce-query@candidate", lambda k: resolve_model_uri(k, uri)))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_model_version("cmce-query", source=str(registered))
    client.set_registered_model_alias("cmce-query", "candidate", "2")
    _mark_version(uri, "cmce-query", "2", status, "artifact copy failed: timeout")
    assert holder.check() is False and holder.current.model_key == "models:/cmce-query/1"
    assert f"version 2 of cmce-query is {status} (artifact copy failed: timeout), not READY" in holder.last_error
    _mark_version(uri, "cmce-query", "2", "READY", "")
    holder.check()
    assert holder.current.model_key == "models:/cmce-query/2" and holder.last_error is None


def test_a_store_of_a_newer_mlflow_is_named_as_such_not_as_out_of_date(world, tmp_path, caplog):
    """A store whose schema revision this MLflow does not know (a newer MLflow wrote it): MLflow's advice "run
    'mlflow db upgrade'" cannot apply. It is named as a newer MLflow's; a known older revision keeps the advice."""
    import sqlite3

    from cmce.tracking_store import check_store, known_revisions, schema_error

    registered = tmp_path / "registered"
    registered.mkdir()
    shutil.copyfile(world.query, registered / "query.pt")
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(registered))
    db = Path(uri.removeprefix("sqlite:///"))
    con = sqlite3.connect(db)
    with con:
        head = con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
        con.execute("UPDATE alembic_version SET version_num = 'ffffffffffff'")
    con.close()
    assert head in known_revisions() and "ffffffffffff" not in known_revisions()
    before = db.read_bytes()
    search = ["--mlflow-uri", uri, "search", "--index", world.index, "--query-model", "models:/cmce-query@candidate",
              "--dataset", world.dataset, "--limit", "1"]
    error = fails(caplog, search, tmp_path / "unused", f"{uri}: the store's schema (revision ffffffffffff) was made "
                  "by a newer MLflow than this one", "read it with that MLflow version")
    assert "upgrade" not in error
    assert db.read_bytes() == before
    older = next(r for r in sorted(known_revisions()) if r != head)
    con = sqlite3.connect(db)
    with con:
        con.execute("UPDATE alembic_version SET version_num = ?", (older,))
    con.close()
    check_store(uri)  # a known older revision is left to MLflow, whose upgrade advice then holds
    assert schema_error(ValueError(f"Detected out-of-date database schema (found version {older}, but ...")) is None
    assert "made by a newer MLflow" in schema_error(ValueError("out-of-date database schema (found version abcdef12)"))


def test_a_registered_model_is_downloaded_without_progress_bars(world, tmp_path, monkeypatch, capfd):
    """`models:/` reads drew MLflow's tqdm "Downloading artifacts" bars on stderr; a user's own setting still wins."""
    from cmce.registry import resolve_model_uri

    registered = tmp_path / "registered"
    registered.mkdir()
    shutil.copyfile(world.query, registered / "query.pt")
    uri = _store_with_a_registered_query_model(tmp_path / "store", str(registered))
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    capfd.readouterr()
    resolve_model_uri("models:/cmce-query@candidate", uri)
    assert "Downloading artifacts" not in capfd.readouterr().err
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    resolve_model_uri("models:/cmce-query@candidate", uri)
    assert "Downloading artifacts" in capfd.readouterr().err


def test_an_s3_index_reads_only_the_files_its_meta_json_names(world, s3_server, tmp_path, monkeypatch, caplog, capsys):
    """`search --index s3://b/idx8` downloaded every object under the prefix, a 30 MB `backup-2025/huge.bin` beside
    the index included; `s3://b` (a bucket root) the whole bucket, before `not a complete index (no meta.json)`."""
    import json

    from cmce import s3_client
    from cmce.index import IndexLoadError, load_index
    from cmce.storage import clear_scratch
    from tests.test_s3 import new_bucket, use_server

    use_server(monkeypatch, s3_server)
    bucket = new_bucket(s3_server)
    put = s3_server.client().put_object
    for f in world.index.iterdir():
        put(Bucket=bucket, Key=f"idx8/{f.name}", Body=f.read_bytes())
    put(Bucket=bucket, Key="idx8/backup-2025/huge.bin", Body=os.urandom(1 << 20))
    put(Bucket=bucket, Key="notes/readme.txt", Body=b"beside the index, not of it")
    fetched: list[str] = []

    def record(params: dict, **_: object) -> None:
        fetched.append(params["Key"])

    client = s3_client.client()
    client.meta.events.register("provide-client-params.s3.GetObject", record)
    try:
        assert main(["search", "--index", f"s3://{bucket}/idx8", "--query-model", str(world.query), "--dataset",
                     str(world.dataset), "--limit", "1"]) == 0
        assert len(capsys.readouterr().out.splitlines()) == 1
        assert sorted(fetched) == sorted(f"idx8/{f.name}" for f in world.index.iterdir())
        fetched.clear()
        with pytest.raises(IndexLoadError, match=f"s3://{bucket}: not a complete index"):
            load_index(f"s3://{bucket}")
        assert fetched == []
        fails(caplog, ["search", "--index", f"s3://{bucket}", "--query-model", world.query, "--dataset", world.dataset,
                       "--limit", "1"], tmp_path / "unused", f"s3://{bucket}: not a complete index (no meta.json)")
        assert fetched == []  # the command's own read of --index: the bucket was downloaded whole
        for index in (f"s3://{bucket}/idx8/meta.json", world.index / "meta.json"):  # its meta.json, not the folder
            fails(caplog, ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset,
                           "--limit", "1"], tmp_path / "unused", f"{index}: is a file; an index is the folder")
        put(Bucket=bucket, Key="bad/meta.json", Body=json.dumps({"files": {"../idx8/index.faiss": "0"}}).encode())
        with pytest.raises(ValueError, match=r"bad/meta.json: names '../idx8/index.faiss' among its files"):
            load_index(f"s3://{bucket}/bad")
        assert fetched == ["bad/meta.json"]
    finally:
        client.meta.events.unregister("provide-client-params.s3.GetObject", record)
        clear_scratch()


def test_the_resume_file_of_an_output_is_checked_as_an_output(world, tmp_path, caplog):
    """`train --dataset q.pt.resume --out q.pt` deleted the dataset (the training's resume file is `<out>.resume`),
    and fit-transform's resume file overwrote its own `--train-embeddings-out T.pt.resume`, then was removed."""
    dataset = Path(shutil.copy(world.dataset, tmp_path / "q.pt.resume"))
    kept = dataset.read_bytes()
    fails(caplog, ["train", "--config", SMOKE, "--dataset", dataset, "--model", "query", "--out", tmp_path / "q.pt"],
          tmp_path / "q.pt", f"--out's resume file {dataset} would write over the input --dataset {dataset}")
    assert dataset.read_bytes() == kept
    out = tmp_path / "T.pt"
    fails(caplog, ["fit-transform", "--config", SMOKE, "--dataset", world.dataset, "--query-model", world.query,
                   "--gallery-model", world.gallery_models[0], "--out", out, "--train-embeddings-out",
                   tmp_path / "T.pt.resume"], out, f"--train-embeddings-out {tmp_path / 'T.pt.resume'} and --out's "
          f"resume file {tmp_path / 'T.pt.resume'} would write over each other")


def test_a_path_that_is_not_utf8_is_named_before_any_work(world, tmp_path, caplog):
    """`combine --out $'o/f9\\xff\\xfe.parquet'` (bytes a Linux file system allows) was "'utf-8' codec can't encode
    characters in position 24-25: surrogates not allowed", naming no file or flag."""
    out = Path(os.fsdecode(bytes(tmp_path / "f9") + b"\xff\xfe.parquet"))
    fails(caplog, ["combine", "--member", world.members[0], "--member", world.members[1], "--out", out], tmp_path / "x",
          f"--out {ascii(str(out))}: the name is not valid UTF-8, which Arrow and Parquet need; rename it")
    assert not os.path.lexists(out)


def test_an_output_something_is_mounted_on_is_refused_before_the_work(world, tmp_path, caplog):
    """`--out o/out.pt` with a file bind-mounted onto it trained, then failed renaming onto it:
    `[Errno 16] Device or resource busy` (os.path.ismount does not see a file mounted on the same device)."""
    out, source = tmp_path / "out.pt", tmp_path / "src.pt"
    out.write_bytes(b"")
    source.write_bytes(b"")
    if subprocess.run(["mount", "--bind", str(source), str(out)], capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not permitted here")
    try:
        fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query", "--out", out], out,
              f"{out}: is a mount point, which cannot be replaced; give another path")
    finally:
        subprocess.run(["umount", str(out)], check=True)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "18790481920 bytes. Error code 12 (Cannot allocate memory)")])
def test_running_out_of_memory_is_one_line(world, tmp_path, caplog, monkeypatch, error):
    """A 6 GB sparse config, a 5 GB image, an image size of 2048: tracebacks ending in MemoryError or torch's
    `DefaultCPUAllocator: can't allocate memory`, where no check could foresee the machine's memory."""
    import cmce.stages

    def hungry(*args, **kwargs):
        raise error

    monkeypatch.setattr(cmce.stages, "build_gallery_index", hungry)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["build-index", "--gallery", str(world.gallery), "--out", str(tmp_path / "index")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("cmce build-index: out of memory") and "\n" not in errors[0]
    assert "18790481920 bytes" in errors[0] or isinstance(error, MemoryError)
    assert not (tmp_path / "index").exists()


def test_a_scratch_folder_inside_the_output_is_named_as_tmpdir(world, tmp_path, caplog, monkeypatch):
    """TMPDIR inside build-index's --out: the step made its scratch folder there, then refused the folder for
    holding `cmce-scratch-…`, "which this step does not write", blaming a folder cmce itself had made."""
    import tempfile

    out = tmp_path / "index"
    (out / "tmp").mkdir(parents=True)
    for scratch in (out / "tmp", out):
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        fails(caplog, ["build-index", "--gallery", world.gallery, "--out", out], out,
              f"TMPDIR {scratch} is inside the output --out {out}: the step's scratch files would be written into it")


def test_a_scratch_folder_inside_an_input_folder_is_named_as_tmpdir(world, tmp_path, caplog, monkeypatch):
    """TMPDIR inside serve's --index: the registry download landed in the served folder, and the next rebuild of
    the index was refused for holding a folder it does not write."""
    import tempfile

    index = tmp_path / "index"
    shutil.copytree(world.index, index)
    (index / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(index / "tmp"))
    out = tmp_path / "eval"
    fails(caplog, ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset], out,
          f"TMPDIR {index / 'tmp'} is inside the input folder --index {index}: the step's scratch files would be "
          "written among its inputs")


@pytest.mark.parametrize("stat, value", [("running_var", -1.0), ("num_batches_tracked", -3)])
@pytest.mark.parametrize("command", ["search", "export-query"])
def test_a_negative_batchnorm_statistic_is_named_by_file_and_key_when_the_checkpoint_loads(world, tmp_path, caplog,
                                                                                        stat, value, command):
    obj = torch.load(world.query, weights_only=True)
    state = dict(obj["state_dict"])
    key = next(k for k in state if k.endswith(f".{stat}"))
    tensor = state[key].clone()
    tensor.view(-1)[0] = value
    state[key] = tensor
    bad = tmp_path / "q_neg.pt"
    torch.save({**obj, "state_dict": state}, bad)
    out = tmp_path / ("hits.jsonl" if command == "search" else "q.onnx")
    argv = (["search", "--index", world.index, "--query-model", bad, "--dataset", world.dataset, "--limit", "1"]
            if command == "search" else
            ["export-query", "--query-model", bad, "--out", out, "--check-dataset", world.dataset])
    fails(caplog, argv, out, f"{bad}: state_dict[{key!r}] holds negative values", "BatchNorm")


def test_a_checkpoint_link_to_nothing_and_an_index_file_are_named_as_such(world, tmp_path, caplog):
    """`ln -s zz.pt zz.pt` in a --transform-dir was "checkpoint not found" beside a file the user can list;
    evaluate --index <its meta.json> was "not a complete index (no meta.json)"."""
    loop = tmp_path / "zz.pt"
    loop.symlink_to("zz.pt")
    fails(caplog, ["search", "--index", world.index, "--query-model", loop, "--dataset", world.dataset, "--limit", "1"],
          tmp_path / "unused", f"{loop}: a symbolic link to nothing (its target is missing, or the links loop)")
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world), "--index", world.index / "meta.json", "--out", out], out,
          f"{world.index / 'meta.json'}: is a file; an index is the folder holding meta.json")


def test_an_index_whose_ids_are_not_the_gallerys_is_refused_given_the_gallery(world, tmp_path, caplog):
    """ids.parquet's rows shuffled, its sha256 rewritten in meta.json: `search --gallery` answered every query with
    another item's id (the same scores). The ids must be the gallery's, in its order, less the rejected, and so
    must their labels."""
    index = Path(shutil.copytree(world.index, tmp_path / "index"))
    table = pq.read_table(index / "ids.parquet")
    pq.write_table(table.take(np.random.default_rng(0).permutation(table.num_rows)), index / "ids.parquet")
    meta = json.loads((index / "meta.json").read_text())
    meta["files"]["ids.parquet"] = file_sha256(index / "ids.parquet")
    meta["sizes"]["ids.parquet"] = (index / "ids.parquet").stat().st_size
    (index / "meta.json").write_text(json.dumps(meta))
    search = ["search", "--index", index, "--query-model", world.query, "--dataset", world.dataset, "--limit", "1"]
    fails(caplog, [*search, "--gallery", world.gallery], tmp_path / "unused", f"{index}/ids.parquet: row 0 holds ",
          "its ids are not the gallery's")
    # the same for its labels: each moved to the next class answered every hit with the wrong label and class name
    labels = table.column("label").to_numpy()
    pq.write_table(table.set_column(table.schema.get_field_index("label"), "label",
                                    pa.array((labels + 1) % 10, table.schema.field("label").type)),
                   index / "ids.parquet")
    meta["files"]["ids.parquet"] = file_sha256(index / "ids.parquet")
    meta["sizes"]["ids.parquet"] = (index / "ids.parquet").stat().st_size
    (index / "meta.json").write_text(json.dumps(meta))
    first = table.column("id")[0].as_py()
    fails(caplog, [*search, "--gallery", world.gallery], tmp_path / "unused",
          f"{index}/ids.parquet: item {first!r} has label {(labels[0] + 1) % 10}, the gallery {world.gallery} "
          f"{labels[0]} ({table.num_rows} such item(s))")
    # without --gallery, the dataset names each item's label: searched, or served, with exit 0 and the wrong classes
    said = (f"the index's item {first!r} has label {(labels[0] + 1) % 10}, its label in --dataset {world.dataset} is "
            f"{labels[0]} ({table.num_rows} such item(s))")
    fails(caplog, search, tmp_path / "unused", said)
    serve = ["serve", "--index", index, "--query-model", world.query, "--dataset", world.dataset, "--port", "0"]
    fails(caplog, serve, tmp_path / "unused", said)
    # an index that records no labels digest (built before it did) may be of another version of the dataset: search
    # then leaves the class names out, as for another dataset, and says why
    del meta["source"]["labels_sha256"]
    (index / "meta.json").write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main([str(a) for a in search]) == 0
    assert any(said in r.getMessage() and "class_name is left null" in r.getMessage() for r in caplog.records)
    assert main(["search", "--index", str(world.index), "--query-model", str(world.query), "--dataset",
                 str(world.dataset), "--limit", "1", "--gallery", str(world.gallery)]) == 0


def _resealed(index: Path) -> None:
    """meta.json's checksums and sizes rewritten to match the index's edited files."""
    meta = json.loads((index / "meta.json").read_text())
    for name in meta["files"]:
        meta["files"][name], meta["sizes"][name] = file_sha256(index / name), (index / name).stat().st_size
    (index / "meta.json").write_text(json.dumps(meta))


def _two_rows_of_other_labels(index: Path) -> tuple[int, int]:
    labels = pq.read_table(index / "ids.parquet").column("label").to_numpy()
    return 0, int(np.flatnonzero(labels != labels[0])[0])


def test_an_index_whose_rows_or_vectors_were_swapped_is_refused(world, tmp_path, caplog):
    """Two rows of ids.parquet swapped with their labels, or two vectors of index.faiss swapped (the checksums
    rewritten to match): the dataset's label check passed, and search and serve answered with another item's id and
    class, exit 0; `search --gallery` and `evaluate --index` checked the ids but not the vectors, and evaluate not
    even the ids (its index metrics were of another index)."""
    import faiss

    from cmce.index import stored_vectors

    rows = tmp_path / "rows"
    shutil.copytree(world.index, rows)
    a, b = _two_rows_of_other_labels(rows)
    table = pq.read_table(rows / "ids.parquet")
    order = np.arange(table.num_rows)
    order[[a, b]] = order[[b, a]]
    pq.write_table(table.take(pa.array(order)), rows / "ids.parquet")
    _resealed(rows)
    moved, after = table.column("id")[b].as_py(), table.column("id")[int(order[1])].as_py()
    search = ["search", "--index", rows, "--query-model", world.query, "--dataset", world.dataset, "--limit", "1"]
    # row 0 now holds an item from further down the split: row 1 is the first that comes before its predecessor
    said = f"the index's item {after!r} (row 1 of ids.parquet) is out of the order of the 'test' split"
    fails(caplog, search, tmp_path / "unused", said)
    fails(caplog, ["serve", "--index", rows, "--query-model", world.query, "--dataset", world.dataset, "--port", "0"],
          tmp_path / "unused", said)
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world), "--index", rows, "--out", out], out,
          f"{rows}/ids.parquet: row {a} holds {moved!r} where the gallery {world.gallery} puts")

    vectors = tmp_path / "vectors"
    shutil.copytree(world.index, vectors)
    index = faiss.read_index(str(vectors / "index.faiss"))
    stored = stored_vectors(index)  # faiss's own memory: swapped in place
    stored[[a, b]] = stored[[b, a]]
    faiss.write_index(index, str(vectors / "index.faiss"))
    _resealed(vectors)
    first = table.column("id")[a].as_py()
    fails(caplog, [*evaluate_args(world), "--index", vectors, "--out", out], out,
          f"{vectors}/index.faiss: the vector of item {first!r} is not its embedding in the gallery {world.gallery} "
          "(2 such item(s))")
    fails(caplog, ["search", "--index", vectors, "--query-model", world.query, "--dataset", world.dataset, "--limit",
                   "1", "--gallery", world.gallery], tmp_path / "unused", f"{vectors}/index.faiss: the vector of item")
    assert main([str(a) for a in [*evaluate_args(world), "--index", world.index, "--out", out]]) == 0  # the real one


@pytest.mark.parametrize("field, value, message", [
    ("reject_fraction", float("nan"), "reject_fraction is NaN, expected a number in [0, 1)"),
    ("reject_fraction", 1, "reject_fraction is 1, expected a number in [0, 1)"),
    ("members", [1, 2], "metadata field 'members[0]' must be an object, got 1"),
    ("split", "bogus", 'split is "bogus", expected one of [\'train\', \'test\']'),
    ("source", {"split_rows": 3}, "metadata field 'source' lacks 'ids_sha256'"),
])
def test_index_metadata_handed_on_is_checked(world, tmp_path, caplog, field, value, message):
    """meta.json's fields that go into versions.json and /version, or name the split the dataset is checked in: a
    NaN reject_fraction went into evaluate's versions.json (invalid JSON), `members: [1, 2]` into /version, and an
    unknown split was reported as another dataset."""
    index = Path(shutil.copytree(world.index, tmp_path / "index"))
    meta = json.loads((index / "meta.json").read_text())
    (index / "meta.json").write_text(json.dumps({**meta, field: value}))
    fails(caplog, _search(world, index), tmp_path / "unused", f"{index}/meta.json", message)


@pytest.mark.parametrize("kind", ["gallery", "member"])
def test_a_gallery_of_no_split_a_dataset_has_is_refused_before_its_index_is_built(world, tmp_path, caplog, kind):
    """A gallery recording split `validation` was indexed (exit 0), and every search of that index was refused."""
    src = world.gallery if kind == "gallery" else world.members[0]
    edited = tmp_path / f"{kind}.parquet"
    table = pq.read_table(src)
    meta = {**read_metadata(src), "split": "validation"}
    pq.write_table(table.replace_schema_metadata({b"cmce": json.dumps(meta).encode()}), edited)
    said = "metadata field 'split' must be one of ['train', 'test'], got 'validation'"
    if kind == "gallery":
        out = tmp_path / "index"
        fails(caplog, ["build-index", "--gallery", edited, "--out", out], out, f"{edited}: {said}")
    else:
        out = tmp_path / "combined.parquet"
        fails(caplog, ["combine", "--member", edited, "--out", out], out, f"{edited}: {said}")


def test_a_gallery_that_lost_one_of_its_running_sum_columns_is_refused_by_build_index(world, tmp_path, caplog):
    """With `n_models` (or `ensemble_sum`) dropped, build-index skipped the check of `uncertainty` against the running
    sum, and rejected by an edited uncertainty column, exit 0."""
    table = pq.read_table(world.gallery)
    for dropped, kept in (("n_models", "ensemble_sum"), ("ensemble_sum", "n_models")):
        unc = table.column("uncertainty").to_numpy()[::-1].copy()
        edited = table.drop_columns([dropped])
        edited = edited.set_column(edited.schema.get_field_index("uncertainty"), "uncertainty",
                                   pa.array(unc, pa.float32()))
        gallery = tmp_path / f"no_{dropped}.parquet"
        pq.write_table(edited, gallery)
        out = tmp_path / "index"
        fails(caplog, ["build-index", "--gallery", gallery, "--out", out, "--reject-fraction", "0.1"], out,
              f"{gallery}: has column {kept!r} but not {dropped!r}")


def test_a_transformation_other_than_the_galleries_is_named_by_evaluate(world, tmp_path, caplog):
    """Another fit of T for the same gallery model: evaluate refused the gallery ("stored ensemble embedding does not
    match its members' transformations"), naming no transformation, once everything was loaded."""
    torch.manual_seed(99)
    other = tiny_transform(tmp_path / "t_resnet_a_refit.pt", world.gallery_models[0], "resnet_a", world.query, 12, 8)
    recorded = read_metadata(world.gallery)["members"][0]["transformation_sha256"]
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world, transforms=[other, world.transforms[1]]), "--out", out], out,
          f"{other}: transformation {file_sha256(other)[:12]} of gallery model resnet_a, but the gallery "
          f"{world.gallery} was made with its transformation {recorded[:12]}: give that one")


def test_unicode_line_breaks_and_reordering_are_escaped_in_a_line():
    """A path holding U+2028, NEL (U+0085) or a right-to-left override printed one stdout line that
    `str.splitlines()` reads as three, or that a terminal shows reordered; only C0 controls were escaped."""
    from cmce.errors import escape_controls

    line = escape_controls("serving /o/idx\u2028on http:\x85evil:1 \u202emoc.live on http://127.0.0.1:1")
    assert line == "serving /o/idx\\u2028on http:\\x85evil:1 \\u202emoc.live on http://127.0.0.1:1"
    assert len(line.splitlines()) == 1 and escape_controls("índice ü") == "índice ü"


def test_a_nul_in_a_config_path_and_a_utf8_name_under_a_c_locale_are_named(world, tmp_path, caplog):
    """`output_dir: "o/nul\\0x"` was "embedded null byte" naming no key; under LANG=C (UTF-8 mode off) a folder
    `índice` was called "not valid UTF-8; rename it", though the locale was the cause."""
    config = tmp_path / "nul.yaml"
    config.write_text(SMOKE.read_text().replace("output_dir: runs/smoke", 'output_dir: "o/nul\\0x"'))
    fails(caplog, ["run", "--config", config], tmp_path / "o", f"{config}: output_dir: holds a NUL character")
    index = Path(shutil.copytree(world.index, tmp_path / "índice" / "idx"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    res = subprocess.run([sys.executable, "-m", "cmce", "search", "--index", str(index), "--query-model",
                          str(world.query), "--dataset", str(world.dataset), "--limit", "1"],
                         capture_output=True, text=True, env=env, timeout=300, errors="replace")
    assert res.returncode == 2 and "a UTF-8 name this process reads as" in res.stderr, res.stderr[-2000:]
    assert "run it with a UTF-8 locale (LC_ALL=C.UTF-8) or PYTHONUTF8=1" in res.stderr


def test_an_output_under_a_link_to_nothing_is_refused_before_the_work(world, tmp_path, caplog):
    """`--out o/dang/q.pt` with `o/dang` a dangling link trained, then failed: `[Errno 17] File exists: 'o/dang'`."""
    (tmp_path / "dang").symlink_to(tmp_path / "outside" / "newdir")
    out = tmp_path / "dang" / "q.pt"
    fails(caplog, ["train", "--config", SMOKE, "--dataset", world.dataset, "--model", "query", "--out", out],
          tmp_path / "x", f"{out}: its folder {tmp_path / 'dang'} is a symbolic link to nothing")
    assert not (tmp_path / "outside").exists()


def test_a_run_whose_output_dir_is_its_imagefolder_is_refused(tmp_path, caplog):
    """`output_dir` = `data.path` (an ImageFolder): the first run wrote its folders among the class folders, the
    second failed reading them as classes (`eval/`, holding PNGs, would have been one)."""
    root = image_folder(tmp_path / "images", {"cat": 4, "dog": 4})
    kept = snapshot(root)
    for out in (root, root / "run"):
        fails(caplog, ["run", *imagefolder_args(root), "--set", f"output_dir={out}"], tmp_path / "x",
              f"output_dir: {out} is inside data.path {root}, the data it reads")
    assert snapshot(root) == kept
    # the reverse: data.path = <output_dir>/data, where the run writes its dataset (it landed among the classes)
    inside = image_folder(tmp_path / "run" / "data", {"cat": 4, "dog": 4})
    kept = snapshot(inside)
    fails(caplog, ["run", *imagefolder_args(inside), "--set", f"output_dir={tmp_path / 'run'}"], tmp_path / "x",
          f"data.path: {inside} is inside a folder the run writes in output_dir {tmp_path / 'run'}")
    assert snapshot(inside) == kept
    # the library's runner checks it too: the benchmarks call it without the CLI (and wrote among the classes)
    from cmce.config import load_config
    from cmce.stages import run_all

    before = snapshot(root)
    cfg = load_config(SMOKE, {"data": {"source": "imagefolder", "path": str(root), "image_size": 8, "channels": 1},
                              "output_dir": str(root / "run")})
    with pytest.raises(ValueError, match=f"^output_dir: {root / 'run'} is inside data.path {root}, the data it reads"):
        run_all(cfg)
    assert snapshot(root) == before


def test_an_output_over_the_tracking_store_is_refused_before_any_run(world, tmp_path, caplog, monkeypatch):
    """`track-start --out` (or `gate --out`) naming the sqlite store that `--mlflow-uri`, MLFLOW_TRACKING_URI or
    `--run-dir` puts the runs in replaced the store, its runs and registered models with a JSON file (exit 0).
    A `--out` refused for another reason (a symbolic link) was refused only after the parent run was opened."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"SQLite format 3\x00 a store with runs")
    uri = f"sqlite:///{store}"
    fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", uri, "--out", store], store,
          f"--out {store} would write over the MLflow tracking store --mlflow-uri names ({store})")
    gate = ["gate", "--config", SMOKE, "--dataset", world.dataset, "--baseline-query-model", world.query,
            "--baseline-gallery", world.gallery, "--query-model", world.query, "--gallery", world.gallery]
    fails(caplog, ["--mlflow-uri", uri, *gate, "--out", store], store, "would write over the MLflow tracking store")
    fails(caplog, ["track-start", "--config", SMOKE, "--run-dir", tmp_path, "--out", store], store,
          f"the MLflow tracking store --run-dir names ({store})")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'runs'}")
    inside = tmp_path / "runs" / "decision.json"
    fails(caplog, [*gate, "--out", inside], inside, "tracking store MLFLOW_TRACKING_URI names")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    fresh = tmp_path / "fresh.db"
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    fails(caplog, ["track-start", "--config", SMOKE, "--mlflow-uri", f"sqlite:///{fresh}", "--out", link], link,
          "is a symbolic link")
    assert not fresh.exists()  # no store made, no run opened


@pytest.mark.parametrize("argv", [
    ["train", "--config", str(SMOKE), "--dataset", "d", "--model", "query", "--out", "o.pt", "--se", "train.epochs=1"],
    ["--mlflow-u", "sqlite:///x.db", "track-start", "--config", str(SMOKE)],
    ["train", "--dataset", "d", "--kd-t", "t.pt", "--out", "o.pt", "--config", str(SMOKE)]])
def test_an_abbreviated_option_is_refused_not_guessed(argv, capsys):
    """argparse took `--se` for `--set` and `--conf` for `--config`: the DVC stage entry point, which reads the
    command for its options, did not see them (a width-4 model named `_w8`, a fresh KD student removed as stale)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "unrecognized arguments: --se" in err or "invalid choice: 'sqlite:///x.db'" in err or (
        "unrecognized arguments: --kd-t" in err), err


@pytest.mark.parametrize("flag", ["--transform-dir", "--kd-dir"])
def test_a_folder_flag_of_evaluate_that_is_no_folder_is_named(world, tmp_path, caplog, flag):
    """`--kd-dir` missing or a file read as "no students": a report without its KD rows, exit 0; a file as
    `--transform-dir` was blamed on the gallery ("missing for ['resnet_a', …]")."""
    args = evaluate_args(world) if flag == "--kd-dir" else evaluate_args(world)[:-2 * len(world.transforms)]
    out = tmp_path / "eval"
    missing, a_file = tmp_path / "none", world.transforms[0]
    fails(caplog, [*args, flag, missing, "--out", out], out, f"{flag} {missing}: no such folder")
    fails(caplog, [*args, flag, a_file, "--out", out], out, f"{flag} {a_file}: is a file, not a folder")


def test_a_transform_dir_left_mid_swap_is_put_back_by_its_reader(world, tmp_path, caplog):
    """An upgrade-query-model killed between atomic_dir's two renames leaves `.transforms.old` alone: `evaluate
    --transform-dir transforms` said "no such folder", and the next swap deleted the only copy."""
    folder = tmp_path / "transforms"
    folder.mkdir()
    for t in world.transforms:
        shutil.copy(t, folder)
    os.replace(folder, tmp_path / ".transforms.old")  # as the kill left it
    args = evaluate_args(world)[:-2 * len(world.transforms)]
    caplog.clear()
    assert main([*map(str, args), "--transform-dir", str(folder), "--out", str(tmp_path / "eval")]) == 0, caplog.text
    assert sorted(p.name for p in folder.iterdir()) == sorted(Path(t).name for t in world.transforms)
    assert not (tmp_path / ".transforms.old").exists()
    assert "restored the previous version from .transforms.old" in caplog.text


def test_a_foreign_file_or_a_folder_at_the_resume_path_is_refused_before_training(world, tmp_path, caplog):
    """A dataset copied to `o/r1.pt.resume`: read as an unreadable resume state, replaced and deleted at the end of
    the training (exit 0); a folder there failed after an epoch with a raw `[Errno 21] Is a directory`."""
    train = ["train", "--config", SMOKE, *TINY, "--set", "train.epochs=2", "--dataset", world.dataset, "--model",
             "query"]
    foreign = Path(shutil.copy(world.dataset, tmp_path / "r1.pt.resume"))
    fails(caplog, [*train, "--out", tmp_path / "r1.pt"], tmp_path / "r1.pt",
          f"{foreign}: the resume file of --out holds a Parquet file, not a saved training state")
    assert foreign.read_bytes() == world.dataset.read_bytes()
    (tmp_path / "r3.pt.resume").mkdir()
    fails(caplog, [*train, "--out", tmp_path / "r3.pt"], tmp_path / "r3.pt",
          f"{tmp_path / 'r3.pt.resume'}: the resume file of --out is a folder")
    os.mkfifo(tmp_path / "r4.pt.resume")  # was called a folder
    fails(caplog, [*train, "--out", tmp_path / "r4.pt"], tmp_path / "r4.pt",
          f"{tmp_path / 'r4.pt.resume'}: the resume file of --out is a pipe, device or socket")


def test_a_default_work_folder_holding_an_input_is_refused_like_a_given_one(world, tmp_path, caplog):
    """add-gallery-model's `<out>_added/` (made when --work-dir is not given) held the --dataset: it was replaced by
    a member file, exit 0; the same folder given as --work-dir was refused."""
    added = tmp_path / "g_added"
    added.mkdir()
    dataset = Path(shutil.copy(world.dataset, added / "member_x.parquet"))
    gallery = Path(shutil.copy(world.gallery, tmp_path / "g.parquet"))
    fails(caplog, ["add-gallery-model", "--config", SMOKE, "--dataset", dataset, "--gallery", gallery,
                   "--query-model", world.query, "--gallery-model", world.gallery_models[0], "--out", gallery], gallery,
          f"the default --work-dir {added} would write over the input --dataset {dataset}")
    assert dataset.read_bytes() == world.dataset.read_bytes()


def test_a_blank_parent_run_name_is_refused(capsys):
    """`track-start --name ''` gave the parent run one of MLflow's random names."""
    with pytest.raises(SystemExit) as exc:
        main(["track-start", "--config", str(SMOKE), "--name", " "])
    assert exc.value.code == 2 and "argument --name: blank; give a name" in capsys.readouterr().err


@pytest.mark.parametrize("edit", ["label_times_10", "one_train_label_10", "classes_reversed"])
def test_labels_or_class_names_that_disagree_with_the_metadata_classes_are_refused(world, tmp_path, caplog, edit):
    """Labels past the metadata's class list, or a reordered list, trained a classifier of 91 rows (exit 0)."""
    table = pq.read_table(world.dataset)
    labels = table.column("label").to_numpy().copy()
    meta = json.loads(table.schema.metadata[b"cmce"])
    if edit == "classes_reversed":
        meta["classes"] = meta["classes"][::-1]
        row = 0
        needle = (f"row 0 (label {labels[0]}) has class_name {meta['classes'][-1 - labels[0]]!r}; the metadata's "
                  f"classes list says {meta['classes'][labels[0]]!r}")
    else:
        if edit == "label_times_10":
            labels = labels * 10
        else:
            labels[table.column("split").to_pylist().index("train")] = 10
        row = int(np.flatnonzero(labels >= 10)[0])
        needle = f"row {row} has label {labels[row]}; the metadata lists 10 classes, labels are 0..9"
    ds = tmp_path / "edited.parquet"
    edited = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    pq.write_table(edited.replace_schema_metadata({**table.schema.metadata, b"cmce": json.dumps(meta)}), ds)
    out = previous_file(tmp_path / "query.pt")
    fails(caplog, ["train", "--config", SMOKE, "--dataset", ds, "--model", "query", "--out", out], out,
          f"{ds}: {needle}")


@pytest.mark.parametrize("damage, message", [
    ("label_minus_7", "labels[3] is -7; digits labels are 0..9"),
    ("truncated", "cannot read the digits arrays: "),
    ("dev_zero", "cannot read the digits arrays: not a regular file"),
    ("float_pixels", "'images' has dtype float64, values 0.0..255000000.0; expected uint8 pixels 0..255"),
])
def test_a_damaged_fetched_digits_copy_is_refused_by_prepare_data(tmp_path, caplog, damage, message):
    """A label outside 0..9 dropped its image (exit 0); a cut archive, /dev/zero and float pixels gave a
    traceback, a word about pickled data or a PIL error."""
    raw = tmp_path / "raw"
    assert main(["fetch-data", "--config", str(SMOKE), "--out", str(raw)]) == 0
    npz = raw / "digits.npz"
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"].copy()
    npz.unlink()
    if damage == "truncated":
        np.savez(npz, images=images, labels=labels)
        npz.write_bytes(npz.read_bytes()[:50000])
    elif damage == "dev_zero":
        os.symlink("/dev/zero", npz)
    else:
        if damage == "label_minus_7":
            labels[3] = -7
        else:
            images = images.astype(np.float64) * 1e6
        np.savez(npz, images=images, labels=labels)
    out = tmp_path / "d.parquet"
    fails(caplog, ["prepare-data", "--config", SMOKE, "--raw", raw, "--out", out], out, f"{npz}: {message}")


def without_classes(path: Path) -> Path:
    """The dataset with no classes list in its metadata (a file written by hand): its labels are checked against
    the class limit alone, not against a list."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"cmce"])
    meta.pop("classes")
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"cmce": json.dumps(meta)}), path)
    return path


def test_two_different_kd_students_of_one_teacher_are_refused(world, tmp_path, caplog):
    """Two students of one teacher (`--kd` twice, or a backup in a subfolder of `--kd-dir`): the last silently won
    and the report named neither."""
    teacher_sha = file_sha256(world.gallery_models[0])  # resnet_a, embedding dim 12
    students = []
    for seed in (6, 7):
        path = tmp_path / f"s{seed}.pt"
        torch.manual_seed(seed)
        net = EmbeddingNet("query_cnn", 1, 12, 4).eval()
        meta = {"history": [{"epoch": 1}], "role": "kd_student", "teacher_sha256": teacher_sha}
        save_embedding_model(EmbeddingModel("kd_resnet_a", "query_cnn", net, torch.randn(10, 12), 16.0, 1, 8, 12,
                                            meta=meta), path, 4)
        students.append(path)
    out = tmp_path / "eval"
    fails(caplog, [*evaluate_args(world), "--kd", students[0], "--kd", students[1], "--out", out], out,
          "a second, different KD student of gallery model")


def test_an_index_setting_faiss_cannot_read_back_is_refused_at_load():
    """`index.ivfpq.k_factor: 4096` (within the documented range) built an index faiss refuses to read: [1, 1000]."""
    from cmce.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"index.ivfpq.k_factor"):
        load_config(SMOKE, {"index.ivfpq.k_factor": 1001})
    assert load_config(SMOKE, {"index.ivfpq.k_factor": 1000}).index.ivfpq.k_factor == 1000


def test_a_run_dir_that_is_a_file_is_named(tmp_path, caplog, monkeypatch):
    """`track-start --run-dir keep.txt` (a file): `[Errno 17] File exists`, the flag not named."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    keep = tmp_path / "keep.txt"
    keep.write_text("notes")
    fails(caplog, ["track-start", "--config", SMOKE, "--run-dir", keep, "--out", tmp_path / "t.json"],
          tmp_path / "t.json", f"--run-dir {keep}: is a file, not a folder")
    assert keep.read_text() == "notes"


def test_add_gallery_model_refuses_a_gallery_that_is_not_one_and_work_files_of_another_kind_before_any_work(
        world, tmp_path, caplog, monkeypatch):
    """A dataset or a member file as --gallery was refused only once T was fitted and the split embedded, the work
    files left behind; a --work-dir holding a model or a dataset under the names the step writes had them replaced
    (exit 0), where embed-gallery's --members-dir refuses the same."""
    import cmce.stages

    new = tiny_model(tmp_path / "resnet_c.pt", "resnet_c", "resnet", 12, seed=9)
    monkeypatch.setattr(cmce.stages, "fit_transform", lambda *a, **kw: pytest.fail("fitted before the check"))
    out, work = tmp_path / "g.parquet", tmp_path / "work"
    add = ["add-gallery-model", "--config", SMOKE, "--dataset", world.dataset, "--query-model", world.query,
           "--gallery-model", new, "--out", out]
    for gallery, kind in ((world.dataset, "dataset"), (world.members[0], "gallery_member")):
        fails(caplog, [*add, "--gallery", gallery, "--work-dir", work], out,
              f"--gallery {gallery}: a {kind} file, not a gallery")
        assert not work.exists()
    work.mkdir()
    for name, source, held in (("transform_resnet_c.pt", world.query, "a cmce-embedding-model/1 checkpoint file"),
                               ("train_resnet_c.parquet", world.dataset, "a dataset Parquet file"),
                               ("member_resnet_c.parquet", world.dataset, "a dataset Parquet file")):
        shutil.copyfile(source, work / name)
        kept = _inputs_kept(work)
        fails(caplog, [*add, "--gallery", world.gallery, "--work-dir", work], out, f"{work / name}: holds {held}")
        assert _inputs_kept(work) == kept
        (work / name).unlink()


def _with_nan(src: Path, dst: Path, column: str, row: int = 3) -> Path:
    """A copy of the cmce Parquet file `src` with one value of an embedding column set to NaN (metadata kept)."""
    table = pq.read_table(src)
    values = embedding_column(table, column, str(src)).copy()
    values[row, 0] = np.nan
    arr = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel(), pa.float32()), values.shape[1])
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, arr), dst)
    return dst


def test_nan_in_the_embeddings_merge_and_add_member_copy_through_is_refused(world, tmp_path, caplog):
    """merge and add-member copy columns as they are: a NaN in a member's `raw` (or a shard's `embedding`) went into
    the file they wrote, exit 0, and evaluate refused that file later; combine refused the same member at once."""
    one = tmp_path / "vgg_only.parquet"
    assert main(["combine", "--member", str(world.members[1]), "--out", str(one)]) == 0
    member = _with_nan(world.members[0], tmp_path / "resnet_a.parquet", "raw")
    out = tmp_path / "added.parquet"
    fails(caplog, ["add-member", "--gallery", one, "--member", member, "--out", out], out,
          f"{member}: column 'raw' has NaN/inf values in 1 rows (first: row 3)")
    for column in ("raw_resnet_a", "embedding"):
        shard = _with_nan(world.gallery, tmp_path / f"nan_{column}.parquet", column)
        merged = tmp_path / "merged.parquet"
        fails(caplog, ["merge", shard, "--out", merged], merged,
              f"{shard}: column '{column}' has NaN/inf values in 1 rows (first: row 3)")


def test_shards_embedded_into_one_members_folder_do_not_replace_each_other(world, tmp_path, caplog):
    """The per-model files are named by model alone: `embed-gallery --shard 1/2` into shard 0/2's --members-dir
    replaced its files (both exit 0), and a merge of the shards' member files then lacked shard 0."""
    members = tmp_path / "members"
    embed = ["embed-gallery", "--dataset", world.dataset, "--query-model", world.query,
             "--gallery-model", world.gallery_models[0], "--transform", world.transforms[0],
             "--gallery-model", world.gallery_models[1], "--transform", world.transforms[1], "--members-dir", members]
    assert main([str(a) for a in [*embed, "--shard", "0/2", "--out", tmp_path / "g0.parquet"]]) == 0
    kept = _inputs_kept(members)
    out = tmp_path / "g1.parquet"
    fails(caplog, [*embed, "--shard", "1/2", "--out", out], out,
          f"{members / 'resnet_a.parquet'}: holds shard 0/2 of its model's embeddings, this run writes shard 1/2")
    fails(caplog, [*embed, "--out", out], out, "this run writes the whole split; give each shard its own --members-dir")
    assert _inputs_kept(members) == kept
    assert main([str(a) for a in [*embed, "--shard", "0/2", "--out", tmp_path / "g0.parquet"]]) == 0  # its own again


def test_link_loops_deep_folders_and_undecodable_folder_names_in_an_imagefolder_are_named(tmp_path, caplog):
    """A link to itself was `RuntimeError: Symlink loop` (exit 1), a thousand nested folders a RecursionError
    (exit 1), a subfolder named in bytes that are not UTF-8 an error naming no file after every image was decoded."""
    out = previous_file(tmp_path / "out" / "dataset.parquet")
    for name in ("x.png", "sub"):  # an image's name or a folder's: both were resolved before the suffix was looked at
        root = image_folder(tmp_path / f"loop_{name}", {"a": 2, "b": 2})
        (root / "a" / name).symlink_to(name)
        fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
              f"{root / 'a' / name}: a loop of symbolic links")
    root = image_folder(tmp_path / "deep", {"a": 2, "b": 2})
    levels, here = 1100, os.getcwd()  # os.walk recurses once a level (Python 3.11); made and removed a level at a time
    try:  # (Path.mkdir(parents=True) and shutil.rmtree recurse too)
        os.chdir(root / "a")
        for _ in range(levels):
            os.mkdir("d")
            os.chdir("d")
        shutil.copyfile(root / "a" / "0.png", "0.png")
        os.chdir(here)
        fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
              f"{root / 'a'}: folders nested too deep to read")
    finally:
        os.chdir(root / "a")
        depth = 0
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for name in os.listdir("."):
            os.unlink(name)
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
        os.chdir(here)
    root = image_folder(tmp_path / "bytes", {"a": 2, "b": 2})
    odd = root / "a" / os.fsdecode(b"\xff\xfe")
    odd.mkdir()
    (odd / "0.png").write_bytes((root / "a" / "0.png").read_bytes())
    fails(caplog, ["prepare-data", *imagefolder_args(root), "--out", out], out,
          "'a/\\udcff\\udcfe/0.png': the name is not valid UTF-8")


@pytest.mark.parametrize(("setting", "said"), [("data.image_size=16", "data.image_size is 16 and data.channels 1"),
                                               ("data.channels=3", "data.image_size is 8 and data.channels 3")])
def test_a_kd_teacher_trained_on_other_images_is_refused(world, tmp_path, caplog, setting, said):
    """The teacher was fed the config's images, not its own: at another size it was distilled without a word (exit 0,
    a student recording the other size), at another channel count a conv traceback (exit 1)."""
    out = tmp_path / "kd.pt"
    fails(caplog, ["train", "--config", SMOKE, "--set", setting, "--dataset", world.dataset, "--kd-teacher",
                   world.gallery_models[0], "--out", out], out,
          f"--kd-teacher {world.gallery_models[0]}: trained on 8×8 images of 1 channel(s), but {said}")


def test_a_gallery_that_is_no_parquet_is_named_by_the_index_check_of_a_lifecycle_step(world, tmp_path, caplog):
    """The index settings' check read the gallery's row count first: pyarrow's `Parquet file size is 6 bytes`,
    naming no file."""
    bad = tmp_path / "notgallery.parquet"
    bad.write_text("hello\n")
    out = tmp_path / "g.parquet"
    fails(caplog, ["upgrade-query-model", "--config", SMOKE, "--dataset", world.dataset, "--gallery", bad,
                   "--query-model", world.query, "--train-embeddings", world.members[0], "--transforms-out",
                   tmp_path / "t", "--out", out, "--index-out", tmp_path / "index"], out, f"{bad}: ")


def test_inputs_larger_than_they_can_be_are_refused_unread(world, tmp_path, caplog):
    """A checkpoint or a query image padded to gigabytes (sparse here) was read whole into memory before anything
    looked at it: 21 GB resident for a 20 GB `--query-model`, 8.7 GB for an 8 GB `--images` file, then the hits."""
    from cmce.checkpoint import MAX_CHECKPOINT_BYTES
    from cmce.data import codec

    big = tmp_path / "q.pt"
    shutil.copyfile(world.query, big)
    os.truncate(big, MAX_CHECKPOINT_BYTES + 1)
    out = tmp_path / "q.onnx"
    fails(caplog, ["export-query", "--query-model", big, "--out", out], out,
          f"{big}: a file of {MAX_CHECKPOINT_BYTES + 1:,} bytes, more than a checkpoint of the largest model cmce "
          "builds can be", "refused unread")
    image = tmp_path / "big.png"
    Image.new("L", (8, 8)).save(image)
    os.truncate(image, codec._max_pixels * 8 + (16 << 20) + 1)
    fails(caplog, ["search", "--index", world.index, "--query-model", world.query, "--images", image],
          tmp_path / "unused", f"{image}: a file of", "refused unread")


def test_a_model_whose_finite_weights_overflow_is_named_by_every_step_that_embeds(world, tmp_path, caplog):
    """Finite weights can still give infinite embeddings: fit-transform said `gallery embeddings contain NaN or inf
    values`, naming no model file."""
    m = load_embedding_model(world.gallery_models[0])
    with torch.no_grad():
        for p in m.net.parameters():
            if p.dim() > 1:
                p.mul_(1e6)
    big = tmp_path / "big.pt"
    save_embedding_model(m, big, 4)
    fails(caplog, ["fit-transform", "--config", SMOKE, "--dataset", world.dataset, "--query-model", world.query,
                   "--gallery-model", big, "--out", tmp_path / "t.pt"], tmp_path / "t.pt",
          f"{big}: its embedding of id ", "is not finite")
    fails(caplog, ["embed-gallery", "--dataset", world.dataset, "--query-model", world.query, "--gallery-model", big,
                   "--transform", tiny_transform(tmp_path / "t_big.pt", big, "resnet_a", world.query, 12, 8),
                   "--out", tmp_path / "g.parquet"], tmp_path / "g.parquet",
          f"{big}: its embedding of id ", "is not finite")
