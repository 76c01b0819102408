"""Walking the model: what each key is, the defaults, and raw layers matched against it.

The model (:mod:`dicomproxy.config.model`) declares the keys; this module reads those
declarations so that nothing else has to repeat them:

* :func:`shape` tells a field's place in the file: a section (fixed keys), a map keyed by names
  the site chooses (``Dicom:Modalities``), a list of objects (``Notifications:Email``) or a leaf;
* :func:`key_docs` lists every key for the README, :func:`defaults` the defaults in the file's
  shape (what the repository's ``appsettings.json`` must hold);
* :func:`canonicalize` matches one raw layer (a file, the environment, the command line)
  against the model case-insensitively, renames keys to their declared spelling, turns a secret's
  ``…File`` sibling into a :class:`SecretFile` and refuses an unknown key with the nearest valid
  one: ``<source>: Dicom:AllowedCallingAet: unknown key; did you mean Dicom:AllowedCallingAets?``.
  It records which source set every value (``provenance``), so that a wrong value later names the
  source too.
"""

from __future__ import annotations

import difflib
import json
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pydantic.fields import FieldInfo

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.fields import (
    REQUIRED,
    FlagOrNames,
    Names,
    Section,
    as_list,
    is_key,
    is_secret,
    kind_of,
    shown,
)

RawPath = tuple[str, ...]
Labeler = Callable[[RawPath], str]
Provenance = dict[RawPath, str]  # lower-cased canonical path -> the source that set it
Shape = Literal["section", "map", "list", "leaf"]
FILE_SUFFIX = "File"


@dataclass(frozen=True)
class SecretFile:
    """``<Key>File: path`` in some layer: the secret is read from ``path`` after layering."""

    path: Any
    source: str
    key: str  # the colon path of the …File key, for messages


@dataclass(frozen=True)
class KeyDoc:
    """One row of the README's table."""

    path: str
    type: str
    default: Any  # REQUIRED when the key must be given
    description: str
    secret: bool = False


def shape(info: FieldInfo) -> tuple[Shape, Any]:
    """(``section``, model) | (``map``, value model or None) | (``list``, item model) | (``leaf``, kind)."""
    kind = kind_of(info)
    if kind is not None:
        return "leaf", kind
    ann = info.annotation
    if isinstance(ann, type) and issubclass(ann, Section):
        return "section", ann
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is dict:
        value = args[1] if len(args) == 2 else None
        return "map", value if isinstance(value, type) and issubclass(value, Section) else None
    if origin is tuple and args and isinstance(args[0], type) and issubclass(args[0], Section):
        return "list", args[0]
    return "leaf", None


def fields_of(model: type[Section]) -> Iterator[tuple[str, FieldInfo]]:
    """The key fields of ``model`` as (key name, field)."""
    for info in model.model_fields.values():
        if is_key(info) and info.alias is not None:
            yield info.alias, info


def allows_extra(model: type[Section]) -> bool:
    return model.model_config.get("extra") == "allow"


# --------------------------------------------------------------------------- documentation
def key_docs(model: type[Section], prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of ``model`` (maps and lists show their entries as ``{name}`` / ``{i}``)."""
    for name, info in fields_of(model):
        path = f"{prefix}{name}"
        what, inner = shape(info)
        description = info.description or ""
        if what == "section":
            yield from key_docs(inner, path + ":")
        elif what in ("map", "list"):
            empty: Any = {} if what == "map" else []
            yield KeyDoc(path, "object" if what == "map" else "list", empty, description)
            if inner is not None:
                yield from key_docs(inner, path + (":{name}:" if what == "map" else ":{i}:"))
        else:
            type_name = inner.type_name if inner is not None else "value"
            yield KeyDoc(path, type_name + (", secret" if is_secret(info) else ""), _default(info), description,
                         is_secret(info))
            if is_secret(info):
                yield KeyDoc(path + FILE_SUFFIX, "path", "", f"a file holding `{path}` (Docker secrets); its "
                             "trailing newline is dropped; relative to `ConfigRoot`")
    if allows_extra(model):
        yield KeyDoc(f"{prefix}{{site key}}", "any", None, "any other key, for the site's scripts "
                         f"(`Config[\"{prefix}Site\"]`); scripts read these, so keep secrets out of them")


def _default(info: FieldInfo) -> Any:
    if info.default is REQUIRED:
        return REQUIRED
    return list(info.default) if isinstance(info.default, tuple) else info.default


def defaults(model: type[Section]) -> dict[str, Any]:
    """The defaults in the file's shape (required keys left out)."""
    out: dict[str, Any] = {}
    for name, info in fields_of(model):
        what, inner = shape(info)
        if what == "section":
            out[name] = defaults(inner)
        elif what in ("map", "list"):
            out[name] = {} if what == "map" else []
        elif info.default is not REQUIRED:
            out[name] = _default(info)
    return out


def all_paths(model: type[Section], prefix: str = "") -> Iterator[str]:
    for doc in key_docs(model, prefix):
        if "{" not in doc.path:
            yield doc.path


# --------------------------------------------------------------------------- matching a layer
class Canonicalizer:
    """Matches one raw layer against the model; see the module docstring."""

    def __init__(self, model: type[Section], label: Labeler) -> None:
        self.model = model
        self.label = label
        self.paths = list(all_paths(model))
        self.provenance: Provenance = {}

    def run(self, raw: dict[str, Any]) -> dict[str, Any]:
        out = self._section(self.model, raw, (), ())
        assert isinstance(out, dict)
        return out

    # -- by shape -------------------------------------------------------------------------
    def _section(self, model: type[Section], raw: Any, raw_path: RawPath, path: RawPath) -> Any:
        if isinstance(raw, str) and model.shorthand is None:
            raw = self._json(raw, raw_path, path, "a JSON object", dict)
        if isinstance(raw, str) and model.shorthand is not None:
            raw = {model.shorthand: raw}
        if path:
            self._record(path, raw_path)
        if not isinstance(raw, dict):
            return raw  # the wrong type is pydantic's to report, with the source recorded
        known = {name.lower(): (name, info) for name, info in fields_of(model)}
        files = {name.lower() + FILE_SUFFIX.lower(): name for name, info in fields_of(model) if is_secret(info)}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            sub_raw = raw_path + (str(key),)
            lower = str(key).lower()
            if lower in known:
                name, info = known[lower]
                value = self._value(info, value, sub_raw, path + (name,))
                if isinstance(value, dict) and isinstance(out.get(name), dict):  # "Lua" and "lua": one section
                    self._combine(out[name], value, sub_raw, path + (name,))
                    continue
                self._once(out, name, key, sub_raw, path)
                out[name] = value
            elif lower in files:
                name = files[lower]
                self._once(out, name, key, sub_raw, path)
                out[name] = SecretFile(value, self.label(sub_raw), ":".join(path + (name + FILE_SUFFIX,)))
                self._record(path + (name,), sub_raw)
            elif allows_extra(model):
                out[key] = value
                self._record(path + (key,), sub_raw)
            else:
                raise ConfigError(self._unknown(model, path, str(key), sub_raw))
        return out

    def _value(self, info: FieldInfo, value: Any, raw_path: RawPath, path: RawPath) -> Any:
        what, inner = shape(info)
        if what == "section":
            return self._section(inner, value, raw_path, path)
        if what == "map":
            if isinstance(value, str):
                value = self._json(value, raw_path, path, "a JSON object", dict)
            if not isinstance(value, dict):
                self._record(path, raw_path)
                return value
            if inner is None:
                for name in value:
                    self._record(path + (str(name),), raw_path + (str(name),))
                return dict(value)
            return {name: self._section(inner, v, raw_path + (str(name),), path + (str(name),))
                    for name, v in value.items()}
        if what == "list":
            if isinstance(value, str):
                value = self._json(value, raw_path, path, "a JSON array", list)
            items = as_list(value) if isinstance(value, dict | list) else None
            if items is None:
                self._record(path, raw_path)
                return value
            self._record(path, raw_path)
            return [self._section(inner, v, raw_path + (str(i),), path + (str(i),)) for i, v in enumerate(items)]
        if isinstance(inner, Names | FlagOrNames) and isinstance(value, dict) and value and all(
                str(k).isdigit() for k in value):
            value = as_list(value)  # ASP.NET index keys: DICOMPROXY__Dicom__AllowedCallingAets__0=A
        self._record(path, raw_path)
        return value

    # -- helpers ----------------------------------------------------------------------------
    def _record(self, path: RawPath, raw_path: RawPath) -> None:
        self.provenance[tuple(p.lower() for p in path)] = self.label(raw_path)

    def _json(self, text: str, raw_path: RawPath, path: RawPath, expected: str, typ: type) -> Any:
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, typ):
            raise ConfigError(f"{self.label(raw_path)}: {':'.join(path)}: expected {expected}, got {shown(text)}")
        return value

    def _once(self, out: dict[str, Any], name: str, key: str, raw_path: RawPath, path: RawPath) -> None:
        if name in out:
            raise ConfigError(f"{self.label(raw_path)}: {':'.join(path + (name,))}: given twice in one source "
                              f"(as a different spelling, or with its {FILE_SUFFIX} sibling as well: '{key}')")

    def _combine(self, into: dict[str, Any], more: dict[str, Any], raw_path: RawPath, path: RawPath) -> None:
        for name, value in more.items():
            if isinstance(value, dict) and isinstance(into.get(name), dict):
                self._combine(into[name], value, raw_path, path + (name,))
            else:
                self._once(into, name, name, raw_path, path)
                into[name] = value

    def _unknown(self, model: type[Section], path: RawPath, key: str, raw_path: RawPath) -> str:
        full = ":".join(path + (key,))
        siblings = [":".join(path + (n,)) for n, info in fields_of(model)]
        siblings += [":".join(path + (n + FILE_SUFFIX,)) for n, info in fields_of(model) if is_secret(info)]
        best = _nearest(full, siblings) or _nearest(full, self.paths) or _nearest_name(key, self.paths)
        if best:
            hint = f"did you mean {best}?"
        elif not path:
            hint = f"a site's own keys for its scripts go under ExtraConfig (ExtraConfig:{key})"
        else:
            hint = f"{':'.join(path)} has " + ", ".join(n for n, _ in fields_of(model))
        return f"{self.label(raw_path)}: {full}: unknown key; {hint}"


def _nearest_name(name: str, paths: list[str]) -> str | None:
    """The path whose last key is nearest to ``name`` (a key put in the wrong section)."""
    by_name: dict[str, str] = {}
    for path in paths:
        by_name.setdefault(path.rsplit(":", 1)[-1].lower(), path)
    match = difflib.get_close_matches(name.lower(), list(by_name), n=1, cutoff=0.8)
    return by_name[match[0]] if match else None


def _nearest(word: str, candidates: list[str]) -> str | None:
    lower = {c.lower(): c for c in candidates}
    match = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.75)
    return lower[match[0]] if match else None
