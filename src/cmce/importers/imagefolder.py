"""ImageFolder: root/<class>/[subfolders/]<image>, or root/train/<class>/… and root/test/<class>/… for an official
split."""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

import numpy as np

from cmce.data.codec import read_image_file, to_png
from cmce.data.schema import DataError, RawImages
from cmce.importers import inside_root, resolved

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _hidden(name: str) -> bool:
    """Names starting with a dot (.ipynb_checkpoints, .thumbnails, .DS_Store) are a tool's, never a class or an
    image: a hidden folder at the root became a class and shifted every label."""
    return name.startswith(".")


def _utf8(path: Path, root: Path) -> Path:
    """`path`, if its name can be stored: ids and class names are UTF-8 text in the dataset file (every folder
    between the root and it too: a subfolder's name is part of the id)."""
    try:
        str(path.relative_to(root)).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, which Python keeps as surrogates
        raise DataError(f"{root}: {ascii(str(path.relative_to(root)))}: the name is not valid UTF-8; "
                        "rename it") from None
    return path


def _unlistable(err: OSError) -> None:
    """os.walk skipped a folder it could not list, without a word: its images were left out of the dataset."""
    raise DataError(f"{err.filename}: cannot be listed ({err.strerror}): its images would be left out")


def _files_under(folder: Path, real_root: Path) -> list[Path]:
    """Every file in `folder` and its subfolders, in a fixed order. Linked subfolders are followed like real
    ones, and refused like a linked class folder when they lead outside the root, or out of their class folder
    (`c0/up -> ..` read every other class's images again as class c0); a folder reached twice (two links to one
    folder) is read once."""
    found, seen = [], set()
    real_class = resolved(folder)
    try:  # os.walk is recursive in Python 3.11
        for here, dirs, files in os.walk(folder, followlinks=True, onerror=_unlistable):
            real = resolved(Path(here))
            inside_root(Path(here), real_root)
            if real != real_class and real_class not in real.parents:
                raise DataError(f"{here}: a link out of its class folder {folder.name} (to {real}): its images would "
                                "be read again under this class; remove the link")
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for name in sorted(f for f in files if not _hidden(f)):
                path = Path(here) / name
                target = resolved(path)
                if path.is_symlink() and real_class not in target.parents:
                    # `c1/x.png -> ../c0/0.png`: one image under two labels, exit 0 (a link outside the root: named so)
                    inside_root(path, real_root)
                    raise DataError(f"{path}: a link out of its class folder {folder.name} (to {target}): its image "
                                    "would be read under this class too; remove the link")
                found.append(path)
    except RecursionError:
        raise DataError(f"{folder}: folders nested too deep to read (hundreds of levels)") from None
    return found


def _loose_images(folder: Path) -> list[Path]:
    """Images lying directly in `folder` (the root or a split's folder): outside any class folder they have no
    label, so they are not read."""
    return sorted(p for p in folder.iterdir()
                  if not _hidden(p.name) and p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def _holds(images: int) -> str:
    return f"holds {images} image{'' if images == 1 else 's'} but " if images else "holds "


def _class_folders(folder: Path) -> list[Path]:
    return [c for c in folder.iterdir() if c.is_dir() and not _hidden(c.name)]


def import_imagefolder(path: str | Path) -> RawImages:
    """root/<class>/<image>; or root/train/<class>/… + root/test/<class>/… for an official split."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder root is not a directory")
    real_root = resolved(root)
    parts = [("train", root / "train"), ("test", root / "test")]
    has_split = all(p.is_dir() for _, p in parts)
    one = [name for name, p in parts if p.is_dir()]
    if len(one) == 1:  # its classes would be taken for a single class named after the split
        raise DataError(f"{root}: has {one[0]}/ but no {'test' if one[0] == 'train' else 'train'}/: an official "
                        "split needs both (root/train/<class>/…, root/test/<class>/…); or put the class folders "
                        "directly under the root")
    if not has_split:
        parts = [("", root)]
    else:  # a class folder beside train/ and test/ is in neither split: its images would be dropped unsaid
        beside = sorted(p.name for p in root.iterdir()
                        if p.is_dir() and p.name not in ("train", "test") and not p.name.startswith("."))
        if beside:
            raise DataError(f"{root}: holds {', '.join(beside)} beside train/ and test/; with an official split "
                            "every class folder goes under train/ or test/")
    for _, base in parts:
        inside_root(base, real_root)
    loose = _loose_images(root) + [f for _, base in parts if has_split for f in _loose_images(base)]
    for _, base in parts if has_split else []:
        if not _class_folders(base):  # was "root: no class folders found", though the root has two folders
            raise DataError(f"{base}: {_holds(sum(f.parent == base for f in loose))}no class folders; an official "
                            "split (train/, test/) holds one folder per class")
    classes = sorted({_utf8(c, root).name for _, p in parts for c in _class_folders(p)})
    disjoint_folders = None
    if has_split:  # the official split is then neither heldout (the same classes) nor disjoint: said, not guessed
        train, test = ({c.name for c in _class_folders(p)} for _, p in parts)
        if not train & test:  # a class-disjoint split: disjoint_by auto takes it (it took the first half of the names)
            disjoint_folders = train
        elif train != test:
            log.warning("%s: train/ and test/ share %d class(es), but %s only in test/ and %s only in train/: a "
                        "held-out protocol tests on the training classes", root, len(train & test),
                        sorted(test - train)[:5] or "none", sorted(train - test)[:5] or "none")
    if not classes:
        raise DataError(f"{root}: {_holds(len(loose))}no class folders; an ImageFolder holds one folder per "
                        "class (root/<class>/<image>)")
    alike: dict[str, list[str]] = {}
    for c in classes:  # "café" typed on two systems, composed and decomposed; "c0" and "c0 ": classes that print alike
        alike.setdefault(unicodedata.normalize("NFC", c).strip(), []).append(c)
    twins = next((names for names in alike.values() if len(names) > 1), None)
    if twins:
        raise DataError(f"{root}: class folders {', '.join(ascii(t) for t in twins)} differ only in Unicode "
                        "normalisation (accents composed or decomposed) or in spaces at their ends: one class under "
                        "two names? merge or rename them")
    for _, base in parts:  # `c3 -> .`, `c3 -> c0/sub`: one folder's images under two classes
        reals = {c: resolved(base / c) for c in classes if (base / c).is_dir()}
        for c, real in reals.items():
            if real == real_root or real in real_root.parents:
                raise DataError(f"{base / c}: a link to the ImageFolder root or a folder above it: every image "
                                "would be read again as this class; remove the link")
            other = next((o for o, r in reals.items() if o != c and (r == real or r in real.parents)), None)
            if other is not None:  # `c -> a`: a is met first, and was named as the link
                link, into = (other, c) if reals[other] == real and (base / other).is_symlink() else (c, other)
                raise DataError(f"{base / link}: a link into the class folder {into}: its images would be read under "
                                "two classes; remove the link")
    index = {c: i for i, c in enumerate(classes)}
    ids, labels, images, split, skipped = [], [], [], [], []
    read_as: dict[tuple[int, int], tuple[str, str, str]] = {}  # (device, inode) → (split, class, id) of its image
    for part, base in parts:
        for cls in classes:
            folder = base / cls
            if not folder.is_dir():
                continue
            inside_root(folder, real_root)
            for f in _files_under(folder, real_root):  # subfolders too, as torchvision's ImageFolder reads them
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    skipped.append(f.relative_to(root).as_posix())
                    continue
                if not f.is_file():  # a pipe or device named like an image: reading it could block
                    raise DataError(f"{f}: not a regular file")
                inside_root(_utf8(f, root), real_root)
                rel = f.relative_to(root).as_posix()
                st = f.stat()  # a hard link is the same file under another name: one image, two labels or splits
                first = read_as.setdefault((st.st_dev, st.st_ino), (part, cls, rel))
                if first[:2] != (part, cls):  # one name reached through a linked folder (test/a -> ../train/a)?
                    how = "linked" if resolved(f) == resolved(root / first[2]) else "hard-linked"
                    raise DataError(f"{root}: {rel} and {first[2]} are one file ({how}): its image would be "
                                    "read under two classes or in two splits; keep one of them")
                images.append(to_png(read_image_file(f), f))
                ids.append(rel)
                labels.append(index[cls])
                split.append(part)
    if loose:
        log.warning("%s: skipped %d image(s) lying outside any class folder (no class to label them): %s%s", root,
                    len(loose), ", ".join(f.relative_to(root).as_posix() for f in loose[:3]),
                    " …" if len(loose) > 3 else "")
    if skipped:
        log.warning("%s: skipped %d file(s) whose suffix is not an image's %s: %s%s", root, len(skipped),
                    sorted(IMAGE_SUFFIXES), ", ".join(skipped[:3]), " …" if len(skipped) > 3 else "")
    if not ids:
        raise DataError(f"{root}: no images found under the class folders")
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    empty = [c for c, n in zip(classes, counts, strict=True) if n == 0]
    if empty:  # a class without images still takes a label, and the classifier a row no image trains
        raise DataError(f"{root}: class folder(s) {', '.join(empty[:5])} hold no images (of suffixes "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}); remove them or add images")
    if single := [c for c, n in zip(classes, counts, strict=True) if n == 1]:
        # kept: the heldout protocol puts it in train; as a test image it is a lone query (see metrics.py).
        # One line for all (297 such classes gave 297 lines)
        log.warning("%s: %d class(es) have a single image (%s%s); such an image cannot be both query and gallery",
                    root, len(single), ", ".join(repr(c) for c in single[:3]), ", …" if len(single) > 3 else "")
    class_split = ["train" if c in disjoint_folders else "test" for c in classes] if disjoint_folders else None
    return RawImages(ids, np.asarray(labels), classes, images, split if has_split else None, class_split)
