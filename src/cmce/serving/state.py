"""What a server answers with, and how it follows a rebuilt index (or a moved query-model alias) without a restart.

`Served` is one immutable pair (query model, loaded index) that agree on the query model's sha256. A request
reads `Holder.current` once and uses that object to the end, so a swap never mixes two versions inside one
answer, and requests in flight keep the old pair alive until they finish. `Holder.check` (polled by a
thread) notices a new index from meta.json's content (build-index swaps the folder whole and writes meta.json
last; see index_source for an s3:// prefix), loads the new pair fully (load_index takes the folder's shared
swap lock and verifies every checksum), then replaces the one reference. A pair that fails to load is logged
and retried only once something changed: the alias, meta.json, or the source's identity (for a folder: the
inode, size and times of the folder and of its files), so a folder whose files are still being copied in is
loaded once it is whole. The old pair keeps serving meanwhile. What
is wrong (a failed load, an unreadable folder or alias) is settled on each poll: shown in /readyz while it
holds, logged once when it appears or changes and once when resolved. What a poll waits on (the registry, a
model download) is shown in /readyz while it lasts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cmce.checkpoint import EmbeddingModel, load_embedding_model
from cmce.embed import to_inference_device
from cmce.index import LoadedIndex
from cmce.redaction import conceal
from cmce.serving.index_source import index_source
from cmce.storage import origin, restore_uris, scratch_dir

log = logging.getLogger(__name__)
STOP_WAIT_S = 5.0  # how long a stop waits for a poll in progress
RETRY_S = 30.0  # a load that failed for a transfer's or the disk's error is tried again this long after
UNREADABLE_POLLS = 5  # a swap replaces meta.json in two renames: unreadable this long, the folder is broken


class FailedLoad(NamedTuple):
    """A load that failed, and when it is tried again: once any of the first three changes, or at `retry_at`."""

    model_key: str
    version: str
    identity: tuple | None
    retry_at: float  # math.inf: only once something changed
    message: str


def meta_version(meta: dict) -> str:
    """An index's identity: the sha256 of its meta.json content, which holds the sha256 of every other file."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Served:
    model: EmbeddingModel
    model_key: str  # which version of the query model source this is (QueryModelSource.key)
    index: LoadedIndex
    version: str  # meta_version of the index

    def describe(self) -> dict:
        """/version: the query model and the index, from the checkpoint and meta.json."""
        meta = self.index.meta
        return {
            "query_model_sha256": meta["query_model_sha256"],
            "query_model": {"name": self.model.name, "arch": self.model.arch, "embedding_dim": self.model.embedding_dim,
                            "image_size": self.model.image_size, "in_channels": self.model.in_channels},
            "members": meta.get("members", []),
            "gallery_sha256": meta.get("gallery_sha256"),
            "index_version": self.version,
            "index_files": meta["files"],
            "index_type": meta.get("index_type", "flat"),
            "dim": meta["dim"],
            "n_indexed": len(self.index.ids),
        }


class QueryModelSource:
    """The query model: a checkpoint file (fixed for the life of the server), or a registered model
    `models:/NAME@ALIAS` whose alias is followed (the promotion gate moves `production`)."""

    def __init__(self, uri: str, local: Callable[[str], Path]):
        self.uri = uri
        self.local = local  # argument → local checkpoint (cmce.commands._model: paths, s3://, models:/)
        self.follows_alias = uri.startswith("models:/") and "@" in uri
        self._files: list[tuple[EmbeddingModel, Path]] = []  # each loaded model and the file it was read from

    def key(self) -> str:
        """The version the source names now: the URI itself, or the registered version behind the alias."""
        if not self.follows_alias:
            return self.uri
        from cmce.registry import alias_version

        try:
            version = alias_version(self.uri)
        except ValueError as err:  # cmce's own refusal (a version not READY, a store that is not there)
            message = str(err)
            raise ValueError(message if message.startswith(self.uri) else f"{self.uri}: {message}") from None
        except Exception as err:  # noqa: BLE001 - MLflow's errors are not ValueErrors; the caller's is one line
            raise ValueError(f"{self.uri}: cannot read the alias from the model registry: {err}") from None
        return f"{self.uri.split('@', 1)[0]}/{version}"

    def load(self, key: str) -> EmbeddingModel:
        try:
            path = self.local(key)  # an alias is read by version: it may move meanwhile
        except (ValueError, OSError):
            raise
        except Exception as err:  # noqa: BLE001 - MLflow's errors are not ValueErrors; the caller's is one line
            raise ValueError(f"{key}: cannot download the registered model: {err}") from None
        try:
            model = load_embedding_model(path)
            to_inference_device(model)
        except BaseException:  # a refused version (a transformation under the alias, say): its copy goes now
            self._remove_download(path, "refused")
            raise
        self._files.append((model, path))
        return model

    def discard(self, model: EmbeddingModel) -> None:
        """`model` is no longer served nor about to be: the copy cmce downloaded of it is removed (a server
        following an alias that moved 62 times kept 37 copies). Requests in flight hold the loaded model, not the
        file. Only a download into the scratch folder goes, never a checkpoint the user named."""
        paths = [path for loaded, path in self._files if loaded is model]
        self._files = [(loaded, path) for loaded, path in self._files if loaded is not model]
        for path in paths:
            self._remove_download(path, "superseded")

    @staticmethod
    def _remove_download(path: Path, why: str) -> None:
        """Remove `path` if it is a copy cmce downloaded into its scratch folder (never the user's own file)."""
        uri = origin(path)
        if uri == str(path) or not path.is_file():  # not a recorded copy of a URI: the user's own file
            return
        scratch, path = scratch_dir().resolve(), path.resolve()
        if not path.is_relative_to(scratch):
            return
        try:
            path.unlink()
            for folder in path.parents:  # the download's own folders, once empty
                if folder == scratch or any(folder.iterdir()):
                    break
                folder.rmdir()
        except OSError as err:  # the served model is unaffected; a copy left behind goes when serve stops
            log.warning("serve: could not remove the %s download of %s: %s", why, uri, err)
            return
        log.info("serve: removed the %s download of %s", why, uri)


class Holder:
    """The served pair and its reloads. Loads once on construction: a bad model or index raises (ValueError).
    `accept` checks each loaded index before it is served, the first and every reload (raises ValueError):
    e.g. that its gallery was embedded from the dataset whose class names label the hits."""

    def __init__(self, index: str | Path, models: QueryModelSource,
                 accept: Callable[[LoadedIndex], None] | None = None):
        self.source = index_source(index)  # a folder, or an s3:// prefix (its URI, or a download of it)
        self.models = models
        self.accept = accept or (lambda index: None)
        key = models.key()
        model = models.load(key)
        self._verified = self.source.identity()  # before the load checks it: a change during it is seen
        index = self.source.load(model.sha256, model.embedding_dim)
        self.accept(index)
        self.current = Served(model, key, index, meta_version(index.meta))
        self.problems: dict[str, str] = {}  # what the polls find wrong now, by kind; replaced whole, never changed
        self.reloads = 0
        self._failed: FailedLoad | None = None
        self._candidate: tuple[str, EmbeddingModel] | None = None
        self._damage: str | None = None  # what _damaged found in the folder of the served index
        self._recheck_at = math.inf  # when _damaged looks again though nothing changed (its check failed)
        self._unreadable: tuple[int, float, bool] | None = None  # meta.json unreadable: (polls, since when, reported)
        self._peeked: tuple[tuple | None, str | Exception] | None = None  # (identity, meta_version or error): last read
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy: tuple[str, float] | None = None  # what the poll is waiting on, since when (time.monotonic)

    @property
    def last_error(self) -> str | None:
        """The problems that hold now (/readyz), or None."""
        return "; ".join(self.problems.values()) or None

    @property
    def in_progress(self) -> dict | None:
        """What the poll is waiting on now, and for how long (/readyz): a registry or its artifact store that
        hangs holds the poll in MLflow's own retries for minutes, and /readyz said nothing all that time."""
        busy = self._busy
        return None if busy is None else {"what": busy[0], "for_s": round(time.monotonic() - busy[1], 1)}

    @contextlib.contextmanager
    def _waiting_on(self, what: str) -> Iterator[None]:
        self._busy = (what, time.monotonic())
        try:
            yield
        finally:
            self._busy = None

    def _report(self, kind: str, problem: str | None, level: int = logging.ERROR, exc_info: bool = False) -> None:
        """Record what a poll found for `kind` (None: nothing wrong). Logged once, again only when it changes, and
        when it is resolved: a poll every 0.5 s must not repeat one warning forever. The dict is replaced, not
        changed, as /readyz reads it from another thread."""
        if problem is not None:  # a model downloaded from the registry is named by its models:/ URI; a password in
            problem = conceal(restore_uris(problem))  # a registry URL (or echoed token) reaches every /readyz client
        old = self.problems.get(kind)
        if problem == old:
            return
        if problem is None:
            self.problems = {k: v for k, v in self.problems.items() if k != kind}
            log.info("serve: resolved: %s", old)
        else:
            self.problems = {**self.problems, kind: problem}
            cur = self.current
            log.log(level, "serve: %s; still serving index %s with query model %s", problem, cur.version[:12],
                    cur.model.sha256[:12], exc_info=exc_info)

    def _candidate_model(self, key: str) -> EmbeddingModel:
        """A promoted query model, loaded once while its index is not there yet (each try would download it)."""
        if self._candidate is None or self._candidate[0] != key:
            self._drop_candidate()  # the alias moved on before its index came: that download is not needed
            log.info("serve: loading the promoted query model %s", key)
            with self._waiting_on(f"loading the query model {key}"):
                self._candidate = (key, self.models.load(key))
        return self._candidate[1]

    def _drop_candidate(self) -> None:
        if self._candidate is not None:
            self.models.discard(self._candidate[1])
            self._candidate = None

    def _peek(self, identity: tuple | None, started: float) -> str | None:
        """The version of the index at the source now, or None while it cannot be read (mid-swap, being replaced).
        meta.json is read again only when the source's identity changed (a 100 MB meta.json was parsed on every poll;
        a broken one on S3 downloaded again). Still unreadable after UNREADABLE_POLLS polls (and, when missing, the
        source's replacing_s), it is broken, not mid-swap: reported (log, /readyz) once, old pair kept."""
        if identity is not None and self._peeked is not None and self._peeked[0] == identity:
            outcome = self._peeked[1]
        else:
            try:
                with self._waiting_on(f"reading {self.source.shown}/meta.json"):
                    outcome = meta_version(json.loads(self.source.meta_bytes()))
            except (OSError, ValueError) as err:
                outcome = err
            # a transfer's or the disk's error is not kept: a GET that timed out once after a new meta.json's HEAD
            # held that version back until the next rebuild
            self._peeked = None if isinstance(outcome, OSError) else (identity, outcome)
        if isinstance(outcome, str):
            self._unreadable = None  # a later outage is counted (and said) afresh
            return outcome
        # since the poll that found it so began: its HEAD may have waited out a 20 s deadline on a frozen endpoint
        polls, since, said = self._unreadable or (0, started, False)
        polls += 1
        grace = self.source.replacing_s if isinstance(outcome, FileNotFoundError) else 0.0  # garbage is no swap
        if not said and polls >= UNREADABLE_POLLS and time.monotonic() - since >= grace:
            # since when, not for how many polls: said once, a count stays at the one it was said with
            began = time.gmtime(time.time() - (time.monotonic() - since))
            self._report("index", f"{self.source.shown}/meta.json: unreadable since "
                                  f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', began)}: {outcome}")
            said = True  # once: the error's wording may differ from poll to poll
        self._unreadable = (polls, since, said)
        return None

    def check(self) -> bool:
        """Load and swap in a changed index or query model; True if the served pair changed. Each poll also
        settles what is wrong now: a problem that no longer holds is cleared."""
        cur, started = self.current, time.monotonic()
        try:
            with self._waiting_on(f"reading the alias of {self.models.uri}"):
                model_key = self.models.key()
            self._report("query model", None)
        except ValueError as err:  # a registry that is down (or an alias deleted) must not stop the server
            self._report("query model", str(err).rstrip("."), logging.WARNING)
            model_key = cur.model_key  # an index rebuilt for the served model is still followed
        with self._waiting_on(f"looking at {self.source.shown}"):
            folder = self.source.identity()  # before reading: a change during the load is seen next poll
        version = self._peek(folder, started)
        if version is None:  # mid-swap (or broken, reported by _peek): nothing to load yet
            return False
        wanted = (model_key, version)
        if wanted == (cur.model_key, cur.version):  # the folder holds the served pair (again)
            self._failed = None
            self._drop_candidate()  # the alias moved back: a model loaded meanwhile will not be served
            # a file changed under an unchanged meta.json (cut, overwritten), or a check that could not be made
            if folder != self._verified or time.monotonic() >= self._recheck_at:
                self._verified = folder
                self._damage = self._damaged(cur.index.meta)
            self._report("index", self._damage)
            return False
        failed = self._failed
        if failed is not None and failed[:3] == (*wanted, folder) and time.monotonic() < failed.retry_at:
            self._report("index", failed.message)  # again: an outage's report in between replaced it
            return False
        try:
            model = cur.model if model_key == cur.model_key else self._candidate_model(model_key)
            with self._waiting_on(f"loading the index {self.source.shown}"):
                index = self.source.load(model.sha256, model.embedding_dim)
            self.accept(index)
        except (ValueError, OSError, RuntimeError) as err:  # faiss reports unreadable files as RuntimeError
            # tried again once the source changes; a transfer's failure (an S3 timeout, a 503) also after a while:
            # an S3 index whose download failed once was not reloaded until the next rebuild
            retry = time.monotonic() + RETRY_S if isinstance(err, OSError) else math.inf
            self._failed = FailedLoad(*wanted, folder, retry, f"reload failed: {err}")
            self._report("index", self._failed.message)
            return False
        new = Served(model, model_key, index, meta_version(index.meta))
        self.current, self._failed, self._candidate = new, None, None
        self._verified, self._damage = folder, None  # load_index checked every file
        if model is not cur.model:
            self.models.discard(cur.model)
        self.reloads += 1
        log.info("serve: now serving index %s (query model %s), was %s", new.version[:12], model.sha256[:12],
                 cur.version[:12])
        self._report("index", None)
        return True

    def _damaged(self, meta: dict) -> str | None:
        self._recheck_at = math.inf
        with self._waiting_on(f"checking {self.source.shown}"):
            try:
                return self.source.damage(meta)
            except OSError as err:  # the check itself failed (a download that timed out): made again after a while,
                self._recheck_at = time.monotonic() + RETRY_S  # not left in /readyz until the next change
                return str(err)

    def start(self, interval_s: float) -> None:
        """Poll every `interval_s` seconds in a daemon thread (0: never)."""
        if interval_s <= 0:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                    self._report("poll", None)
                except Exception as err:  # an error no reload anticipated must not end the polling
                    self._report("poll", f"reload check failed: {err!r}", exc_info=True)

        self._thread = threading.Thread(target=loop, name="cmce-serve-reload", daemon=True)
        self._thread.start()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """End the polling. A poll blocked on the registry or a download (an S3 store that stopped answering) held
        a stopped server for 150 s, past any supervisor's grace period: it is left behind after `wait_s` (the
        thread is a daemon; the process exits without it, and its scratch folder goes with the command's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(wait_s)
            if self._thread.is_alive():
                busy = self.in_progress
                log.warning("serve: stopping without the reload poll, still %s", busy["what"] if busy else "busy")
