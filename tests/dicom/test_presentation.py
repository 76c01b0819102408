"""dicomproxy.dicom.presentation: every presentation context and transfer syntax rule."""

from __future__ import annotations

import pytest

from dicomproxy.dicom import datasets, presentation, transcode
from dicomproxy.dicom.presentation import EXPLICIT, IMPLICIT, MAX_CONTEXTS, ContextBook, NotAccepted
from dicomproxy.dicom.transcode import TranscodeError, Transcoding
from dicomproxy.dicom.ul.pdu import ProposedContext
from tests import dicom_samples

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RLE = "1.2.840.10008.1.2.5"
JPEG = "1.2.840.10008.1.2.4.50"
HTJ2K = "1.2.840.10008.1.2.4.201"
MPEG4 = "1.2.840.10008.1.2.4.102"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"


def test_the_requestors_first_acceptable_syntax_wins() -> None:
    contexts = [
        ProposedContext(1, CT, (RLE, EXPLICIT, IMPLICIT)),  # the modality prefers its compressed encoding
        ProposedContext(3, CT, (IMPLICIT, EXPLICIT)),
        ProposedContext(5, CT, ("1.2.3.4.5.6",)),  # a syntax the gateway does not take
        ProposedContext(7, "1.2.840.10008.5.1.4.1.2.2.1", (EXPLICIT,)),  # a standard class, not storage
        ProposedContext(9, presentation.VERIFICATION, (IMPLICIT,)),
        ProposedContext(11, "1.2.3", (HTJ2K, EXPLICIT)),  # a private SOP class, the newest syntax
        ProposedContext(13, US_RETIRED, (MPEG4,)),
    ]
    assert presentation.negotiate(contexts, presentation.serves_storage) == [
        (1, 0, RLE), (3, 0, IMPLICIT), (5, 4, "1.2.3.4.5.6"), (7, 3, EXPLICIT), (9, 0, IMPLICIT), (11, 0, HTJ2K),
        (13, 0, MPEG4)]


def test_any_storage_sop_class_is_storage() -> None:
    assert presentation.is_storage(US_RETIRED) and presentation.is_storage(CT)
    assert presentation.is_storage("1.2.276.0.7230010.3.1.0.1") and presentation.is_storage("1.2.840.10008.5.1.4.38.1")
    assert not presentation.is_storage("1.2.840.10008.1.20.1")  # Storage Commitment Push Model
    assert not presentation.is_storage("1.2.840.10008.3.1.2.3.3")  # Modality Performed Procedure Step
    assert {"1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.107"} <= (
        presentation.ALL_TRANSFER_SYNTAXES)


def test_query_retrieve_models_are_recognised() -> None:
    assert presentation.is_query_retrieve(["1.2.840.10008.5.1.4.1.2.2.1", CT])
    assert presentation.is_query_retrieve(["1.2.840.10008.5.1.4.31"])  # worklist
    assert not presentation.is_query_retrieve([CT, presentation.VERIFICATION])


def test_proposals_offer_the_own_syntax_then_the_uncompressed_ones() -> None:
    assert presentation.proposals(CT, RLE) == ((CT, RLE), (CT, EXPLICIT), (CT, IMPLICIT))
    assert presentation.proposals(CT, IMPLICIT) == ((CT, IMPLICIT), (CT, EXPLICIT))
    contexts = presentation.contexts_of([(CT, RLE), (CT, EXPLICIT)])
    assert [(c.context_id, c.transfer_syntaxes) for c in contexts] == [(1, (RLE,)), (3, (EXPLICIT,))]
    with pytest.raises(ValueError, match="at most 128"):
        presentation.contexts_of([(CT, str(i)) for i in range(MAX_CONTEXTS + 1)])


def test_the_context_book_keeps_the_most_recent_pairs() -> None:
    book = ContextBook(limit=4)
    assert book.want(CT, RLE)
    assert not book.want(CT, EXPLICIT)  # already proposed with the RLE instance
    assert book.want(MR, JPEG)
    assert len(book.contexts()) == 4 and (MR, JPEG) in book.contexts() and (CT, RLE) not in book.contexts()


def test_batches_fit_the_context_limit_in_order() -> None:
    items = [(f"1.2.3.{i}", RLE) for i in range(100)]
    batches = presentation.batches(items, lambda x: x, limit=10)
    assert [x for batch in batches for x in batch] == items
    assert all(len(presentation.batch_pairs(b, lambda x: x)) <= 10 for b in batches)
    assert len(batches) == 34  # 3 contexts per SOP class, 3 classes per batch


def test_choose_never_transcodes_compressed_data() -> None:
    assert presentation.choose({(CT, RLE)}, CT, RLE) == RLE
    assert presentation.choose({(CT, IMPLICIT)}, CT, EXPLICIT) == IMPLICIT  # re-encode uncompressed
    with pytest.raises(NotAccepted, match="compressed data is not transcoded with Dicom:Transcode Never"):
        presentation.choose({(CT, EXPLICIT)}, CT, RLE, "ORTHANC@pacs:4242")
    with pytest.raises(NotAccepted, match="does not accept SOP class"):
        presentation.choose({(MR, EXPLICIT)}, CT, EXPLICIT)


def test_choose_with_transcoding_picks_explicit_then_implicit() -> None:
    allowed = Transcoding(True, 1 << 20)
    assert presentation.choose({(CT, IMPLICIT), (CT, EXPLICIT)}, CT, JPEG, transcoding=allowed) == EXPLICIT
    assert presentation.choose({(CT, IMPLICIT), (MR, EXPLICIT)}, CT, JPEG, transcoding=allowed) == IMPLICIT
    assert presentation.choose({(CT, RLE)}, CT, JPEG, transcoding=allowed) == RLE  # lossless re-compression
    with pytest.raises(NotAccepted, match="any syntax the gateway can transcode to"):
        presentation.choose({(MR, EXPLICIT)}, CT, JPEG, transcoding=allowed)
    with pytest.raises(NotAccepted, match="no codec"):
        presentation.choose({(CT, EXPLICIT)}, CT, MPEG4, transcoding=allowed)


def test_transcoding_refuses_what_decodes_past_the_limit() -> None:
    ds = dicom_samples.build_dataset(patient_id="T", patient_name="T^T", size=(64, 64))
    ds.compress(RLE, encoding_plugin="pydicom")
    raw = datasets.encode(ds, RLE)
    with pytest.raises(TranscodeError, match="exceed Dicom:TranscodeMaxMB"):
        transcode.transcode(raw, RLE, EXPLICIT, max_bytes=64 * 64 * 2 - 1)
    out = transcode.transcode(raw, RLE, EXPLICIT, max_bytes=64 * 64 * 2)
    assert datasets.decode(out, EXPLICIT).SOPInstanceUID == ds.SOPInstanceUID  # the same instance


def test_transcode_between_uncompressed_syntaxes(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = dicom_samples.build_dataset(patient_id="T", patient_name="T^T")
    explicit = datasets.encode(ds, EXPLICIT)
    implicit = presentation.transcode(explicit, EXPLICIT, IMPLICIT)
    assert datasets.decode(implicit, IMPLICIT).SOPInstanceUID == ds.SOPInstanceUID
    assert presentation.transcode(explicit, EXPLICIT, EXPLICIT) is explicit

    def fails(data: bytes, ts: str) -> None:
        raise ValueError("bad element")

    monkeypatch.setattr(datasets, "decode", fails)
    with pytest.raises(NotAccepted, match="cannot re-encode the instance as Implicit VR Little Endian: bad element"):
        presentation.transcode(explicit, EXPLICIT, IMPLICIT)


@pytest.mark.parametrize(("classes", "reserved"), [(1, 0), (5, 1), (60, 1), (200, 0)])
def test_retrieve_pairs_stay_within_128_contexts(classes: int, reserved: int) -> None:
    sop_classes = [f"1.2.3.{i}" for i in range(classes)]
    pairs = presentation.retrieve_pairs(sop_classes, reserved)
    assert len(pairs) + reserved <= MAX_CONTEXTS
    covered = {sc for sc, _ in pairs}
    assert covered == set(sop_classes[: len(covered)])
    if classes <= 60:
        assert covered == set(sop_classes)  # every class at least uncompressed
    if classes == 1:
        assert len(pairs) == len(presentation.TRANSFER_SYNTAXES)  # one class: every syntax
