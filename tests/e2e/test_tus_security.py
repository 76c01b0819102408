"""Multi-user TUS through the whole stack (issue 10, item 3): a gateway process with basic-auth
users alice and bob and an admin, in front of a real Orthanc; tuspy, tus-js-client and raw HTTP.

An upload belongs to the user who created it. Anyone else gets what an unknown id gets (404
``ERR_UPLOAD_NOT_FOUND``) for HEAD, PATCH, GET, DELETE and as a partial of a concatenation;
an admin may do everything. Downloads are off unless ``Tus:AllowDownload``. The import tasks
at ``/dicomproxy/tasks`` are listed to their owner and to admins only.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from tusclient import client as tus_client

from tests.peers import GatewayProcess, OrthancServer, run_node, wait_until
from tests.tus.test_support import OCTET, TUS, RawRequest, upload_id, wait_file_size

GatewayFactory = Callable[..., GatewayProcess]
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}
USERS = {"alice": "alice-pw", "bob": "bob-pw", "root": {"Password": "root-pw", "Roles": ["admin"]}}


def auth(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def as_user(user: str) -> dict[str, str]:
    return {**TUS, **auth(user)}


def start(gateway_factory: GatewayFactory, tus: dict[str, Any] | None = None, **kw: Any) -> GatewayProcess:
    return gateway_factory({"Authentication": {"Users": USERS}, "Tus": tus or {}}, **kw)


def create(gw: GatewayProcess, user: str, length: int, extra: dict[str, str] | None = None) -> str:
    r = requests.post(gw.url + "/files/", headers={**as_user(user), "Upload-Length": str(length), **(extra or {})},
                      timeout=10)
    assert r.status_code == 201, r.text
    return str(r.headers["Location"])


def patch(url: str, user: str, offset: int, data: bytes) -> requests.Response:
    return requests.patch(url, data=data, timeout=30, headers={
        **as_user(user), "Content-Type": OCTET, "Upload-Offset": str(offset)})


def answer(r: requests.Response) -> tuple[int, str, str | None]:
    return r.status_code, r.text, r.headers.get("Content-Type")


def tasks(gw: GatewayProcess, user: str) -> list[dict[str, Any]]:
    r = requests.get(gw.url + "/dicomproxy/tasks", headers=auth(user), timeout=10)
    assert r.status_code == 200, r.text
    return [t for t in r.json() if t["kind"] == "tus-import"]


def test_another_user_gets_404_for_every_method_and_an_admin_may(gateway_factory: GatewayFactory) -> None:
    gw = start(gateway_factory, {"AllowDownload": True})
    url = create(gw, "alice", 10)
    assert patch(url, "alice", 0, b"abcd").status_code == 204
    unknown = gw.url + "/files/" + "0" * 32
    for method in ("HEAD", "PATCH", "GET", "DELETE"):
        hdrs = {**as_user("bob"), "Content-Type": OCTET, "Upload-Offset": "4"}
        theirs = requests.request(method, url, headers=hdrs, data=b"EVIL" if method == "PATCH" else None, timeout=10)
        nobodys = requests.request(method, unknown, headers=hdrs, data=b"EVIL" if method == "PATCH" else None,
                                   timeout=10)
        assert theirs.status_code == 404, (method, theirs.text)
        assert answer(theirs) == answer(nobodys), method  # nothing tells bob the upload exists
        if method != "HEAD":
            assert theirs.text == "ERR_UPLOAD_NOT_FOUND: upload not found\n"
    # Nothing of bob's reached the upload.
    head = requests.head(url, headers=as_user("alice"), timeout=10)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "4"
    # An admin may read, download and delete it.
    assert requests.head(url, headers=as_user("root"), timeout=10).headers["Upload-Offset"] == "4"
    got = requests.get(url, headers=as_user("root"), timeout=10)
    assert got.status_code == 200 and got.content == b"abcd"
    assert requests.get(url, headers=as_user("alice"), timeout=10).content == b"abcd"
    assert patch(url, "root", 4, b"ef").status_code == 204
    assert patch(url, "alice", 6, b"ghij").status_code == 204
    assert requests.get(url, headers=as_user("alice"), timeout=10).content == b"abcdefghij"
    assert requests.delete(url, headers=as_user("root"), timeout=10).status_code == 204
    assert requests.head(url, headers=as_user("alice"), timeout=10).status_code == 404
    assert "may not access upload" in gw.log_text()


def test_owner_is_recorded_in_the_info_file_and_metadata_cannot_forge_it(gateway_factory: GatewayFactory) -> None:
    gw = start(gateway_factory)
    forged = base64.b64encode(b"bob").decode()
    url = create(gw, "alice", 3, {"Upload-Metadata": f"Owner {forged},owner {forged}"})
    info = json.loads((gw.data_dir / "tus" / f"{upload_id(url)}.info").read_text())
    assert info["Storage"]["Owner"] == "alice"
    assert info["MetaData"] == {"Owner": "bob", "owner": "bob"}
    assert requests.head(url, headers=as_user("bob"), timeout=10).status_code == 404


def test_downloads_are_off_by_default(gateway_factory: GatewayFactory) -> None:
    gw = start(gateway_factory)
    url = create(gw, "alice", 4)
    assert patch(url, "alice", 0, b"data").status_code == 204
    for user in ("alice", "root"):
        r = requests.get(url, headers=as_user(user), timeout=10)
        assert r.status_code == 405 and r.headers["Allow"] == "HEAD, PATCH, DELETE", user
    assert requests.options(gw.url + "/files/", headers=auth("alice"), timeout=10).status_code == 200


def test_a_non_owner_cannot_interrupt_the_owners_patch(gateway_factory: GatewayFactory) -> None:
    """Asking for an upload's lock interrupts the PATCH holding it: the owner check comes first."""
    gw = start(gateway_factory)
    data = os.urandom(2 * 1024 * 1024)
    url = create(gw, "alice", len(data))
    uid = upload_id(url)
    req = RawRequest(gw.http_port, "PATCH", f"/files/{uid}", {
        **as_user("alice"), "Content-Type": OCTET, "Upload-Offset": "0", "Content-Length": str(len(data))})
    try:
        req.send(data[: 1024 * 1024])
        wait_file_size(gw.data_dir / "tus" / uid, 1024 * 1024)  # the PATCH holds the lock, its bytes on disk
        for method in ("HEAD", "DELETE"):
            assert requests.request(method, url, headers=as_user("bob"), timeout=10).status_code == 404
        req.send(data[1024 * 1024:])
        status, headers, body = req.response()
    finally:
        req.close()
    assert status == 204, body
    assert headers["upload-offset"] == str(len(data))
    assert (gw.data_dir / "tus" / uid).read_bytes() == data


def test_concatenation_only_of_own_partials_each_once(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any
) -> None:
    gw = start(gateway_factory)
    dicom, sop_uid = dicom_samples.make_instance(patient_id="CAT1", patient_name="Concat^One")
    half = len(dicom) // 2
    parts = {}
    for name, user, data in (("a1", "alice", dicom[:half]), ("a2", "alice", dicom[half:]), ("b1", "bob", b"bob")):
        url = create(gw, user, len(data), {"Upload-Concat": "partial"})
        assert patch(url, user, 0, data).status_code == 204
        parts[name] = upload_id(url)
    folder = gw.data_dir / "tus"
    before = sorted(p.name for p in folder.iterdir())

    def final(user: str, *names: str) -> requests.Response:
        value = "final;" + " ".join(f"/files/{parts[n]}" for n in names)
        return requests.post(gw.url + "/files/", headers={**as_user(user), "Upload-Concat": value}, timeout=10)

    repeated = final("alice", "a1", "a1")
    assert repeated.status_code == 400 and repeated.text.startswith("ERR_INVALID_CONCAT: ")
    assert "more than once" in repeated.text
    foreign = final("alice", "a1", "b1")
    assert foreign.status_code == 404 and foreign.text == "ERR_UPLOAD_NOT_FOUND: upload not found\n"
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing was created for either
    ok = final("alice", "a1", "a2")
    assert ok.status_code == 201
    fresh_orthanc.wait_for_instances(1, timeout=30)
    assert fresh_orthanc.sop_instance_uids() == {sop_uid}
    assert [t["owner"] for t in tasks(gw, "alice")] == ["alice"]
    assert final("root", "a1", "b1").status_code == 201  # an admin may combine anyone's partials


def test_import_tasks_are_listed_to_their_owner_and_admins(
    gateway_factory: GatewayFactory, fresh_orthanc: OrthancServer, dicom_samples: Any, tmp_path: Path
) -> None:
    gw = start(gateway_factory)
    uids = {}
    for user in ("alice", "bob"):
        path, uids[user] = dicom_samples.make_instance(tmp_path / f"{user}.dcm", patient_id=user.upper(),
                                                       patient_name=f"{user}^Tus")
        client = tus_client.TusClient(gw.url + "/files/", headers=auth(user))
        client.uploader(str(path), chunk_size=1 << 20, metadata={"filename": f"{user}.dcm"}).upload()
    def both_done() -> list[dict[str, Any]]:
        done = [t for t in tasks(gw, "root") if t["state"] == "done"]
        return done if len(done) == 2 else []

    done = wait_until(both_done, timeout=60, what="both imports to finish")
    by_owner = {t["owner"]: t for t in done}
    assert set(by_owner) == {"alice", "bob"}
    assert fresh_orthanc.sop_instance_uids() == set(uids.values())
    for user, other in (("alice", "bob"), ("bob", "alice")):
        mine = tasks(gw, user)
        assert [t["id"] for t in mine] == [by_owner[user]["id"]]
        assert mine[0]["args"]["filename"] == f"{user}.dcm"
        theirs = requests.get(f"{gw.url}/dicomproxy/tasks/{by_owner[other]['id']}", headers=auth(user), timeout=10)
        assert theirs.status_code == 404 and theirs.json() == {"error": "no such task"}
        own = requests.get(f"{gw.url}/dicomproxy/tasks/{by_owner[user]['id']}", headers=auth(user), timeout=10)
        assert own.status_code == 200 and own.json()["result"]["sopInstanceUids"] == [uids[user]]


RESUME_JS = r"""
// tus-js-client handed another user's upload URL (a shared workstation's browser storage).
const fs = require('fs');
const tus = require('tus-js-client');
const [endpoint, file, uploadUrl, authorization] = process.argv.slice(1);
const upload = new tus.Upload(fs.readFileSync(file), {
  endpoint, uploadUrl, headers: { Authorization: authorization }, retryDelays: [],
  onSuccess() { console.log(JSON.stringify({ ok: true, url: upload.url })); },
  onError(err) { console.log(JSON.stringify({ ok: false, error: String(err) })); process.exitCode = 1; },
});
upload.start();
"""


def test_tus_js_client_given_someone_elses_url_starts_its_own_upload(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = start(gateway_factory, {"KeepAfterImport": True})
    alices = create(gw, "alice", 100)
    assert patch(alices, "alice", 0, b"a" * 40).status_code == 204
    payload = tmp_path / "bob.bin"
    payload.write_bytes(os.urandom(50_000))
    proc = run_node(RESUME_JS, gw.url + "/files/", str(payload), alices, auth("bob")["Authorization"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"], proc.stdout
    assert result["url"] != alices  # a 404 on resume: tus-js-client created a new upload
    bobs = gw.data_dir / "tus" / upload_id(result["url"])
    assert bobs.read_bytes() == payload.read_bytes()
    assert json.loads(bobs.with_suffix(".info").read_text())["Storage"]["Owner"] == "bob"
    assert (gw.data_dir / "tus" / upload_id(alices)).read_bytes() == b"a" * 40  # alice's untouched
