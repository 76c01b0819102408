"""dicomproxy.dicom.dimse: command sets byte for byte as pydicom encodes them, reading what
pynetdicom's DIMSE messages send, and message assembly from PDVs."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import dsutils
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from dicomproxy.dicom import dimse
from dicomproxy.dicom.dimse import Command, DimseError, MessageAssembler
from dicomproxy.dicom.ul import pdu as pdus

CT = "1.2.840.10008.5.1.4.1.1.2"
UID = "1.2.826.0.1.3680043.8.498.1234567890123"  # odd length: padded


def _pydicom(**elements: Any) -> bytes:
    """pydicom's implicit little endian encoding of a command set, group length first."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = dsutils.encode(ds, True, True)
    assert body is not None
    group = Dataset()
    group.CommandGroupLength = len(body)
    head = dsutils.encode(group, True, True)
    assert head is not None
    return head + body


def test_c_store_rq_bytes_equal_pydicoms() -> None:
    ours = dimse.c_store_rq(7, CT, UID, priority=2, originator_aet="MOVER", originator_id=3)
    assert ours == _pydicom(AffectedSOPClassUID=CT, CommandField=0x0001, MessageID=7, Priority=2,
                            CommandDataSetType=0x0000, AffectedSOPInstanceUID=UID,
                            MoveOriginatorApplicationEntityTitle="MOVER", MoveOriginatorMessageID=3)


def test_responses_bytes_equal_pydicoms() -> None:
    ours = dimse.response(dimse.C_STORE_RSP, 7, CT, 0xC210, UID, "dataset cannot be parsed")
    assert ours == _pydicom(AffectedSOPClassUID=CT, CommandField=0x8001, MessageIDBeingRespondedTo=7,
                            CommandDataSetType=0x0101, Status=0xC210, ErrorComment="dataset cannot be parsed",
                            AffectedSOPInstanceUID=UID)
    assert dimse.response(dimse.C_ECHO_RSP, 9, dimse.VERIFICATION, 0) == _pydicom(
        AffectedSOPClassUID=dimse.VERIFICATION, CommandField=0x8030, MessageIDBeingRespondedTo=9,
        CommandDataSetType=0x0101, Status=0)
    assert dimse.c_echo_rq(4) == _pydicom(AffectedSOPClassUID=dimse.VERIFICATION, CommandField=0x0030, MessageID=4,
                                          CommandDataSetType=0x0101)


def _pynetdicom_command(primitive: Any, message: Any) -> bytes:
    """The command set pynetdicom sends for ``primitive`` (from its P-DATA fragments)."""
    msg = message()
    msg.primitive_to_message(primitive)
    command = b""
    for primitive_pdata in msg.encode_msg(1, 16384):
        for _context, value in primitive_pdata.presentation_data_value_list:
            if value[0] & 0x01:
                command += value[1:]
    return command


def test_reads_the_command_sets_pynetdicom_sends() -> None:
    store = C_STORE()
    store.MessageID, store.AffectedSOPClassUID, store.AffectedSOPInstanceUID = 12, CT, UID
    store.Priority = 0
    store.DataSet = BytesIO(b"\0" * 4)
    command = dimse.decode_command(_pynetdicom_command(store, C_STORE_RQ))
    assert (command.field, command.message_id, command.sop_class, command.sop_instance) == (1, 12, CT, UID)
    assert command.has_dataset
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 5, dimse.VERIFICATION
    command = dimse.decode_command(_pynetdicom_command(echo, C_ECHO_RQ))
    assert (command.field, command.message_id, command.has_dataset) == (0x0030, 5, False)


def test_statuses() -> None:
    rsp = dimse.decode_command(dimse.response(dimse.C_STORE_RSP, 1, CT, 0xB000, UID, "coerced"))
    status = rsp.status()
    assert status.is_warning and not status.is_success and str(status) == "0xB000 (coerced)"
    assert dimse.Status(0xA702).is_out_of_resources
    with pytest.raises(DimseError, match="Status"):
        dimse.decode_command(dimse.c_echo_rq(1)).status()


@pytest.mark.parametrize("raw", [b"\x00\x00\x00\x01\x04\x00", b"\x00\x00\x00\x01\xff\x00\x00\x00\x01",
                                 b"\x08\x00\x00\x01\x02\x00\x00\x00\x01\x00", b""])
def test_malformed_command_sets(raw: bytes) -> None:
    with pytest.raises(DimseError):
        dimse.decode_command(raw)


class Collect:
    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    def on_command(self, context_id: int, command: Command) -> None:
        self.events.append(("command", context_id, command.field))

    def on_data(self, context_id: int, fragment: memoryview, last: bool) -> None:
        self.events.append(("data", context_id, (bytes(fragment), last)))


def _pdu(*pdvs: tuple[int, int, bytes]) -> list[pdus.Pdv]:
    return [(context_id, control, memoryview(fragment)) for context_id, control, fragment in pdvs]


def test_assembly_of_a_fragmented_command_and_a_streamed_data_set() -> None:
    command = dimse.c_store_rq(1, CT, UID)
    sink = Collect()
    assembler = MessageAssembler({1: None, 3: None}, sink)
    assembler.feed(_pdu((1, 0x01, command[:10])))
    assert sink.events == [] and not assembler.idle
    assembler.feed(_pdu((1, 0x03, command[10:]), (1, 0x00, b"part1")))
    assembler.feed(_pdu((1, 0x02, b"part2")))
    assert sink.events == [("command", 1, 1), ("data", 1, (b"part1", False)), ("data", 1, (b"part2", True))]
    assert assembler.idle
    assembler.feed(_pdu((3, 0x03, dimse.c_echo_rq(2))))  # no data set: the next PDV may be a command again
    assert sink.events[-1] == ("command", 3, 0x0030) and assembler.idle


@pytest.mark.parametrize(
    ("pdvs", "match"),
    [
        ([(5, 0x03, b"")], "not accepted"),
        ([(1, 0x02, b"data")], "without a command"),
        ([(1, 0x03, dimse.c_store_rq(1, CT, UID)), (3, 0x02, b"data")], "without a command"),
        ([(1, 0x03, dimse.c_store_rq(1, CT, UID)), (1, 0x03, dimse.c_echo_rq(2))], "while a data set"),
        ([(1, 0x01, b"\0" * (dimse.MAX_COMMAND + 1))], "longer than"),
    ],
    ids=["context", "no-command", "other-context", "command-for-data", "too-long"],
)
def test_assembly_protocol_errors(pdvs: list[tuple[int, int, bytes]], match: str) -> None:
    assembler = MessageAssembler({1: None, 3: None}, Collect())
    with pytest.raises(DimseError, match=match):
        assembler.feed(_pdu(*pdvs))


def test_a_command_set_with_dcmtk_status_detail_keeps_it_and_passes_it_on() -> None:
    """Orthanc 1.10's C-GET-RSP 0xC000 carries (0008,0058) Failed SOP Instance UID List inside the
    command set (DCMTK's status detail): decoded, kept apart from group 0000, re-encoded after it."""
    from dicomproxy.dicom.qr import messages
    from dicomproxy.dicom.qr.retrieve import failed_uids

    uid = b"1.2.3.4\0"
    detail = (struct.pack("<HHI", 8, 0, 4) + struct.pack("<I", 8 + len(uid))
              + struct.pack("<HHI", 8, 0x58, len(uid)) + uid)
    raw = dimse.encode_command([(dimse.COMMAND_FIELD, dimse.us(0x8010)), (dimse.STATUS, dimse.us(0xC000)),
                                (messages.FAILED, dimse.us(1))], detail)
    command = dimse.decode_command(raw)
    assert command.status().status == 0xC000 and command.detail == detail
    assert failed_uids(command, None, "1.2.840.10008.1.2") == ["1.2.3.4"]
    again = dimse.decode_command(messages.response(command, 7, replace=[(dimse.ERROR_COMMENT, b"why ")]))
    assert again.detail == detail and again.us(dimse.MESSAGE_ID_RESPONDED) == 7
    assert again.text(dimse.ERROR_COMMENT) == "why"
