"""A finished S3 upload copied to a local file for the import, streamed, and removed after.

The importer (:mod:`.importer`) reads a ZIP's central directory at its end and seeks to each
member, which an S3 body stream cannot do; ranged GETs per member would cost a request each
and tie the importer to S3. So the object is streamed to ``.s3-<objectId>.tmp`` in the upload
folder in 1 MiB pieces (memory stays flat), imported from there like a file-store upload, and
the copy is deleted whatever happens. The name ends in ``.tmp`` and has no ``.info``: the file
store's listings never mistake it for an upload.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import aiofiles

from dicomproxy.tus.s3store import S3Store, split_id


class S3Copy:
    """``async with S3Copy(store, upload_id, folder) as copy: use(copy.path)``."""

    def __init__(self, store: S3Store, upload_id: str, folder: Path) -> None:
        self.store = store
        self.upload_id = upload_id
        self.path = Path(folder) / f".s3-{split_id(upload_id)[0]}.tmp"

    async def __aenter__(self) -> S3Copy:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            async with aiofiles.open(self.path, "wb") as out:
                async for piece in self.store.read(self.upload_id):
                    await out.write(piece)
        except BaseException:
            self._remove()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
