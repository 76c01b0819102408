"""Several PACS behind one DICOM port: Dicom:Routes (virtual AEs, calling AE, modality), onCStore
choosing destinations, fan-out with one destination stopped, kill -9 mid fan-out. Three real
Orthancs (started once for the module), the gateway process, dcmtk storescu.

Each Orthanc runs a Lua ``ReceivedInstanceFilter`` that logs every C-STORE it receives, so a
duplicate delivery is seen even though Orthanc keeps one copy (``OverwriteInstances``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicomproxy.dicom.spool import read_file_meta
from tests import dicom_samples
from tests.peers import GatewayProcess, OrthancServer, run_dcmtk, wait_until

LOOPBACK = "127.0.0.1"
COUNTING = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('RECEIVED ' .. dicom.SOPInstanceUID .. ' FROM ' .. tostring(origin.RemoteAet))
  return true
end
"""


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OrthancServer]]:
    servers: dict[str, OrthancServer] = {}
    for name in ("a", "b", "c"):
        workdir = tmp_path_factory.mktemp(f"orthanc-{name}")
        (workdir / "count.lua").write_text(COUNTING)
        servers[name] = OrthancServer(workdir, aet=f"PACS{name.upper()}",
                                      extra_config={"LuaScripts": [str(workdir / "count.lua")]})
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture
def three(pacs: dict[str, OrthancServer]) -> dict[str, OrthancServer]:
    """The module's Orthancs, running and empty."""
    for server in pacs.values():
        if not server.running:
            server.start()
        server.clear()
    return pacs


def upstreams(pacs: dict[str, OrthancServer]) -> dict[str, Any]:
    return {"Servers": {name: {"Url": s.http_url, "Dicom": {"Aet": s.aet, "Port": s.dicom_port}}
                        for name, s in pacs.items()}}


def received(server: OrthancServer, sop_uid: str) -> int:
    """How many C-STOREs of ``sop_uid`` the Orthanc was sent (its Lua filter's log lines)."""
    return server.log_text().count(f"RECEIVED {sop_uid} ")


def instances(folder: Path, n: int, *, modality: str = "CT", patient: str = "PROUTE", tag: str = "i") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out = []
    for i in range(n):
        ds = dicom_samples.build_dataset(patient_id=patient, patient_name="Route^Test", study_uid=study,
                                         series_uid=series, instance_number=i + 1, modality=modality)
        path = folder / f"{tag}{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def storescu(gateway: GatewayProcess, *paths: Path, called: str = "", calling: str = "CT01",
             check: bool = True) -> Any:
    return run_dcmtk("storescu", "-v", "-aet", calling, "-aec", called or gateway.aet, LOOPBACK,
                     str(gateway.dicom_port), *map(str, paths), check=check)


def holders(pacs: dict[str, OrthancServer], path: Path) -> set[str]:
    uid = uid_of(path)
    return {name for name, s in pacs.items() if uid in s.sop_instance_uids()}


def dataset_bytes(part10: bytes) -> bytes:
    _, offset = read_file_meta(part10[:65536])
    return part10[offset:]


def stored_file(server: OrthancServer, sop_uid: str) -> bytes:
    (found,) = server.rest_post("/tools/find", json={"Level": "Instance", "Query": {"SOPInstanceUID": sop_uid}})
    data = server.rest_get(f"/instances/{found}/file")
    assert isinstance(data, bytes)
    return data


def spool_destinations(gateway: GatewayProcess) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in gateway.get("/dicomproxy/spool").json()["destinations"]}


def test_routes_by_called_ae_calling_ae_and_modality(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory({
        "Upstreams": upstreams(three),
        "Dicom": {"StoreMode": "StoreAndForward", "CheckCalledAet": True, "Routes": [
            {"CalledAet": "TO_B", "Destinations": ["b"]},        # a virtual AE on the gateway's one port
            {"CallingAet": "MR01", "Destinations": ["c"]},
            {"Modality": "U?", "Destinations": ["b", "c"]},
        ]},
    }, orthanc=three["a"])
    virtual, by_calling, by_modality, plain = (instances(tmp_path / t, 1, tag=t, modality="US" if t == "us" else "CT")
                                               for t in ("v", "mr", "us", "plain"))
    storescu(gateway, *virtual, called="TO_B")
    storescu(gateway, *by_calling, calling="MR01")
    storescu(gateway, *by_modality)
    storescu(gateway, *plain)
    wait_until(lambda: three["b"].instance_count() == 2 and three["c"].instance_count() == 2
               and three["a"].instance_count() == 1, timeout=30, what="every instance where its route sends it")
    assert holders(three, virtual[0]) == {"b"}
    assert holders(three, by_calling[0]) == {"c"}
    assert holders(three, by_modality[0]) == {"b", "c"}
    assert holders(three, plain[0]) == {"a"}  # no route matches: Dicom:Upstream
    # the destination sees the modality's calling AE, and is called by its own AE title
    assert f"RECEIVED {uid_of(virtual[0])} FROM CT01" in three["b"].log_text()
    # CheckCalledAet still refuses a called AE no route names
    refused = storescu(gateway, *plain, called="NOBODY", check=False)
    assert refused.returncode != 0 and "Called AE Title Not Recognized" in (refused.stdout + refused.stderr)


def test_oncstore_returns_the_destinations_and_an_unknown_name_is_refused(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    script = """
function onCStore(dataset, assoc)
  if dataset.PatientID == "TOBC" then return {"b", "c"} end
  if dataset.PatientID == "TYPO" then return {"b", "archiv"} end
  if dataset.PatientID == "EDIT" then dataset.InstitutionName = "Edited" end
end
"""
    gateway = gateway_factory({"Upstreams": upstreams(three), "Dicom": {"StoreMode": "StoreAndForward"}},
                              {"main.lua": script}, orthanc=three["a"])
    to_bc = instances(tmp_path / "bc", 2, patient="TOBC", tag="bc")
    typo = instances(tmp_path / "typo", 1, patient="TYPO", tag="typo")
    edit = instances(tmp_path / "edit", 1, patient="EDIT", tag="edit")
    storescu(gateway, *to_bc, *edit)
    answer = storescu(gateway, *typo, check=False)
    assert "Status: 0x110)" in (answer.stdout + answer.stderr)  # Processing Failure: nothing stored
    wait_until(lambda: three["b"].instance_count() == 2 and three["c"].instance_count() == 2
               and three["a"].instance_count() == 1, timeout=30, what="onCStore's destinations served")
    assert holders(three, to_bc[0]) == {"b", "c"} and holders(three, edit[0]) == {"a"}  # no table: Dicom:Upstream
    assert not holders(three, typo[0])
    log = gateway.log_text()
    assert "returned the destination 'archiv', which is none (known: a, b, c, default" in log
    assert gateway.get("/dicomproxy/spool").json()["depth"] == 0


def test_fan_out_goes_on_to_the_live_destination_and_the_stopped_one_catches_up_byte_identical(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    events = """
function onInstanceStored(info, assoc)
  LogInfo("STORED-EVENT {0} at {1} via {2}", info.SOPInstanceUID, info.Destination, info.Upstream)
end
"""
    gateway = gateway_factory({
        "Upstreams": upstreams(three),
        "Dicom": {"StoreMode": "StoreAndForward", "ForwardRetrySeconds": 0.5, "ForwardMaxRetrySeconds": 1,
                  "Routes": [{"Destinations": ["a", "b"]}]},
    }, {"main.lua": events}, orthanc=three["c"])
    three["b"].stop()
    files = instances(tmp_path / "burst", 30, tag="burst")
    started = time.monotonic()
    storescu(gateway, *files)  # one association, 30 C-STOREs: every one acknowledged from the spool
    # the positive sign that "b" being down delays nothing: "a" has them all while "b" is known unreachable
    three["a"].wait_for_instances(30, timeout=30)
    spent = time.monotonic() - started
    lanes = wait_until(lambda: (d := spool_destinations(gateway))["b"]["waiting"] + d["b"]["delayed"]
                       + d["b"]["sending"] == 30 and not d["b"]["reachable"] and d, timeout=30,
                       what="b's 30 waiting, b unreachable")
    assert lanes["a"]["waiting"] == 0 and lanes["a"]["reachable"], lanes
    assert gateway.get("/dicomproxy/spool").json()["depth"] == 30  # still b's
    # Orthanc counts the 30th instance before its C-STORE response reaches the gateway: wait for the count
    health = wait_until(lambda: (h := gateway.get("/dicomproxy/health").json()["dicom"]["destinations"])["a"][
        "forwarded"] == 30 and h, timeout=10, what="a's 30 deliveries counted")
    assert not health["b"]["reachable"], health
    three["b"].start()
    three["b"].wait_for_instances(30, timeout=60)
    wait_until(lambda: gateway.get("/dicomproxy/spool").json()["depth"] == 0, timeout=30, what="the spool empty")
    for path in files:
        uid = uid_of(path)
        sent = dataset_bytes(path.read_bytes())
        assert dataset_bytes(stored_file(three["a"], uid)) == sent
        assert dataset_bytes(stored_file(three["b"], uid)) == sent
        assert received(three["a"], uid) == 1 and received(three["b"], uid) == 1
    assert three["c"].instance_count() == 0  # Dicom:Upstream is no destination of this route
    log = gateway.log_text()
    uid = uid_of(files[0])
    assert f"STORED-EVENT {uid} at a via PACSA@" in log and f"STORED-EVENT {uid} at b via PACSB@" in log
    assert spent < 30
    metrics = gateway.get("/dicomproxy/metrics").text  # per destination, and the total of deliveries
    assert 'dicomproxy_dicom_destination_forwarded_total{destination="a"} 30.0' in metrics
    assert 'dicomproxy_dicom_destination_forwarded_total{destination="b"} 30.0' in metrics
    assert "dicomproxy_dicom_forwarded_total 60.0" in metrics


def test_kill9_mid_fan_out_loses_nothing_and_does_not_resend_where_delivered(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory({
        "Upstreams": upstreams(three),
        "Dicom": {"StoreMode": "StoreAndForward", "ForwardRetrySeconds": 0.5, "ForwardMaxRetrySeconds": 1,
                  "Routes": [{"Destinations": ["a", "b"]}]},
    }, orthanc=three["c"])
    three["b"].stop()
    files = instances(tmp_path / "k", 12, tag="k")
    storescu(gateway, *files)
    three["a"].wait_for_instances(12, timeout=30)
    queue = gateway.data_dir / "spool" / "queue"
    wait_until(lambda: len(list(queue.glob("*.done-a"))) == 12, timeout=15, what="a's 12 delivery markers")
    gateway.kill9()
    three["b"].start()
    gateway.start()
    three["b"].wait_for_instances(12, timeout=60)
    wait_until(lambda: not list(queue.iterdir()), timeout=30, what="the spool empty after the restart")
    for path in files:
        uid = uid_of(path)
        assert received(three["a"], uid) == 1, f"{uid} was sent to a again after the restart"
        assert received(three["b"], uid) == 1
        assert dataset_bytes(stored_file(three["b"], uid)) == dataset_bytes(path.read_bytes())


def federated(three: dict[str, OrthancServer], **dicom: Any) -> dict[str, Any]:
    return {"Upstreams": {**upstreams(three), "Groups": {"fed": {"Members": ["a", "b"], "Federated": True}}},
            "Dicom": {"QueryUpstream": "fed", **dicom}}


def study_in(folder: Path, patient: str, *servers: OrthancServer, n: int = 2) -> tuple[str, list[Path]]:
    files = instances(folder, n, patient=patient, tag=folder.name)
    for server in servers:
        for path in files:
            server.upload(path)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def find_studies(gateway: GatewayProcess, out: Path, patient: str) -> tuple[list[str], str]:
    out.mkdir(parents=True, exist_ok=True)
    answer = run_dcmtk("findscu", "-v", "-S", "-aet", "FINDER", "-aec", gateway.aet, LOOPBACK,
                       str(gateway.dicom_port), "-X", "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"PatientID={patient}", "-k", "StudyInstanceUID")
    studies = [str(pydicom.dcmread(p).StudyInstanceUID) for p in sorted(out.glob("rsp*.dcm"))]
    return studies, answer.stdout + answer.stderr


def test_federated_cfind_returns_the_union_once_and_skips_a_stopped_member(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    only_a, _ = study_in(tmp_path / "sa", "PFED", three["a"])
    only_b, _ = study_in(tmp_path / "sb", "PFED", three["b"])
    both, _ = study_in(tmp_path / "sab", "PFED", three["a"], three["b"])
    study_in(tmp_path / "sc", "PFED", three["c"])  # Dicom:Upstream, not in the group: never asked
    gateway = gateway_factory(federated(three), orthanc=three["c"])
    studies, output = find_studies(gateway, tmp_path / "f1", "PFED")
    assert sorted(studies) == sorted([only_a, only_b, both]), output  # "both" once
    three["b"].stop()
    studies, output = find_studies(gateway, tmp_path / "f2", "PFED")
    assert sorted(studies) == sorted([only_a, both]) and "Received Final Find Response (Success)" in output, output
    assert "1 of 2 member(s) did not answer and were skipped: PACSB@" in gateway.log_text()


def get_study(gateway: GatewayProcess, out: Path, study: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    run_dcmtk("getscu", "-S", "-aet", "GETTER", "-aec", gateway.aet, LOOPBACK, str(gateway.dicom_port),
              "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
    return sorted(out.iterdir())


def test_cget_and_cmove_from_a_group_are_served_by_the_holder_and_fail_over(
    three: dict[str, OrthancServer], gateway_factory: Any, storescp_factory: Any, tmp_path: Path
) -> None:
    dest = storescp_factory("GROUPDEST")
    on_b, files_b = study_in(tmp_path / "gb", "PGRP", three["b"])
    on_both, files_both = study_in(tmp_path / "gab", "PGRP", three["a"], three["b"])
    gateway = gateway_factory(federated(three, Modalities={"dest": {"Aet": dest.aet, "Host": LOOPBACK,
                                                                    "Port": dest.port,
                                                                    "Retrieve": "FetchAndStore"}}),
                              orthanc=three["c"])
    got = get_study(gateway, tmp_path / "g1", on_b)  # "a" is asked first and holds nothing: "b" serves
    assert {uid_of(p) for p in got} == {uid_of(p) for p in files_b}
    assert {dataset_bytes(p.read_bytes()) for p in got} == {dataset_bytes(p.read_bytes()) for p in files_b}
    run_dcmtk("movescu", "-S", "-aet", "MOVER", "-aem", dest.aet, "-aec", gateway.aet, LOOPBACK,
              str(gateway.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={on_b}")
    moved = dest.wait_for_files(len(files_b))
    assert {str(pydicom.dcmread(p).SOPInstanceUID) for p in moved} == {uid_of(p) for p in files_b}
    three["a"].stop()  # the first holder of "on_both" is down: the next holder serves
    got = get_study(gateway, tmp_path / "g2", on_both)
    assert {uid_of(p) for p in got} == {uid_of(p) for p in files_both}
    log = gateway.log_text()
    assert f"C-GET from GETTER (127.0.0.1): held by {three['b'].aet}@" in log


SEND = r"""
function onHttpRequest(req)
  if req.Path == "/run/send" then
    local r = InternalCmdRun("send", req.Headers["x-args"])
    req:ResponseWrite(tostring(r.Sent) .. "/" .. tostring(r.Failed) .. " " .. r.Destination)
    return true
  end
end
"""


def test_internal_send_to_an_upstream_or_a_group_by_name(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Upstreams": {**upstreams(three), "Groups": {"fo": {"Members": ["a", "b"]}}}},
                              {"main.lua": SEND}, orthanc=three["c"])
    folder = tmp_path / "outbox"
    files = instances(folder, 2, tag="send")
    r = gateway.get("/run/send", headers={"x-args": f"{folder} b"})
    assert r.text.startswith("2/0 ") and three["b"].instance_count() == 2, r.text
    three["a"].stop()  # the group's first member is down: the next one gets them
    r = gateway.get("/run/send", headers={"x-args": f"{folder} SENDER:fo"})
    assert r.text == f"2/0 SENDER:{three['b'].aet}@{LOOPBACK}:{three['b'].dicom_port}", r.text
    assert all(f"RECEIVED {uid_of(p)} FROM SENDER" in three["b"].log_text() for p in files)


def test_federated_cfind_cancel_goes_to_every_member(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    for i in range(4):
        study_in(tmp_path / f"ca{i}", "PCANCEL", three["a"], n=1)
        study_in(tmp_path / f"cb{i}", "PCANCEL", three["b"], n=1)
    # a slow result hook, so findscu's C-CANCEL (sent after the first match) arrives mid-query
    slow = 'function onCFindResult(result, assoc) OsExecute("sleep", "0.3") end\n'
    gateway = gateway_factory(federated(three), {"main.lua": slow}, orthanc=three["c"])
    port = str(gateway.dicom_port)
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID=PCANCEL"]
    res = run_dcmtk("findscu", "-S", "-v", "--cancel", "1", "-aec", gateway.aet, LOOPBACK, port, *keys)
    assert "Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in res.stderr, res.stderr
    assert res.stderr.count("Find Response:") < 8, res.stderr  # not every match was sent
    gateway.wait_for_log("cancelled; cancelling it at 2 member(s)")
    assert run_dcmtk("echoscu", "-aec", gateway.aet, LOOPBACK, port).returncode == 0


def test_relay_mode_relays_only_what_goes_to_dicom_upstream_alone(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    script = 'function onCStore(dataset, assoc) if dataset.PatientID == "TOB" then return {"b"} end end\n'
    gateway = gateway_factory({  # Dicom:StoreMode RelayOrSpool: the default
        "Upstreams": upstreams(three), "Dicom": {"Routes": [{"CalledAet": "FANOUT", "Destinations": ["a", "b"]}]},
    }, orthanc=three["c"])
    fan, plain = instances(tmp_path / "fan", 1, tag="fan"), instances(tmp_path / "plain", 1, tag="plain")
    storescu(gateway, *fan, called="FANOUT")  # a route sends it to two peers: served from the spool
    storescu(gateway, *plain)  # only ever Dicom:Upstream: relayed, answered with Orthanc's own status
    wait_until(lambda: holders(three, fan[0]) == {"a", "b"} and holders(three, plain[0]) == {"c"}, timeout=30,
               what="the fanned-out instance at a and b, the plain one at c")
    log = gateway.log_text()
    assert log.count("context(s), spooled") == 1 and log.count("context(s), relayed") == 1, log[-3000:]
    # a script that chooses other destinations on a relayed association: refused, with the fix named
    scripted = gateway_factory({"Upstreams": upstreams(three)}, {"main.lua": script}, orthanc=three["c"])
    tob = instances(tmp_path / "tob", 1, patient="TOB", tag="tob")
    answer = storescu(scripted, *tob, check=False)
    assert "Status: 0x110)" in (answer.stdout + answer.stderr)
    assert "set Dicom:StoreMode StoreAndForward" in scripted.log_text() and not holders(three, tob[0])


def test_a_destination_removed_from_the_configuration_keeps_its_instances_in_failed(
    three: dict[str, OrthancServer], gateway_factory: Any, tmp_path: Path
) -> None:
    gateway = gateway_factory({"Upstreams": upstreams(three),
                               "Dicom": {"StoreMode": "StoreAndForward", "Routes": [{"Destinations": ["a", "b"]}]}},
                              orthanc=three["c"])
    three["b"].stop()
    files = instances(tmp_path / "gone", 2, tag="gone")
    storescu(gateway, *files)
    three["a"].wait_for_instances(2)
    gateway.stop()
    gateway.settings["Upstreams"]["Servers"].pop("b")
    gateway.settings["Dicom"]["Routes"] = [{"Destinations": ["a"]}]
    gateway.update_settings({})
    gateway.start()
    notes = wait_until(lambda: len(n := gateway.get("/dicomproxy/spool/failed").json()["items"]) == 2 and n,
                       timeout=30, what="b's two instances in failed/")
    assert {n["SOPInstanceUID"] for n in notes} == {uid_of(p) for p in files}
    assert all(n["Destination"] == "b" and "no longer configured" in n["reason"] for n in notes), notes
    assert gateway.get("/dicomproxy/spool").json()["depth"] == 0
    assert all(received(three["a"], uid_of(p)) == 1 for p in files)  # not sent to a again


def test_cmove_from_a_failover_group_skips_the_member_its_echo_check_ejected_and_returns_to_it(
    three: dict[str, OrthancServer], gateway_factory: Any, storescp_factory: Any, tmp_path: Path
) -> None:
    """``Dicom:QueryUpstream`` a Failover group whose members are C-ECHO checked: "a" stopped and
    ejected, a C-MOVE is served by "b" without trying "a" first; "a" back and healthy, it serves
    again. The same study holds other instances on each member, so the moved ones name the server."""
    dest = storescp_factory("FODEST")
    study = pydicom.uid.generate_uid()
    held: dict[str, set[str]] = {}
    for name in ("a", "b"):
        uids = held[name] = set()
        series = pydicom.uid.generate_uid()
        for i in range(2):
            ds = dicom_samples.build_dataset(patient_id="PFO", patient_name="Fail^Over", study_uid=study,
                                             series_uid=series, instance_number=i + 1)
            path = tmp_path / f"{name}{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            three[name].upload(path)
            uids.add(str(ds.SOPInstanceUID))
    check = {"Echo": True, "IntervalSeconds": 0.5, "TimeoutSeconds": 2, "Failures": 1}
    servers = {name: {**entry, "HealthCheck": check} for name, entry in upstreams(three)["Servers"].items()}
    gateway = gateway_factory({
        "Upstreams": {"Servers": servers, "Groups": {"fo": {"Members": ["a", "b"], "Mode": "Failover"}}},
        "Dicom": {"QueryUpstream": "fo", "Modalities": {"dest": {"Aet": dest.aet, "Host": LOOPBACK, "Port": dest.port,
                                                                 "Retrieve": "FetchAndStore"}}},
    }, orthanc=three["c"])

    def state(name: str) -> str:
        return str(gateway.get("/dicomproxy/health").json()["upstreams"]["servers"][name]["state"])

    def move() -> set[str]:
        """The SOP Instance UIDs one C-MOVE of the study delivered (the folder emptied after)."""
        run_dcmtk("movescu", "-S", "-aet", "MOVER", "-aem", dest.aet, "-aec", gateway.aet, LOOPBACK,
                  str(gateway.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}")
        files = dest.wait_for_files(2)  # movescu returned: every sub-operation's file is complete
        uids = {uid_of(p) for p in files}
        for path in files:
            path.unlink()
        return uids

    wait_until(lambda: state("a") == state("b") == "healthy", timeout=15, what="a and b healthy")
    assert move() == held["a"]  # Failover: the first member serves
    three["a"].stop()
    wait_until(lambda: state("a") == "ejected", timeout=15, what="a ejected by its C-ECHO check")
    tried_a = f"cannot associate with {three['a'].aet}@"
    assert tried_a not in gateway.log_text()
    assert move() == held["b"]  # served by the second member...
    assert tried_a not in gateway.log_text(), "the ejected member was tried first"  # ...without trying the first
    three["a"].start()
    wait_until(lambda: state("a") == "healthy", timeout=30, what="a healthy again after its C-ECHO checks")
    assert move() == held["a"]  # recovered: the first member serves again
    assert tried_a not in gateway.log_text()
