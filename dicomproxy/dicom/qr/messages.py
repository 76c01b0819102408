"""The command sets of C-FIND, C-GET, C-MOVE and their C-STORE sub-operations (PS3.7 9.3), as the
relay needs them: a request or response received on one association, passed on over another
with the message IDs of that association and nothing else changed.

A relayed command set is the received one, element for element (Priority, Move Destination,
the sub-operation counts, Error Comment, Offending Element, whatever the peer put there), with
the Message ID or Message ID Being Responded To replaced, and, where the operation changes on
the way (a C-MOVE served with a C-GET from the PACS), the Command Field and Affected SOP Class.
Command sets are read and built with :mod:`dicomproxy.dicom.dimse` (by hand: a few microseconds
each, see that module for why).
"""

from __future__ import annotations

from collections.abc import Iterable

from dicomproxy.dicom import dimse
from dicomproxy.dicom.dimse import Command

C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_STORE_RQ = dimse.C_STORE_RQ
C_STORE_RSP = dimse.C_STORE_RSP
C_ECHO_RQ = dimse.C_ECHO_RQ
C_ECHO_RSP = dimse.C_ECHO_RSP
C_CANCEL_RQ = dimse.C_CANCEL_RQ
REQUESTS = frozenset({C_FIND_RQ, C_GET_RQ, C_MOVE_RQ})

MOVE_DESTINATION = 0x0600
REMAINING = 0x1020
COMPLETED = 0x1021
FAILED = 0x1022
WARNING = 0x1023

PENDING = frozenset({0xFF00, 0xFF01})
CANCEL = 0xFE00
SUCCESS = 0x0000
UNABLE_TO_PROCESS = 0xC000
OUT_OF_RESOURCES = 0xA700
CANNOT_CALCULATE_MATCHES = 0xA701
CANNOT_PERFORM_SUBOPERATIONS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
SOP_CLASS_NOT_SUPPORTED = 0x0122
UNRECOGNIZED = 0x0211


def status_of(command: Command) -> int:
    """The Status of a response (0xC000 when it has none: a malformed response is a failure)."""
    return command.us(dimse.STATUS) if dimse.STATUS in command.elements else UNABLE_TO_PROCESS


def is_pending(command: Command) -> bool:
    return status_of(command) in PENDING


def move_destination(command: Command) -> str:
    return command.text(MOVE_DESTINATION)


def relay(command: Command, replace: Iterable[tuple[int, bytes]], drop: Iterable[int] = ()) -> bytes:
    """``command`` re-encoded with the elements of ``replace`` set and those of ``drop`` removed."""
    elements = {e: v for e, v in command.elements.items() if e != 0x0000}
    for e in drop:
        elements.pop(e, None)
    elements.update(replace)
    return dimse.encode_command(elements.items(), command.detail)


def request(command: Command, message_id: int) -> bytes:
    """A request passed on: the same command set with our Message ID."""
    return relay(command, [(dimse.MESSAGE_ID, dimse.us(message_id))])


def response(
    command: Command, responding_to: int, *, field: int | None = None, sop_class: str = "",
    replace: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A response passed on: the same command set answering ``responding_to`` (and, when the
    operation changed on the way, another Command Field and Affected SOP Class; ``replace``: more
    elements set, an Error Comment)."""
    replace = [*replace, (dimse.MESSAGE_ID_RESPONDED, dimse.us(responding_to))]
    if field is not None:
        replace.append((dimse.COMMAND_FIELD, dimse.us(field)))
    if sop_class:
        replace.append((dimse.AFFECTED_SOP_CLASS, uid(sop_class)))
    return relay(command, replace, drop=(dimse.MESSAGE_ID,))


def store_request(command: Command, message_id: int, *, originator_aet: str = "", originator_id: int = 0) -> bytes:
    """A C-STORE sub-operation passed on (to the requester of a C-GET, or to a move destination,
    which also learns who asked for the move)."""
    replace = [(dimse.MESSAGE_ID, dimse.us(message_id))]
    if originator_aet:
        replace += [
            (dimse.MOVE_ORIGINATOR_AET, text(originator_aet, 16)),
            (dimse.MOVE_ORIGINATOR_ID, dimse.us(originator_id)),
        ]
    return relay(command, replace)


def get_request(move: Command, message_id: int, get_model: str) -> bytes:
    """The C-GET that serves a C-MOVE by fetching: Priority and data set type kept."""
    return relay(
        move,
        [
            (dimse.AFFECTED_SOP_CLASS, uid(get_model)),
            (dimse.COMMAND_FIELD, dimse.us(C_GET_RQ)),
            (dimse.MESSAGE_ID, dimse.us(message_id)),
        ],
        drop=(MOVE_DESTINATION,),
    )


def find_request(message_id: int, model: str, priority: int = 0) -> bytes:
    """A C-FIND-RQ of the gateway's own (listing the instances a C-MOVE designates)."""
    return dimse.encode_command(
        [
            (dimse.AFFECTED_SOP_CLASS, uid(model)),
            (dimse.COMMAND_FIELD, dimse.us(C_FIND_RQ)),
            (dimse.MESSAGE_ID, dimse.us(message_id)),
            (dimse.PRIORITY, dimse.us(priority)),
            (dimse.DATASET_TYPE, dimse.us(dimse.DATASET_PRESENT)),
        ]
    )


def cancel(responding_to: int) -> bytes:
    """C-CANCEL-RQ for the operation with Message ID ``responding_to``."""
    return dimse.encode_command(
        [
            (dimse.COMMAND_FIELD, dimse.us(C_CANCEL_RQ)),
            (dimse.MESSAGE_ID_RESPONDED, dimse.us(responding_to)),
            (dimse.DATASET_TYPE, dimse.us(dimse.NO_DATASET)),
        ]
    )


def final(
    field: int, responding_to: int, sop_class: str, status: int, comment: str = "",
    counts: tuple[int, int, int] | None = None, *, dataset: bool = False,
) -> bytes:
    """A response of our own (a refusal, an unreachable PACS); ``counts`` are (completed, failed,
    warning) for C-GET/C-MOVE; ``dataset`` when an identifier follows (Failed SOP Instance UID List)."""
    elements = [
        (dimse.AFFECTED_SOP_CLASS, uid(sop_class)),
        (dimse.COMMAND_FIELD, dimse.us(field)),
        (dimse.MESSAGE_ID_RESPONDED, dimse.us(responding_to)),
        (dimse.DATASET_TYPE, dimse.us(dimse.DATASET_PRESENT if dataset else dimse.NO_DATASET)),
        (dimse.STATUS, dimse.us(status)),
    ]
    if comment and status != SUCCESS:
        elements.append((dimse.ERROR_COMMENT, text(comment, 64)))
    if counts is not None:
        completed, failed, warning = counts
        elements += [
            (COMPLETED, dimse.us(completed)),
            (FAILED, dimse.us(failed)),
            (WARNING, dimse.us(warning)),
        ]
    return dimse.encode_command(elements)


def uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def text(value: str, limit: int) -> bytes:
    raw = value.strip().encode("ascii", "replace")[:limit]
    return raw + b" " if len(raw) % 2 else raw
