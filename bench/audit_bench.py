#!/usr/bin/env python3
"""Audit trail cost on the proxy's path (issue 12, item 7): gateway CPU per request, audit off vs on.

Starts a real Orthanc with DICOMweb and two gateways in front of it: ``gw-off`` (no audit, the
default) and ``gw-on`` (``Audit:Enabled`` with a JSON-lines file and a UDP collector, a socket
this script drains, so the whole pipeline runs: event, XML, RFC 5424, buffer with fsync, file,
send). Requests: QIDO-RS ``GET /dicom-web/studies/{uid}/series`` (audited) and Orthanc's
``GET /system`` (not DICOMweb: what every other proxied request pays). The measure is the
gateway process's CPU seconds (``/proc/<pid>/stat``) per request, rounds alternating between
the two gateways, so the ratio is from the same run on a shared machine.

    python bench/audit_bench.py [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LOOPBACK, Peers, cpu_seconds, make_dicom  # noqa: E402


def drain(sock: socket.socket, counter: list[int]) -> None:
    while True:
        try:
            sock.recv(1 << 16)
        except OSError:
            return
        counter[0] += 1


def cpu_per_request(session: requests.Session, url: str, pid: int, n: int) -> float:
    before = cpu_seconds(pid)
    for _ in range(n):
        r = session.get(url, timeout=30)
        r.raise_for_status()
    return (cpu_seconds(pid) - before) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((LOOPBACK, 0))
    received = [0]
    threading.Thread(target=drain, args=(udp, received), daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp, Peers(Path(tmp)) as peers:
        orthanc = peers.orthanc()
        data, _ = make_dicom(16, 16, patient_id="BENCH")
        study = requests.post(orthanc.url + "/instances", data=data, timeout=30).json()["ParentStudy"]
        study_uid = requests.get(f"{orthanc.url}/studies/{study}", timeout=30).json()["MainDicomTags"][
            "StudyInstanceUID"]
        audit = {"Enabled": True, "File": str(Path(tmp) / "audit.jsonl"),
                 "Collectors": [f"udp://{LOOPBACK}:{udp.getsockname()[1]}"]}
        gateways = {"gw-off": peers.gateway("gw-off", orthanc.url),
                    "gw-on": peers.gateway("gw-on", orthanc.url, settings={"Audit": audit})}
        paths = {"qido": f"/dicom-web/studies/{study_uid}/series", "other": "/system"}
        results: dict[tuple[str, str], list[float]] = {}
        sessions = {name: requests.Session() for name in gateways}
        for name, gw in gateways.items():  # warm up
            cpu_per_request(sessions[name], gw.url + paths["qido"], gw.process.proc.pid, 200)
        for _ in range(args.rounds):
            for kind, path in paths.items():
                for name, gw in gateways.items():
                    value = cpu_per_request(sessions[name], gw.url + path, gw.process.proc.pid, args.requests)
                    results.setdefault((name, kind), []).append(value)
        print("| request | gateway CPU per request, audit off | audit on | on / off |")
        print("|---|---|---|---|")
        for kind in paths:
            off = statistics.median(results[("gw-off", kind)])
            on = statistics.median(results[("gw-on", kind)])
            print(f"| {kind} | {off * 1e6:.0f} us | {on * 1e6:.0f} us | {on / off:.2f} |")
        lines = (Path(tmp) / "audit.jsonl").read_text().count("\n")
        print(f"\naudit events written: {lines}; datagrams received: {received[0]}")
    udp.close()


if __name__ == "__main__":
    main()
