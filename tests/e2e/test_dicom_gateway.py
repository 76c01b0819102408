"""The DICOM side through the real stack: dcmtk tools against the gateway process, a real
Orthanc as the PACS (checked over its REST API), storescp as a C-MOVE / send destination."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pydicom

from dicomproxy.dicom import datasets
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul import pdu as pdus
from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, dcmtk, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
FAST_RETRY = {"ForwardRetrySeconds": 0.2, "ForwardMaxRetrySeconds": 0.5}


def storescu(gateway: GatewayProcess, *paths: Path, check: bool = True, calling: str = "MODALITY") -> Any:
    return run_dcmtk(
        "storescu",
        "-v",
        "-aet",
        calling,
        "-aec",
        gateway.aet,
        LOOPBACK,
        str(gateway.dicom_port),
        *map(str, paths),
        check=check,
    )


def make_files(folder: Path, n: int, **kwargs: Any) -> list[tuple[Path, str]]:
    study = kwargs.pop("study_uid", None) or pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        path, uid = dicom_samples.make_instance(
            folder / f"IM{i:04d}.dcm",
            patient_id=kwargs.get("patient_id", "PGW"),
            patient_name="Gate^Way",
            study_uid=study,
            series_uid=series,
            InstanceNumber=i + 1,
            **{k: v for k, v in kwargs.items() if k != "patient_id"},
        )
        out.append((Path(path), uid))
    return out


def orthanc_tags(orthanc: OrthancServer, sop_uid: str) -> dict[str, Any]:
    found = orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    assert len(found) == 1, f"{sop_uid} not in Orthanc"
    return orthanc.rest_get(f"/instances/{found[0]}/simplified-tags")


def health(gateway: GatewayProcess) -> dict[str, Any]:
    return gateway.get("/dicomproxy/health").json()["dicom"]


# --------------------------------------------------------------------------- echo, store, hooks
def test_echo_store_and_health(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    echo_script = 'function onCEcho(assoc) LogInfo("echo from " .. assoc.CallingAE) end\n'
    gateway = gateway_factory(scripts={"main.lua": echo_script})
    run_dcmtk("echoscu", "-aet", "ECHOER", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port))
    gateway.wait_for_log("echo from ECHOER")
    files = make_files(tmp_path / "in", 5)
    rle, rle_uid = dicom_samples.make_instance(
        tmp_path / "rle.dcm", patient_id="PGW", patient_name="Gate^Way", transfer_syntax=pydicom.uid.RLELossless
    )
    # -xr: propose the file's own (compressed) syntax so the gateway must pass it through untouched
    storescu(gateway, *[p for p, _ in files])
    run_dcmtk("storescu", "-xr", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(rle))
    fresh_orthanc.wait_for_instances(6)
    assert fresh_orthanc.sop_instance_uids() == {u for _, u in files} | {rle_uid}
    found = fresh_orthanc.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": rle_uid}})
    assert fresh_orthanc.rest_get(f"/instances/{found[0]}/metadata/TransferSyntax") == pydicom.uid.RLELossless.encode()
    stored = fresh_orthanc.rest_get(f"/instances/{found[0]}/file")
    assert stored.endswith(Path(rle).read_bytes()[-200:])  # pixel data byte-identical
    h = wait_until(lambda: (d := health(gateway))["forwarded"] >= 6 and d, what="forwarded count in health")
    assert h["ok"] and h["spoolDepth"] == 0 and h["failed"] == 0 and h["upstream"].startswith(fresh_orthanc.aet)
    metrics = gateway.get("/dicomproxy/metrics").text
    assert "dicomproxy_dicom_forwarded_total 6" in metrics and "dicomproxy_dicom_spool_depth 0" in metrics


def test_parallel_associations(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    gateway = gateway_factory()
    batches = [make_files(tmp_path / f"m{i}", 20) for i in range(3)]  # three modalities, three studies
    procs = [
        subprocess.Popen(
            [
                dcmtk("storescu"),
                "-aet",
                f"MOD{i}",
                "-aec",
                gateway.aet,
                LOOPBACK,
                str(gateway.dicom_port),
                str(tmp_path / f"m{i}"),
                "+sd",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    fresh_orthanc.wait_for_instances(60)
    assert fresh_orthanc.sop_instance_uids() == {u for batch in batches for _, u in batch}


HOOKS = r"""
function onCStore(dataset, assoc)
  if dataset.PatientID == "REJECT" then return false end
  dataset.InstitutionName = "Edited by " .. assoc.CallingAE
  dataset["0008,1030"] = "STUDY DESC BY TAG"
  dataset.OtherPatientIDsSequence = { { PatientID = "ALT-1" } }
end
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == "FILTERED" then return false end
  return origin.RequestOrigin == "DicomProtocol" and info.TransferSyntaxUID ~= nil
end
function onInstanceStored(info, assoc)
  LogInfo("stored " .. info.SOPInstanceUID .. " from " .. assoc.CallingAE .. " status " .. tostring(info.Status))
end
function OnStoredInstance(instanceId, tags, metadata, origin)
  -- instanceId is Orthanc's own id, usable as Orthanc scripts use it
  local answer = ParseJson(RestApiGet("/instances/" .. instanceId))
  LogInfo("orthanc-style stored " .. answer.MainDicomTags.SOPInstanceUID .. " " .. tags.InstitutionName
    .. " " .. origin.RemoteAet)
end
"""


def test_hooks_edit_reject_and_report_stored(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory(scripts={"main.lua": HOOKS})
    ((path, uid),) = make_files(tmp_path / "ok", 1)
    ((bad, bad_uid),) = make_files(tmp_path / "bad", 1, patient_id="REJECT")
    ((filtered, filtered_uid),) = make_files(tmp_path / "filtered", 1, patient_id="FILTERED")
    storescu(gateway, path, calling="CT01")
    rejected = storescu(gateway, bad, check=False)
    assert rejected.returncode != 0
    assert "0x124" in rejected.stderr, rejected.stderr  # the refusal status (Not Authorized) reached it
    refused_by_filter = storescu(gateway, filtered, check=False)
    assert refused_by_filter.returncode != 0 and "0x124" in refused_by_filter.stderr
    fresh_orthanc.wait_for_instances(1)
    tags = orthanc_tags(fresh_orthanc, uid)
    assert tags["InstitutionName"] == "Edited by CT01"
    assert tags["StudyDescription"] == "STUDY DESC BY TAG"
    assert tags["OtherPatientIDsSequence"][0]["PatientID"] == "ALT-1"
    assert bad_uid != filtered_uid and fresh_orthanc.sop_instance_uids() == {uid}  # no refused one went on
    gateway.wait_for_log(f"stored {uid} from CT01 status 0")
    gateway.wait_for_log(f"orthanc-style stored {uid} Edited by CT01 CT01")


def test_one_transient_engine_per_association(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    transient = (
        'count = 0\nfunction onCStore(dataset, assoc) count = count + 1; dataset.ImageComments = "n=" .. count end\n'
    )
    gateway = gateway_factory(scripts={"main-transient.lua": transient})
    first = make_files(tmp_path / "a", 3)
    second = make_files(tmp_path / "b", 2)
    storescu(gateway, *[p for p, _ in first])  # one association for three instances
    storescu(gateway, *[p for p, _ in second])  # a new association: a fresh engine
    fresh_orthanc.wait_for_instances(5)
    comments = {u: orthanc_tags(fresh_orthanc, u)["ImageComments"] for _, u in first + second}
    assert sorted(comments[u] for _, u in first) == ["n=1", "n=2", "n=3"]
    assert sorted(comments[u] for _, u in second) == ["n=1", "n=2"]


def test_association_policy(gateway_factory: Any, fresh_orthanc: OrthancServer) -> None:
    script = 'function onDicomAssociation(assoc) return assoc.CallingAE ~= "BLOCKED" end\n'
    gateway = gateway_factory({"Dicom": {"AllowedCallingAets": ["GOOD", "BLOCKED"]}}, {"main.lua": script})
    port = str(gateway.dicom_port)
    assert run_dcmtk("echoscu", "-aet", "GOOD", "-aec", gateway.aet, LOOPBACK, port, check=False).returncode == 0
    refused = run_dcmtk("echoscu", "-aet", "BLOCKED", "-aec", gateway.aet, LOOPBACK, port, check=False)
    assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
    # the same policy on a Query/Retrieve association (served by qr/, on the requester's own address)
    find = ["-S", "-aec", gateway.aet, LOOPBACK, port, "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=NOBODY"]
    assert run_dcmtk("findscu", "-aet", "GOOD", *find, check=False).returncode == 0
    blocked = run_dcmtk("findscu", "-aet", "BLOCKED", *find, check=False)
    assert "Association Rejected" in blocked.stderr, blocked.stderr
    unknown = run_dcmtk("echoscu", "-aet", "STRANGER", "-aec", gateway.aet, LOOPBACK, port, check=False)
    assert unknown.returncode != 0 and "Calling AE Title Not Recognized" in unknown.stderr + unknown.stdout


# --------------------------------------------------------------------------- nothing lost
def test_pacs_down_during_burst_then_back_exactly_once(
    orthanc_factory: Any, gateway_factory: Any, tmp_path: Path
) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({"Dicom": FAST_RETRY}, orthanc=pacs)
    n = 150
    files = make_files(tmp_path / "burst", n)
    burst = subprocess.Popen(
        [dcmtk("storescu"), "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(tmp_path / "burst"), "+sd"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: pacs.instance_count() >= 20, timeout=30, interval=0.02, what="the burst to reach Orthanc")
        # The PACS crashes in the middle of the burst (a graceful stop would first finish the
        # gateway's open association, which keeps sending).
        pacs.kill()
        out, _ = burst.communicate(timeout=120)
    finally:
        if burst.poll() is None:
            burst.kill()
            burst.wait()
    assert burst.returncode == 0, out  # every instance was accepted, PACS or not
    h = wait_until(lambda: (d := health(gateway))["retrying"] and d, what="the forwarder to report retrying")
    assert h["ok"] is False and h["spoolDepth"] > 0 and h["lastForwardError"]
    pacs.start()
    pacs.wait_for_instances(n, timeout=60)
    # an entry leaves the spool only once the PACS acknowledged it: an empty spool means nothing is in flight
    wait_until(lambda: health(gateway)["spoolDepth"] == 0 and health(gateway)["ok"], what="an empty spool")
    assert pacs.instance_count() == n
    assert pacs.sop_instance_uids() == {u for _, u in files}
    # Each instance is in the PACS exactly once. Stores the PACS performed: n, plus at most the
    # one C-STORE in flight when it crashed (stored, but its answer lost, so sent again: the
    # PACS keys on SOPInstanceUID, it still holds one copy).
    changes = pacs.rest_get("/changes?limit=10000")["Changes"]
    assert n <= sum(1 for c in changes if c["ChangeType"] == "NewInstance") <= n + 1


def test_spool_survives_kill9(orthanc_factory: Any, gateway_factory: Any, tmp_path: Path) -> None:
    pacs = orthanc_factory()
    gateway = gateway_factory({"Dicom": FAST_RETRY}, orthanc=pacs)
    pacs.stop()
    files = make_files(tmp_path / "k9", 12)
    storescu(gateway, *[p for p, _ in files])
    assert health(gateway)["spoolDepth"] == 12
    gateway.kill9()
    queued = list((gateway.data_dir / "spool" / "queue").glob("*.dcm"))
    assert len(queued) == 12
    pydicom.dcmread(queued[0])  # spool files are plain DICOM files
    pacs.start()
    gateway.start()
    pacs.wait_for_instances(12, timeout=30)
    assert pacs.sop_instance_uids() == {u for _, u in files}
    wait_until(lambda: not list((gateway.data_dir / "spool" / "queue").glob("*.dcm")), what="an empty spool")


def test_refused_for_good_goes_to_failed_folder(orthanc_factory: Any, gateway_factory: Any, tmp_path: Path) -> None:
    # This PACS takes uncompressed syntaxes only; with Dicom:Transcode Never (the default) the gateway
    # does not transcode compressed data. The gateway is told not to ask the PACS at negotiation
    # (then the modality's RLE context would be refused at once, tests/e2e/test_dicom_relay.py), so
    # the refusal comes at forwarding time.
    pacs = orthanc_factory(extra_config={"AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]})
    no_probe = {**FAST_RETRY, "StoreMode": "StoreAndForward", "NegotiationCacheSeconds": 0}
    gateway = gateway_factory({"Dicom": no_probe}, orthanc=pacs)
    rle, uid = dicom_samples.make_instance(
        tmp_path / "rle.dcm", patient_id="PF", patient_name="F^F", transfer_syntax=pydicom.uid.RLELossless
    )
    run_dcmtk("storescu", "-xr", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port), str(rle))
    h = wait_until(lambda: (d := health(gateway))["failed"] == 1 and d, what="one failed instance")
    assert h["spoolDepth"] == 0 and "compressed" in h["lastForwardError"]
    failed = list((gateway.data_dir / "spool" / "failed").glob("*.dcm"))
    assert len(failed) == 1 and uid in failed[0].name
    assert "RLE" in failed[0].with_suffix(".json").read_text()
    gateway.wait_for_log("failed for good")
    assert "dicomproxy_dicom_forward_failed_total 1" in gateway.get("/dicomproxy/metrics").text


def test_forward_via_stow(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    gateway = gateway_factory({"Dicom": {"ForwardVia": "dicomweb"}})
    files = make_files(tmp_path / "stow", 6)
    storescu(gateway, *[p for p, _ in files])
    fresh_orthanc.wait_for_instances(6)
    assert fresh_orthanc.sop_instance_uids() == {u for _, u in files}
    assert health(gateway)["forwardVia"] == "dicomweb"


# --------------------------------------------------------------------------- C-FIND
FIND_HOOKS = r"""
function onCFind(query, assoc)
  if query.PatientID == "REWRITE-ME" then query.PatientID = "FINDA" end
end
function IncomingFindRequestFilter(query, origin)
  -- Orthanc's form: tags as "gggg,eeee", the filter returns the query to use
  if query["0010,0020"] == "ORTHANC-STYLE" then query["0010,0020"] = "FINDB" end
  return query
end
function onCFindResult(result, assoc)
  if result.PatientID == "FINDDROP" then return false end
  result.StudyDescription = "via " .. assoc.CalledAE
end
"""


def _findscu(port: int, aet: str, out: Path, *keys: str) -> list[pydicom.Dataset]:
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "-S",
        "-aet",
        "FINDER",
        "-aec",
        aet,
        LOOPBACK,
        str(port),
        "-X",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "-k",
        "StudyDescription",
    ]
    for k in keys:
        args += ["-k", k]
    run_dcmtk("findscu", *args)
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def test_cfind_matches_orthanc_and_hooks_edit(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    for pid in ("FINDA", "FINDB", "FINDDROP"):
        for _ in range(2):
            data, _uid = dicom_samples.make_instance(
                patient_id=pid,
                patient_name=f"Find^{pid}",
                study_uid=pydicom.uid.generate_uid(),
                StudyDescription="orig",
            )
            fresh_orthanc.upload(data)
    plain = gateway_factory()
    direct = _findscu(fresh_orthanc.dicom_port, fresh_orthanc.aet, tmp_path / "d", "PatientID=FIND*")
    through = _findscu(plain.dicom_port, plain.aet, tmp_path / "g", "PatientID=FIND*")
    key = lambda ds: (ds.StudyInstanceUID, ds.PatientID, ds.StudyDescription)  # noqa: E731
    assert len(direct) == 6 and sorted(map(key, through)) == sorted(map(key, direct))

    hooked = gateway_factory(scripts={"main.lua": FIND_HOOKS})
    edited = _findscu(hooked.dicom_port, hooked.aet, tmp_path / "h", "PatientID=FIND*")
    assert sorted(ds.PatientID for ds in edited) == ["FINDA", "FINDA", "FINDB", "FINDB"]
    assert {ds.StudyDescription for ds in edited} == {f"via {hooked.aet}"}
    rewritten = _findscu(hooked.dicom_port, hooked.aet, tmp_path / "r", "PatientID=REWRITE-ME")
    assert sorted(ds.PatientID for ds in rewritten) == ["FINDA", "FINDA"]
    orthanc_style = _findscu(hooked.dicom_port, hooked.aet, tmp_path / "o", "PatientID=ORTHANC-STYLE")
    assert sorted(ds.PatientID for ds in orthanc_style) == ["FINDB", "FINDB"]


# --------------------------------------------------------------------------- C-MOVE / C-GET
def _study_in_orthanc(orthanc: OrthancServer, n: int) -> tuple[str, set[str]]:
    study = pydicom.uid.generate_uid()
    uids = set()
    for i in range(n):
        data, uid = dicom_samples.make_instance(
            patient_id="PMOVE", patient_name="Move^Me", study_uid=study, InstanceNumber=i + 1
        )
        orthanc.upload(data)
        uids.add(uid)
    return study, uids


def _study_retrieve_args(calling_aet: str, gateway: Any, study: str) -> list[str]:
    """movescu/getscu arguments for a study-level retrieve from the gateway's DICOM side."""
    return [
        "-S", "-aet", calling_aet, "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
    ]


def test_cmove_to_storescp_and_unknown_destination(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any
) -> None:
    study, uids = _study_in_orthanc(fresh_orthanc, 5)
    dest = storescp_factory("MOVEDEST")
    script = 'function onCMove(request, assoc) LogInfo("move of " .. request.StudyInstanceUID) end\n'
    gateway = gateway_factory(
        {"Dicom": {"Modalities": {"dest": {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port}}}},
        {"main.lua": script},
    )
    common = _study_retrieve_args("MOVER", gateway, study)
    moved = run_dcmtk("movescu", "-v", "-aem", dest.aet, *common)
    files = dest.wait_for_files(5)
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in files} == uids
    out = moved.stdout + moved.stderr
    assert "Received Move Response 5 (Pending)" in out and "Final Move Response (Success)" in out
    gateway.wait_for_log(f"move of {study}")
    unknown = run_dcmtk("movescu", "-v", "-aem", "NOWHERE", *common, check=False)
    assert "Refused: MoveDestinationUnknown" in unknown.stderr  # 0xA801


def test_cget_streams_back_and_oncget_may_refuse(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    study, uids = _study_in_orthanc(fresh_orthanc, 4)
    script = 'function onCGet(request, assoc) if request.AccessionNumber == "REFUSE" then return false end end\n'
    gateway = gateway_factory(scripts={"main.lua": script})
    common = ["-v", *_study_retrieve_args("GETTER", gateway, study)]
    out = tmp_path / "got"
    out.mkdir()
    run_dcmtk("getscu", *common, "-od", str(out))
    got = {str(pydicom.dcmread(f).SOPInstanceUID) for f in out.iterdir()}
    assert got == uids
    refused_dir = tmp_path / "refused"
    refused_dir.mkdir()
    refused = run_dcmtk("getscu", *common, "-k", "AccessionNumber=REFUSE", "-od", str(refused_dir), check=False)
    # (pynetdicom attaches a Failed SOP Instance UID List; getscu then complains at release)
    assert "Received C-GET Response (Failed: UnableToProcess)" in refused.stderr, refused.stderr
    assert not list(refused_dir.iterdir())


def test_cfind_cancel_is_passed_upstream(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    for _ in range(5):
        data, _uid = dicom_samples.make_instance(
            patient_id="CANCEL", patient_name="C^C", study_uid=pydicom.uid.generate_uid()
        )
        fresh_orthanc.upload(data)
    # a slow result hook, so findscu's C-CANCEL (sent after the first match) arrives mid-query
    slow = 'function onCFindResult(result, assoc) OsExecute("sleep", "0.3") end\n'
    gateway = gateway_factory(scripts={"main.lua": slow})
    port = str(gateway.dicom_port)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID=CANCEL"]
    res = run_dcmtk("findscu", "-S", "-v", "--cancel", "1", "-aec", gateway.aet, LOOPBACK, port, *keys)
    assert "Sending Cancel Request" in res.stderr, res.stderr
    assert "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in res.stderr, res.stderr
    assert res.stderr.count("Find Response:") < 5, res.stderr  # not every match was sent
    gateway.wait_for_log("cancelling upstream")
    assert run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, port).returncode == 0


# --------------------------------------------------------------------------- commands
SEND_SCRIPT = r"""
function onHttpRequest(req)
  if req.Path == "/run/send" then
    local r = InternalCmdRun("send", req.Headers["x-args"])
    req:ResponseWrite(tostring(r.Sent) .. "/" .. tostring(r.Failed) .. "/" .. tostring(r.Total))
    return true
  end
  if req.Path == "/run/echo" then
    local r = InternalCmdRun("echo", req.Headers["x-args"])
    req:ResponseWrite(tostring(r.Success))
    return true
  end
  if req.Path == "/run/bad" then
    local ok, err = pcall(InternalCmdRun, "send", "nonsense")
    req:ResponseWrite(tostring(err))
    return true
  end
end
"""


def test_internal_commands_send_and_echo(
    gateway_factory: Any, fresh_orthanc: OrthancServer, storescp_factory: Any, tmp_path: Path
) -> None:
    dest = storescp_factory("SENDDEST")
    gateway = gateway_factory(scripts={"main.lua": SEND_SCRIPT})
    folder = tmp_path / "outbox"
    files = make_files(folder / "nested", 3)
    (folder / "notes.txt").write_text("not dicom")
    target = f"GWSEND:{dest.aet}@{LOOPBACK}:{dest.port}"
    r = gateway.get("/run/send", headers={"x-args": f"{folder} {target}"})
    assert r.text == "3/1/4", r.text  # three sent, the text file reported as a failure
    got = dest.wait_for_files(3)
    assert {str(pydicom.dcmread(f).SOPInstanceUID) for f in got} == {u for _, u in files}
    assert {pydicom.dcmread(f).file_meta.SourceApplicationEntityTitle for f in got} == {"GWSEND"}
    assert gateway.get("/run/echo", headers={"x-args": f"{dest.aet}@{LOOPBACK}:{dest.port}"}).text == "true"
    bad = gateway.get("/run/bad").text
    assert 'InternalCmdRun("send", "[folder] [CallingAE:AE@host:port]")' in bad


# --------------------------------------------------------------------------- bad input
def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _raw_associate(port: int, aet: str) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=10)
    context = pdus.ProposedContext(1, dicom_samples.SOP_CLASSES["CT"], ("1.2.840.10008.1.2.1",))
    s.sendall(pdus.associate_rq(aet, "RAW", [context], 16384).encode())
    header = s.recv(6)
    assert header[0] == 0x02, header
    length = struct.unpack(">I", header[2:])[0]
    while length:
        length -= len(s.recv(length))
    return s


def test_bad_input_keeps_the_gateway_serving(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    gateway = gateway_factory()
    port = gateway.dicom_port
    # 1. unknown SOP class: the presentation context is refused, storescu reports it
    ds = dicom_samples.build_dataset(patient_id="PX", patient_name="X^X")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.1426.999"
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=True)
    res = storescu(gateway, odd, check=False)
    assert res.returncode != 0 and "no presentation context" in (res.stdout + res.stderr).lower()
    # 2. abort mid-transfer: half a data set, then the socket closes
    s = _raw_associate(port, gateway.aet)
    s.sendall(_pdu(0x04, struct.pack(">IBB", 100 + 2, 1, 0x00) + b"\0" * 100))
    s.close()
    # 3. a PDU larger than negotiated (we advertise 1 MiB): aborted with an A-ABORT
    s = _raw_associate(port, gateway.aet)
    s.sendall(struct.pack(">BBI", 0x04, 0, (4 << 20)) + b"\0" * 64)
    assert s.recv(6)[:1] == b"\x07"
    s.close()
    # 4. a malformed data set: C-STORE answered 0xC210, association still usable
    async def garbage() -> tuple[int, int]:
        a = await StorageScu.connect(
            LOOPBACK,
            port,
            called_aet=gateway.aet,
            calling_aet="BAD",
            contexts=[(dicom_samples.SOP_CLASSES["CT"], "1.2.840.10008.1.2.1")],
        )
        bad = await a.c_store(
            dicom_samples.SOP_CLASSES["CT"],
            "1.2.3.4.5",
            "1.2.840.10008.1.2.1",
            b"\x08\x00\x18\x00UI\xff\xff" + b"garbage",
        )
        good = dicom_samples.build_dataset(patient_id="PX", patient_name="X^X")
        ok = await a.c_store(
            good.SOPClassUID, good.SOPInstanceUID, "1.2.840.10008.1.2.1", datasets.encode(good, "1.2.840.10008.1.2.1")
        )
        await a.release()
        return bad.status, ok.status

    assert asyncio.run(garbage()) == (0xC210, 0x0000)
    # 5. a peer that vanishes right after the association request
    s = socket.create_connection((LOOPBACK, port), timeout=5)
    s.sendall(b"\x01\x00\x00\x00")
    s.close()
    # still serving, and each problem logged
    assert run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, str(port)).returncode == 0
    files = make_files(tmp_path / "after", 2)
    storescu(gateway, *[p for p, _ in files])
    fresh_orthanc.wait_for_instances(3)
    log = gateway.log_text()
    assert "exceeds the negotiated maximum" in log and "cannot parse the dataset" in log
