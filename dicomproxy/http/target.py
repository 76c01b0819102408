"""One canonical request path, decided before authentication, the Lua hooks and routing.

Why: Lua rules written like the README's examples (``request.Path:find("^/patients")``) saw the
decoded path while the upstream resolved the raw one, so ``//patients``, ``/./patients``,
``/x/../patients``, ``%2e%2e`` and encoded ``/`` or ``\\`` slipped past them. Here the raw
target is decoded once, dot segments are resolved and repeated slashes collapsed, and the
result is encoded again in one way: ``scope["path"]`` (what hooks and routes see) and
``scope["raw_path"]`` (what the proxy sends upstream) then name the same resource, and nothing
the upstream decodes can climb above the root (or above a path prefix in ``Upstream:Url``).

Refused with 400, because no honest client sends them and each has two readings: an encoded
``/`` (``%2F``) or ``\\`` (``%5C``), a raw ``\\``, NUL or other control characters, a malformed
percent escape, a ``..`` above the root, and a request target that is not a path (absolute
form ``http://host/x``, ``*``).
"""

from __future__ import annotations

from urllib.parse import quote, unquote_to_bytes

# What may stay unencoded in a path segment (RFC 3986 pchar without "%").
_SAFE = "-._~!$&'()*+,;=:@/"
_FORBIDDEN_DECODED = frozenset(range(0x00, 0x20)) | {0x7F, ord("\\")}
# Bytes a canonical raw path may hold as they are: printable ASCII but "%" and "\\".
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in b"%\\")


class BadTarget(ValueError):
    """The request target has no single canonical reading; ``str()`` says why."""


def canonical_path(raw_path: bytes) -> tuple[str, bytes]:
    """``(path, raw_path)`` for a raw request path (no query), or :class:`BadTarget`."""
    if not raw_path.startswith(b"/"):
        raise BadTarget("the request target must be a path starting with /")
    lowered = raw_path.lower()
    if b"%2f" in lowered or b"%5c" in lowered:
        raise BadTarget("encoded / or \\ in the path")
    if b"%" in raw_path:
        _check_escapes(raw_path)
    decoded = unquote_to_bytes(raw_path)
    if any(b in _FORBIDDEN_DECODED for b in decoded):
        raise BadTarget("control characters or \\ in the path")
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("the path is not UTF-8 once decoded") from None
    path = _resolve(text)
    return path, quote(path, safe=_SAFE).encode("ascii")


def is_canonical(raw_path: bytes) -> bool:
    """The fast path: only printable ASCII, nothing to decode, no dot segment, no repeated slash.
    (``bytes.translate`` deletes the allowed bytes in C: ~0.2 us for a typical path, where a
    per-byte generator cost ~2 us. ``find``, not ``in``: ``bytes in bytes`` first tries the
    needle as an integer and builds, then clears, a TypeError with a formatted message, ~1,800
    instructions a test under callgrind, against ~300 for ``find``.)"""
    return (
        raw_path[:1] == b"/"
        and not raw_path.translate(None, _PLAIN)
        and raw_path.find(b"//") < 0
        and raw_path.find(b"/.") < 0
    )


def _check_escapes(raw: bytes) -> None:
    i = raw.find(b"%")
    while i != -1:
        pair = raw[i + 1:i + 3]
        if len(pair) != 2 or not all(c in b"0123456789abcdefABCDEF" for c in pair):
            raise BadTarget("malformed percent escape in the path")
        i = raw.find(b"%", i + 3)


def _resolve(path: str) -> str:
    """RFC 3986 §5.2.4 dot-segment removal, with empty segments collapsed; ``..`` above the root
    is an error rather than silently clamped (the client meant something else)."""
    trailing = path.endswith("/") or path.endswith("/.") or path.endswith("/..")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not out:
                raise BadTarget("the path climbs above the root")
            out.pop()
            continue
        out.append(segment)
    resolved = "/" + "/".join(out)
    if trailing and out:
        resolved += "/"
    return resolved
