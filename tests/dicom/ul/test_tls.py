"""dicomproxy.dicom.ul.tls: the BCP 195 policy (what a client can and cannot negotiate), the
contexts' errors naming their keys, and the TLS acceptor in process (real sockets): C-STORE over
TLS into the spool, a silent client refused at ARTIM, an untrusted one refused with the reason."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.config.settings import DicomSettings, load_settings
from dicomproxy.dicom import datasets
from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul import tls
from dicomproxy.dicom.ul.acceptor import Limits
from dicomproxy.dicom.ul.errors import UpperLayerError
from tests import dicom_samples
from tests.dicom.stack import dicom_stack, until
from tests.tls_certs import Issued, TestCa

CT = "1.2.840.10008.5.1.4.1.1.2"


def dicom_settings(tmp_path: Path, **dicom: Any) -> DicomSettings:
    config = tmp_path / "appsettings.json"
    config.write_text("{}")
    return load_settings(config, environ={}, overrides={"Dicom": dicom}).dicom


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = TestCa.create(tmp_path / "pki")
    return {"ca": ca, "server": ca.issue("server", ["127.0.0.1"]), "client": ca.issue("modality", client=True),
            "stranger": TestCa.create(tmp_path / "other", "Other CA").issue("stranger", client=True)}


def server_settings(tmp_path: Path, pki: dict[str, Any], **extra: Any) -> DicomSettings:
    server: Issued = pki["server"]
    return dicom_settings(tmp_path, Tls={"Enabled": True, "Certificate": str(server.cert_path),
                                         "Key": str(server.key_path), "ClientCa": str(pki["ca"].cert_path), **extra})


def client(pki: dict[str, Any], who: str = "client", **remote: Any) -> ssl.SSLContext:
    cert: Issued = pki[who]
    ae = dicom_settings(pki["ca"].folder.parent, Modalities={"pacs": {
        "Aet": "GW", "Host": "127.0.0.1", "Port": 1, "Tls": True, "TlsCa": str(pki["ca"].cert_path),
        "TlsCertificate": str(cert.cert_path), "TlsKey": str(cert.key_path), **remote}})
    ctx = tls.client_context(ae.modalities["pacs"], ae.tls)
    assert ctx is not None
    return ctx


# --------------------------------------------------------------------------- the policy
def test_policy_tls12_gcm_only(tmp_path: Path, pki: dict[str, Any]) -> None:
    ctx = tls.server_context(server_settings(tmp_path, pki).tls)
    names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert names == set(tls.BCP195_CIPHERS.split(":"))
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2 and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_COMPRESSION and ctx.options & ssl.OP_NO_RENEGOTIATION
    optional = tls.server_context(server_settings(tmp_path, pki, RequireClientCertificate=False).tls)
    assert optional.verify_mode is ssl.CERT_OPTIONAL


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("version, ciphers, ok", [
    (ssl.TLSVersion.TLSv1_3, None, True),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256", True),
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:AES128-SHA", False),  # CBC
    (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", False),  # not in BCP 195's list
    (ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0", False),
])
async def test_what_a_client_can_negotiate(
    tmp_path: Path, pki: dict[str, Any], version: ssl.TLSVersion, ciphers: str | None, ok: bool
) -> None:
    refused: list[tls.HandshakeRefused] = []
    settings = server_settings(tmp_path, pki)
    ctx = client(pki)
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    async with dicom_stack(tmp_path, tls=tls.server_context(settings.tls), on_tls_refused=refused.append) as stack:
        if ok:
            status = await _echo(stack.port, ctx)
            assert status == 0x0000
        else:
            with pytest.raises(UpperLayerError, match="over TLS"):
                await _echo(stack.port, ctx)
            await until(lambda: len(refused) == 1)
            assert refused[0].kind is tls.RefusalKind.PROTOCOL


async def _echo(port: int, ctx: ssl.SSLContext) -> int:
    scu = await StorageScu.connect("127.0.0.1", port, called_aet="GW", calling_aet="MOD",
                                   contexts=[(VERIFICATION, IMPLICIT)], timeout=5, tls=ctx)
    try:
        return (await scu.c_echo()).status
    finally:
        await scu.release()


# --------------------------------------------------------------------------- the acceptor
async def test_store_over_tls_reaches_the_spool(tmp_path: Path, pki: dict[str, Any]) -> None:
    ds = dicom_samples.build_dataset(patient_id="PT", patient_name="T^T", size=(300, 300))  # several PDUs
    raw = datasets.encode(ds, ExplicitVRLittleEndian)
    settings = server_settings(tmp_path, pki)
    async with dicom_stack(tmp_path, tls=tls.server_context(settings.tls)) as stack:
        scu = await StorageScu.connect("127.0.0.1", stack.port, called_aet="GW", calling_aet="MOD", timeout=5,
                                       contexts=[(CT, ExplicitVRLittleEndian)], tls=client(pki))
        try:
            assert (await scu.c_store(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, raw)).status == 0
        finally:
            await scu.release()
        await until(lambda: len(stack.entries) == 1)
        assert stack.entries[0].sop_instance == ds.SOPInstanceUID


async def test_untrusted_client_and_silent_client(tmp_path: Path, pki: dict[str, Any], caplog: Any) -> None:
    refused: list[tls.HandshakeRefused] = []
    settings = server_settings(tmp_path, pki)
    async with dicom_stack(tmp_path, tls=tls.server_context(settings.tls), on_tls_refused=refused.append,
                           limits=Limits(artim=0.5)) as stack:
        with pytest.raises(UpperLayerError, match="over TLS"):
            await _echo(stack.port, client(pki, "stranger"))
        await until(lambda: len(refused) == 1)
        assert refused[0].kind is tls.RefusalKind.UNTRUSTED_CERTIFICATE
        assert "handshake from 127.0.0.1:" in caplog.text and "certificate verify failed" in caplog.text
        silent = socket.create_connection(("127.0.0.1", stack.port))  # connects, never says hello
        try:
            await until(lambda: len(refused) == 2)
            assert refused[1].kind is tls.RefusalKind.TIMEOUT
            assert stack.acceptor.admission.connections == 0  # the slot is given back
        finally:
            silent.close()


async def test_an_address_not_allowed_gets_no_handshake(tmp_path: Path, pki: dict[str, Any], caplog: Any) -> None:
    refused: list[tls.HandshakeRefused] = []
    settings = server_settings(tmp_path, pki)
    async with dicom_stack(tmp_path, tls=tls.server_context(settings.tls), on_tls_refused=refused.append,
                           AllowedAddresses=["10.0.0.0/8"]) as stack:
        with pytest.raises(UpperLayerError):
            await _echo(stack.port, client(pki))
        await until(lambda: "closed before the TLS handshake: the address is not in Dicom:AllowedAddresses"
                    in caplog.text)
        assert "127.0.0.1:" in caplog.text and not refused  # no handshake was attempted


async def test_hostname_check(tmp_path: Path, pki: dict[str, Any]) -> None:
    pki["server"] = pki["ca"].issue("named", ["pacs.example.org"])  # no 127.0.0.1 in it
    settings = server_settings(tmp_path, pki)
    async with dicom_stack(tmp_path, tls=tls.server_context(settings.tls)) as stack:
        with pytest.raises(UpperLayerError, match="not trusted.*TlsCheckHostname"):
            await _echo(stack.port, client(pki))
        assert await _echo(stack.port, client(pki, TlsCheckHostname=False)) == 0  # still verified against the CA


# --------------------------------------------------------------------------- configuration errors
def test_errors_name_the_key(tmp_path: Path, pki: dict[str, Any]) -> None:
    server: Issued = pki["server"]
    with pytest.raises(tls.DicomTlsError, match="Dicom:Tls:Certificate: .* does not exist"):
        tls.server_context(server_settings(tmp_path, pki, Certificate=str(tmp_path / "missing.pem")).tls)
    with pytest.raises(tls.DicomTlsError, match="Dicom:Tls:Key: cannot use"):
        tls.server_context(server_settings(tmp_path, pki, Key=str(pki["client"].key_path)).tls)
    encrypted = server.encrypted_key(tmp_path / "enc.key", b"s3cret")
    with pytest.raises(tls.DicomTlsError, match="Dicom:Tls:Key"):
        tls.server_context(server_settings(tmp_path, pki, Key=str(encrypted), KeyPassword="wrong").tls)
    tls.server_context(server_settings(tmp_path, pki, Key=str(encrypted), KeyPassword="s3cret").tls)
    with pytest.raises(tls.DicomTlsError, match="TlsCa of remote AE GW@127.0.0.1:1"):
        client(pki, TlsCa=str(tmp_path / "nope.pem"))


async def test_plain_sockets_keep_asyncio(tmp_path: Path) -> None:
    """recv/sendall on a plain socket are the loop's own (the hot path pays nothing)."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        await tls.sendall(loop, a, b"ping")
        assert await tls.recv(loop, b, 16) == b"ping"
    finally:
        a.close()
        b.close()
