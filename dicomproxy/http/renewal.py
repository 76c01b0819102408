"""Renewal without a restart: the context the TLS listeners serve, swapped when its files change.

A listener hands one ``ssl.SSLContext`` to every handshake (listeners.py): the *base* context,
built at start-up. It carries an SNI callback, which OpenSSL calls on every ClientHello (with or
without a server name), and which moves the connection to the *current* context
(``SSLObject.context = current``, i.e. ``SSL_set_SSL_CTX``) before a certificate is chosen. A
renewal builds a new context and makes it current; connections already open keep theirs. Checked
on this machine with uvloop and with asyncio's own loop, TLS 1.2 and 1.3: a new connection sees
the new certificate at once.

What a swap takes from the new context: the certificate, its chain and key, and the store
client certificates are verified against (``Https:ClientCaFile`` is watched too). What stays the
base context's: the protocol policy and the client-certificate mode, which come from the same
settings in both (tls.py builds every context), so nothing differs.

Watching: every ``Https:ReloadIntervalSeconds`` each file is ``stat()``ed, following symlinks
(certbot's ``live/`` links, Kubernetes' ``..data`` swaps): device, inode, size, mtime. A change is
loaded once it has held still for :data:`SETTLE_SECONDS` (a renewal writes the certificate, then
the key); the files are read and parsed in a thread, never on the event loop. A broken renewal
(a key that does not match, a truncated file, a wrong password) keeps the certificate being
served, logs an error naming the key, raises a ``certificate.failed`` event (mail rules and the
notification feed see it) and marks the ``https`` section of ``/dicomproxy/health`` not ok; the
same broken files are not reported again until they change.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
from pathlib import Path
from typing import Any

from dicomproxy.background import BackgroundTask
from dicomproxy.config.settings import HttpsSettings
from dicomproxy.http.tls import LoadedContext, TlsConfigError, check_dates, load_context, watched_files
from dicomproxy.notify.events import EventBus

log = logging.getLogger(__name__)

SETTLE_SECONDS = 0.5
EVENT_KIND = "certificate.failed"

FileState = tuple[int, int, int, int] | None  # device, inode, size, mtime (ns); None: missing
Signature = tuple[FileState, ...]


class CertificateStore:
    """The TLS listeners' contexts: the base one handshakes start with, the current one they end on.

    Built from ``https`` at once (raises :class:`~dicomproxy.http.tls.TlsConfigError`); a
    component of the gateway (``start``/``stop`` run the watch) and a health check (``status``).
    """

    def __init__(self, https: HttpsSettings, bus: EventBus | None = None, settle: float = SETTLE_SECONDS) -> None:
        self.https = https
        self.bus = bus
        self.settle_seconds = settle  # not "settle": the gateway calls a component's settle(until) at shutdown
        self.files = watched_files(https)
        self._signature = signature(self.files)  # taken first: a change during the read is seen next time
        self.served = load_context(https)
        self.base = self.served.context
        self.base.sni_callback = self._on_client_hello
        self._known = {id(self.base): self.served}
        self._failed: Signature | None = None
        self.last_error: str | None = None
        self.loaded_at = _now()
        self._watching = BackgroundTask("https-certificate-watch")
        _warn_dates(self.served)

    # -- per handshake and connection -------------------------------------------------------------
    def _on_client_hello(self, ssl_object: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        current = self.served.context
        if current is not base:
            ssl_object.context = current

    def served_by(self, context: ssl.SSLContext) -> LoadedContext | None:
        """What ``context`` serves, if it is the base, the current or the previous context."""
        return self._known.get(id(context))

    # -- the watch ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.https.reload_interval > 0:
            self._watching.start(self._watch)

    async def stop(self) -> None:
        await self._watching.stop()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.https.reload_interval)
            try:
                await self.check()
            except Exception:  # the watch must outlive anything one round does
                log.exception("Https: checking the certificate files failed")

    async def check(self) -> bool:
        """Load the files if they changed and held still; True when a new context is current."""
        seen = signature(self.files)
        if seen in (self._signature, self._failed):
            return False
        await asyncio.sleep(self.settle_seconds)
        if signature(self.files) != seen:
            return False  # still being written: the next round looks again
        try:
            loaded = await asyncio.to_thread(load_context, self.https)
        except TlsConfigError as e:
            self._failed = seen
            self._report(str(e))
            return False
        self._signature, self._failed = seen, None
        self._swap(loaded)
        return True

    def _swap(self, loaded: LoadedContext) -> None:
        previous, self.served = self.served, loaded
        self._known = {id(self.base): self._known[id(self.base)], id(previous.context): previous,
                       id(loaded.context): loaded}
        self.last_error, self.loaded_at = None, _now()
        log.info("Https: serving the renewed certificate %s to new connections (was serial %s)",
                 loaded.certificate.describe(), previous.certificate.serial)
        _warn_dates(loaded)

    def _report(self, message: str) -> None:
        self.last_error = message
        still = self.served.certificate.describe()
        log.error("Https: the changed certificate files were not loaded: %s. Still serving %s", message, still)
        if self.bus is not None:
            self.bus.emit(EVENT_KIND, "HTTPS certificate not renewed", f"{message}. Still serving {still}.",
                          "/dicomproxy/ui", serial=self.served.certificate.serial)

    # -- health ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``https`` section of ``/dicomproxy/health``: not ok when the certificate is out of
        date or a renewal failed."""
        cert = self.served.certificate
        return {
            "ok": self.last_error is None and not cert.expired(),
            "certificate": cert.status(),
            "clientCertificates": self.https.client_certificate_mode,
            "clientCas": self.served.client_cas,
            "loadedAt": self.loaded_at.isoformat(),
            "reloadIntervalSeconds": self.https.reload_interval,
            "lastError": self.last_error,
        }


def signature(files: tuple[Path, ...]) -> Signature:
    """What identifies the files' current contents without reading them."""
    return tuple(_state(f) for f in files)


def _state(path: Path) -> FileState:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _warn_dates(loaded: LoadedContext) -> None:
    warning = check_dates(loaded.certificate)
    if warning:
        log.warning("Https: %s", warning)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
