import gzip
import io
import json
import logging
import re
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

import cmce.data.codec as codec_module
from cmce.config import DataConfig
from cmce.data.codec import decode_image, decode_png_fast, encode_png, to_png
from cmce.data.prepare import carve_validation, prepare_dataset
from cmce.data.readers import dataset_info, iter_split_batches, load_split, open_dataset
from cmce.data.schema import DATASET_SCHEMA, DataError
from cmce.importers.fashion_mnist import import_fashion_mnist
from cmce.importers.imagefolder import import_imagefolder


def _png(mode, size=(6, 6), value=128):
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_heldout_split_is_stratified(tmp_path):
    out = prepare_dataset(DataConfig(source="digits", heldout_fraction=0.25, image_size=8), tmp_path / "d.parquet")
    t = pq.read_table(out)
    assert t.schema.remove_metadata() == DATASET_SCHEMA
    split = np.array(t.column("split").to_pylist())
    labels = t.column("label").to_numpy()
    for c in range(10):
        frac = (split[labels == c] == "test").mean()
        assert 0.2 < frac < 0.3
    assert dataset_info(out)["protocol"] == "heldout"


def test_disjoint_protocol_splits_classes(tmp_path):
    cfg = DataConfig(source="digits", protocol="disjoint", max_test_per_class=20, image_size=8)
    t = pq.read_table(prepare_dataset(cfg, tmp_path / "d.parquet"))
    split = np.array(t.column("split").to_pylist())
    labels = t.column("label").to_numpy()
    assert set(labels[split == "train"]) == {0, 1, 2, 3, 4}
    assert set(labels[split == "test"]) == {5, 6, 7, 8, 9}
    assert np.bincount(labels[split == "test"])[5:].tolist() == [20] * 5


def test_empty_split_is_a_clear_error_and_writes_nothing(tmp_path):
    cfg = DataConfig(source="digits", max_test_per_class=0, image_size=8)
    with pytest.raises(DataError, match="leaves the 'test' split empty"):
        prepare_dataset(cfg, tmp_path / "d.parquet")
    assert list(tmp_path.iterdir()) == []


def test_failed_prepare_keeps_existing_output(tmp_path):
    out = prepare_dataset(DataConfig(source="digits", image_size=8), tmp_path / "d.parquet")
    before = out.read_bytes()
    with pytest.raises(DataError):
        prepare_dataset(DataConfig(source="digits", max_train_per_class=0, image_size=8), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]


def _idx(path, array, dtype_code=0x08):
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    raw = import_fashion_mnist(tmp_path)
    assert len(raw.ids) == 30 and raw.official_split.count("test") == 10
    assert raw.classes[9] == "Ankle boot"
    # truncated file: clear error naming it
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    with pytest.raises(DataError, match="t10k has 10 images but 5 labels"):
        import_fashion_mnist(tmp_path)


def test_imagefolder_and_corrupt_image(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(_png("L", value=40 * i))
    raw = import_imagefolder(tmp_path)
    assert raw.classes == ["cat", "dog"] and len(raw.ids) == 6 and raw.ids[0] == "cat/0.png"
    (tmp_path / "dog" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"dog/9.png: corrupt or unreadable image"):
        import_imagefolder(tmp_path)
    (tmp_path / "dog" / "9.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"dog/9.png: empty \(zero-byte\) image"):
        import_imagefolder(tmp_path)


def test_imagefolder_reads_subfolders_and_names_a_half_official_split(tmp_path):
    """Images in subfolders of a class were dropped without a word (39 of 90); a root with train/ and no test/
    was read as one class named 'train' and failed with 'no images found'."""
    for cls in ("cat", "dog"):
        (tmp_path / cls / "more" / "deeper").mkdir(parents=True)
        (tmp_path / cls / "0.png").write_bytes(_png("L", value=10))
        (tmp_path / cls / "more" / "1.png").write_bytes(_png("L", value=20))
        (tmp_path / cls / "more" / "deeper" / "2.png").write_bytes(_png("L", value=30))
    raw = import_imagefolder(tmp_path)
    assert raw.ids == [f"{c}/{f}" for c in ("cat", "dog") for f in ("0.png", "more/1.png", "more/deeper/2.png")]
    assert list(raw.labels) == [0, 0, 0, 1, 1, 1]
    # a linked subfolder is read like a real one (a loop once); refused when it leads out of its class folder (its
    # images were read again under this class: `c0/up -> ..` stored every class's images as c0 too) or the root
    (tmp_path / "dog" / "more" / "again").symlink_to(tmp_path / "dog" / "more")
    (tmp_path / "cat" / "alias").symlink_to(tmp_path / "dog" / "more" / "deeper")
    with pytest.raises(DataError, match=r"cat/alias: a link out of its class folder cat \(to .*dog/more/deeper\)"):
        import_imagefolder(tmp_path)
    (tmp_path / "cat" / "alias").unlink()
    (tmp_path / "cat" / "up").symlink_to("..")
    with pytest.raises(DataError, match=r"cat/up: a link out of its class folder cat"):
        import_imagefolder(tmp_path)
    (tmp_path / "cat" / "up").unlink()
    (tmp_path / "all").symlink_to(".")
    with pytest.raises(DataError, match=r"all: a link to the ImageFolder root or a folder above it"):
        import_imagefolder(tmp_path)
    (tmp_path / "all").unlink()
    (tmp_path / "kitten").symlink_to(tmp_path / "cat" / "more")
    with pytest.raises(DataError, match=r"kitten: a link into the class folder cat"):
        import_imagefolder(tmp_path)
    (tmp_path / "kitten").unlink()
    (tmp_path / "tabby").symlink_to(tmp_path / "cat")  # the link sorts after its class: `cat` was named the link
    with pytest.raises(DataError, match=r"tabby: a link into the class folder cat"):
        import_imagefolder(tmp_path)
    (tmp_path / "tabby").unlink()
    raw = import_imagefolder(tmp_path)
    assert raw.ids == ["cat/0.png", "cat/more/1.png", "cat/more/deeper/2.png", "dog/0.png", "dog/more/1.png",
                       "dog/more/deeper/2.png"]
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "9.png").write_bytes(_png("L"))
    (tmp_path / "cat" / "elsewhere").symlink_to(outside)
    with pytest.raises(DataError, match=r"cat/elsewhere: resolves to .*, outside the ImageFolder root"):
        import_imagefolder(tmp_path)
    (tmp_path / "cat" / "elsewhere").unlink()
    split = tmp_path / "split"
    (split / "train" / "cat").mkdir(parents=True)
    (split / "train" / "cat" / "0.png").write_bytes(_png("L"))
    with pytest.raises(DataError, match=r"split: has train/ but no test/: an official split needs both"):
        import_imagefolder(split)
    (split / "test" / "cat").mkdir(parents=True)
    (split / "test" / "cat" / "1.png").write_bytes(_png("L"))
    (split / "dog").mkdir()  # a class beside the splits is in neither: refused, not dropped
    with pytest.raises(DataError, match=r"split: holds dog beside train/ and test/"):
        import_imagefolder(split)


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16", "P"])
def test_decode_converts_modes(mode):
    value = 30000 if mode == "I;16" else 100
    arr = decode_image(_png(mode, (5, 7), value if mode != "RGB" else (100, 100, 100)), 1, 4, "x")
    assert arr.shape == (1, 4, 4) and arr.dtype == np.uint8
    assert decode_image(_png(mode, (5, 7), value if mode != "RGB" else (1, 2, 3)), 3, 4, "x").shape == (3, 4, 4)


def test_rgba_is_composited_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 1, 2, "x").min() == 255


def _encoded(mode, size, rng, **save):
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _pil_only(monkeypatch, blob, channels, size):
    with monkeypatch.context() as m:
        m.setattr(codec_module, "decode_png_fast", lambda *a: None)
        return decode_image(blob, channels, size, "x")


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("save", [{}, {"compress_level": 0}, {"optimize": True}, {"pnginfo": "gamma"},
                                  {"transparency": "key"}])
def test_png_fast_path_gives_the_same_pixels_as_pil(monkeypatch, mode, save):
    rng = np.random.default_rng(len(str(save)))
    if save.get("pnginfo") == "gamma":  # a gAMA chunk: neither decoder may apply it
        info = PngImagePlugin.PngInfo()
        info.add(b"gAMA", struct.pack(">I", 100000))
        save = {"pnginfo": info}
    if save.get("transparency") == "key":  # a tRNS colour key: OpenCV would add alpha, PIL keeps the mode
        save = {"transparency": 7 if mode == "L" else (1, 2, 3)}
    blob = _encoded(mode, 9, rng, **save)
    for channels in (1, 3):
        expected = _pil_only(monkeypatch, blob, channels, 9)
        got = decode_image(blob, channels, 9, "x")
        assert got.dtype == np.uint8 and got.shape == expected.shape == (channels, 9, 9)
        assert np.array_equal(got, expected), (mode, save, channels)
    if not save:  # the common case does take the fast path
        assert decode_png_fast(blob, 1 if mode == "L" else 3, 9) is not None


def test_png_fast_path_leaves_everything_else_to_pil():
    rng = np.random.default_rng(0)
    grey, rgb = _encoded("L", 9, rng), _encoded("RGB", 9, rng)
    assert decode_png_fast(grey, 3, 9) is None and decode_png_fast(rgb, 1, 9) is None  # PIL's conversions
    assert decode_png_fast(grey, 1, 8) is None  # resized by PIL
    assert all(decode_png_fast(_png(m), 1, 6) is None for m in ("P", "LA", "RGBA", "I;16", "1"))
    jpeg = io.BytesIO()
    Image.new("L", (9, 9), 50).save(jpeg, format="JPEG")
    assert decode_png_fast(jpeg.getvalue(), 1, 9) is None
    assert decode_png_fast(grey[:-12], 1, 9) is None  # no IEND: truncated
    broken = grey[:40] + b"\0" * (len(grey) - 40)  # valid header, corrupt pixel data
    assert decode_png_fast(broken, 1, 9) is None
    with pytest.raises(DataError, match=r"x: corrupt or unreadable image"):
        decode_image(broken, 1, 9, "x")


def _saved(arr, fmt, **save):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def test_exif_orientation_is_applied_wherever_images_are_decoded():
    """A phone photo stores its pixels turned and an EXIF Orientation tag; it was decoded as stored (PIL and the
    PNG fast path alike), and imported as a PNG that lost the tag, so gallery and queries met turned."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90° clockwise to view
    upright = np.random.default_rng(0).integers(0, 256, (9, 9), dtype=np.uint8)
    turned = _saved(np.rot90(upright), "PNG", exif=exif)
    for channels in (1, 3):  # grey at the model's size: the fast path's case, left to PIL for the tag
        assert np.array_equal(decode_image(turned, channels, 9, "x")[0], upright), channels
    assert np.array_equal(decode_image(to_png(turned, "x"), 1, 9, "x")[0], upright)  # imported: not turned twice
    # a photo: JPEG is lossy, so the upright copy is near, the turned pixels far
    photo = np.kron(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8), np.ones((8, 8), np.uint8))
    want = decode_image(_saved(photo, "JPEG", quality=95), 1, 64, "x").astype(int)
    jpeg = _saved(np.rot90(photo), "JPEG", quality=95, exif=exif)
    for got in (decode_image(jpeg, 1, 64, "x"), decode_image(to_png(jpeg, "x"), 1, 64, "x")):
        assert np.abs(got.astype(int) - want).mean() < 3 < np.abs(np.rot90(got, axes=(1, 2)) - want).mean()
    with codec_module.pixel_limit(80), pytest.raises(DataError, match="x: refused, too many pixels: 9 × 9"):
        decode_image(turned, 1, 9, "x")  # the limit still holds, before any pixel is decoded or turned


def _dataset(path, images, ids=None, split="test"):
    ids = ids or [f"i{n}" for n in range(len(images))]
    pq.write_table(
        pa.table({"id": ids, "label": pa.array([n % 2 for n in range(len(images))], pa.int32()),
                  "class_name": ["a"] * len(images), "split": [split] * len(images), "image": images},
                 schema=DATASET_SCHEMA),
        path,
    )
    return path


def test_corrupt_image_in_dataset_names_the_id(tmp_path):
    good = encode_png(np.zeros((4, 4), np.uint8))
    path = _dataset(tmp_path / "d.parquet", [good, good[:20], good])
    with pytest.raises(DataError, match=r"d.parquet \(id i1\): corrupt or unreadable image"):
        list(iter_split_batches(path, "test", 8, 1, 4))


def test_missing_split_duplicate_ids_and_missing_column(tmp_path):
    good = encode_png(np.zeros((4, 4), np.uint8))
    path = _dataset(tmp_path / "d.parquet", [good, good])
    with pytest.raises(DataError, match="split 'train' is empty"):
        load_split(path, "train", 1, 4)
    dup = _dataset(tmp_path / "dup.parquet", [good, good], ids=["a", "a"])
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_split(dup, "test", 1, 4)
    pq.write_table(pa.table({"id": ["a"], "label": [0]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="bad.parquet: missing column 'class_name'"):
        load_split(tmp_path / "bad.parquet", "test", 1, 4)
    pq.write_table(pa.table({"id": ["a"], "label": ["x"], "class_name": ["a"], "split": ["test"], "image": [good]}),
                   tmp_path / "bad2.parquet")
    with pytest.raises(DataError, match="column 'label' has type string, expected int32"):
        load_split(tmp_path / "bad2.parquet", "test", 1, 4)


def test_a_dataset_written_by_pandas_reads_as_the_written_one(tmp_path):
    # pandas writes large_string and int64: the same values, so the same split
    good = [encode_png(np.full((4, 4), v, np.uint8)) for v in (0, 9, 200)]
    path = _dataset(tmp_path / "d.parquet", good)
    table = pq.read_table(path)
    wide = pa.table({"id": table["id"].cast(pa.large_string()), "label": table["label"].cast(pa.int64()),
                     "class_name": table["class_name"].cast(pa.large_string()),
                     "split": table["split"].cast(pa.large_string()), "image": table["image"]})
    pq.write_table(wide, tmp_path / "wide.parquet")
    a, b = load_split(path, "test", 1, 4), load_split(tmp_path / "wide.parquet", "test", 1, 4)
    assert a.ids == b.ids and (a.labels == b.labels).all() and a.images.equal(b.images)
    pq.write_table(wide.set_column(1, "label", wide["label"].cast(pa.float64())), tmp_path / "float.parquet")
    with pytest.raises(DataError, match="column 'label' has type double, expected int32"):
        load_split(tmp_path / "float.parquet", "test", 1, 4)


def test_fetch_never_touches_a_foreign_folder(tmp_path):
    from cmce.importers.fashion_mnist import fetch_fashion_mnist

    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not empty"):
        fetch_fashion_mnist(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_truncated_idx_header_names_the_file(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0]))
    from cmce.importers.fashion_mnist import read_idx

    with pytest.raises(DataError, match="x-idx3-ubyte.gz: truncated IDX header"):
        read_idx(path, 3)


def _idx_header(path, dims, body: bytes = b""):
    import struct

    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">HBB{len(dims)}I", 0, 8, len(dims), *dims) + body)
    return path


@pytest.mark.parametrize(("dims", "ndim", "message"), [
    ((), 3, "an IDX array of 0 dimension(s); expected 3 (images: count × height × width)"),  # was a TypeError
    ((20,), 3, "an IDX array of 1 dimension(s); expected 3"),  # was an IndexError
    ((2, 4, 4, 7), 3, "an IDX array of 4 dimension(s); expected 3"),  # was PIL's "Cannot handle this data type"
    ((20, 1), 1, "an IDX array of 2 dimension(s); expected 1 (labels: count)"),  # named no file
    ((2, 0, 8), 3, "images of 0 × 8 pixels"),
    ((1, 20000, 20000), 3, "refused, too many pixels: 20000 × 20000 = 400,000,000, over data.max_image_pixels"),
    ((65536, 65536, 2), 3, "shape (65536, 65536, 2) holds 8,589,934,592 values, over 1,073,741,824"),
    ((200_000_000, 1, 1), 3, "states 200,000,000 images, over the 2,000,000"),  # one PNG each: an hour, 10 GB
    ((0, 28, 28), 3, "holds 0 images"),  # blamed on data.heldout_fraction, which the official split never reads
])
def test_an_idx_header_is_checked_before_its_body_is_read(tmp_path, dims, ndim, message):
    """A 389 kB gzip declaring a 20,000 × 20,000 image was decompressed whole (1.2 GB) and imported past the pixel
    limit; headers of another rank were numpy or PIL tracebacks."""
    from cmce.importers.fashion_mnist import read_idx

    path = _idx_header(tmp_path / "x-idx3-ubyte.gz", dims)
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        read_idx(path, ndim)
    assert read_idx(_idx_header(tmp_path / "ok.gz", (2, 3, 3), bytes(18)), 3).shape == (2, 3, 3)
    with pytest.raises(DataError, match="expected 18 values for shape \\(2, 3, 3\\), got more"):
        read_idx(_idx_header(tmp_path / "long.gz", (2, 3, 3), bytes(19)), 3)


def test_a_pipe_named_like_an_idx_file_is_refused_not_waited_on(tmp_path):
    import os

    from cmce.importers.fashion_mnist import read_idx

    os.mkfifo(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: cannot read IDX file: not a regular file"):
        read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 1)


def test_source_registry_matches_the_config_and_names_valid_sources(tmp_path):
    import typing

    from cmce.data.sources import SOURCES, fetch_source, get_source

    assert set(typing.get_args(typing.get_type_hints(DataConfig)["source"])) == set(SOURCES)
    with pytest.raises(DataError, match=r"unknown data source 'mnist'; valid names: \['cars196', 'cub200', 'digits'"):
        get_source("mnist")
    with pytest.raises(DataError, match="'cub200': read from data.path .*; there is nothing to fetch"):
        fetch_source(DataConfig(source="cub200"), tmp_path)
    with pytest.raises(DataError, match="data.path: data.source=sop needs the benchmark's folder"):
        prepare_dataset(DataConfig(source="sop"), tmp_path / "d.parquet")


def test_disjoint_by_rules(tmp_path):
    from cmce.data.protocols import assign_splits
    from cmce.data.schema import RawImages

    raw = RawImages([f"i{n}" for n in range(12)], np.arange(12) % 6, list("abcdef"), [b""] * 12)
    first = assign_splits(raw, DataConfig(protocol="disjoint"), 0)
    assert set(raw.labels[first == "train"]) == {0, 1, 2}
    rand = [assign_splits(raw, DataConfig(protocol="disjoint", disjoint_by="random"), s) for s in range(5)]
    assert all(len(set(raw.labels[r == "train"])) == 3 for r in rand) and len({tuple(r) for r in rand}) > 1
    for rule in ("official", "group"):
        with pytest.raises(DataError, match=f"data.disjoint_by={rule}: data.source=digits"):
            assign_splits(raw, DataConfig(protocol="disjoint", disjoint_by=rule), 0)
    raw.class_split = ["test", "train", "test", "train", "test", "test"]
    official = assign_splits(raw, DataConfig(protocol="disjoint"), 0)  # auto: the source's own class split
    assert set(raw.labels[official == "train"]) == {1, 3}
    raw.groups = ["x", "x", "y", "y", "y", "y"]
    grouped = assign_splits(raw, DataConfig(protocol="disjoint", disjoint_by="group"), 0)
    assert {tuple(sorted(set(raw.labels[grouped == p]))) for p in ("train", "test")} == {(0, 1), (2, 3, 4, 5)}
    one = RawImages(["i0", "i1"], np.zeros(2, dtype=int), ["only"], [b""] * 2)  # named neither key nor folder
    with pytest.raises(DataError, match=r"^data.protocol=disjoint needs at least 2 classes; data.source=imagefolder "
                                        r"\(/data/one\) has 1$"):
        assign_splits(one, DataConfig(source="imagefolder", path="/data/one", protocol="disjoint"), 0)
    # 2 or 3 classes made a train split of one class (refused only by `train`, naming no key) or a test of one
    three = RawImages([f"i{n}" for n in range(6)], np.arange(6) % 3, list("abc"), [b""] * 6)
    with pytest.raises(DataError, match=r"^data.protocol=disjoint: data.source=imagefolder \(/data/three\) has "
                                        r"3 classes, 1 for the train split and 2 for the test split; each needs at "
                                        r"least 2$"):
        assign_splits(three, DataConfig(source="imagefolder", path="/data/three", protocol="disjoint"), 0)
    raw.groups = ["x", "y", "y", "y", "y", "y"]  # a group rule leaving one class on a side too
    with pytest.raises(DataError, match="1 for the train split and 5 for the test split"):
        assign_splits(raw, DataConfig(protocol="disjoint", disjoint_by="group"), 0)


def _ids_by_split(path):
    t = pq.read_table(path, columns=["id", "split", "label"])
    rows = list(zip(*(t.column(c).to_pylist() for c in ("id", "split", "label")), strict=True))
    return {s: {i for i, sp, _ in rows if sp == s} for s in ("train", "test")}, rows


def test_carve_validation_heldout_uses_train_images_only(tmp_path):
    src = prepare_dataset(DataConfig(source="digits", image_size=8), tmp_path / "d.parquet")
    original, _ = _ids_by_split(src)
    val = carve_validation(src, tmp_path / "v.parquet", 0.25, seed=3)
    carved, rows = _ids_by_split(val)
    assert carved["train"] | carved["test"] == original["train"]  # every train image, no test image
    assert not carved["train"] & carved["test"]
    labels = {label for *_, label in rows}
    for c in labels:  # a quarter of each class's train images
        n = [sum(1 for _, sp, lab in rows if lab == c and sp == s) for s in ("train", "test")]
        assert abs(n[1] - 0.25 * sum(n)) <= 1
    assert dataset_info(val)["validation"]["fraction"] == 0.25
    assert dataset_info(val)["validation"]["by"] == "images of each class"
    assert _ids_by_split(carve_validation(src, tmp_path / "v2.parquet", 0.25, seed=3))[0] == carved
    assert _ids_by_split(carve_validation(src, tmp_path / "v3.parquet", 0.25, seed=4))[0] != carved


def test_carve_validation_disjoint_carves_whole_train_classes(tmp_path):
    src = prepare_dataset(DataConfig(source="digits", protocol="disjoint", image_size=8), tmp_path / "d.parquet")
    original, orig_rows = _ids_by_split(src)
    _, rows = _ids_by_split(carve_validation(src, tmp_path / "v.parquet", 0.4, seed=0))
    classes = {s: {lab for _, sp, lab in rows if sp == s} for s in ("train", "test")}
    train_classes = {lab for _, sp, lab in orig_rows if sp == "train"}
    assert classes["train"] | classes["test"] == train_classes and not classes["train"] & classes["test"]
    assert len(classes["test"]) == round(0.4 * len(train_classes))
    assert {i for i, *_ in rows} == original["train"]


def test_carve_validation_cross_vendor_drops_single_vendor_classes(tmp_path):
    # 6 train classes drawn by vendors a and b, except classes 0 and 1 (a only); 5 of the 6 get carved,
    # so at least one single-vendor class is carved and must be dropped (no countable match for its queries)
    ids, labels, domains = [], [], []
    for c in range(6):
        for v in ("a",) if c < 2 else ("a", "b"):
            ids.append(f"{v}/{c}"), labels.append(c), domains.append(v)
    n = len(ids)
    table = pa.table({"id": ids, "label": pa.array(labels, pa.int32()), "class_name": [str(c) for c in labels],
                      "split": ["train"] * n, "image": [encode_png(np.zeros((4, 4), np.uint8))] * n,
                      "domain": domains})
    meta = {"source": "emoji", "protocol": "cross_vendor", "classes": [str(c) for c in range(6)], "seed": 0}
    pq.write_table(table.replace_schema_metadata({"cmce": json.dumps(meta)}), tmp_path / "d.parquet")
    _, rows = _ids_by_split(carve_validation(tmp_path / "d.parquet", tmp_path / "v.parquet", 0.8, seed=1))
    carved = {lab for _, sp, lab in rows if sp == "test"}
    kept = {lab for *_, lab in rows}
    assert carved <= {2, 3, 4, 5} and len(carved) >= 3  # only two-vendor classes end up carved
    assert kept >= {2, 3, 4, 5} and len(kept) < 6  # a carved single-vendor class is gone (one not carved stays)
    assert all(sum(1 for _, sp, lab in rows if lab == c) == 2 for c in carved)  # both vendors kept


def test_carve_validation_keeps_class_groups_whole(tmp_path):
    # 12 classes in 4 groups of related classes (as emoji subcategories), split by group: carving must
    # not put two classes of one group on both sides of the validation split
    groups = [f"g{c // 3}" for c in range(12)]
    ids = [f"{v}/{c}" for c in range(12) for v in ("a", "b")]
    labels = [c for c in range(12) for _ in ("a", "b")]
    n = len(ids)
    table = pa.table({"id": ids, "label": pa.array(labels, pa.int32()), "class_name": [str(c) for c in labels],
                      "split": ["train"] * n, "image": [encode_png(np.zeros((4, 4), np.uint8))] * n,
                      "domain": ["a", "b"] * 12})
    meta = {"source": "emoji", "protocol": "cross_vendor", "disjoint_by": "group", "class_groups": groups,
            "classes": [str(c) for c in range(12)], "seed": 0}
    pq.write_table(table.replace_schema_metadata({"cmce": json.dumps(meta)}), tmp_path / "d.parquet")
    for seed in range(5):
        _, rows = _ids_by_split(carve_validation(tmp_path / "d.parquet", tmp_path / "v.parquet", 0.5, seed=seed))
        sides = {s: {groups[lab] for _, sp, lab in rows if sp == s} for s in ("train", "test")}
        assert sides["train"] and sides["test"] and not sides["train"] & sides["test"], seed
    assert dataset_info(tmp_path / "v.parquet")["validation"]["by"] == "whole class groups"


def test_carve_validation_refuses_bad_fractions(tmp_path):
    src = prepare_dataset(DataConfig(source="digits", protocol="disjoint", image_size=8), tmp_path / "d.parquet")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="validation fraction"):
            carve_validation(src, tmp_path / "v.parquet", bad, seed=0)
    with pytest.raises(DataError, match=r"d.parquet: 5 train classes cannot give a validation share of 0.01"):
        carve_validation(src, tmp_path / "v.parquet", 0.01, seed=0)
    assert not (tmp_path / "v.parquet").exists()


def test_a_column_given_twice_and_a_pipe_named_like_an_image_are_named(tmp_path):
    import os

    good = encode_png(np.zeros((4, 4), np.uint8))
    table = pq.read_table(_dataset(tmp_path / "d.parquet", [good, good]))
    pq.write_table(table.append_column("label", table.column("label")), tmp_path / "twice.parquet")
    with pytest.raises(DataError, match=r"twice.parquet: column\(s\) \['label'\] appear more than once"):
        load_split(tmp_path / "twice.parquet", "test", 1, 4)  # pyarrow said 'Column label does not exist'
    (tmp_path / "if" / "cat").mkdir(parents=True)
    (tmp_path / "if" / "cat" / "0.png").write_bytes(_png("L"))
    os.mkfifo(tmp_path / "if" / "cat" / "zz.png")  # was skipped without a word
    with pytest.raises(DataError, match=r"cat/zz.png: not a regular file"):
        import_imagefolder(tmp_path / "if")


def test_imagefolder_skips_hidden_entries_and_names_what_it_does_not_read(tmp_path, caplog):
    """.ipynb_checkpoints at the root became a class (every label shifted by one) and .thumbnails images were
    imported as the class's; .jfif JPEGs were skipped without a word, leaving a class of 0 images."""
    for cls in ("c0", "c1"):
        (tmp_path / cls / ".thumbnails").mkdir(parents=True)
        (tmp_path / cls / "0.png").write_bytes(_png("L", value=10))
        (tmp_path / cls / ".thumbnails" / "0.png").write_bytes(_png("L", value=99))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "c1" / ".DS_Store").write_bytes(b"\x00")
    jpeg = io.BytesIO()
    Image.new("L", (8, 8), 50).save(jpeg, format="JPEG")
    (tmp_path / "c1" / "1.jfif").write_bytes(jpeg.getvalue())
    (tmp_path / "c1" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING):
        raw = import_imagefolder(tmp_path)
    assert raw.classes == ["c0", "c1"] and raw.ids == ["c0/0.png", "c1/0.png", "c1/1.jfif"]
    assert list(raw.labels) == [0, 1, 1]
    assert any("skipped 1 file(s)" in r.getMessage() and "c1/notes.txt" in r.getMessage() for r in caplog.records)
    (tmp_path / "c2").mkdir()
    (tmp_path / "c2" / "readme.md").write_text("empty class")
    with pytest.raises(DataError, match=r"class folder\(s\) c2 hold no images"):
        import_imagefolder(tmp_path)


def test_images_outside_every_class_folder_are_named_not_dropped_unsaid(tmp_path, caplog):
    """root/stray0.png beside root/c0/ and root/c1/, or root/train/stray.png beside its class folders, were
    dropped without a word: they have no class, so they are still not read, but a warning names them."""
    def loose_warnings():
        return [r.getMessage() for r in caplog.records if "outside any class folder" in r.getMessage()]

    for cls in ("c0", "c1"):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        (tmp_path / "flat" / cls / "0.png").write_bytes(_png("L", value=10))
    for i in range(5):
        (tmp_path / "flat" / f"stray{i}.png").write_bytes(_png("L", value=i))
    (tmp_path / "flat" / "README.md").write_text("not an image: no warning")
    with caplog.at_level(logging.WARNING):
        raw = import_imagefolder(tmp_path / "flat")
    assert raw.ids == ["c0/0.png", "c1/0.png"]
    assert loose_warnings() == [f"{tmp_path / 'flat'}: skipped 5 image(s) lying outside any class folder (no class "
                                "to label them): stray0.png, stray1.png, stray2.png …"]
    for part in ("train", "test"):
        (tmp_path / "split" / part / "c0").mkdir(parents=True)
        (tmp_path / "split" / part / "c0" / "0.png").write_bytes(_png("L", value=10))
    (tmp_path / "split" / "train" / "stray.png").write_bytes(_png("L"))
    (tmp_path / "split" / "cover.jpg").write_bytes(_png("L"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        raw = import_imagefolder(tmp_path / "split")
    assert raw.ids == ["train/c0/0.png", "test/c0/0.png"]
    assert loose_warnings() == [f"{tmp_path / 'split'}: skipped 2 image(s) lying outside any class folder (no class "
                                "to label them): cover.jpg, train/stray.png"]
    caplog.clear()
    (tmp_path / "split" / "train" / "stray.png").unlink()
    (tmp_path / "split" / "cover.jpg").unlink()
    with caplog.at_level(logging.WARNING):
        import_imagefolder(tmp_path / "split")
    assert loose_warnings() == []
    (tmp_path / "only").mkdir()  # images and no class folder at all: said so, not just "no class folders"
    (tmp_path / "only" / "0.png").write_bytes(_png("L"))
    with pytest.raises(DataError, match=r"only: holds 1 image but no class folders; an ImageFolder holds one"):
        import_imagefolder(tmp_path / "only")


@pytest.mark.parametrize("classes, message", [
    (("caf\u00e9", "cafe\u0301", "tea"), r"class folders 'cafe\\u0301', 'caf\\xe9' differ only in Unicode"),
    (("c0", "c0 ", "c1"), r"class folders 'c0', 'c0 ' differ only in .* spaces at their ends"),
], ids=["unicode-normalisation", "end-spaces"])
def test_class_folders_that_print_alike_are_named(tmp_path, classes, message):
    """"café" composed and decomposed, or `c0` and `c0 ` (a trailing space), made two classes that print alike
    (labels 0 and 1), without a word."""
    for cls in classes:
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(_png("L", value=10 * i))
    with pytest.raises(DataError, match=message):
        import_imagefolder(tmp_path)


@pytest.mark.parametrize("data, named", [
    (b"\x00\x00\x00\x18ftypheic" + bytes(40), "HEIC, a format this tool does not decode"),
    (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG, a format this tool does not decode"),
    (b"%PDF-1.7 ...", "PDF, a format this tool does not decode"),
    (b"not an image at all", "damaged, or in a format this tool does not decode"),
])
def test_an_image_pillow_cannot_identify_is_named_by_its_format(data, named):
    """Pillow's message named its own buffer ("cannot identify image file <_io.BytesIO object at 0x7f…>")."""
    with pytest.raises(DataError) as err:
        codec_module.open_image(data, "x.png")
    assert str(err.value).startswith(f"x.png: corrupt or unreadable image: {named}") and "BytesIO" not in str(err.value)


def test_an_eps_image_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    """Pillow's EPS plugin runs Ghostscript on the image: a search query or a dataset image in EPS made cmce run a
    program on data from anyone (or answer 500 when it failed). No plugin that runs another program is opened."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "gs-ran"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # Pillow looks for gs once, then remembers
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(buf, format="EPS")
    for decode in (lambda data: decode_image(data, 1, 8, "images[0]"), lambda data: to_png(data, "images[0]")):
        with pytest.raises(DataError, match=r"^images\[0\]: EPS images are not decoded"):
            decode(buf.getvalue())
    assert not marker.exists()
    assert "IPTC" not in codec_module._in_process_formats()  # it opens what it holds with every plugin, EPS too


def test_prepare_refuses_an_image_whose_label_is_outside_the_source_classes(tmp_path, monkeypatch):
    """assign_splits walks labels 0..n-1: an importer's image of another label was silently left out."""
    from cmce.data import prepare as prepare_module
    from cmce.data.schema import RawImages
    from cmce.data.sources import Source

    img = encode_png(np.zeros((8, 8), np.uint8))
    labels = np.array([0, 1, 0, 1, 0, 1, 2, 0], np.int64)
    raw = RawImages([f"x{i}" for i in range(8)], labels, ["a", "b"], [img] * 8)
    monkeypatch.setattr(prepare_module, "get_source", lambda name: Source(lambda cfg, raw_dir: raw))
    out = tmp_path / "d.parquet"
    with pytest.raises(DataError, match=r"^data\.source=digits \(id x6\): label 2 is not one of the 2 classes "
                                        r"\(0\.\.1\)$"):
        prepare_dataset(DataConfig(source="digits", image_size=8), out)
    assert not out.exists()


def _labelled_dataset(path, labels, names, classes):
    table = pa.table({"id": [f"i{k}" for k in range(len(labels))], "label": pa.array(labels, pa.int32()),
                      "class_name": names, "split": ["train"] * 2 + ["test"] * (len(labels) - 2),
                      "image": [encode_png(np.zeros((4, 4), np.uint8))] * len(labels)}, schema=DATASET_SCHEMA)
    pq.write_table(table.replace_schema_metadata({"cmce": json.dumps({"classes": classes})}), path)
    return path


def test_a_dataset_whose_labels_or_class_names_disagree_with_its_classes_list_is_refused(tmp_path):
    classes = ["zero", "one", "two", "three"]
    # class-disjoint splits: test labels 2, 3 appear in no train row, and are within the list: accepted
    ok = _labelled_dataset(tmp_path / "ok.parquet", [0, 1, 2, 3], classes, classes)
    open_dataset(ok)
    past = _labelled_dataset(tmp_path / "past.parquet", [0, 1, 2, 4], [*classes[:3], "four"], classes)
    with pytest.raises(DataError, match=rf"^{past}: row 3 has label 4; the metadata lists 4 classes, labels are "
                                        r"0\.\.3$"):
        open_dataset(past)
    swapped = _labelled_dataset(tmp_path / "swapped.parquet", [0, 1, 2, 3], classes, classes[::-1])
    with pytest.raises(DataError, match=rf"^{swapped}: row 0 \(label 0\) has class_name 'zero'; the metadata's "
                                        "classes list says 'three'$"):
        open_dataset(swapped)
    bare = tmp_path / "bare.parquet"  # no classes list (a file written by hand): nothing to compare with
    pq.write_table(pq.read_table(past).replace_schema_metadata(None), bare)
    open_dataset(bare)


def test_an_official_split_whose_classes_partly_differ_is_said(tmp_path, caplog):
    """train/ {c0, c1, c2} and test/ {c0, c1, c3}: read as `heldout` (unseen images of the training classes) without
    a word, though c3 is tested only and c2 trained only."""
    for part, classes in (("train", ("c0", "c1", "c2")), ("test", ("c0", "c1", "c3"))):
        for cls in classes:
            (tmp_path / part / cls).mkdir(parents=True)
            (tmp_path / part / cls / "0.png").write_bytes(_png("L"))
    with caplog.at_level(logging.WARNING):
        import_imagefolder(tmp_path)
    assert "share 2 class(es), but ['c3'] only in test/ and ['c2'] only in train/" in caplog.text
    caplog.clear()
    (tmp_path / "test" / "c3").rename(tmp_path / "test" / "c2")
    with caplog.at_level(logging.WARNING):
        import_imagefolder(tmp_path)
    assert "only in test/" not in caplog.text


def test_an_imagefolder_split_into_disjoint_classes_is_kept_by_the_disjoint_protocol(tmp_path, caplog):
    """train/ {zeta, zulu} and test/ {alpha, bravo}: the disjoint protocol ignored the folders and took the first
    half of the sorted names, so the test classes trained and the train classes tested (exit 0); heldout read them
    without a word that no test class is ever trained on."""
    from cmce.data.protocols import assign_splits

    for part, classes in (("train", ("zeta", "zulu")), ("test", ("alpha", "bravo"))):
        for cls in classes:
            (tmp_path / part / cls).mkdir(parents=True)
            for i in range(2):
                (tmp_path / part / cls / f"{i}.png").write_bytes(_png("L"))
    raw = import_imagefolder(tmp_path)
    split = assign_splits(raw, DataConfig(source="imagefolder", protocol="disjoint"), 0)
    assert {raw.classes[c] for c in raw.labels[split == "train"]} == {"zeta", "zulu"}
    assert {raw.classes[c] for c in raw.labels[split == "test"]} == {"alpha", "bravo"}
    with caplog.at_level(logging.WARNING):
        assign_splits(raw, DataConfig(source="imagefolder", protocol="heldout"), 0)
    assert "its own train/test split shares no class" in caplog.text


def test_the_heldout_protocol_keeps_an_image_of_every_class_for_training():
    """At heldout_fraction 0.75 a class of 2 images went wholly to test: round(1.5) = 2."""
    from cmce.data.protocols import assign_splits
    from cmce.data.schema import RawImages

    labels = np.array([0] * 6 + [1] * 2)
    raw = RawImages([f"i{n}" for n in range(8)], labels, ["big", "tiny"], [b""] * 8)
    split = assign_splits(raw, DataConfig(protocol="heldout", heldout_fraction=0.75), 0)
    assert list(split[labels == 1]).count("train") == 1 and list(split[labels == 0]).count("test") == 4


def _fake_debian_tools(bin_dir, dpkg_script: str):
    """`apt-get download` that leaves a .deb in the working folder, and a dpkg-deb running `dpkg_script` (sh)."""
    import os

    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho deb > dataset-fashion-mnist_1.0_all.deb\n")
    (bin_dir / "dpkg-deb").write_text(f"#!/bin/sh\n{dpkg_script}\n")
    for tool in ("apt-get", "dpkg-deb"):
        os.chmod(bin_dir / tool, 0o755)


@pytest.mark.parametrize(("dpkg_script", "message"), [
    ("echo 'dpkg-deb: error: archive is truncated' >&2; exit 2",
     "dpkg-deb could not unpack dataset-fashion-mnist_1.0_all.deb: dpkg-deb: error: archive is truncated"),
    ('d="$3/usr/share/datasets/fashion-mnist"; mkdir -p "$d"; echo x > "$d/train-images-idx3-ubyte.gz"; '
     'ln -s /nowhere "$d/train-labels-idx1-ubyte.gz"',
     "dataset-fashion-mnist_1.0_all.deb: holds no regular file train-labels-idx1-ubyte.gz")])
def test_a_fashion_mnist_package_that_cannot_be_unpacked_is_named_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                     dpkg_script, message):
    """dpkg-deb's failure was a CalledProcessError traceback (exit 1); a failed copy left a half-filled .fmnist.*
    folder beside --out, and the folders made for it."""
    import os

    from cmce.importers.fashion_mnist import fetch_fashion_mnist

    _fake_debian_tools(tmp_path / "bin", dpkg_script)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(DataError, match=re.escape(message)):
        fetch_fashion_mnist(tmp_path / "new" / "fm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]


def test_an_apt_mirror_that_stops_answering_is_given_up_on(tmp_path, monkeypatch, caplog):
    """`apt-get download` (then `apt-get update`, which the log now says) ran without a time limit: a mirror that
    stopped answering held fetch-data for ever."""
    import os

    import cmce.importers.fashion_mnist as fm

    _fake_debian_tools(tmp_path / "bin", "exit 0")
    (tmp_path / "bin" / "apt-get").write_text('#!/bin/sh\n[ "$1" = update ] && exec sleep 30\nexit 100\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(fm, "APT_TIMEOUT_S", 1)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError, match=re.escape(
            "`apt-get update -qq` did not finish within 1 s; is the package mirror reachable?")):
        fm.fetch_fashion_mnist(tmp_path / "new" / "fm")
    assert "refreshing the package lists (apt-get update)" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]
