"""``Server:Workers`` pieces one at a time: the key's values, the task folder shared by workers
(worker 0 adopts and runs what another submitted or put back to queued), and the supervisor with real forked
children (restart after a death, SIGTERM to all, the exit status). The whole gateway with two
workers against a real Orthanc: tests/e2e/test_workers.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dicomproxy.config.fields import Problem, WorkerCount
from dicomproxy.tasks import DONE, TaskQueue
from dicomproxy.workers import WorkerInfo
from tests.peers import free_port

REPO = Path(__file__).resolve().parent.parent


def test_workers_key_takes_a_count_or_auto() -> None:
    kind = WorkerCount()
    assert kind.parse(2, Path(".")) == 2 and kind.parse("3", Path(".")) == 3
    assert kind.parse("auto", Path(".")) == (os.cpu_count() or 1)
    for bad in (0, "-1", "many", True):
        with pytest.raises(Problem):
            kind.parse(bad, Path("."))


def test_a_task_submitted_by_another_worker_runs_once_in_worker_0(tmp_path: Path) -> None:
    runs: list[dict[str, Any]] = []

    async def handler(args: dict[str, Any]) -> str:
        runs.append(args)
        return "ok"

    async def scenario() -> dict[str, Any] | None:
        owner = TaskQueue(tmp_path, workers=1, runs=True, shared=True)
        other = TaskQueue(tmp_path, workers=1, runs=False, shared=True)
        for q in (owner, other):
            q.register("job", handler)
        await owner.start()
        await other.start()
        task_id = other.submit("job", {"n": 1})
        assert other.get(task_id)["state"] == "queued"  # type: ignore[index]
        done = await other.wait(task_id, timeout=10)  # read from the folder: the owner ran it
        await asyncio.sleep(1.2)  # two more adoption rounds: it is not run again
        assert len(runs) == 1
        # another worker puts the finished task back to queued (a run again): worker 0 runs it again
        again = dict(done, state="queued", result=None, finished=None)
        other._save(again)
        await asyncio.sleep(0.01)
        for _ in range(100):
            if len(runs) == 2 and (other.get(task_id) or {}).get("state") == DONE:
                break
            await asyncio.sleep(0.05)
        await owner.stop()
        await other.stop()
        return done

    done = asyncio.run(scenario())
    assert done is not None and done["state"] == DONE and done["result"] == "ok"
    assert runs == [{"n": 1}, {"n": 1}]


SUPERVISED = """
import logging, signal, sys, threading, os
from pathlib import Path
from dicomproxy.workers import Supervisor
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
folder = Path(sys.argv[1])

def run(info):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait(60)
    return 0

sys.exit(Supervisor(2, run, shutdown_timeout=5, status_file=folder / "workers.json").serve())
"""


def _pids(tmp_path: Path) -> dict[str, int]:
    try:
        data: dict[str, int] = json.loads((tmp_path / "workers.json").read_text())["pids"]
    except (OSError, ValueError, KeyError):
        return {}
    return data


def _until(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_supervisor_restarts_a_dead_worker_and_stops_all_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(tmp_path)], stderr=out,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        _until(lambda: all(_pids(tmp_path).get(i) for i in ("0", "1")))
        first = _pids(tmp_path)
        os.kill(first["1"], signal.SIGKILL)
        _until(lambda: _pids(tmp_path).get("1") not in (None, 0, first["1"]))
        second = _pids(tmp_path)
        assert second["0"] == first["0"]
        status = WorkerInfo(1, 2, tmp_path / "workers.json").status()
        assert status["running"] == 2 and status["restarts"] == 1 and status["ok"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0  # a worker killed while serving does not make a clean stop fail
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert f"worker 1 (pid {first['1']}) died after" in text and "(killed by SIGKILL): restarting it" in text
    assert "SIGTERM: stopping 2 workers" in text and "every worker stopped (exit status 0)" in text
    for pid in second.values():  # both workers reaped, none left behind
        assert not Path(f"/proc/{pid}").exists()
    assert not (tmp_path / "workers.json").exists()


def test_a_config_error_in_the_workers_ends_the_supervisor_with_status_2(tmp_path: Path) -> None:
    """A missing certificate file is found by each worker (its own certificate store): restarting
    would not help, so the supervisor stops and exits 2, as one process does."""
    config = {
        "Urls": f"https://127.0.0.1:{free_port()}", "Upstream": {"Url": "http://127.0.0.1:9"},
        "Https": {"CertificateFile": str(tmp_path / "missing.pem"), "KeyFile": str(tmp_path / "missing.key")},
        "Server": {"Workers": 2, "ShutdownTimeoutSeconds": 5}, "Dicom": {"Port": 0},
        "ExtraConfig": {"DataFolder": str(tmp_path / "data"), "ScriptsRoot": str(tmp_path / "scripts"),
                        "TusUploadFolder": str(tmp_path / "tus")},
    }
    (tmp_path / "appsettings.json").write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "-m", "dicomproxy", "serve", "--config", str(tmp_path / "appsettings.json")],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "config error" in out.stderr and "stopping every worker" in out.stderr
