"""Query/Retrieve (PS3.4 annex C and K): C-FIND (Patient Root, Study Root, Modality Worklist),
C-GET and C-MOVE through the gateway, relayed to the PACS on the gateway's own upper layer
(:mod:`dicomproxy.dicom.ul`), on the event loop.

The dispatcher decides a Query/Retrieve association like any other (AE titles,
``onDicomAssociation`` on the requester's real address, the association limits) and hands it
to :meth:`.service.QueryRetrieve.serve` on the connection the acceptor took. Each request is
passed to the PACS as the same request on an association of the gateway's (Dicom:Aet), and what
the PACS answers is passed back: statuses and counts as the PACS sent them, identifiers and
instances as encoded bytes, never decoded unless a script asks for them. A C-MOVE is relayed
(the PACS moves) or served by fetching and storing, per destination (:mod:`.retrieve`).

Why not pynetdicom's service classes (what this package used before), measured: they decode
every identifier and re-encode it with pydicom (a match under ``ISO_IR 13`` came back as
``Test-???``; a C-GET instance arrived in Implicit VR with its private VRs lost); their C-GET
and C-MOVE sub-operations take a decoded data set, which they encode whole in memory (a 300 MB
instance cost ~700 MB of peak memory), and their C-MOVE always performs the sub-operations
itself, so a C-MOVE could not reach the PACS as a C-MOVE. pynetdicom's PDU classes are still
what the upper layer decodes associations with.

Modules: ``service`` (the entry point, builds operations), ``scp`` (one requester association:
its reader and its operations), ``contexts`` (presentation contexts accepted and proposed),
``operation`` (the state machine every service shares), ``find`` (C-FIND), ``retrieve`` (C-GET,
C-MOVE), ``identifier`` (identifiers as bytes, decoded on demand, Lua tables), ``hooks`` (the
Lua events), ``messages`` (command sets relayed), ``link`` (DIMSE on an asyncio association),
``upstream`` (associations to the PACS and to move destinations).
"""
