"""Parsing and formatting of the TUS request/response headers, as tusd v2 does it.

Pure functions, no I/O: each one mirrors a tusd helper (named in its docstring) so the two
servers read the same header the same way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

from dicomproxy.tus import errors

TUS_VERSION = "1.0.0"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"

# Go's strconv.ParseInt(s, 10, 64): an optional sign and decimal digits, nothing else.
_INT = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1

CHECKSUM_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "md5": hashlib.md5,
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}


def parse_int(value: str | None) -> int | None:
    """An int64 the way tusd parses ``Upload-Length``/``Upload-Offset``; None if malformed."""
    if value is None or not _INT.fullmatch(value):
        return None
    n = int(value)
    return n if -_INT64_MAX - 1 <= n <= _INT64_MAX else None


def parse_metadata(header: str | None) -> dict[str, str]:
    """tusd's ``ParseMetadataHeader``: ``key base64value`` pairs separated by commas.

    Like tusd, a malformed element (more than one space, an empty key, a value that is not
    padded standard base64) is dropped, not rejected: clients send odd metadata and the
    upload itself is still wanted. An empty header is valid and means no metadata.
    """
    meta: dict[str, str] = {}
    if not header:
        return meta
    for element in header.split(","):
        parts = element.strip().split(" ")
        if len(parts) > 2 or not parts[0]:
            continue
        value = ""
        if len(parts) == 2:
            try:
                value = base64.b64decode(parts[1], validate=True).decode("utf-8", errors="replace")
            except (binascii.Error, ValueError):
                continue
        meta[parts[0]] = value
    return meta


def serialize_metadata(meta: Mapping[str, str]) -> str:
    """The ``Upload-Metadata`` value for a HEAD response (a key with no value stands alone)."""
    out = []
    for key, value in meta.items():
        out.append(f"{key} {base64.b64encode(value.encode()).decode()}" if value else key)
    return ",".join(out)


def extract_id_from_url(url: str, base_path: str) -> str:
    """tusd's ``extractIDFromURL``: everything after the base path, slashes trimmed."""
    _, sep, rest = url.partition(base_path)
    if not sep:
        raise errors.NOT_FOUND
    return rest.strip("/")


def parse_concat(header: str, base_path: str) -> tuple[bool, bool, list[str]]:
    """tusd's ``parseConcat``: ``partial`` or ``final;<url> <url> ...`` -> (partial, final, ids)."""
    if not header:
        return False, False, []
    if header == "partial":
        return True, False, []
    ids: list[str] = []
    prefix = "final;"
    if header.startswith(prefix) and len(header) > len(prefix):
        for value in header[len(prefix) :].split(" "):
            value = value.strip()
            if value:
                ids.append(extract_id_from_url(value, base_path))
    if not ids:
        raise errors.INVALID_CONCAT
    return False, True, ids


def parse_checksum(header: str) -> tuple[str, bytes]:
    """``Upload-Checksum: <algorithm> <base64 digest>`` -> (algorithm, digest)."""
    parts = header.strip().split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise errors.INVALID_CHECKSUM
    algorithm = parts[0].lower()
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise errors.UNSUPPORTED_CHECKSUM
    try:
        digest = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise errors.INVALID_CHECKSUM from None
    return algorithm, digest


@dataclass(frozen=True)
class PatchHeaders:
    """A PATCH's headers, checked as tusd's ``PatchFile`` does before it looks at the upload;
    both stores (:mod:`.protocol`, :mod:`.s3app`) take them from :func:`patch_headers`."""

    offset: int
    checksum_header: str | None  # parsed (:func:`checksum_of`) where the store verifies it
    upload_length: str  # "" = none (tusd: an empty header is no header)

    def declared_length(self, size_is_deferred: bool, offset: int, max_size: int) -> int | None:
        """The length a deferred-length upload declares now (``max_size`` 0: no limit), or None."""
        if not self.upload_length:
            return None
        if not size_is_deferred:
            raise errors.INVALID_UPLOAD_LENGTH
        length = parse_int(self.upload_length)
        if length is None or length < 0 or length < offset or (0 < max_size < length):
            raise errors.INVALID_UPLOAD_LENGTH
        return length


def checksum_of(hdrs: Mapping[str, str]) -> tuple[str, bytes] | None:
    """(algorithm, digest) of ``Upload-Checksum`` (a PATCH, or a POST with its first chunk), None
    without one; 400 (``ERR_INVALID_CHECKSUM``/``ERR_UNSUPPORTED_CHECKSUM``) for a bad one."""
    header = hdrs.get("upload-checksum")
    return parse_checksum(header) if header is not None else None


def patch_headers(hdrs: Mapping[str, str]) -> PatchHeaders:
    """Content-Type and Upload-Offset (400 ``ERR_INVALID_CONTENT_TYPE``/``ERR_INVALID_OFFSET``, as
    tusd); the rest is read for the checks made once the upload is known."""
    if hdrs.get("content-type") != OFFSET_OCTET_STREAM:
        raise errors.INVALID_CONTENT_TYPE
    offset = parse_int(hdrs.get("upload-offset"))
    if offset is None or offset < 0:
        raise errors.INVALID_OFFSET
    return PatchHeaders(offset, hdrs.get("upload-checksum"), hdrs.get("upload-length", ""))


def http_date(epoch: float) -> str:
    """RFC 7231 date, the format of ``Upload-Expires``."""
    return formatdate(epoch, usegmt=True)


_FORWARDED_HOST = re.compile(r'host="?([^;"]+)')
_FORWARDED_PROTO = re.compile(r"proto=(https?)")


def host_and_proto(headers: Mapping[str, str], scope: Mapping[str, Any]) -> tuple[str, str]:
    """tusd's ``getHostAndProtocol`` with forwarded headers honoured (``-behind-proxy``)."""
    proto = "https" if scope.get("scheme") == "https" else "http"
    host = headers.get("host", "")
    if not host:
        server = scope.get("server") or ("127.0.0.1", 80)
        host = f"{server[0]}:{server[1]}"
    if h := headers.get("x-forwarded-host"):
        host = h
    if (h := headers.get("x-forwarded-proto")) in ("http", "https"):
        proto = h
    if h := headers.get("forwarded"):
        if m := _FORWARDED_HOST.search(h):
            host = m.group(1)
        if m := _FORWARDED_PROTO.search(h):
            proto = m.group(1)
    if proto == "http" and host.endswith(":80"):
        host = host[:-3]
    if proto == "https" and host.endswith(":443"):
        host = host[:-4]
    return host, proto


def first_values(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """ASGI headers -> {lower-case name: first value, stripped} (Go's ``Header.Get``)."""
    out: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        if key not in out:
            out[key] = value.decode("latin-1").strip()
    return out


# What tusd's default CORS config allows and exposes, plus the checksum and expiration headers.
CORS_ALLOW_METHODS = "POST, HEAD, PATCH, OPTIONS, GET, DELETE"
CORS_ALLOW_HEADERS = (
    "Authorization, Origin, X-Requested-With, X-Request-ID, X-HTTP-Method-Override, Content-Type, "
    "Upload-Length, Upload-Offset, Tus-Resumable, Upload-Metadata, Upload-Defer-Length, Upload-Concat, "
    "Upload-Checksum, Upload-Incomplete, Upload-Complete, Upload-Draft-Interop-Version"
)
CORS_EXPOSE_HEADERS = (
    "Upload-Offset, Location, Upload-Length, Tus-Version, Tus-Resumable, Tus-Max-Size, Tus-Extension, "
    "Tus-Checksum-Algorithm, Upload-Metadata, Upload-Defer-Length, Upload-Concat, Upload-Expires, "
    "Upload-Incomplete, Upload-Complete, Upload-Draft-Interop-Version"
)
CORS_MAX_AGE = "86400"
