"""The streaming URL rewriter, byte by byte: every split point of the upstream base across chunks,
JSON escaping, look-alike origins, multipart parts with their lengths, binary parts untouched."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomproxy.http.rewrite import (
    PART_HOLD,
    MultipartRewriter,
    TextRewriter,
    UrlMap,
    content_rewriter,
)

OLD = b"http://pacs.local:8042"
NEW = b"https://gw.example.org"
URLS = UrlMap.of(OLD, NEW)


def run(rewriter: TextRewriter | MultipartRewriter, chunks: list[bytes]) -> bytes:
    return b"".join(rewriter.feed(c) for c in chunks) + rewriter.flush()


def splits(data: bytes, cuts: tuple[int, ...]) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


JSON = (b'[{"00081190":{"vr":"UR","Value":["http://pacs.local:8042/dicom-web/studies/1.2.3"]},'
        b'"x":"http:\\/\\/pacs.local:8042\\/dicom-web\\/studies\\/1.2.3","end":"http://pacs.local:8042"}]')
EXPECTED = JSON.replace(OLD, NEW).replace(b"http:\\/\\/pacs.local:8042", b"https:\\/\\/gw.example.org")


def test_every_single_split_point() -> None:
    for cut in range(len(JSON) + 1):
        assert run(TextRewriter(URLS), splits(JSON, (cut,))) == EXPECTED, cut


def test_every_pair_of_split_points_around_the_base() -> None:
    start = JSON.index(OLD)
    for a in range(start - 1, start + len(OLD) + 2):
        for b in range(a, start + len(OLD) + 3):
            assert run(TextRewriter(URLS), splits(JSON, (a, b))) == EXPECTED, (a, b)


def test_one_byte_chunks() -> None:
    rewriter = TextRewriter(URLS)
    assert run(rewriter, [JSON[i:i + 1] for i in range(len(JSON))]) == EXPECTED
    assert rewriter.replaced == 3


@pytest.mark.parametrize("text", [
    b'"http://pacs.local:80420/x"',  # another port
    b'"http://pacs.local:8042x/"',  # another host
    b'"http://pacs.local:8042.evil/"',
    b'"http://pacs.local:804"',  # a prefix of the base only
    b'"https://pacs.local:8042/x"',  # another scheme
])
def test_look_alikes_are_left_alone(text: bytes) -> None:
    for cut in range(len(text) + 1):
        assert run(TextRewriter(URLS), splits(text, (cut,))) == text


def test_xml_and_the_base_at_the_very_end() -> None:
    xml = b'<DicomAttribute tag="00081190" vr="UR"><Value number="1">http://pacs.local:8042/dicom-web</Value>'
    assert URLS.replace_all(xml) == xml.replace(OLD, NEW)
    assert URLS.replace_all(b"see " + OLD) == b"see " + NEW
    assert URLS.replace_all(OLD) == NEW


def test_a_path_prefix_is_part_of_the_base() -> None:
    urls = UrlMap.of(b"http://pacs:8042/orthanc", b"http://gw:8080")
    assert urls.replace_all(b'"http://pacs:8042/orthanc/dicom-web/x"') == b'"http://gw:8080/dicom-web/x"'
    assert urls.replace_all(b'"http://pacs:8042/orthancX/y"') == b'"http://pacs:8042/orthancX/y"'
    assert urls.replace_value(b"http://pacs:8042/orthanc/studies/1") == b"http://gw:8080/studies/1"
    assert urls.replace_value(b"http://other/orthanc") == b"http://other/orthanc"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([OLD, b"/", b"\"", b"http:", b"x", OLD[:10], b"\\/", b"0", b" "]), max_size=30),
       st.lists(st.integers(0, 400), max_size=6))
def test_streamed_equals_whole(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    whole = URLS.replace_all(data)
    points = tuple(sorted(min(c, len(data)) for c in cuts))
    assert run(TextRewriter(URLS), splits(data, points)) == whole


# --------------------------------------------------------------------------- multipart
def part(content_type: bytes, body: bytes, length: bool = True) -> bytes:
    head = b"Content-Type: " + content_type + b"\r\n"
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def multipart(boundary: bytes, *parts: bytes) -> bytes:
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + boundary + b"--\r\n"


def lengths_match(body: bytes, boundary: bytes) -> None:
    for piece in body.split(b"--" + boundary)[1:-1]:
        head, _, content = piece.partition(b"\r\n\r\n")
        m = re.search(rb"Content-Length: (\d+)", head)
        if m:
            assert int(m.group(1)) == len(content) - 2  # the CRLF before the next delimiter


def test_multipart_xml_parts_rewritten_with_lengths_binary_untouched() -> None:
    xml = b'<Value number="1">http://pacs.local:8042/dicom-web/studies/1/bulk/7</Value>'
    binary = b"\x00\x01http://pacs.local:8042/\xff" * 3  # a binary part is never touched
    body = multipart(b"B0UND", part(b"application/dicom+xml", xml), part(b"application/octet-stream", binary),
                     part(b"application/dicom+xml", xml))
    rewriter = content_rewriter(b'multipart/related; type="application/dicom+xml"; boundary=B0UND', URLS)
    assert isinstance(rewriter, MultipartRewriter)
    whole = run(rewriter, [body])
    new_xml = part(b"application/dicom+xml", xml.replace(OLD, NEW))
    expected = multipart(b"B0UND", new_xml, part(b"application/octet-stream", binary), new_xml)
    assert whole == expected
    lengths_match(whole, b"B0UND")
    for cut in range(len(body) + 1):
        rewriter = content_rewriter(b'multipart/related; type="application/dicom+xml"; boundary=B0UND', URLS)
        assert rewriter is not None
        assert run(rewriter, splits(body, (cut,))) == expected, cut


def test_multipart_part_longer_than_the_hold_streams_without_its_length() -> None:
    xml = b"<a>" + b"http://pacs.local:8042/x " * (PART_HOLD // 20) + b"</a>"
    body = multipart(b"b", part(b"application/dicom+xml", xml))
    rewriter = MultipartRewriter(URLS, b"b")
    out = run(rewriter, [body[i:i + 65536] for i in range(0, len(body), 65536)])
    assert out == multipart(b"b", part(b"application/dicom+xml", xml.replace(OLD, NEW), length=False))


def test_content_types() -> None:
    assert isinstance(content_rewriter(b"application/dicom+json; charset=utf-8", URLS), TextRewriter)
    assert isinstance(content_rewriter(b"Application/DICOM+XML", URLS), TextRewriter)
    assert content_rewriter(b"application/dicom", URLS) is None
    assert content_rewriter(b"image/jpeg", URLS) is None
    assert content_rewriter(b'multipart/related; type="application/dicom"; boundary=x', URLS) is None
    assert content_rewriter(b'multipart/related; type="application/dicom+xml"', URLS) is None  # no boundary
