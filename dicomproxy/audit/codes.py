"""The coded values of DICOM audit messages (PS3.15 A.5, PS3.16 CID 400-405), by name.

A :class:`Code` is one coded value as the A.5.1 schema writes it: ``csd-code``,
``codeSystemName`` and ``originalText`` (the code meaning; the schema requires it). Only the
codes the gateway emits are listed; their meanings are the standard's, word for word, because
audit repositories match on them.
"""

from __future__ import annotations

from typing import NamedTuple


class Code(NamedTuple):
    code: str
    system: str
    meaning: str


def dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# CID 400 Audit Event ID
APPLICATION_ACTIVITY = dcm("110100", "Application Activity")
BEGIN_TRANSFERRING = dcm("110102", "Begin Transferring DICOM Instances")
INSTANCES_ACCESSED = dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = dcm("110104", "DICOM Instances Transferred")
QUERY = dcm("110112", "Query")
SECURITY_ALERT = dcm("110113", "Security Alert")
USER_AUTHENTICATION = dcm("110114", "User Authentication")

# CID 401 Audit Event Type Code (application activity, user authentication)
APPLICATION_START = dcm("110120", "Application Start")
APPLICATION_STOP = dcm("110121", "Application Stop")
LOGIN = dcm("110122", "Login")
LOGOUT = dcm("110123", "Logout")

# CID 403 Security Alert Type Code
NODE_AUTHENTICATION = dcm("110126", "Node Authentication")
SOFTWARE_CONFIGURATION = dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = dcm("110132", "Use of Restricted Function")
AUDIT_RECORDING_STOPPED = dcm("110133", "Audit Recording Stopped")
AUDIT_RECORDING_STARTED = dcm("110134", "Audit Recording Started")

# CID 402 Audit Active Participant Role ID Code
APPLICATION = dcm("110150", "Application")
APPLICATION_LAUNCHER = dcm("110151", "Application Launcher")
DESTINATION = dcm("110152", "Destination Role ID")
SOURCE = dcm("110153", "Source Role ID")

# CID 404 Audit Participant Object ID Type Code (and RFC 3881's own)
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
STUDY_INSTANCE_UID = dcm("110180", "Study Instance UID")
SOP_CLASS_UID = dcm("110181", "SOP Class UID")
NODE_ID = dcm("110182", "Node ID")
# QIDO-RS has no DCM code; like dcm4chee, a private coding scheme (PS3.16 8.2: "99" prefix).
QIDO_QUERY = Code("QIDO", "99DCMPROXY", "QIDO-RS query")

# RFC 3881 / A.5.1.2 plain values
SOURCE_APPLICATION_SERVER = "4"  # AuditSourceTypeCode: application server process tier
SOURCE_WEB_SERVER = "3"
PERSON, SYSTEM_OBJECT = "1", "2"  # ParticipantObjectTypeCode
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE, ROLE_QUERY = "1", "3", "13", "24"
MACHINE_NAME, IP_ADDRESS, URI_ADDRESS = "1", "2", "5"  # NetworkAccessPointTypeCode

# EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
