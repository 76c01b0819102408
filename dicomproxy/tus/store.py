"""Uploads on disk, in tusd's ``filestore`` layout.

An upload ``<id>`` is two files in the upload folder: ``<id>`` holds the bytes received so far
and ``<id>.info`` holds tusd's ``FileInfo`` as JSON (``ID``, ``Size``, ``SizeIsDeferred``,
``Offset``, ``MetaData``, ``IsPartial``, ``IsFinal``, ``PartialUploads``, ``Storage``). Like
tusd, the upload's offset is the data file's size, not the ``Offset`` field: the data file is
the truth, so bytes that reached the disk before a crash count, and the ``.info`` file is only
rewritten when the length is declared. A folder written by tusd is therefore served as is, and
tusd serves ours.

The user who created an upload is recorded as ``Storage["Owner"]`` (absent when nobody was
logged in). ``Storage`` is tusd's map of store data (``map[string]string``): tusd reads it,
keeps unknown keys and writes them back when it rewrites the file, and a client cannot set it
(``Upload-Metadata`` only fills ``MetaData``, which stays the client's own). A top-level field
would be dropped by tusd's rewrite (Go's ``json.Marshal`` of its ``FileInfo`` struct), and a
``MetaData`` key could be forged by the client; hence ``Storage``.

Ids are 32 random hex characters (as tusd's). An id from a request is accepted only if it is
made of ``[A-Za-z0-9_-]``: no separator, no dot, so no id can name a file outside the folder
or another upload's ``.info``/``.lock`` file.

Extra files, all ignored by tusd: ``<id>.chk`` marks a checksummed chunk being written (it
holds the offset to roll back to if the process dies before the checksum is verified);
``<id>.pending`` marks a finished upload whose completion (script hook, import) has not been
handed over yet, so a crash in between does not lose it; and tusd's own ``<id>.lock`` /
``<id>.stop`` (see :mod:`.locks`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomproxy.tus import errors

_VALID_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")
INFO_SUFFIX = ".info"
OWNER_KEY = "Owner"  # in Storage; see the module docstring
CHECKSUM_MARKER_SUFFIX = ".chk"
PENDING_SUFFIX = ".pending"


def is_valid_id(upload_id: str) -> bool:
    return _VALID_ID.fullmatch(upload_id) is not None


def new_id() -> str:
    """128 random bits as hex, like tusd's ``uid.Uid()``."""
    return secrets.token_hex(16)


@dataclass
class Upload:
    """One upload: tusd's ``FileInfo`` plus where its bytes live."""

    id: str
    size: int = 0
    size_is_deferred: bool = False
    offset: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    is_partial: bool = False
    is_final: bool = False
    partial_uploads: list[str] | None = None
    storage: dict[str, str] | None = None
    owner: str | None = None  # who created it (Storage["Owner"]); None: nobody was logged in
    path: Path = field(default=Path(), repr=False)
    info_path: Path = field(default=Path(), repr=False)

    @property
    def complete(self) -> bool:
        return not self.size_is_deferred and self.offset == self.size

    def to_info(self) -> dict[str, Any]:
        """The ``.info`` JSON object, field for field as tusd's ``json.Marshal(FileInfo)``."""
        return {
            "ID": self.id,
            "Size": self.size,
            "SizeIsDeferred": self.size_is_deferred,
            "Offset": self.offset,
            "MetaData": dict(self.metadata),
            "IsPartial": self.is_partial,
            "IsFinal": self.is_final,
            "PartialUploads": list(self.partial_uploads) if self.partial_uploads is not None else None,
            "Storage": self._storage(),
        }

    def _storage(self) -> dict[str, str] | None:
        if self.owner is None:
            return dict(self.storage) if self.storage is not None else None
        return {**(self.storage or {}), OWNER_KEY: self.owner}


def owner_of(info: dict[str, Any]) -> str | None:
    """``Storage["Owner"]`` of a ``.info`` object, or None."""
    storage = info.get("Storage")
    owner = storage.get(OWNER_KEY) if isinstance(storage, dict) else None
    return owner if isinstance(owner, str) else None


class FileStore:
    """Create, read, extend and delete uploads in one folder (no locking: see :mod:`.locks`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def ensure_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- paths -----------------------------------------------------------------------------
    def data_path(self, upload_id: str) -> Path:
        return self.folder / upload_id

    def info_path(self, upload_id: str) -> Path:
        return self.folder / (upload_id + INFO_SUFFIX)

    def _marker_path(self, upload_id: str) -> Path:
        return self.folder / (upload_id + CHECKSUM_MARKER_SUFFIX)

    # -- lifecycle -------------------------------------------------------------------------
    def create(self, upload: Upload) -> Upload:
        """Create the empty data file and the ``.info`` file; fills in id, paths and Storage."""
        if not upload.id:
            upload.id = new_id()
        if not is_valid_id(upload.id):
            raise ValueError(f"invalid upload id {upload.id!r}")
        upload.path = self.data_path(upload.id)
        upload.info_path = self.info_path(upload.id)
        upload.storage = {"Type": "filestore", "Path": str(upload.path), "InfoPath": str(upload.info_path)}
        upload.offset = 0
        # O_EXCL: a (astronomically unlikely) id collision must not truncate someone's upload.
        fd = os.open(upload.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o664)
        os.close(fd)
        self.write_info(upload)
        return upload

    def write_info(self, upload: Upload) -> None:
        """Replace the ``.info`` file atomically (a crash never leaves half a JSON document)."""
        data = json.dumps(upload.to_info(), separators=(",", ":")).encode()
        tmp = upload.info_path.with_name(f".{upload.info_path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, upload.info_path)

    def read_info(self, upload_id: str) -> dict[str, Any]:
        """The ``.info`` JSON object, read without the lock (the file is replaced atomically,
        never rewritten in place). Raises ``NOT_FOUND``."""
        if not is_valid_id(upload_id):
            raise errors.NOT_FOUND
        info_path = self.info_path(upload_id)
        try:
            raw = json.loads(info_path.read_bytes())
        except FileNotFoundError:
            raise errors.NOT_FOUND from None
        except ValueError as e:
            raise ValueError(f"{info_path}: not a tusd .info JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{info_path}: not a tusd .info JSON object")
        return raw

    def owner(self, upload_id: str) -> str | None:
        """Who created the upload (lock-free, for access checks). Raises ``NOT_FOUND``."""
        return owner_of(self.read_info(upload_id))

    def get(self, upload_id: str) -> Upload:
        """Read an upload; its offset is the data file's size. Raises ``NOT_FOUND``.

        The caller must hold the upload's lock: this is also where an unverified checksummed
        chunk left by a crash is rolled back.
        """
        raw = self.read_info(upload_id)
        info_path = self.info_path(upload_id)
        path = self.data_path(upload_id)
        self._roll_back_unverified(upload_id, path)
        try:
            offset = path.stat().st_size
        except FileNotFoundError:
            raise errors.NOT_FOUND from None
        meta = raw.get("MetaData") or {}
        partials = raw.get("PartialUploads")
        storage = raw.get("Storage")
        return Upload(
            id=upload_id,
            size=int(raw.get("Size") or 0),
            size_is_deferred=bool(raw.get("SizeIsDeferred")),
            offset=offset,
            metadata={str(k): "" if v is None else str(v) for k, v in meta.items()},
            is_partial=bool(raw.get("IsPartial")),
            is_final=bool(raw.get("IsFinal")),
            partial_uploads=[str(p) for p in partials] if isinstance(partials, list) else None,
            storage=storage if isinstance(storage, dict) else None,
            owner=owner_of(raw),
            path=path,
            info_path=info_path,
        )

    def exists(self, upload_id: str) -> bool:
        return is_valid_id(upload_id) and self.info_path(upload_id).is_file()

    def declare_length(self, upload: Upload, length: int) -> None:
        """creation-defer-length: fix the size (tusd's ``DeclareLength`` rewrites the .info)."""
        upload.size = length
        upload.size_is_deferred = False
        self.write_info(upload)

    def terminate(self, upload_id: str) -> None:
        """Delete the data and ``.info`` files; missing files are fine (a sweep may have won)."""
        for p in (self.data_path(upload_id), self.info_path(upload_id), self._marker_path(upload_id),
                  self.folder / (upload_id + PENDING_SUFFIX)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def concat(self, final: Upload, partials: list[Upload]) -> None:
        """Append the partial uploads' bytes to the final upload's data file (blocking: run it
        in a thread). ``copy_file_range`` lets the kernel copy without passing through Python."""
        with open(final.path, "ab") as out:
            for part in partials:
                with open(part.path, "rb") as src:
                    remaining = part.size
                    while remaining > 0:
                        try:
                            n = os.copy_file_range(src.fileno(), out.fileno(), remaining)
                        except OSError:  # e.g. across file systems on old kernels
                            n = 0
                        if n == 0:
                            out.write(src.read(remaining))
                            break
                        remaining -= n
            out.flush()
            os.fsync(out.fileno())
        final.offset = final.path.stat().st_size

    # -- checksummed chunks ----------------------------------------------------------------
    def begin_verified_chunk(self, upload: Upload) -> None:
        """Before writing a chunk that must match ``Upload-Checksum``: remember where to roll back."""
        marker = self._marker_path(upload.id)
        with open(marker, "w") as f:
            f.write(str(upload.offset))
            f.flush()
            os.fsync(f.fileno())

    def end_verified_chunk(self, upload: Upload) -> None:
        try:
            self._marker_path(upload.id).unlink()
        except FileNotFoundError:
            pass

    def _roll_back_unverified(self, upload_id: str, path: Path) -> None:
        marker = self._marker_path(upload_id)
        try:
            text = marker.read_text().strip()
        except FileNotFoundError:
            return
        if text.isdigit():
            try:
                os.truncate(path, int(text))
            except FileNotFoundError:
                pass
        marker.unlink(missing_ok=True)

    # -- completions not yet handed over ---------------------------------------------------
    def mark_pending(self, upload_id: str) -> None:
        (self.folder / (upload_id + PENDING_SUFFIX)).touch()

    def clear_pending(self, upload_id: str) -> None:
        (self.folder / (upload_id + PENDING_SUFFIX)).unlink(missing_ok=True)

    def pending_ids(self) -> list[str]:
        out = []
        for p in self.folder.glob("*" + PENDING_SUFFIX):
            upload_id = p.name[: -len(PENDING_SUFFIX)]
            if is_valid_id(upload_id):
                out.append(upload_id)
        return sorted(out)

    # -- sweeping --------------------------------------------------------------------------
    def last_activity(self, upload: Upload) -> float:
        """When the upload last changed (epoch seconds): the newer of its two files' mtimes."""
        times = []
        for p in (upload.path, upload.info_path):
            try:
                times.append(p.stat().st_mtime)
            except FileNotFoundError:
                pass
        return max(times) if times else time.time()

    def ids(self) -> Iterator[str]:
        """Ids of every upload in the folder (every ``<id>.info`` with a valid id)."""
        try:
            entries = os.scandir(self.folder)
        except FileNotFoundError:
            return
        with entries:
            for entry in entries:
                name = entry.name
                if name.endswith(INFO_SUFFIX) and not name.startswith("."):
                    upload_id = name[: -len(INFO_SUFFIX)]
                    if is_valid_id(upload_id):
                        yield upload_id
