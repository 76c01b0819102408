"""The rest of Orthanc's Lua API through the real stack (the gateway process, a real Orthanc,
dcmtk's storescu): ``ReceivedCStoreInstanceFilter``, ``LuaScripts``, the Toolbox.lua helpers,
``CallSystem``, the transfer-syntax callbacks Orthanc 1.9.0 removed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom

from tests import dicom_samples
from tests.e2e.test_dicom_gateway import make_files, storescu
from tests.peers import OrthancServer, wait_until

FAST = {"Orthanc": {"PollIntervalSeconds": 0.2}, "Lua": {"ReloadIntervalMs": 200}}

# The Orthanc sample's shape (OrthancServer/Resources/Samples/Lua): 0 accepts, a DIMSE status refuses.
CSTORE_FILTER = """
function ReceivedCStoreInstanceFilter(dicom, origin, info)
  print('cstore filter', origin.RemoteAet, origin.CalledAet, dicom.PatientID, tostring(info.HasPixelData))
  if origin.RemoteAet == 'FULLMOD' then
    return 0xA700  -- out of resources
  elseif dicom.PatientID == 'WARN' then
    return 0xB000  -- any non-zero status discards the instance
  elseif dicom.PatientID == 'BROKEN' then
    return 'yes'
  end
  return 0
end
"""


def test_received_cstore_instance_filter_gives_the_modality_its_status(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory(scripts={"main.lua": CSTORE_FILTER})
    ((ok, ok_uid),) = make_files(tmp_path / "ok", 1)
    ((warn, _),) = make_files(tmp_path / "warn", 1, patient_id="WARN")
    ((broken, _),) = make_files(tmp_path / "broken", 1, patient_id="BROKEN")

    full = storescu(gateway, ok, calling="FULLMOD", check=False)
    assert full.returncode != 0 and "Refused: OutOfResources" in full.stderr, full.stderr  # 0xA700
    gateway.wait_for_log("Lua says: cstore filter, FULLMOD, DICOMPROXY, PGW, true")
    warned = storescu(gateway, warn, check=False)
    assert "Warning: CoercionOfDataElements" in warned.stderr, warned.stderr  # 0xB000
    failed = storescu(gateway, broken, check=False)
    assert "Unknown Status: 0x110" in failed.stderr, failed.stderr  # Processing Failure: a script failure
    assert "ReceivedCStoreInstanceFilter must return a DIMSE status number" in gateway.log_text()

    storescu(gateway, ok, calling="CT01")  # 0: accepted and forwarded
    fresh_orthanc.wait_for_instances(1)
    assert fresh_orthanc.sop_instance_uids() == {ok_uid}  # none of the refused ones reached the PACS


EXTRA_A = """
function Which() return 'a' end
function OnlyInA() return 'only a' end
"""
EXTRA_B = """
function Which() return 'b' end
"""


def test_lua_scripts_load_in_order_later_wins_and_reload(gateway_factory: Any) -> None:
    main = ("function Initialize()\n"
            "  print('init', Which(), OnlyInA(), Main(), #GetOrthancConfiguration().LuaScripts)\n"
            "end\n"
            "function Main() return 'main' end\n")
    gateway = gateway_factory(
        {**FAST, "Orthanc": {**FAST["Orthanc"], "LuaScripts": ["scripts/a.lua", "scripts/b.lua"]}},
        {"main.lua": main, "a.lua": EXTRA_A, "b.lua": EXTRA_B},
    )
    gateway.wait_for_log("Lua says: init, b, only a, main, 2")
    gateway.write_script("b.lua", EXTRA_B.replace("'b'", "'b2'"))  # an edit of a listed script reloads
    gateway.wait_for_log("Lua says: init, b2, only a, main, 2")
    gateway.write_script("a.lua", "function Which() return 'a' end\nfunction OnlyInA( return end\n")
    log = gateway.wait_for_log("failed to load (keeping the previous version)")
    assert "a.lua:2:" in log  # the error names the file and the line
    status = gateway.get("/dicomproxy/health").json()
    assert "a.lua:2:" in str(status), status


def test_lua_scripts_missing_file_is_named(gateway_factory: Any) -> None:
    gateway = gateway_factory({"Orthanc": {"LuaScripts": ["scripts/nope.lua"]}}, {"main.lua": "x = 1\n"})
    log = gateway.wait_for_log("failed to load")
    assert "nope.lua: cannot read: no such file (listed in Orthanc:LuaScripts)" in log


TOOLBOX = """
function IsJpegTransferSyntaxAccepted(aet, ip) return false end
function IsUnknownSopClassAccepted(aet, ip) return true end
function Initialize()
  _InitializeJob()
  table.insert(_AccessJob(), 'x')
  print('job', #_AccessJob(), tostring(_job == _AccessJob()))
  print('exit', CallSystem('sh', {'-c', 'exit 3'}), CallSystem('true'))
  print('same', type(ModifyResource))
end
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags.PatientID == 'CALLSYS' then
    local r = CallSystem(instanceId, 'sh', {'-c', 'cp "$1" "$0"', 'OUT'})
    print('callsystem returned', r)
  elseif tags.PatientID == 'CALLFAIL' then
    local ok, err = pcall(CallSystem, instanceId, 'sh', {'-c', 'echo nope >&2; exit 7'})
    print('callsystem failed', tostring(ok), err)
  end
end
"""


def test_toolbox_call_system_and_removed_callbacks(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    out = tmp_path / "copy.dcm"
    gateway = gateway_factory(FAST, {"main.lua": TOOLBOX.replace("OUT", str(out))})
    log = gateway.wait_for_log("Lua says: same, function")
    assert "Lua says: job, 1, true" in log and "Lua says: exit, 3, 0" in log
    for name in ("IsJpegTransferSyntaxAccepted", "IsUnknownSopClassAccepted"):
        assert log.count(f"defines {name}(): Orthanc removed the transfer-syntax callbacks in 1.9.0") == 1
    assert "IsRleTransferSyntaxAccepted" not in log

    raw, _ = dicom_samples.make_instance(patient_id="CALLSYS", patient_name="Call^System")
    iid = fresh_orthanc.upload(raw)["ID"]
    gateway.wait_for_log(f"Lua says: callsystem returned, {iid}", timeout=15)
    assert out.read_bytes() == fresh_orthanc.request("GET", f"/instances/{iid}/file").content
    leftovers = wait_until(lambda: not list((gateway.data_dir / "orthanc" / "tmp").glob("*")) or None,
                           what="CallSystem's temporary file removed")
    assert leftovers

    raw, _ = dicom_samples.make_instance(patient_id="CALLFAIL", patient_name="Call^Fail")
    fresh_orthanc.upload(raw)
    log = gateway.wait_for_log("Lua says: callsystem failed, false", timeout=15)
    assert "exit code 7: nope" in log


# --------------------------------------------------------------------------- ReceivedInstanceFilter over HTTP
UPLOAD_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('upload filter', dicom.PatientID, origin.RequestOrigin, tostring(info.HasPixelData), info.TransferSyntaxUID)
  return dicom.PatientID ~= 'REFUSE'
end
"""
MULTIPART = 'multipart/related; type="application/dicom"; boundary={b}'


def stow_body(parts: list[bytes], boundary: str = "gw-test-boundary") -> tuple[bytes, dict[str, str]]:
    out = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                   for p in parts)
    return out + b"--" + boundary.encode() + b"--\r\n", {"Content-Type": MULTIPART.format(b=boundary),
                                                         "Accept": "application/dicom+json"}


def sample(patient: str, **kw: Any) -> tuple[bytes, str]:
    raw, uid = dicom_samples.make_instance(patient_id=patient, patient_name="Over^Http", **kw)
    assert isinstance(raw, bytes)
    return raw, uid


def stored_file(orthanc: OrthancServer, sop_uid: str) -> bytes:
    found = orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    assert len(found) == 1, f"{sop_uid} not in Orthanc"
    return orthanc.request("GET", f"/instances/{found[0]}/file").content


def test_received_instance_filter_over_rest_answers_as_orthanc(
    gateway_factory: Any, fresh_orthanc: OrthancServer, orthanc_factory: Any, tmp_path: Path
) -> None:
    script = tmp_path / "filter.lua"
    script.write_text(UPLOAD_FILTER)
    reference = orthanc_factory(extra_config={"LuaScripts": [str(script)]})  # Orthanc itself, same script
    gateway = gateway_factory(scripts={"main.lua": UPLOAD_FILTER})
    refused, refused_uid = sample("REFUSE")
    answer = gateway.post("/instances", data=refused)
    expected = reference.request("POST", "/instances", data=refused)
    assert (answer.status_code, answer.json()) == (expected.status_code, expected.json())
    assert answer.json()["Status"] == "FilteredOut"
    gateway.wait_for_log("Lua says: upload filter, REFUSE, RestApi, true, 1.2.840.10008.1.2.1")

    accepted, accepted_uid = sample("ACCEPT")
    ok = gateway.post("/instances", data=accepted)
    assert ok.status_code == 200 and ok.json()["Status"] == "Success", ok.text
    assert fresh_orthanc.sop_instance_uids() == {accepted_uid}  # the refused one never reached the PACS
    assert stored_file(fresh_orthanc, accepted_uid) == accepted

    zipped = gateway.post("/instances", data=b"PK\x03\x04" + b"\0" * 100)
    assert zipped.status_code == 415 and "ZIP" in zipped.json()["message"]
    junk = gateway.post("/instances", data=b"x" * 300)
    assert junk.status_code == 400 and "not a DICOM file" in junk.json()["message"]

    gateway.write_script("main.lua", "function ReceivedInstanceFilter(dicom, origin, info) return 'maybe' end\n")
    gateway.wait_for_log("main.lua loaded; callbacks: ReceivedInstanceFilter")
    failed = gateway.post("/instances", data=sample("ACCEPT")[0])
    assert failed.status_code == 500 and "must return true or false" in failed.json()["message"]
    assert len(fresh_orthanc.sop_instance_uids()) == 1  # a failing filter fails closed (Lua:FailOpen is false)


def proxied_count(gateway: Any) -> float:
    metrics = gateway.get("/dicomproxy/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("dicomproxy_proxy_requests_total{"))


def test_received_instance_filter_over_stow(gateway_factory: Any, fresh_orthanc: OrthancServer) -> None:
    gateway = gateway_factory(scripts={"main.lua": UPLOAD_FILTER})
    (a, a_uid), (r, r_uid), (c, c_uid) = sample("ACCEPT"), sample("REFUSE"), sample("ACCEPT", size=(300, 300))
    body, headers = stow_body([a, r, c])
    answer = gateway.post("/dicom-web/studies", data=body, headers=headers)
    assert answer.status_code == 202, answer.text
    doc = answer.json()
    assert [i["00081155"]["Value"][0] for i in doc["00081198"]["Value"]] == [r_uid]
    assert doc["00081198"]["Value"][0]["00081197"]["Value"] == [0x0110]
    assert {i["00081155"]["Value"][0] for i in doc["00081199"]["Value"]} == {a_uid, c_uid}
    assert fresh_orthanc.sop_instance_uids() == {a_uid, c_uid}
    assert stored_file(fresh_orthanc, a_uid) == a and stored_file(fresh_orthanc, c_uid) == c

    proxied = proxied_count(gateway)
    only, headers = stow_body([sample("REFUSE")[0]])
    alone = gateway.post("/dicom-web/studies", data=only, headers=headers)
    assert alone.status_code == 400 and len(alone.json()["00081198"]["Value"]) == 1
    assert proxied_count(gateway) == proxied  # a single refused part: the PACS was not called
    assert fresh_orthanc.instance_count() == 2

    passing, headers = stow_body([sample("ACCEPT")[0]])
    assert gateway.post("/dicom-web/studies", data=passing, headers=headers).status_code == 200
    assert fresh_orthanc.instance_count() == 3

    (x, x_uid), (y, y_uid) = sample("ACCEPT"), sample("REFUSE")
    body, headers = stow_body([x, y])
    xml = gateway.post("/dicom-web/studies", data=body, headers={**headers, "Accept": "application/dicom+xml"})
    assert xml.status_code == 202 and xml.headers["content-type"].startswith("application/dicom+xml"), xml.text
    failed = xml.text.split('keyword="FailedSOPSequence"')[1].split('keyword="ReferencedSOPSequence"')[0]
    assert y_uid in failed and x_uid not in failed and ">272<" in failed
    only, headers = stow_body([sample("REFUSE")[0]])
    alone = gateway.post("/dicom-web/studies", data=only, headers={**headers, "Accept": "application/dicom+xml"})
    assert alone.status_code == 400 and "FailedSOPSequence" in alone.text


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


def test_a_300_mb_stow_is_filtered_in_streaming(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    """Three ~100 MB instances in one STOW-RS request, the first refused: the gateway's peak RSS
    grows by far less than one instance, and the two accepted are stored byte for byte."""
    import hashlib

    gateway = gateway_factory(scripts={"main.lua": UPLOAD_FILTER})
    files = []
    for i, patient in enumerate(("REFUSE", "ACCEPT", "ACCEPT")):
        raw, uid = sample(patient)
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.Rows = ds.Columns = 7100  # ~100 MB of 16-bit pixels, written without computing them one by one
        ds.PixelData = bytes(range(256)) * (7100 * 7100 * 2 // 256) + bytes(7100 * 7100 * 2 % 256)
        ds.save_as(tmp_path / f"big{i}.dcm")
        files.append((tmp_path / f"big{i}.dcm", uid))
    total = sum(p.stat().st_size for p, _ in files)
    assert total > 300_000_000
    boundary = b"big-stow-boundary"

    def body() -> Any:
        for path, _ in files:
            yield b"--" + boundary + b"\r\nContent-Type: application/dicom\r\n\r\n"
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk
            yield b"\r\n"
        yield b"--" + boundary + b"--\r\n"

    assert gateway.proc is not None
    before = _peak_rss_mb(gateway.proc.pid)
    answer = gateway.post("/dicom-web/studies", data=body(), timeout=300, headers={
        "Content-Type": MULTIPART.format(b=boundary.decode()), "Accept": "application/dicom+json"})
    assert answer.status_code == 202, answer.text
    growth = _peak_rss_mb(gateway.proc.pid) - before
    print(f"peak RSS {before:.0f} MB -> +{growth:.0f} MB for {total / 1e6:.0f} MB")
    assert growth < 64, f"the gateway's peak RSS grew by {growth:.0f} MB for a {total / 1e6:.0f} MB upload"
    assert [i["00081155"]["Value"][0] for i in answer.json()["00081198"]["Value"]] == [files[0][1]]
    assert fresh_orthanc.sop_instance_uids() == {files[1][1], files[2][1]}
    for path, uid in files[1:]:
        assert hashlib.sha256(stored_file(fresh_orthanc, uid)).digest() == hashlib.sha256(path.read_bytes()).digest()


LUA_STORES = UPLOAD_FILTER + """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags.PatientID ~= 'ACCEPT' or origin.RequestOrigin == 'Lua' then return end
  local refused = RestApiPost('/instances/' .. instanceId .. '/modify',
                              DumpJson({Replace = {PatientID = 'REFUSE'}, Force = true}, true))
  print('lua upload', ParseJson(RestApiPost('/instances', refused)).Status)
  local ok, err = pcall(ModifyInstance, instanceId, {PatientID = 'REFUSE'}, {}, false)
  print('lua modify', tostring(ok), err)
  print('lua keeps', ParseJson(RestApiPost('/instances', RestApiGet('/instances/' .. instanceId .. '/file'))).Status)
end
"""


def test_received_instance_filter_sees_what_scripts_store(gateway_factory: Any, fresh_orthanc: OrthancServer) -> None:
    gateway = gateway_factory(FAST, {"main.lua": LUA_STORES})
    raw, uid = sample("ACCEPT")
    fresh_orthanc.upload(raw)
    log = gateway.wait_for_log("Lua says: lua keeps, Success", timeout=20)  # accepted (the PACS overwrites)
    assert "Lua says: upload filter, REFUSE, Lua, true" in log and "Lua says: lua upload, FilteredOut" in log
    assert "Lua says: lua modify, false" in log and "ReceivedInstanceFilter refused the modified instance" in log
    assert fresh_orthanc.sop_instance_uids() == {uid}
