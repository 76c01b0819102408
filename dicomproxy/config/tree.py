"""The configuration as others may see it: :func:`public_view` and :class:`ConfigTree`.

:func:`public_view` turns a validated model back into the shape of ``appsettings.json`` (key
names as in the file, effective values: paths resolved, URLs normalised) with every secret
replaced by ``***`` (an unset secret stays ``""``, so a reader can tell whether one is set and
nothing else), and so is the password of a URL's ``user:password@``. It is the only view that
leaves the configuration package: ``dicomproxy config`` prints it, Lua's ``Config[...]`` and
``GetOrthancConfiguration()`` read it, and a logged ``Settings`` hides secrets too (secret fields have ``repr=False``).

Masked rather than absent, in Lua as well: one rule everywhere, the Orthanc shape of
``RegisteredUsers`` (name -> password) keeps its names, and a script can test that mail or a
user is configured without learning a value or its length.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dicomproxy.config.fields import MASK, HttpUrl, is_key, is_secret, kind_of, mask_userinfo


def public_view(model: BaseModel) -> dict[str, Any]:
    """``model`` as JSON in the file's shape, secrets masked."""
    out: dict[str, Any] = {}
    for name, info in type(model).model_fields.items():
        if is_key(info) and info.alias is not None:
            value = getattr(model, name)
            if isinstance(value, str) and isinstance(kind_of(info), HttpUrl):
                value = mask_userinfo(value)  # Upstream:Url may hold user:password@
            out[info.alias] = _public(value, is_secret(info))
    for name, value in (model.model_extra or {}).items():
        out[name] = _public(value, False)
    return out


def _public(value: Any, secret: bool) -> Any:
    if secret:
        return MASK if value else ""
    if value is None:
        return ""  # an optional path left empty (Smtp:CaFile)
    if isinstance(value, BaseModel):
        view = public_view(value)
        short = getattr(type(value), "shorthand", None)
        if short is None:
            return view
        fields = type(value).model_fields
        given = {fields[name].alias for name in value.model_fields_set if name in fields}
        return view[short] if given <= {short} else view  # as written: "alice": "***"
    if isinstance(value, Mapping):
        return {str(k): _public(v, False) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset):
        return [_public(v, False) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)  # 120, as written, not 120.0 (Lua's tostring shows the difference)
    return value


class ConfigTree(Mapping[str, Any]):
    """A read-only, case-insensitive view of :func:`public_view`: ``tree["Upstream:Url"]``.

    ``tree["Upstream"]`` returns the section as a plain dict; ``source`` names the main file.
    """

    def __init__(self, data: dict[str, Any], source: str) -> None:
        self._data = data
        self.source = source

    def _find(self, path: str) -> tuple[bool, Any]:
        node: Any = self._data
        for part in path.split(":"):
            if not isinstance(node, dict):
                return False, None
            match = next((k for k in node if k.lower() == part.lower()), None)
            if match is None:
                return False, None
            node = node[match]
        return True, node

    def __getitem__(self, path: str) -> Any:
        found, value = self._find(path)
        if not found:
            raise KeyError(path)
        return value

    def get(self, path: str, default: Any = None) -> Any:
        found, value = self._find(path)
        return value if found else default

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._find(path)[0]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def as_dict(self) -> dict[str, Any]:
        """A deep copy, safe to hand out."""
        copy: dict[str, Any] = json.loads(json.dumps(self._data))
        return copy

    def leaves(self) -> dict[str, Any]:
        """Every leaf by its colon path (lists are leaves)."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}:{k}" if prefix else k, v)
            else:
                flat[prefix] = node

        walk("", self.as_dict())
        return flat
