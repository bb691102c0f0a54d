"""Where a served index lives, as the reload poll sees it: a local folder, or an s3:// prefix.

Each poll takes the source's cheap `identity` first; only when it changed is meta.json read (its content is the
index's version), and only a new version is loaded. A local folder's identity is that of the folder and every file
in it. An s3:// prefix is followed by its meta.json (one HEAD a poll): build-index replaces a prefix by deleting
meta.json, copying the new files into place and writing meta.json last, and a load verifies every file against the
meta.json it read, reading the prefix again while a replacement is under way. Its other files are looked at (a HEAD
each: an ETag and a size) when meta.json changes and every AUDIT_S: one deleted, cut or replaced under an unchanged
meta.json (a bucket's expiry rule, a hand-made copy) is reported, as a local folder's is. A loaded s3:// index is
served from memory: its download is removed at once, so that a server following daily rebuilds never fills its
scratch folder.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from cmce import s3
from cmce.index import INDEX_FILES, MAX_META_BYTES, LoadedIndex, check_files, load_index
from cmce.storage import file_sha256, forget_download, local_input, origin, read_regular, stat_identity


class FolderSource:
    """An index in a local folder (which build-index swaps whole, writing meta.json last)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shown = str(folder)
        self.replacing_s = 0.0  # a swap is two renames: meta.json missing for UNREADABLE_POLLS polls is no swap

    def identity(self) -> tuple:
        """What changes when anything in the folder is replaced, rewritten or copied in (a folder swapped whole
        gets a new inode); cheap enough to take on every poll, unlike the checksums."""
        return tuple(stat_identity(path, ctime=True) for path in (self.folder, *(self.folder / n for n in INDEX_FILES)))

    def meta_bytes(self) -> bytes:
        """meta.json's bytes; bounded: a 2 GB file was read whole on every poll (2 GB more memory), never reported."""
        return read_regular(self.folder / "meta.json", MAX_META_BYTES)

    def load(self, query_sha256: str, query_dim: int) -> LoadedIndex:
        return load_index(self.folder, query_sha256=query_sha256, query_dim=query_dim)

    def damage(self, meta: dict) -> str | None:
        """What is wrong with the folder's files, checked against the served index's meta.json: served from memory,
        the index went on answering while the folder (which a restart loads) was broken, /readyz silent."""
        try:
            check_files(self.folder, meta, self.shown)
        except (OSError, ValueError) as err:
            return damaged(err, "on disk")
        return None


def damaged(err: BaseException | str, where: str) -> str:
    return f"{err}: the index {where} is damaged (a restart would refuse it); the loaded copy is served"


REPLACING_S = 120.0  # meta.json missing this long is not a build-index copying the new files into place
AUDIT_S = 60.0  # how often the files beside an s3:// index's meta.json are looked at (a HEAD each)
AUDITED = tuple(name for name in INDEX_FILES if name != "meta.json")


class PrefixSource:
    """An index under an s3:// prefix, followed by its meta.json."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.shown = self.uri
        self.replacing_s = REPLACING_S
        self._meta = f"{self.uri}/meta.json"
        self._head: dict | Exception | None = None  # meta.json's HEAD answer (None: no such object) or its error
        self._files: dict[str, tuple[str, int]] = {}  # the other files as last looked at: name -> (ETag, size)
        self._audit: tuple[str | None, float, Exception | None] = (None, -math.inf, None)  # (meta.json's ETag, when,
        # the error) of the last look
        self._trusted: dict[str, str] = {}  # name -> an ETag known to hold the served meta.json's content

    def identity(self) -> tuple | None:
        """meta.json's ETag, size and time, and the other files as last looked at (again once meta.json changes, and
        every AUDIT_S); None when meta.json cannot be had (missing mid-replacement, the endpoint down): never taken
        for "unchanged", so the read of meta.json that follows says what is wrong."""
        try:  # wrong credentials are named as such: a refused HEAD read as "not found" for as long as they lasted
            self._head = s3.object_head(self._meta, diagnose=True)
        except (OSError, ValueError) as err:
            self._head = err
        head = self._head
        if not isinstance(head, dict):
            return None
        etag, looked, _ = self._audit
        if etag != head.get("ETag") or time.monotonic() - looked >= AUDIT_S:
            # a new meta.json's files are looked at in the same poll: its load trusts what this saw (a look a minute
            # old had every file of a rebuild downloaded again to be checked, and a refused one loaded twice)
            try:
                self._files = {name: (str(h.get("ETag")), int(h.get("ContentLength") or 0)) for name in AUDITED
                               if (h := s3.object_head(f"{self.uri}/{name}")) is not None}
                self._audit = (head.get("ETag"), time.monotonic(), None)
            except (OSError, ValueError) as err:  # looked at again at the next audit; damage() says it meanwhile
                self._audit = (head.get("ETag"), time.monotonic(), err)
        meta = (head.get("ETag"), head.get("ContentLength"), str(head.get("LastModified")))
        return *meta, *sorted(self._files.items()), self._audit[2] is None

    def meta_bytes(self) -> bytes:
        """meta.json, as the poll's HEAD (identity) found it: an endpoint that froze is not asked twice a poll."""
        head = self._head
        if isinstance(head, Exception):
            raise head
        if head is None:
            raise FileNotFoundError(f"{self._meta}: not found (a build-index replacing it, or deleted)")
        too_large = ValueError(f"{self._meta}: larger than {MAX_META_BYTES:,} bytes; not an index's meta.json")
        if int(head.get("ContentLength") or 0) > MAX_META_BYTES:
            raise too_large
        # the object the HEAD saw, or none: read in its place, a newer meta.json's version was kept for the old ETag
        # and, should that ETag come back (a rebuild A, B, A between two polls), taken for what the prefix holds
        data = s3.read_range(self._meta, 0, MAX_META_BYTES, if_match=head.get("ETag"))
        if len(data) > MAX_META_BYTES:  # a server that ignored the range
            raise too_large
        return data

    def load(self, query_sha256: str, query_dim: int) -> LoadedIndex:
        seen = dict(self._files)  # by this poll's identity: a file replaced during the download is checked later
        try:  # the first load reads the copy the command's checks downloaded; every later one downloads afresh
            loaded = load_index(self.uri, query_sha256=query_sha256, query_dim=query_dim)
        finally:
            forget_download(self.uri)
        self._trusted = {name: etag for name, (etag, _) in seen.items()}
        return loaded

    def damage(self, meta: dict) -> str | None:
        """What the last look shows wrong with the files meta.json names: missing, another size, or another ETag whose
        bytes (downloaded to check) do not match meta.json's checksum. OSError when the check could not be made."""
        if (err := self._audit[2]) is not None:
            raise OSError(f"{self.uri}: its files could not be looked at to check them: {err}")
        sizes = meta.get("sizes") if isinstance(meta.get("sizes"), dict) else {}
        names = [name for name in meta["files"] if name in AUDITED]
        wrong = []
        for name in names:
            if name not in self._files:
                wrong.append(f"{self.uri}/{name}: missing")
            elif type(size := sizes.get(name)) is int and (found := self._files[name][1]) != size:
                wrong.append(f"{self.uri}/{name}: its size is {found:,} bytes, meta.json records {size:,}")
        if wrong:  # every file at once: named one an audit, each repair cost the operator another minute
            return damaged("; ".join(wrong), "in the bucket")
        for name in names:
            if self._trusted.get(name) == (etag := self._files[name][0]):
                continue
            uri = f"{self.uri}/{name}"
            try:  # replaced by an object of the same size: only its bytes tell
                same = file_sha256(local_input(uri)) == meta["files"][name]
            except (OSError, ValueError) as err:
                raise OSError(f"{uri}: replaced under an unchanged meta.json, and could not be read to check it: "
                              f"{err}") from None
            finally:
                forget_download(uri)
            if not same:
                return damaged(f"{uri}: does not match the checksum in meta.json", "in the bucket")
            self._trusted[name] = etag
        return None


def index_source(index: str | Path) -> FolderSource | PrefixSource:
    """The source of `index`: a local folder, an s3:// URI, or a local download of one (followed by its URI)."""
    uri = origin(index) if isinstance(index, Path) else str(index)
    return PrefixSource(uri) if s3.is_s3(uri) else FolderSource(Path(index))
