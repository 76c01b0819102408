"""TLS for the gateway's own listeners: the server certificate as an ``ssl.SSLContext``, and what a
TLS connection tells the app.

What it owns:

* reading the certificate and its key, from PEM files (``Https:CertificateFile``,
  ``Https:KeyFile``, optional ``Https:KeyPassword``) or from a PKCS#12 bundle
  (``Https:Pkcs12File``, default ``certificate.pfx`` in ``ConfigRoot``, with
  ``Https:Pkcs12Password``), each file read once, parsed with ``cryptography`` and checked
  (the key belongs to the certificate; the dates are logged when they are wrong or near), every
  problem a :class:`TlsConfigError` naming the key and the fix;
* the protocol policy, the same for every context: TLS 1.2 or later (``Https:MinimumTlsVersion``),
  Mozilla's "intermediate" TLS 1.2 suites, renegotiation off, ALPN ``http/1.1``;
* client certificates (``Https:ClientCertificateMode``, ``Https:ClientCaFile``);
* the ASGI TLS extension of a connection (:func:`connection_scope`): the verified client
  certificate's subject reaches the app as ``scope["extensions"]["tls"]["client_cert_name"]``.

It does not watch the files (renewal.py) nor accept connections (listeners.py).

Ciphers. Python's server default (``SSLContext(PROTOCOL_TLS_SERVER)``, OpenSSL 3.0) already
refuses TLS < 1.2 and RC4/3DES/SHA-1 suites, but it still offers the CBC suites with SHA-2 MACs
(``ECDHE-*-AES256-SHA384``, ``ECDHE-*-AES128-SHA256``, ``DHE-RSA-AES*-SHA256``), which Mozilla's
intermediate profile leaves out; so the list is set here: the profile's ECDHE suites, AES-GCM and
ChaCha20-Poly1305 only. The profile's three DHE suites are left out because no DH parameters are
loaded (they could never be chosen); every TLS 1.2 client that matters has ECDHE. TLS 1.3 suites
are OpenSSL's, which are the profile's. Server cipher preference is off, as the profile says
(every suite offered is strong, and the client knows whether it has AES hardware).

Loading without a file. ``ssl`` loads a certificate and key only from paths, and a PKCS#12
bundle's key exists only in memory once decrypted. The chain and the key, the key encrypted
again with a random one-time password, are written to an anonymous ``memfd`` (Linux; never in a
file system, closed right after ``load_cert_chain``); elsewhere to a ``mkstemp`` file (mode
0600) that is removed at once. Anything that reads it in that instant reads an encrypted key.
PEM files take the same path, so that what is checked is exactly what is loaded, even if a
renewal rewrites a file meanwhile.

Cost (this machine, RSA 2048): a PEM certificate and key load in ~10 ms. ``cryptography``'s
RSA key validation (``RSA_check_key``) alone takes ~100 ms; it guards against keys crafted by
someone else, not the operator's own file, so it is skipped for PEM keys (OpenSSL still checks
that the key is the certificate's, and so does :func:`_check_pair`). A PKCS#12 bundle has no such
switch: ~130 ms. Either runs in a thread on renewal, never on the event loop.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import secrets
import ssl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from dicomproxy.config.settings import ConfigError, HttpsSettings

log = logging.getLogger(__name__)

#: Mozilla's "intermediate" TLS 1.2 suites (https://ssl-config.mozilla.org/, guidelines 5.7) without DHE
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))
MAX_FILE_BYTES = 1 << 20  # a certificate, key or bundle is a few KB; a CA bundle a few hundred
EXPIRY_WARNING = datetime.timedelta(days=30)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CLIENT_MODES = {"None": ssl.CERT_NONE, "Optional": ssl.CERT_OPTIONAL, "Required": ssl.CERT_REQUIRED}
_WIRE_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsConfigError(ConfigError):
    """A certificate, key or CA file that cannot be used; the message names the key and the fix."""


@dataclass(frozen=True)
class ServerCertificate:
    """What is known of the certificate a context serves (for logs, health and the ASGI scope)."""

    subject: str
    issuer: str
    serial: str  # hex, as browsers and ``openssl x509 -serial`` show it
    not_before: datetime.datetime
    not_after: datetime.datetime
    sha256: str
    pem: str  # the certificate alone, for the ASGI scope's ``server_cert``

    def describe(self) -> str:
        return f"{self.subject} (serial {self.serial}, valid until {self.not_after:%Y-%m-%d %H:%M} UTC)"

    def status(self, now: datetime.datetime | None = None) -> dict[str, Any]:
        now = now or datetime.datetime.now(datetime.UTC)
        return {"subject": self.subject, "issuer": self.issuer, "serial": self.serial,
                "notBefore": self.not_before.isoformat(), "notAfter": self.not_after.isoformat(),
                "daysLeft": int((self.not_after - now).total_seconds() // 86400), "sha256": self.sha256}

    def expired(self, now: datetime.datetime | None = None) -> bool:
        now = now or datetime.datetime.now(datetime.UTC)
        return not self.not_before <= now <= self.not_after


@dataclass(frozen=True)
class LoadedContext:
    """A ready server context and what it serves."""

    context: ssl.SSLContext
    certificate: ServerCertificate
    client_cas: int  # certificates in Https:ClientCaFile (0 without client certificates)
    cipher_ids: dict[str, int]  # OpenSSL suite name -> IANA number, for the ASGI scope


def watched_files(https: HttpsSettings) -> tuple[Path, ...]:
    """The files a context is built from (renewal.py watches them)."""
    files = [https.certificate_file, https.key_file] if not https.uses_pkcs12 else [https.pkcs12_file]
    files.append(https.client_ca_file)
    return tuple(f for f in files if f is not None)


def load_context(https: HttpsSettings) -> LoadedContext:
    """Read the files of ``https`` and build a server context; raises :class:`TlsConfigError`."""
    chain, key = _pkcs12(https) if https.uses_pkcs12 else _pem(https)
    certificate = _describe(chain[0])
    ctx = _policy(https)
    _load_chain(ctx, chain, key)
    client_cas = _client_cas(ctx, https)
    ids = {c["name"]: c["id"] & 0xFFFF for c in ctx.get_ciphers()}
    return LoadedContext(ctx, certificate, client_cas, ids)


def check_dates(certificate: ServerCertificate, now: datetime.datetime | None = None) -> str | None:
    """A warning when the certificate is not valid now or expires within 30 days."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > certificate.not_after:
        return f"the certificate {certificate.describe()} has EXPIRED: clients will refuse it; renew it"
    if now < certificate.not_before:
        return (f"the certificate {certificate.describe()} is not valid before "
                f"{certificate.not_before:%Y-%m-%d %H:%M} UTC: clients will refuse it until then (check the clock)")
    if certificate.not_after - now < EXPIRY_WARNING:
        return f"the certificate {certificate.describe()} expires in {(certificate.not_after - now).days} days"
    return None


def connection_scope(ssl_object: ssl.SSLObject, served: LoadedContext | None) -> dict[str, Any]:
    """The ASGI TLS extension (asgiref ``specs/tls.rst``) of one connection, built once per connection.

    Python's ``ssl`` gives the client's certificate but not the chain it sent, so
    ``client_cert_chain`` holds the client certificate alone.
    """
    der = ssl_object.getpeercert(binary_form=True)
    name = chain = None
    if der:
        cert = x509.load_der_x509_certificate(der)
        name = cert.subject.rfc4514_string()
        chain = [ssl.DER_cert_to_PEM_cert(der)]
    cipher = ssl_object.cipher()
    return {
        "server_cert": served.certificate.pem if served else None,
        "client_cert_chain": chain or [],
        "client_cert_name": name,
        "client_cert_error": None,  # a certificate that fails verification never gets this far
        "tls_version": _WIRE_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": served.cipher_ids.get(cipher[0]) if served and cipher else None,
    }


# --------------------------------------------------------------------------- reading the files
def _read(path: Path, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise TlsConfigError(f"Https:{key}: {path} does not exist") from None
    except OSError as e:
        raise TlsConfigError(f"Https:{key}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TlsConfigError(f"Https:{key}: {path} is larger than {MAX_FILE_BYTES >> 20} MiB: not a certificate file")
    return data


def _pem(https: HttpsSettings) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    assert https.certificate_file is not None
    data = _read(https.certificate_file, "CertificateFile")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"Https:CertificateFile: {https.certificate_file} holds no PEM certificate "
                             "(-----BEGIN CERTIFICATE-----); for a .pfx/.p12 bundle use Https:Pkcs12File") from None
    key_path, key_name = (https.key_file, "KeyFile") if https.key_file else (https.certificate_file, "CertificateFile")
    key_data = _read(key_path, key_name) if https.key_file else data
    password = https.key_password.encode() if https.key_password else None
    try:
        key = serialization.load_pem_private_key(key_data, password, unsafe_skip_rsa_key_validation=True)
    except TypeError:  # encrypted without a password, or a password for a plain key
        fix = ("the key is encrypted: set Https:KeyPassword (or Https:KeyPasswordFile)" if password is None else
               "the key is not encrypted: remove Https:KeyPassword")
        raise TlsConfigError(f"Https:{key_name}: {key_path}: {fix}") from None
    except ValueError:
        if password is not None and b"ENCRYPTED" in key_data:
            raise TlsConfigError(f"Https:KeyPassword: does not decrypt the key in {key_path}") from None
        raise TlsConfigError(f"Https:{key_name}: {key_path} holds no PEM private key "
                             "(-----BEGIN PRIVATE KEY-----); give it as Https:KeyFile") from None
    _check_pair(chain[0], key, f"Https:{key_name}: the key in {key_path} does not belong to the certificate in "
                f"{https.certificate_file}")
    return chain, key


def _pkcs12(https: HttpsSettings) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    path = https.pkcs12_file
    if path is None or not path.exists():
        raise TlsConfigError(
            f"Https: an https:// entry in Urls needs a certificate: give Https:CertificateFile and Https:KeyFile "
            f"(PEM), or Https:Pkcs12File ({path or 'certificate.pfx'} does not exist)")
    data = _read(path, "Pkcs12File")
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, https.pkcs12_password.encode() or None)
    except ValueError:
        raise TlsConfigError(f"Https:Pkcs12Password: does not open {path} (a wrong password, or not a PKCS#12 "
                             "bundle)") from None
    if cert is None or key is None:
        raise TlsConfigError(f"Https:Pkcs12File: {path} must hold a certificate and its private key "
                             f"(it has {'no certificate' if cert is None else 'no key'})")
    _check_pair(cert, key, f"Https:Pkcs12File: the key in {path} does not belong to its certificate")
    return [cert, *extra], key


def _check_pair(cert: x509.Certificate, key: PrivateKeyTypes, message: str) -> None:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsConfigError(message + f" ({cert.subject.rfc4514_string()}, serial {cert.serial_number:X})")


def _describe(cert: x509.Certificate) -> ServerCertificate:
    der = cert.public_bytes(serialization.Encoding.DER)
    return ServerCertificate(
        subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(), serial=f"{cert.serial_number:X}",
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
        sha256=hashlib.sha256(der).hexdigest(), pem=ssl.DER_cert_to_PEM_cert(der))


# --------------------------------------------------------------------------- the context
def _policy(https: HttpsSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[https.minimum_version]
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.verify_mode = _CLIENT_MODES[https.client_certificate_mode]
    return ctx


def _load_chain(ctx: ssl.SSLContext, chain: list[x509.Certificate], key: PrivateKeyTypes) -> None:
    password = secrets.token_hex(32)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password.encode()))
    with _anonymous_file(pem) as path:
        try:
            ctx.load_cert_chain(path, password=password)
        except ssl.SSLError as e:  # e.g. an RSA key under 2048 bits ("ee key too small")
            raise TlsConfigError(f"Https: OpenSSL refuses the certificate {chain[0].subject.rfc4514_string()}: "
                                 f"{e.reason or e} (use an RSA key of 2048 bits or more, or an EC key)") from None


@contextmanager
def _anonymous_file(data: bytes) -> Iterator[str]:
    """A path that reads ``data``: a memfd (Linux) or a private temporary file, gone afterwards."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("dicomproxy-tls", os.MFD_CLOEXEC)
        path = f"/proc/self/fd/{fd}"
    else:  # pragma: no cover - not Linux
        fd, path = tempfile.mkstemp(prefix="dicomproxy-tls-")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield path
    finally:
        os.close(fd)
        if not path.startswith("/proc/"):  # pragma: no cover
            os.unlink(path)


def _client_cas(ctx: ssl.SSLContext, https: HttpsSettings) -> int:
    if https.client_ca_file is None:
        return 0
    data = _read(https.client_ca_file, "ClientCaFile")
    try:
        cas = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(f"Https:ClientCaFile: {https.client_ca_file} holds no PEM certificate "
                             "(-----BEGIN CERTIFICATE-----)") from None
    ctx.load_verify_locations(cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in cas))
    return len(cas)
