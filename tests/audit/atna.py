"""Test helpers for the audit trail: the DICOM audit schema, an RFC 5424 parser, a real rsyslog.

``validate(xml)`` checks a message against the committed PS3.15 A.5.1 schema
(``schema/dicom-audit-message.rnc``); ``parse_syslog(line)`` splits an RFC 5424 message by the
RFC's ABNF and fails on anything else; ``Rsyslog`` is Debian's rsyslogd started on free
loopback ports with its own configuration (imtcp with the gtls driver, StreamDriver.Mode 1,
and imudp), writing every message it receives, raw, one per line, to a file.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from lxml import etree

from tests.peers import LOOPBACK, _popen, free_port, require_binary

SCHEMA = Path(__file__).with_name("schema") / "dicom-audit-message.rnc"
RSYSLOG_BIN = "/usr/sbin/rsyslogd"
RSYSLOG_HINT = "run scripts/install.sh (apt-get install rsyslog rsyslog-gnutls)"
GTLS_MODULE = "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"


@cache
def schema() -> etree.RelaxNG:
    text = SCHEMA.read_text(encoding="utf-8").replace("##", "# ")
    return etree.RelaxNG.from_rnc_string(text)


def validate(xml: bytes) -> etree._Element:
    """The parsed message; fails the test with the schema's complaint when it is not valid."""
    doc = etree.fromstring(xml)
    s = schema()
    if not s.validate(doc):
        pytest.fail(f"audit message is not valid against PS3.15 A.5.1: {s.error_log}\n{xml.decode()}", pytrace=False)
    return doc


# RFC 5424 section 6: HEADER SP STRUCTURED-DATA [SP MSG]
_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>[\x21-\x7e]{1,255}) (?P<app>[\x21-\x7e]{1,48}) (?P<procid>[\x21-\x7e]{1,128}) "
    rb"(?P<msgid>[\x21-\x7e]{1,32}) "
)
_SD_ELEMENT = re.compile(rb'\[(?P<id>[^\s=\]"]{1,32})(?P<params>(?: [^\s=\]"]{1,32}="(?:[^"\\\]]|\\.)*")*)\]')
_SD_PARAM = re.compile(rb' ([^\s=\]"]{1,32})="((?:[^"\\\]]|\\.)*)"')
BOM = b"\xef\xbb\xbf"


@dataclass
class SyslogMessage:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]]
    msg: bytes

    @property
    def sequence(self) -> int:
        return int(self.sd["meta"]["sequenceId"])


def parse_syslog(raw: bytes) -> SyslogMessage:
    """An RFC 5424 message (with a UTF-8 BOM before MSG, as RFC 5424 6.4 has it for UTF-8)."""
    m = _HEADER.match(raw)
    if m is None:
        pytest.fail(f"not an RFC 5424 header: {raw[:200]!r}", pytrace=False)
    pos = m.end()
    sd: dict[str, dict[str, str]] = {}
    if raw[pos:pos + 1] == b"-":
        pos += 1
    else:
        while (e := _SD_ELEMENT.match(raw, pos)) is not None:
            sd[e["id"].decode()] = {k.decode(): v.decode() for k, v in _SD_PARAM.findall(e["params"])}
            pos = e.end()
        if not sd:
            pytest.fail(f"no STRUCTURED-DATA in {raw[:200]!r}", pytrace=False)
    rest = raw[pos:]
    if rest and not rest.startswith(b" "):
        pytest.fail(f"no SP before MSG: {raw[:200]!r}", pytrace=False)
    msg = rest[1:]
    if not msg.startswith(BOM):
        pytest.fail(f"MSG does not start with a UTF-8 BOM: {raw[:200]!r}", pytrace=False)
    return SyslogMessage(int(m["pri"]), m["timestamp"].decode(), m["hostname"].decode(), m["app"].decode(),
                         m["procid"].decode(), m["msgid"].decode(), sd, msg[len(BOM):])


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, with openssl."""
    openssl = require_binary(shutil.which("openssl") or "/usr/bin/openssl", "apt-get install openssl")
    folder.mkdir(parents=True, exist_ok=True)
    p = {n: folder / f"{n}.pem" for n in ("ca", "ca-key", "server", "server-key", "client", "client-key")}

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=DicomProxy test CA",
        "-keyout", str(p["ca-key"]), "-out", str(p["ca"]))
    for name, cn, ext in (("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                          ("client", "DICOMPROXY", "extendedKeyUsage=clientAuth")):
        csr = folder / f"{name}.csr"
        extfile = folder / f"{name}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", str(p[f"{name}-key"]),
            "-out", str(csr))
        run("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca-key"]), "-CAcreateserial",
            "-days", "2", "-extfile", str(extfile), "-out", str(p[name]))
    return p


class Rsyslog:
    """rsyslogd -n with a config of its own: TLS (imtcp + gtls) and UDP inputs, raw messages to a file."""

    def __init__(self, workdir: Path, certs: dict[str, Path], *, mutual: bool = False) -> None:
        require_binary(RSYSLOG_BIN, RSYSLOG_HINT)
        if not Path(GTLS_MODULE).is_file():
            pytest.fail(f"rsyslog's TLS driver {GTLS_MODULE} is missing: {RSYSLOG_HINT}", pytrace=False)
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.certs = certs
        self.mutual = mutual
        self.tls_port = free_port()
        self.udp_port = free_port()
        self.out = workdir / "received.log"
        self.log_path = workdir / "rsyslogd.log"
        self.conf = workdir / "rsyslog.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_conf()

    def _write_conf(self) -> None:
        auth = 'StreamDriver.AuthMode="x509/certvalid"' if self.mutual else 'StreamDriver.AuthMode="anon"'
        (self.workdir / "spool").mkdir(exist_ok=True)
        self.conf.write_text(f"""
global(workDirectory="{self.workdir / 'spool'}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{self.certs['ca']}"
       defaultNetstreamDriverCertFile="{self.certs['server']}"
       defaultNetstreamDriverKeyFile="{self.certs['server-key']}")
main_queue(queue.type="Direct")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" {auth})
input(type="imtcp" address="{LOOPBACK}" port="{self.tls_port}")
module(load="imudp")
input(type="imudp" address="{LOOPBACK}" port="{self.udp_port}")
template(name="raw" type="string" string="%inputname% %rawmsg%\\n")
action(type="omfile" file="{self.out}" template="raw" flushOnTXEnd="on" asyncWriting="off")
""")

    @property
    def tls_url(self) -> str:
        return f"tls://{LOOPBACK}:{self.tls_port}"

    @property
    def udp_url(self) -> str:
        return f"udp://{LOOPBACK}:{self.udp_port}"

    def start(self, timeout: float = 20) -> Rsyslog:
        self.proc = _popen([RSYSLOG_BIN, "-n", "-f", str(self.conf), "-i", str(self.workdir / "rsyslogd.pid")],
                           self.log_path)
        deadline = time.monotonic() + timeout

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"rsyslogd exited {self.proc.returncode}: {self.log_text()}", pytrace=False)
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK, self.tls_port)) == 0:
                    return self
            time.sleep(0.1)
        # rsyslogd reports a failed bind through its own outputs (the omfile), not stderr
        internal = self.out.read_text(errors="replace")[-2000:] if self.out.exists() else ""
        pytest.fail(f"rsyslogd did not listen on {self.tls_port} within {timeout}s: {self.log_text()} {internal}",
                    pytrace=False)
        raise AssertionError

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def received(self, input_name: str | None = None) -> list[SyslogMessage]:
        """Every message received so far (``imtcp`` or ``imudp`` only, if named), parsed."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_bytes().splitlines():
            name, _, raw = line.partition(b" ")
            if not raw or (input_name and name.decode() != input_name):
                continue
            out.append(parse_syslog(raw))
        return out
