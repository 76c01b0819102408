"""Units of dicomproxy.dicom.spool_api on a real spool folder: the failed list, retry, discard and
the limits on what a caller may ask. (Through the gateway, with the admin role and Orthanc:
tests/e2e/test_dicom_forwarding.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.dicom.spool import Spool, SpoolEntry
from dicomproxy.dicom.spool_api import build_spool_api

CT = "1.2.840.10008.5.1.4.1.1.2"


class Client:
    """A blocking face on httpx's ASGI transport (the API's handlers hop to threads)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def _call(self, method: str, path: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await client.request(method, path)

        return asyncio.run(go())

    def get(self, path: str) -> httpx.Response:
        return self._call("GET", path)

    def post(self, path: str) -> httpx.Response:
        return self._call("POST", path)

    def delete(self, path: str) -> httpx.Response:
        return self._call("DELETE", path)


def _client(tmp_path: Path) -> tuple[Client, Spool, list[SpoolEntry]]:
    spool = Spool(tmp_path)
    spool.open()
    queued: list[SpoolEntry] = []
    snapshot = lambda limit: [{"destination": "PACS@127.0.0.1:4242", "studies": [], "limit": limit}]  # noqa: E731
    return Client(build_spool_api(spool, snapshot, queued.append)), spool, queued


def _fail(spool: Spool, uid: str) -> str:
    entry = spool.put(b"\x08\x00\x16\x00" + b"x" * 10, sop_class=CT, sop_instance=uid,
                      transfer_syntax=ExplicitVRLittleEndian, study="1.2.3", origin={"CallingAE": "CT01"})
    entry.attempts = 3
    entry.failed_attempt("status 0xA700", 1.0, 0.0)
    return spool.fail(entry, "gave up after 3 attempts", status=0xA700).stem


def test_failed_instances_are_listed_retried_and_discarded(tmp_path: Path) -> None:
    client, spool, queued = _client(tmp_path)
    first, second = _fail(spool, "1.2.3.4"), _fail(spool, "1.2.3.5")
    body = client.get("/dicomproxy/spool").json()
    assert body["depth"] == 0 and body["failed"] == 2 and body["destinations"][0]["limit"] == 100
    listed: Any = client.get("/dicomproxy/spool/failed?limit=1&offset=1").json()
    assert listed["total"] == 2 and [n["id"] for n in listed["items"]] == [second]
    note = listed["items"][0]
    assert note["attempts"] == 3 and note["status"] == 0xA700 and note["origin"] == {"CallingAE": "CT01"}
    assert note["firstError"] == "status 0xA700" and note["SOPInstanceUID"] == "1.2.3.5"
    r = client.post(f"/dicomproxy/spool/failed/{first}/retry")
    assert r.status_code == 200 and r.json()["SOPInstanceUID"] == "1.2.3.4"
    assert [e.sop_instance for e in queued] == ["1.2.3.4"] and queued[0].attempts == 0
    assert queued[0].seq > int(second.split("-")[0])  # a new sequence number, after every failed one
    assert spool.depth == 1 and spool.failed_count == 1
    assert client.post(f"/dicomproxy/spool/failed/{first}/retry").status_code == 404
    assert client.delete(f"/dicomproxy/spool/failed/{second}").status_code == 204
    assert client.delete(f"/dicomproxy/spool/failed/{second}").status_code == 404
    assert client.get("/dicomproxy/spool/failed").json()["total"] == 0
    assert not list((tmp_path / "failed").iterdir())


def test_bad_ids_and_limits_are_refused(tmp_path: Path) -> None:
    client, spool, _ = _client(tmp_path)
    for path in ("/dicomproxy/spool?limit=1001", "/dicomproxy/spool/failed?limit=-1",
                 "/dicomproxy/spool/failed?offset=x"):
        r = client.get(path)
        assert r.status_code == 400 and "must be a whole number" in r.json()["error"], path
    for failed_id in ("..%2Fqueue%2F000000000001", "000000000001-..", "x" * 200):
        assert client.delete(f"/dicomproxy/spool/failed/{failed_id}").status_code == 404, failed_id
    # a file in failed/ that is not a spool file cannot be queued again
    (tmp_path / "failed" / "unreadable-000000000009.dcm").write_bytes(b"not DICOM")
    r = client.post("/dicomproxy/spool/failed/unreadable-000000000009/retry")
    assert r.status_code == 409 and "cannot be queued again" in r.json()["error"]
    assert client.get("/dicomproxy/spool/failed").json()["items"][0]["reason"] == "unreadable spool file (no note)"
    spool.close()
