"""What a C-STORE status from the PACS means for the instance: stored, try again later, or refused
for good (PS3.4 B.2.3, PS3.7 annex C). The forwarder and the relay ask here.

* Success 0x0000 and the warnings (0x0001, 0xBxxx: coercion, elements discarded, data set does
  not match the SOP class) mean the PACS has the instance.
* Retried by default (``Dicom:ForwardRetryStatuses``), each instance with its own attempt count
  and backoff, until ``Dicom:ForwardMaxAttempts``: 0xA7xx *Refused: Out of Resources* (a full
  disk or a busy database on the PACS is the classic cause and clears by itself; but Orthanc also
  answers 0xA700 for an instance it can never store, e.g. one without PatientID, which is why the
  attempts are finite and counted per instance, so such an instance goes to ``failed/`` after a
  few tries without holding anything else up), 0x0110 *Processing failure*, 0x0210 *Duplicate
  invocation*, 0x0213 *Resource limitation*: all say "not now" rather than "never".
* Anything else is refused for good at once: 0xA9xx *Data Set does not match SOP Class* and
  0xCxxx *Cannot understand* (the same bytes will never be understood), 0x0122 *SOP class not
  supported*, 0x0124 *Not authorized*, 0x0117 *Invalid object instance*, ... An operator who
  fixes the PACS's side (an ACL, a supported class) retries it from ``failed/`` through
  ``POST /dicomproxy/spool/failed/{id}/retry``.

A pattern is four hex digits, ``x`` matching any digit (``A7xx``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_RETRIED = ("A7xx", "0110", "0210", "0213")
PATTERN = re.compile(r"^[0-9A-Fa-fXx]{4}$")


def is_stored(status: int) -> bool:
    """Success or a warning: the PACS keeps the instance."""
    return status == 0x0000 or status == 0x0001 or (status & 0xF000) == 0xB000


class RetryRule:
    """Which failure statuses are retried (``Dicom:ForwardRetryStatuses``)."""

    def __init__(self, patterns: Iterable[str] = DEFAULT_RETRIED) -> None:
        self.patterns = tuple(p.upper() for p in patterns)
        for p in self.patterns:
            if not PATTERN.match(p):
                raise ValueError(f"{p!r} is not a status pattern (four hex digits, x for any: A7xx)")
        self._masks = [(_mask(p), int(p.replace("X", "0"), 16)) for p in self.patterns]

    def retried(self, status: int) -> bool:
        return any(status & mask == value for mask, value in self._masks)


def _mask(pattern: str) -> int:
    return int("".join("0" if c == "X" else "F" for c in pattern), 16)
