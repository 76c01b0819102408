"""Shared pieces for the benchmarks: real peers on free loopback ports and a ``wrk`` runner.

Benchmarks are scripts, not tests, so nothing here imports pytest: a missing peer raises
``BenchError`` naming the install step, and the script prints it and exits non-zero.

Every process is started in its own session (a Ctrl-C in the terminal reaches only the
benchmark, which then stops its peers in order) and with a parent-death signal (a benchmark
killed with SIGKILL still takes its peers down). ``Peers`` stops everything it started::

    with Peers(workdir) as peers:
        orthanc = peers.orthanc()
        gw = peers.gateway(orthanc.url, scripts={"main.lua": "..."})
        result = run_wrk(gw.url + "/system", connections=32, duration=5)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"

ORTHANC_BIN = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NGINX_BIN = "/usr/sbin/nginx"
WRK_BIN = "/usr/bin/wrk"
NGINX_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")


class BenchError(RuntimeError):
    """A peer is missing or failed to start; the message names the fix."""


# --------------------------------------------------------------------------- small helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def require(path: str, hint: str) -> str:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise BenchError(f"{path} is missing: {hint}")
    return path


def machine_info() -> dict[str, str]:
    """What the numbers were measured on (they mean little without it)."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_version(cmd: Sequence[str]) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else ""
    return ""


def _arm_parent_death() -> None:
    """preexec_fn: SIGKILL the child when the benchmark dies, whatever the way."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------- processes
class Process:
    """One peer process with its output in ``log_path``."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_path: Path,
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.stop_signal = stop_signal
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_arm_parent_death,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, url: str, timeout: float = 30, ok: Sequence[int] = (200,)) -> None:
        """Poll ``url`` until it answers one of ``ok``; raise with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise BenchError(f"{self.name} exited with {self.proc.returncode}; log tail:\n{tail(self.log_path)}")
            try:
                r = requests.get(url, timeout=2)
                if r.status_code in ok:
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(0.1)
        raise BenchError(
            f"{self.name} did not answer {url} within {timeout:g}s ({last}); log tail:\n{tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10) -> None:
        """The stop signal, then SIGKILL after ``timeout``; always reaps the process."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class Peer:
    name: str
    url: str
    process: Process
    workdir: Path


class Peers:
    """Starts real peers under ``workdir``; ``close()`` (or leaving the ``with``) stops them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self._procs: list[Process] = []

    def __enter__(self) -> Peers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        while self._procs:
            proc = self._procs.pop()
            with contextlib.suppress(Exception):
                proc.stop()

    def stop(self, peer: Peer) -> None:
        peer.process.stop()
        if peer.process in self._procs:
            self._procs.remove(peer.process)

    def _start(self, name: str, cmd: Sequence[str], workdir: Path, **kw: Any) -> Process:
        proc = Process(name, cmd, workdir / f"{name}.log", cwd=workdir, **kw)
        self._procs.append(proc)
        return proc

    # -- Orthanc ---------------------------------------------------------------------------
    def orthanc(self, name: str = "orthanc", extra: Mapping[str, Any] | None = None) -> Peer:
        """A real Orthanc with its DICOMweb plugin; HTTP on a free port, DICOM off."""
        hint = "run scripts/install.sh (apt-get install orthanc orthanc-dicomweb)"
        require(ORTHANC_BIN, hint)
        if not os.path.isfile(DICOMWEB_PLUGIN):
            raise BenchError(f"{DICOMWEB_PLUGIN} is missing: {hint}")
        wd = self.workdir / name
        wd.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = {
            "Name": "DicomProxyBench",
            "StorageDirectory": str(wd / "storage"),
            "IndexDirectory": str(wd / "storage"),
            "StorageCompression": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpPort": port,
            "HttpCompressionEnabled": False,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "KeepAlive": True,
            "SaveJobs": False,
            **(extra or {}),
        }
        (wd / "orthanc.json").write_text(json.dumps(config, indent=2))
        proc = self._start(name, [ORTHANC_BIN, str(wd / "orthanc.json")], wd)
        url = f"http://{LOOPBACK}:{port}"
        proc.wait_http(url + "/system")
        return Peer(name, url, proc, wd)

    # -- the gateway -----------------------------------------------------------------------
    def gateway(
        self,
        name: str,
        upstream: str,
        scripts: Mapping[str, str] | None = None,
        settings: Mapping[str, Any] | None = None,
        root: Path = ROOT,
        python: str = sys.executable,
    ) -> Peer:
        """``python -m dicomproxy serve`` on a free port with a generated appsettings.json.

        ``root`` and ``python``: another checkout and its interpreter (``--baseline``)."""
        wd = self.workdir / name
        (wd / "scripts").mkdir(parents=True, exist_ok=True)
        (wd / "data").mkdir(exist_ok=True)
        for script, text in (scripts or {}).items():
            (wd / "scripts" / script).write_text(text)
        port = free_port()
        config: dict[str, Any] = {
            "Urls": f"http://{LOOPBACK}:{port}",
            "Upstream": {"Url": upstream},
            "ExtraConfig": {
                "ScriptsRoot": str(wd / "scripts"),
                "DataFolder": str(wd / "data"),
                "TusUploadFolder": str(wd / "data" / "tus"),
            },
            "Dicom": {"Port": 0, "Host": LOOPBACK, "SpoolFolder": str(wd / "data" / "spool")},
            "Logging": {"Level": "WARNING"},
        }
        for section, values in (settings or {}).items():
            if isinstance(values, dict) and isinstance(config.get(section), dict):
                config[section].update(values)
            else:
                config[section] = values
        (wd / "appsettings.json").write_text(json.dumps(config, indent=2))
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("DICOMPROXY__")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        cmd = [python, "-m", "dicomproxy", "serve", "--config", str(wd / "appsettings.json")]
        proc = self._start(name, cmd, wd, env=env)
        url = f"http://{LOOPBACK}:{port}"
        proc.wait_http(url + "/dicomproxy/health", ok=(200, 503))
        return Peer(name, url, proc, wd)

    # -- nginx + Lua -----------------------------------------------------------------------
    def nginx(
        self, name: str, upstream: str, *, workers: str = "1", access_lua: str = "", header_filter_lua: str = ""
    ) -> Peer:
        """Debian nginx with its Lua module as a reverse proxy to ``upstream`` (keepalive pool).

        Not daemonised, its own pid/log/temp paths under the workdir. The proxy streams like
        the gateway does: in-memory buffers only (``proxy_max_temp_file_size 0``), never a
        temp file on disk.
        """
        require(NGINX_BIN, "run scripts/install.sh (apt-get install nginx libnginx-mod-http-lua)")
        modules = lua_modules()
        wd = self.workdir / name
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (wd / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        port = free_port()
        up = upstream.removeprefix("http://").rstrip("/")
        loads = "\n".join(f"load_module {m};" for m in modules)
        conf = f"""{loads}
worker_processes {workers};
daemon off;
master_process on;
pid {wd}/nginx.pid;
error_log {wd}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {wd}/tmp/body;
    proxy_temp_path {wd}/tmp/proxy;
    fastcgi_temp_path {wd}/tmp/fastcgi;
    uwsgi_temp_path {wd}/tmp/uwsgi;
    scgi_temp_path {wd}/tmp/scgi;
    keepalive_requests 1000000;
    upstream pacs {{
        server {up};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {LOOPBACK}:{port};
        location / {{
            access_by_lua_block {{
{access_lua}
            }}
            header_filter_by_lua_block {{
{header_filter_lua}
            }}
            proxy_pass http://pacs;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_buffer_size 64k;
            proxy_buffers 8 256k;
            proxy_busy_buffers_size 256k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
        (wd / "nginx.conf").write_text(conf)
        test = subprocess.run(
            [NGINX_BIN, "-t", "-q", "-p", str(wd), "-c", str(wd / "nginx.conf")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if test.returncode != 0:
            raise BenchError(f"nginx -t rejected {wd / 'nginx.conf'}:\n{test.stderr}")
        proc = self._start(
            name, [NGINX_BIN, "-p", str(wd), "-c", str(wd / "nginx.conf")], wd, stop_signal=signal.SIGQUIT
        )
        url = f"http://{LOOPBACK}:{port}"
        proc.wait_http(url + "/system")
        return Peer(name, url, proc, wd)


def lua_modules() -> list[str]:
    """The ``.so`` files for nginx's Lua module: NDK first (the Lua module needs it), then Lua."""
    found: list[str] = []
    for name in ("ndk_http_module.so", "ngx_http_lua_module.so"):
        path = next((f"{d}/{name}" for d in NGINX_MODULE_DIRS if os.path.isfile(f"{d}/{name}")), None)
        if path is None:
            raise BenchError(
                f"nginx module {name} not found under {', '.join(NGINX_MODULE_DIRS)}: "
                "run scripts/install.sh (apt-get install libnginx-mod-http-lua)"
            )
        found.append(path)
    return found


# --------------------------------------------------------------------------- DICOM data
def make_dicom(rows: int, cols: int, *, patient_id: str, description: str = "Bench") -> tuple[bytes, str]:
    """An uncompressed 16-bit CT instance with ``rows x cols`` pixels; returns (bytes, SOP UID).

    Made by the tests' generator (``tests/dicom_samples.py``), so bench and tests build alike."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.dicom_samples import make_instance

    data, sop_uid = make_instance(
        patient_id=patient_id, patient_name="Bench^Patient", size=(rows, cols),
        AccessionNumber="ACC" + patient_id, StudyDescription=description, SeriesDescription=description + " series",
    )
    assert isinstance(data, bytes)
    return data, sop_uid


# --------------------------------------------------------------------------- wrk
# wrk's done() hook: exact counts and latency percentiles as one JSON line (no text parsing).
WRK_REPORT_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    bytes: int
    errors: int
    non_2xx: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mib_per_s(self) -> float:
        return self.bytes / self.seconds / (1024 * 1024) if self.seconds else 0.0


def run_wrk(
    url: str, *, connections: int, duration: float, threads: int = 1, timeout_s: float = 10,
    workdir: Path | None = None, extra_args: Sequence[str] = (),
) -> WrkResult:
    """``wrk`` for ``duration`` seconds (``extra_args`` before the URL, e.g. another ``-H``); raises if it
    fails or reports no JSON summary."""
    require(WRK_BIN, "run scripts/install.sh (apt-get install wrk)")
    wd = workdir or Path("/tmp")
    script = wd / "wrk-report.lua"
    if not script.exists():
        script.write_text(WRK_REPORT_LUA)
    cmd = [
        WRK_BIN,
        "-t",
        str(max(1, min(threads, connections))),
        "-c",
        str(connections),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        f"{timeout_s:g}s",
        "-s",
        str(script),
        "-H",
        "User-Agent: dicomproxy-bench",
        *extra_args,
        url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout_s + 30)
    match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or not match:
        raise BenchError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(match.group(1))
    return WrkResult(
        requests=d["requests"],
        seconds=d["duration_us"] / 1e6,
        bytes=d["bytes"],
        errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
        non_2xx=d["status"],
        p50_us=d["p50_us"],
        p90_us=d["p90_us"],
        p99_us=d["p99_us"],
        mean_us=d["mean_us"],
    )


def which(name: str) -> str | None:
    return shutil.which(name)


# --------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, user+system CPU seconds) of a live process, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` plus its live child processes (nginx workers, for example)."""
    own = _stat(pid)
    if own is None:
        return 0.0
    total = own[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            st = _stat(int(entry))
            if st is not None and st[0] == pid:
                total += st[1]
    return total
