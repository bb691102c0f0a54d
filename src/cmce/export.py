"""The query model for the edge: a query checkpoint exported to ONNX, and the check that onnxruntime
embeds like torch.

The graph takes raw pixels, uint8 N×C×H×W (grey: C = 1, RGB: C = 3; H = W = the model's image size), and
does the uint8 → float scaling of cmce.data.codec.to_float itself, so a phone feeds the decoded image as
it is. It returns the raw embedding (N × embedding_dim, float32, not L2-normalised: the same numbers as
cmce.embed.embed_batch; the index normalises queries). The batch axis is dynamic. metadata_props name the
checkpoint's sha256 (what an index records as query_model_sha256, so a server can check embeddings tagged
with it), the input's shape and the cmce version. onnx and onnxruntime come with the `edge` extra.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import cmce
from cmce.checkpoint import EmbeddingModel, load_embedding_model, require_role
from cmce.data.codec import PREPROCESS, to_float
from cmce.data.readers import iter_split_batches, open_dataset
from cmce.embed import embed_batch
from cmce.errors import first_line
from cmce.method import normalize
from cmce.storage import atomic_path, file_sha256, origin

if TYPE_CHECKING:
    from cmce.index import LoadedIndex

log = logging.getLogger(__name__)

ONNX_FORMAT = "cmce-query-onnx/1"
INPUT_NAME = "images"
OUTPUT_NAME = "embedding"
MAX_ABS_DIFF = 1e-4  # parity bound on the raw embedding, onnxruntime vs torch float32 on the CPU
TOP_K = 10
# pixels per parity batch: 256 images up to 256², fewer above (a 2048² model took 18.8 GB for 256 images on
# the CPU, about 73 MB an image; 2**24 pixels is 4 such images). The batch only sets the memory, not the result
PARITY_BATCH_PIXELS = 1 << 24
PARITY_BATCH = 256
TIE_SCORE = 1e-5  # cosine scores closer than this are a tie: their order is rounding (a float16 checkpoint)


class ExportError(ValueError):
    """An ONNX file that is not a cmce query model, or an export that does not embed like torch."""


class RawPixels(nn.Module):
    """The embedding network behind the dataset's pixel scaling: uint8 in, raw embedding out."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(to_float(images))


def onnx_metadata(model: EmbeddingModel) -> dict[str, str]:
    """What a phone and a server need to know about the graph (metadata_props are strings)."""
    return {
        "format": ONNX_FORMAT,
        "query_model_sha256": model.sha256,
        "query_model_name": model.name,
        "arch": model.arch,
        "embedding_dim": str(model.embedding_dim),
        "image_size": str(model.image_size),
        "in_channels": str(model.in_channels),
        "input": f"{INPUT_NAME}: uint8 [batch, {model.in_channels}, {model.image_size}, {model.image_size}], "
                 "pixels 0-255 (grey 1 channel, RGB 3)",
        "output": f"{OUTPUT_NAME}: float32 [batch, {model.embedding_dim}], raw (not L2-normalised)",
        "preprocess": PREPROCESS.format(size=model.image_size, mode="L" if model.in_channels == 1 else "RGB"),
        "cmce_version": cmce.__version__,
    }


def _onnxruntime() -> Any:
    """onnxruntime with its telemetry off unless the user turned it on (ORT_DISABLE_TELEMETRY=0): from 1.31 its Linux
    and macOS wheels send usage events to Microsoft and keep a device id under ~/.cache, which an export step on a
    customer's machine must not do."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read as onnxruntime initialises: before its import
    import onnxruntime

    return onnxruntime


def _require_edge_packages() -> None:
    try:
        import onnx  # noqa: F401
        _onnxruntime()
        import onnxscript  # noqa: F401 - torch.onnx's exporter builds the graph with it
    except ImportError as err:
        raise ExportError(f"exporting the query model needs the `edge` extra (pip install 'cmce[edge]'): "
                          f"{err}") from None


def to_onnx(model: EmbeddingModel):
    """The ModelProto of the query model with its pixel scaling, batch axis dynamic, metadata attached."""
    _require_edge_packages()
    import onnx

    wrapped = RawPixels(model.net).eval().cpu()
    example = torch.zeros(2, model.in_channels, model.image_size, model.image_size, dtype=torch.uint8)
    # the exporter's own chatter (its optimiser passes at INFO, torchvision ops it skips, torch.export's
    # deprecations) says nothing about this model
    for name, level in (("onnx_ir", logging.WARNING), ("onnxscript", logging.WARNING),
                        ("torch.onnx._internal.exporter._registration", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(wrapped, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True,
                                    verbose=False)
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in onnx_metadata(model).items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"cmce query model {model.name} ({model.arch}), raw pixels → raw embedding"
    onnx.checker.check_model(proto, full_check=True)
    return proto


@dataclass
class ParityReport:
    """onnxruntime vs torch on one split: max |difference| of the raw embeddings and the fraction of queries
    whose top-k hits (ids, in order) are identical."""

    split: str
    images: int
    max_abs_diff: float
    top_k: int
    top_k_agreement: float
    searched: str  # "index" (the given index) or "split" (the split's own torch embeddings)
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OnnxQueryModel:
    """An exported query model on onnxruntime (CPU): uint8 N×C×H×W in, raw embeddings out."""

    def __init__(self, path: str | Path, threads: int = 0):
        ort = _onnxruntime()
        self.path = Path(path)
        self.meta = read_onnx_metadata(self.path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (one per physical core)
        options.log_severity_level = 3  # warnings about unused initialisers etc. are noise here
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def embed(self, images_uint8: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images_uint8, np.uint8)})[0]


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an exported query model; refuses a file that is not one (names the file)."""
    _require_edge_packages()
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises its own errors on garbage
        raise ExportError(f"{path}: not a loadable ONNX file: {type(err).__name__}: {err}") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != ONNX_FORMAT:
        raise ExportError(f"{path}: not a cmce query model export (metadata format={meta.get('format')!r})")
    return meta


def _top_k(queries: np.ndarray, index: Any, ids: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
    scores, idx = index.search(np.ascontiguousarray(normalize(queries, "query embeddings")), k)
    return [[ids[j] for j in row if j >= 0] for row in idx], scores


def same_ranking(ids_a: list[list[str]], scores_a: np.ndarray, ids_b: list[list[str]], scores_b: np.ndarray
                 ) -> list[bool]:
    """Per query: the same top-k, up to ties. Hits whose scores differ by less than TIE_SCORE may come in either
    order, and at the k-th place either of them may be cut: only the scores, rank by rank, tell those apart."""
    return [a == b or bool(np.abs(sa - sb).max() <= TIE_SCORE)
            for a, b, sa, sb in zip(ids_a, ids_b, scores_a, scores_b, strict=True)]


def check_parity(onnx_path: str | Path, model: EmbeddingModel, dataset: str | Path, index: LoadedIndex | None = None,
                 split: str = "test", k: int = TOP_K, batch_size: int = PARITY_BATCH) -> ParityReport:
    """Embed `split` with the ONNX file (onnxruntime) and with the checkpoint (torch, float32, CPU); compare the
    raw embeddings and the top-k hits: in the built `index` (loaded for this query model), else among the
    split's own torch embeddings (query → query)."""
    import faiss

    from cmce.index import search

    session = OnnxQueryModel(onnx_path)
    if session.meta["query_model_sha256"] != model.sha256:
        raise ExportError(f"{onnx_path}: exported from query model {session.meta['query_model_sha256'][:12]}, "
                          f"not {model.sha256[:12]}")
    model.net.eval().cpu()
    ref, got = [], []
    batch_size = parity_batch_size(model.image_size, batch_size)
    for batch in iter_split_batches(dataset, split, batch_size, model.in_channels, model.image_size):
        ref.append(embed_batch(model, batch.images, mixed_precision=False))
        got.append(session.embed(batch.images.numpy()))
    if not ref:
        raise ExportError(f"{dataset}: split {split!r} has no images to check the export on")
    ref_all, got_all = np.concatenate(ref), np.concatenate(got)
    max_diff = float(np.abs(ref_all - got_all).max())
    # a degenerate row was refused as `query embeddings: row 3`, no file named; checked here for both searches
    of = f"embeddings of {origin(Path(dataset))} [{split}]"
    unit = normalize(ref_all, f"query model {model.sha256[:12]}'s {of}")
    normalize(got_all, f"the ONNX export's {of}")
    if index is not None:
        kk = min(k, len(index.ids))
        ref_hits, got_hits = search(index, ref_all, kk), search(index, got_all, kk)
        same = same_ranking(ref_hits.ids, ref_hits.scores, got_hits.ids, got_hits.scores)
        searched = "index"
    else:
        flat = faiss.IndexFlatIP(ref_all.shape[1])
        flat.add(np.ascontiguousarray(unit))
        names = [str(i) for i in range(len(ref_all))]
        kk = min(k, len(ref_all))
        same = same_ranking(*_top_k(ref_all, flat, names, kk), *_top_k(got_all, flat, names, kk))
        searched = "split"
    agreement = float(np.mean(same))
    return ParityReport(split, len(ref_all), max_diff, kk, agreement, searched,
                        bool(max_diff <= MAX_ABS_DIFF and agreement == 1.0))


def parity_batch_size(image_size: int, batch_size: int) -> int:
    """At most `batch_size` images, and no more than PARITY_BATCH_PIXELS pixels, in one parity batch."""
    return max(1, min(batch_size, PARITY_BATCH_PIXELS // (image_size * image_size)))


def is_allocation_failure(err: BaseException) -> bool:
    """torch's CPU allocator and onnxruntime report an allocation that failed as a plain runtime error."""
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        "allocate" in text or "bad_alloc" in text or "out of memory" in text)


@dataclass
class ExportResult:
    path: Path
    sha256: str  # of the ONNX file
    size_bytes: int
    metadata: dict[str, str]
    parity: ParityReport | None = None


def export_query_model(checkpoint: str | Path, out: str | Path, check_dataset: str | Path | None = None,
                       check_index: str | Path | None = None, split: str = "test") -> ExportResult:
    """Export the query checkpoint to `out` (written atomically). With `check_dataset` the export is checked
    against torch before it is put in place: a failed check leaves `out` as it was and raises ExportError."""
    import onnx

    from cmce.index import load_index

    model = require_role(load_embedding_model(checkpoint), "query", f"--query-model {checkpoint}")
    # another query model's index is refused before the export and the parity pass, not after them
    index = (load_index(check_index, query_sha256=model.sha256, query_dim=model.embedding_dim)
             if check_index is not None else None)
    if check_dataset is not None:  # a missing or unreadable one, as the index: not after the trace (10 s at 96 px)
        open_dataset(check_dataset)
    proto = to_onnx(model)
    out = Path(out)
    parity = None
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
        if check_dataset is not None:
            try:
                parity = check_parity(tmp, model, check_dataset, index, split)
            except Exception as err:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
                if not is_allocation_failure(err):
                    raise
                raise ExportError(f"{checkpoint}: out of memory in the parity check (embedding {check_dataset} "
                                  f"[{split}] at image_size {model.image_size}, batches of "
                                  f"{parity_batch_size(model.image_size, PARITY_BATCH)}): {first_line(err)}"
                                  ) from None
            log.info("parity on %s split (%d images): max |onnx - torch| = %.3g, top-%d agreement %.4f (%s)",
                     split, parity.images, parity.max_abs_diff, parity.top_k, parity.top_k_agreement, parity.searched)
            if not parity.passed:
                raise ExportError(f"{out}: not written: the ONNX export does not embed like {checkpoint}: max abs "
                                  f"difference {parity.max_abs_diff:.3g} (bound {MAX_ABS_DIFF:g}), top-{parity.top_k} "
                                  f"agreement {parity.top_k_agreement:.4f} on {check_dataset} [{split}]")
    log.info("wrote %s (%s, %d bytes)", out, model.arch, out.stat().st_size)
    return ExportResult(out, file_sha256(out), out.stat().st_size, onnx_metadata(model), parity)
