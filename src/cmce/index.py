"""FAISS index over the gallery embeddings, saved as a directory with an id map and version metadata.

Layout: index.faiss (inner product over unit vectors = cosine), ids.parquet (id, label, uncertainty of
each indexed item, row = FAISS id), rejected.parquet (ids left out as too uncertain), meta.json
(query model, index type with its build and search parameters, counts, sha256 of the other files).
Written to a temporary directory and swapped in whole.

Index types: "flat" (exact IndexFlatIP), "ivfpq" (IVF-PQ whose candidates are re-ranked with exact inner
products: faiss IndexRefineFlat), "hnsw" (HNSW graph over the full vectors), and "auto": flat below
`auto_threshold` indexed items, ivfpq from there on (exact search is cheap below ~100k items, and IVF-PQ
needs enough points to train its lists and codebooks). The search parameters (nprobe, k_factor, efSearch)
are stored in meta.json and set again on load, so a loaded index searches the way it was benchmarked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cmce import provenance, s3, strict_json
from cmce.config import HnswConfig, IndexConfig, IvfPqConfig, in_interval, range_of
from cmce.errors import last_line
from cmce.method import normalize, rejected_count, rejection_mask
from cmce.provenance import SHA256
from cmce.storage import (
    TooLarge,
    atomic_dir,
    check_replaceable,
    file_sha256,
    forget_download,
    local_input,
    read_regular,
    restore_dir,
    swap_lock,
)
from cmce.tables import (
    TableError,
    check_rows_are_split,
    check_unique_ids,
    checked_uncertainty,
    embedding_column,
    float_column,
    int_column,
    read_snapshot,
    require_whole,
    shown_id,
    string_column,
    writer_options,
)

log = logging.getLogger(__name__)
INDEX_FORMAT = "cmce-index/1"
INDEX_FILES = ("index.faiss", "ids.parquet", "rejected.parquet", "meta.json")  # what build_index writes
MAX_META_BYTES = 64 << 20  # a meta.json names a few files and members: kilobytes
INDEX_TYPES = ("flat", "ivfpq", "hnsw", "auto")
MIN_POINTS_PER_LIST = 39  # below this many training points per inverted list faiss warns that k-means is unreliable
DEFAULT_TRAIN_SIZE = 65536


class IndexLoadError(ValueError):
    """The index is missing, corrupt, or was built for another query model."""


class IndexInFlux(IndexLoadError):
    """Its meta.json names files of another build: on S3, a replacement being committed."""


S3_READ_TRIES = 3  # an s3:// index read while build-index commits its replacement (a few seconds) is read again


@dataclass
class BuiltIndex:
    """An in-memory index over unit vectors (row = FAISS id) and what meta.json records about it."""

    index: Any
    index_type: str  # the type built ("auto" resolved)
    params: dict[str, Any]  # build parameters, faiss factory string included
    search_params: dict[str, int]  # set again by load_index
    notes: list[str]  # fallbacks and clamps, also logged


def check_index_type(index_type: str) -> None:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}; valid types: {list(INDEX_TYPES)}")


def resolve_index_type(index_type: str, n: int, auto_threshold: int) -> str:
    """The concrete type for `n` indexed items: "auto" is flat below `auto_threshold`, ivfpq from it on."""
    check_index_type(index_type)
    if index_type != "auto":
        return index_type
    return "flat" if n < auto_threshold else "ivfpq"


def default_nlist(n: int) -> int:
    """4·sqrt(n) rounded to the nearest power of two (4096 lists at 1M items)."""
    return 2 ** max(0, round(np.log2(4 * np.sqrt(max(n, 1)))))


def default_pq_m(dim: int) -> int:
    """The largest divisor of `dim` not above dim/4: sub-quantisers of about 4 dimensions each."""
    return max(m for m in range(1, max(dim // 4, 1) + 1) if dim % m == 0)


def make_index(emb: np.ndarray, index_type: str = "flat", options: IndexConfig | None = None) -> BuiltIndex:
    """Train and fill an index of `index_type` over unit vectors `emb` (inner product = cosine)."""
    options = options or IndexConfig()
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    kind = resolve_index_type(index_type, n, options.auto_threshold)
    params: dict[str, Any] = {"requested_type": index_type}
    if index_type == "auto":
        params["auto_threshold"] = options.auto_threshold
    notes: list[str] = []
    if kind == "ivfpq":
        built = _ivfpq(emb, options.ivfpq, params, notes)
        if built is not None:
            return built
        kind = "flat"
    if kind == "hnsw":
        return _hnsw(emb, options.hnsw, params, notes)
    index = faiss.IndexFlatIP(dim)
    index.add(emb)
    return BuiltIndex(index, "flat", {**params, "factory": "Flat"}, {}, notes)


def _note(notes: list[str], message: str) -> None:
    log.warning("index: %s", message)
    notes.append(message)


def check_index_fits(options: IndexConfig, dim: int, rows: int | None = None) -> None:
    """Before any work: refuse index settings that cannot index `dim`-d embeddings (of a gallery of `rows`: an `auto`
    index is checked as ivfpq when what rejection leaves of them reaches auto_threshold). A step that writes a
    gallery and then its index (add-gallery-model, upgrade-query-model) had replaced the gallery when they failed."""
    indexed = None if rows is None else rows - rejected_count(rows, options.reject_fraction)
    may_be_ivfpq = options.type == "ivfpq" or (options.type == "auto" and indexed is not None
                                               and indexed >= options.auto_threshold)
    if may_be_ivfpq and options.ivfpq.m:
        _check_pq_m(options.ivfpq.m, dim)


def _check_pq_m(m: int, dim: int) -> None:
    if dim % m:
        raise ValueError(f"index.ivfpq.m={m} must divide the embedding dimension {dim}")


def _ivfpq(emb: np.ndarray, opt: IvfPqConfig, params: dict[str, Any], notes: list[str]) -> BuiltIndex | None:
    """IVF-PQ + exact re-ranking, or None (with a note) when the gallery is too small to train codebooks."""
    n, dim = emb.shape
    m = opt.m or default_pq_m(dim)
    _check_pq_m(m, dim)
    nlist_wanted = opt.nlist or default_nlist(n)
    n_train = min(n, opt.train_size or max(DEFAULT_TRAIN_SIZE, MIN_POINTS_PER_LIST * nlist_wanted))
    if n_train < 2 ** opt.nbits:
        given = f"the gallery has {n}" if n_train == n else f"index.ivfpq.train_size={opt.train_size} gives {n_train}"
        _note(notes, f"ivfpq needs at least {2 ** opt.nbits} training points for {opt.nbits}-bit PQ codebooks, "
                     f"{given}: built an exact flat index instead")
        return None
    nlist = min(nlist_wanted, max(1, n_train // MIN_POINTS_PER_LIST))
    if nlist < nlist_wanted:
        _note(notes, f"ivfpq nlist clamped from {nlist_wanted} to {nlist}: {n_train} training points, "
                     f"faiss wants at least {MIN_POINTS_PER_LIST} per list")
    if n_train < MIN_POINTS_PER_LIST * 2 ** opt.nbits:
        _note(notes, f"ivfpq PQ codebooks of {2 ** opt.nbits} centroids trained on {n_train} points, faiss advises at "
                     f"least {MIN_POINTS_PER_LIST * 2 ** opt.nbits}: candidates may be missed (scores stay exact)")
    nprobe = min(opt.nprobe, nlist)
    # "np": no polysemous training, which only serves Hamming-filtered search and costs most of the training time
    factory = f"IVF{nlist},PQ{m}x{opt.nbits}np,Refine(Flat)"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(index.base_index)
    # faiss printed its own advice to stderr once per k-means (8 lines for one build); the notes above say it once.
    # The setting only decides that warning: the clustering is the same
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1
    sample = emb
    if n_train < n:
        rows = np.sort(np.random.default_rng(opt.seed).choice(n, n_train, replace=False))
        sample = emb[rows]
    index.train(sample)
    index.add(emb)
    params.update(factory=factory, nlist=nlist, nlist_requested=nlist_wanted, m=m, nbits=opt.nbits,
                  train_points=n_train, seed=opt.seed)
    search_params = {"nprobe": nprobe, "k_factor": opt.k_factor}
    set_search_params(index, search_params)
    return BuiltIndex(index, "ivfpq", params, search_params, notes)


def _hnsw(emb: np.ndarray, opt: HnswConfig, params: dict[str, Any], notes: list[str]) -> BuiltIndex:
    factory = f"HNSW{opt.m},Flat"
    index = faiss.index_factory(emb.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = opt.ef_construction
    index.add(emb)
    params.update(factory=factory, m=opt.m, ef_construction=opt.ef_construction)
    search_params = {"ef_search": opt.ef_search}
    set_search_params(index, search_params)
    return BuiltIndex(index, "hnsw", params, search_params, notes)


def index_type_of(index: Any) -> str | None:
    """The type of an index read from disk, by its faiss class (None: no type cmce builds)."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlatIP):
        return "flat"
    if isinstance(index, faiss.IndexHNSWFlat):
        return "hnsw"
    if isinstance(index, faiss.IndexRefineFlat) and isinstance(faiss.downcast_index(index.base_index),
                                                                 faiss.IndexIVFPQ):
        return "ivfpq"
    return None


def check_parts(index: Any, where: str) -> None:
    """The indexes inside an HNSW or IVF-PQ index score by inner product too, and hold what it holds: an HNSW index
    whose flat storage was set to L2 (its own metric left inner product) answered other neighbours, exit 0."""
    top = faiss.downcast_index(index)
    parts: list[tuple[str, Any, bool]] = []  # name, index, holds every vector
    if isinstance(top, faiss.IndexHNSWFlat):
        parts = [("storage", top.storage, True)]
    elif isinstance(top, faiss.IndexRefineFlat):
        base = faiss.downcast_index(top.base_index)
        parts = [("base_index", base, True), ("refine_index", top.refine_index, True),
                 ("base_index.quantizer", base.quantizer, False)]
    for name, part, whole in parts:
        if part.metric_type != faiss.METRIC_INNER_PRODUCT or (whole and part.ntotal != index.ntotal):
            metric = {faiss.METRIC_INNER_PRODUCT: "inner products", faiss.METRIC_L2: "L2"}.get(
                part.metric_type, f"faiss metric {part.metric_type}")
            raise IndexLoadError(f"{where}: its {name} holds {part.ntotal} vectors scored by {metric}, the index "
                                 f"{index.ntotal} by inner products: an edited file; build the index again")


# each search parameter's valid values, as its config key declares them (an edited meta.json's k_factor 0 failed a
# faiss assertion at the first search, with a traceback; ef_search 0 was used as given)
SEARCH_PARAMS = {"nprobe": (IvfPqConfig, "nprobe"), "k_factor": (IvfPqConfig, "k_factor"),
                 "ef_search": (HnswConfig, "ef_search")}


def set_search_params(index: Any, search_params: dict[str, int]) -> None:
    """Apply stored search parameters (nprobe, k_factor, ef_search) to an index read from disk."""
    index = faiss.downcast_index(index)
    if "nprobe" in search_params:
        faiss.extract_index_ivf(index).nprobe = int(search_params["nprobe"])
    if "k_factor" in search_params:
        index.k_factor = float(search_params["k_factor"])  # a float in faiss's IndexRefine
    if "ef_search" in search_params:
        index.hnsw.efSearch = int(search_params["ef_search"])


def build_index(gallery_path: str | Path, out_dir: str | Path, reject_fraction: float | None = None,
                index_type: str | None = None, options: IndexConfig | None = None) -> Path:
    """Index a gallery file. `options` (the config's `index` section, checked when it was loaded) gives the type,
    the rejected fraction and each type's parameters; `reject_fraction` and `index_type`, when given, override
    its values."""
    options = options or IndexConfig()
    index_type = options.type if index_type is None else index_type
    reject_fraction = options.reject_fraction if reject_fraction is None else reject_fraction
    check_index_type(index_type)  # the fraction's range is the config's to check (cmce.config)
    check_replaceable(out_dir, INDEX_FILES)  # before the work, not only when swapping the result in
    gallery_path = Path(gallery_path)
    # metadata, rows and hash of one version of the gallery, even if it is replaced while this runs
    meta, table, gallery_sha256 = read_snapshot(gallery_path, ["id", "label", "embedding", "uncertainty"], "gallery",
                                                optional=["ensemble_sum", "n_models"])
    require_whole(meta, gallery_path, "build-index")
    n_members = len(meta.get("members", []))
    if reject_fraction > 0 and n_members < 2:
        # one member's uncertainty is 0 everywhere: "the most uncertain" would be the first rows on file
        raise TableError(f"{gallery_path}: {n_members} gallery member(s); rejecting by uncertainty needs at least 2")
    if table.num_rows == 0:
        raise TableError(f"{gallery_path}: the gallery has no rows: nothing to index")
    emb = normalize(embedding_column(table, "embedding", str(gallery_path)), f"{gallery_path}: column 'embedding'")
    ids = string_column(table, "id", str(gallery_path))
    check_unique_ids(ids, str(gallery_path))
    labels = int_column(table, "label", str(gallery_path))
    if meta.get("source"):
        check_rows_are_split(ids, meta["source"], str(gallery_path), f"the '{meta['split']}' split it records", labels)
    unc = checked_uncertainty(table, n_members, str(gallery_path))
    reject = rejection_mask(unc, reject_fraction)
    keep = ~reject
    built = make_index(emb[keep], index_type, options)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, INDEX_FILES) as tmp:
        _write_faiss(built.index, tmp / "index.faiss", out_dir)
        kept = np.flatnonzero(keep)
        rej = np.flatnonzero(reject)
        for name, table in (
            ("ids.parquet", pa.table({"id": [ids[i] for i in kept], "label": labels[keep].astype(np.int32),
                                      "uncertainty": unc[keep]})),
            ("rejected.parquet", pa.table({"id": pa.array([ids[i] for i in rej], pa.string()),
                                           "uncertainty": pa.array(unc[reject], pa.float32())})),
        ):
            pq.write_table(table, tmp / name, **writer_options(table.schema))
        info = {
            "format": INDEX_FORMAT,
            "index_type": built.index_type,
            "index_params": built.params,
            "search_params": built.search_params,
            "notes": built.notes,
            "faiss_version": faiss.__version__,
            "metric": "inner_product_on_unit_vectors",
            "dim": int(emb.shape[1]),
            "n_indexed": int(keep.sum()),
            "n_rejected": int(reject.sum()),
            "reject_fraction": reject_fraction,
            "query_model_sha256": meta["query_model_sha256"],
            "members": meta.get("members", []),
            "gallery_sha256": gallery_sha256,
            **({"source": meta["source"], "split": meta["split"]} if meta.get("source") else {}),
            "files": {f: file_sha256(tmp / f) for f in ("index.faiss", "ids.parquet", "rejected.parquet")},
            "sizes": {f: (tmp / f).stat().st_size for f in ("index.faiss", "ids.parquet", "rejected.parquet")},
        }
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    log.info("built %s index at %s (%s, search %s): %d indexed, %d rejected", built.index_type, out_dir,
             built.params["factory"], built.search_params or "exact", keep.sum(), reject.sum())
    return out_dir


def _write_faiss(index: Any, path: Path, out_dir: Path) -> None:
    """faiss's own file writer reports a failed close only on stderr (`close error: File too large` under a file
    size limit) and returns: the index was published cut short, exit 0, meta.json holding the cut file's hash.
    Its bytes go through a Python file instead, whose every failed write raises (an OSError, told as the output's)."""
    try:
        with open(path, "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
    except RuntimeError as err:  # faiss's own refusal
        raise OSError(f"{out_dir}: could not write the index: {last_line(err)}") from None


def check_files(d: Path, meta: dict, shown: str, error: type[Exception] = ValueError) -> None:
    """Every file meta.json names is in `d` and matches its checksum; else `error` naming the first that is not.
    A size meta.json records (indexes built since it does) is compared first: a 20 GB sparse index.faiss was
    hashed whole before it was refused (72 s)."""
    sizes = meta.get("sizes") if isinstance(meta.get("sizes"), dict) else {}
    for name in meta["files"]:  # every size before any hash
        size = sizes.get(name)
        with contextlib.suppress(OSError):  # a file that cannot be read is named below
            if type(size) is int and (d / name).is_file() and (actual := (d / name).stat().st_size) != size:
                raise error(f"{shown}/{name}: missing, not a regular file, or does not match the checksum in "
                            f"meta.json (its size is {actual:,} bytes, meta.json records {size:,})")
    for name, digest in meta["files"].items():
        try:
            if (d / name).is_file() and file_sha256(d / name) == digest:  # is_file: a pipe would block the read
                continue
        except OSError as err:  # a link to /proc/self/mem: `[Errno 5] Input/output error`, naming no file
            raise error(f"{shown}/{name}: unreadable ({err.strerror or err})") from None
        raise error(f"{shown}/{name}: missing, not a regular file, or does not match the checksum in meta.json")


@dataclass
class LoadedIndex:
    index: Any
    ids: list[str]
    labels: np.ndarray
    uncertainty: np.ndarray
    meta: dict[str, Any]


# meta.json's keys that cmce reads, and their JSON types
META_TYPES: dict[str, tuple[type, ...]] = {
    "query_model_sha256": (str,), "dim": (int,), "n_indexed": (int,), "index_type": (str,),
    "gallery_sha256": (str, type(None)), "search_params": (dict,), "members": (list,), "source": (dict,),
    "split": (str,),
}
JSON_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list", type(None): "null"}


def load_index(index_dir: str | Path, query_sha256: str | None = None, gallery_sha256: str | None = None,
               query_dim: int | None = None) -> LoadedIndex:
    """Load and verify an index (a folder, or an s3:// prefix); refuse it when it was built for another
    query model (or holds vectors of another dimension than its `query_dim`), or (`gallery_sha256` given) from
    another version of the gallery file. meta.json is written
    last (renamed in locally, uploaded after every other file on S3), so a folder or prefix without it is an
    unfinished build or upload."""
    if s3.is_s3(index_dir):
        for _ in range(S3_READ_TRIES - 1):
            try:
                return _load_index(index_dir, query_sha256, gallery_sha256, query_dim)
            except IndexInFlux as err:
                log.info("%s; reading it again", err)
                forget_download(str(index_dir))
                time.sleep(1)
        try:
            return _load_index(index_dir, query_sha256, gallery_sha256, query_dim)
        except IndexInFlux as err:  # 4 of 4 reads beside a writer were refused, each naming a file as damaged
            raise IndexLoadError(f"{err} (read {S3_READ_TRIES} times: is a build-index replacing it?)") from None
    with swap_lock(index_dir, exclusive=False):  # every file from one version, even during a rebuild
        restore_dir(Path(index_dir), INDEX_FILES)  # a rebuild killed mid-swap leaves the previous index as .<name>.old
        return _load_index(index_dir, query_sha256, gallery_sha256, query_dim)


def index_folder(index_dir: str | Path, probe_object: bool = False) -> Path:
    """The local folder of an index: the folder itself, or an s3:// prefix downloaded by its meta.json (only the
    files it names). A prefix without meta.json is refused before anything is downloaded (a bucket root given as
    --index was downloaded whole), and a file (the index's meta.json, say) as a file, not as an index without one;
    on S3, where telling an object from a prefix costs a request, when `probe_object` asks (a command's --index)."""
    shown = str(index_dir).rstrip("/")
    is_file = IndexLoadError(f"{shown}: is a file; an index is the folder holding meta.json")
    unfinished = IndexLoadError(f"{shown}: not a complete index (no meta.json): not an index, or its build or "
                                f"upload did not finish; build it again")
    if not s3.is_s3(index_dir) and Path(index_dir).is_file():
        raise is_file
    if probe_object and s3.is_s3(index_dir) and not str(index_dir).endswith("/"):
        with contextlib.suppress(FileNotFoundError):  # neither object nor prefix: the marker check names it
            if s3.kind(str(index_dir)) == "file":
                raise is_file
    try:  # on S3: refused from the one listing, before downloading what an unfinished upload left
        d = local_input(index_dir, marker="meta.json")
    except s3.MarkerMissing:
        raise unfinished from None
    if not (d / "meta.json").exists():
        raise unfinished
    return d


def check_handed_on(meta: dict, shown: str) -> None:
    """meta.json's fields that are handed on (into versions.json, /version, the dataset check) are of their shape:
    a NaN reject_fraction went into versions.json as invalid JSON, `members: [1, 2]` into /version, an unknown
    split was reported as another dataset."""
    from cmce.data.readers import SPLITS

    fraction = meta.get("reject_fraction")
    if "reject_fraction" in meta and not (type(fraction) in (int, float) and 0 <= fraction < 1):  # NaN fails too
        raise IndexLoadError(f"{shown}/meta.json: reject_fraction is {json.dumps(fraction)[:40]}, expected a number "
                             "in [0, 1)")
    try:
        for i, member in enumerate(meta.get("members", [])):
            provenance.check_field(member, provenance.MEMBER, f"members[{i}]", f"{shown}/meta.json")
        if "source" in meta:
            provenance.check_field(meta["source"], provenance.SOURCE, "source", f"{shown}/meta.json")
    except provenance.MetadataError as err:
        raise IndexLoadError(str(err)) from None
    if "split" in meta and meta["split"] not in SPLITS:
        raise IndexLoadError(f"{shown}/meta.json: split is {json.dumps(meta['split'])[:40]}, expected one of "
                             f"{list(SPLITS)}")


def _load_index(index_dir: str | Path, query_sha256: str | None, gallery_sha256: str | None,
                query_dim: int | None = None) -> LoadedIndex:
    shown = str(index_dir).rstrip("/")
    d = index_folder(index_dir)
    meta_path = d / "meta.json"
    try:
        meta = strict_json.loads(read_regular(meta_path, MAX_META_BYTES))
    except TooLarge as err:
        raise IndexLoadError(f"{shown}/meta.json: {err}") from None
    except strict_json.DuplicateKeyError as err:  # the last value was read: a hand edit, or two merged
        raise IndexLoadError(f"{shown}/meta.json: {err}; give it once") from None
    except ValueError as err:  # not JSON, not UTF-8, or nested too deeply
        raise IndexLoadError(f"{shown}/meta.json: not valid JSON: {err}") from None
    except OSError as err:
        raise IndexLoadError(f"{shown}/meta.json: {err.strerror or err}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if fmt != INDEX_FORMAT:
        raise IndexLoadError(f"{shown}/meta.json: unknown index format {fmt!r}")
    missing = [key for key in ("query_model_sha256", "files", "dim") if key not in meta]
    if missing or not isinstance(meta["files"], dict):
        raise IndexLoadError(f"{shown}/meta.json: lacks key(s) {missing or ['files']} of an index's metadata")
    for key, kinds in META_TYPES.items():  # "485" for 485 was reported as files of different builds
        if key in meta and not (isinstance(meta[key], kinds) and not isinstance(meta[key], bool)):
            raise IndexLoadError(f"{shown}/meta.json: {key} is {json.dumps(meta[key])[:40]}, expected "
                                 f"{' or '.join(JSON_NAMES[k] for k in kinds)}")
    check_handed_on(meta, shown)
    for key, value in meta.get("search_params", {}).items():
        if key not in SEARCH_PARAMS:
            raise IndexLoadError(f"{shown}/meta.json: search_params.{key}: unknown (valid: {sorted(SEARCH_PARAMS)})")
        if type(value) is not int or not in_interval(value, range_of(*SEARCH_PARAMS[key])):
            raise IndexLoadError(f"{shown}/meta.json: search_params.{key} is {json.dumps(value)[:40]}, expected an "
                                 f"integer in {range_of(*SEARCH_PARAMS[key])}")
    for key in ("query_model_sha256", "gallery_sha256"):  # a cut one was compared by its first 12 digits only:
        if key in meta and not SHA256.fullmatch(str(meta[key]).lower()):  # "built for 92195e9e8b60, given 92195e9e8b60"
            raise IndexLoadError(f"{shown}/meta.json: {key} is {json.dumps(meta[key])[:80]}, not a sha256 "
                                 "(64 hex digits)")
    own = sorted(f for f in INDEX_FILES if f != "meta.json")
    if sorted(meta["files"]) != own:  # names, never paths: nothing outside the folder is read
        raise IndexLoadError(f"{shown}/meta.json: 'files' must name exactly {own}, got {sorted(meta['files'])}")
    if query_sha256 is not None and str(meta["query_model_sha256"]).lower() != query_sha256.lower():
        raise IndexLoadError(
            f"{shown}: index was built for query model {meta['query_model_sha256'][:12]}, "
            f"but query model {query_sha256[:12]} was given; rebuild the index or use the matching query model"
        )
    if query_dim is not None and meta["dim"] != query_dim:  # the right model's sha256 over a gallery cut to 31 values
        raise IndexLoadError(f"{shown}: holds {meta['dim']}-dimensional vectors, but its query model "
                             f"{str(meta['query_model_sha256'])[:12]} embeds {query_dim} dimensions; rebuild the index")
    if gallery_sha256 is not None and str(meta.get("gallery_sha256")).lower() != gallery_sha256.lower():
        raise IndexLoadError(f"{shown}: index was built from gallery version {str(meta.get('gallery_sha256'))[:12]}, "
                             f"not from the given gallery {gallery_sha256[:12]}; rebuild the index from it")
    check_files(d, meta, shown, IndexInFlux if s3.is_s3(index_dir) else IndexLoadError)
    where = f"{shown}/ids.parquet"
    try:
        table = pq.read_table(d / "ids.parquet", page_checksum_verification=True)
        ids, labels = string_column(table, "id", where), int_column(table, "label", where)
        uncertainty = float_column(table, "uncertainty", where)
    except (pa.ArrowException, OSError) as err:
        raise IndexLoadError(f"{where}: not an index's id table: {err}") from None
    check_unique_ids(ids, where)
    try:
        index = read_faiss(d / "index.faiss")
    except RuntimeError as err:
        raise IndexLoadError(f"{shown}/index.faiss: not a readable faiss index: "
                             f"{last_line(err)}") from None
    # the files are each as written, but were they written together? (meta.json can be rewritten consistently)
    if not (index.ntotal == len(ids) == meta.get("n_indexed", len(ids)) and index.d == meta["dim"]):
        raise IndexLoadError(f"{shown}: index.faiss holds {index.ntotal} vectors of dimension {index.d}, ids.parquet "
                             f"{len(ids)} rows, meta.json n_indexed {meta.get('n_indexed')} and dim {meta['dim']}: "
                             "files of different builds; build the index again")
    kind, recorded = index_type_of(index), meta.get("index_type", "flat")  # absent before index types: flat
    if kind != recorded or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        found = kind or type(faiss.downcast_index(index)).__name__
        raise IndexLoadError(f"{shown}: index.faiss is a {found} index over "
                             f"{'inner products' if index.metric_type == faiss.METRIC_INNER_PRODUCT else 'L2'}, "
                             f"meta.json records index_type {recorded!r} over inner products; build the index again")
    check_parts(index, f"{shown}/index.faiss")
    check_unit_vectors(index, ids, f"{shown}/index.faiss")
    if kind == "ivfpq":
        check_inverted_lists(index, f"{shown}/index.faiss")
    check_rejected(d / "rejected.parquet", f"{shown}/rejected.parquet", ids, uncertainty, meta.get("n_rejected"))
    try:  # absent in indexes built before index types
        set_search_params(index, meta.get("search_params", {}))
    except (AttributeError, OverflowError, RuntimeError, TypeError, ValueError) as err:  # not for this index type
        raise IndexLoadError(f"{shown}/meta.json: search_params {meta.get('search_params')} do not apply to "
                             f"this {meta.get('index_type', 'flat')} index: {err}") from None
    return LoadedIndex(index=index, ids=ids, labels=labels.astype(np.int64), uncertainty=uncertainty, meta=meta)


_READ_LOCK = threading.Lock()  # faiss's limit below is process-wide: one read at a time sets it


def read_faiss(path: Path) -> Any:
    """faiss.read_index, with no vector it reads longer than the file, nor more items in a loop (inverted lists) than
    the file has bytes: a 69 KB file whose header claimed 4 GB of codes had faiss allocate them (an edited HNSW file:
    17 GB; an IVF-PQ file claiming 2e7 lists, 3.5 GB) before finding the bytes missing. The flag skips faiss's check
    of an L2-only precomputed table (never built for inner product), whose size is not the file's."""
    size = path.stat().st_size
    with _READ_LOCK:
        before = faiss.get_deserialization_vector_byte_limit(), faiss.get_deserialization_loop_limit()
        faiss.set_deserialization_vector_byte_limit(size)
        faiss.set_deserialization_loop_limit(size)
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
        except RuntimeError as err:
            if "deserialization_" in str(err):  # faiss names the limit its assertion checked
                raise RuntimeError("it declares more than the file can hold (a damaged or edited header)") from None
            raise
        finally:
            faiss.set_deserialization_vector_byte_limit(before[0])
            faiss.set_deserialization_loop_limit(before[1])


# build_index stores float32 unit vectors, whose norms differ from 1 by rounding only (about sqrt(dim)·6e-8,
# under 1e-5 at 4096 dimensions); 1e-3 leaves room for that and bounds a rescaled vector's score error to 0.1%
NORM_TOLERANCE = 1e-3


def stored_vectors(index: Any) -> np.ndarray:
    """The exact vectors an index of a type cmce builds holds, as a view of faiss's memory (no copy; valid while
    `index` lives): the IndexFlat itself, HNSW's flat storage, or IVF-PQ's refinement IndexFlat (its PQ codes are
    lossy, but every search re-ranks with these exact vectors, so they are the ones that must be unit vectors)."""
    top = faiss.downcast_index(index)
    flat = top if isinstance(top, faiss.IndexFlat) else faiss.downcast_index(
        top.storage if isinstance(top, faiss.IndexHNSWFlat) else top.refine_index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)


def check_index_rows(index: LoadedIndex, ids: list[str], labels: np.ndarray, embeddings: np.ndarray,
                     gallery: Path, index_dir: Path) -> None:
    """The index's ids, labels and vectors are the gallery's (`ids`, `labels`, `embeddings`), in the gallery's order,
    less the rejected: build-index writes them so. ids.parquet's rows shuffled, or its labels changed, or two of
    index.faiss's vectors swapped (the checksums rewritten to match), answered queries with another item's id or
    class, exit 0."""
    indexed = set(index.ids)
    keep = [k for k, i in enumerate(ids) if i in indexed]
    expected = [ids[k] for k in keep]
    if expected != index.ids:
        row = next((k for k, (a, b) in enumerate(zip(expected, index.ids, strict=False)) if a != b), len(expected))
        found = index.ids[row] if row < len(index.ids) else "nothing"
        raise ValueError(f"{index_dir}/ids.parquet: row {row} holds {found!r} where the gallery {gallery} puts "
                         f"{expected[row] if row < len(expected) else 'no item'!r}: its ids are not the gallery's "
                         "(edited or of another build); build the index again")
    given = labels[keep]
    differ = np.flatnonzero(given != index.labels)
    if differ.size:
        row = int(differ[0])
        raise ValueError(f"{index_dir}/ids.parquet: item {shown_id(index.ids[row])} has label {index.labels[row]}, the "
                         f"gallery {gallery} {given[row]} ({differ.size} such item(s)): edited or of another build; "
                         "build the index again")
    # build-index stores normalize(embedding) of the kept rows, so the same function gives the same floats
    off = np.abs(stored_vectors(index.index) - normalize(embeddings[keep], f"{gallery}: column 'embedding'"))
    far = np.flatnonzero(off.max(axis=1, initial=0.0) > VECTOR_TOLERANCE)
    if far.size:
        row = int(far[0])
        raise ValueError(f"{index_dir}/index.faiss: the vector of item {shown_id(index.ids[row])} is not its "
                         f"embedding in the gallery {gallery} ({far.size} such item(s)): edited or of another build; "
                         "build the index again")


VECTOR_TOLERANCE = 1e-6  # the same floats are expected: a swapped or edited vector is off by far more


def check_unit_vectors(index: Any, ids: list[str], where: str) -> None:
    """Scores are cosines only over unit vectors: a vector rescaled on disk (checksums rewritten to match) would
    rank by its length, with scores above 1, and no search would say so."""
    vectors = stored_vectors(index)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))  # `~(<=)`: a NaN norm is bad too
    if bad.size:
        row = int(bad[0])
        raise IndexLoadError(f"{where}: row {row} (id {shown_id(ids[row])}) holds a vector of norm {norms[row]:.6g}, "
                             f"not a unit vector (cosine search); {bad.size} such row(s); build the index again")


def check_inverted_lists(index: Any, where: str) -> None:
    """IVF-PQ as build_index writes it: trained, every item in exactly one inverted list. Edited (checksums rewritten
    to match), an untrained flag failed a faiss assertion at the first search, and list ids out of range failed
    the re-ranking's; ids all 0 answered every query with one item k times."""
    ivf = faiss.extract_index_ivf(index)
    if not (index.is_trained and ivf.is_trained and ivf.quantizer.is_trained):
        raise IndexLoadError(f"{where}: an IVF-PQ index marked untrained; build the index again")
    lists = ivf.invlists
    ids = np.concatenate([np.empty(0, np.int64)] + [
        faiss.rev_swig_ptr(lists.get_ids(i), size).copy() for i in range(lists.nlist) if (size := lists.list_size(i))])
    if not np.array_equal(np.sort(ids), np.arange(index.ntotal)):
        raise IndexLoadError(f"{where}: its inverted lists hold {len(ids)} item numbers, not each of its "
                             f"{index.ntotal} items once; build the index again")


def check_rejected(path: Path, where: str, ids: list[str], uncertainty: np.ndarray, n_rejected: Any) -> None:
    """rejected.parquet as build_index writes it: unique ids, none of them indexed, as many as meta.json counts,
    and (rejection keeps the least uncertain items) none less uncertain than an indexed item."""
    try:
        table = pq.read_table(path, page_checksum_verification=True)
        rejected = string_column(table, "id", where)
        unc = float_column(table, "uncertainty", where) if "uncertainty" in table.column_names else None
    except (pa.ArrowException, OSError) as err:
        raise IndexLoadError(f"{where}: not an index's table of rejected ids: {err}") from None
    check_unique_ids(rejected, where)
    both = set(rejected).intersection(ids)
    if both:
        first = next(i for i in rejected if i in both)
        raise IndexLoadError(f"{where}: id {shown_id(first)} is both rejected and indexed (in ids.parquet); "
                             f"{len(both)} such id(s); build the index again")
    if isinstance(n_rejected, int) and n_rejected != len(rejected):
        raise IndexLoadError(f"{where}: {len(rejected)} rows, meta.json records n_rejected {n_rejected}: files of "
                             "different builds; build the index again")
    if unc is not None and len(unc) and len(uncertainty) and unc.min() < uncertainty.max():
        row = int(np.argmin(unc))
        raise IndexLoadError(f"{where}: id {shown_id(rejected[row])} has uncertainty {unc[row]:.6g}, below indexed "
                             f"items' (up to {uncertainty.max():.6g}); rejection leaves out the most uncertain: build "
                             "the index again")


@dataclass
class SearchResult:
    ids: list[list[str]]
    scores: np.ndarray  # (queries, k)
    uncertainty: np.ndarray  # (queries, k)
    rows: np.ndarray | None = None  # (queries, k) row in ids.parquet of each hit, -1 where none was found


def search(loaded: LoadedIndex, queries: np.ndarray, k: int) -> SearchResult:
    """Top-k cosine search for a batch of query embeddings (normalised here)."""
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != loaded.meta["dim"]:
        raise IndexLoadError(f"query embeddings have shape {q.shape}, the index expects dimension {loaded.meta['dim']}")
    q = normalize(q, "query embeddings")  # refuses rows that are not finite or all zeros
    k = min(k, len(loaded.ids))
    params = None
    hnsw = getattr(faiss.downcast_index(loaded.index), "hnsw", None)
    if hnsw is not None and hnsw.efSearch < k:  # HNSW finds at most efSearch neighbours: widen it for this call
        params = faiss.SearchParametersHNSW()
        params.efSearch = k
    scores, idx = loaded.index.search(np.ascontiguousarray(q), k, params=params)
    # an approximate index may find fewer than k items (id -1): those slots hold no id and NaN scores
    scores = np.where(idx >= 0, scores, np.nan)
    ids = [[loaded.ids[j] for j in row if j >= 0] for row in idx]
    unc = np.where(idx >= 0, loaded.uncertainty[np.clip(idx, 0, None)], np.nan)
    return SearchResult(ids, scores, unc, idx)
