"""The emoji importer, its protocols and its fetch, on tiny fake packages built here (no network)."""

import base64
import hashlib
import io
import json
import re
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cmce.config import DataConfig
from cmce.data.prepare import prepare_dataset
from cmce.data.protocols import assign_splits
from cmce.data.readers import dataset_info, read_domains
from cmce.data.schema import DataError
from cmce.importers import emoji
from cmce.importers.emoji import fetch_emoji, import_emoji

TONES = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"]
# (unified, subcategory, skin tones?, vendors that drew it)
FAKE = [
    *[(f"1F55{i}", "time", False, "gt") for i in range(4)],  # clock faces: near-duplicates
    *[(f"1F1E6-1F1E{i}", "country-flag", False, "gt") for i in range(3)],
    ("1F3F4-E0067", "subdivision-flag", False, "gt"),
    ("1F3C1", "flag", False, "gt"),
    ("1F44D", "hand-fingers-closed", True, "gt"),
    ("1F44B", "hand-fingers-open", True, "gt"),
    *[(f"1F60{i}", "face-smiling", False, "gt") for i in range(3)],
    ("1F431", "animal-mammal", False, "g"),  # drawn by google only
    ("1F436", "animal-mammal", False, "gt"),
    ("1F9A4", "animal-bird", False, ""),  # drawn by neither: not a class
]


def _png(seed: int) -> bytes:
    rgba = np.random.default_rng(seed).integers(0, 255, (8, 8, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _entries(vendor: str) -> list[dict]:
    out = []
    for order, (unified, sub, tones, drawn) in enumerate(FAKE):
        has = vendor[0] in drawn
        entry = {"unified": unified, "image": f"{unified.lower()}.png", "subcategory": sub, "category": "x",
                 "sort_order": order, f"has_img_{vendor}": has}
        if tones:
            entry["skin_variations"] = {t: {"unified": f"{unified}-{t}", "image": f"{unified.lower()}-{t.lower()}.png",
                                            f"has_img_{vendor}": has} for t in TONES}
        out.append(entry)
    return out


def _package_files(vendor: str) -> dict[str, bytes]:
    """Paths inside the package → bytes, including what the fetch must leave out."""
    files = {
        "package/package.json": json.dumps({"name": f"emoji-datasource-{vendor}", "version": "16.0.0"}).encode(),
        "package/emoji.json": json.dumps(_entries(vendor)).encode(),
        "package/README.md": b"readme",
        f"package/img/{vendor}/sheets/64.png": _png(999),  # a sprite sheet
    }
    for n, entry in enumerate(_entries(vendor)):
        items = [entry, *entry.get("skin_variations", {}).values()]
        for k, item in enumerate(items):
            if item[f"has_img_{vendor}"]:
                files[f"package/img/{vendor}/64/{item['image']}"] = _png(n * 31 + k + (vendor == "twitter") * 7)
                files[f"package/img/{vendor}/32/{item['image']}"] = _png(0)
    return files


def fake_emoji_root(root: Path) -> Path:
    """The folders fetch_emoji leaves behind, written directly."""
    for vendor in emoji.VENDORS:
        for name, data in _package_files(vendor).items():
            rel = name.removeprefix("package/")
            if rel in ("package.json", "emoji.json") or rel.startswith(f"img/{vendor}/64/"):
                (root / vendor / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / vendor / rel).write_bytes(data)
    return root


def test_classes_instances_ids_and_skin_tones(tmp_path):
    raw = import_emoji(fake_emoji_root(tmp_path))
    assert len(raw.classes) == len(FAKE) - 1  # the emoji nobody drew is no class
    assert raw.classes[:2] == ["1f550", "1f551"] and "1f9a4" not in raw.classes
    label = dict(zip(raw.ids, raw.labels, strict=True))
    domain = dict(zip(raw.ids, raw.domains, strict=True))
    # each vendor's base image and every skin-tone variant are instances of the base emoji's class
    thumbs = [i for i in raw.ids if "1f44d" in i]
    assert sorted(thumbs) == sorted(f"{v}/1f44d{t}" for v in ("google", "twitter") for t in ["", *[
        f"-{x.lower()}" for x in TONES]])
    assert {raw.classes[label[i]] for i in thumbs} == {"1f44d"}
    assert domain["twitter/1f44d-1f3fc"] == "twitter"
    assert [i for i in raw.ids if "1f431" in i] == ["google/1f431"]
    groups = dict(zip(raw.classes, raw.groups, strict=True))
    assert groups["1f1e6-1f1e0"] == groups["1f3f4-e0067"] == groups["1f3c1"] == "flags"
    assert groups["1f550"] == "time" and groups["1f44d"] != groups["1f44b"]
    # the stored image is the vendor's drawing, still RGBA (composited on white only when decoded)
    img = Image.open(io.BytesIO(raw.images[raw.ids.index("twitter/1f44b-1f3ff")]))
    assert img.mode == "RGBA" and img.size == (8, 8)


def test_an_image_listed_by_two_emoji_is_named_in_emoji_json(tmp_path):
    """Two entries sharing one image gave `<out>: column 'id' has duplicate id 'google/…'`, blaming the output."""
    root = fake_emoji_root(tmp_path)
    listing = root / "google" / "emoji.json"
    entries = json.loads(listing.read_text())
    drawn = [e for e in entries if e.get("has_img_google")]
    drawn[1]["image"] = drawn[0]["image"]
    listing.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=re.escape(f"{listing}: image {drawn[0]['image']} is listed twice (by emoji "
                                                  f"{drawn[0]['unified']} and {drawn[1]['unified']})")):
        import_emoji(root)


def _class_sides(dataset: Path) -> tuple[dict[str, set], dict]:
    t = pq.read_table(dataset).to_pylist()
    sides = defaultdict(set)
    for row in t:
        sides[row["class_name"]].add(row["split"])
    return sides, t


@pytest.mark.parametrize("seed", range(6))
def test_default_disjoint_split_keeps_subcategories_whole(tmp_path, seed):
    root = fake_emoji_root(tmp_path / "raw")
    raw = import_emoji(root)
    group = dict(zip(raw.classes, raw.groups, strict=True))
    out = prepare_dataset(DataConfig(source="emoji", protocol="disjoint"), tmp_path / "d.parquet", seed, root)
    sides, rows = _class_sides(out)
    assert all(len(s) == 1 for s in sides.values())  # class-disjoint
    by_group = defaultdict(set)
    for cls, s in sides.items():
        by_group[group[cls]] |= s
    assert all(len(s) == 1 for s in by_group.values())  # no subcategory (nor any flag) on both sides
    assert {"train", "test"} <= set().union(*sides.values())
    assert dataset_info(out)["disjoint_by"] == "group"
    assert dataset_info(out)["class_groups"] == raw.groups  # kept for validation splits (carve_validation)
    assert {r["domain"] for r in rows} == {"google", "twitter"}
    assert all(r["id"].startswith(r["domain"] + "/") for r in rows)


def test_group_split_is_deterministic_by_seed_and_about_half(tmp_path):
    raw = import_emoji(fake_emoji_root(tmp_path))
    splits = {seed: assign_splits(raw, DataConfig(source="emoji", protocol="disjoint"), seed) for seed in range(8)}
    assert np.array_equal(splits[3], assign_splits(raw, DataConfig(source="emoji", protocol="disjoint"), 3))
    assert len({tuple(s) for s in splits.values()}) > 1
    for s in splits.values():
        n_train = len(set(raw.labels[s == "train"]))
        assert 0 < n_train < len(raw.classes)


def test_split_by_class_can_straddle_subcategories(tmp_path):
    root = fake_emoji_root(tmp_path)
    raw = import_emoji(root)
    straddles = False
    for seed in range(10):
        s = assign_splits(raw, DataConfig(source="emoji", protocol="disjoint", disjoint_by="random"), seed)
        per_class = [set(s[raw.labels == c]) for c in range(len(raw.classes))]
        assert all(len(p) == 1 for p in per_class)  # still class-disjoint, skin tones with their base
        sides = defaultdict(set)
        for c, p in enumerate(per_class):
            sides[raw.groups[c]] |= p
        straddles |= any(len(v) == 2 for v in sides.values())
        assert len({c for c in range(len(raw.classes)) if per_class[c] == {"train"}}) == len(raw.classes) // 2
    assert straddles  # what the group split exists to prevent


def test_cross_vendor_protocol(tmp_path):
    root = fake_emoji_root(tmp_path / "raw")
    cfg = DataConfig(source="emoji", protocol="cross_vendor", disjoint_by="first_half")
    out = prepare_dataset(cfg, tmp_path / "d.parquet", 0, root)
    sides, rows = _class_sides(out)
    test = [r for r in rows if r["split"] == "test"]
    vendors = defaultdict(set)
    for r in test:
        vendors[r["class_name"]].add(r["domain"])
    # first_half puts the google-only cat into test: it has no cross-vendor match and is dropped
    assert "1f431" not in sides and "1f436" in vendors
    assert all(v == {"google", "twitter"} for v in vendors.values())
    info = dataset_info(out)
    assert info["protocol"] == "cross_vendor" and info["domains"] == ["google", "twitter"]
    domains = read_domains(out, "test")
    assert set(domains) == {r["id"] for r in test} and domains["twitter/1f44d-1f3fb"] == "twitter"


def test_cross_vendor_needs_vendors(tmp_path):
    with pytest.raises(DataError, match="cross_vendor protocol needs images from at least two vendors"):
        prepare_dataset(DataConfig(source="digits", protocol="cross_vendor", image_size=8), tmp_path / "d.parquet")
    assert read_domains(prepare_dataset(DataConfig(source="digits", image_size=8), tmp_path / "d.parquet")) == {}


def test_bad_emoji_json_names_the_file_and_entry(tmp_path):
    root = fake_emoji_root(tmp_path)
    entries = _entries("twitter")
    entries[2]["image"] = "../../etc/passwd.png"
    (root / "twitter" / "emoji.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"twitter/emoji.json: entry 2: field 'image' is not a plain .png file"):
        import_emoji(root)
    del entries[2]["unified"]
    (root / "twitter" / "emoji.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 2: field 'unified' missing"):
        import_emoji(root)
    (root / "twitter" / "emoji.json").write_text(json.dumps(_entries("twitter")))
    (root / "google" / "img" / "google" / "64" / "1f600.png").unlink()
    with pytest.raises(DataError, match=r"1f600.png: listed in .*google/emoji.json .* but missing"):
        import_emoji(root)


# ---------------------------------------------------------------- fetch
def _tarball(path: Path, vendor: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in _package_files(vendor).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An `npm` on an otherwise empty PATH that packs the fake packages and logs each call."""
    store, bindir = tmp_path / "store", tmp_path / "bin"
    store.mkdir()
    bindir.mkdir()
    for vendor in emoji.VENDORS:
        monkeypatch.setitem(emoji.INTEGRITY, vendor, _tarball(store / f"{vendor}.tgz", vendor))
    script = bindir / "npm"
    script.write_text(f"""#!{sys.executable}
import os, shutil, sys
from pathlib import Path
store = Path({str(store)!r})
with open(store / "calls.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if (store / "fail").exists():
    sys.stderr.write("npm error code ENOTFOUND\\nnpm error network request failed\\n")
    sys.exit(1)
vendor = sys.argv[2].split("@")[0].rsplit("-", 1)[1]
shutil.copy(store / f"{{vendor}}.tgz", Path.cwd() / f"emoji-datasource-{{vendor}}-16.0.0.tgz")
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    return store


def test_fetch_extracts_only_what_is_read_and_second_fetch_is_a_no_op(tmp_path, fake_npm):
    dest = tmp_path / "emoji"
    fetch_emoji(dest)
    calls = (fake_npm / "calls.log").read_text().splitlines()
    assert [c.split()[:2] for c in calls] == [["pack", "emoji-datasource-google@16.0.0"],
                                              ["pack", "emoji-datasource-twitter@16.0.0"]]
    assert sorted(p.name for p in dest.iterdir()) == ["google", "twitter"]  # no staging or tarball left
    files = sorted(str(p.relative_to(dest / "google")) for p in (dest / "google").rglob("*") if p.is_file())
    assert "README.md" not in files and not any("sheets" in f or "/32/" in f for f in files)
    assert {"emoji.json", "package.json", "img/google/64/1f44d-1f3fb.png"} <= set(files)
    fetch_emoji(dest)
    assert len((fake_npm / "calls.log").read_text().splitlines()) == 2  # cached: npm not run again
    direct = import_emoji(fake_emoji_root(tmp_path / "direct"))
    fetched = import_emoji(dest)
    assert fetched.ids == direct.ids and fetched.images == direct.images


def test_fetch_failures_are_clear_and_leave_nothing(tmp_path, fake_npm, monkeypatch):
    """Nothing: not even the folders made for --out (an empty `emoji/` was left, and the folders above it)."""
    dest = tmp_path / "new" / "emoji"
    (fake_npm / "fail").touch()
    with pytest.raises(DataError, match=r"npm pack emoji-datasource-google@16.0.0` failed \(exit 1\).*ENOTFOUND"
                                        r".*registry is reachable"):
        fetch_emoji(dest)
    assert not (tmp_path / "new").exists()
    (fake_npm / "fail").unlink()
    monkeypatch.setitem(emoji.INTEGRITY, "google", "sha512-other")
    dest.mkdir(parents=True)  # a folder the user made stays
    with pytest.raises(DataError, match="expected the pinned sha512-other"):
        fetch_emoji(dest)
    assert list(dest.iterdir()) == []
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds other files \(notes.txt\)"):
        fetch_emoji(dest)
    (dest / "notes.txt").unlink()
    (dest / "google").mkdir()
    (dest / "google" / "package.json").write_text('{"name": "emoji-datasource-google", "version": "15.1.2"}')
    with pytest.raises(DataError, match="holds emoji-datasource-google@15.1.2, not the pinned"):
        fetch_emoji(dest)


def test_fetch_data_without_npm_is_a_clear_error(tmp_path, monkeypatch, caplog):
    from cmce.cli import main

    from .conftest import SMOKE

    monkeypatch.setenv("PATH", str(tmp_path))  # no npm anywhere
    rc = main(["fetch-data", "--config", str(SMOKE), "--set", "data.source=emoji", "--out", str(tmp_path / "raw")])
    assert rc == 2
    assert "npm is not on PATH: install Node.js with npm" in caplog.text
    assert not (tmp_path / "raw").exists()


def test_json_files_that_are_pipes_are_refused_not_waited_on(tmp_path, fake_npm):
    """A pipe named emoji.json (import) or package.json (fetch-data's check of a vendor already there) blocked for
    ever."""
    import os

    root = fake_emoji_root(tmp_path / "root")
    (root / "google" / "emoji.json").unlink()
    os.mkfifo(root / "google" / "emoji.json")
    with pytest.raises(DataError, match="google/emoji.json: not readable JSON: .*not a regular file"):
        import_emoji(root)
    (root / "google" / "package.json").unlink()
    os.mkfifo(root / "google" / "package.json")
    with pytest.raises(DataError, match="google: exists but has an unreadable package.json .*not a regular file"):
        fetch_emoji(root)
