"""The errors a TUS request can end with, worded and numbered as tusd v2 words them.

tusd answers every failure with a plain-text body ``ERR_CODE: message\\n``; clients and
dashboards written against tusd match on those codes, so the codes, messages and status codes
below are tusd's (``pkg/handler/unrouted_handler.go``). The ones tusd lacks (checksum,
expiration) follow the same style.
"""

from __future__ import annotations

from collections.abc import Mapping


class TusError(Exception):
    """A protocol error with the response it turns into."""

    def __init__(
        self, code: str, message: str, status: int, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.headers = dict(headers or {})

    @property
    def body(self) -> bytes:
        return f"{self.code}: {self.message}\n".encode()

    def with_headers(self, **headers: str) -> TusError:
        """A copy carrying extra response headers (e.g. the server's ``Upload-Offset`` on 409)."""
        return TusError(self.code, self.message, self.status, {**self.headers, **headers})

    def __repr__(self) -> str:
        return f"TusError({self.status}, {self.code!r})"


def _e(code: str, message: str, status: int) -> TusError:
    return TusError(code, message, status)


# tusd v2's errors, verbatim.
UNSUPPORTED_VERSION = _e(
    "ERR_UNSUPPORTED_VERSION", "missing, invalid or unsupported Tus-Resumable header", 412
)
MAX_SIZE_EXCEEDED = _e("ERR_MAX_SIZE_EXCEEDED", "maximum size exceeded", 413)
INVALID_CONTENT_TYPE = _e("ERR_INVALID_CONTENT_TYPE", "missing or invalid Content-Type header", 400)
INVALID_UPLOAD_LENGTH = _e("ERR_INVALID_UPLOAD_LENGTH", "missing or invalid Upload-Length header", 400)
INVALID_OFFSET = _e("ERR_INVALID_OFFSET", "missing or invalid Upload-Offset header", 400)
NOT_FOUND = _e("ERR_UPLOAD_NOT_FOUND", "upload not found", 404)
LOCK_TIMEOUT = _e("ERR_LOCK_TIMEOUT", "failed to acquire lock before timeout", 500)
MISMATCHED_OFFSET = _e("ERR_MISMATCHED_OFFSET", "mismatched offset", 409)
SIZE_EXCEEDED = _e("ERR_UPLOAD_SIZE_EXCEEDED", "upload's size exceeded", 413)
UPLOAD_NOT_FINISHED = _e("ERR_UPLOAD_NOT_FINISHED", "one of the partial uploads is not finished", 400)
INVALID_CONCAT = _e("ERR_INVALID_CONCAT", "invalid Upload-Concat header", 400)
MODIFY_FINAL = _e("ERR_MODIFY_FINAL", "modifying a final upload is not allowed", 403)
AMBIGUOUS_UPLOAD_LENGTH = _e(
    "ERR_AMBIGUOUS_UPLOAD_LENGTH", "provided both Upload-Length and Upload-Defer-Length", 400
)
INVALID_UPLOAD_DEFER_LENGTH = _e("ERR_INVALID_UPLOAD_LENGTH_DEFER", "invalid Upload-Defer-Length header", 400)
UPLOAD_INTERRUPTED = _e(
    "ERR_UPLOAD_INTERRUPTED", "upload has been interrupted by another request for this upload resource", 400
)
SERVER_SHUTDOWN = _e(
    "ERR_SERVER_SHUTDOWN", "request has been interrupted because the server is shutting down", 503
)
UNEXPECTED_EOF = _e("ERR_UNEXPECTED_EOF", "server expected to receive more bytes", 400)
# 500 on purpose (tusd): most clients retry a 5XX but not a 4XX.
READ_TIMEOUT = _e("ERR_READ_TIMEOUT", "timeout while reading request body", 500)

# Additions in tusd's style for the extensions tusd does not implement.
CHECKSUM_MISMATCH = _e("ERR_CHECKSUM_MISMATCH", "checksum mismatch", 460)
INVALID_CHECKSUM = _e("ERR_INVALID_CHECKSUM", "invalid Upload-Checksum header", 400)
UNSUPPORTED_CHECKSUM = _e("ERR_UNSUPPORTED_CHECKSUM_ALGORITHM", "unsupported checksum algorithm", 400)
UPLOAD_EXPIRED = _e("ERR_UPLOAD_EXPIRED", "upload has expired", 410)
CONCAT_NOT_PARTIAL = _e("ERR_INVALID_CONCAT", "invalid Upload-Concat header: not a partial upload", 400)
CONCAT_REPEATED = _e(
    "ERR_INVALID_CONCAT", "invalid Upload-Concat header: a partial upload is listed more than once", 400
)

# Limits tusd leaves to the deployment (issue 10), answered in tusd's format. A full store is
# 507 (tusd answers a failed write with 500 ERR_INTERNAL_SERVER_ERROR, "no space left on
# device"): a 5XX, so clients retry it like tusd's, and specific enough for a dashboard. Too
# many unfinished uploads is a 4XX: clients must not retry it in a loop.
STORAGE_FULL = _e("ERR_STORAGE_FULL", "the upload storage is full; retry later", 507)
TOO_MANY_UPLOADS = _e(
    "ERR_TOO_MANY_UPLOADS", "too many unfinished uploads; finish or delete some first", 429
)
SERVER_BUSY = _e("ERR_SERVER_BUSY", "the server is busy receiving other uploads; retry later", 503)
