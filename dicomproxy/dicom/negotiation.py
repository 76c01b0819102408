"""The PACS's answer to a modality's presentation contexts: the mirror association and the
cache of its answers.

A modality's A-ASSOCIATE-RQ is put to the PACS as it is: the same AE titles (by default, see
:meth:`.forwarder.ForwardTarget.titles`), the same context ids, abstract syntaxes and transfer
syntaxes, in the same order (less the contexts the storage side could not serve anyway: non-storage
standard SOP classes, private transfer syntaxes). The PACS's A-ASSOCIATE-AC then *is* the answer
the modality gets, context by context, so a JPEG context the PACS refuses is refused at
negotiation, as it would be if the modality talked to the PACS directly.

* In relay mode that association is kept and carries the instances (:mod:`.relay`).
* In store-and-forward mode, and for the spool fallback, it is a probe: released at once, its
  answer cached for ``Dicom:NegotiationCacheSeconds`` per (titles, proposal), and forgotten when
  a forward is refused for its context. When the PACS cannot be reached and nothing is cached,
  the storage side takes any storage SOP class in any transfer syntax it can read
  (:func:`.presentation.negotiate`).

The request is made by :func:`.ul.requestor.open_association` (the one way every outbound
association is opened): a non-blocking socket on the event loop, which the relay hands to the
association's thread afterwards (:class:`.ul.requestor.Opened`). With ``Dicom:Upstream:Tls`` that socket is an
:class:`ssl.SSLSocket`: the relay's thread reads and writes it blocking, like a plain one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

from dicomproxy.dicom import presentation
from dicomproxy.dicom.presentation import ABSTRACT_SYNTAX_NOT_SUPPORTED, ALL_TRANSFER_SYNTAXES, UNCOMPRESSED
from dicomproxy.dicom.transcode import decodable
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul.pdu import ProposedContext

Results = list[tuple[int, int, str]]
"""``(context id, result, transfer syntax)`` per proposed context (as :func:`.pdu.associate_ac` takes)."""

CACHE_ENTRIES = 256


def forwardable(contexts: Sequence[ProposedContext], transcoding: bool = False) -> list[ProposedContext]:
    """The modality's contexts the PACS is asked about: storage SOP classes and Verification,
    each with the transfer syntaxes the gateway can read (others are left out, in order). With
    ``transcoding`` (``Dicom:Transcode`` ``ToAccepted``), :func:`transcode_probes` are added."""
    out = []
    for cx in contexts:
        if not presentation.serves_storage(cx.abstract_syntax):
            continue
        syntaxes = tuple(ts for ts in cx.transfer_syntaxes if ts in ALL_TRANSFER_SYNTAXES)
        if syntaxes:
            out.append(ProposedContext(cx.context_id, cx.abstract_syntax, syntaxes))
    return out + transcode_probes(out) if transcoding else out


def transcode_probes(contexts: Sequence[ProposedContext]) -> list[ProposedContext]:
    """For each SOP class the modality proposes only in compressed syntaxes the gateway can decode,
    one more context (the class in Explicit then Implicit VR Little Endian), on context ids the
    modality left free, within 128 contexts: the PACS's answer to it says whether an instance it
    refuses in its own syntax could be transcoded for it (:func:`transcoded`)."""
    used = {cx.context_id for cx in contexts}
    plain = {cx.abstract_syntax for cx in contexts if any(ts in UNCOMPRESSED for ts in cx.transfer_syntaxes)}
    wanted = dict.fromkeys(
        cx.abstract_syntax for cx in contexts
        if cx.abstract_syntax not in plain and cx.abstract_syntax != presentation.VERIFICATION
        and any(decodable(ts) for ts in cx.transfer_syntaxes)
    )
    free = (cid for cid in range(1, 256, 2) if cid not in used)
    room = presentation.MAX_CONTEXTS - len(contexts)
    classes = list(wanted)[:max(room, 0)]
    return [ProposedContext(cid, sop_class, UNCOMPRESSED) for sop_class, cid in zip(classes, free, strict=False)]


def results_for(
    contexts: Sequence[ProposedContext], ac: pdus.A_ASSOCIATE_AC, transcoding: bool = False,
    probes: Sequence[ProposedContext] = (),
) -> Results:
    """The modality's results: the PACS's for the contexts it was asked about, "abstract syntax
    not supported" for the others. With ``transcoding``, a context the PACS refused but could take
    transcoded (:func:`transcoded`) is accepted in its first syntax the gateway can decode."""
    answered = pdus.accepted_contexts(ac)
    plus = transcoded(contexts, ac, probes) if transcoding else {}
    out: Results = []
    for cx in contexts:
        fallback = cx.transfer_syntaxes[0] if cx.transfer_syntaxes else presentation.IMPLICIT
        result, ts = answered.get(cx.context_id, (ABSTRACT_SYNTAX_NOT_SUPPORTED, fallback))
        if result == presentation.ACCEPTANCE and ts not in cx.transfer_syntaxes:
            result, ts = presentation.TRANSFER_SYNTAXES_NOT_SUPPORTED, fallback  # a PACS answering out of turn
        if result != presentation.ACCEPTANCE and cx.context_id in plus:
            result, ts = presentation.ACCEPTANCE, next(t for t in cx.transfer_syntaxes if decodable(t))
        out.append((cx.context_id, result, ts or fallback))
    return out


def transcoded(
    contexts: Sequence[ProposedContext], ac: pdus.A_ASSOCIATE_AC, probes: Sequence[ProposedContext] = ()
) -> dict[int, tuple[int, str]]:
    """The modality's contexts the PACS refused whose SOP class it accepted uncompressed on another
    context (the modality's own, or one of the ``probes`` of :func:`transcode_probes`), when the
    context offers a syntax the gateway can decode: modality context id -> (PACS context id, its
    syntax), the context a transcoded instance is relayed on."""
    answered = pdus.accepted_contexts(ac)
    classes = {cx.context_id: cx.abstract_syntax for cx in (*contexts, *probes)}
    plain: dict[str, tuple[int, str]] = {}
    for cid, (result, ts) in sorted(answered.items()):
        if result == presentation.ACCEPTANCE and ts in UNCOMPRESSED and cid in classes:
            plain.setdefault(classes[cid], (cid, ts))
    out: dict[int, tuple[int, str]] = {}
    for cx in contexts:
        result, ts = answered.get(cx.context_id, (ABSTRACT_SYNTAX_NOT_SUPPORTED, ""))
        if result == presentation.ACCEPTANCE and ts in cx.transfer_syntaxes:
            continue
        if cx.abstract_syntax in plain and any(decodable(t) for t in cx.transfer_syntaxes):
            out[cx.context_id] = plain[cx.abstract_syntax]
    return out


# --------------------------------------------------------------------------- the cache
CacheKey = tuple[str, str, tuple[tuple[int, str, tuple[str, ...]], ...]]


class NegotiationCache:
    """The PACS's results per (calling, called, proposal), for ``ttl`` seconds, at most
    :data:`CACHE_ENTRIES` (the least recently used go first)."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: OrderedDict[CacheKey, tuple[float, Results]] = OrderedDict()

    @staticmethod
    def key(calling: str, called: str, contexts: Sequence[ProposedContext]) -> CacheKey:
        return calling, called, tuple((cx.context_id, cx.abstract_syntax, cx.transfer_syntaxes) for cx in contexts)

    def get(self, key: CacheKey) -> Results | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return hit[1]

    def put(self, key: CacheKey, results: Results) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, results)
        self._entries.move_to_end(key)
        while len(self._entries) > CACHE_ENTRIES:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        """A forward was refused for its presentation context: ask the PACS again next time."""
        self._entries.clear()
