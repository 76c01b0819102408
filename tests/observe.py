"""Watching the gateway process from outside: resident memory and child processes (/proc)."""

from __future__ import annotations

import threading
from pathlib import Path


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's resident memory every 50 ms while a transfer runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.baseline = rss_kb(pid)
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_kb(self.pid))
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss_kb(self.pid))

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 1024


def children_running(parent: int, *argv: str) -> list[int]:
    """The child processes of ``parent`` whose command line is exactly ``argv``."""
    want = [a.encode() for a in argv]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), -1)
        if ppid == parent and cmdline == want:
            pids.append(int(entry.name))
    return pids


def running_with_argument(arg: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if arg.encode() in cmdline:
                pids.append(int(entry.name))
    return pids
