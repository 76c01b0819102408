"""Content coding of rewritten answers: a body the gateway rewrites (:mod:`dicomproxy.http.rewrite`)
goes to the client in the coding it would have had direct, ``gzip`` or ``deflate``, when the
client's ``Accept-Encoding`` admits one.

How (measured, a 2.5 MB QIDO-RS JSON answer in 64 KB chunks, zlib on this machine): the PACS is
asked for ``identity`` (as before) and the rewritten body is compressed in streaming by
``zlib.compressobj`` at zlib's default level (3.8 ms/MB; level 1: 2.2 ms/MB, 13 % larger). The
alternative, letting the PACS compress and decoding before rewriting, costs the decode on top
(1.75 ms/MB) and the PACS's own compression: asking for identity is cheaper for both ends and
costs only bytes on the gateway-PACS link (usually a LAN). The compressor is fed each chunk as
it comes and emits what zlib has ready, so the body is never held whole (zlib keeps its 32 KB
window); answers that are not rewritten are passed as they are, with the PACS's own coding.
"""

from __future__ import annotations

import zlib

GZIP = b"gzip"
DEFLATE = b"deflate"
_WBITS = {GZIP: 16 + zlib.MAX_WBITS, DEFLATE: zlib.MAX_WBITS}  # HTTP "deflate" is the zlib format (RFC 9110)


def preferred(accept_encoding: bytes | None) -> bytes | None:
    """The coding to send a rewritten body in: ``gzip`` if the client admits it, else ``deflate``,
    else None (identity). ``q=0`` refuses a coding; ``*`` admits both (RFC 9110 12.5.3)."""
    if not accept_encoding:
        return None
    admitted: dict[bytes, bool] = {}
    for item in accept_encoding.lower().split(b","):
        name, _, params = item.partition(b";")
        name = name.strip()
        q = 1.0
        for param in params.split(b";"):
            key, _, value = param.strip().partition(b"=")
            if key == b"q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name:
            admitted[name] = q > 0
    star = admitted.get(b"*", False)
    for coding in (GZIP, DEFLATE):
        if admitted.get(coding, star and coding not in admitted):
            return coding
    return None


class Encoder:
    """One body's streaming compressor."""

    def __init__(self, coding: bytes) -> None:
        self.coding = coding
        self._z = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, _WBITS[coding])

    def feed(self, data: bytes) -> bytes:
        return self._z.compress(data) if data else b""

    def flush(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)
