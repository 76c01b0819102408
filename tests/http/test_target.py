"""``canonical_path``: one reading of every request path (the e2e tests prove it end to end)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicomproxy.http.target import BadTarget, canonical_path, is_canonical


@pytest.mark.parametrize(("raw", "path", "encoded"), [
    (b"/", "/", b"/"),
    (b"/patients", "/patients", b"/patients"),
    (b"//patients", "/patients", b"/patients"),
    (b"/./patients", "/patients", b"/patients"),
    (b"/x/../patients", "/patients", b"/patients"),
    (b"/x/%2e%2e/patients", "/patients", b"/patients"),
    (b"/pat%69ents", "/patients", b"/patients"),
    (b"/a/b/", "/a/b/", b"/a/b/"),
    (b"/a/b/.", "/a/b/", b"/a/b/"),
    (b"/a/b/..", "/a/", b"/a/"),
    (b"/caf%C3%A9", "/caf\u00e9", b"/caf%C3%A9"),
    (b"/caf\xc3\xa9", "/caf\u00e9", b"/caf%C3%A9"),
    (b"/sp%20ace", "/sp ace", b"/sp%20ace"),
    (b"/semi;p=1", "/semi;p=1", b"/semi;p=1"),
    (b"/%25", "/%", b"/%25"),
    (b"/dicom-web/studies/1.2.840.113619", "/dicom-web/studies/1.2.840.113619", b"/dicom-web/studies/1.2.840.113619"),
])
def test_canonical_forms(raw: bytes, path: str, encoded: bytes) -> None:
    assert canonical_path(raw) == (path, encoded)


@pytest.mark.parametrize("raw", [
    b"patients", b"*", b"http://evil/x", b"/a%2Fb", b"/a%2fb", b"/a%5cb", b"/a\\b", b"/..", b"/../x",
    b"/a/../../x", b"/%2e%2e/x", b"/a%zz", b"/a%4", b"/a%00b", b"/a\x01b", b"/a%7Fb", b"/%c3%28",
])
def test_ambiguous_targets(raw: bytes) -> None:
    with pytest.raises(BadTarget):
        canonical_path(raw)


def test_fast_path_agrees_with_the_slow_one() -> None:
    for raw in (b"/", b"/dicom-web/studies", b"/instances/abc-def/file", b"/a/b/"):
        assert is_canonical(raw)
        assert canonical_path(raw) == (raw.decode(), raw)
    for raw in (b"//x", b"/./x", b"/x/..", b"/%41", b"/a\\b", b"/\xc3\xa9", b"x"):
        assert not is_canonical(raw)


segments = st.lists(st.sampled_from(["a", "b", ".", "..", "", "%2e", "%2E%2e", "c%20d", "%41", "x.y"]), max_size=8)


@given(segments)
def test_canonical_is_a_fixed_point_with_no_dot_segments(parts: list[str]) -> None:
    raw = ("/" + "/".join(parts)).encode()
    try:
        path, encoded = canonical_path(raw)
    except BadTarget:
        return
    assert canonical_path(encoded) == (path, encoded)
    pieces = path.split("/")[1:]
    assert "." not in pieces and ".." not in pieces
    assert "//" not in path and path.startswith("/")
