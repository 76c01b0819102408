"""The README table and the repository's appsettings.json are the model's (issue 9, item 1)."""

from __future__ import annotations

import json
import subprocess
import sys

from dicomproxy.config import docs
from dicomproxy.config.model import Settings
from dicomproxy.config.schema import all_paths, defaults
from dicomproxy.config.settings import load_settings
from tests.peers import REPO_ROOT


def test_readme_table_is_the_models() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert docs.with_table(readme) == readme, "README.md differs from the model: run python -m dicomproxy.config.docs"


def test_every_key_is_in_the_table() -> None:
    table = docs.table()
    for path in all_paths(Settings):
        assert f"| `{path}` |" in table, path
    assert "| `Dicom:Host` | " in table and "| `Smtp:PasswordFile` | path |" in table


def test_repository_appsettings_lists_every_default() -> None:
    shipped = json.loads((REPO_ROOT / "appsettings.json").read_text())
    assert shipped == defaults(Settings)
    assert (REPO_ROOT / "appsettings.json").read_text() == docs.appsettings()
    s = load_settings(REPO_ROOT / "appsettings.json", environ={})
    assert s.tree.as_dict() == Settings.model_validate({}, context={"root": REPO_ROOT}).tree.as_dict()  # the defaults


def test_the_generator_checks_and_rewrites(tmp_path) -> None:  # type: ignore[no-untyped-def]
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{docs.BEGIN}\n| old |\n{docs.END}\n\nafter\n")
    settings = tmp_path / "appsettings.json"
    cmd = [sys.executable, "-m", "dicomproxy.config.docs", "--readme", str(readme), "--appsettings", str(settings)]
    assert subprocess.run([*cmd, "--check"], capture_output=True, cwd=REPO_ROOT).returncode == 1
    assert subprocess.run(cmd, capture_output=True, cwd=REPO_ROOT).returncode == 0
    assert readme.read_text() == f"# x\n\n{docs.BEGIN}\n{docs.table()}{docs.END}\n\nafter\n"
    assert json.loads(settings.read_text()) == defaults(Settings)
    assert subprocess.run([*cmd, "--check"], capture_output=True, cwd=REPO_ROOT).returncode == 0
