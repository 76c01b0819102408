"""Query/Retrieve through the real stack, compared with the same request straight to Orthanc:
the requester's own address in every Lua event (a pynetdicom client bound to another loopback
address), C-FIND / C-GET answers byte for byte (a Japanese ISO_IR 13 patient with private
elements, Orthanc answering in ISO_IR 13), the C-FIND filters of Orthanc's Lua in Orthanc's
form, Modality Worklist through Orthanc's worklist plugin with dcmtk ``findscu -W``, and C-CANCEL
passed on. C-MOVE, sub-operation counts and memory: ``test_dicom_qr_retrieve.py``."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from tests import dicom_samples
from tests.peers import OrthancServer, run_dcmtk

LOOPBACK = "127.0.0.1"
JAPANESE_NAME = b"Test-\x84D\x83\xa6\xc8"  # Shift-JIS bytes under ISO_IR 13, as Orthanc's "Japanese" encodes
WORKLIST_PLUGIN = "/usr/share/orthanc/plugins/libModalityWorklists.so"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


# --------------------------------------------------------------------------- helpers
def dataset_part(path: Path) -> bytes:
    """A Part 10 file's data set: what came over the network (the file meta is the writer's own,
    with the sender's AE title in it)."""
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM" and raw[132:136] == b"\x02\x00\x00\x00", path
    meta_length = struct.unpack_from("<I", raw, 144)[0]
    return raw[148 + meta_length :]


def japanese_instance(tmp: Path, *, patient_id: str = "JP1", study_uid: str | None = None,
                      number: int = 1) -> tuple[Path, Dataset]:
    ds = dicom_samples.build_dataset(patient_id=patient_id, patient_name="x", study_uid=study_uid,
                                     instance_number=number, StudyDescription="Desc", AccessionNumber="ACC1")
    ds.SpecificCharacterSet = "ISO_IR 13"
    ds.PatientName = "Test-QQQQQ"  # replaced by the Shift-JIS bytes below (pydicom would re-encode them)
    block = ds.private_block(0x0011, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "US", 1234)
    block.add_new(0x12, "DS", "1.5")
    path = tmp / f"{patient_id}-{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    path.write_bytes(path.read_bytes().replace(b"Test-QQQQQ", JAPANESE_NAME))
    return path, ds


@pytest.fixture
def japanese_orthanc(orthanc_factory: Any) -> OrthancServer:
    """An Orthanc that answers C-FIND in ISO_IR 13 (its ``DefaultEncoding`` is Japanese)."""
    return orthanc_factory(extra_config={"DefaultEncoding": "Japanese"})


def findscu(port: int, aet: str, out: Path, *args: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    run_dcmtk("findscu", "-S", "-aet", "FINDER", "-aec", aet, LOOPBACK, str(port), "-X", "-od", str(out), *args)
    return sorted(out.glob("rsp*.dcm"))


def getscu(port: int, aet: str, out: Path, *args: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    run_dcmtk("getscu", "-S", "-aet", "GETTER", "-aec", aet, LOOPBACK, str(port), "-od", str(out), *args)
    return sorted(out.iterdir())


def raw_find(port: int, aet: str, query: Dataset, *, bind: str = LOOPBACK, model: Any = None,
             syntax: str = pydicom.uid.ExplicitVRLittleEndian) -> tuple[list[bytes], list[int]]:
    """C-FIND with pynetdicom: each response's identifier exactly as it came off the wire, and
    every status."""
    ae = AE(ae_title="RAWFIND")
    model = model or StudyRootQueryRetrieveInformationModelFind
    ae.add_requested_context(model, [syntax])
    wire: list[bytes] = []

    def received(event: Any) -> None:
        message = event.message
        if isinstance(message, C_FIND_RSP) and message.data_set is not None and message.data_set.getvalue():
            wire.append(message.data_set.getvalue())

    assoc = ae.associate(LOOPBACK, port, ae_title=aet, bind_address=(bind, 0),
                         evt_handlers=[(evt.EVT_DIMSE_RECV, received)])
    assert assoc.is_established, f"association from {bind} refused"
    statuses = [int(status.Status) for status, _ in assoc.send_c_find(query, model)]
    assoc.release()
    return wire, statuses


def study_query(**keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    for name in ("PatientName", "SpecificCharacterSet", "StudyInstanceUID", "StudyDescription"):
        setattr(query, name, "")
    for name, value in keys.items():
        setattr(query, name, value)
    return query


# --------------------------------------------------------------------------- the peer is the peer
PEER_SCRIPT = r"""
function onDicomAssociation(assoc)
  LogInfo("association from " .. assoc.RemoteIp .. ":" .. assoc.RemotePort .. " as " .. assoc.CallingAE)
  if assoc.RemoteIp == "127.0.0.2" then return false end
end
function onCFind(query, assoc) LogInfo("onCFind from " .. assoc.RemoteIp .. ":" .. assoc.RemotePort) end
function IncomingFindRequestFilter(query, origin)
  LogInfo("IncomingFindRequestFilter from " .. origin.RemoteIp .. " " .. origin.RemoteAet)
  return query
end
function onCGet(request, assoc) LogInfo("onCGet from " .. assoc.RemoteIp .. ":" .. assoc.RemotePort) end
"""


def test_the_peer_lua_sees_is_the_peer(gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path) -> None:
    data, _uid = dicom_samples.make_instance(patient_id="PEER", patient_name="Peer^Address")
    fresh_orthanc.upload(data)
    gateway = gateway_factory(scripts={"main.lua": PEER_SCRIPT})
    for model in (StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet):
        ae = AE(ae_title="FROM2")
        ae.add_requested_context(model)
        refused = ae.associate(LOOPBACK, gateway.dicom_port, ae_title=gateway.aet, bind_address=("127.0.0.2", 0))
        assert refused.is_rejected, f"{model} from 127.0.0.2 was let in"
    gateway.wait_for_log("association from 127.0.0.2:")
    assert "onCFind from 127.0.0.2" not in gateway.log_text()

    ae = AE(ae_title="FROM3")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOOPBACK, gateway.dicom_port, ae_title=gateway.aet, bind_address=("127.0.0.3", 0))
    assert assoc.is_established
    port = assoc.dul.socket.socket.getsockname()[1]
    results = list(assoc.send_c_find(study_query(PatientID="PEER"), StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert [int(s.Status) for s, _ in results] == [0xFF00, 0x0000]
    log = gateway.wait_for_log(f"onCFind from 127.0.0.3:{port}")
    assert f"association from 127.0.0.3:{port} as FROM3" in log
    assert "IncomingFindRequestFilter from 127.0.0.3 FROM3" in log
    assert "from 127.0.0.1" not in log  # nothing saw a loopback splice


# --------------------------------------------------------------------------- bytes are not re-encoded
def test_cfind_answers_are_the_pacs_bytes(
    gateway_factory: Any, japanese_orthanc: OrthancServer, tmp_path: Path
) -> None:
    path, ds = japanese_instance(tmp_path)
    japanese_orthanc.upload(path)
    gateway = gateway_factory(orthanc=japanese_orthanc)
    query = study_query(PatientID="JP1")
    direct, direct_status = raw_find(japanese_orthanc.dicom_port, japanese_orthanc.aet, query)
    through, through_status = raw_find(gateway.dicom_port, gateway.aet, query)
    assert JAPANESE_NAME in direct[0] and b"ISO_IR 13" in direct[0]  # what Orthanc sends
    assert through == direct and through_status == direct_status == [0xFF00, 0x0000]
    for syntax in (pydicom.uid.ImplicitVRLittleEndian,):  # the requester's syntax is the one passed on
        d, _ = raw_find(japanese_orthanc.dicom_port, japanese_orthanc.aet, query, syntax=syntax)
        t, _ = raw_find(gateway.dicom_port, gateway.aet, query, syntax=syntax)
        assert t == d and JAPANESE_NAME in t[0]
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=JP1", "-k", "PatientName", "-k",
            "SpecificCharacterSet", "-k", "StudyInstanceUID", "-k", "AccessionNumber"]
    dcmtk_direct = findscu(japanese_orthanc.dicom_port, japanese_orthanc.aet, tmp_path / "d", *keys)
    dcmtk_through = findscu(gateway.dicom_port, gateway.aet, tmp_path / "g", *keys)
    assert [dataset_part(p) for p in dcmtk_through] == [dataset_part(p) for p in dcmtk_direct]
    assert len(dcmtk_direct) == 1 and JAPANESE_NAME in dcmtk_direct[0].read_bytes()


EDIT_RESULT = r"""
function onCFindResult(result, assoc) result.StudyDescription = "via " .. assoc.CalledAE end
"""


def test_a_hook_edit_keeps_the_character_set_and_every_other_byte(
    gateway_factory: Any, japanese_orthanc: OrthancServer, tmp_path: Path
) -> None:
    path, _ = japanese_instance(tmp_path)
    japanese_orthanc.upload(path)
    gateway = gateway_factory(orthanc=japanese_orthanc, scripts={"main.lua": EDIT_RESULT})
    query = study_query(PatientID="JP1")
    direct, _ = raw_find(japanese_orthanc.dicom_port, japanese_orthanc.aet, query)
    through, _ = raw_find(gateway.dicom_port, gateway.aet, query)
    original, edited = (_read(direct[0]), _read(through[0]))
    assert edited.get_item(0x00100010).value == JAPANESE_NAME  # not decoded, not re-encoded
    assert sorted(edited.keys()) == sorted(original.keys())
    for tag in original.keys():
        if tag != 0x00081030:  # the raw value of every element the script did not change
            assert edited.get_item(tag).value == original.get_item(tag).value, tag
    assert edited.StudyDescription == f"via {gateway.aet}"
    assert edited.SpecificCharacterSet == "ISO_IR 13"


def _read(identifier: bytes) -> Dataset:
    """An Explicit VR Little Endian identifier, its elements left undecoded until read."""
    return pydicom.filereader.read_dataset(pydicom.filebase.DicomBytesIO(identifier), False, True)


def test_cget_instances_are_the_pacs_bytes_in_the_requesters_syntax(
    gateway_factory: Any, fresh_orthanc: OrthancServer, tmp_path: Path
) -> None:
    study = pydicom.uid.generate_uid()
    for n in (1, 2):
        path, _ = japanese_instance(tmp_path, patient_id="JPGET", study_uid=study, number=n)
        fresh_orthanc.upload(path)
    gateway = gateway_factory()
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    direct = getscu(fresh_orthanc.dicom_port, fresh_orthanc.aet, tmp_path / "d", *keys)
    through = getscu(gateway.dicom_port, gateway.aet, tmp_path / "g", *keys)
    assert len(direct) == 2 and [p.name for p in through] == [p.name for p in direct]
    assert [dataset_part(p) for p in through] == [dataset_part(p) for p in direct]
    got = pydicom.dcmread(through[0])
    assert got.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian  # getscu's first choice
    assert got[0x00111011].VR == "US" and got[0x00111011].value == 1234  # private VR kept
    # the requester's order wins: Orthanc itself picks Explicit from [Implicit, Explicit]; the
    # gateway asks Orthanc for the requester's first choice, and gets Orthanc's bytes for it
    implicit_direct = raw_get(fresh_orthanc.dicom_port, fresh_orthanc.aet, study, [IMPLICIT])
    explicit_direct = raw_get(fresh_orthanc.dicom_port, fresh_orthanc.aet, study, [EXPLICIT, IMPLICIT])
    assert {ts for ts, _ in implicit_direct} == {IMPLICIT} and {ts for ts, _ in explicit_direct} == {EXPLICIT}
    assert sorted(raw_get(gateway.dicom_port, gateway.aet, study, [IMPLICIT, EXPLICIT])) == sorted(implicit_direct)
    assert sorted(raw_get(gateway.dicom_port, gateway.aet, study, [IMPLICIT])) == sorted(implicit_direct)
    assert sorted(raw_get(gateway.dicom_port, gateway.aet, study, [EXPLICIT, IMPLICIT])) == sorted(explicit_direct)


IMPLICIT = pydicom.uid.ImplicitVRLittleEndian
EXPLICIT = pydicom.uid.ExplicitVRLittleEndian


def raw_get(port: int, aet: str, study: str, syntaxes: list[str]) -> list[tuple[str, bytes]]:
    """C-GET with pynetdicom proposing CT storage in ``syntaxes`` (in that order): each instance as
    (transfer syntax, its data set exactly as received)."""
    ae = AE(ae_title="RAWGET")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(dicom_samples.SOP_CLASSES["CT"], syntaxes)
    got: list[tuple[str, bytes]] = []

    def on_store(event: Any) -> int:
        got.append((str(event.context.transfer_syntax), event.request.DataSet.getvalue()))
        return 0x0000

    assoc = ae.associate(LOOPBACK, port, ae_title=aet, ext_neg=[build_role(dicom_samples.SOP_CLASSES["CT"],
                                                                            scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    statuses = [int(status.Status) for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000, statuses
    return got


# --------------------------------------------------------------------------- Orthanc's C-FIND filters
ORTHANC_FILTERS = r"""
function IncomingFindRequestFilter(query, origin)
  LogInfo("incoming keys: " .. tostring(query["0010,0020"]) .. " " .. tostring(query.PatientID))
  if query["0010,0020"] == "ALIAS" then query["0010,0020"] = "FINDA" end
  return query
end
function OutgoingFindRequestFilter(query, modality)
  LogInfo("outgoing to " .. modality)
  for key, value in pairs(query) do
    if value == "*" then query[key] = "" end
  end
  if query["0010,0020"] == "SENT-AS-B" then query["0010,0020"] = "FINDB" end
  return query
end
"""


def test_orthanc_find_filters_in_orthancs_form(gateway_factory: Any, fresh_orthanc: OrthancServer,
                                               tmp_path: Path) -> None:
    for pid in ("FINDA", "FINDB"):
        data, _ = dicom_samples.make_instance(patient_id=pid, patient_name=f"Find^{pid}", StudyDescription="d")
        fresh_orthanc.upload(data)
    gateway = gateway_factory(scripts={"main.lua": ORTHANC_FILTERS})

    def pids(value: str, description: str = "") -> list[str]:
        query = study_query(PatientID=value, StudyDescription=description)
        query.PatientID = value
        wire, _ = raw_find(gateway.dicom_port, gateway.aet, query)
        return sorted(str(_read(w).PatientID) for w in wire)

    assert pids("ALIAS") == ["FINDA"]
    assert pids("SENT-AS-B") == ["FINDB"]
    assert pids("FIND*", "*") == ["FINDA", "FINDB"]  # "*" became "" on the way out: a return key again
    log = gateway.wait_for_log(f"outgoing to {fresh_orthanc.aet}")
    assert "incoming keys: ALIAS nil" in log  # tags as Orthanc gives them, no keywords


# --------------------------------------------------------------------------- Modality Worklist
def _worklist_item(folder: Path, name: str, *, station_aet: str, patient_id: str) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.AccessionNumber = f"A-{patient_id}"
    ds.PatientName = f"Work^{patient_id}"
    ds.PatientID = patient_id
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledStationAETitle = station_aet
    step.ScheduledProcedureStepStartDate = "20240102"
    step.ScheduledProcedureStepID = f"S-{patient_id}"
    ds.ScheduledProcedureStepSequence = [step]
    ds.RequestedProcedureID = f"R-{patient_id}"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / f"{name}.wl", enforce_file_format=True)


WORKLIST_FILTER = r"""
function IncomingWorklistRequestFilter(query, origin)
  -- the Orthanc book's example: what the worklist plugin's FilterIssuerAet does
  query['0040,0100'][1]['0040,0001'] = origin['RemoteAet']
  return query
end
function IncomingFindRequestFilter(query, origin)
  LogInfo("IncomingFindRequestFilter must not see a worklist query")
  return query
end
"""


def test_modality_worklist_is_relayed(gateway_factory: Any, orthanc_factory: Any, tmp_path: Path) -> None:
    worklists = tmp_path / "worklists"
    worklists.mkdir()
    _worklist_item(worklists, "one", station_aet="FINDER", patient_id="WL1")
    _worklist_item(worklists, "two", station_aet="OTHER", patient_id="WL2")
    orthanc = orthanc_factory(extra_config={
        "Plugins": [DICOMWEB_PLUGIN, WORKLIST_PLUGIN],
        "Worklists": {"Enable": True, "Database": str(worklists)},
        "DicomAlwaysAllowFindWorklist": True,
    })
    keys = ["-W", "-k", "PatientName", "-k", "PatientID", "-k", "AccessionNumber", "-k",
            "(0040,0100)[0].ScheduledStationAETitle", "-k", "(0040,0100)[0].Modality=CT"]
    direct = findscu(orthanc.dicom_port, orthanc.aet, tmp_path / "d", *keys)
    plain = gateway_factory(orthanc=orthanc)
    through = findscu(plain.dicom_port, plain.aet, tmp_path / "g", *keys)
    assert len(direct) == 2
    assert sorted(dataset_part(p) for p in through) == sorted(dataset_part(p) for p in direct)

    filtered = gateway_factory(orthanc=orthanc, scripts={"main.lua": WORKLIST_FILTER})
    mine = findscu(filtered.dicom_port, filtered.aet, tmp_path / "f", *keys)
    assert [pydicom.dcmread(p).PatientID for p in mine] == ["WL1"]  # scheduled for FINDER only
    assert "must not see a worklist query" not in filtered.log_text()


# --------------------------------------------------------------------------- C-CANCEL
def test_cget_cancel_is_passed_upstream(gateway_factory: Any, fresh_orthanc: OrthancServer) -> None:
    study = pydicom.uid.generate_uid()
    for n in range(30):
        data, _ = dicom_samples.make_instance(patient_id="CGC", patient_name="C^G", study_uid=study,
                                              InstanceNumber=n + 1, size=(64, 64))
        fresh_orthanc.upload(data)
    gateway = gateway_factory()
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(dicom_samples.SOP_CLASSES["CT"], [pydicom.uid.ExplicitVRLittleEndian])
    stored: list[str] = []
    holder: dict[str, Any] = {}

    def on_store(event: Any) -> int:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if len(stored) == 1:
            holder["assoc"].send_c_cancel(1, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    roles = [build_role(dicom_samples.SOP_CLASSES["CT"], scp_role=True)]
    assoc = ae.associate(LOOPBACK, gateway.dicom_port, ae_title=gateway.aet, ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    holder["assoc"] = assoc
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study
    responses = list(assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet, msg_id=1))
    assoc.release()
    final = responses[-1][0]
    assert int(final.Status) == 0xFE00, final
    assert 1 <= len(stored) < 30
    counts = [int(final.get(k, 0)) for k in ("NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                                             "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")]
    assert sum(counts) == 30  # the PACS's own accounting, passed on
    gateway.wait_for_log("cancelling upstream")
