"""Fixtures of the fuzzers that go through a real gateway process: one gateway per module (a
fuzzer's examples share it, which is the point: whatever one example leaves behind, the next
one and the probe after each must still be served), its raw upstream, and a watch on its RSS."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.fuzz.upstreams import RecordingUpstream, ScriptedUpstream
from tests.observe import rss_kb
from tests.peers import GatewayProcess, OrthancServer

# Short enough that a stalled example ends quickly; long enough for this loaded machine.
FUZZ_SERVER = {"HeadTimeoutSeconds": 3, "MaxHeadBytes": 65536, "MaxUrlBytes": 8192}
RSS_GROWTH_MB = 60
"""How far the gateway's RSS may grow over a whole fuzz run (its buffers are bounded: the
largest head is 64 KiB, bodies are streamed; a leak of a few KB per example passes 60 MB in a
campaign)."""


@dataclass
class Watched:
    gateway: GatewayProcess
    baseline_kb: int

    def check_rss(self) -> None:
        grown = (rss_kb(self.gateway.proc.pid) - self.baseline_kb) / 1024  # type: ignore[union-attr]
        assert grown < RSS_GROWTH_MB, f"the gateway's RSS grew {grown:.0f} MB during the fuzz run"

    def check_log(self) -> None:
        log = self.gateway.log_text()
        assert "Traceback" not in log, f"a traceback in the gateway's log:\n{log[log.index('Traceback'):][:3000]}"


def _gateway(tmp: pytest.TempPathFactory, name: str, settings: dict[str, object]) -> Watched:
    gateway = GatewayProcess(tmp.mktemp(name), settings={"Logging": {"Level": "INFO"}, **settings})
    gateway.start()
    return Watched(gateway, rss_kb(gateway.proc.pid))  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def recording() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.fixture(scope="module")
def recorded_gateway(tmp_path_factory: pytest.TempPathFactory, recording: RecordingUpstream) -> Iterator[Watched]:
    watched = _gateway(tmp_path_factory, "fuzz-requests", {
        "Upstream": {"Url": recording.url, "ReadTimeoutSeconds": 5}, "Dicom": {"Port": 0}, "Server": FUZZ_SERVER})
    yield watched
    watched.gateway.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream().start()
    yield server  # type: ignore[misc]
    server.stop()


@pytest.fixture(scope="module")
def scripted_gateway(tmp_path_factory: pytest.TempPathFactory, scripted: ScriptedUpstream) -> Iterator[Watched]:
    watched = _gateway(tmp_path_factory, "fuzz-responses", {
        "Upstream": {"Url": scripted.url, "ReadTimeoutSeconds": 1.5, "ResponseHeadTimeoutSeconds": 1.5},
        "Dicom": {"Port": 0}, "Server": FUZZ_SERVER})
    yield watched
    watched.gateway.stop()


@pytest.fixture(scope="module")
def dicom_gateway(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[Watched]:
    """A gateway whose DICOM port forwards to the session Orthanc (emptied first)."""
    if not orthanc.running:
        orthanc.start()
    orthanc.clear()
    gateway = GatewayProcess(tmp_path_factory.mktemp("fuzz-dicom"), orthanc=orthanc, settings={
        "Logging": {"Level": "INFO"}, "Dicom": {"ArtimSeconds": 3, "MaxConnectionsPerAddress": 64}})
    gateway.start()
    watched = Watched(gateway, rss_kb(gateway.proc.pid))  # type: ignore[union-attr]
    yield watched
    gateway.stop()
