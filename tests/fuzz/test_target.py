"""Unit fuzzer of :func:`dicomproxy.http.target.canonical_path` (no network, thousands of examples).

Properties, for any raw path: it is refused with :class:`BadTarget` or it has one canonical
form that (1) starts with ``/`` and holds no empty, ``.`` or ``..`` segment, (2) decodes to the
``path`` the hooks see, (3) is a fixed point (canonicalizing it again changes nothing), (4)
holds nothing an upstream could decode differently (no ``%2F``, ``%5C``, control character,
``?`` or ``#``), and (5) the fast path (:func:`is_canonical`) never lets through a path the slow
path would have refused or read differently.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from hypothesis import example, given
from hypothesis import strategies as st

from dicomproxy.http.target import BadTarget, canonical_path, is_canonical
from tests.fuzz.profiles import fuzz_settings

# The pieces a hostile client builds a path from: every spelling of a dot, a slash, a
# backslash, the percent sign itself, NUL, non-ASCII (raw and encoded, valid and not).
TRICKS = [
    "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "%2f", "%2F", "%5c", "%5C", "\\", "%25", "%252e",
    "%", "%0", "%zz", "%00", "\x00", "%0a", "\r", "\t", " ", "%20", "+", ";", ";a=b", "?", "#", "%3f", "%23",
    "é", "%c3%a9", "%c3", "%ff", "\xff", "~", "@", ":", "a", "patients", "..;", "%u002e",
]
segment = st.lists(st.sampled_from(TRICKS) | st.text(max_size=4), max_size=8).map("".join)
raw_paths = st.one_of(
    st.lists(segment, min_size=1, max_size=8).map(
        lambda parts: ("/" + "/".join(parts)).encode("utf-8", "surrogatepass")),
    st.binary(max_size=64).map(lambda b: b"/" + b),
    st.binary(max_size=32),
)


def _segments(raw: bytes) -> list[bytes]:
    return unquote_to_bytes(raw).split(b"/")[1:]


@fuzz_settings(1000)
@given(raw_paths)
@example(b"/a/%2e%2e/%2e%2e/b")
@example(b"/fuzz/..%2f..%2fpatients")
@example(b"/a/./b/../../c/")
def test_canonical_path_has_one_reading(raw: bytes) -> None:
    try:
        path, canonical = canonical_path(raw)
    except BadTarget:
        assert not is_canonical(raw), f"the fast path lets through {raw!r}, which the slow path refuses"
        return
    assert canonical.startswith(b"/") and path.startswith("/")
    segments = _segments(canonical)
    inner = segments[:-1] if canonical.endswith(b"/") else segments  # a trailing slash is kept
    assert all(s not in (b"", b".", b"..") for s in inner) or canonical == b"/", canonical
    assert unquote_to_bytes(canonical).decode("utf-8") == path
    assert canonical_path(canonical) == (path, canonical), "not a fixed point"
    lowered = canonical.lower()
    assert b"%2f" not in lowered and b"%5c" not in lowered and b"?" not in canonical and b"#" not in canonical
    assert all(0x21 <= b < 0x7F for b in canonical), canonical
    if is_canonical(raw):  # the fast path keeps the raw bytes: they must name the same resource
        assert unquote_to_bytes(raw) == unquote_to_bytes(canonical), (raw, canonical)
        assert raw.decode("ascii") == path or unquote_to_bytes(raw).decode() == path
