"""Query/Retrieve (PS3.4 annex C): C-FIND, C-MOVE and C-GET through the gateway, served by a
pynetdicom AE on a private loopback port.

The gateway's acceptor (:mod:`dicomproxy.dicom.ul.acceptor`) admits every association; one that
proposes a Query/Retrieve model or SCP/SCU role selection is decided like any other
(:mod:`dicomproxy.dicom.dispatch`) and then spliced, bytes untouched, to this AE. pynetdicom
serves these: they are not the hot path, and its service classes handle the pending/cancel
choreography of C-FIND and the sub-operations of C-MOVE/C-GET.

Modules: ``ae`` (the AE, C-ECHO and C-STORE on such associations), ``find`` (C-FIND),
``retrieve`` (C-MOVE/C-GET), ``identifier`` (Lua edits of a request identifier, status data
sets), ``upstream`` (associations to the PACS), ``sessions`` (which Lua session each of
pynetdicom's associations belongs to).
"""
