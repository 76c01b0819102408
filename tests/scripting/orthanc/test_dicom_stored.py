"""dicomproxy.scripting.orthanc.dicom_stored: the Orthanc rules for instances the DICOM side
forwarded, fed through the DICOM side's real hook (the script host is a stand-in)."""

from __future__ import annotations

from typing import Any

from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.dicom import datasets
from dicomproxy.dicom.hooks import InstanceStored, StoredInstance
from dicomproxy.hooks import Hooks
from dicomproxy.scripting.orthanc.dicom_stored import DicomForwarded
from dicomproxy.scripting.orthanc.pacs import orthanc_id
from tests import dicom_samples


class Host:
    def __init__(self, *defined: str) -> None:
        self.defined = set(defined)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def defines(self, name: str) -> bool:
        return name in self.defined

    async def dispatch(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))


def _instance(via: str) -> StoredInstance:
    ds = dicom_samples.build_dataset(patient_id="P1", patient_name="Hook^Test", InstitutionName="Site")
    raw = datasets.encode(ds, ExplicitVRLittleEndian)

    async def read() -> bytes:
        return raw

    return StoredInstance(
        sop_instance=ds.SOPInstanceUID, sop_class=ds.SOPClassUID, study=ds.StudyInstanceUID,
        series=ds.SeriesInstanceUID, patient_id="P1", transfer_syntax=ExplicitVRLittleEndian,
        origin={"CallingAE": "CT01", "CalledAE": "GW", "RemoteIp": "10.0.0.7", "RemotePort": 1234},
        received=0.0, via=via, status=0, read=read,
    )


async def test_a_dimse_forwarded_instance_fires_on_stored_instance_with_the_modalitys_origin() -> None:
    hooks = Hooks()
    hook = hooks.get(InstanceStored)  # the Orthanc layer may ask before the DICOM side: the same object
    host = Host()
    DicomForwarded(hooks.get(InstanceStored), host).install()  # type: ignore[arg-type]
    assert not hook.wanted  # no OnStoredInstance: the DICOM side does not even build the event
    host.defined.add("OnStoredInstance")
    assert hook.wanted
    instance = _instance("dimse")
    await hook.emit(instance)
    await hook.emit(_instance("dicomweb"))  # through STOW-RS the change feed reports it: nothing here
    ((name, (instance_id, tags, metadata, origin)),) = host.calls
    assert name == "OnStoredInstance"
    assert instance_id == orthanc_id("P1", instance.study, instance.series, instance.sop_instance)
    assert tags["InstitutionName"] == "Site" and "PixelData" not in tags
    assert (metadata["RemoteAET"], metadata["CalledAET"], metadata["Origin"]) == ("CT01", "GW", "DicomProtocol")
    assert origin == {"RequestOrigin": "DicomProtocol", "RemoteIp": "10.0.0.7", "RemoteAet": "CT01",
                      "CalledAet": "GW"}


async def test_the_change_feed_skips_what_the_hook_reports() -> None:
    hook = InstanceStored()
    forwarded = DicomForwarded(hook, Host())  # type: ignore[arg-type]
    metadata = {"Origin": "DicomProtocol", "RemoteAET": "DICOMPROXY"}
    assert not forwarded.skips(metadata)  # the DICOM side forwards over DICOMweb, or is off
    hook.forwarded_as = "DICOMPROXY"
    assert forwarded.skips(metadata)
    assert not forwarded.skips({**metadata, "RemoteAET": "OTHER"})
    assert not forwarded.skips({"Origin": "RestApi"})
    await hook.emit(_instance("dimse"))  # no OnStoredInstance defined: nothing is decoded or called
