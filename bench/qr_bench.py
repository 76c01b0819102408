"""Query/Retrieve benchmark: C-FIND and C-GET straight to Orthanc vs through the gateway.

    python bench/qr_bench.py [--ops 100] [--rounds 3] [--instances 10] [--baseline /work/baseline]

One run starts a real Orthanc (DICOMweb plugin, as in the tests) holding one study of
``--instances`` small CT instances, and the gateway as a real process (``Logging:Level`` INFO).
Each operation is a requester association of its own (as findscu/getscu do), made by pynetdicom
in this process: a study-level C-FIND (one match), or a study-level C-GET of the whole study
(every instance stored back on the requester's association).

Figures per round and target: wall milliseconds per operation, and for a gateway the CPU
milliseconds (user + system, from /proc) its process spent per operation. ``--baseline DIR``
runs the gateway of another checkout (its own ``DIR/.venv``) in the same rounds, the two
gateways in alternating order (ABBA), for before/after figures under the same machine load.

Not a pytest test: it prints a table and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.dataset import Dataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402
from pynetdicom import AE, build_role, evt  # noqa: E402
from pynetdicom.sop_class import (  # noqa: E402
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from bench.dicom_bench import baseline_gateway, cpu_seconds  # noqa: E402
from tests import dicom_samples  # noqa: E402
from tests.peers import GatewayProcess, OrthancServer  # noqa: E402

CT = dicom_samples.SOP_CLASSES["CT"]


def find_once(port: int, aet: str, study: str) -> None:
    ae = AE(ae_title="BENCHFIND")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=aet)
    if not assoc.is_established:
        raise SystemExit(f"association with {aet} refused")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    query.PatientName = ""
    query.StudyDescription = ""
    answers = [int(s.Status) for s, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)]
    assoc.release()
    if answers != [0xFF00, 0x0000]:
        raise SystemExit(f"C-FIND from {aet}: {answers}")


def get_once(port: int, aet: str, study: str, expected: int) -> None:
    ae = AE(ae_title="BENCHGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    got = [0]

    def on_store(event: Any) -> int:
        got[0] += 1
        return 0x0000

    assoc = ae.associate("127.0.0.1", port, ae_title=aet, ext_neg=[build_role(CT, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    if not assoc.is_established:
        raise SystemExit(f"association with {aet} refused")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    final = [int(s.Status) for s, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)][-1]
    assoc.release()
    if final != 0x0000 or got[0] != expected:
        raise SystemExit(f"C-GET from {aet}: final 0x{final:04X}, {got[0]} of {expected} instances")


def measure(op: Callable[[], None], n: int, gateway: GatewayProcess | None) -> tuple[float, float]:
    """(wall ms per op, gateway CPU ms per op; 0 for direct)."""
    cpu = cpu_seconds(gateway) if gateway else 0.0
    started = time.perf_counter()
    for _ in range(n):
        op()
    wall = (time.perf_counter() - started) * 1000 / n
    return wall, ((cpu_seconds(gateway) - cpu) * 1000 / n if gateway else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=100, help="operations of each kind per round and target")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--instances", type=int, default=10, help="instances in the study each C-GET retrieves")
    ap.add_argument("--baseline", type=Path, default=None, help="also run the gateway of this checkout (its .venv)")
    args = ap.parse_args()
    os.environ["TCP_NODELAY"] = "1"  # Orthanc's DCMTK: no delayed-ACK stalls (see dicom_bench.py)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    rows: list[tuple[int, str, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="qr-bench-") as tmp_name:
        tmp = Path(tmp_name)
        orthanc = OrthancServer(tmp / "orthanc").start()
        settings: dict[str, Any] = {"Logging": {"Level": "INFO"}}
        gateways = {"gateway": GatewayProcess(tmp / "gateway", orthanc=orthanc, settings=settings)}
        if args.baseline:
            gateways = {"baseline": baseline_gateway(args.baseline, tmp / "baseline", orthanc, settings), **gateways}
        try:
            study = generate_uid()
            for i in range(args.instances):
                data, _ = dicom_samples.make_instance(patient_id="QRBENCH", patient_name="Bench^QR", study_uid=study,
                                                      InstanceNumber=i + 1)
                orthanc.upload(data)
            for g in gateways.values():
                g.start()
            targets: list[tuple[str, int, str, GatewayProcess | None]] = [
                (name, g.dicom_port, g.aet, g) for name, g in gateways.items()
            ]
            for r in range(1, args.rounds + 1):
                order = targets if r % 2 else list(reversed(targets))
                for name, port, aet, g in [("direct", orthanc.dicom_port, orthanc.aet, None), *order]:
                    for kind, op in (("C-FIND", lambda p=port, a=aet: find_once(p, a, study)),
                                     ("C-GET", lambda p=port, a=aet: get_once(p, a, study, args.instances))):
                        op()  # warm-up
                        wall, cpu = measure(op, args.ops, g)
                        rows.append((r, name, kind, wall, cpu))
        finally:
            for g in gateways.values():
                g.stop()
            orthanc.stop()
    report(args, rows)
    return 0


def report(args: argparse.Namespace, rows: list[tuple[int, str, str, float, float]]) -> None:
    print(f"\n{args.ops} operations x {args.rounds} rounds, C-GET of {args.instances} instances, {os.cpu_count()} CPUs")
    header = f"{'round':>5} {'target':>9} {'op':>7} {'wall ms/op':>11} {'vs direct':>10} {'gateway CPU ms/op':>18}"
    print(header)
    print("-" * len(header))
    direct = {(r, kind): wall for r, name, kind, wall, _ in rows if name == "direct"}
    for r, name, kind, wall, cpu in rows:
        print(f"{r:>5} {name:>9} {kind:>7} {wall:>11.2f} {wall / direct[(r, kind)]:>10.2f} {cpu:>18.2f}")
    print("-" * len(header))
    for kind in ("C-FIND", "C-GET"):
        for name in dict.fromkeys(row[1] for row in rows):
            mine = [row for row in rows if row[1] == name and row[2] == kind]
            wall = statistics.median(row[3] for row in mine)
            ratio = statistics.median(row[3] / direct[(row[0], kind)] for row in mine)
            cpu = statistics.median(row[4] for row in mine)
            print(f"median {kind:>7} {name:>9}: {wall:.2f} ms wall ({ratio:.2f}x direct), CPU {cpu:.2f} ms per op")


if __name__ == "__main__":
    sys.exit(main())
