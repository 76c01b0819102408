"""Shared fixtures: real peers (Orthanc, the gateway process, storescp). See ``tests/peers.py``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import dicom_samples as _dicom_samples
from tests.local_upstream import LocalUpstream
from tests.peers import GatewayProcess, OrthancServer, RedisServer, StoreScp

_SESSION_ORTHANC: Any = object()  # sentinel: "use the shared session Orthanc"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One real Orthanc for the whole session. Shared: clear() it (or use fresh_orthanc)."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-shared"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_orthanc(orthanc: OrthancServer) -> OrthancServer:
    """The shared Orthanc, emptied before the test."""
    if not orthanc.running:  # a test may have stopped it; bring it back for the next one
        orthanc.start()
    orthanc.clear()
    return orthanc


@pytest.fixture
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OrthancServer]]:
    """Private Orthancs a test may stop/start/kill; all are stopped at teardown."""
    made: list[OrthancServer] = []

    def make(
        modalities: Mapping[str, Sequence[Any]] | None = None,
        aet: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> OrthancServer:
        server = OrthancServer(
            tmp_path_factory.mktemp("orthanc"), modalities=modalities, aet=aet, extra_config=extra_config
        )
        made.append(server)
        return server.start() if start else server

    yield make
    for server in reversed(made):
        server.stop()


@pytest.fixture
def gateway_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., GatewayProcess]]:
    """Start gateways as real subprocesses; all are stopped at teardown.

    ``orthanc`` defaults to the shared session Orthanc (requested lazily); pass another
    OrthancServer, or ``None`` for no upstream defaults. With ``register_modality`` set and a
    DICOM port, the gateway is declared in that Orthanc under that name so Orthanc can C-MOVE
    or C-STORE to it.
    """
    made: list[GatewayProcess] = []

    def make(
        settings: Mapping[str, Any] | None = None,
        scripts: Mapping[str, str] | None = None,
        *,
        orthanc: OrthancServer | None = _SESSION_ORTHANC,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        register_modality: str | None = "dicomproxy",
        timeout: float = 30,
        command_prefix: Sequence[str] = (),
        verify: str | bool = True,
        cert: tuple[str, str] | None = None,
    ) -> GatewayProcess:
        if orthanc is _SESSION_ORTHANC:
            orthanc = request.getfixturevalue("orthanc")
            if not orthanc.running:
                orthanc.start()
        gateway = GatewayProcess(
            tmp_path_factory.mktemp("gateway"), orthanc=orthanc, settings=settings, scripts=scripts, env=env,
            command_prefix=command_prefix, verify=verify, cert=cert,
        )
        made.append(gateway)
        if orthanc is not None and register_modality and gateway.dicom_port and orthanc.running:
            orthanc.set_modality(register_modality, gateway.aet, "127.0.0.1", gateway.dicom_port)
        return gateway.start(timeout) if start else gateway

    yield make
    for gateway in reversed(made):
        gateway.stop()
    hung = [g for g in made if g.forced_kill]
    if hung:  # a gateway must always exit within its Server:ShutdownTimeoutSeconds: a failure, not a warning
        pytest.fail("; ".join(
            f"the gateway did not exit within {g.shutdown_timeout + 10:g} s of SIGTERM and was killed "
            f"(a shutdown hang); log: {g.log_path}" for g in hung), pytrace=False)


@pytest.fixture
def storescp_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., StoreScp]]:
    """dcmtk storescp instances on free ports (C-STORE destinations); stopped at teardown."""
    made: list[StoreScp] = []

    def make(aet: str = "STORESCP", *, args: Sequence[str] = ()) -> StoreScp:
        scp = StoreScp(tmp_path_factory.mktemp("storescp"), aet=aet, args=args)
        made.append(scp)
        return scp.start()

    yield make
    for scp in reversed(made):
        scp.stop()


@pytest.fixture
def dicom_samples() -> Any:
    """The tests.dicom_samples module (make_instance, make_study, make_zip)."""
    return _dicom_samples


@pytest.fixture
def sample_dir(tmp_path: Path) -> Path:
    """An empty folder for generated DICOM files."""
    folder = tmp_path / "samples"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalUpstream]:
    """A local HTTP upstream that echoes headers, stalls, counts connections (see local_upstream.py);
    one per test module."""
    server = LocalUpstream(tmp_path_factory.mktemp("upstream")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server on a free port (``Cluster:Redis``), stopped at teardown."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
