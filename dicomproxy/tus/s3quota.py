"""Upload quotas of the S3 store (``Tus:Store`` ``s3``), counted for the whole cluster.

The file store's :mod:`.quota` counts one folder from inside one process; replicas sharing a
bucket need one count for all of them, or each would grant the whole ``Tus:MaxStorageGB`` and
``Tus:MaxUploadsPerUser`` on its own. This module owns that count and nothing else (the bytes
themselves are :mod:`.s3store`'s, the requests :mod:`.s3app`'s). Its answers are the file
store's: 429 ``ERR_TOO_MANY_UPLOADS`` when the caller already has ``Tus:MaxUploadsPerUser``
unfinished uploads, else 507 ``ERR_STORAGE_FULL`` (``Retry-After: 60``) when the declared
``Upload-Length`` (at least one byte) does not fit in what is left of ``Tus:MaxStorageGB``.

What differs from the file store, and why:

* bytes are **reserved at creation by the declared ``Upload-Length``** (the file store grants
  them as they are written): an S3 part goes to the bucket in one request and is never cut
  short, so the room must be known before the upload begins. A deferred length reserves
  nothing until the PATCH that declares it (refused with 507 if it does not fit then);
* the reservation is held while the upload is unfinished and while it is stored (finished,
  not yet imported and deleted, or kept with ``Tus:KeepAfterImport``); finishing ends its
  count against ``MaxUploadsPerUser``, termination and the deletion after an import free its
  bytes; ``Tus:MinFreeDiskGB`` has no meaning for a bucket and is not applied.

With ``Cluster:Redis`` the count is in Redis and every change is one Lua script (check and
reserve atomically, so two replicas cannot both take the last slot); without it (one replica)
the same bookkeeping is in memory. Either drifts when a replica dies between its S3 calls and
its count, or when the bucket's lifecycle rule (``AbortIncompleteMultipartUpload``) aborts an
upload: :meth:`S3Quota.reconcile` recounts the bucket (one listing of the prefix, one of its
multipart uploads, one GET per ``.info``) at start and every ``Tus:S3:QuotaReconcileSeconds``,
on one replica at a time (whoever takes the lease key ``SET NX PX <period>``; the others skip
that round). Measured on SeaweedFS (this repository's test peer, shared 2-core machine): 400
uploads recount in 3.9 s (about 10 ms per ``.info``, 16 GETs in flight), the listings alone in
90 ms, so the default 60 s period costs one replica a few seconds a minute at 500 uploads.
An upload created or released while the listing runs keeps its live count (each
change stamps the upload in a sorted set with Redis's clock; :data:`GRACE` before the listing
counts as during), so the recount never undoes a reservation it did not see. An upload whose
``.info`` is there but whose multipart upload is neither live nor completed was aborted by the
lifecycle rule: it counts nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import ClientError

from dicomproxy.background import BackgroundTask, every
from dicomproxy.tus import errors
from dicomproxy.tus.s3store import S3Store, split_id
from dicomproxy.tus.store import INFO_SUFFIX, is_valid_id, owner_of

log = logging.getLogger(__name__)

GB = 1_000_000_000
_FULL, _TOO_MANY = -2, -1
_INFO_READS = 16  # .info GETs in flight during a recount
# A reservation is made before its .info is written (two S3 requests, milliseconds): a recount keeps
# the live count of every upload changed this long before its listing began, so it never drops one
# whose .info was not written yet when the prefix was listed.
GRACE = 5.0

# KEYS: bytes hash, owner hash, total, the owner's open set, changed zset.
# ARGV: oid, owner, bytes, maxOpen (0: not counted), maxBytes, room needed, 1 if it is unfinished
_RESERVE = """
local maxo = tonumber(ARGV[4])
if maxo > 0 and redis.call('SCARD', KEYS[4]) >= maxo then return -1 end
local maxb = tonumber(ARGV[5])
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
if maxb > 0 and total + tonumber(ARGV[6]) > maxb then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[3], ARGV[3])
if ARGV[7] == '1' then redis.call('SADD', KEYS[4], ARGV[1]) end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[5], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return 0
"""
# KEYS: bytes hash, total, changed zset. ARGV: oid, bytes (the declared length), maxBytes
_GROW = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local delta = tonumber(ARGV[2]) - old
local maxb = tonumber(ARGV[3])
if maxb > 0 and delta > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') + delta > maxb then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], tostring(delta))
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return 0
"""
# The owner's open set is named from the owner hash: standalone Redis (Cluster:Redis is one server).
# KEYS: bytes hash, owner hash, total, changed zset. ARGV: oid, key prefix, 1 to free the bytes too
_RELEASE = """
local owner = redis.call('HGET', KEYS[2], ARGV[1])
if owner then redis.call('SREM', ARGV[2] .. 'open:' .. owner, ARGV[1]) end
if ARGV[3] == '1' then
  local bytes = redis.call('HGET', KEYS[1], ARGV[1])
  if bytes then redis.call('DECRBY', KEYS[3], bytes) end
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], t[1] * 1000 + math.floor(t[2] / 1000), ARGV[1])
return 0
"""
# ARGV: key prefix, scan start (ms, Redis clock), then (oid, owner, bytes, open 0/1) per upload found
_APPLY = """
local K = ARGV[1]
local H, O, T, C = K .. 'bytes', K .. 'owner', K .. 'total', K .. 'changed'
local keep = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', C, ARGV[2], '+inf')) do
  local owner = redis.call('HGET', O, id)
  if owner then
    keep[id] = {owner, redis.call('HGET', H, id) or '0', redis.call('SISMEMBER', K .. 'open:' .. owner, id)}
  else
    keep[id] = false
  end
end
local owners = {}
for _, owner in ipairs(redis.call('HVALS', O)) do owners[owner] = true end
for owner in pairs(owners) do redis.call('DEL', K .. 'open:' .. owner) end
redis.call('DEL', H, O)
local total = 0
local function put(id, owner, bytes, open)
  redis.call('HSET', H, id, bytes)
  redis.call('HSET', O, id, owner)
  total = total + tonumber(bytes)
  if open == 1 then redis.call('SADD', K .. 'open:' .. owner, id) end
end
for i = 3, #ARGV, 4 do
  if keep[ARGV[i]] == nil then put(ARGV[i], ARGV[i + 1], ARGV[i + 2], tonumber(ARGV[i + 3])) end
end
for id, v in pairs(keep) do
  if v then put(id, v[1], v[2], v[3]) end
end
redis.call('SET', T, string.format('%.0f', total))
redis.call('ZREMRANGEBYSCORE', C, '-inf', '(' .. ARGV[2])
return string.format('%.0f', total)
"""


@dataclass
class Found:
    """One upload the bucket holds: its owner, its reserved bytes, whether it is unfinished."""

    owner: str
    size: int
    open: bool


@dataclass
class Recount:
    uploads: dict[str, Found] = field(default_factory=dict)

    @property
    def used(self) -> int:
        return sum(f.size for f in self.uploads.values())


def _owner_key(owner: str | None) -> str:
    return owner or ""


class S3Quota:
    """``Tus:MaxStorageGB`` and ``Tus:MaxUploadsPerUser`` for one bucket prefix; 0 turns a limit off.

    ``redis`` (the Cluster:Redis client) shares the count between replicas; ``None`` keeps it here.
    ``also`` runs after each recount this replica won (the pending-completion scan of :mod:`.s3app`)."""

    def __init__(self, s3: S3Store, *, max_bytes: int, max_unfinished: int, period: float,
                 redis: Any = None, also: Callable[[], Awaitable[None]] | None = None,
                 grace: float = GRACE) -> None:
        self.s3 = s3
        self.max_bytes = max_bytes
        self.max_unfinished = max_unfinished
        self.period = period
        self.redis = redis
        self.also = also
        self.grace = grace
        self.key = f"dicomproxy:tus:quota:{{{s3.bucket}/{s3.prefix}}}:"
        self.recounts = 0  # recounts this replica ran (health, tests)
        self._local = Recount()
        self._changed: dict[str, float] = {}
        self._recounting = BackgroundTask("tus-s3-quota-recount")
        if redis is not None:  # EVALSHA, the script text sent again only after a Redis restart
            self._reserve_lua = redis.register_script(_RESERVE)
            self._grow_lua = redis.register_script(_GROW)
            self._release_lua = redis.register_script(_RELEASE)
            self._apply_lua = redis.register_script(_APPLY)

    # -- requests --------------------------------------------------------------------------
    async def reserve(self, object_id: str, owner: str | None, size: int, *, unfinished: bool = True) -> None:
        """Count a new upload of ``size`` declared bytes (0: deferred or empty); raises
        ``TOO_MANY_UPLOADS`` or ``STORAGE_FULL`` as the file store does, reserving nothing.
        ``unfinished=False``: a final upload (the file store's concatenation), finished as it is
        created: not counted against ``MaxUploadsPerUser``, and needing only its own bytes."""
        need = max(size, 1) if unfinished else size
        max_open = self.max_unfinished if unfinished else 0
        if self.redis is not None:
            k = self.key
            rc = int(await self._reserve_lua(
                keys=[k + "bytes", k + "owner", k + "total", k + "open:" + _owner_key(owner), k + "changed"],
                args=[object_id, _owner_key(owner), str(size), str(max_open), str(self.max_bytes), str(need),
                      "1" if unfinished else "0"]))
        else:
            rc = self._reserve_here(object_id, _owner_key(owner), size, need, max_open, unfinished)
        if rc == _TOO_MANY:
            log.warning("tus: %s has %d unfinished uploads (Tus:MaxUploadsPerUser = %d, whole cluster); creation "
                        "refused", owner or "the anonymous user", self.max_unfinished, self.max_unfinished)
            raise errors.TOO_MANY_UPLOADS
        if rc == _FULL:
            await self._full(size)

    async def grow(self, object_id: str, size: int) -> None:
        """A deferred length is declared: reserve ``size`` bytes for it or raise ``STORAGE_FULL``."""
        if self.redis is not None:
            k = self.key
            rc = int(await self._grow_lua(keys=[k + "bytes", k + "total", k + "changed"],
                                          args=[object_id, str(size), str(self.max_bytes)]))
        else:
            rc = self._grow_here(object_id, size)
        if rc == _FULL:
            await self._full(size)

    async def finished(self, object_id: str) -> None:
        """The last byte is stored: no longer unfinished (its bytes stay reserved until it is deleted)."""
        await self._release(object_id, free=False)

    async def removed(self, object_id: str) -> None:
        """Terminated, deleted after its import, or expired: its bytes are free again."""
        await self._release(object_id, free=True)

    async def used(self) -> int:
        if self.redis is not None:
            return int(await self.redis.get(self.key + "total") or 0)
        return self._local.used

    async def _full(self, size: int) -> None:
        used = await self.used()
        log.warning("tus: upload of %d bytes refused: %.2f of Tus:MaxStorageGB = %g GB reserved in the bucket "
                    "(whole cluster); raise the limit or wait for imports to finish", size, used / GB,
                    self.max_bytes / GB)
        raise errors.STORAGE_FULL.with_headers(**{"Retry-After": "60"})

    async def _release(self, object_id: str, *, free: bool) -> None:
        if self.redis is not None:
            k = self.key
            await self._release_lua(keys=[k + "bytes", k + "owner", k + "total", k + "changed"],
                                    args=[object_id, k, "1" if free else "0"])
            return
        found = self._local.uploads.get(object_id)
        if found is not None:
            found.open = False
            if free:
                del self._local.uploads[object_id]
        self._changed[object_id] = time.time()

    # -- the in-process count (no Cluster:Redis) ---------------------------------------------
    def _reserve_here(self, object_id: str, owner: str, size: int, need: int, max_open: int, unfinished: bool) -> int:
        ups = self._local.uploads
        if max_open > 0 and sum(1 for f in ups.values() if f.open and f.owner == owner) >= max_open:
            return _TOO_MANY
        if self.max_bytes > 0 and self._local.used + need > self.max_bytes:
            return _FULL
        ups[object_id] = Found(owner, size, unfinished)
        self._changed[object_id] = time.time()
        return 0

    def _grow_here(self, object_id: str, size: int) -> int:
        found = self._local.uploads.setdefault(object_id, Found("", 0, True))
        delta = size - found.size
        if self.max_bytes > 0 and delta > 0 and self._local.used + delta > self.max_bytes:
            return _FULL
        found.size = size
        self._changed[object_id] = time.time()
        return 0

    # -- the recount -------------------------------------------------------------------------
    async def start(self) -> None:
        """Recount now (unless another replica just did), then every ``period`` seconds; a
        failure is logged, not raised (the count holds meanwhile, the next round tries again)."""
        try:
            await self.tick()
        except Exception as e:
            self._recount_failed(e)
        self._recounting.start(lambda: every(self.period, self.tick, self._recount_failed))

    async def aclose(self) -> None:
        await self._recounting.stop()

    def _recount_failed(self, e: Exception) -> None:
        # the bucket or Redis away: the next round tries again
        log.warning("tus: recounting the S3 upload quota failed (%s); next try in %g s "
                    "(Tus:S3:QuotaReconcileSeconds)", e, self.period)

    async def tick(self) -> bool:
        """One round: recount if this replica wins the round's lease (always without Redis)."""
        if self.redis is not None:
            lease = max(int(self.period * 1000) - 50, 50)
            if not await self.redis.set(self.key + "recount", secrets.token_hex(8), nx=True, px=lease):
                return False
        await self.reconcile()
        if self.also is not None:
            await self.also()
        return True

    async def reconcile(self) -> int:
        """Replace the count with the bucket's (keeping uploads changed meanwhile); returns the bytes used."""
        if self.redis is not None:
            sec, usec = await self.redis.time()
            since = int(sec) * 1000 + int(usec) // 1000 - int(self.grace * 1000)
        else:
            since_local = time.time() - self.grace
        found = await self.scan()
        self.recounts += 1
        if self.redis is not None:
            args: list[str] = [self.key, str(since)]
            for oid, f in found.uploads.items():
                args += [oid, f.owner, str(f.size), "1" if f.open else "0"]
            used = int(await self._apply_lua(keys=[], args=args))
        else:
            for oid, f in self._local.uploads.items():
                if self._changed.get(oid, 0) >= since_local:
                    found.uploads[oid] = f
            for oid in [o for o, t in self._changed.items() if t >= since_local and o not in self._local.uploads]:
                found.uploads.pop(oid, None)
            self._changed = {o: t for o, t in self._changed.items() if t >= since_local}
            self._local = found
            used = found.used
        log.info("tus: S3 upload quota recounted from the bucket: %d uploads, %d bytes reserved",
                 len(found.uploads), used)
        return used

    async def scan(self) -> Recount:
        """What the bucket holds under the prefix: every upload with an ``.info`` that is live
        (its multipart upload listed) or stored (its object there)."""
        objects, infos = await self._list_objects()
        live = await self._live_multiparts()
        out = Recount()
        gate = asyncio.Semaphore(_INFO_READS)

        async def one(object_id: str) -> None:
            async with gate:
                info = await self._info(object_id)
            if info is None:
                return
            upload_id = str(info.get("ID", ""))
            try:
                oid, multipart_id = split_id(upload_id)
            except errors.TusError:
                return
            stored = oid in objects
            if not stored and multipart_id not in live.get(oid, ()):
                return  # aborted (the lifecycle rule) or half-created: nothing to count
            deferred = bool(info.get("SizeIsDeferred"))
            size = 0 if deferred else int(info.get("Size") or 0)
            out.uploads[oid] = Found(_owner_key(owner_of(info)), size, not stored)

        await asyncio.gather(*(one(oid) for oid in infos))
        return out

    async def _list_objects(self) -> tuple[set[str], set[str]]:
        prefix = self.s3.prefix
        objects: set[str] = set()
        infos: set[str] = set()
        paginator = self.s3.client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix):
            for obj in page.get("Contents", ()):
                name = str(obj["Key"])[len(prefix):]
                if name.endswith(INFO_SUFFIX) and is_valid_id(name[: -len(INFO_SUFFIX)]):
                    infos.add(name[: -len(INFO_SUFFIX)])
                elif is_valid_id(name):
                    objects.add(name)
        return objects, infos

    async def _live_multiparts(self) -> dict[str, set[str]]:
        prefix = self.s3.prefix
        live: dict[str, set[str]] = {}
        paginator = self.s3.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self.s3.bucket, Prefix=prefix):
            for up in page.get("Uploads", ()):
                live.setdefault(str(up["Key"])[len(prefix):], set()).add(str(up["UploadId"]))
        return live

    async def _info(self, object_id: str) -> dict[str, Any] | None:
        try:
            res = await self.s3.client.get_object(Bucket=self.s3.bucket, Key=self.s3.info_key(object_id))
            async with res["Body"] as stream:
                raw = await stream.read()
            info = json.loads(raw)
        except (ClientError, ValueError):
            return None  # deleted meanwhile, or not tusd's JSON
        return info if isinstance(info, dict) else None
