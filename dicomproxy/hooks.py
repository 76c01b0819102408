"""Typed hooks one feature offers the others: the only way features reach each other, since
none imports the app and each sees only :class:`dicomproxy.host.Host`.

A hook is an object of a class its owner defines (e.g. the DICOM side's
:class:`dicomproxy.dicom.hooks.InstanceStored`); ``hooks.get(InstanceStored)`` returns the one
instance of the gateway, created on first use, so the owner and its subscribers find the same
object whichever feature is installed first.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


class Hooks:
    def __init__(self) -> None:
        self._by_type: dict[type[Any], Any] = {}

    def get(self, kind: type[T]) -> T:
        """The gateway's one ``kind`` (built with ``kind()`` the first time it is asked for)."""
        found = self._by_type.get(kind)
        if found is None:
            found = self._by_type[kind] = kind()
        assert isinstance(found, kind)
        return found
