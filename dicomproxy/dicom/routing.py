"""``Dicom:Routes``: which destinations one received instance goes to (the first matching route
wins; none matches: ``default``, i.e. ``Dicom:Upstream``).

A route's AE title conditions are exact (trimmed, as on the wire); ``Modality`` and ``Tags``
values may use C-FIND's ``*`` and ``?`` wildcards (compiled once to a regular expression; a
multi-valued element matches when its encoded text, values joined by ``\\``, matches). The
dataset is only looked at when some route has a dataset condition, and then only the top-level
elements the routes name, read in the pass that already reads the header UIDs
(:func:`.datasets.header_uids`). With no route configured :meth:`Router.choose` is one attribute
test (``bench/dicom_bench.py`` measures the cost of N routes).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword

from dicomproxy.config.model import DEFAULT_UPSTREAM, DicomRoute

MODALITY = 0x00080060
DEFAULT: tuple[str, ...] = (DEFAULT_UPSTREAM,)


def parse_tag(name: str) -> int:
    """``Modality`` or ``0008,0060`` to the tag number; ValueError names the fix."""
    text = name.strip()
    if "," in text:
        group, _, elem = text.partition(",")
        try:
            return int(group, 16) << 16 | int(elem, 16)
        except ValueError:
            raise ValueError(f"{name!r} is not a tag: write a keyword (InstitutionName) or gggg,eeee") from None
    tag = tag_for_keyword(text)
    if tag is None:
        raise ValueError(f"{name!r} is no DICOM keyword: write a keyword (InstitutionName) or gggg,eeee")
    return int(tag)


def tag_key(tag: int) -> str:
    return f"{tag >> 16:04X},{tag & 0xFFFF:04X}"


@functools.lru_cache(maxsize=1024)
def wildcard(pattern: str) -> re.Pattern[str]:
    """C-FIND's ``*`` (any run) and ``?`` (one character), anything else literal."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL)


@dataclass(frozen=True)
class CompiledRoute:
    calling: str
    called: str
    conditions: tuple[tuple[str, re.Pattern[str]], ...]  # (gggg,eeee key, pattern)
    destinations: tuple[str, ...]

    def matches_association(self, calling: str, called: str) -> bool:
        return (not self.calling or self.calling == calling) and (not self.called or self.called == called)

    def matches(self, calling: str, called: str, values: Mapping[str, str]) -> bool:
        if not self.matches_association(calling, called):
            return False
        for key, pattern in self.conditions:
            value = values.get(key)
            if value is None or pattern.fullmatch(value.strip()) is None:
                return False
        return True


def compile_route(route: DicomRoute) -> CompiledRoute:
    conditions: list[tuple[str, re.Pattern[str]]] = []
    if route.modality:
        conditions.append((tag_key(MODALITY), wildcard(route.modality.strip())))
    for name, value in route.tags.items():
        conditions.append((tag_key(parse_tag(name)), wildcard(value.strip())))
    return CompiledRoute(route.calling_aet.strip(), route.called_aet.strip(), tuple(conditions),
                         tuple(route.destinations))


class Router:
    """The compiled ``Dicom:Routes`` (immutable)."""

    def __init__(self, routes: Iterable[DicomRoute]) -> None:
        self.routes = tuple(compile_route(r) for r in routes)
        tags = sorted({int(key.replace(",", ""), 16) for r in self.routes for key, _ in r.conditions})
        self.tags: tuple[int, ...] = tuple(tags)
        """The top-level tags some route looks at (read with the header when not empty)."""
        self.called_aets = frozenset(r.called for r in self.routes if r.called)
        """The "virtual AEs": called AE titles that ``CheckCalledAet`` accepts."""

    def __bool__(self) -> bool:
        return bool(self.routes)

    def choose(self, calling: str, called: str, values: Mapping[str, str]) -> tuple[str, ...]:
        """The destinations of the first matching route, else ``("default",)``."""
        if not self.routes:
            return DEFAULT
        calling, called = calling.strip(), called.strip()
        for route in self.routes:
            if route.matches(calling, called, values):
                return route.destinations
        return DEFAULT

    def only_default(self, calling: str, called: str) -> bool:
        """No instance of this association can go anywhere but ``default`` (the relay may serve
        it): every route its AE titles allow either leads to ``default`` alone or comes after
        one that surely matches and does."""
        calling, called = calling.strip(), called.strip()
        for route in self.routes:
            if not route.matches_association(calling, called):
                continue
            if route.destinations != DEFAULT:
                return False
            if not route.conditions:
                return True
        return True
