"""The in-process cost of ``Dicom:Routes`` per instance: reading the header (with and without the
routes' extra tags) and choosing the destinations with N routes, none of which matches (every one
is tried; the worst case), in CPU microseconds per instance (``time.process_time``, best of 5).

    python bench/dicom_routes_bench.py [--routes 0,1,10,100] [--calls 20000]

Not a pytest test: it prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomproxy.config.model import DicomRoute  # noqa: E402
from dicomproxy.dicom import datasets  # noqa: E402
from dicomproxy.dicom.routing import Router  # noqa: E402
from tests import dicom_samples  # noqa: E402

EXPLICIT = "1.2.840.10008.1.2.1"


def per_call_us(fn: object, calls: int) -> float:
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(calls):
            fn()  # type: ignore[operator]
        best = min(best, time.process_time() - started)
    return best / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", default="0,1,10,100")
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    ds = dicom_samples.build_dataset(patient_id="P", patient_name="Bench^Routes")
    ds.InstitutionName = "North Wing"
    raw = datasets.encode(ds, EXPLICIT)
    print(f"{'what':<52} {'CPU us/instance':>16}")
    print(f"{'header UIDs only (no route has a dataset condition)':<52} "
          f"{per_call_us(lambda: datasets.header_uids(raw, EXPLICIT), args.calls // 4):>16.2f}")
    tags = (0x00080060, 0x00080080)
    print(f"{'header UIDs + Modality + InstitutionName':<52} "
          f"{per_call_us(lambda: datasets.header_uids(raw, EXPLICIT, tags), args.calls // 4):>16.2f}")
    values = datasets.header_uids(raw, EXPLICIT, tags)
    for n in (int(x) for x in args.routes.split(",")):
        router = Router([DicomRoute.model_validate({"CallingAet": "CT01", "Modality": f"X{i}*",
                                                    "Tags": {"InstitutionName": "South*"},
                                                    "Destinations": ["default"]}) for i in range(n)])
        assert router.choose("CT01", "GW", values) == ("default",)
        label = f"choose, {n} route(s), none matching"
        print(f"{label:<52} {per_call_us(lambda r=router: r.choose('CT01', 'GW', values), args.calls):>16.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
