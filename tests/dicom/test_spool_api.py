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


def _fail(spool: Spool, uid: str, study: str = "1.2.3", reason: str = "gave up after 3 attempts",
          status: int = 0xA700) -> str:
    entry = spool.put(b"\x08\x00\x16\x00" + b"x" * 10, sop_class=CT, sop_instance=uid,
                      transfer_syntax=ExplicitVRLittleEndian, study=study, origin={"CallingAE": "CT01"})
    entry.attempts = 3
    entry.failed_attempt("status 0xA700", 1.0, 0.0)
    return spool.fail(entry, reason, status=status).stem


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


def test_the_failed_folder_is_grouped_by_study_paged_and_handled_a_study_at_a_time(tmp_path: Path) -> None:
    """2 000 failed instances of 3 studies: a page of 3 groups (counts, bytes, the top reasons),
    not 2 000 rows; a study's instances page by page; a study retried or discarded in one call."""
    client, spool, queued = _client(tmp_path)
    for i in range(1990):
        _fail(spool, f"1.2.3.{i}", study="1.1", reason=f"refused {i % 5}")
    first_b = _fail(spool, "1.2.4.1", study="2.2", reason="status 0xC000", status=0xC000)
    for i in range(9):
        _fail(spool, f"1.2.5.{i}", study="3.3")
    again = Spool(tmp_path)  # a restart: the index is built from the notes on the first request
    again.open()
    client = Client(build_spool_api(again, lambda limit: {}, queued.append))
    page = client.get("/dicomproxy/spool/failed/studies?limit=2").json()
    assert page["studies"] == 3 and page["instances"] == 2000 and len(page["groups"]) == 2
    big, b = page["groups"]
    assert big["study"] == "1.1" and big["instances"] == 1990 and big["bytes"] > 1990 * 14
    assert len(big["reasons"]) == 3 and big["otherReasons"] == 2 and big["reasons"][0]["instances"] == 398
    assert big["statuses"] == [0xA700] and big["attempts"] == 3 and big["callingAe"] == "CT01"
    assert b["study"] == "2.2" and b["firstId"] == first_b and b["reasons"] == [{"reason": "status 0xC000",
                                                                                  "instances": 1}]
    assert client.get("/dicomproxy/spool/failed/studies?offset=2").json()["groups"][0]["study"] == "3.3"
    one = client.get("/dicomproxy/spool/failed?study=3.3&limit=4&offset=8").json()
    assert one["total"] == 9 and [n["SOPInstanceUID"] for n in one["items"]] == ["1.2.5.8"]
    r = client.post("/dicomproxy/spool/failed/studies/3.3/retry")
    assert r.status_code == 200 and r.json() == {"queued": 9, "refused": [], "left": 0}
    assert len(queued) == 9 and again.failed_count == 1991 and again.depth == 9
    r = client.delete("/dicomproxy/spool/failed/studies/2.2")
    assert r.status_code == 200 and r.json()["discarded"] == 1
    assert client.delete("/dicomproxy/spool/failed/studies/2.2").status_code == 404
    assert client.post("/dicomproxy/spool/failed/studies/9.9/retry").status_code == 404
    page = client.get("/dicomproxy/spool/failed/studies").json()
    assert page["studies"] == 1 and page["instances"] == 1990 == again.failed_count
    assert client.get("/dicomproxy/spool/failed/studies?limit=1001").status_code == 400
    again.close()
