"""Presentation contexts and transfer syntaxes (PS3.8 7.1.1.13, PS3.7 annex D): every rule the
DICOM side follows when it accepts or proposes contexts, and when it re-encodes an instance.
The acceptor, the forwarder, the ``send`` command and the retrieve service all ask here.

Accepting (:func:`negotiate`): a proposed context is accepted when its abstract syntax is one
the listener serves, with the *requestor's* first proposed transfer syntax that the gateway
takes. (pynetdicom's ``negotiate_as_acceptor`` picks by the acceptor's order instead, which
would make a modality proposing JPEG and Explicit VR decompress what it could have sent as is.)

Proposing (:func:`proposals`): an instance is offered in its own transfer syntax and in the
uncompressed ones, one syntax per context, so the acceptor's answer says exactly which
encodings it takes. Sending (:func:`choose`): its own syntax if accepted, else an uncompressed
one; compressed data is transcoded only with ``Dicom:Transcode`` ``ToAccepted``
(:mod:`.transcode`), otherwise a compressed instance the peer refuses in its own syntax is
refused for good.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Collection, Container, Iterable, Sequence
from typing import TypeVar

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID
from pynetdicom import AllStoragePresentationContexts

from dicomproxy.dicom import datasets
from dicomproxy.dicom.transcode import NO_TRANSCODING, Transcoding, decodable
from dicomproxy.dicom.transcode import target as transcode_target
from dicomproxy.dicom.ul.pdu import ProposedContext

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
UNCOMPRESSED = (EXPLICIT, IMPLICIT)
"""In the order the gateway prefers them when it re-encodes."""

TRANSFER_SYNTAXES = (
    IMPLICIT,
    EXPLICIT,
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)
"""The common syntaxes, in the order retrieve contexts propose them (:func:`retrieve_pairs`)."""

ALL_TRANSFER_SYNTAXES = frozenset(uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax")
"""What the storage side accepts (and stores as it came): every transfer syntax of the standard
pydicom knows (59 in pydicom 3.0: JPEG 2000 Part 2, HTJ2K, MPEG-2/4, HEVC, JPEG XL, deflated
image frames...). A private transfer syntax is refused: the gateway could not read the data set's
header (its SOP Instance UID, its study) to check and route it."""

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
QUERY_RETRIEVE_SOP_CLASSES = frozenset(
    f"1.2.840.10008.5.1.4.1.2.{model}.{op}" for model in (1, 2, 3) for op in (1, 2, 3)
) | frozenset({"1.2.840.10008.5.1.4.31"})  # Patient/Study Root, Patient/Study Only; FIND, MOVE, GET; Worklist

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
"""The Query/Retrieve models the gateway serves (PS3.4 C.6)."""

MAX_CONTEXTS = 128
"""PS3.8 9.3.2.2: context IDs are the odd numbers 1..255."""

ACCEPTANCE = 0
ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class NotAccepted(Exception):
    """The peer's accepted contexts leave no way to send this instance (refused for good)."""


def negotiate(
    contexts: Iterable[ProposedContext], serves: Callable[[str], bool],
    syntaxes: Container[str] = ALL_TRANSFER_SYNTAXES,
) -> list[tuple[int, int, str]]:
    """``(context id, result, transfer syntax)`` for each proposed context (see the module docstring)."""
    results = []
    for cx in contexts:
        fallback = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else IMPLICIT
        if not serves(cx.abstract_syntax):
            results.append((cx.context_id, ABSTRACT_SYNTAX_NOT_SUPPORTED, fallback))
            continue
        chosen = next((ts for ts in cx.transfer_syntaxes if ts in syntaxes), None)
        if chosen is None:
            results.append((cx.context_id, TRANSFER_SYNTAXES_NOT_SUPPORTED, fallback))
        else:
            results.append((cx.context_id, ACCEPTANCE, chosen))
    return results


STANDARD_ROOT = "1.2.840.10008."


@functools.lru_cache(maxsize=1024)
def is_storage(abstract_syntax: str) -> bool:
    """A storage SOP class: pynetdicom's list, any other the standard registry names a storage SOP
    class (retired ones included, e.g. Ultrasound Image Storage (Retired) 1.2.840.10008.5.1.4.1.1.6,
    or classes newer than pynetdicom's list), and any private (non-standard) SOP class. A
    standard UID that is not a storage class (Query/Retrieve, Storage Commitment, MPPS, ...) is
    not: the storage side would not know what to do with its messages."""
    if abstract_syntax in STORAGE_SOP_CLASSES:
        return True
    if not abstract_syntax.startswith(STANDARD_ROOT):
        return bool(abstract_syntax) and len(abstract_syntax) <= 64
    entry = UID_dictionary.get(abstract_syntax)
    if abstract_syntax.startswith("1.2.840.10008.5.1.4.1.1."):
        return entry is None or "Storage" in entry[0]
    return entry is not None and entry[1] == "SOP Class" and "Storage" in entry[0] and "Commitment" not in entry[0]


def serves_storage(abstract_syntax: str) -> bool:
    """What the storage acceptor serves itself: any storage SOP class (:func:`is_storage`) and
    Verification."""
    return abstract_syntax == VERIFICATION or is_storage(abstract_syntax)


def is_query_retrieve(abstract_syntaxes: Iterable[str]) -> bool:
    return any(a in QUERY_RETRIEVE_SOP_CLASSES for a in abstract_syntaxes)


# --------------------------------------------------------------------------- proposing
Pair = tuple[str, str]  # (abstract syntax, transfer syntax): one proposed context


def proposals(sop_class: str, transfer_syntax: str) -> tuple[Pair, ...]:
    """The contexts to propose for sending an instance: its own syntax, then the uncompressed ones."""
    return tuple(dict.fromkeys(((sop_class, transfer_syntax), *((sop_class, u) for u in UNCOMPRESSED))))


def contexts_of(pairs: Sequence[Pair]) -> list[ProposedContext]:
    """Pair ``i`` becomes presentation context ``2 * i + 1``."""
    if len(pairs) > MAX_CONTEXTS:
        raise ValueError(f"{len(pairs)} presentation contexts: DICOM allows at most {MAX_CONTEXTS}")
    return [ProposedContext(2 * i + 1, a, (ts,)) for i, (a, ts) in enumerate(pairs)]


class ContextBook:
    """The pairs a long-lived sender proposes, most recently used last, at most ``limit``."""

    def __init__(self, limit: int = MAX_CONTEXTS - 2) -> None:
        self.limit = limit
        self.pairs: OrderedDict[Pair, None] = OrderedDict()

    def want(self, sop_class: str, transfer_syntax: str) -> bool:
        """Record the pairs this instance may use; True if one was not proposed before."""
        added = False
        for pair in proposals(sop_class, transfer_syntax):
            if pair in self.pairs:
                self.pairs.move_to_end(pair)
            else:
                self.pairs[pair] = None
                added = True
        while len(self.pairs) > self.limit:
            self.pairs.popitem(last=False)
        return added

    def contexts(self) -> list[Pair]:
        return list(self.pairs)


T = TypeVar("T")


def batches(items: Sequence[T], pair_of: Callable[[T], Pair], limit: int = MAX_CONTEXTS - 2) -> list[list[T]]:
    """Split ``items`` (in order) so that the proposals of each batch fit ``limit`` contexts."""
    out: list[list[T]] = []
    current: list[T] = []
    pairs: dict[Pair, None] = {}
    for item in items:
        new = [p for p in proposals(*pair_of(item)) if p not in pairs]
        if current and len(pairs) + len(new) > limit:
            out.append(current)
            current, pairs = [], {}
            new = list(proposals(*pair_of(item)))
        pairs.update(dict.fromkeys(new))
        current.append(item)
    if current:
        out.append(current)
    return out


def batch_pairs(items: Iterable[T], pair_of: Callable[[T], Pair]) -> list[Pair]:
    return list(dict.fromkeys(p for item in items for p in proposals(*pair_of(item))))


# --------------------------------------------------------------------------- sending
def choose(
    accepted: Collection[Pair], sop_class: str, transfer_syntax: str, peer: str = "the peer",
    transcoding: Transcoding = NO_TRANSCODING,
) -> str:
    """The transfer syntax to send an instance in: its own; else, uncompressed, another
    uncompressed one to re-encode it to; else, compressed and with ``transcoding`` allowed, the
    syntax to transcode it to (:func:`.transcode.target`). Raises :class:`NotAccepted` when
    there is none."""
    if (sop_class, transfer_syntax) in accepted:
        return transfer_syntax
    if UID(transfer_syntax).is_compressed:
        if transcoding.allowed:
            to = transcode_target(transfer_syntax, [ts for a, ts in accepted if a == sop_class])
            if to is not None:
                return to
            if not decodable(transfer_syntax):
                raise NotAccepted(f"{peer} does not accept {UID(transfer_syntax).name} for {UID(sop_class).name}, "
                                  "and the gateway has no codec to transcode it")
            raise NotAccepted(f"{peer} does not accept {UID(sop_class).name} ({sop_class}) in any syntax the "
                              "gateway can transcode to")
        raise NotAccepted(
            f"{peer} does not accept {UID(transfer_syntax).name} for {UID(sop_class).name}; "
            f"compressed data is not transcoded with {transcoding.key} Never (ToAccepted would)"
        )
    for alt in UNCOMPRESSED:
        if (sop_class, alt) in accepted:
            return alt
    raise NotAccepted(f"{peer} does not accept SOP class {UID(sop_class).name} ({sop_class})")


def transcode(
    data: bytes, from_syntax: str, to_syntax: str, transcoding: Transcoding = NO_TRANSCODING, what: str = "an instance"
) -> bytes:
    """Re-encode an instance to the syntax :func:`choose` gave (decoding compressed pixel data
    only when ``transcoding`` allows it)."""
    if from_syntax == to_syntax:
        return data
    try:
        if UID(from_syntax).is_compressed or UID(to_syntax).is_compressed:
            return transcoding.run(data, from_syntax, to_syntax, what)
        return datasets.encode(datasets.decode(data, from_syntax), to_syntax)
    except Exception as e:
        raise NotAccepted(f"cannot re-encode the instance as {UID(to_syntax).name}: {e}") from None


def retrieve_pairs(sop_classes: Sequence[str], reserved: int = 0) -> list[Pair]:
    """Storage contexts for receiving or relaying retrieved instances in their stored encoding:
    every syntax for as many SOP classes as the budget allows, the uncompressed ones for the rest."""
    budget = MAX_CONTEXTS - reserved
    full = max(0, (budget - 2 * len(sop_classes)) // max(1, len(TRANSFER_SYNTAXES) - 2))
    out: list[Pair] = []
    for i, sop_class in enumerate(sop_classes):
        for ts in TRANSFER_SYNTAXES if i < full else TRANSFER_SYNTAXES[:2]:
            if len(out) >= budget:
                return out
            out.append((sop_class, ts))
    return out
