"""Replicas sharing one Redis (``Cluster:Redis``, issue 14 item 2): the task queue and notifications.

Two real gateway processes, the real Orthanc, Debian's redis-server on a free port:

* a task queued on A runs exactly once (on A or B) and both replicas list it;
* kill -9 of the replica running a long task: the other one runs it again after the lease and it
  completes exactly once (the Lua task records its starts and ends in a file);
* an SSE client on A sees a notification raised on B; the feed is shared;
* a mail rule sends one mail per event with two replicas.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.peers import GatewayProcess, RedisServer, wait_until

MAIN = r"""
function onHttpRequest(r)
  if r.Path == "/queue" then
    r:ResponseWrite(LuaBackgroundWorker("main-task.lua", "run", r.Headers["x-args"] or ""))
    return true
  elseif r.Path == "/notify" then
    ShowNotification({Title = r.Headers["x-title"], Body = "from " .. (r.Headers["x-from"] or "?")})
    r:ResponseWrite("ok")
    return true
  end
end
"""

TASK = r"""
-- args: "<token> <seconds>"; records each start and each end in RUNS (one line each)
function run(args)
  local token, seconds = args:match("^(%S+) (%S+)$")
  if not token then error("cannot parse the task's args: " .. args) end
  OsExecute("sh", "-c 'echo start " .. token .. " >> RUNS'")
  OsExecute("sleep", seconds)
  OsExecute("sh", "-c 'echo done " .. token .. " >> RUNS'")
  return token
end
"""


def _replicas(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, runs: Path,
    extra: dict[str, Any] | None = None,
) -> tuple[GatewayProcess, GatewayProcess]:
    settings = {
        "Dicom": {"Port": 0},
        "Cluster": {"Redis": redis_server.url, "TaskLeaseSeconds": 5},  # renewed every 1.7 s: room for a loaded CI
        "Lua": {"BackgroundWorkers": 1},
        **(extra or {}),
    }
    scripts = {"main.lua": MAIN, "main-task.lua": TASK.replace("RUNS", str(runs))}
    a = gateway_factory(settings, scripts, register_modality=None)
    b = gateway_factory(settings, scripts, register_modality=None)
    return a, b


def _queue(gateway: GatewayProcess, args: str) -> str:
    resp = gateway.get("/queue", headers={"x-args": args})
    assert resp.status_code == 200, resp.text
    return resp.text


def _task(gateway: GatewayProcess, task_id: str) -> dict[str, Any]:
    resp = gateway.get(f"/dicomproxy/tasks/{task_id}")
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def _lines(runs: Path) -> list[str]:
    return runs.read_text().splitlines() if runs.exists() else []


def test_a_task_queued_on_one_replica_runs_once_and_both_list_it(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    a, b = _replicas(gateway_factory, redis_server, runs)
    ids = [_queue(a, f"t{n} 0.3") for n in range(6)]
    for task_id in ids:
        wait_until(lambda t=task_id: _task(b, t)["state"] == "done", timeout=30, what=f"task {task_id} done")
    lines = _lines(runs)
    for n in range(6):  # each task started once and finished once, across both replicas
        assert lines.count(f"start t{n}") == 1, lines
        assert lines.count(f"done t{n}") == 1, lines
    for gateway in (a, b):  # either replica lists the cluster's tasks; the state filter works
        listed = {t["id"]: t for t in gateway.get("/dicomproxy/tasks?state=done").json()}
        assert set(ids) <= set(listed)
        assert all(listed[t]["result"] == f"t{n}" for n, t in enumerate(ids))
        assert not [t for t in gateway.get("/dicomproxy/tasks?state=queued").json() if t["id"] in ids]
    ran_on = {_task(a, t)["replica"] for t in ids}
    assert all(r and r.split("-")[-2] in (str(a.proc.pid), str(b.proc.pid)) for r in ran_on), ran_on  # type: ignore[union-attr]
    health = a.get("/dicomproxy/health").json()
    assert health["cluster"]["ok"] is True and health["cluster"]["redis"] == f"127.0.0.1:{redis_server.port}"
    assert redis_server.url not in json.dumps(health)


def test_kill9_of_the_replica_running_a_task_completes_it_once_on_the_other(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    a, b = _replicas(gateway_factory, redis_server, runs)
    task_id = _queue(a, "long 4")
    holder_replica = wait_until(lambda: _task(a, task_id).get("replica"), timeout=15, what="the task running")
    pid = int(holder_replica.split("-")[-2])
    holder, other = (a, b) if a.proc and a.proc.pid == pid else (b, a)
    assert holder.proc is not None and holder.proc.pid == pid
    wait_until(lambda: "start long" in _lines(runs), timeout=10, what="the task started")
    holder.kill9()
    done = wait_until(lambda: (t := _task(other, task_id))["state"] == "done" and t, timeout=30,
                      what="the task completed on the surviving replica")
    assert done["restarts"] == 1 and done["attempts"] == 2
    assert done["replica"] != holder_replica
    wait_until(lambda: _lines(runs).count("done long") >= 1, timeout=5, what="the run recorded")
    lines = _lines(runs)
    assert lines.count("start long") == 2 and lines.count("done long") == 1, lines
    assert other.get("/dicomproxy/health").json()["cluster"]["tasksReclaimed"] == 1
    assert other.metric("dicomproxy_cluster_tasks_reclaimed") == 1 and other.metric("dicomproxy_cluster_redis_up") == 1


def test_a_task_is_refused_with_a_clear_error_while_redis_is_down_and_health_says_so(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    a, _b = _replicas(gateway_factory, redis_server, runs)
    redis_server.kill()
    resp = a.get("/queue", headers={"x-args": "never 0"})
    assert resp.status_code == 500
    assert "Cluster:Redis" in a.log_text() and "is unavailable" in a.log_text()
    health = wait_until(lambda: (h := a.get("/dicomproxy/health").json())["cluster"]["ok"] is False and h,
                        timeout=15, what="health showing Redis down")
    assert "cluster" in health["degraded"] and "redis-server" in health["cluster"]["error"]
    listing = a.get("/dicomproxy/tasks")
    assert listing.status_code == 503 and "Cluster:Redis" in listing.json()["error"]
    assert redis_server.url not in listing.text
    # a notification raised meanwhile is still shown on this replica (not shared), health says so
    assert a.get("/notify", headers={"x-title": "while Redis is down"}).text == "ok"
    wait_until(lambda: [n for n in a.get("/dicomproxy/notifications").json() if n["title"] == "while Redis is down"],
               timeout=10, what="the notification shown locally")
    assert a.get("/dicomproxy/health").json()["notifications"]["shared"] is False
    redis_server.start()
    wait_until(lambda: a.get("/dicomproxy/health").json()["cluster"]["ok"], timeout=20, what="Redis back")
    task_id = _queue(a, "after 0")
    wait_until(lambda: _task(a, task_id)["state"] == "done", timeout=20, what="a task after Redis came back")
    assert "never" not in runs.read_text()


def _sse_events(gateway: GatewayProcess, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    with requests.get(gateway.url + "/dicomproxy/notifications/stream", stream=True, timeout=timeout) as resp:
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
                if len(got) >= count:
                    break
    return got


def test_an_sse_client_on_one_replica_sees_a_notification_raised_on_the_other(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    a, b = _replicas(gateway_factory, redis_server, tmp_path / "runs.txt")
    with ThreadPoolExecutor(1) as pool:
        listening = pool.submit(_sse_events, a, 1)
        wait_until(lambda: a.metric("dicomproxy_notification_streams") >= 1, timeout=10, what="the stream open")
        assert b.get("/notify", headers={"x-title": "raised on B", "x-from": "B"}).text == "ok"
        events = listening.result(timeout=20)
    assert [e["title"] for e in events] == ["raised on B"] and events[0]["body"] == "from B"
    # the feed is shared: both replicas list it, with the same id
    for gateway in (a, b):
        feed = wait_until(lambda g=gateway: [n for n in g.get("/dicomproxy/notifications").json()
                                             if n["title"] == "raised on B"], timeout=10, what="the shared feed")
        assert len(feed) == 1 and feed[0]["id"] == events[0]["id"]
    assert redis_server.client().llen("dicomproxy:notifications") >= 1
    assert os.environ.get("DICOMPROXY__CLUSTER__REDIS") is None


def test_a_mail_rule_sends_one_mail_per_event_with_two_replicas(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    from tests.e2e.test_mail import SmtpSink

    smtp = SmtpSink().start()
    try:
        extra = {"Smtp": {"Host": "127.0.0.1", "Port": smtp.port, "From": "gateway@example.org"},
                 "Notifications": {"Email": [{"Events": ["task.failed"], "To": ["ops@example.org"]}]}}
        a, b = _replicas(gateway_factory, redis_server, tmp_path / "runs.txt", extra)
        tokens = [f"malformed{n}" for n in range(4)]  # args the task cannot parse: it fails, naming them
        ids = [_queue(gw, token) for gw, token in zip((a, b, a), tokens, strict=False)]
        for task_id in ids:
            wait_until(lambda t=task_id: _task(a, t)["state"] == "failed", timeout=20, what=f"{task_id} failed")
        smtp.wait_for(3)
        last = _queue(b, tokens[3])  # a fourth event: its mail arrives after any duplicate of the first three
        wait_until(lambda: _task(a, last)["state"] == "failed", timeout=20, what="the fourth task failed")
        mails = smtp.wait_for(4)
        assert len(mails) == 4, [m.message["Subject"] for m in mails]
        bodies = [m.message.get_body(("plain",)).get_content() for m in mails]  # type: ignore[union-attr]
        for token in tokens:
            assert sum(f"args: {token}" in body for body in bodies) == 1, (token, bodies)
    finally:
        smtp.stop()


def test_a_tus_upload_is_imported_by_the_replica_that_holds_it(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, fresh_orthanc: Any,
    dicom_samples: Any, tmp_path: Path,
) -> None:
    from tusclient import client as tus_client

    a, b = _replicas(gateway_factory, redis_server, tmp_path / "runs.txt")
    path, sop_uid = dicom_samples.make_instance(tmp_path / "ct.dcm", patient_id="CLU1", patient_name="Clu^One")
    uploader = tus_client.TusClient(a.url + "/files/").uploader(str(path), chunk_size=4096,
                                                                 metadata={"filename": "ct.dcm"})
    uploader.upload()
    done = wait_until(lambda: [t for t in a.get("/dicomproxy/tasks?state=done").json() if t["kind"] == "tus-import"],
                      timeout=30, what="the import done on A")
    assert done[0]["result"]["sopInstanceUids"] == [sop_uid]
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    # B lists the cluster's tasks: its own and the shared ones, not A's local import
    assert [t for t in b.get("/dicomproxy/tasks").json() if t["kind"] == "tus-import"] == []
    shared = _queue(b, "shared 0")
    wait_until(lambda: _task(a, shared)["state"] == "done", timeout=20, what="a shared task listed on A")


KILLER = r"""
-- ends the replica that runs it (kill -9 of the gateway: OsExecute's shell is its child)
function run(args)
  OsExecute("sh", "-c 'echo start >> RUNS; kill -9 $PPID'")
  return "survived"
end
"""


def test_a_task_that_kills_its_replicas_is_quarantined_not_run_forever(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    settings = {"Dicom": {"Port": 0}, "Cluster": {"Redis": redis_server.url, "TaskLeaseSeconds": 2},
                "Lua": {"BackgroundWorkers": 1, "TaskMaxRestarts": 1}}
    scripts = {"main.lua": MAIN, "main-task.lua": KILLER.replace("RUNS", str(runs))}
    a = gateway_factory(settings, scripts, register_modality=None)
    b = gateway_factory(settings, scripts, register_modality=None)
    task_id = _queue(a, "x")
    # first run ends one replica; after the lease the other takes it (restart 1 of 1) and ends too
    wait_until(lambda: len(_lines(runs)) >= 2, timeout=30, what="the task run on both replicas")
    wait_until(lambda: not a.running and not b.running, timeout=10, what="both replicas ended by the task")
    a.restart()  # the next replica to take it finds restarts > TaskMaxRestarts: quarantined, not run
    task = wait_until(lambda: (t := _task(a, task_id))["state"] == "failed" and t, timeout=20,
                      what="the task quarantined")
    assert task["quarantined"] is True and "TaskMaxRestarts" in task["error"] and task["restarts"] == 2
    assert _lines(runs) == ["start", "start"]
    quarantined = [t["id"] for t in a.get("/dicomproxy/tasks?state=quarantined").json()]
    assert quarantined == [task_id]
    assert a.running


def test_a_task_failed_on_one_replica_is_run_again_from_the_other(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    a, b = _replicas(gateway_factory, redis_server, tmp_path / "runs.txt")
    task_id = _queue(a, "broken")
    wait_until(lambda: _task(a, task_id)["state"] == "failed", timeout=20, what="the task failed")
    resp = b.post(f"/dicomproxy/tasks/{task_id}/rerun")
    assert resp.status_code == 202, resp.text
    again = wait_until(lambda: (t := _task(a, task_id))["state"] == "failed" and t.get("reruns") == 1 and t,
                       timeout=20, what="the re-run failed again")
    assert again["attempts"] == 2 and "cannot parse the task's args: broken" in again["error"]
    done_id = _queue(b, "fine 0")
    wait_until(lambda: _task(a, done_id)["state"] == "done", timeout=20, what="a task done")
    assert a.post(f"/dicomproxy/tasks/{done_id}/rerun").status_code == 409  # only a failed task


SLOW_ONCE = r"""
-- the first run is slow (30 s), a later one quick: records each start and end in RUNS
function run(args)
  OsExecute("sh", "-c 'echo start >> RUNS'")
  OsExecute("sh", "-c '[ -e RUNS.slow ] && exit 0; touch RUNS.slow; sleep 30'")
  OsExecute("sh", "-c 'echo done >> RUNS'")
  return "ok"
end
"""


def test_a_graceful_stop_hands_a_running_task_to_the_other_replica_without_counting_a_restart(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    settings = {"Dicom": {"Port": 0}, "Cluster": {"Redis": redis_server.url, "TaskLeaseSeconds": 30},
                "Lua": {"BackgroundWorkers": 1}, "Server": {"ShutdownTimeoutSeconds": 2}}
    scripts = {"main.lua": MAIN, "main-task.lua": SLOW_ONCE.replace("RUNS", str(runs))}
    a = gateway_factory(settings, scripts, register_modality=None)
    b = gateway_factory(settings, scripts, register_modality=None)
    task_id = _queue(a, "x")
    holder_replica = wait_until(lambda: _task(a, task_id).get("replica"), timeout=15, what="the task running")
    holder, other = (a, b) if a.proc and str(a.proc.pid) == holder_replica.split("-")[-2] else (b, a)
    wait_until(lambda: (tmp_path / "runs.txt.slow").exists(), timeout=10, what="the slow run begun")
    assert holder.stop() == 0 and not holder.forced_kill
    # put back in the queue at once (not left to the 30 s lease), run by the other replica
    done = wait_until(lambda: (t := _task(other, task_id))["state"] == "done" and t, timeout=15,
                      what="the task done on the other replica")
    assert done["restarts"] == 0 and done["replica"] != holder_replica
    assert _lines(runs) == ["start", "start", "done"]


def test_a_replica_that_lost_its_lease_stops_the_task_and_it_completes_once(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    runs = tmp_path / "runs.txt"
    a, b = _replicas(gateway_factory, redis_server, runs)
    task_id = _queue(a, "stolen 8")
    wait_until(lambda: "start stolen" in _lines(runs), timeout=15, what="the task started")
    # what a replica cut off from Redis past its lease sees: another consumer holds the entry now
    r = redis_server.client()
    pending = r.xpending_range("dicomproxy:tasks:queue", "workers", "-", "+", 10)
    assert len(pending) == 1
    holder = pending[0]["consumer"]
    r.xclaim("dicomproxy:tasks:queue", "workers", "elsewhere", 0, [pending[0]["message_id"]], justid=True)
    holder_gw = a if a.proc and holder.split("-")[-2] == str(a.proc.pid) else b
    holder_gw.wait_for_log("lease of entry", timeout=10)
    # "elsewhere" never renews: after the lease a live replica reclaims it and completes it, once
    done = wait_until(lambda: (t := _task(a, task_id))["state"] == "done" and t, timeout=45, what="the task done")
    assert done["restarts"] == 1
    lines = _lines(runs)
    assert lines.count("start stolen") == 2 and lines.count("done stolen") == 1, lines


def test_an_event_source_reconnecting_to_another_replica_gets_what_it_missed(
    gateway_factory: Callable[..., GatewayProcess], redis_server: RedisServer, tmp_path: Path,
) -> None:
    a, b = _replicas(gateway_factory, redis_server, tmp_path / "runs.txt")
    for title in ("first", "second", "third"):
        assert a.get("/notify", headers={"x-title": title}).text == "ok"
    feed = wait_until(lambda: len(f := b.get("/dicomproxy/notifications").json()) >= 3 and f, timeout=10,
                      what="three notifications in B's copy of the feed")
    first = min(n["id"] for n in feed)
    missed = [n["title"] for n in sorted(feed, key=lambda n: n["id"]) if n["id"] > first]
    got: list[str] = []
    with requests.get(b.url + "/dicomproxy/notifications/stream", headers={"Last-Event-ID": str(first)},
                      stream=True, timeout=20) as resp:
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                got.append(json.loads(line[6:])["title"])
                if len(got) == 2:
                    break
    assert got == missed and len(missed) == 2
