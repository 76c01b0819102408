"""dicomproxy.dicom.presentation: every presentation context and transfer syntax rule."""

from __future__ import annotations

import pytest

from dicomproxy.dicom import datasets, presentation
from dicomproxy.dicom.presentation import EXPLICIT, IMPLICIT, MAX_CONTEXTS, ContextBook, NotAccepted
from dicomproxy.dicom.ul.pdu import ProposedContext
from tests import dicom_samples

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
RLE = "1.2.840.10008.1.2.5"
JPEG = "1.2.840.10008.1.2.4.50"


def test_the_requestors_first_acceptable_syntax_wins() -> None:
    contexts = [
        ProposedContext(1, CT, (RLE, EXPLICIT, IMPLICIT)),  # the modality prefers its compressed encoding
        ProposedContext(3, CT, (IMPLICIT, EXPLICIT)),
        ProposedContext(5, CT, ("1.2.3.4.5.6",)),  # a syntax the gateway does not take
        ProposedContext(7, "1.2.3", (EXPLICIT,)),  # not a storage SOP class
        ProposedContext(9, presentation.VERIFICATION, (IMPLICIT,)),
    ]
    assert presentation.negotiate(contexts, presentation.serves_storage) == [
        (1, 0, RLE), (3, 0, IMPLICIT), (5, 4, "1.2.3.4.5.6"), (7, 3, EXPLICIT), (9, 0, IMPLICIT)]


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
    with pytest.raises(NotAccepted, match="never transcoded"):
        presentation.choose({(CT, EXPLICIT)}, CT, RLE, "ORTHANC@pacs:4242")
    with pytest.raises(NotAccepted, match="does not accept SOP class"):
        presentation.choose({(MR, EXPLICIT)}, CT, EXPLICIT)


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
