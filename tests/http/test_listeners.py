"""http/listeners.py: binding (an address in use names Urls), the words for refused handshakes,
and the TLS acceptor on a real loop and sockets: the cap counts handshakes, a silent client is
closed at the deadline, a good client reaches the protocol."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import pytest

from dicomproxy.config.fields import Endpoint
from dicomproxy.config.settings import ConfigError, HttpsSettings
from dicomproxy.http.listeners import Listener, TlsAcceptor, bind, refusal
from dicomproxy.http.renewal import CertificateStore
from dicomproxy.http.server import HeadLimits
from tests.http.test_tls import client_context
from tests.tls_certs import TestCa


def test_bind_names_urls_when_the_address_is_taken() -> None:
    first = bind(Endpoint("https", "127.0.0.1", 0), 16)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^Urls: cannot listen on https://127.0.0.1:{port}: .*in use"):
            bind(Endpoint("https", "127.0.0.1", port), 16)
    finally:
        first.close()
    v6 = bind(Endpoint("http", "::1", 0), 16)
    assert v6.family == socket.AF_INET6 and not v6.getblocking()
    v6.close()


def test_refusal_words() -> None:
    https = HttpsSettings()
    missing = ssl.SSLError(1, "peer did not return a certificate")
    missing.reason = "PEER_DID_NOT_RETURN_A_CERTIFICATE"  # type: ignore[misc]
    assert refusal(missing, https, 20, 0.1) == (logging.WARNING, "it sent no client certificate "
                                                                  "(Https:ClientCertificateMode is Required)")
    old = ssl.SSLError(1, "unsupported protocol")
    old.reason = "UNSUPPORTED_PROTOCOL"  # type: ignore[misc]
    assert refusal(old, https, 20, 0.1)[1] == "it offers only TLS versions older than 1.2 (Https:MinimumTlsVersion)"
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "certificate has expired"  # type: ignore[attr-defined]
    level, words = refusal(verify, https, 20, 0.1)
    assert level == logging.WARNING and words.endswith("against Https:ClientCaFile: certificate has expired")
    assert refusal(ConnectionAbortedError("SSL handshake is taking longer than 20.0 seconds"), https, 20, 20.01) == (
        logging.INFO, "no TLS handshake within 20 s (Server:HeadTimeoutSeconds)")
    assert refusal(ConnectionResetError("reset"), https, 20, 0.1)[0] == logging.DEBUG


class Recorder(asyncio.Protocol):
    """A stand-in for the HTTP protocol: records that it got a connection, answers, closes."""

    made: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        Recorder.made.append(ssl_object.version() if ssl_object else "plain")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"pong")  # type: ignore[attr-defined]


@pytest.fixture
def store(tmp_path: Path) -> tuple[CertificateStore, TestCa]:
    ca = TestCa.create(tmp_path / "pki")
    issued = ca.issue("server", ["localhost", "127.0.0.1"])
    return CertificateStore(HttpsSettings(certificate_file=issued.cert_path, key_file=issued.key_path)), ca


async def test_acceptor_caps_handshakes_and_closes_silent_clients(
    store: tuple[CertificateStore, TestCa], caplog: pytest.LogCaptureFixture
) -> None:
    certs, ca = store
    caplog.set_level(logging.INFO)
    sock = bind(Endpoint("https", "127.0.0.1", 0), 16)
    port = sock.getsockname()[1]
    open_connections: set[object] = set()
    limits = HeadLimits(head_timeout=0.5, max_connections=2)
    acceptor = TlsAcceptor(Listener(Endpoint("https", "127.0.0.1", port), sock, certs), Recorder,
                           lambda: len(open_connections) + len(acceptor.pending), limits)
    acceptor.start()
    loop = asyncio.get_running_loop()
    Recorder.made = []
    try:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await _until(lambda: len(acceptor.pending) == 2)
        # a third connection is over the cap while two handshakes are pending: closed at once
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert "refusing a TLS connection from 127.0.0.1: 2 connections open or in handshake" in caplog.text
        # the silent ones are closed at the deadline, with the reason
        for r, w in silent:
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
        assert "refused: no TLS handshake within 0.5 s (Server:HeadTimeoutSeconds)" in caplog.text
        await _until(lambda: not acceptor.pending)
        # a real client gets through, and the protocol sees the TLS stream
        ctx = client_context(ca)
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"pong"
        assert Recorder.made == ["TLSv1.3"]
        w.close()
        # plain HTTP on the TLS port: refused and said so
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await _until(lambda: "refused: it sent plain HTTP to an https:// listener" in caplog.text)
    finally:
        acceptor.close()
        await acceptor.wait_closed()
    assert sock.fileno() == -1
    assert loop.is_running()


async def test_close_cancels_pending_handshakes(store: tuple[CertificateStore, TestCa]) -> None:
    certs, _ = store
    sock = bind(Endpoint("https", "127.0.0.1", 0), 16)
    port = sock.getsockname()[1]
    acceptor = TlsAcceptor(Listener(Endpoint("https", "127.0.0.1", port), sock, certs), Recorder,
                           lambda: len(acceptor.pending), HeadLimits(head_timeout=30))
    acceptor.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _until(lambda: len(acceptor.pending) == 1)
    acceptor.close()
    await asyncio.wait_for(acceptor.wait_closed(), 5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def _until(predicate: object, timeout: float = 5) -> None:
    assert callable(predicate)
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")
