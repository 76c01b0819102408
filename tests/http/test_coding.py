"""dicomproxy.http.coding: the coding a rewritten body goes out in, and its streaming compressor."""

from __future__ import annotations

import gzip
import zlib

import pytest

from dicomproxy.http.coding import Encoder, preferred


@pytest.mark.parametrize(("header", "coding"), [
    (None, None), (b"", None), (b"identity", None), (b"gzip", b"gzip"), (b"deflate, gzip", b"gzip"),
    (b"GZIP;q=0.5", b"gzip"), (b"gzip;q=0, deflate", b"deflate"), (b"gzip;q=0", None), (b"*", b"gzip"),
    (b"*, gzip;q=0", b"deflate"), (b"br", None), (b"gzip;q=bad", None),
])
def test_the_preferred_coding_follows_accept_encoding(header: bytes | None, coding: bytes | None) -> None:
    assert preferred(header) == coding


@pytest.mark.parametrize(("coding", "decode"), [
    (b"gzip", gzip.decompress), (b"deflate", zlib.decompress),
])
def test_the_encoder_streams_what_decodes_to_the_body(coding: bytes, decode: object) -> None:
    body = b'{"00081190": {"vr": "UR", "Value": ["https://gw/dicom-web/studies/1.2.3"]}}' * 5000
    enc = Encoder(coding)
    out = b"".join(enc.feed(body[i:i + 65536]) for i in range(0, len(body), 65536)) + enc.feed(b"") + enc.flush()
    assert decode(out) == body  # type: ignore[operator]
    assert len(out) < len(body) // 10
