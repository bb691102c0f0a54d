"""The version metadata of cmce's Parquet files (schema key ``cmce``), checked field by field when read.

Steps trust these fields: which models made the embeddings, for which query model, of which split and shard.
A value of the wrong shape (a member without a name, a count for a list, a path for a model name) must be
refused naming the file and the field, not fail later as a KeyError or, worse, be believed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cmce.config import ConfigError, check_model_name, shown

SHA256 = re.compile(r"[0-9a-f]{64}")
SHARD = re.compile(r"(\d+)/(\d+)")
SPLITS = ("train", "test")  # a dataset's splits (a gallery of one is embedded from it)


class MetadataError(ValueError):
    """A field of a file's cmce metadata is missing or of the wrong shape; names the file and the field."""


def _sha256(value: Any) -> str | None:
    return None if isinstance(value, str) and SHA256.fullmatch(value) else "a sha256 hex digest"


def _split(value: Any) -> str | None:
    # any text was taken: build-index wrote `validation` into meta.json, which search then refused
    return None if value in SPLITS else f"one of {list(SPLITS)}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "a non-empty string"


def _name(value: Any) -> str | None:
    try:
        check_model_name(value, "name")
    except ConfigError:
        return "a model name (1-64 letters, digits, '_' or '-')"
    return None


def _shard(value: Any) -> str | None:
    m = SHARD.fullmatch(value) if isinstance(value, str) else None
    return None if m and int(m[1]) < int(m[2]) else "'i/K' with 0 <= i < K"


def _count(value: Any) -> str | None:
    return None if type(value) is int and value >= 0 else "a count (an integer >= 0)"


MODEL = {"name": _name, "arch": _text, "sha256": _sha256}
MEMBER = {**MODEL, "transformation_sha256": _sha256}
SOURCE = {"split_rows": _count, "ids_sha256": _sha256}
# per kind: required fields, optional fields
FIELDS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "gallery": ({"split": _split, "query_model_sha256": _sha256, "members": [MEMBER]},
                {"shard": _shard, "source": SOURCE, "upgraded_from_query_model_sha256": _sha256}),
    "gallery_member": ({"split": _split, "gallery_model": MODEL, "transformation_sha256": _sha256,
                        "query_model_sha256": _sha256}, {"shard": _shard, "source": SOURCE}),
    "train_embeddings": ({"gallery_model": {"name": _name, "sha256": _sha256}, "query_model_sha256": _sha256}, {}),
}


def _check(value: Any, spec: Any, key: str, path: Path) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise MetadataError(f"{path}: metadata field '{key}' must be an object, got {shown(value)}")
        for k, sub in spec.items():
            if k not in value:
                raise MetadataError(f"{path}: metadata field '{key}' lacks '{k}'")
            _check(value[k], sub, f"{key}.{k}", path)
    elif isinstance(spec, list):  # a non-empty list of spec[0]
        if not isinstance(value, list) or not value:
            raise MetadataError(f"{path}: metadata field '{key}' must be a non-empty list, got {shown(value)}")
        for i, item in enumerate(value):
            _check(item, spec[0], f"{key}[{i}]", path)
    else:
        wanted = spec(value)
        if wanted:
            raise MetadataError(f"{path}: metadata field '{key}' must be {wanted}, got {shown(value)}")


def check_field(value: Any, spec: Any, key: str, path: str | Path) -> None:
    """One metadata field of the shape `spec` (MODEL, MEMBER, SOURCE), else a MetadataError naming `key`."""
    _check(value, spec, key, Path(path))


def check_metadata(meta: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """`meta` when every field its kind has is of the right shape (kinds not listed: unchecked)."""
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in FIELDS:  # the caller refuses a kind it does not read
        return meta
    required, optional = FIELDS[kind]
    for key, spec in required.items():
        if key not in meta:
            raise MetadataError(f"{path}: metadata of a {kind} file lacks '{key}'")
        _check(meta[key], spec, key, Path(path))
    for key, spec in optional.items():
        if key in meta:
            _check(meta[key], spec, key, Path(path))
    names = [m["name"] for m in meta.get("members", [])]
    if len(set(names)) != len(names):
        raise MetadataError(f"{path}: metadata field 'members' names a model twice: {names}")
    if twice := repeated_model(meta.get("members", [])):  # one model under two names: weighted twice
        raise MetadataError(f"{path}: metadata field 'members' holds gallery model {twice} twice")
    return meta


def repeated_model(members: list[dict[str, Any]]) -> str | None:
    """"12-digit-sha256 (as 'a' and 'b')" for a gallery model among `members` twice under any names, else None:
    the ensemble would weigh it twice and its uncertainty count it as two models."""
    seen: dict[str, str] = {}
    for m in members:
        sha, name = str(m.get("sha256")), str(m.get("name"))
        if sha in seen:
            return f"{sha[:12]} (as {seen[sha]!r} and {name!r})"
        seen[sha] = name
    return None
