"""Units of dicomproxy.dicom.qr.contexts: what a Query/Retrieve requester gets accepted (its own
first transfer syntax, the SCP role for storage it takes for C-GET) and what goes to the PACS."""

from __future__ import annotations

from dicomproxy.dicom import presentation
from dicomproxy.dicom.qr import contexts
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import ProposedContext

CT = "1.2.840.10008.5.1.4.1.1.2"


def _negotiate(proposed: list[ProposedContext], roles: tuple[str, ...] = ()) -> contexts.Negotiated:
    rq = pdus.associate_rq("GATEWAY", "REQUESTER", proposed, 16384, roles)
    return contexts.negotiate(rq, pdus.Request.of(rq))


def test_the_requesters_first_syntax_wins_and_a_cget_requester_receives_storage() -> None:
    negotiated = _negotiate([
        ProposedContext(1, presentation.STUDY_ROOT_GET, (presentation.IMPLICIT, presentation.EXPLICIT)),
        ProposedContext(3, CT, (presentation.EXPLICIT, presentation.IMPLICIT)),
        ProposedContext(5, presentation.STUDY_ROOT_FIND, (presentation.EXPLICIT,)),
        ProposedContext(7, "1.2.3.4.5.6", (presentation.EXPLICIT,)),  # nothing the gateway serves
    ], roles=(CT,))
    assert negotiated.accepted == {
        1: (presentation.STUDY_ROOT_GET, presentation.IMPLICIT),
        3: (CT, presentation.EXPLICIT),
        5: (presentation.STUDY_ROOT_FIND, presentation.EXPLICIT),
    }
    assert [r for cid, r, _ in negotiated.results if cid == 7] != [presentation.ACCEPTANCE]
    assert negotiated.scp_role == frozenset({CT})
    assert negotiated.storage_contexts() == {3: (CT, presentation.EXPLICIT)}


def test_no_role_selection_no_storage_contexts_to_receive_on() -> None:
    negotiated = _negotiate([ProposedContext(1, presentation.STUDY_ROOT_GET, (presentation.EXPLICIT,)),
                             ProposedContext(3, CT, (presentation.EXPLICIT,))])
    assert negotiated.storage_contexts() == {} and negotiated.roles == []


def test_what_goes_to_the_pacs() -> None:
    for preferred in (presentation.EXPLICIT, presentation.IMPLICIT):
        pairs = contexts.model_pairs(presentation.STUDY_ROOT_FIND, preferred)
        assert pairs[0] == (presentation.STUDY_ROOT_FIND, preferred)  # the requester's syntax first
        assert len(set(pairs)) == len(pairs) and {presentation.EXPLICIT, presentation.IMPLICIT} <= {t for _, t in pairs}
    assert contexts.find_model_of(presentation.PATIENT_ROOT_MOVE) == presentation.PATIENT_ROOT_FIND
    assert contexts.find_model_of(presentation.STUDY_ROOT_GET) == presentation.STUDY_ROOT_FIND
    assert contexts.get_model_of(presentation.PATIENT_ROOT_MOVE) == presentation.PATIENT_ROOT_GET
    assert contexts.get_model_of(presentation.STUDY_ROOT_MOVE) == presentation.STUDY_ROOT_GET
