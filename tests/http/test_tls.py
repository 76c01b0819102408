"""http/tls.py: certificates from PEM and PKCS#12, every broken input named by its key, the
protocol policy, and the ASGI TLS extension of a connection (handshakes over memory BIOs)."""

from __future__ import annotations

import datetime
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from dicomproxy.config.settings import HttpsSettings
from dicomproxy.http.tls import (
    INTERMEDIATE_CIPHERS,
    LoadedContext,
    TlsConfigError,
    check_dates,
    connection_scope,
    load_context,
    watched_files,
)
from tests.tls_certs import Issued, TestCa


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    return TestCa.create(tmp_path_factory.mktemp("pki"))


def pem(ca: TestCa, name: str = "server", **kw: object) -> HttpsSettings:
    issued = ca.issue(name, ["127.0.0.1", "localhost"])
    return HttpsSettings(certificate_file=issued.cert_path, key_file=issued.key_path, **kw)


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two contexts over memory BIOs; returns (server side, client side)."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"s": False, "c": False}
    for _ in range(20):
        for name, side in (("c", cli), ("s", srv)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a client certificate failure after the client finished
            cli.write(b"x")
            s_in.write(c_out.read())
            srv.read(1)
            return srv, cli
    raise AssertionError("the handshake did not finish")


def client_context(ca: TestCa, cert: tuple[Path, Path] | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    for name, value in versions.items():
        setattr(ctx, name, value)
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    return ctx


# --------------------------------------------------------------------------- loading
def test_pem_certificate_and_key(ca: TestCa) -> None:
    issued = ca.issue("pem", ["127.0.0.1", "localhost"], key_kind="rsa")
    loaded = load_context(HttpsSettings(certificate_file=issued.cert_path, key_file=issued.key_path))
    assert loaded.certificate.serial == issued.serial and loaded.certificate.subject == issued.subject
    assert loaded.certificate.issuer == ca.cert.subject.rfc4514_string()
    assert loaded.client_cas == 0 and loaded.context.verify_mode == ssl.CERT_NONE
    srv, cli = handshake(loaded.context, client_context(ca))
    assert cli.getpeercert(binary_form=True) == issued.cert.public_bytes(serialization.Encoding.DER)


def test_one_pem_file_with_chain_and_key(ca: TestCa, tmp_path: Path) -> None:
    issued = ca.issue("combined", ["localhost"])
    both = tmp_path / "combined.pem"
    both.write_bytes(issued.pem() + ca.cert_path.read_bytes() + issued.key_pem())
    loaded = load_context(HttpsSettings(certificate_file=both))
    assert loaded.certificate.serial == issued.serial
    handshake(loaded.context, client_context(ca))


def test_encrypted_key_needs_its_password(ca: TestCa, tmp_path: Path) -> None:
    issued = ca.issue("enc", ["localhost"])
    key = issued.encrypted_key(tmp_path / "enc.key", b"key-pass")
    ok = load_context(HttpsSettings(certificate_file=issued.cert_path, key_file=key, key_password="key-pass"))
    assert ok.certificate.serial == issued.serial
    with pytest.raises(TlsConfigError, match=r"^Https:KeyFile: .*encrypted: set Https:KeyPassword"):
        load_context(HttpsSettings(certificate_file=issued.cert_path, key_file=key))
    with pytest.raises(TlsConfigError, match=r"^Https:KeyPassword: does not decrypt") as info:
        load_context(HttpsSettings(certificate_file=issued.cert_path, key_file=key, key_password="wrong-pass"))
    assert "wrong-pass" not in str(info.value) and "key-pass" not in str(info.value)
    with pytest.raises(TlsConfigError, match="not encrypted: remove Https:KeyPassword"):
        load_context(HttpsSettings(certificate_file=issued.cert_path, key_file=issued.key_path, key_password="x"))


@pytest.mark.parametrize("legacy", [False, True], ids=["aes", "3des-windows"])
def test_pkcs12_bundle(ca: TestCa, tmp_path: Path, legacy: bool) -> None:
    issued = ca.issue("pfx", ["localhost"], key_kind="rsa")
    bundle = issued.pkcs12(tmp_path / "certificate.pfx", b"pfx-pass", legacy=legacy)
    loaded = load_context(HttpsSettings(pkcs12_file=bundle, pkcs12_password="pfx-pass"))
    assert loaded.certificate.serial == issued.serial
    _, cli = handshake(loaded.context, client_context(ca))
    assert cli.version() == "TLSv1.3"
    with pytest.raises(TlsConfigError, match=r"^Https:Pkcs12Password: does not open") as info:
        load_context(HttpsSettings(pkcs12_file=bundle, pkcs12_password="nope-pass"))
    assert "nope-pass" not in str(info.value)


def test_default_bundle_is_certificate_pfx_in_the_config_root(ca: TestCa, tmp_path: Path) -> None:
    from dicomproxy.config.settings import load_settings

    config = tmp_path / "appsettings.json"
    config.write_text('{"Urls": "https://127.0.0.1:8443", "Https": {"Pkcs12Password": "p"}}')
    https = load_settings(config, environ={}).https
    assert https.uses_pkcs12 and https.pkcs12_file == tmp_path / "certificate.pfx"
    with pytest.raises(TlsConfigError, match=r"needs a certificate: give Https:CertificateFile and Https:KeyFile .*"
                                             r"or Https:Pkcs12File \(.*certificate.pfx does not exist\)"):
        load_context(https)
    issued = ca.issue("default-pfx", ["localhost"])
    issued.pkcs12(tmp_path / "certificate.pfx", b"p")
    assert load_context(https).certificate.serial == issued.serial
    assert watched_files(https) == (tmp_path / "certificate.pfx",)


def test_broken_inputs_name_the_key(ca: TestCa, tmp_path: Path) -> None:
    a, b = ca.issue("a", ["localhost"]), ca.issue("b", ["localhost"])
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a certificate\n")
    big = tmp_path / "big"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    cases = [
        (HttpsSettings(certificate_file=a.cert_path, key_file=b.key_path),
         r"^Https:KeyFile: the key in .*b.key does not belong to the certificate in .*a.crt \(CN=a,"),
        (HttpsSettings(certificate_file=garbage, key_file=a.key_path), r"^Https:CertificateFile: .* holds no PEM"),
        (HttpsSettings(certificate_file=a.cert_path, key_file=garbage), r"^Https:KeyFile: .* holds no PEM private key"),
        (HttpsSettings(certificate_file=a.cert_path), r"^Https:CertificateFile: .* holds no PEM private key"),
        (HttpsSettings(certificate_file=tmp_path / "missing.crt", key_file=a.key_path),
         r"^Https:CertificateFile: .*missing.crt does not exist"),
        (HttpsSettings(certificate_file=big, key_file=a.key_path), r"^Https:CertificateFile: .* larger than 1 MiB"),
        (HttpsSettings(pkcs12_file=garbage), r"^Https:Pkcs12Password: does not open"),
        (HttpsSettings(certificate_file=a.cert_path, key_file=a.key_path, client_certificate_mode="Required",
                       client_ca_file=garbage), r"^Https:ClientCaFile: .* holds no PEM certificate"),
    ]
    for https, pattern in cases:
        with pytest.raises(TlsConfigError, match=pattern):
            load_context(https)


def test_small_rsa_key_is_refused_by_openssl(ca: TestCa) -> None:
    weak = ca.issue("weak", ["localhost"], key_kind="rsa", bits=1024)
    with pytest.raises(TlsConfigError, match="OpenSSL refuses the certificate CN=weak.*2048 bits"):
        load_context(HttpsSettings(certificate_file=weak.cert_path, key_file=weak.key_path))


# --------------------------------------------------------------------------- policy
def test_policy_tls12_minimum_and_intermediate_suites(ca: TestCa) -> None:
    loaded = load_context(pem(ca))
    ctx = loaded.context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(INTERMEDIATE_CIPHERS.split(":"))
    assert not any("CBC" in c["description"] or "SHA384" in c["name"] and "GCM" not in c["name"]
                   for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")
    # what Python gives a server context by default, for the record: CBC suites Mozilla leaves out
    default = {c["name"] for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()}
    assert "ECDHE-RSA-AES256-SHA384" in default and "ECDHE-RSA-AES256-SHA384" not in tls12
    _, cli = handshake(ctx, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2))
    assert cli.version() == "TLSv1.2" and cli.cipher()[0] in tls12
    assert cli.selected_alpn_protocol() is None  # the client offered none


def test_tls11_client_is_refused(ca: TestCa) -> None:
    ctx = load_context(pem(ca)).context
    with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated, which is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        tls11 = ssl.TLSVersion.TLSv1_1
        old = client_context(ca, minimum_version=tls11, maximum_version=tls11)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that the client really offers TLS 1.1
        lax = load_context(pem(ca)).context  # control: the same client gets TLS 1.1 from a server that allows it
        lax.minimum_version = tls11
        lax.set_ciphers("DEFAULT:@SECLEVEL=0")
    assert handshake(lax, old)[1].version() == "TLSv1.1"
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL|unsupported protocol|alert protocol version"):
        handshake(ctx, old)


def test_minimum_tls13(ca: TestCa) -> None:
    ctx = load_context(pem(ca, minimum_version="1.3")).context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(ssl.SSLError):
        handshake(ctx, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2))


# --------------------------------------------------------------------------- client certificates
def test_required_client_certificate(ca: TestCa, tmp_path: Path) -> None:
    loaded = load_context(pem(ca, client_certificate_mode="Required", client_ca_file=ca.cert_path))
    assert loaded.client_cas == 1 and loaded.context.verify_mode == ssl.CERT_REQUIRED
    alice = ca.issue("alice", client=True)
    srv, _ = handshake(loaded.context, client_context(ca, (alice.cert_path, alice.key_path)))
    scope = connection_scope(srv, loaded)
    assert scope["client_cert_name"] == "CN=alice,O=DicomProxy tests" == alice.subject
    assert scope["client_cert_chain"] == [ssl.DER_cert_to_PEM_cert(srv.getpeercert(binary_form=True))]
    assert scope["tls_version"] == 0x0304 and scope["cipher_suite"] in (0x1301, 0x1302, 0x1303)
    assert scope["server_cert"] == loaded.certificate.pem and scope["client_cert_error"] is None
    with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE|peer did not return"):
        handshake(loaded.context, client_context(ca))
    other = TestCa.create(tmp_path / "other", "Other CA").issue("mallory", client=True)
    with pytest.raises(ssl.SSLError, match="unknown ca|UNKNOWN_CA|certificate verify failed"):
        handshake(loaded.context, client_context(ca, (other.cert_path, other.key_path)))
    expired = ca.issue("expired-client", client=True, days=-1)
    with pytest.raises(ssl.SSLError, match="expired|EXPIRED|certificate verify failed"):
        handshake(loaded.context, client_context(ca, (expired.cert_path, expired.key_path)))


def test_optional_client_certificate(ca: TestCa) -> None:
    loaded = load_context(pem(ca, client_certificate_mode="Optional", client_ca_file=ca.cert_path))
    srv, _ = handshake(loaded.context, client_context(ca))
    scope = connection_scope(srv, loaded)
    assert scope["client_cert_name"] is None and scope["client_cert_chain"] == []
    bob = ca.issue("bob", client=True)
    srv, cli = handshake(loaded.context, client_context(ca, (bob.cert_path, bob.key_path),
                                                        maximum_version=ssl.TLSVersion.TLSv1_2))
    scope = connection_scope(srv, loaded)
    assert scope["client_cert_name"] == bob.subject and scope["tls_version"] == 0x0303
    assert scope["cipher_suite"] == loaded.cipher_ids[cli.cipher()[0]]


# --------------------------------------------------------------------------- dates
def test_dates_are_warned_about(ca: TestCa) -> None:
    expired = load_context(HttpsSettings(**_files(ca.issue("expired", ["localhost"], days=-1)))).certificate
    assert expired.expired()
    assert "has EXPIRED" in (check_dates(expired) or "")
    fresh = load_context(pem(ca)).certificate
    assert check_dates(fresh) is None and not fresh.expired()
    soon = fresh.not_after - datetime.timedelta(days=10, hours=1)
    assert "expires in 10 days" in (check_dates(fresh, now=soon) or "")
    early = fresh.not_before - datetime.timedelta(hours=1)
    assert "not valid before" in (check_dates(fresh, now=early) or "")
    status = fresh.status()
    assert status["serial"] == fresh.serial and status["daysLeft"] >= 89


def _files(issued: Issued) -> dict[str, Path]:
    return {"certificate_file": issued.cert_path, "key_file": issued.key_path}


def test_connection_scope_without_a_known_context(ca: TestCa) -> None:
    loaded: LoadedContext = load_context(pem(ca))
    srv, _ = handshake(loaded.context, client_context(ca))
    scope = connection_scope(srv, None)
    assert scope["server_cert"] is None and scope["cipher_suite"] is None and scope["tls_version"] == 0x0304
