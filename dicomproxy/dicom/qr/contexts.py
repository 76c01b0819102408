"""Presentation contexts of Query/Retrieve: what the gateway accepts from a requester, and what it
proposes to the PACS (or a move destination) so that the bytes can pass unchanged.

Accepting: the Query/Retrieve models (Patient and Study Root C-FIND/C-MOVE/C-GET, Modality
Worklist C-FIND) and Verification in Implicit or Explicit VR Little Endian; storage SOP classes
in every syntax the gateway takes (C-GET sub-operations come back on them; a requester may also
store). The transfer syntax is the requester's first choice among those
(:func:`dicomproxy.dicom.presentation.negotiate`). A requester's SCP/SCU role selection for an
accepted storage SOP class is accepted as proposed (a C-GET requester takes the SCP role).

Proposing to the PACS: the model of the request once per uncompressed syntax, the requester's
first, each in its own context, so the PACS's answer says whether the requester's encoding can
be passed through; for a C-GET, exactly the storage contexts the requester accepted, with the
SCP role, so the PACS sends every instance in the encoding the requester is waiting for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dicomproxy.dicom import presentation
from dicomproxy.dicom.ul import pdu as pdus

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
FIND_MODELS = frozenset({presentation.PATIENT_ROOT_FIND, presentation.STUDY_ROOT_FIND, MODALITY_WORKLIST_FIND})
MOVE_MODELS = frozenset({presentation.PATIENT_ROOT_MOVE, presentation.STUDY_ROOT_MOVE})
GET_MODELS = frozenset({presentation.PATIENT_ROOT_GET, presentation.STUDY_ROOT_GET})
MODELS = FIND_MODELS | MOVE_MODELS | GET_MODELS
MODEL_SYNTAXES = (presentation.IMPLICIT, presentation.EXPLICIT)

Pair = presentation.Pair


@dataclass(frozen=True)
class Negotiated:
    """The answer to one A-ASSOCIATE-RQ."""

    results: list[tuple[int, int, str]]  # (context id, result, transfer syntax) per proposed context
    accepted: dict[int, Pair]  # context id -> (abstract syntax, transfer syntax)
    roles: list[pdus.RoleReply]
    scp_role: frozenset[str]  # storage SOP classes for which the requester takes the SCP role

    def storage_contexts(self) -> dict[int, Pair]:
        """The accepted contexts on which the requester receives C-STOREs (C-GET sub-operations)."""
        return {cid: pair for cid, pair in self.accepted.items() if pair[0] in self.scp_role}


def _serves_model(abstract: str) -> bool:
    return abstract in MODELS or abstract == presentation.VERIFICATION


def negotiate(rq: pdus.A_ASSOCIATE_RQ, request: pdus.Request) -> Negotiated:
    """Accept what a Query/Retrieve association may use (see the module docstring)."""
    models = {cid: (r, ts) for cid, r, ts in presentation.negotiate(request.contexts, _serves_model, MODEL_SYNTAXES)}
    storage = {
        cid: (r, ts)
        for cid, r, ts in presentation.negotiate(request.contexts, lambda a: a in presentation.STORAGE_SOP_CLASSES)
    }
    results: list[tuple[int, int, str]] = []
    accepted: dict[int, Pair] = {}
    for cx in request.contexts:
        result, ts = models[cx.context_id]
        if cx.abstract_syntax in presentation.STORAGE_SOP_CLASSES:
            result, ts = storage[cx.context_id]
        results.append((cx.context_id, result, ts))
        if result == presentation.ACCEPTANCE:
            accepted[cx.context_id] = (cx.abstract_syntax, ts)
    roles: list[pdus.RoleReply] = []
    scp_role: set[str] = set()
    info = rq.user_information
    accepted_classes = {a for a, _ in accepted.values()}
    for uid, item in (info.role_selection if info is not None else {}).items():
        sop_class = str(uid)
        if sop_class in presentation.STORAGE_SOP_CLASSES and sop_class in accepted_classes:
            roles.append((sop_class, bool(item.scu_role), bool(item.scp_role)))
            if item.scp_role:
                scp_role.add(sop_class)
    return Negotiated(results, accepted, roles, frozenset(scp_role))


def model_pairs(model: str, preferred: str) -> list[Pair]:
    """The request's model in each uncompressed syntax, ``preferred`` (the requester's) first."""
    return [(model, ts) for ts in dict.fromkeys((preferred, *presentation.UNCOMPRESSED))]


def find_model_of(retrieve_model: str) -> str:
    """The C-FIND model of the same root as a C-MOVE/C-GET model."""
    if retrieve_model in (presentation.PATIENT_ROOT_MOVE, presentation.PATIENT_ROOT_GET):
        return presentation.PATIENT_ROOT_FIND
    return presentation.STUDY_ROOT_FIND


def get_model_of(move_model: str) -> str:
    """The C-GET model of the same root as a C-MOVE model."""
    if move_model == presentation.PATIENT_ROOT_MOVE:
        return presentation.PATIENT_ROOT_GET
    return presentation.STUDY_ROOT_GET


def storage_pairs(contexts: Sequence[Pair], budget: int) -> list[Pair]:
    """``contexts`` without repeats, at most ``budget`` of them."""
    return list(dict.fromkeys(contexts))[:budget]
