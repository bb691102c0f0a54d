"""CUB-200-2011, Cars196 and Stanford Online Products importers on tiny fake trees in the standard layouts."""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cmce.config import DataConfig
from cmce.data.prepare import prepare_dataset
from cmce.data.readers import dataset_info
from cmce.data.schema import DataError
from cmce.importers.retrieval_benchmarks import import_cars196, import_cub200, import_sop


def _image(path: Path, seed: int, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (10, 12, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _split(path: Path) -> dict[str, set]:
    rows = pq.read_table(path, columns=["class_name", "split"]).to_pylist()
    out: dict[str, set] = {"train": set(), "test": set()}
    for r in rows:
        out[r["split"]].add(r["class_name"])
    return out


# ---------------------------------------------------------------- CUB
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani",
               "005.Crested_Auklet"]


def fake_cub(parent: Path, per_class: int = 3) -> Path:
    root = parent / "CUB_200_2011"
    images, labels, split = [], [], []
    for c, name in enumerate(CUB_CLASSES, start=1):
        for k in range(per_class):
            iid = len(images) + 1
            rel = f"{name}/{name.split('.')[1]}_{k:04d}.jpg"
            mode = "L" if k == 1 else "RGB"  # CUB has a few greyscale JPEGs
            _image(root / "images" / rel, iid, mode=mode)
            images.append(f"{iid} {rel}")
            labels.append(f"{iid} {c}")
            split.append(f"{iid} {int(k != 0)}")
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in enumerate(CUB_CLASSES, start=1)))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


def test_cub_ids_labels_classes_and_splits(tmp_path):
    root = fake_cub(tmp_path)
    raw = import_cub200(tmp_path)  # the parent of CUB_200_2011/ works too
    assert raw.classes == CUB_CLASSES and len(raw.ids) == 15
    assert raw.ids[4] == "002.Laysan_Albatross/Laysan_Albatross_0001.jpg" and raw.labels[4] == 1
    assert raw.class_split == ["train", "train", "test", "test", "test"]  # first half of the classes train
    assert raw.official_split[:3] == ["test", "train", "train"]
    # JPEG bytes are kept as they are on disk
    assert raw.images[4] == (root / "images" / raw.ids[4]).read_bytes()

    out = prepare_dataset(DataConfig(source="cub200", path=str(root), protocol="disjoint"), tmp_path / "d.parquet")
    assert _split(out) == {"train": set(CUB_CLASSES[:2]), "test": set(CUB_CLASSES[2:])}
    assert dataset_info(out)["disjoint_by"] == "official"
    assert "domain" not in pq.read_schema(out).names
    held = prepare_dataset(DataConfig(source="cub200", path=str(root)), tmp_path / "h.parquet")
    rows = pq.read_table(held, columns=["id", "split"]).to_pylist()
    assert sum(r["split"] == "test" for r in rows) == 5  # the official split of the same classes


def test_cub_errors_name_the_file_and_line(tmp_path):
    root = fake_cub(tmp_path)
    lines = (root / "images.txt").read_text().splitlines()
    (root / "images.txt").write_text("\n".join([*lines[:3], "4 two words.jpg", *lines[4:]]))
    with pytest.raises(DataError, match=r"images.txt:4: expected 2 fields \(image_id path\), got '4 two words.jpg'"):
        import_cub200(root)
    (root / "images.txt").write_text("\n".join([*lines[:3], "x 002.Laysan_Albatross/a.jpg", *lines[4:]]))
    with pytest.raises(DataError, match=r"images.txt:4: image_id 'x' is not an integer"):
        import_cub200(root)
    (root / "images.txt").write_text("\n".join([*lines[:3], "4 002.Laysan_Albatross/gone.jpg", *lines[4:]]))
    with pytest.raises(DataError, match=r"gone.jpg: image listed at .*images.txt:4 not found"):
        import_cub200(root)
    # an id listed twice: the last line won, moving the image to another class or split without a word
    (root / "images.txt").write_text("\n".join([*lines, lines[0].replace("1 ", "1 x", 1)]))
    with pytest.raises(DataError, match=rf"images.txt:{len(lines) + 1}: image_id 1 listed twice"):
        import_cub200(root)
    (root / "images.txt").write_text("\n".join(lines))
    for name in ("image_class_labels.txt", "train_test_split.txt"):
        kept = (root / name).read_text()
        (root / name).write_text(kept + "1 1\n")
        with pytest.raises(DataError, match=rf"{name}:16: image_id 1 listed twice"):
            import_cub200(root)
        (root / name).write_text(kept)
    (root / "image_class_labels.txt").write_text("1 1\n2 9\n")
    with pytest.raises(DataError, match=r"image_class_labels.txt:2: class_id 9 is not in classes.txt"):
        import_cub200(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes.txt: not found"):
        import_cub200(root)
    with pytest.raises(DataError, match=r"no images.txt here or in .*CUB_200_2011"):
        import_cub200(tmp_path / "elsewhere")


# ---------------------------------------------------------------- Cars196
CAR_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 Coupe 2012"]


def fake_cars(root: Path, per_class: int = 2, classes=None) -> Path:
    import scipy.io

    fields = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
              ("class", "O"), ("test", "O")]
    n = len(CAR_CLASSES) * per_class
    ann = np.zeros((1, n), dtype=fields)
    for i in range(n):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _image(root / rel, i)
        cls = (classes or [])[i] if classes else i // per_class + 1
        ann[0, i] = (rel, *(np.array([[v]], np.uint8) for v in (1, 1, 9, 9)), np.array([[cls]], np.uint8),
                     np.array([[i % 2]], np.uint8))
    names = np.empty((1, len(CAR_CLASSES)), dtype=object)
    names[0, :] = CAR_CLASSES
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def test_cars_ids_labels_classes_and_splits(tmp_path):
    root = fake_cars(tmp_path / "cars196")
    raw = import_cars196(tmp_path)
    assert raw.classes == CAR_CLASSES and raw.ids[:2] == ["car_ims/000001.jpg", "car_ims/000002.jpg"]
    assert raw.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert raw.official_split == ["train", "test"] * 4
    out = prepare_dataset(DataConfig(source="cars196", path=str(root), protocol="disjoint"), tmp_path / "d.parquet")
    assert _split(out) == {"train": set(CAR_CLASSES[:2]), "test": set(CAR_CLASSES[2:])}


def test_cars_errors_name_the_file_and_record(tmp_path):
    root = fake_cars(tmp_path, classes=[1, 1, 2, 2, 3, 3, 4, 7])
    with pytest.raises(DataError, match=r"cars_annos.mat: annotations\[7\]: field 'class' must be an integer in "
                                        r"1..4, got 7"):
        import_cars196(root)
    fake_cars(root)
    (root / "car_ims" / "000003.jpg").unlink()
    with pytest.raises(DataError, match=r"000003.jpg: image listed at .*annotations\[2\] not found"):
        import_cars196(root)
    (root / "cars_annos.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(DataError, match="cars_annos.mat: not a readable MATLAB v5 file"):
        import_cars196(root)


# ---------------------------------------------------------------- Stanford Online Products
HEADER = "image_id class_id super_class_id path\n"


def fake_sop(parent: Path) -> Path:
    root = parent / "Stanford_Online_Products"
    lines = {"train": [], "test": []}
    iid = 0
    for cid in range(1, 7):
        folder, scid = ("bicycle_final", 1) if cid % 2 else ("chair_final", 2)
        for k in range(2 + cid % 2):
            iid += 1
            rel = f"{folder}/{100 + cid}_{k}.JPG"
            _image(root / rel, iid)
            lines["train" if cid <= 3 else "test"].append(f"{iid} {cid} {scid} {rel}")
    for part, rows in lines.items():
        (root / f"Ebay_{part}.txt").write_text(HEADER + "\n".join(rows) + "\n")
    return root


def test_sop_uses_the_official_class_split(tmp_path):
    root = fake_sop(tmp_path)
    raw = import_sop(tmp_path)
    assert raw.classes == ["bicycle_final/1", "chair_final/2", "bicycle_final/3", "chair_final/4",
                           "bicycle_final/5", "chair_final/6"]
    assert raw.ids[0] == "bicycle_final/101_0.JPG" and raw.labels[:4].tolist() == [0, 0, 0, 1]
    assert raw.class_split == ["train"] * 3 + ["test"] * 3
    assert raw.official_split is None  # the official split is by class: heldout draws images per class
    out = prepare_dataset(DataConfig(source="sop", path=str(root), protocol="disjoint"), tmp_path / "d.parquet")
    assert _split(out) == {"train": set(raw.classes[:3]), "test": set(raw.classes[3:])}
    held = prepare_dataset(DataConfig(source="sop", path=str(root), heldout_fraction=0.5), tmp_path / "h.parquet")
    assert _split(held) == {"train": set(raw.classes), "test": set(raw.classes)}


def test_sop_errors_name_the_file_and_line(tmp_path):
    root = fake_sop(tmp_path)
    test_file = root / "Ebay_test.txt"
    good = test_file.read_text()
    test_file.write_text(good + "99 2 2 chair_final/102_0.JPG\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt:9: class_id 2 is also in Ebay_train.txt"):
        import_sop(root)
    test_file.write_text(good.replace(HEADER, "id class super path\n"))
    with pytest.raises(DataError, match=r"Ebay_test.txt:1: expected the header line 'image_id class_id "):
        import_sop(root)
    test_file.write_text(good + "99 7 2\n")
    with pytest.raises(DataError, match=r"Ebay_test.txt:9: expected 4 fields"):
        import_sop(root)
    test_file.write_text(good + "99 7 2 ../outside.JPG\n")
    (tmp_path / "outside.JPG").write_bytes(b"")
    with pytest.raises(DataError, match=r"outside.JPG: resolves to .* outside the data root"):
        import_sop(root)


def test_one_image_file_listed_twice_is_refused_naming_both_rows(tmp_path):
    """`005.Crested_Auklet/./x.jpg` listed under another class, or a class's image replaced by a link to another's:
    one file was imported as two images of two classes (or splits), exit 0. ImageFolder refused the same."""
    root = fake_cub(tmp_path)
    first = f"{CUB_CLASSES[0]}/{CUB_CLASSES[0].split('.')[1]}_0000.jpg"
    with (root / "images.txt").open("a") as f:
        f.write(f"16 {first.replace('/', '/./')}\n")
    with (root / "image_class_labels.txt").open("a") as f:
        f.write("16 5\n")
    with (root / "train_test_split.txt").open("a") as f:
        f.write("16 1\n")
    with pytest.raises(DataError, match=r"images.txt:16 is the file listed at .*images.txt:1 \(the same path, a link"):
        import_cub200(tmp_path)
    root = fake_cub(tmp_path / "linked")
    victim = root / "images" / f"{CUB_CLASSES[4]}/{CUB_CLASSES[4].split('.')[1]}_0001.jpg"
    victim.unlink()
    victim.symlink_to(root / "images" / first)
    with pytest.raises(DataError, match=r"images.txt:14 is the file listed at .*images.txt:1 "):
        import_cub200(tmp_path / "linked")


def test_index_files_that_are_pipes_or_mat_files_with_other_variables(tmp_path):
    """A pipe named classes.txt blocked the import for ever; a cars_annos.mat carrying a large extra variable had it
    decompressed too (only `annotations` and `class_names` are read)."""
    import os

    import scipy.io

    root = fake_cub(tmp_path)
    (root / "classes.txt").unlink()
    os.mkfifo(root / "classes.txt")
    with pytest.raises(DataError, match="classes.txt: not readable: .*not a regular file"):
        import_cub200(tmp_path)
    cars = fake_cars(tmp_path / "cars")
    mat = scipy.io.loadmat(cars / "cars_annos.mat")
    read = []
    real = scipy.io.loadmat

    def spy(*args, **kwargs):
        read.append(kwargs.get("variable_names"))
        return real(*args, **kwargs)

    scipy.io.savemat(cars / "cars_annos.mat", {**{k: v for k, v in mat.items() if not k.startswith("__")},
                                                "junk": np.zeros((50, 50))}, do_compression=True)
    scipy.io.loadmat = spy
    try:
        raw = import_cars196(cars)
    finally:
        scipy.io.loadmat = real
    assert read == [["annotations", "class_names"]] and len(raw.ids) > 0
