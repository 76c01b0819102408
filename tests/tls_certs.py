"""Certificates for the TLS tests, made with ``cryptography``: a private CA, server certificates
for 127.0.0.1/localhost, client certificates, expired ones, PKCS#12 bundles.

    ca = TestCa.create(folder, "Test CA")            # ca.cert_path: the CA's PEM, for --cacert / ClientCaFile
    server = ca.issue("server", ["127.0.0.1", "localhost"])   # .cert_path .key_path .serial .pem_bundle()
    client = ca.issue("alice", client=True)           # .cert_path .key_path for curl --cert/--key
    old = ca.issue("old", days=-1)                    # expired yesterday
    server.pkcs12(path, b"password")                  # a .pfx bundle (certificate, CA, key)
    server.encrypted_key(path, b"password")           # the key as encrypted PKCS#8 PEM
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = CertificateIssuerPrivateKeyTypes


def new_key(kind: str = "ec", bits: int = 2048) -> Key:
    return rsa.generate_private_key(65537, bits) if kind == "rsa" else ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "DicomProxy tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class Issued:
    """A certificate and its key, written as PEM files."""

    cert: x509.Certificate
    key: Key
    cert_path: Path
    key_path: Path
    ca: TestCa | None = None

    @property
    def serial(self) -> str:
        return f"{self.cert.serial_number:X}"

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def encrypted_key(self, path: Path, password: bytes) -> Path:
        path.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(password)))
        return path

    def pkcs12(self, path: Path, password: bytes | None, legacy: bool = False) -> Path:
        """A PKCS#12 bundle; ``legacy``: 3DES/SHA-1 as older Windows exports it."""
        extra = [self.ca.cert] if self.ca is not None else None
        if password and legacy:
            encryption = (serialization.PrivateFormat.PKCS12.encryption_builder()
                          .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
                          .hmac_hash(hashes.SHA1()).build(password))
        elif password:
            encryption = serialization.BestAvailableEncryption(password)
        else:
            encryption = serialization.NoEncryption()
        path.write_bytes(pkcs12.serialize_key_and_certificates(b"dicomproxy", self.key, self.cert,  # type: ignore[arg-type]
                                                               extra, encryption))
        return path


@dataclass
class TestCa:
    """A private CA that issues the tests' certificates."""

    __test__ = False  # not a pytest test class

    folder: Path
    name: str
    cert: x509.Certificate
    key: Key
    cert_path: Path

    @classmethod
    def create(cls, folder: Path, name: str = "DicomProxy Test CA") -> TestCa:
        folder.mkdir(parents=True, exist_ok=True)
        key = new_key()
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        path = folder / f"{name.replace(' ', '-').lower()}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(folder, name, cert, key, path)

    def issue(self, name: str, hosts: list[str] | None = None, *, client: bool = False, days: int = 90,
              key_kind: str = "ec", bits: int = 2048) -> Issued:
        """A server certificate for ``hosts`` (IPs or names), or a client certificate; ``days`` < 0:
        expired that many days ago."""
        key = new_key(key_kind, bits)
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)) if days > 0 else (
            now - datetime.timedelta(days=30), now + datetime.timedelta(days=days))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        stem = self.folder / name.replace(" ", "-").lower()
        issued = Issued(cert, key, stem.with_suffix(".crt"), stem.with_suffix(".key"), self)
        issued.cert_path.write_bytes(issued.pem())
        issued.key_path.write_bytes(issued.key_pem())
        return issued
