"""Uploads in an S3 bucket, in tusd's ``s3store`` layout (``Tus:Store`` ``s3``).

An upload is what tusd's s3store makes of it, so tusd reads our uploads and we read its:

* the id is ``<objectId>+<multipartId>``: a random ``objectId`` (32 hex characters) and the id
  of the S3 multipart upload that receives the bytes, at key ``<Prefix><objectId>``;
* ``<Prefix><objectId>.info`` holds tusd's ``FileInfo`` JSON (``Storage`` = ``{"Type":
  "s3store", "Bucket", "Key"}`` plus our ``Owner``, as in :mod:`.store`);
* every part but the last has at least 5 MiB (S3's rule); bytes of a PATCH that ended below
  that wait in ``<Prefix><objectId>.part`` (tusd's "incomplete part") until the next PATCH
  prepends them;
* the offset is the sum of the parts' sizes (``ListParts``) plus the ``.part`` object's size;
  once the multipart upload is completed (``ListParts`` answers ``NoSuchUpload``) it is the
  size. Nothing is cached between requests: the bucket is the truth, so any replica serves any
  upload (the lock of :mod:`.redislock` keeps two replicas from writing one upload at once);
* the last activity (what ``Upload-Expires`` counts from, as the file store's newer mtime of
  its two files) is the newest ``LastModified`` of the ``.info`` object, the parts and the
  ``.part`` object: every stored chunk moves one of them.

Client library: ``aiobotocore`` (botocore's maintained asyncio port, on aiohttp): every S3
call is awaited on the event loop. ``boto3`` would need a thread per call (a thread hop per
5 MiB part and per HEAD, and blocking calls are what the gateway's loop must never make);
``aioboto3`` is a wrapper around aiobotocore adding only resource objects we do not need.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from dicomproxy.config.settings import TusS3Settings
from dicomproxy.tus import errors
from dicomproxy.tus.store import INFO_SUFFIX, Upload, is_valid_id, new_id, owner_of

log = logging.getLogger(__name__)

MIN_PART = 5 * 1024 * 1024  # S3's minimum size of every part but the last
PART_SUFFIX = ".part"
PENDING_SUFFIX = ".pending"  # ours, ignored by tusd: a finished upload whose completion is not handed over
_GONE = ("NoSuchUpload", "NoSuchKey", "404", "NotFound")


def split_id(upload_id: str) -> tuple[str, str]:
    """``<objectId>+<multipartId>`` (tusd splits at the last ``+``); NOT_FOUND for anything else."""
    object_id, plus, multipart_id = upload_id.rpartition("+")
    if not plus or not is_valid_id(object_id) or not multipart_id or len(multipart_id) > 1024 \
            or not multipart_id.isprintable() or "/" in multipart_id:
        raise errors.NOT_FOUND
    return object_id, multipart_id


def is_valid_s3_id(upload_id: str) -> bool:
    try:
        split_id(upload_id)
    except errors.TusError:
        return False
    return True


@dataclass
class Part:
    number: int
    etag: str
    size: int


@dataclass
class S3State:
    """An upload as the bucket has it: its info, its parts, the ``.part`` object's size."""

    upload: Upload
    parts: list[Part] = field(default_factory=list)
    incomplete_size: int = 0
    completed: bool = False  # the multipart upload is completed (or aborted)
    last_activity: float = 0.0  # epoch seconds: the newest LastModified of .info, parts, .part


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _epoch(value: Any) -> float:
    """botocore's ``LastModified`` (a datetime) as epoch seconds (0 when absent)."""
    return value.timestamp() if isinstance(value, datetime) else 0.0


class S3Store:
    """One bucket and prefix; ``open()`` before use, ``aclose()`` after."""

    def __init__(self, settings: TusS3Settings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        prefix = settings.prefix
        self.prefix = prefix + "/" if prefix and not prefix.endswith("/") else prefix
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def open(self) -> None:
        s = self.settings
        session = get_session()
        config = AioConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 3, "mode": "standard"})
        self._client = await self._stack.enter_async_context(session.create_client(
            "s3", region_name=s.region or None, endpoint_url=s.endpoint or None,
            aws_access_key_id=s.access_key or None, aws_secret_access_key=s.secret_key or None, config=config))

    async def aclose(self) -> None:
        await self._stack.aclose()
        self._client = None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise RuntimeError("the S3 store is not open")
        return self._client

    # -- keys ------------------------------------------------------------------------------
    def key(self, object_id: str) -> str:
        return self.prefix + object_id

    def info_key(self, object_id: str) -> str:
        return self.prefix + object_id + INFO_SUFFIX

    def part_key(self, object_id: str) -> str:
        return self.prefix + object_id + PART_SUFFIX

    # -- lifecycle -------------------------------------------------------------------------
    async def create(self, upload: Upload, object_id: str | None = None) -> Upload:
        """Start the multipart upload and write the ``.info`` object (tusd's ``NewUpload``);
        ``object_id`` is one the caller drew (and reserved quota for) beforehand."""
        object_id = object_id or new_id()
        extra: dict[str, Any] = {}
        if upload.metadata.get("filetype"):
            extra["ContentType"] = upload.metadata["filetype"]
        res = await self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key(object_id), **extra)
        upload.id = f"{object_id}+{res['UploadId']}"
        upload.storage = {"Type": "s3store", "Bucket": self.bucket, "Key": self.key(object_id)}
        upload.offset = 0
        await self.write_info(upload)
        return upload

    async def write_info(self, upload: Upload) -> None:
        object_id, _ = split_id(upload.id)
        body = json.dumps(upload.to_info()).encode()
        await self.client.put_object(Bucket=self.bucket, Key=self.info_key(object_id), Body=body,
                                     ContentType="application/json")

    async def read_info(self, upload_id: str) -> dict[str, Any]:
        return (await self._info(upload_id))[0]

    async def _info(self, upload_id: str) -> tuple[dict[str, Any], float]:
        """The ``.info`` JSON object and its LastModified (epoch seconds)."""
        object_id, _ = split_id(upload_id)
        info, modified = await self._get_info(self.info_key(object_id))
        if info.get("ID") != upload_id:
            raise errors.NOT_FOUND  # another multipart id for this object: not this upload
        return info, modified

    async def _get_info(self, key: str) -> tuple[dict[str, Any], float]:
        try:
            res = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with res["Body"] as stream:
                raw = await stream.read()
        except ClientError as e:
            if _code(e) in _GONE:
                raise errors.NOT_FOUND from None
            raise
        info = json.loads(raw)
        if not isinstance(info, dict):
            raise errors.NOT_FOUND
        return info, _epoch(res.get("LastModified"))

    async def upload_ids(self) -> list[str]:
        """The ids of every upload under the prefix (each ``.info`` object's ``ID``; for the sweep)."""
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", ()):
                key = str(obj["Key"])
                if not key.endswith(INFO_SUFFIX) or "/" in key[len(self.prefix):]:
                    continue
                try:
                    info, _ = await self._get_info(key)
                except (errors.TusError, ValueError):
                    continue  # deleted meanwhile, or not a tusd .info
                upload_id = info.get("ID")
                if isinstance(upload_id, str) and is_valid_s3_id(upload_id):
                    out.append(upload_id)
        return out

    async def owner(self, upload_id: str) -> str | None:
        return owner_of(await self.read_info(upload_id))

    async def state(self, upload_id: str) -> S3State:
        """The upload with its offset computed from the bucket (tusd's ``fetchInfo``)."""
        raw, info_modified = await self._info(upload_id)
        meta = raw.get("MetaData") or {}
        storage = raw.get("Storage")
        partials = raw.get("PartialUploads")
        upload = Upload(
            id=upload_id, size=int(raw.get("Size") or 0), size_is_deferred=bool(raw.get("SizeIsDeferred")),
            metadata={str(k): "" if v is None else str(v) for k, v in meta.items()},
            is_partial=bool(raw.get("IsPartial")), is_final=bool(raw.get("IsFinal")),
            partial_uploads=[str(p) for p in partials] if isinstance(partials, list) else None,
            storage=storage if isinstance(storage, dict) else None, owner=owner_of(raw))
        state = S3State(upload, last_activity=info_modified)
        try:
            state.parts = await self._list_parts(upload_id, state)
        except ClientError as e:
            if _code(e) not in _GONE:
                raise
            state.completed = True
            upload.offset = upload.size
            return state
        state.incomplete_size, part_modified = await self._head(self.part_key(split_id(upload_id)[0]))
        state.last_activity = max(state.last_activity, part_modified)
        upload.offset = state.incomplete_size + sum(p.size for p in state.parts)
        return state

    async def _list_parts(self, upload_id: str, state: S3State | None = None) -> list[Part]:
        object_id, multipart_id = split_id(upload_id)
        parts: list[Part] = []
        marker = 0
        while True:
            res = await self.client.list_parts(Bucket=self.bucket, Key=self.key(object_id), UploadId=multipart_id,
                                               PartNumberMarker=marker)
            for p in res.get("Parts", ()):
                parts.append(Part(int(p["PartNumber"]), str(p["ETag"]), int(p["Size"])))
                if state is not None:
                    state.last_activity = max(state.last_activity, _epoch(p.get("LastModified")))
            if not res.get("IsTruncated"):
                return sorted(parts, key=lambda p: p.number)
            marker = int(res["NextPartNumberMarker"])

    async def object_modified(self, upload_id: str) -> float:
        """The finished object's LastModified (epoch seconds; 0 if there is none)."""
        return (await self._head(self.key(split_id(upload_id)[0])))[1]

    async def _head_size(self, key: str) -> int:
        return (await self._head(key))[0]

    async def _head(self, key: str) -> tuple[int, float]:
        """The object's size and LastModified; (0, 0) when there is none."""
        try:
            res = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if _code(e) in _GONE:
                return 0, 0.0
            raise
        return int(res["ContentLength"]), _epoch(res.get("LastModified"))

    # -- completions not yet handed over ---------------------------------------------------
    def pending_key(self, object_id: str) -> str:
        return self.prefix + object_id + PENDING_SUFFIX

    async def mark_pending(self, upload_id: str) -> None:
        await self.client.put_object(Bucket=self.bucket, Key=self.pending_key(split_id(upload_id)[0]),
                                     Body=upload_id.encode())

    async def is_pending(self, upload_id: str) -> bool:
        return await self._head_size(self.pending_key(split_id(upload_id)[0])) > 0

    async def clear_pending(self, upload_id: str) -> None:
        await self.client.delete_object(Bucket=self.bucket, Key=self.pending_key(split_id(upload_id)[0]))

    async def pending_ids(self) -> list[str]:
        """Upload ids of every ``.pending`` marker under the prefix (a listing of the prefix)."""
        out: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", ()):
                key = str(obj["Key"])
                if key.endswith(PENDING_SUFFIX) and "/" not in key[len(self.prefix):]:
                    res = await self.client.get_object(Bucket=self.bucket, Key=key)
                    async with res["Body"] as stream:
                        upload_id = (await stream.read()).decode("utf-8", "replace")
                    if is_valid_s3_id(upload_id):
                        out.append(upload_id)
        return out

    # -- parts -----------------------------------------------------------------------------
    async def upload_part(self, upload_id: str, number: int, data: bytes | bytearray | memoryview) -> Part:
        object_id, multipart_id = split_id(upload_id)
        body = bytes(data)
        res = await self.client.upload_part(Bucket=self.bucket, Key=self.key(object_id), UploadId=multipart_id,
                                            PartNumber=number, Body=body)
        return Part(number, str(res["ETag"]), len(body))

    async def copy_part(self, upload_id: str, number: int, source_id: str, size: int) -> Part:
        """``UploadPartCopy``: the finished object of ``source_id`` becomes part ``number`` (the
        bucket copies it; tusd's ``concatUsingMultipart``)."""
        object_id, multipart_id = split_id(upload_id)
        source = {"Bucket": self.bucket, "Key": self.key(split_id(source_id)[0])}
        res = await self.client.upload_part_copy(Bucket=self.bucket, Key=self.key(object_id), UploadId=multipart_id,
                                                 PartNumber=number, CopySource=source)
        return Part(number, str(res["CopyPartResult"]["ETag"]), size)

    async def get_incomplete(self, upload_id: str) -> bytes:
        object_id, _ = split_id(upload_id)
        res = await self.client.get_object(Bucket=self.bucket, Key=self.part_key(object_id))
        async with res["Body"] as stream:
            data: bytes = await stream.read()
        return data

    async def put_incomplete(self, upload_id: str, data: bytes | bytearray) -> None:
        object_id, _ = split_id(upload_id)
        await self.client.put_object(Bucket=self.bucket, Key=self.part_key(object_id), Body=bytes(data))

    async def delete_incomplete(self, upload_id: str) -> None:
        object_id, _ = split_id(upload_id)
        await self.client.delete_object(Bucket=self.bucket, Key=self.part_key(object_id))

    async def complete(self, upload_id: str, parts: list[Part]) -> None:
        object_id, multipart_id = split_id(upload_id)
        await self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key(object_id), UploadId=multipart_id,
            MultipartUpload={"Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]})

    async def terminate(self, upload_id: str) -> None:
        """Abort the multipart upload and delete the object, ``.part`` and ``.info`` (tusd's ``Terminate``)."""
        object_id, multipart_id = split_id(upload_id)
        try:
            await self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key(object_id),
                                                     UploadId=multipart_id)
        except ClientError as e:
            if _code(e) not in _GONE:
                raise
        for key in (self.key(object_id), self.part_key(object_id), self.info_key(object_id),
                    self.pending_key(object_id)):
            await self.client.delete_object(Bucket=self.bucket, Key=key)

    async def open_object(self, upload_id: str) -> Any:
        """The finished object's body stream (aiobotocore's ``StreamingBody``; close it after use)."""
        object_id, _ = split_id(upload_id)
        try:
            res = await self.client.get_object(Bucket=self.bucket, Key=self.key(object_id))
        except ClientError as e:
            if _code(e) in _GONE:
                raise errors.NOT_FOUND from None
            raise
        return res["Body"]

    async def read(self, upload_id: str, piece: int = 1 << 20) -> AsyncIterator[bytes]:
        """The finished object, streamed in pieces of about ``piece`` bytes."""
        async with await self.open_object(upload_id) as stream:
            while True:
                chunk = await stream.read(piece)
                if not chunk:
                    return
                yield chunk
