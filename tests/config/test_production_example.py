"""docs/deploy/appsettings.Production.json, the README's "Deploying on a hospital network"
example, loads as it is documented: beside an appsettings.json, with ``--environment
Production``, its secrets read from their files and masked by ``dicomproxy config``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from dicomproxy.auth.passwords import hash_password
from dicomproxy.config.loader import load_settings
from tests.tls_certs import TestCa

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "deploy" / "appsettings.Production.json"
PACS_PASSWORD = "pacs-password-for-the-gateway"


def _site(tmp_path: Path) -> Path:
    """The example with its absolute paths moved under ``tmp_path``, and what they name made."""
    ca = TestCa.create(tmp_path / "ca")
    tls, secrets, logs = tmp_path / "etc/dicomproxy/tls", tmp_path / "run/secrets", tmp_path / "var/log/dicomproxy"
    for folder in (tls, secrets, logs):
        folder.mkdir(parents=True)
    gateway = ca.issue("imaging-gateway.hospital.example", ["imaging-gateway.hospital.example"])
    (tls / "gateway.crt").write_bytes(gateway.pem())
    (tls / "gateway.key").write_bytes(gateway.key_pem())
    for name in ("modalities-ca.pem", "audit-ca.pem"):
        (tls / name).write_bytes(ca.cert_path.read_bytes())
    (secrets / "pacs-password").write_text(PACS_PASSWORD + "\n")
    (secrets / "pacs-admin-password-hash").write_text(hash_password("correct horse battery staple") + "\n")
    (secrets / "upload-station-key-hash").write_text("sha256:" + hashlib.sha256(b"k").hexdigest() + "\n")
    text = EXAMPLE.read_text()
    for prefix in ("/etc/dicomproxy/", "/run/secrets/", "/var/log/dicomproxy/"):
        text = text.replace(prefix, str(tmp_path) + prefix)
    site = tmp_path / "site"
    site.mkdir()
    (site / "appsettings.json").write_text(json.dumps({"ExtraConfig": {"DataFolder": str(tmp_path / "data")}}))
    (site / "appsettings.Production.json").write_text(text)
    return site


def test_the_production_example_loads_with_every_part_on(tmp_path: Path) -> None:
    site = _site(tmp_path)
    settings = load_settings(site / "appsettings.json", environ={}, environment="Production")
    assert [e.scheme for e in settings.endpoints] == ["https", "http"]
    assert settings.upstream.password == PACS_PASSWORD  # read from its file, newline dropped
    assert settings.audit.enabled and settings.dicom.check_called_aet
    assert settings.authentication.oidc.issuer.startswith("https://")


def test_dicomproxy_config_shows_it_with_the_secrets_masked(tmp_path: Path) -> None:
    site = _site(tmp_path)
    out = subprocess.run([sys.executable, "-m", "dicomproxy", "config", "--environment", "Production"],
                         cwd=site, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert PACS_PASSWORD not in out.stdout and "$argon2" not in out.stdout
    shown = json.loads(out.stdout)
    assert shown["Upstream"]["Password"] == "***"
    assert shown["Dicom"]["Tls"]["Enabled"] is True
