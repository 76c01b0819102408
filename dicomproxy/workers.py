"""``Server:Workers``: N gateway processes on the same HTTP listeners, and who owns what.

Model (OpenResty's): the parent binds every ``Urls`` socket once per worker with
``SO_REUSEPORT`` (N sockets on each port), then forks the workers; worker *i* accepts on its
own set and closes the others. Each worker is a whole gateway (its own event loop, its own Lua
singleton, its own upstream pool). The parent runs no event loop, no Lua and no thread: it
only starts workers, restarts one that dies (logged, with a back-off when it dies young),
forwards SIGTERM and waits for them (``Server:ShutdownTimeoutSeconds`` plus the workers' own
watchdog slack, then SIGKILL).

Why, measured: with one shared listening socket (the parent binds one, every worker accepts on
it, uvicorn's ``--workers`` model) the kernel wakes every worker and the first to run wins, so
an idle worker takes nearly all: 60 of 60 health requests from 8 concurrent clients went to
worker 0 on this machine. With ``SO_REUSEPORT`` the kernel hashes each connection to one
worker's queue: both served from the first requests (tests/e2e/test_workers.py). The parent
keeps every set open, so the connections hashed to a worker that died wait in its queue for
the restarted worker (which gets the same sockets again, ~1 s later) instead of being reset,
and an address in use is found once, before any worker starts. At SIGTERM the parent closes
its copies; each worker closes its own when it drains. uvicorn's ``Multiprocess`` supervisor is
not reused: it shares one socket (above), re-imports the app by name in each child (ours is
built from the loaded settings and pre-bound listeners, TLS acceptors included), and restarts
children only on a failed health ping. ``fork`` is safe here: the parent holds no thread or
loop when it forks.

Single-owner roles (run in worker 0 only, see :attr:`WorkerInfo.owner`): the DICOM listener and
the spool forwarder, the background task runners (any worker may submit: the queue is the
folder, worker 0 adopts what others wrote), the Orthanc change feed, the TUS expiry sweep and
the mail rules. Each worker keeps its own audit buffer (``audit/worker-N``), HTTP metrics,
notifications feed and status page history. When worker 0 dies the DICOM port is closed until
it is back (about a second): a modality retries, nothing spooled is lost. A later Redis backend
replaces "worker 0" by a lease (the role goes to whichever process holds it) without changing
any of the features: they ask ``host.worker.owner`` once, at install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dicomproxy.workers")

RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a worker that keeps dying young
YOUNG_SECONDS = 10.0  # a worker that dies sooner than this after its start is restarted with a back-off
KILL_SLACK_SECONDS = 8.0  # past Server:ShutdownTimeoutSeconds: SIGKILL (each worker's watchdog fires at +5 s)
CONFIG_ERROR = 2  # a worker's exit status for a config error (a certificate file, say): restarting would not help
_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class WorkerInfo:
    """Which worker this process is. ``count == 1``: the single-process gateway (today's)."""

    index: int = 0
    count: int = 1
    status_file: Path | None = None

    @property
    def owner(self) -> bool:
        """True in the one process that runs the single-owner roles (worker 0)."""
        return self.index == 0

    @property
    def multi(self) -> bool:
        return self.count > 1

    def status(self) -> dict[str, Any]:
        """The ``workers`` section of ``/dicomproxy/health``: who answered and how many run."""
        out: dict[str, Any] = {"ok": True, "index": self.index, "pid": os.getpid(), "configured": self.count,
                               "owner": self.owner}
        if not self.multi or self.status_file is None:
            out["running"] = 1
            return out
        try:
            data = json.loads(self.status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        pids = data.get("pids", {})
        out["running"] = sum(1 for p in pids.values() if p)
        out["restarts"] = data.get("restarts", 0)
        out["ok"] = out["running"] == self.count
        return out


@dataclass
class _Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # deaths in a row, each sooner than YOUNG_SECONDS after its start
    restart_at: float | None = None


@dataclass
class Supervisor:
    """Starts ``count`` workers (``run(info) -> exit status`` in a forked child), keeps them
    running, stops them on SIGTERM/SIGINT. ``close_listeners()`` is called in the parent when the
    shutdown begins (the workers keep their own copies of the sockets)."""

    count: int
    run: Callable[[WorkerInfo], int]
    shutdown_timeout: float
    status_file: Path
    close_listeners: Callable[[], None] = lambda: None
    on_dead: Callable[[int], None] = lambda pid: None  # a worker's pid once it is reaped (its live gauges)
    slots: list[_Slot] = field(default_factory=list)
    restarts: int = 0
    stopping_since: float | None = None
    _last_pid: dict[int, int] = field(default_factory=dict)  # index -> pid, kept once reaped (for the log)

    def serve(self) -> int:
        """Run until every worker has exited after a SIGTERM; the exit status (0: all stopped cleanly)."""
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self.slots = [_Slot(i) for i in range(self.count)]
            for slot in self.slots:
                self._spawn(slot, old_mask)
            log.info("supervisor %d: %d workers running (Server:Workers)", os.getpid(), self.count)
            status = self._loop(old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            with contextlib.suppress(OSError):
                self.status_file.unlink()
        return status

    # ------------------------------------------------------------------ the parent's loop
    def _loop(self, old_mask: set[int | signal.Signals]) -> int:
        worst = 0
        while True:
            info = signal.sigtimedwait(_SIGNALS, self._wait_seconds())
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop(info.si_signo)
            for slot, code in self._reap():
                if self.stopping_since is None and code == CONFIG_ERROR:
                    log.error("worker %d stopped on a config error (exit status 2, the error is above): stopping "
                              "every worker", slot.index)
                    worst = CONFIG_ERROR
                    self._stop(signal.SIGTERM)
                elif self.stopping_since is None:
                    self._died(slot, code)
                elif code != 0:  # a worker that did not stop cleanly on request
                    worst = max(worst, 1)
            if self.stopping_since is None:
                self._restart_due(old_mask)
            elif all(s.pid == 0 for s in self.slots):
                log.info("supervisor: every worker stopped (exit status %d)", worst)
                return worst
            elif time.monotonic() - self.stopping_since > self.shutdown_timeout + KILL_SLACK_SECONDS:
                for slot in self.slots:
                    if slot.pid:
                        log.error("worker %d (pid %d) still running past Server:ShutdownTimeoutSeconds: killed",
                                  slot.index, slot.pid)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(slot.pid, signal.SIGKILL)
                worst = max(worst, 1)

    def _wait_seconds(self) -> float:
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        if not due:
            return 1.0
        return min(1.0, max(0.01, min(due) - time.monotonic()))

    def _stop(self, signo: int) -> None:
        first = self.stopping_since is None
        if first:
            self.stopping_since = time.monotonic()
            self.close_listeners()
            log.info("supervisor: %s: stopping %d workers (Server:ShutdownTimeoutSeconds %gs)",
                     signal.Signals(signo).name, sum(1 for s in self.slots if s.pid), self.shutdown_timeout)
        for slot in self.slots:
            slot.restart_at = None
            if slot.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGTERM)

    def _reap(self) -> list[tuple[_Slot, int]]:
        out = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            code = os.waitstatus_to_exitcode(status)
            try:
                self.on_dead(pid)
            except Exception:
                log.exception("cleaning up after worker pid %d failed", pid)
            for slot in self.slots:
                if slot.pid == pid:
                    slot.pid = 0
                    out.append((slot, code))
        if out:
            self._write_status()
        return out

    def _died(self, slot: _Slot, code: int) -> None:
        lived = time.monotonic() - slot.started
        slot.failures = slot.failures + 1 if lived < YOUNG_SECONDS else 0
        delay = 0.0 if slot.failures == 0 else min(RESTART_BACKOFF_MAX, 0.5 * 2 ** (slot.failures - 1))
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        log.error("worker %d (pid %d) died after %.1fs (%s): restarting it%s", slot.index,
                  self._last_pid.get(slot.index, 0), lived, how, f" in {delay:g}s" if delay else "")
        slot.restart_at = time.monotonic() + delay

    def _restart_due(self, old_mask: set[int | signal.Signals]) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                self.restarts += 1
                self._spawn(slot, old_mask)

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: _Slot, old_mask: set[int | signal.Signals]) -> None:
        info = WorkerInfo(slot.index, self.count, self.status_file)
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                code = self.run(info)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", slot.index)
            finally:
                logging.shutdown()
                os._exit(code)
        slot.pid, slot.started = pid, time.monotonic()
        self._last_pid[slot.index] = pid
        log.info("worker %d started (pid %d)", slot.index, pid)
        self._write_status()

    def _write_status(self) -> None:
        data = {"supervisor": os.getpid(), "pids": {str(s.index): s.pid for s in self.slots},
                "restarts": self.restarts}
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, self.status_file)
