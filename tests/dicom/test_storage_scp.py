"""dicomproxy.dicom.storage_scp in process (real sockets, real spool): C-STORE streamed into the
spool, C-ECHO, unsupported operations, Dicom:MaxDatasetMB, protocol errors abort."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.dicom import datasets, dimse
from dicomproxy.dicom import spool as spool_module
from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.errors import UpperLayerError
from tests import dicom_samples
from tests.dicom.stack import dicom_stack, until

CT = "1.2.840.10008.5.1.4.1.1.2"


async def _scu(port: int) -> StorageScu:
    return await StorageScu.connect("127.0.0.1", port, called_aet="GW", calling_aet="MOD", timeout=5,
                                    contexts=[(CT, ExplicitVRLittleEndian), (VERIFICATION, IMPLICIT)])


async def test_stores_small_and_streamed_instances_into_the_spool(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(spool_module, "SPILL_BYTES", 64 << 10)  # the 300x300 instance streams to its file
    async with dicom_stack(tmp_path) as stack:
        scu = await _scu(stack.port)
        sent = []
        for size in ((16, 16), (300, 300)):
            ds = dicom_samples.build_dataset(patient_id="PS", patient_name="S^S", size=size)
            raw = datasets.encode(ds, ExplicitVRLittleEndian)
            status = await scu.c_store(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, raw)
            assert status.is_success, status
            sent.append((ds, raw))
        assert (await scu.c_echo()).is_success
        await scu.release()
        await until(lambda: len(stack.entries) == 2)
        for (ds, raw), entry in zip(sent, stack.entries, strict=True):
            assert (entry.sop_instance, entry.study, entry.patient_id) == (ds.SOPInstanceUID, ds.StudyInstanceUID, "PS")
            assert stack.spool.read_dataset(entry) == raw and entry.origin["CallingAE"] == "MOD"
        assert stack.spool.depth == 2


async def test_a_mismatching_or_garbage_data_set_is_refused_and_not_spooled(tmp_path: Path) -> None:
    async with dicom_stack(tmp_path) as stack:
        scu = await _scu(stack.port)
        ds = dicom_samples.build_dataset(patient_id="PS", patient_name="S^S")
        raw = datasets.encode(ds, ExplicitVRLittleEndian)
        assert (await scu.c_store(CT, "1.2.3.4", ExplicitVRLittleEndian, raw)).status == 0xC210
        garbage = b"\x08\x00\x18\x00UI\xff\xff"
        assert (await scu.c_store(CT, "1.2.3.5", ExplicitVRLittleEndian, garbage)).status == 0xC210
        await scu.release()
        assert stack.entries == [] and list(stack.spool.queue_dir.iterdir()) == []


async def test_past_max_dataset_the_association_is_aborted(tmp_path: Path, caplog: Any) -> None:
    async with dicom_stack(tmp_path, max_dataset=1 << 20) as stack:
        scu = await _scu(stack.port)
        ds = dicom_samples.build_dataset(patient_id="PS", patient_name="S^S", size=(800, 800))  # ~1.3 MB
        raw = datasets.encode(ds, ExplicitVRLittleEndian)
        with pytest.raises(UpperLayerError, match="aborted"):
            await scu.c_store(CT, ds.SOPInstanceUID, ExplicitVRLittleEndian, raw)
        assert "Dicom:MaxDatasetMB" in caplog.text
        await until(lambda: stack.acceptor.admission.associations == 0)
        assert stack.entries == [] and list(stack.spool.queue_dir.iterdir()) == []


def _raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    rq = pdus.associate_rq("GW", "RAW", [pdus.ProposedContext(1, CT, (ExplicitVRLittleEndian,))], 16384)
    sock.sendall(rq.encode())
    assert _read_pdu(sock)[0] == 0x02
    return sock


def _read_pdu(sock: socket.socket) -> bytes:
    header = sock.recv(6, socket.MSG_WAITALL)
    if len(header) < 6:
        return header
    return header + sock.recv(struct.unpack(">I", header[2:])[0], socket.MSG_WAITALL)


def _command(field: int, message_id: int, *, dataset: bool) -> list[bytes]:
    raw = dimse.encode_command([(dimse.AFFECTED_SOP_CLASS, CT.encode()), (dimse.COMMAND_FIELD, dimse.us(field)),
                                (dimse.MESSAGE_ID, dimse.us(message_id)),
                                (dimse.DATASET_TYPE, dimse.us(0 if dataset else dimse.NO_DATASET))])
    return [b"".join(pdus.p_data(1, raw, command=True, max_pdu=16384))]


async def test_unsupported_operations_are_answered_and_protocol_errors_abort(tmp_path: Path) -> None:
    async with dicom_stack(tmp_path) as stack:
        def exchange() -> list[bytes]:
            sock = _raw_association(stack.port)
            answers = []
            sock.sendall(b"".join(_command(0x0020, 1, dataset=True)))  # C-FIND-RQ on a storage context
            sock.sendall(b"".join(pdus.p_data(1, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", command=False,
                                              max_pdu=16384)))
            answers.append(_read_pdu(sock))
            sock.sendall(b"".join(_command(0x0FFF, 2, dataset=False)))  # C-CANCEL: nothing to answer
            sock.sendall(b"".join(pdus.p_data(1, b"orphan", command=False, max_pdu=16384)))  # data, no command
            answers.append(_read_pdu(sock))
            answers.append(_read_pdu(sock))  # then the connection ends (the acceptor waits for our close)
            sock.close()
            return answers

        rsp, abort, end = await asyncio.to_thread(exchange)
        ((_, _, fragment),) = pdus.decode_pdata(memoryview(rsp))
        command = dimse.decode_command(fragment)
        assert command.field == 0x8020 and command.status().status == 0x0211
        assert abort[0] == 0x07 and end == b""
