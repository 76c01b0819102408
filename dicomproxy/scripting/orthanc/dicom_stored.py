"""``OnStoredInstance`` for the instances the gateway's own DICOM side forwarded.

The DICOM side only says "the PACS accepted this instance" (its hook,
:class:`dicomproxy.dicom.hooks.InstanceStored`); the Orthanc rules are here:

* Over DIMSE the PACS records the *gateway* as the instance's origin (``RemoteAET`` is the
  forwarder's AE title), so the change feed would report the gateway, not the modality. This
  layer fires ``OnStoredInstance`` from the hook instead, with the modality's AE titles and
  address in ``metadata`` and ``origin`` (``RequestOrigin`` ``DicomProtocol``), and the change
  feed skips the instances whose ``RemoteAET`` is the one the hook names
  (:meth:`DicomForwarded.skips`).
* Over STOW-RS the PACS stores the instance through its REST side and the change feed fires
  ``OnStoredInstance`` as for any upload; the hook is ignored.

``instanceId`` is Orthanc's own id (SHA-1 of the four UIDs) when the PACS did not name it, so
``RestApiGet('/instances/' .. instanceId)`` works as Orthanc scripts expect.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dicomproxy.dicom.hooks import InstanceStored, StoredInstance
from dicomproxy.scripting.host import ScriptHost
from dicomproxy.scripting.orthanc.pacs import orthanc_id

log = logging.getLogger("dicomproxy.orthanc")


class DicomForwarded:
    def __init__(self, hook: InstanceStored, host: ScriptHost) -> None:
        self.hook = hook
        self.host = host

    def install(self) -> None:
        self.hook.subscribe(self.stored, wants=lambda: self.host.defines("OnStoredInstance"))

    def skips(self, metadata: dict[str, Any]) -> bool:
        """True for a change the hook reports instead (forwarded by the DICOM side over DIMSE)."""
        forwarded_as = self.hook.forwarded_as
        return (forwarded_as is not None and metadata.get("Origin") == "DicomProtocol"
                and metadata.get("RemoteAET") == forwarded_as)

    async def stored(self, instance: StoredInstance) -> None:
        if instance.via != "dimse" or not self.host.defines("OnStoredInstance"):
            return
        try:
            tags = await instance.tags()
        except Exception as e:
            log.error("OnStoredInstance: cannot decode %s for its tags: %s", instance.sop_instance, e)
            tags = {}
        o = instance.origin
        metadata = {
            "RemoteAET": o.get("CallingAE", ""),
            "CalledAET": o.get("CalledAE", ""),
            "RemoteIP": o.get("RemoteIp", ""),
            "TransferSyntax": instance.transfer_syntax,
            "SopClassUid": instance.sop_class,
            "ReceptionDate": time.strftime("%Y%m%dT%H%M%S", time.localtime(instance.received or time.time())),
            "Origin": "DicomProtocol",
        }
        origin = {
            "RequestOrigin": "DicomProtocol",
            "RemoteIp": o.get("RemoteIp", ""),
            "RemoteAet": o.get("CallingAE", ""),
            "CalledAet": o.get("CalledAE", ""),
        }
        instance_id = instance.instance_id or orthanc_id(
            instance.patient_id, instance.study, instance.series, instance.sop_instance
        )
        try:
            await self.host.dispatch("OnStoredInstance", instance_id, tags, metadata, origin)
        except Exception as e:
            log.error("OnStoredInstance failed: %s", e)
