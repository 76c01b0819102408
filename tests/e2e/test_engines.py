"""The three Lua engines through a real gateway process (issue 2, item 5).

* singleton (``main.lua``): one runtime for the process, its state persists; a hook waiting on
  I/O (``OsExecute("sleep", "1")``) must not stall other requests;
* transient (``main-transient.lua``): a fresh runtime per request, no global survives;
* background (``LuaBackgroundWorker``): tasks run in fresh runtimes, are listed at
  ``/dicomproxy/tasks``, and a task still queued when the process is killed runs after restart.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.observe import children_running
from tests.peers import GatewayProcess, OrthancServer, wait_until

NO_DICOM = {"Dicom": {"Port": 0}}

MAIN = r"""
count = 0
function onHttpRequest(r)
  local p = r.Path
  if p == "/count" then
    count = count + 1
    r:ResponseWrite(tostring(count))
    return true
  elseif p == "/sleep" then
    local code, out, err = OsExecute("sleep", "1")
    r:ResponseWrite("slept " .. tostring(code))
    return true
  elseif p == "/fast" then
    r:ResponseWrite("fast")
    return true
  elseif p == "/queue" then
    local id = LuaBackgroundWorker(r.Headers["x-script"] or "main-task.lua", r.Headers["x-entry"],
      r.Headers["x-args"] or "")
    r:ResponseWrite(id)
    return true
  elseif p == "/queue-missing" then
    local ok, err = pcall(LuaBackgroundWorker, "no-such-script.lua", "run", "")
    r:ResponseWrite(tostring(ok) .. " " .. tostring(err))
    return true
  end
end
"""

TRANSIENT = r"""
function onHttpRequest(r)
  if r.Path == "/transient" then
    local before = tostring(leaked)
    leaked = "set by " .. tostring(r.Headers["x-id"])
    counter = (counter or 0) + 1
    r:ResponseWrite(before .. "|" .. counter)
    return true
  end
end
"""

TASKS = r"""
function work(args)
  local before = tostring(seen)
  seen = args
  return { echo = args, n = #args, before = before }
end

function shell(args)
  local code, out, err = OsExecute("echo", args)
  return { code = code, out = out }
end

function fail(args)
  error("task broke: " .. args)
end
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer) -> Iterator[GatewayProcess]:
    if not orthanc.running:
        orthanc.start()
    gateway = GatewayProcess(
        tmp_path_factory.mktemp("gw-engines"), orthanc=orthanc, settings=NO_DICOM,
        scripts={"main.lua": MAIN, "main-transient.lua": TRANSIENT, "main-task.lua": TASKS},
    )
    gateway.start()
    yield gateway
    gateway.stop()


def queue(gw: GatewayProcess, entry: str, args: str = "", script: str | None = None) -> str:
    headers = {"X-Entry": entry, "X-Args": args}
    if script:
        headers["X-Script"] = script
    r = gw.get("/queue", headers=headers)
    assert r.status_code == 200, r.text
    return r.text


def wait_task(gw: GatewayProcess, task_id: str, states: tuple[str, ...] = ("done", "failed"),
              timeout: float = 15) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        r = gw.get(f"/dicomproxy/tasks/{task_id}", timeout=5)
        return r.json() if r.status_code == 200 and r.json()["state"] in states else None

    return wait_until(finished, timeout=timeout, what=f"task {task_id} to reach {states}")


# --------------------------------------------------------------------------- singleton
def test_singleton_state_persists_across_requests(gw: GatewayProcess) -> None:
    first = int(gw.get("/count").text)
    assert [int(gw.get("/count").text) for _ in range(4)] == [first + 1, first + 2, first + 3, first + 4]
    # other routes (proxied to Orthanc) do not reset it
    assert gw.get("/system").status_code == 200
    assert int(gw.get("/count").text) == first + 5


def test_singleton_hook_waiting_on_a_process_does_not_stall_others(gw: GatewayProcess) -> None:
    with ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        sleepers = [pool.submit(requests.get, gw.url + "/sleep", timeout=10) for _ in range(2)]
        assert gw.proc is not None
        wait_until(lambda: len(children_running(gw.proc.pid, "sleep", "1")) == 2, timeout=5,
                   what="both sleep hooks inside OsExecute (two `sleep 1` children)")
        fast_times = []
        for _ in range(10):
            t = time.monotonic()
            r = requests.get(gw.url + "/fast", timeout=5)
            fast_times.append(time.monotonic() - t)
            assert r.text == "fast"
        fast_done = time.monotonic() - started
        results = [s.result() for s in sleepers]
        all_done = time.monotonic() - started
    assert [r.text for r in results] == ["slept 0", "slept 0"]
    assert fast_done < 0.95, f"10 fast requests finished only {fast_done:.2f}s after the sleeps began"
    assert max(fast_times) < 0.3, fast_times
    # the two sleeping hooks overlapped too (one runtime, but they wait as coroutines)
    assert 0.95 < all_done < 1.95, all_done  # in a row they would take 2 s


# --------------------------------------------------------------------------- transient
def test_transient_engine_is_fresh_for_every_request(gw: GatewayProcess) -> None:
    answers = [gw.get("/transient", headers={"X-Id": str(i)}).text for i in range(5)]
    assert answers == ["nil|1"] * 5
    with ThreadPoolExecutor(6) as pool:
        parallel = list(pool.map(
            lambda i: requests.get(gw.url + "/transient", headers={"X-Id": str(i)}, timeout=10).text, range(24)
        ))
    assert parallel == ["nil|1"] * 24


def test_health_lists_only_the_callbacks_each_script_defines(gw: GatewayProcess) -> None:
    scripts = {Path(s["script"]).name: s for s in gw.get("/dicomproxy/health").json()["scripts"]["scripts"]}
    assert scripts["main.lua"]["callbacks"] == ["onHttpRequest"]
    assert scripts["main.lua"]["kind"] == "singleton" and scripts["main.lua"]["loaded"] is True
    assert scripts["main-transient.lua"]["callbacks"] == ["onHttpRequest"]
    assert scripts["main-transient.lua"]["kind"] == "transient"
    assert scripts["main-task.lua"]["kind"] == "background" and scripts["main-task.lua"]["present"] is True


# --------------------------------------------------------------------------- background
def test_background_task_runs_and_is_listed(gw: GatewayProcess) -> None:
    before = time.time()
    task_id = queue(gw, "work", "abc")
    task = wait_task(gw, task_id)
    assert task["state"] == "done", task
    assert task["result"] == {"echo": "abc", "n": 3, "before": "nil"}
    assert task["kind"] == "lua" and task["title"] == "main-task.lua:work"
    assert before - 1 < task["created"] <= task["started"] <= task["finished"] < time.time() + 1
    assert task["error"] is None
    # a second task runs in a fresh runtime: the global the first one set is gone
    second = wait_task(gw, queue(gw, "work", "defg"))
    assert second["result"] == {"echo": "defg", "n": 4, "before": "nil"}
    # tasks await exports like any engine
    shell = wait_task(gw, queue(gw, "shell", "hello from a task"))
    assert shell["result"] == {"code": 0, "out": "hello from a task\n"}
    listed = {t["id"]: t for t in gw.get("/dicomproxy/tasks").json()}
    assert {task_id, second["id"], shell["id"]} <= set(listed)
    assert listed[task_id]["state"] == "done"
    done_only = gw.get("/dicomproxy/tasks?state=done").json()
    assert all(t["state"] == "done" for t in done_only) and task_id in {t["id"] for t in done_only}


def test_background_task_errors_are_recorded(gw: GatewayProcess) -> None:
    failed = wait_task(gw, queue(gw, "fail", "x1"))
    assert failed["state"] == "failed"
    assert "main-task.lua:" in failed["error"] and "task broke: x1" in failed["error"]
    missing_entry = wait_task(gw, queue(gw, "nope", ""))
    assert missing_entry["state"] == "failed" and "nope" in missing_entry["error"]
    text = gw.get("/queue-missing").text
    assert text.startswith("false ") and "no-such-script.lua" in text and "not found" in text
    assert gw.get("/dicomproxy/health").json()["tasks"]["failed"] >= 2


BLOCKING_TASKS = r"""
-- block(gate): waits (in a child process, without blocking the loop) until the gate file exists
function block(gate)
  local code, out, err = OsExecute("sh", "-c 'while [ ! -e \"$0\" ]; do sleep 0.05; done; echo opened' " .. gate)
  return out
end

function mark(path)  -- (io is not available to scripts in the default mode: a program writes the file)
  local code = OsExecute("sh", "-c 'printf ran > \"$0\"' " .. path)
  assert(code == 0, "could not write the marker")
  return "marked"
end
"""


def test_queued_task_survives_kill_9_and_runs_after_restart(gateway_factory: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    marker = tmp_path / "marker"
    gw = gateway_factory(
        {**NO_DICOM, "Lua": {"BackgroundWorkers": 1, "TaskTimeoutMs": 60000}},
        {"main.lua": MAIN, "main-task.lua": BLOCKING_TASKS},
    )
    try:
        blocker = queue(gw, "block", str(gate))
        wait_task(gw, blocker, states=("running",))
        waiting = queue(gw, "mark", str(marker))
        task_file = gw.data_dir / "tasks" / f"{waiting}.json"
        wait_until(lambda: task_file.exists() and json.loads(task_file.read_text())["state"] == "queued",
                   what="the queued task on disk")
        # one worker, and it is still on the blocker: the queued task cannot have started
        assert gw.get(f"/dicomproxy/tasks/{blocker}").json()["state"] == "running"
        assert gw.get(f"/dicomproxy/tasks/{waiting}").json()["state"] == "queued"
        gw.kill9()
        on_disk = {p.stem: json.loads(p.read_text()) for p in (gw.data_dir / "tasks").glob("*.json")}
        assert on_disk[blocker]["state"] == "running" and on_disk[waiting]["state"] == "queued"
        assert not marker.exists()
        gate.touch()  # lets the re-run blocker through (and the orphaned shell of the killed one)
        gw.start()
        done = wait_task(gw, waiting, timeout=20)
        assert done["state"] == "done" and done["result"] == "marked", done
        assert marker.read_text() == "ran"
        rerun = wait_task(gw, blocker)
        assert rerun["state"] == "done" and rerun["result"] == "opened\n"
        assert rerun["attempts"] == 2  # it was running at the kill: run again from the start
        assert "was running when the process stopped" in gw.log_text()
    finally:
        gate.touch()


# --------------------------------------------------------------------------- crash loops (issue 10, item 12)
DYING_TASKS = r"""
-- hold(gate): runs until the test kills the gateway (a child waits for a file that never comes)
function hold(gate)
  OsExecute("sh", "-c 'while [ ! -e \"$0\" ]; do sleep 0.05; done' " .. gate)
  return "held"
end

-- die(): ends the gateway's process, as a script with os.exit does in full-library mode; a
-- second first, so that the test sees the gateway answer before it goes
function die()
  OsExecute("sleep", "1")
  os.exit(3)
end

function ok() return "ok" end
"""


def quarantined(gw: GatewayProcess, task_id: str, restarts: int) -> None:
    task = wait_task(gw, task_id, states=("failed",))
    assert task["restarts"] == restarts, task
    assert "quarantined after" in task["error"] and "Lua:TaskMaxRestarts" in task["error"], task
    listed = {t["id"]: t for t in gw.get("/dicomproxy/tasks").json()}
    assert listed[task_id]["state"] == "failed"
    feed = [n for n in gw.get("/dicomproxy/notifications").json() if n["kind"] == "task.failed"]
    assert any(task_id in json.dumps(n) for n in feed), feed


def test_a_task_killed_with_the_gateway_again_and_again_is_quarantined(gateway_factory: Any,
                                                                      tmp_path: Path) -> None:
    """SIGKILL while the task runs, N+1 times (Lua:TaskMaxRestarts = N = 2): the task is run
    again after each of the first N, then quarantined; the gateway stays up."""
    gate = tmp_path / "never"
    gw = gateway_factory({**NO_DICOM, "Lua": {"BackgroundWorkers": 1, "TaskMaxRestarts": 2}},
                         {"main.lua": MAIN, "main-task.lua": DYING_TASKS})
    task_id = queue(gw, "hold", str(gate))
    for kill in range(3):
        running = wait_task(gw, task_id, states=("running",))
        assert running["attempts"] == kill + 1
        gw.kill9()
        gw.start()
    quarantined(gw, task_id, restarts=3)
    assert gw.get("/count").status_code == 200  # up, and serving
    assert "quarantined" in gw.wait_for_log("quarantined after 2 restarts")


def test_a_task_that_ends_the_process_stops_crash_looping(gateway_factory: Any) -> None:
    """os.exit in a task (full-library mode) killed the gateway at every start; now the task is
    quarantined once it has been found running more than Lua:TaskMaxRestarts times."""
    gw = gateway_factory({**NO_DICOM, "Lua": {"BackgroundWorkers": 1, "TaskMaxRestarts": 2, "FullLibraries": True}},
                         {"main.lua": MAIN, "main-task.lua": DYING_TASKS})
    task_id = queue(gw, "die")
    for _ in range(3):  # the first run and two re-runs each end the process
        assert gw.proc is not None
        assert gw.proc.wait(timeout=30) == 3
        gw.start()
    quarantined(gw, task_id, restarts=3)
    # one worker, first in first out: had the quarantined task been queued again, it would end
    # the process before this one could run
    after = wait_task(gw, queue(gw, "ok"))
    assert after["state"] == "done" and after["result"] == "ok"
    assert gw.running and gw.get("/count").status_code == 200
