"""Units of dicomproxy.dicom.qr.retrieve: when a C-MOVE answer means "the PACS does not know the
destination", the Auto book's memory, the level deduced for an identifier without one."""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomproxy.dicom import datasets, dimse, presentation
from dicomproxy.dicom.qr import messages
from dicomproxy.dicom.qr.destinations import DestinationBook
from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.qr.retrieve import deduce_level, refuses_destination


def move_rsp(status: int, counts: tuple[int, int, int] | None = None) -> dimse.Command:
    raw = messages.final(messages.C_MOVE_RSP, 1, presentation.STUDY_ROOT_MOVE, status, "", counts)
    return dimse.decode_command(raw)


def test_refuses_destination() -> None:
    assert refuses_destination(move_rsp(messages.MOVE_DESTINATION_UNKNOWN))
    assert refuses_destination(move_rsp(messages.UNABLE_TO_PROCESS, (0, 0, 0)))  # Orthanc 1.10's answer
    assert refuses_destination(move_rsp(messages.UNABLE_TO_PROCESS))
    assert not refuses_destination(move_rsp(messages.UNABLE_TO_PROCESS, (0, 2, 0)))  # it tried: a real failure
    assert not refuses_destination(move_rsp(0xFF00, (1, 0, 0)))
    assert not refuses_destination(move_rsp(messages.SUCCESS, (0, 0, 0)))


def test_destination_book_forgets_after_the_recheck_period() -> None:
    now = [100.0]
    book = DestinationBook(recheck=60, clock=lambda: now[0])
    assert not book.unknown_to_pacs("DEST")
    book.learn_unknown("DEST")
    assert book.unknown_to_pacs("DEST") and not book.unknown_to_pacs("OTHER")
    now[0] += 59.9
    assert book.unknown_to_pacs("DEST")
    now[0] += 0.1
    assert not book.unknown_to_pacs("DEST")  # asked again: the PACS may know it by now


def _identifier(**keys: str) -> Identifier:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return Identifier(datasets.encode(ds, presentation.EXPLICIT), presentation.EXPLICIT)


def test_deduce_level_is_the_deepest_unique_key_present() -> None:
    assert deduce_level(_identifier(PatientID="P", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3")) == "SERIES"
    assert deduce_level(_identifier(StudyInstanceUID="1.2", SOPInstanceUID="1.2.3.4")) == "IMAGE"
    assert deduce_level(_identifier(PatientID="P", StudyInstanceUID="1.2")) == "STUDY"
    assert deduce_level(_identifier(PatientID="P", AccessionNumber="A")) == "PATIENT"
    assert deduce_level(_identifier(AccessionNumber="A", StudyInstanceUID="")) == ""
