"""One search request without HTTP: query embeddings checked against the served index (or images decoded and
embedded by the served query model), searched, and answered with labels and class names."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import numpy as np
import torch

from cmce.data.codec import decode_image_as_found, image_header, query_image_notes
from cmce.embed import embed_batch
from cmce.index import search
from cmce.method import normalize
from cmce.search import hit_lists
from cmce.serving.state import Served


class RequestError(ValueError):
    """A request the server refuses: the field at fault, why, and the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Limits:
    """Bounds of one request (cmce serve flags): a request over them is refused before any work."""

    max_queries: int = 64  # queries (images or embeddings) per request
    max_k: int = 100  # neighbours per query
    max_body_bytes: int = 8 << 20  # request body, before it is parsed
    max_bodies_bytes: int = 32 << 20  # all request bodies held at once (see cmce.serving.budget)
    max_image_pixels: int = 4_000_000  # per image, checked from its header before it is decoded
    max_request_pixels: int = 32_000_000  # all images of one request, checked from their headers likewise


SHA256 = re.compile(r"[0-9a-f]{64}")
BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n")  # what MIME wrapping and pretty-printers insert


def check_count(field: str, n: int, limits: Limits) -> None:
    if n == 0:
        raise RequestError(field, "no queries given")
    if n > limits.max_queries:
        raise RequestError(field, f"{n} queries, more than the {limits.max_queries} a request may hold (--max-queries)",
                           413)


def check_query_model(sha256: str, served: Served, what: str, advice: str) -> None:
    """`query_model_sha256` as a request gives it: the whole sha256 of the query model the index serves (409 when
    it is another model's). With images, the client's pin of the model that is to embed them: ignored, a client
    expecting another model got its answers without a word."""
    expected = served.index.meta["query_model_sha256"]
    if not SHA256.fullmatch(sha256.lower()):  # the 12-character prefix the messages show is not enough
        raise RequestError("query_model_sha256", "must be the checkpoint's whole sha256: 64 hex digits")
    if sha256.lower() != expected:
        raise RequestError("query_model_sha256", f"{what} query model {sha256[:12]}, but this index serves query "
                                                 f"model {expected[:12]}; {advice}", 409)


def embeddings_query(rows: list[list[float]], sha256: str | None, served: Served, limits: Limits) -> np.ndarray:
    """Client-side query embeddings, refused unless they come from the query model the index was built for, have
    its dimension and are finite with a direction."""
    check_count("embeddings", len(rows), limits)
    if not sha256:
        raise RequestError("query_model_sha256", "required with embeddings: the sha256 of the query model "
                                                 "checkpoint that computed them")
    check_query_model(sha256, served, "embeddings of", "embed with that model")
    dim = served.index.meta["dim"]
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise RequestError(f"embeddings[{i}]", f"has {len(row)} values, the index expects dimension {dim}")
    with np.errstate(over="ignore"):  # 1e39 becomes inf, refused below: not a RuntimeWarning in the server's log
        q = np.asarray(rows, dtype=np.float32)
    try:
        normalize(q)
    except ValueError:
        for i, row in enumerate(q):  # name the first row at fault
            try:
                normalize(row[None])
            except ValueError:
                raise RequestError(f"embeddings[{i}]", "is all zeros, not finite, or too large to "
                                                       "normalise") from None
    return q


def images_query(images: list[str], served: Served, limits: Limits) -> tuple[np.ndarray, list[str]]:
    """Base64 PNG/JPEG images decoded and embedded by the served query model, and what the answer must say about
    them, as `cmce search` warns: of an animation or a multi-page image only the first frame is searched, and one of
    another size or mode than the model reads is converted (a colour photo to a grey model's pixels)."""
    check_count("images", len(images), limits)
    model = served.model
    datas = [_base64(text, f"images[{i}]") for i, text in enumerate(images)]
    _check_request_pixels(datas, limits)
    arrays, warnings = [], []
    for i, data in enumerate(datas):
        field = f"images[{i}]"
        try:
            arr, found = decode_image_as_found(data, model.in_channels, model.image_size, field)
        except ValueError as err:
            raise _image_refused(field, err) from None
        arrays.append(arr)
        warnings += [f"{field}: {note}" for note in query_image_notes(found, model.in_channels, model.image_size)]
    return embed_batch(model, torch.from_numpy(np.stack(arrays))), warnings


def answer(served: Served, queries: np.ndarray, k: int, classes: list[str] | None) -> list[dict]:
    """Top-k hits of each query: id, score, uncertainty, label and class name (None when unknown)."""
    return [{"hits": hits} for hits in hit_lists(search(served.index, queries, k), served.index.labels, classes)]


def _base64(text: str, field: str) -> bytes:
    try:  # line breaks are whitespace in MIME base64 (what `base64 FILE` prints); any other junk is refused
        return base64.b64decode(text.translate(BASE64_WHITESPACE), validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(field, f"not valid base64: {err}") from None


def _image_refused(field: str, err: ValueError) -> RequestError:
    """A DataError of the codec (it names the field, says what is wrong with the image) as the request's refusal."""
    return RequestError(field, str(err).removeprefix(f"{field}: "))


def _check_request_pixels(datas: list[bytes], limits: Limits) -> None:
    """The images' pixels together, from their headers, within --max-request-pixels: each was bounded alone, and 64
    PNGs of 2000×2000 in 1.7 MB took 5.6 s of CPU to decode (four such requests, 14 s each on two cores)."""
    total = 0
    for i, data in enumerate(datas):
        try:
            with image_header(data, f"images[{i}]") as img:  # nothing decoded: the size is in the header
                total += img.width * img.height
        except ValueError as err:
            raise _image_refused(f"images[{i}]", err) from None
        if total > limits.max_request_pixels:
            raise RequestError("images", f"{total:,} pixels in images[0..{i}], more than the "
                                         f"{limits.max_request_pixels:,} a request may hold (--max-request-pixels)",
                               413)
