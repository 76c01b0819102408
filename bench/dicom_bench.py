"""Store-and-forward benchmark: dcmtk storescu straight to Orthanc vs through the gateway.

    python bench/dicom_bench.py [--instances 500] [--rounds 3] [--studies 1] [--nagle]

One run starts a real Orthanc (DICOMweb plugin, as in the tests) and the gateway as a real
process (``Logging:Level`` INFO, store-and-forward on: every instance is spooled with fsync
before storescu hears success, and forwarded to Orthanc by the forwarder). Rounds alternate
direct and gateway so both see the same machine load. Each round stores fresh instances
(new UIDs: Orthanc never short-cuts a known instance).

Figures per round:

* direct: instances / storescu wall time (Orthanc stores synchronously);
* gateway accept: instances / storescu wall time through the gateway (what the modality sees);
* gateway end-to-end: instances / time until Orthanc holds all of them (spool + forward).

The ratios compare each gateway figure with the direct one of the same round; the summary
prints the medians. storescu runs with ``TCP_NODELAY=1`` (dcmtk's switch for disabling
Nagle): with Nagle on, storescu itself stalls ~40 ms per instance on delayed ACKs and both
paths measure the client, not the servers. ``--nagle`` measures that setting anyway.

Not a pytest test: it prints a table and exits 0 (1 if an instance went missing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.uid import generate_uid  # noqa: E402

from tests import dicom_samples  # noqa: E402
from tests.peers import GatewayProcess, OrthancServer, dcmtk  # noqa: E402


def make_batch(folder: Path, n: int, studies: int, tag: str) -> Path:
    folder.mkdir(parents=True)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    for i in range(n):
        s = i % studies
        dicom_samples.make_instance(
            folder / f"IM{i:05d}.dcm",
            patient_id=f"BENCH-{tag}-{s}",
            patient_name=f"Bench^{tag}",
            study_uid=study_uids[s],
            series_uid=series_uids[s],
            InstanceNumber=i + 1,
        )
    return folder


def storescu(aet: str, port: int, folder: Path, nagle: bool) -> float:
    env = dict(os.environ)
    if not nagle:
        env["TCP_NODELAY"] = "1"
    started = time.perf_counter()
    proc = subprocess.run(
        [dcmtk("storescu"), "-aec", aet, "127.0.0.1", str(port), str(folder), "+sd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"storescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


def wait_count(orthanc: OrthancServer, count: int, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orthanc.instance_count() >= count:
            return time.perf_counter()
        time.sleep(0.02)
    raise SystemExit(f"Orthanc holds {orthanc.instance_count()} instances, expected {count}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--studies", type=int, default=1, help="spread the instances over this many studies")
    ap.add_argument("--forward-concurrency", type=int, default=None, help="Dicom:ForwardConcurrency (default: 4)")
    ap.add_argument("--nagle", action="store_true", help="run storescu with Nagle on (dcmtk's default)")
    ap.add_argument(
        "--orthanc-nagle", action="store_true", help="leave Nagle on in Orthanc (its DCMTK default: ~20 instances/s)"
    )
    args = ap.parse_args()
    if not args.orthanc_nagle:
        # Orthanc's DCMTK reads the same switch; without it each C-STORE answer waits ~40 ms on a
        # delayed ACK and Orthanc, not the gateway, is what both paths measure.
        os.environ["TCP_NODELAY"] = "1"

    with tempfile.TemporaryDirectory(prefix="dicom-bench-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancServer(tmp / "orthanc").start()
        settings: dict[str, Any] = {"Logging": {"Level": "INFO"}}
        if args.forward_concurrency:
            settings["Dicom"] = {"ForwardConcurrency": args.forward_concurrency}
        gateway = GatewayProcess(tmp / "gateway", orthanc=orthanc, settings=settings)
        try:
            gateway.start()
            rows = []
            expected = 0
            for r in range(1, args.rounds + 1):
                direct_dir = make_batch(tmp / f"direct{r}", args.instances, args.studies, f"D{r}")
                gw_dir = make_batch(tmp / f"gateway{r}", args.instances, args.studies, f"G{r}")

                t_direct = storescu(orthanc.aet, orthanc.dicom_port, direct_dir, args.nagle)
                expected += args.instances
                wait_count(orthanc, expected)

                started = time.perf_counter()
                t_accept = storescu(gateway.aet, gateway.dicom_port, gw_dir, args.nagle)
                expected += args.instances
                t_e2e = wait_count(orthanc, expected) - started
                n = args.instances
                rows.append((r, n / t_direct, n / t_accept, n / t_e2e))
        finally:
            gateway.stop()
            orthanc.stop()

    print(
        f"\n{args.instances} instances x {args.rounds} rounds, {args.studies} study/ies per batch, "
        f"storescu {'with Nagle' if args.nagle else 'TCP_NODELAY=1'}, "
        f"Orthanc {'with Nagle' if args.orthanc_nagle else 'TCP_NODELAY=1'}, {os.cpu_count()} CPUs"
    )
    header = f"{'round':>5} {'direct/s':>10} {'gw accept/s':>12} {'ratio':>7} {'gw end-to-end/s':>16} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for r, d, a, e in rows:
        print(f"{r:>5} {d:>10.1f} {a:>12.1f} {a / d:>7.0%} {e:>16.1f} {e / d:>7.0%}")
    med = [statistics.median(col) for col in zip(*[row[1:] for row in rows], strict=True)]
    print("-" * len(header))
    print(
        f"{'median':>5} {med[0]:>10.1f} {med[1]:>12.1f} {med[1] / med[0]:>7.0%} {med[2]:>16.1f} {med[2] / med[0]:>7.0%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
