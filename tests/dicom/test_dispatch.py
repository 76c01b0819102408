"""dicomproxy.dicom.dispatch in process (real sockets, real spool): the association policy, the
storage path on its own thread, a thread that cannot start refusing one request only, and
Query/Retrieve associations handed to the Q/R service."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul.errors import AssociationRejected
from tests.dicom.stack import dicom_stack, until

CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"


async def _associate(port: int, calling: str = "MOD", contexts: Any = None) -> StorageScu:
    return await StorageScu.connect("127.0.0.1", port, called_aet="GW", calling_aet=calling,
                                    contexts=contexts or [(VERIFICATION, IMPLICIT)], timeout=5)


async def test_a_thread_that_cannot_start_refuses_that_request_only(tmp_path: Path, monkeypatch: Any,
                                                                  caplog: Any) -> None:
    async with dicom_stack(tmp_path) as stack:
        real_start = threading.Thread.start

        def no_threads(self: threading.Thread) -> None:
            if self.name.startswith("dicom-assoc"):
                raise RuntimeError("can't start new thread")
            real_start(self)

        monkeypatch.setattr(threading.Thread, "start", no_threads)
        with pytest.raises(AssociationRejected, match="transiently.*temporary-congestion|transiently.*congestion"):
            await _associate(stack.port)
        assert "cannot start its thread (can't start new thread)" in caplog.text
        monkeypatch.setattr(threading.Thread, "start", real_start)
        assert stack.acceptor.listening
        scu = await _associate(stack.port)
        assert (await scu.c_echo()).is_success
        await scu.release()
        await until(lambda: stack.acceptor.admission.associations == 0)  # the thread's end releases its slot


async def test_calling_ae_titles_and_the_application_context(tmp_path: Path) -> None:
    async with dicom_stack(tmp_path, AllowedCallingAets=["GOOD"]) as stack:
        with pytest.raises(AssociationRejected, match="permanently.*Calling AE title not recognised"):
            await _associate(stack.port, "STRANGER")
        scu = await _associate(stack.port, "GOOD")
        await scu.release()


async def test_query_retrieve_goes_to_the_qr_service(tmp_path: Path) -> None:
    async with dicom_stack(tmp_path) as stack:
        scu = await _associate(stack.port, contexts=[(FIND, ExplicitVRLittleEndian), (CT, IMPLICIT)])
        assert set(scu.accepted) == {(FIND, ExplicitVRLittleEndian), (CT, IMPLICIT)}
        await until(lambda: stack.qr.active == 1)
        assert stack.dispatcher.active_storage == 0  # not a storage association
        await scu.release()
        await until(lambda: stack.qr.active == 0 and stack.acceptor.admission.associations == 0)
