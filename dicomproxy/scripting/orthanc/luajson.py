"""``DumpJson``, ``ParseJson`` and ``PrintRecursive`` with Orthanc's exact semantics.

Orthanc's rules (``OrthancFramework/Sources/Lua/LuaContext.cpp`` and ``Toolbox.lua``) are
followed rather than "improved", because Orthanc scripts depend on them:

* ``DumpJson(v)``: a table is a JSON array iff iterating it yields the keys 1, 2, ..., n in that
  order (so ``{}`` is ``[]``); every other table is an object whose keys are the Lua keys as
  strings, written sorted (jsoncpp keeps object members in a map). Without ``keepStrings`` a
  string Lua can read as a number (``"42"``, ``" 0x1A "``, ``"1e3"``) becomes that number, and an
  integral number is written as an integer. With ``keepStrings`` strings stay strings *and
  numbers are written as strings* (Lua's ``lua_isstring`` is true for numbers).
* ``ParseJson(s)``: ``nil`` for anything that is not a JSON text; ``null`` becomes ``nil``.
* ``PrintRecursive(v)``: Orthanc's ``PrintRecursive`` (item limit 100), one log record.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from dicomproxy_middleware import LuaEngine, LuaExportError
from dicomproxy_middleware.runtime import lupa

log = logging.getLogger("dicomproxy.lua")

_INT64 = 2**63
MAX_DEPTH = 64
PRINT_LIMIT = 100


_SPACE = " \t\n\v\f\r"
_INT = re.compile(r"([-+]?)(?:0[xX]([0-9a-fA-F]+)|([0-9]+))")
_DEC_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_HEX_FLOAT = re.compile(r"[-+]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][-+]?[0-9]+)?")


def lua_tonumber(text: str) -> int | float | None:
    """Lua 5.4's string-to-number conversion (``lua_stringtonumber``), which ``lua_isnumber``
    and so Orthanc's DumpJson apply: decimal and hex integers (hex wraps at 64 bits), decimal
    and hex floats, surrounding whitespace allowed; never ``inf`` or ``nan``."""
    s = text.strip(_SPACE)
    if not s or len(s) > 200:
        return None
    m = _INT.fullmatch(s)
    if m:
        sign, hexa, dec = m.groups()
        if hexa is not None:
            value = int(hexa, 16) % 2**64
            value = value - 2**64 if value >= 2**63 else value
            return -value if sign == "-" and value != -(2**63) else value
        value = int(dec) * (-1 if sign == "-" else 1)
        if -(2**63) <= value < 2**63:
            return value
        return float(s)
    if _DEC_FLOAT.fullmatch(s):
        return float(s)
    if _HEX_FLOAT.fullmatch(s):
        try:
            return float.fromhex(s)
        except (ValueError, OverflowError):
            return None
    return None


def lua_tostring(value: Any) -> str:
    """What Lua's ``tostring`` writes for a scalar (``%.14g`` for floats, with ``.0`` if integral)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            return "nan"
        text = f"{value:.14g}"
        return text + ".0" if text.lstrip("-").isdigit() else text
    return str(value)


def _lua_type(value: Any) -> str:
    """Lua's ``type()`` of a value as lupa hands it to Python."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str | bytes):
        return "string"
    return lupa.lua_type(value) or "userdata"


def to_json_value(engine: LuaEngine, value: Any, keep_strings: bool = False, depth: int = 0) -> Any:
    """A Lua value (lupa object or Python scalar) as the JSON value Orthanc's ``GetJson`` makes."""
    kind = _lua_type(value)
    if kind == "table":
        if depth >= MAX_DEPTH:
            raise LuaExportError(f"table nested deeper than {MAX_DEPTH} levels (a cycle?)")
        members: dict[str, Any] = {}
        is_array = True
        size = 0
        for key, item in value.items():
            skey = key if isinstance(key, str) else lua_tostring(key)
            size += 1
            if is_array and not (skey.isdigit() and skey.isascii() and int(skey) == size):
                is_array = False
            members[skey] = to_json_value(engine, item, keep_strings, depth + 1)
        if is_array:
            return [members[str(i)] for i in range(1, size + 1)]
        return members
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if keep_strings:
        if isinstance(value, int | float):
            return lua_tostring(value)
        if isinstance(value, str):
            return value
    else:
        number: Any = value
        if isinstance(value, str):
            number = lua_tonumber(value)
            if number is None:
                return value
        if isinstance(number, int | float):
            return _number(number)
    log.warning("DumpJson: a Lua %s cannot be written as JSON; writing null", kind)
    return None


def _number(value: int | float) -> int | float | None:
    if isinstance(value, int):
        return value
    if math.isnan(value) or math.isinf(value):
        return None
    if value.is_integer():
        return int(value)
    return value


def dump_json(engine: LuaEngine, value: Any = None, keep_strings: Any = False) -> str:
    """``DumpJson(v, keepStrings)``: compact JSON, object keys sorted (as Orthanc writes them)."""
    data = to_json_value(engine, value, bool(keep_strings))
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _lua_safe(value: Any) -> Any:
    """Integers beyond Lua's 64 bits become floats (lupa cannot convert them)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else float(value)
    if isinstance(value, list):
        return [_lua_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _lua_safe(v) for k, v in value.items() if v is not None}
    return value


def parse_json(text: Any = None) -> Any:
    """``ParseJson(s)``: the Lua value for a JSON text, or ``nil`` when ``s`` is not one."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _lua_safe(value)


def print_lines(engine: LuaEngine, value: Any, limit: int = PRINT_LIMIT) -> list[str]:
    """The lines Orthanc's ``PrintRecursive`` prints: ``<indent>[key]... type value``."""
    lines: list[str] = []

    def walk(v: Any, left: int, indent: str) -> int:
        if left < 1:
            lines.append("ERROR: Item limit reached.")
            return left - 1
        kind = _lua_type(v)
        if kind != "table":
            lines.append(f"{indent} {kind} {lua_tostring(v)}".lstrip())
            return left - 1
        lines.append(f"{indent} table".lstrip())
        for k, item in v.items():
            left = walk(item, left, f"{indent}  [{lua_tostring(k)}]")
            if left < 0:
                break
        return left

    walk(value, limit, "")
    return lines


def print_recursive(engine: LuaEngine, value: Any = None, *_: Any) -> None:
    """``PrintRecursive(v)``: the structure of ``v`` in the gateway log (one record, INFO)."""
    lines = print_lines(engine, value)
    log.info("[%s %s] PrintRecursive:\n%s", engine.name, engine.script.rsplit("/", 1)[-1], "\n".join(lines))
    if engine.output is not None:
        engine.output("info", "\n".join(lines))
