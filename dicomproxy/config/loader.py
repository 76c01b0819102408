"""Loading: the layers of the configuration, merged and validated into one :class:`Settings`.

Layers, each overriding the ones before (ASP.NET's order):

1. ``appsettings.json`` (``--config PATH``; without it ``./appsettings.json`` if present);
2. ``appsettings.{Environment}.json`` beside it, when an environment is named by
   ``--environment`` or ``DICOMPROXY_ENVIRONMENT``; naming one whose file does not exist is an
   error (a mistyped ``Prodution`` must not start the gateway without its production settings);
3. ``servers.json`` beside it, if present: the ``Upstreams`` section on its own (DicomProxy's
   convention for the list of PACS; ``{"Servers": {...}, "Groups": {...}}``), which the gateway
   re-reads when it changes;
4. environment variables ``DICOMPROXY__Section__Key`` (``__`` for ``:``, any case);
5. the command line, ``--Section:Key=value``.

Keys are case-insensitive in every layer. A JSON array replaces the array of an earlier layer
whole (ASP.NET merges arrays by index, so a shorter ``Dicom:AllowedCallingAets`` in the
environment's file would keep the base file's extra entries: not what an allow-list means).
A secret may be given as ``<Key>File: path`` in any layer; the later layer wins between the two
spellings, and the file is read (relative to ``ConfigRoot``, trailing newline dropped) after
the layers are merged.

Every problem is one :class:`ConfigError` line naming its source (the file's path,
``environment DICOMPROXY__Lua__TimeoutMs``, ``command line``), the key and the fix. Each layer
is matched against the model before merging (:class:`~dicomproxy.config.schema.Canonicalizer`),
which is where unknown keys are caught and where each value's source is recorded.

Why not pydantic-settings: measured with pydantic-settings 2.16, its JSON source matches nested
keys case-sensitively (``{"lua": {"timeoutms": 3}}`` is "extra inputs are not permitted"), its
errors do not say which source gave the bad value, it has no ``…File`` siblings, and it adds
~90 ms of import to start-up. The layering here is ~150 lines on plain pydantic.

Start-up cost (this 2-core machine, shared; median of 6 runs alternating with the code before
this change, same interpreter): importing the configuration package ~30 -> ~180 ms (pydantic
~85 ms, building the models' validators ~60 ms); loading and validating the full
``appsettings.json`` ~1.5 -> ~3 ms; importing everything ``dicomproxy serve`` needs
~0.66 -> ~0.76 s (+15 %). ``check`` and ``serve`` start in well under a second either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.fields import VALUE_ERROR, FsPath, Section, is_secret, shown
from dicomproxy.config.model import Settings
from dicomproxy.config.schema import Canonicalizer, Labeler, Provenance, RawPath, SecretFile, fields_of, shape

ENV_PREFIX = "DICOMPROXY__"
SERVERS_FILE = "servers.json"
ENVIRONMENT_VARIABLE = "DICOMPROXY_ENVIRONMENT"
COMMAND_LINE = "command line"
DEFAULTS = "(defaults)"


@dataclass(frozen=True)
class Layer:
    """One source: its raw tree and how to name the source of a raw key path."""

    tree: dict[str, Any]
    label: Labeler
    file: Path | None = None


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environment: str | None = None,
) -> Settings:
    """Read every layer (see the module docstring) and validate; raise :class:`ConfigError`.

    ``overrides`` are the command line's ``{"Section:Key": value}`` (nested dicts work too);
    ``environment`` is ``--environment`` and wins over ``DICOMPROXY_ENVIRONMENT``.
    """
    environ = os.environ if environ is None else environ
    file = _main_file(path)
    root = file.parent if file else Path.cwd()
    name = environment if environment is not None else environ.get(ENVIRONMENT_VARIABLE, "")
    layers = [file_layer(file)] if file else []
    if name:
        layers.append(file_layer(environment_file(file or root / "appsettings.json", name)))
    servers = root / SERVERS_FILE
    if servers.is_file():
        layers.append(servers_layer(servers))
    layers += [environment_layer(environ), command_line_layer(overrides or {})]
    tree, provenance = merge_layers(layers)
    tree = resolve_secret_files(tree, root)
    data = {**tree, "config_file": file, "config_root": root, "environment": name,
            "files": tuple(layer.file for layer in layers if layer.file)}
    try:
        return Settings.model_validate(data, context={"root": root})
    except ValidationError as e:
        raise ConfigError(describe(e, provenance)) from None


# --------------------------------------------------------------------------- the layers
def _main_file(path: str | Path | None) -> Path | None:
    if path is not None:
        file = Path(path).resolve()
        if not file.is_file():
            raise ConfigError(f"{file}: the config file does not exist (pass --config PATH)")
        return file
    default = Path("appsettings.json")
    return default.resolve() if default.is_file() else None


def environment_file(base: Path, name: str) -> Path:
    """``appsettings.Production.json`` beside ``appsettings.json`` (``site.Production.json`` beside ``site.json``)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"{ENVIRONMENT_VARIABLE} / --environment: expected a name like Production, got {name!r}")
    file = base.with_name(f"{base.stem}.{name}{base.suffix}")
    if not file.is_file():
        raise ConfigError(f"{file}: the file of environment {name!r} does not exist "
                          f"(create it, or unset {ENVIRONMENT_VARIABLE} / --environment)")
    return file


def file_layer(file: Path) -> Layer:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read the config file: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object at the top level")
    return Layer(data, lambda raw_path: str(file), file)


def servers_layer(file: Path) -> Layer:
    """``servers.json``: the contents of the ``Upstreams`` section."""
    layer = file_layer(file)
    return Layer({"Upstreams": layer.tree}, layer.label, file)


def environment_layer(environ: Mapping[str, str]) -> Layer:
    """``DICOMPROXY__Section__Key=value``; each value is named by its variable."""
    tree: dict[str, Any] = {}
    names: dict[RawPath, str] = {}
    for var in sorted(environ):
        if not var.upper().startswith(ENV_PREFIX):
            continue
        parts = tuple(p for p in var[len(ENV_PREFIX):].split("__") if p)
        if parts:
            _put(tree, parts, environ[var], f"environment {var}")
            names[tuple(p.lower() for p in parts)] = var

    def label(raw_path: RawPath) -> str:
        lower = tuple(p.lower() for p in raw_path)
        for end in range(len(lower), 0, -1):
            if lower[:end] in names:
                return f"environment {names[lower[:end]]}"
        under = next((v for k, v in names.items() if k[: len(lower)] == lower), None)
        return f"environment {under}" if under else "environment"

    return Layer(tree, label)


def command_line_layer(overrides: Mapping[str, Any]) -> Layer:
    tree: dict[str, Any] = {}
    for name, value in overrides.items():
        parts = tuple(p for p in name.split(":") if p)
        if not parts:
            raise ConfigError(f"{COMMAND_LINE}: {name!r}: expected --Section:Key=value")
        _put(tree, parts, value, COMMAND_LINE)
    return Layer(tree, lambda raw_path: COMMAND_LINE)


def _put(tree: dict[str, Any], parts: RawPath, value: Any, source: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {':'.join(parts[: i + 1])} is set as a whole and in parts")
        node = child
    if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):
        raise ConfigError(f"{source}: {':'.join(parts)} is set as a whole and in parts")
    node[parts[-1]] = value


# --------------------------------------------------------------------------- merging
def merge_layers(layers: Iterable[Layer]) -> tuple[dict[str, Any], Provenance]:
    tree: dict[str, Any] = {}
    provenance: Provenance = {}
    for layer in layers:
        matcher = Canonicalizer(Settings, layer.label)
        _merge(tree, matcher.run(layer.tree), (), provenance)
        provenance.update(matcher.provenance)
    return tree, provenance


def _merge(base: dict[str, Any], over: Mapping[str, Any], path: RawPath, provenance: Provenance) -> None:
    """Case-insensitive deep merge; the later spelling wins; a replaced value forgets its sources."""
    lower = {k.lower(): k for k in base}
    for key, value in over.items():
        here = path + (key.lower(),)
        existing = lower.get(key.lower())
        if existing is not None and existing != key:
            base[key] = base.pop(existing)
        lower[key.lower()] = key
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, here, provenance)
            continue
        for stale in [p for p in provenance if p[: len(here)] == here]:
            del provenance[stale]
        base[key] = value


# --------------------------------------------------------------------------- secrets
def resolve_secret_files(tree: Any, root: Path) -> Any:
    """Replace every :class:`SecretFile` by the file's text (trailing newline dropped)."""
    if isinstance(tree, SecretFile):
        return _read_secret(tree, root)
    if isinstance(tree, dict):
        return {k: resolve_secret_files(v, root) for k, v in tree.items()}
    if isinstance(tree, list):
        return [resolve_secret_files(v, root) for v in tree]
    return tree


def _read_secret(secret: SecretFile, root: Path) -> str:
    if not isinstance(secret.path, str) or not secret.path.strip():
        raise ConfigError(f"{secret.source}: {secret.key}: expected the path of a file, got {shown(secret.path)}")
    file = FsPath().parse(secret.path, root)
    assert file is not None
    try:
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"{secret.source}: {secret.key}: cannot read {file}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{secret.source}: {secret.key}: {file} is not UTF-8 text") from None


# --------------------------------------------------------------------------- messages
def describe(error: ValidationError, provenance: Provenance) -> str:
    """The first error as one line: ``<source>: <Key:Path>: expected ..., got ...``."""
    err = error.errors(include_url=False)[0]
    loc = tuple(str(p) for p in err["loc"])
    ctx = err.get("ctx") or {}
    kind = err["type"]
    got: str | None = shown(err.get("input"))
    if kind == VALUE_ERROR:
        loc += tuple(str(ctx["key"]).split(":")) if "key" in ctx else ()
        expected, got = str(ctx["expected"]), ctx.get("got")
    elif kind == "missing":
        parent = _model_at(loc[:-1])
        if parent is not None and parent.noun != Section.noun:
            loc, expected = loc[:-1], parent.noun
        else:
            return f"{source_of(loc, provenance)}: {':'.join(loc)}: required, and not given"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _model_at(loc)
        expected = model.noun if model is not None else Section.noun
    elif kind in ("list_type", "tuple_type"):
        expected = "a list"
    else:
        expected = str(err["msg"])
    head = f"{source_of(loc, provenance)}: {':'.join(loc)}:"
    if got is None:
        return f"{head} {expected}"
    if _is_secret_at(loc):
        return f"{head} expected {expected} (the value is secret and not shown)"
    return f"{head} expected {expected}, got {got}"


def source_of(loc: RawPath, provenance: Provenance) -> str:
    """The source that set ``loc`` (or a part of it, or something under it)."""
    lower = tuple(p.lower() for p in loc)
    for end in range(len(lower), 0, -1):
        if lower[:end] in provenance:
            return provenance[lower[:end]]
    return next((v for k, v in provenance.items() if k[: len(lower)] == lower), DEFAULTS)


def _walk(loc: RawPath) -> tuple[type[Section] | None, Any]:
    """(the model at ``loc`` if it is an object, the field declaring its last key)."""
    model: type[Section] | None = Settings
    info = None
    parts = list(loc)
    while parts and model is not None:
        fields = dict(fields_of(model))
        info = fields.get(parts.pop(0))
        if info is None:
            return None, None
        what, inner = shape(info)
        if what in ("map", "list"):
            if not parts:
                return None, info
            parts.pop(0)
        model = inner if what != "leaf" else None
    return (model if not parts else None), info


def _model_at(loc: RawPath) -> type[Section] | None:
    return _walk(loc)[0]


def _is_secret_at(loc: RawPath) -> bool:
    model, info = _walk(loc)
    if info is not None and is_secret(info):
        return True
    # an object holding a secret (a user with its Password, a key with its Hash) is not shown either
    return model is not None and any(is_secret(f) for f in model.model_fields.values())
