"""C-GET and C-MOVE through the gateway.

**C-GET** is relayed: the PACS gets the same C-GET (the identifier as sent, or as ``onCGet``
edited it) on an association that proposes exactly the storage contexts the requester accepted
for the SCP role, so the PACS sends each instance in the encoding the requester chose. Each
C-STORE sub-operation is passed to the requester as it arrives, one PDU at a time (a 300 MB
instance never sits in the gateway), the requester's C-STORE-RSP goes back to the PACS, and the
PACS's C-GET responses (its sub-operation counts, its final status) are passed on.

**C-MOVE**, per destination (``Dicom:Modalities:{name}:Retrieve``; a destination not declared
there is refused with 0xA801):

* ``Relay``: the PACS gets the same C-MOVE and moves the instances straight to the destination
  (the PACS must know that AE title); its responses, counts and status come back as they are.
* ``FetchAndStore``: the gateway lists the designated instances with a C-FIND at IMAGE level
  (the identifier's keys as sent, ``QueryRetrieveLevel`` set to IMAGE) for their SOP classes,
  associates with the destination for them, and fetches with a C-GET (the identifier as sent):
  each instance the PACS sends is passed to the destination as it arrives (with the requester
  as Move Originator), the destination's C-STORE-RSP goes back to the PACS, so the PACS's counts
  are those of the real deliveries, and they are passed on as C-MOVE responses. No match: a
  success with no sub-operations, and no association with the destination. An identifier without
  ``QueryRetrieveLevel`` (Orthanc's C-MOVE takes one, its C-GET does not) gets the level Orthanc
  would deduce, the deepest whose unique key is present (:func:`deduce_level`), for the C-GET.
* ``Auto`` (the default): relay; when the PACS's first answer says it cannot move there (0xA801,
  or 0xC000 before any sub-operation, which is what Orthanc 1.10 answers for an AE title it does
  not know), fetch instead, and remember that for :data:`AUTO_RECHECK_SECONDS` so the next move
  to that destination goes straight to fetching. Orthanc answers the same bare 0xC000 when nothing
  matches, so after a 0xC000 the instances are listed first: none, and the PACS's answer is
  passed on and nothing is learned (measured with Orthanc 1.10: a known destination and a study
  it does not hold, an unknown destination, ``AccessionNumber=nope``: 0xC000 with no Error
  Comment and zero counts, all three).

Transcoding (``Dicom:Transcode`` ``ToAccepted``): the PACS's C-GET (for a C-GET, and for a
fetch-and-store C-MOVE) is also offered the compressed syntaxes the gateway can decode, for each
SOP class the receiver takes uncompressed (:func:`_with_transcodable`); an instance the PACS sends
in one of those is received whole, transcoded off the loop (:mod:`..transcode`) and sent on the
receiver's uncompressed context. With ``Never`` nothing changes: instances are streamed as they come.

A C-CANCEL is passed on to the PACS; what it still sends is passed on until its final response
(which carries its counts).

**From a group** (``Dicom:QueryUpstream``): a ``Federated`` group's members are first asked, all
at once, with a C-FIND of the request's identifier at its level (:meth:`_Retrieve.locate`); the
members that hold a match serve, in ``Members`` order: the first that can be associated with
serves the whole operation, one that cannot (it is down) gives way to the next holder. No member
holds it: the members in order (the first answers its own "nothing matches"). A group that is
not federated: its members in the group's mode order, with the same failover.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydicom.multival import MultiValue
from pydicom.uid import UID

from dicomproxy.config.model import ModalityAe
from dicomproxy.dicom import datasets, dimse, policy, presentation
from dicomproxy.dicom.dimse import Command
from dicomproxy.dicom.qr import contexts, messages
from dicomproxy.dicom.qr.identifier import Identifier
from dicomproxy.dicom.qr.link import DimseLink, Fragment, Pair, Received
from dicomproxy.dicom.qr.operation import MAX_IDENTIFIER, Operation, OpState, UpstreamFailed
from dicomproxy.dicom.qr.upstream import Peer
from dicomproxy.dicom.transcode import NO_TRANSCODING, TranscodeError, Transcoding, decodable

log = logging.getLogger(__name__)

STATUS_PROCESSING_FAILURE = 0x0110

@dataclass(frozen=True)
class Transcoded:
    """A sub-operation's data set transcoded for its receiver, and the context to send it on."""

    context_id: int
    data: bytes


StoreAnswer = Command | tuple[int, str]
"""The answer to a sub-operation: a C-STORE-RSP to pass back, or (status, comment) of our own."""
Deliver = Callable[[DimseLink, Command, Pair | None], Awaitable[StoreAnswer]]


def refuses_destination(command: Command) -> bool:
    """Whether the PACS's first C-MOVE response says it cannot move to the destination: 0xA801,
    or 0xC000 before any sub-operation (what Orthanc 1.10 answers for an AE title it does not
    know, without an Error Comment)."""
    status = messages.status_of(command)
    if status == messages.MOVE_DESTINATION_UNKNOWN:
        return True
    counts = (command.us(messages.COMPLETED), command.us(messages.FAILED), command.us(messages.WARNING))
    return status == messages.UNABLE_TO_PROCESS and not any(counts)


UNIQUE_KEYS = (("IMAGE", "SOPInstanceUID"), ("SERIES", "SeriesInstanceUID"), ("STUDY", "StudyInstanceUID"),
               ("PATIENT", "PatientID"))


def deduce_level(request: Identifier) -> str:
    """The Query/Retrieve level of a request that has none, as Orthanc's C-MOVE deduces it: the
    deepest level whose unique key has a value ("" when none has)."""
    for level, keyword in UNIQUE_KEYS:
        if request.get(keyword).strip():
            return level
    return ""


class _Retrieve(Operation):
    """What C-GET and C-MOVE share: the upstream C-GET whose sub-operations are delivered."""

    transcoding: Transcoding = NO_TRANSCODING
    """For the receiver of the sub-operations: ``Dicom:Transcode`` with its ``Dicom:Modalities``
    entry's override (the move destination's; for a C-GET the entry with the requester's AE title)."""

    async def locate(self, request: Identifier) -> None:
        """A federated ``Dicom:QueryUpstream``: the members holding what ``request`` designates
        become the peers to try (module docstring)."""
        if not self.services.query_federated:
            return
        members = self.services.query_members()
        held = await asyncio.gather(*(self._holds(peer, request) for peer in members))
        holders = [peer for peer, n in zip(members, held, strict=True) if n]
        log.info("%s from %s: held by %s", self.name, self.label,
                 ", ".join(map(str, holders)) or "no member that answered")
        self._candidates = holders or members

    async def _holds(self, peer: Peer, request: Identifier) -> int:
        """How many matches ``peer`` has for ``request`` at its level (0 when it cannot say)."""
        find_model = contexts.find_model_of(self.model)
        query = request.fresh()
        if not str(query.get("QueryRetrieveLevel", "") or "").strip():
            query.QueryRetrieveLevel = deduce_level(request) or "STUDY"
        link: DimseLink | None = None
        try:
            link = await self.connect(peer, contexts.model_pairs(find_model, self.transfer_syntax))
            context_id = link.context_for(find_model, self.transfer_syntax)
            if context_id is None:
                raise UpstreamFailed(f"it does not accept C-FIND ({find_model})")
            upstream_ts = link.contexts[context_id][1]
            await link.send(context_id, messages.find_request(link.next_id(), find_model),
                            datasets.encode(query, upstream_ts))
            count = 0
            while True:
                received = await self.next_response(link, messages.C_FIND_RSP, "C-FIND locating the data")
                if received.command.has_dataset:
                    await link.skip()
                if messages.is_pending(received.command):
                    count += 1
                    continue
                self.finished(link)
                await self.close(link)
                return count if messages.status_of(received.command) == messages.SUCCESS else 0
        except Exception as e:  # a member down or broken holds nothing we can have
            log.warning("%s from %s: %s could not be asked whether it holds the data: %s", self.name, self.label,
                        peer, e)
            if link is not None:
                link.abort()
            return 0

    async def relay_get(
        self, up: DimseLink, upstream_ts: str, deliver: Deliver, *, field: int | None = None, sop_class: str = "",
        request: Identifier | None = None, receiver: str = "the requester",
    ) -> None:
        """Pass on what the PACS sends for our C-GET until its final response (with an Error
        Comment naming the syntax when :meth:`_unsent` learns why the PACS sent nothing)."""
        self._delivered: set[str] = set()
        while True:
            item = await self.next_item(up, "C-GET")
            if not isinstance(item, Received) or item.command.field not in (messages.C_STORE_RQ, messages.C_GET_RSP):
                up.abort("unexpected message during a C-GET")
                raise UpstreamFailed(f"{up.label} sent an unexpected message during the C-GET",
                                     messages.CANNOT_PERFORM_SUBOPERATIONS)
            command = item.command
            if command.field == messages.C_STORE_RQ:
                await self._sub_operation(up, item, deliver)
                continue
            data = await up.collect(MAX_IDENTIFIER) if command.has_dataset else None
            dataset = Identifier(data, upstream_ts).encoded(self.transfer_syntax) if data is not None else None
            if messages.is_pending(command):
                await self.respond(messages.response(command, self.message_id, field=field, sop_class=sop_class),
                                   dataset)
                continue
            self.finished(up)
            replace: list[tuple[int, bytes]] = []
            if request is not None and command.us(messages.FAILED) and dimse.ERROR_COMMENT not in command.elements:
                comment = await self._unsent(request, failed_uids(command, data, upstream_ts), receiver)
                if comment:
                    replace.append((dimse.ERROR_COMMENT, messages.text(comment, 64)))
            out = messages.response(command, self.message_id, field=field, sop_class=sop_class, replace=replace)
            await self.respond(out, dataset, final=True)
            return

    async def _unsent(self, request: Identifier, uids: list[str], receiver: str) -> str:
        """The PACS failed sub-operations without sending them (Orthanc 1.10 with a stored syntax
        the receiver did not accept and that it cannot decode itself: no C-STORE, 0xC000 with the
        Failed SOP Instance UID List). DIMSE says nothing of the syntax, so the gateway asks: the
        first such instance's SOP class (a C-FIND at IMAGE level), then a C-GET of that instance
        alone offering the class in every transfer syntax; the context of the C-STORE the PACS
        starts names the syntax it holds, and that association is aborted at once (a PDU of the
        instance at most is read). Logged; the Error Comment for the final response returned
        ("" when nothing was learnt). Only on this failure path: one C-FIND and one C-GET more."""
        unsent = [uid for uid in uids if uid not in self._delivered]
        if not unsent:
            return ""
        pair = await self._stored_pair(request, unsent[0])
        if pair is None:
            log.warning("%s from %s: the PACS failed %d sub-operation(s) without sending the instance (%s); the "
                        "transfer syntax it holds could not be learnt", self.name, self.label, len(unsent), unsent[0])
            return ""
        sop_class, ts = pair
        why = (f"the gateway does not decode it with {self.transcoding.key} Never (ToAccepted would)"
               if not self.transcoding.allowed else "and it could not send it in another one")
        log.warning("%s from %s: the PACS did not send %s: it holds it in %s (%s) for %s, a transfer syntax %s did "
                    "not propose; %s", self.name, self.label, unsent[0], UID(ts).name, ts, UID(sop_class).name,
                    receiver, why)
        return f"{UID(ts).name} not accepted"

    async def _stored_pair(self, request: Identifier, uid: str) -> Pair | None:
        """(SOP class, transfer syntax) the PACS holds instance ``uid`` in (:meth:`_unsent`)."""
        ts = self.transfer_syntax
        probe = Identifier(request.encoded(ts), ts)
        probe.apply({}, {"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": uid})
        try:
            classes, _ = await self._enumerate(probe, contexts.find_model_of(self.model))
            if len(classes) != 1:
                return None
            sop_class = next(iter(classes))
            get_model = contexts.get_model_of(self.model)
            pairs = [(sop_class, syntax) for syntax in presentation.TRANSFER_SYNTAXES]
            up, context_id, upstream_ts = await self.open_pacs(
                get_model, self.upstream_pairs(get_model, pairs), roles=[sop_class], what=f"C-GET ({get_model})")
            try:
                await up.send(context_id, messages.get_request(self.command, up.next_id(), get_model),
                              probe.encoded(upstream_ts))
                item = await self.next_item(up, "C-GET")
            finally:
                up.abort("the gateway learnt the transfer syntax it asked about")
        except UpstreamFailed as e:
            log.info("%s from %s: asking the PACS for the transfer syntax of %s failed: %s", self.name, self.label,
                     uid, e)
            return None
        if isinstance(item, Received) and item.command.field == messages.C_STORE_RQ:
            return up.contexts.get(item.context_id)
        return None

    async def _sub_operation(self, up: DimseLink, received: Received, deliver: Deliver) -> None:
        command = received.command
        self._delivered.add(command.sop_instance)
        if not command.has_dataset:
            answer: StoreAnswer = (0xC000, "no data set")
        else:
            answer = await deliver(up, command, up.contexts.get(received.context_id))
        if isinstance(answer, Command):
            out = messages.response(answer, command.message_id)
        else:
            out = dimse.response(messages.C_STORE_RSP, command.message_id, command.sop_class, answer[0],
                                 command.sop_instance, answer[1])
        await up.send(received.context_id, out)

    async def stream(self, up: DimseLink, target: DimseLink, context_id: int, command: bytes) -> None:
        """Pass the data set the PACS is sending to ``target`` as it arrives."""
        async with target.message(context_id, command) as out:
            try:
                while True:
                    item = await self.next_item(up, "C-STORE sub-operation")
                    if not isinstance(item, Fragment):
                        raise UpstreamFailed(f"{up.label} sent another message inside a data set")
                    await out.write(item.data, item.last)
                    if item.last:
                        return
            except UpstreamFailed:
                target.abort("the PACS stopped in the middle of an instance")
                raise

    async def _enumerate(self, request: Identifier, find_model: str) -> tuple[set[str], int]:
        """The SOP classes and the number of the instances the request designates."""
        query = request.fresh()
        query.QueryRetrieveLevel = "IMAGE"
        for keyword in ("SOPInstanceUID", "SOPClassUID"):
            if keyword not in query:
                setattr(query, keyword, "")
        up = await self.connect_pacs(contexts.model_pairs(find_model, self.transfer_syntax))
        context_id = up.context_for(find_model, self.transfer_syntax)
        if context_id is None:
            raise UpstreamFailed(f"the PACS does not accept C-FIND ({find_model})", messages.CANNOT_CALCULATE_MATCHES)
        upstream_ts = up.contexts[context_id][1]
        await up.send(context_id, messages.find_request(up.next_id(), find_model), datasets.encode(query, upstream_ts))
        sop_classes: set[str] = set()
        count = 0
        while True:
            received = await self.next_response(up, messages.C_FIND_RSP, "C-FIND listing the instances")
            data = await up.collect(MAX_IDENTIFIER) if received.command.has_dataset else None
            status = messages.status_of(received.command)
            if status in messages.PENDING:
                if data is not None:
                    count += 1
                    sop_classes.add(Identifier(data, upstream_ts).get("SOPClassUID"))
                continue
            self.finished(up)
            await self.close(up)
            if status != messages.SUCCESS:
                raise UpstreamFailed(f"the PACS answered the C-FIND listing the instances with 0x{status:04X}",
                                     messages.CANNOT_CALCULATE_MATCHES)
            sop_classes.discard("")
            return sop_classes, count

    async def _storage_for_pacs(self, request: Identifier) -> list[Pair]:
        """The storage contexts proposed to the PACS for a C-GET: those the requester accepted; with
        ``Dicom:Transcode`` ``ToAccepted`` also the compressed syntaxes the gateway can decode
        (:func:`_with_transcodable`). When that is more than the contexts an association can carry
        (a requester such as getscu accepts a hundred classes), the matches' SOP classes are listed
        first (one C-FIND at IMAGE level) and theirs go first."""
        storage = list(self.assoc.receives)
        if not self.transcoding.allowed:
            return storage
        wanted = _with_transcodable(storage, self.transcoding)
        models = contexts.model_pairs(self.model, self.transfer_syntax)
        if len(models) + len(wanted) <= presentation.MAX_CONTEXTS:
            return wanted
        classes, _ = await self._enumerate(request, contexts.find_model_of(self.model))
        first = [p for p in wanted if p[0] in classes]
        return first + [p for p in wanted if p[0] not in classes]

    async def _transcode_sub(
        self, up: DimseLink, command: Command, pair: Pair, accepted: dict[Pair, int], peer: str
    ) -> Transcoded | tuple[int, str]:
        """``Dicom:Transcode`` ``ToAccepted``: the sub-operation's data set (in ``pair``'s syntax,
        which ``peer`` did not accept) received whole (at most ``Dicom:MaxDatasetMB``), transcoded
        off the loop to a syntax ``peer`` accepted; or the (status, comment) to answer the PACS."""
        transcoding = self.transcoding
        sop_class, ts = pair
        try:
            to = presentation.choose(accepted, sop_class, ts, peer, transcoding)
        except presentation.NotAccepted as e:
            await up.skip()
            log.error("%s from %s: %s", self.name, self.label, e)
            return messages.SOP_CLASS_NOT_SUPPORTED, f"not accepted by {peer}"[:64]
        raw = await up.collect(self.services.max_dataset)
        try:
            data = await asyncio.to_thread(transcoding.run, raw, ts, to, f"{command.sop_instance} for {peer}")
        except TranscodeError as e:
            return STATUS_PROCESSING_FAILURE, f"cannot transcode: {e}"[:64]
        return Transcoded(accepted[(sop_class, to)], data)

    def upstream_pairs(self, model: str, storage: list[Pair]) -> list[Pair]:
        """The retrieve model (the requester's syntax first) and ``storage``, within 128 contexts."""
        models = contexts.model_pairs(model, self.transfer_syntax)
        if len(models) + len(storage) > presentation.MAX_CONTEXTS:
            models = models[:1]
        return models + storage[: presentation.MAX_CONTEXTS - len(models)]


class GetOperation(_Retrieve):
    response_field = messages.C_GET_RSP
    name = "C-GET"
    permission = policy.Operation.GET
    _waiting: tuple[int, asyncio.Future[Command]] | None = None  # the sub-operation the requester answers

    async def _run(self) -> None:
        requester = next((ae for ae in self.services.settings.modalities.values()
                          if ae.aet.strip() == self.session.calling.strip()), None)
        self.transcoding = self.services.transcoding.for_ae(requester)
        request = Identifier(self.identifier, self.transfer_syntax)
        refused = await self.services.hooks.retrieve(request, self.session, "onCGet")
        if refused:
            await self.refuse(messages.UNABLE_TO_PROCESS, refused)
            return
        self.audit_begin(request)
        await self.locate(request)
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        storage = await self._storage_for_pacs(request)
        pairs = self.upstream_pairs(self.model, storage)
        up, context_id, upstream_ts = await self.open_pacs(
            self.model, pairs, roles=sorted({sop_class for sop_class, _ in storage}))
        if await self.pass_request(up, context_id, request.encoded(upstream_ts)):
            await self.relay_get(up, upstream_ts, self._to_requester, request=request)

    async def _to_requester(self, up: DimseLink, command: Command, pair: Pair | None) -> StoreAnswer:
        context_id = self.assoc.receives.get(pair) if pair is not None else None
        data: bytes | None = None
        if context_id is None and pair is not None and self.transcoding.allowed:
            # Dicom:Transcode ToAccepted: a syntax the requester refused, offered to the PACS for this
            transcoded = await self._transcode_sub(up, command, pair, self.assoc.receives, "the requester")
            if isinstance(transcoded, tuple):
                return transcoded
            context_id, data = transcoded.context_id, transcoded.data
        if context_id is None:
            await up.skip()
            return messages.SOP_CLASS_NOT_SUPPORTED, "not accepted by the requester"
        message_id = self.requester.next_id()
        waiter: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        self._waiting = (message_id, waiter)
        try:
            rq = messages.store_request(command, message_id)
            if data is None:
                await self.stream(up, self.requester, context_id, rq)
            else:
                async with self.requester.message(context_id, rq) as out:
                    await out.write(data, True)
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError:
            self.requester.abort(f"no C-STORE-RSP within {self.timeout:g} s")
            raise UpstreamFailed("the requester did not answer a C-STORE sub-operation") from None
        finally:
            self._waiting = None

    def on_store_response(self, command: Command) -> None:
        waiting = self._waiting
        if waiting is not None and command.us(dimse.MESSAGE_ID_RESPONDED) == waiting[0] and not waiting[1].done():
            waiting[1].set_result(command)
        else:
            super().on_store_response(command)


class MoveOperation(_Retrieve):
    response_field = messages.C_MOVE_RSP
    name = "C-MOVE"
    permission = policy.Operation.MOVE

    async def _run(self) -> None:
        destination = messages.move_destination(self.command)
        modality = self.services.destination(destination)
        if modality is None:
            log.error("C-MOVE from %s: unknown destination %r (declare it in Dicom:Modalities)", self.label,
                      destination)
            await self._fail(messages.MOVE_DESTINATION_UNKNOWN, f"unknown move destination {destination}")
            return
        request = Identifier(self.identifier, self.transfer_syntax)
        refused = await self.services.hooks.retrieve(request, self.session, "onCMove")
        if refused:
            await self.refuse(messages.UNABLE_TO_PROCESS, refused)
            return
        self.audit_begin(request, modality.aet)
        await self.locate(request)
        book = self.services.destinations
        mode = modality.retrieve
        if mode == "FetchAndStore" or (mode == "Auto" and book.unknown_to_pacs(modality.aet)):
            await self._fetch_and_store(request, modality)
            return
        refusal = await self._relay(request, auto=mode == "Auto")
        if refusal is None:
            return
        # Auto, and the PACS refused before moving anything: because of the destination, or (a
        # bare 0xC000, Orthanc's answer to both) because nothing matched? The listing tells.
        listing = await self._enumerate(request, contexts.find_model_of(self.model))
        command, data = refusal
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        if listing[1] == 0 and messages.status_of(command) != messages.MOVE_DESTINATION_UNKNOWN:
            await self.respond(messages.response(command, self.message_id), data, final=True)
            return
        book.learn_unknown(modality.aet)
        log.info("C-MOVE to %s: the PACS cannot move there (it does not know this AE title); fetching and "
                 "storing instead, for the next %.0f s (Dicom:Modalities Retrieve Auto)", modality.aet,
                 book.recheck)
        await self._fetch_and_store(request, modality, listing)

    # -- Relay -----------------------------------------------------------------------------------
    async def _relay(self, request: Identifier, *, auto: bool) -> tuple[Command, bytes | None] | None:
        """Relay the C-MOVE; with ``auto``, the PACS's first response when it may say that the PACS
        cannot move to the destination (:func:`refuses_destination`), not passed on; else None."""
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return None
        up, context_id, upstream_ts = await self.open_pacs(
            self.model, contexts.model_pairs(self.model, self.transfer_syntax))
        if not await self.pass_request(up, context_id, request.encoded(upstream_ts)):
            return None
        first = True
        while True:
            received = await self.next_response(up, messages.C_MOVE_RSP, "C-MOVE")
            command = received.command
            data = await up.collect(MAX_IDENTIFIER) if command.has_dataset else None
            if first and auto and refuses_destination(command):
                self.finished(up)
                await self.close(up)
                if self.state is OpState.RELAYING:
                    self._move(OpState.PREPARING)
                dataset = Identifier(data, upstream_ts).encoded(self.transfer_syntax) if data is not None else None
                return command, dataset
            first = False
            dataset = Identifier(data, upstream_ts).encoded(self.transfer_syntax) if data is not None else None
            final = not messages.is_pending(command)
            if final:
                self.finished(up)
            await self.respond(messages.response(command, self.message_id), dataset, final=final)
            if final:
                return None

    # -- FetchAndStore ---------------------------------------------------------------------------
    async def _fetch_and_store(
        self, request: Identifier, modality: ModalityAe, listing: tuple[set[str], int] | None = None
    ) -> None:
        self.transcoding = self.services.transcoding.for_ae(modality)
        get_model = contexts.get_model_of(self.model)
        if not request.get("QueryRetrieveLevel").strip():
            level = deduce_level(request)
            if not level:
                await self.refuse(messages.IDENTIFIER_DOES_NOT_MATCH, "no QueryRetrieveLevel and no unique key")
                return
            log.info("C-MOVE from %s: no QueryRetrieveLevel; %s deduced from the keys for the C-GET", self.label,
                     level)
            request.apply({}, {"QueryRetrieveLevel": level})
        sop_classes, count = listing or await self._enumerate(request, contexts.find_model_of(self.model))
        if self.state is OpState.CANCELLING:
            await self.finish_cancelled()
            return
        if count == 0:
            log.info("C-MOVE from %s to %s: no instance matches", self.label, modality.aet)
            await self.respond(messages.final(messages.C_MOVE_RSP, self.message_id, self.model, messages.SUCCESS,
                                              counts=(0, 0, 0)), final=True)
            return
        peer = Peer.of(modality, self.services.settings.tls)
        try:
            dest = await self.connect(peer, presentation.retrieve_pairs(sorted(sop_classes)))
        except UpstreamFailed as e:
            raise UpstreamFailed(f"move destination: {e}", messages.CANNOT_PERFORM_SUBOPERATIONS) from None
        dest_pairs = list(dest.contexts.values())
        roles = sorted({sop_class for sop_class, _ in dest_pairs})
        up, context_id, upstream_ts = await self.open_pacs(
            get_model, self.upstream_pairs(get_model, _with_transcodable(dest_pairs, self.transcoding)),
            roles=roles, what=f"C-GET ({get_model})")

        def get_request(command: Command, message_id: int) -> bytes:
            return messages.get_request(command, message_id, get_model)

        if not await self.pass_request(up, context_id, request.encoded(upstream_ts), get_request):
            return
        by_pair = {pair: cid for cid, pair in dest.contexts.items()}

        async def deliver(link: DimseLink, command: Command, pair: Pair | None) -> StoreAnswer:
            return await self._to_destination(dest, by_pair, link, command, pair)

        await self.relay_get(up, upstream_ts, deliver, field=messages.C_MOVE_RSP, sop_class=self.model,
                             request=request, receiver=f"the move destination {modality.aet}")
        self.finished(dest)

    async def _to_destination(
        self, dest: DimseLink, by_pair: dict[Pair, int], up: DimseLink, command: Command, pair: Pair | None
    ) -> StoreAnswer:
        context_id = by_pair.get(pair) if pair is not None else None
        if context_id is None and pair is not None and self.transcoding.allowed:
            return await self._transcoded(dest, by_pair, up, command, pair)
        if context_id is None:
            await up.skip()
            return messages.SOP_CLASS_NOT_SUPPORTED, "not accepted by the move destination"
        rq = messages.store_request(command, dest.next_id(), originator_aet=self.session.calling,
                                    originator_id=self.message_id)
        await self.stream(up, dest, context_id, rq)
        return (await self.next_response(dest, messages.C_STORE_RSP, "C-STORE")).command

    async def _transcoded(
        self, dest: DimseLink, by_pair: dict[Pair, int], up: DimseLink, command: Command, pair: Pair
    ) -> StoreAnswer:
        """``Dicom:Transcode`` ``ToAccepted``: the PACS sent a syntax the destination refused; the
        instance is received whole (at most ``Dicom:MaxDatasetMB``), transcoded off the loop and
        sent in a syntax the destination accepted."""
        transcoded = await self._transcode_sub(up, command, pair, by_pair, f"the move destination {dest.label}")
        if isinstance(transcoded, tuple):
            return transcoded
        rq = messages.store_request(command, dest.next_id(), originator_aet=self.session.calling,
                                    originator_id=self.message_id)
        async with dest.message(transcoded.context_id, rq) as out:
            await out.write(transcoded.data, True)
        return (await self.next_response(dest, messages.C_STORE_RSP, "C-STORE")).command


def failed_uids(command: Command, data: bytes | None, transfer_syntax: str) -> list[str]:
    """Failed SOP Instance UID List (0008,0058) of a C-GET/C-MOVE response: in its identifier
    (PS3.4 C.4.2.1.4.3), or in the command set, where DCMTK-based peers put it (Orthanc 1.10)."""
    pos, detail = 0, command.detail
    while pos + 8 <= len(detail):
        group, elem, length = struct.unpack_from("<HHI", detail, pos)
        if (group, elem) == (0x0008, 0x0058):
            text = detail[pos + 8: pos + 8 + length].decode("ascii", "replace")
            return [uid.strip("\0 ") for uid in text.split("\\") if uid.strip("\0 ")]
        pos += 8 + length
    if data is None:
        return []
    try:
        value = Identifier(data, transfer_syntax).fresh().get("FailedSOPInstanceUIDList", [])
    except Exception:  # an identifier that does not decode: nothing learnt
        return []
    return [str(v) for v in (value if isinstance(value, MultiValue | list) else [value]) if str(v)]


def _with_transcodable(pairs: list[Pair], transcoding: Transcoding) -> list[Pair]:
    """The destination's accepted pairs, and with ``Dicom:Transcode`` ``ToAccepted`` the compressed
    syntaxes the gateway can decode for each SOP class the destination takes uncompressed, so the
    PACS may send an instance as it stores it and the gateway transcodes it (a PACS that cannot
    transcode itself still delivers)."""
    if not transcoding.allowed:
        return pairs
    plain = dict.fromkeys(a for a, ts in pairs if ts in presentation.UNCOMPRESSED)
    extra = [(a, ts) for a in plain for ts in presentation.TRANSFER_SYNTAXES
             if decodable(ts) and (a, ts) not in pairs]
    return pairs + extra
