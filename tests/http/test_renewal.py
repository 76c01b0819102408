"""http/renewal.py: a renewed certificate is served to new handshakes at once (through the SNI
callback); a broken renewal keeps the old one, is reported once and shows in the health section."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from pathlib import Path

import pytest

from dicomproxy.config.settings import HttpsSettings
from dicomproxy.http.renewal import CertificateStore, signature
from dicomproxy.notify.events import AppEvent, EventBus
from tests.http.test_tls import client_context, handshake
from tests.tls_certs import Issued, TestCa


@pytest.fixture
def ca(tmp_path: Path) -> TestCa:
    return TestCa.create(tmp_path / "pki")


def install(issued: Issued, folder: Path) -> tuple[Path, Path]:
    """Write the certificate and key where the gateway reads them, as a renewal would (replace)."""
    folder.mkdir(exist_ok=True)
    cert, key = folder / "server.crt", folder / "server.key"
    for source, target in ((issued.cert_path, cert), (issued.key_path, key)):
        tmp = target.with_suffix(".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return cert, key


def served_serial(store: CertificateStore, ca: TestCa) -> str:
    _, cli = handshake(store.base, client_context(ca))
    der = cli.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return f"{x509.load_der_x509_certificate(der).serial_number:X}"


def make_store(ca: TestCa, tmp_path: Path, bus: EventBus | None = None,
               **kw: object) -> tuple[CertificateStore, Issued]:
    first = ca.issue("first", ["localhost"])
    cert, key = install(first, tmp_path / "live")
    return CertificateStore(HttpsSettings(certificate_file=cert, key_file=key, **kw), bus, settle=0.01), first


async def test_renewal_is_served_to_new_handshakes(ca: TestCa, tmp_path: Path) -> None:
    store, first = make_store(ca, tmp_path)
    assert served_serial(store, ca) == first.serial
    assert not await store.check()  # nothing changed
    second = ca.issue("second", ["localhost"])
    install(second, tmp_path / "live")
    assert await store.check()
    assert served_serial(store, ca) == second.serial  # the base context hands the handshake to the new one
    assert store.served.certificate.serial == second.serial and store.status()["ok"] is True
    assert store.served_by(store.served.context) is store.served
    assert store.served_by(store.base) is not None and store.served_by(store.base).certificate.serial == first.serial
    third = ca.issue("third", ["localhost"])
    install(third, tmp_path / "live")
    assert await store.check() and served_serial(store, ca) == third.serial


async def test_broken_renewal_keeps_the_old_certificate(ca: TestCa, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    events: list[AppEvent] = []
    bus.subscribe(events.append)
    store, first = make_store(ca, tmp_path, bus)
    other = ca.issue("other", ["localhost"])
    (tmp_path / "live" / "server.key").write_bytes(other.key_pem())  # a key that is not the certificate's
    assert not await store.check()
    assert served_serial(store, ca) == first.serial
    assert "the changed certificate files were not loaded: Https:KeyFile: the key in" in caplog.text
    assert f"Still serving CN=first,O=DicomProxy tests (serial {first.serial}" in caplog.text
    assert [e.kind for e in events] == ["certificate.failed"] and first.serial in events[0].body
    status = store.status()
    assert status["ok"] is False and "does not belong" in status["lastError"]
    assert status["certificate"]["serial"] == first.serial
    # the same broken files are not reported again
    assert not await store.check() and len(events) == 1
    # a truncated certificate is another change, reported too
    (tmp_path / "live" / "server.crt").write_bytes(first.pem()[:100])
    assert not await store.check() and len(events) == 2 and "holds no PEM certificate" in events[1].body
    # the renewal completed: served, and the health section is ok again
    install(other, tmp_path / "live")
    assert await store.check() and served_serial(store, ca) == other.serial
    assert store.status()["ok"] is True and store.status()["lastError"] is None


async def test_a_file_still_being_written_waits_for_the_next_round(ca: TestCa, tmp_path: Path) -> None:
    store, first = make_store(ca, tmp_path)
    store.settle_seconds = 0.2
    second = ca.issue("second", ["localhost"])
    cert, key = tmp_path / "live" / "server.crt", tmp_path / "live" / "server.key"
    cert.write_bytes(second.pem())

    async def write_key_late() -> None:
        await asyncio.sleep(0.05)
        key.write_bytes(second.key_pem())

    writer = asyncio.create_task(write_key_late())
    assert not await store.check()  # the key changed while settling: not loaded, not reported
    await writer
    assert store.last_error is None and served_serial(store, ca) == first.serial
    assert await store.check() and served_serial(store, ca) == second.serial


async def test_client_ca_renewal(ca: TestCa, tmp_path: Path) -> None:
    cas = tmp_path / "clients.pem"
    shutil.copyfile(ca.cert_path, cas)
    store, _ = make_store(ca, tmp_path, client_certificate_mode="Required", client_ca_file=cas)
    new_ca = TestCa.create(tmp_path / "new-ca", "New Client CA")
    alice = new_ca.issue("alice", client=True)
    with pytest.raises(ssl.SSLError):
        handshake(store.base, client_context(ca, (alice.cert_path, alice.key_path)))
    cas.write_bytes(ca.cert_path.read_bytes() + new_ca.cert_path.read_bytes())
    assert await store.check() and store.served.client_cas == 2
    srv, _ = handshake(store.base, client_context(ca, (alice.cert_path, alice.key_path)))
    assert srv.getpeercert() is not None  # verified against the renewed bundle


async def test_the_watch_runs_every_interval(ca: TestCa, tmp_path: Path) -> None:
    store, _ = make_store(ca, tmp_path, reload_interval=0.05)
    await store.start()
    try:
        second = ca.issue("second", ["localhost"])
        install(second, tmp_path / "live")
        for _ in range(200):
            if store.served.certificate.serial == second.serial:
                break
            await asyncio.sleep(0.02)
        assert served_serial(store, ca) == second.serial
    finally:
        await store.stop()
    assert not store._watching.running


async def test_no_watch_with_interval_zero(ca: TestCa, tmp_path: Path) -> None:
    store, _ = make_store(ca, tmp_path, reload_interval=0)
    await store.start()
    assert not store._watching.running


def test_signature_follows_symlinks(tmp_path: Path) -> None:
    """certbot's live/ links point into archive/: a renewal changes the link's target."""
    (tmp_path / "v1.pem").write_text("one")
    (tmp_path / "v2.pem").write_text("two, longer")
    link = tmp_path / "cert.pem"
    link.symlink_to(tmp_path / "v1.pem")
    before = signature((link,))
    link.unlink()
    link.symlink_to(tmp_path / "v2.pem")
    assert signature((link,)) != before
    assert signature((tmp_path / "missing",)) == (None,)
