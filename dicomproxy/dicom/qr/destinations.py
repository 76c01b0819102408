"""The move destinations the PACS does not know (``Dicom:Modalities`` ``Retrieve: Auto``, retrieve.py): a
C-MOVE to one of them is fetched instead for a while, then relayed again in case the PACS
learnt it. Its own module so that the association's services (operation.py) can name it
without importing the retrieve services that use it."""

from __future__ import annotations

import time
from collections.abc import Callable

AUTO_RECHECK_SECONDS = 600.0
"""How long ``Auto`` remembers that the PACS does not know a move destination."""


class DestinationBook:
    """The move destinations the PACS said it does not know (``Auto``), each for a while."""

    def __init__(self, recheck: float = AUTO_RECHECK_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.recheck = recheck
        self.clock = clock
        self._unknown: dict[str, float] = {}

    def unknown_to_pacs(self, aet: str) -> bool:
        until = self._unknown.get(aet)
        if until is None:
            return False
        if self.clock() >= until:
            del self._unknown[aet]
            return False
        return True

    def learn_unknown(self, aet: str) -> None:
        self._unknown[aet] = self.clock() + self.recheck
