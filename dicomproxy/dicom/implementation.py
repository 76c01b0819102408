"""The gateway's DICOM implementation identity: the Implementation Class UID and Version Name it
announces in every association (PS3.7 D.3.3.2) and writes in the file meta of its spool files
(PS3.10 7.1). One place, so the association and the files never disagree."""

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1426.1"
IMPLEMENTATION_VERSION = "DICOMPROXY_01"
