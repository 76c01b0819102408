"""The status page's script view: a script's source for reading, where its error points, `check`.

The source is served read-only, only for the files the script host reports (``main.lua``,
``main-transient.lua``, ``main-task.lua`` and any other ``*.lua`` directly in the scripts folder),
by name (no path), at most ``MAX_SOURCE`` bytes. A Lua error reads ``path:line: message``
(:class:`dicomproxy_middleware.LuaError`); :func:`error_location` finds the line the page marks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

MAX_SOURCE = 1024 * 1024  # bytes of one script shown; past it, the first MAX_SOURCE and a note
_LOCATION = re.compile(r'(?:^|[\s"\[])(?P<file>[^\s:"\]]+\.lua)"?\]?:(?P<line>\d+):')


def error_location(text: str | None) -> dict[str, Any] | None:
    """``{"file": "main.lua", "line": 12}`` from the first ``...main.lua:12:`` in an error."""
    if not text:
        return None
    m = _LOCATION.search(text)
    if m is None:
        return None
    return {"file": Path(m.group("file")).name, "line": int(m.group("line"))}


def script_files(root: Path, status: dict[str, Any]) -> dict[str, Path]:
    """The scripts the page may show, by file name."""
    files = {Path(s["script"]).name: Path(s["script"]) for s in status.get("scripts", []) if s.get("script")}
    if root.is_dir():
        files.update({p.name: p for p in root.glob("*.lua") if p.is_file()})
    return files


def read_source(path: Path) -> dict[str, Any]:
    """The text of one script (UTF-8, invalid bytes replaced), cut at ``MAX_SOURCE`` bytes."""
    with path.open("rb") as f:
        data = f.read(MAX_SOURCE + 1)
    return {"script": path.name, "source": data[:MAX_SOURCE].decode("utf-8", "replace"),
            "truncated": len(data) > MAX_SOURCE}


def with_locations(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`check`'s results with the script's name and its error's line."""
    return [{**r, "name": Path(r["script"]).name, "location": error_location(r.get("error"))} for r in results]
