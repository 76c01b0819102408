"""Paths below a mount point, for the apps the gateway mounts (the status page, notifications)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def mount_subpath(scope: Mapping[str, Any], prefix: str) -> str:
    """The path below a mount ``prefix`` (``/dicomproxy/ui/static/x.js`` -> ``/static/x.js``),
    whether the mount hands over the full path or strips its ``root_path``."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    prefix = prefix.rstrip("/")
    if path.startswith(prefix):
        path = path[len(prefix):]
    return "/" + path.strip("/")
