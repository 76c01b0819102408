"""The wheel's contents, as pyproject.toml declares them.

With the ``package-dir`` mapping that installs ``middleware/`` as ``dicomproxy_middleware``,
setuptools needs the packages listed by hand: a new package folder left out of the list would
be missing from ``pip install .`` while every test run from the checkout still passed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config["packages"], config["package-dir"], config["package-data"]


def test_every_package_folder_is_declared() -> None:
    packages, package_dir, _ = _declared()
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dicomproxy").rglob("__init__.py")
    }
    assert found - set(packages) == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert package_dir == {"dicomproxy_middleware": "middleware"}
    assert "dicomproxy_middleware" in packages


def test_non_python_files_are_package_data() -> None:
    """Every file the packages need at run time (prelude.lua, the status page) is in package-data."""
    _, _, data = _declared()
    assert "*.lua" in data["dicomproxy_middleware"]
    lua = sorted(p.name for p in (ROOT / "middleware").glob("*.lua"))
    assert lua == ["prelude.lua"]
    assert "stdlib/*.lua" in data["dicomproxy_middleware"]  # the standard library's wrappers
    assert not [p for p in (ROOT / "middleware" / "stdlib").rglob("*") if p.is_dir()], "stdlib/*.lua does not recurse"
    assert "ui/static/*" in data["dicomproxy"]
    static = ROOT / "dicomproxy" / "ui" / "static"
    assert not [p for p in static.rglob("*") if p.is_dir()], "package-data ui/static/* does not recurse"
