"""Federated QIDO-RS on a ``Federated`` group: one search, asked of every available member at
once, answered with the union.

* which requests: ``GET`` whose path ends in ``/studies``, ``/series`` or ``/instances`` (the
  QIDO-RS resources, at any depth: ``/studies/{uid}/series`` too);
* each member gets the same path and query on its own ``Url``, with ``offset`` dropped and
  ``limit`` raised to ``offset + limit`` (capped at ``MAX_MERGED``), through its own client
  (its credentials, none of the caller's), within its ``Upstream:ReadTimeoutSeconds``;
* the JSON arrays are merged in member order and de-duplicated by the level's UID
  (StudyInstanceUID 0020000D, SeriesInstanceUID 0020000E, SOPInstanceUID 00080018): the first
  member's copy wins; then the caller's ``offset``/``limit`` apply to the merged list;
* a member that is ejected, does not answer, answers an error or more than ``MAX_MEMBER_BYTES``
  is left out and named in ``X-DicomProxy-Missing-Members`` (comma-separated); when none
  answers, 502.

Bounded memory: at most ``MAX_MEMBER_BYTES`` per member answer and ``MAX_MERGED`` merged
entries. Retrieve URLs (0008,1190) in the answers are the members' own and are passed as they
are (a retrieve through the gateway on the group goes to the member its balancer picks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import httpx

from dicomproxy.upstream.member import Member

if TYPE_CHECKING:
    from dicomproxy.upstream.directory import Upstreams

log = logging.getLogger(__name__)

LEVEL_UID = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}
MAX_MERGED = 10_000
MAX_MEMBER_BYTES = 32 << 20
MISSING_HEADER = b"x-dicomproxy-missing-members"


def is_search(scope: Any) -> bool:
    return scope["method"] == "GET" and scope["path"].rstrip("/").rpartition("/")[2] in LEVEL_UID


def _paging(query: str) -> tuple[list[tuple[str, str]], int, int | None]:
    """The query without offset/limit, the offset, the limit (None: none asked)."""
    rest: list[tuple[str, str]] = []
    offset, limit = 0, None
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k == "offset" and v.isdigit():
            offset = int(v)
        elif k == "limit" and v.isdigit():
            limit = int(v)
        else:
            rest.append((k, v))
    return rest, offset, limit


async def _ask(member: Member, path: str, query: list[tuple[str, str]]) -> list[Any]:
    upstream = member.upstream
    member.begin()
    try:
        async with asyncio.timeout(upstream.settings.read_timeout):
            async with upstream.client.stream("GET", f"{upstream.url(path)}?{urlencode(query)}",
                                              headers={"Accept": "application/dicom+json"}) as answer:
                if answer.status_code == 204:
                    member.answered()
                    return []
                if answer.status_code >= 400:
                    if answer.status_code >= 500:
                        member.failed(f"answered {answer.status_code}")
                    raise ValueError(f"answered {answer.status_code}")
                body = bytearray()
                async for chunk in answer.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_MEMBER_BYTES:
                        raise ValueError(f"answer over {MAX_MEMBER_BYTES >> 20} MB")
        member.answered()
        data = json.loads(body) if body.strip() else []
        if not isinstance(data, list):
            raise ValueError("answer is not a JSON array")
        return data
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        member.failed(str(e) or type(e).__name__)
        raise
    finally:
        member.end()


def _uid(item: Any, tag: str) -> str | None:
    try:
        return str(item[tag]["Value"][0])
    except (KeyError, IndexError, TypeError):
        return None


def merge(answers: Sequence[list[Any]], tag: str, offset: int, limit: int | None) -> list[Any]:
    """The union of ``answers`` by ``tag`` (first copy wins; entries without it are all kept), paged."""
    seen: set[str] = set()
    merged: list[Any] = []
    for answer in answers:
        for item in answer:
            uid = _uid(item, tag)
            if uid is not None:
                if uid in seen:
                    continue
                seen.add(uid)
            merged.append(item)
            if len(merged) >= MAX_MERGED:
                break
    end = None if limit is None else offset + limit
    return merged[offset:end]


async def search(scope: Any, send: Any, members: Sequence[Member], upstreams: Upstreams) -> None:
    level = scope["path"].rstrip("/").rpartition("/")[2]
    query, offset, limit = _paging(scope.get("query_string", b"").decode("latin-1"))
    ask = min(MAX_MERGED, offset + limit) if limit is not None else MAX_MERGED
    now = time.monotonic()
    asked = [m for m in members if m.available(now)]
    missing = [m.name for m in members if m not in asked]
    path = scope["path"]
    results = await asyncio.gather(*(_ask(m, path, [*query, ("limit", str(ask))]) for m in asked),
                                   return_exceptions=True)
    answers: list[list[Any]] = []
    for member, result in zip(asked, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("federated search: %s did not answer: %s", member.name, result)
            missing.append(member.name)
            upstreams.requests.inc(upstream=member.name, status="error")
        else:
            answers.append(result)
            upstreams.requests.inc(upstream=member.name, status="2xx")
    headers = [(b"content-type", b"application/dicom+json")]
    if missing:
        headers.append((MISSING_HEADER, ", ".join(missing).encode()))
    if not answers:
        status, body = 502, json.dumps({"error": "no member of the group answered", "missing": missing}).encode()
        headers[0] = (b"content-type", b"application/json")
    else:
        status, body = 200, json.dumps(merge(answers, LEVEL_UID[level], offset, limit)).encode()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers,
                "upstream": ",".join(m.name for m in asked)})
    await send({"type": "http.response.body", "body": body})
