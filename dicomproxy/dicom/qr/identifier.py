"""A Query/Retrieve identifier (a C-FIND query or match, a C-MOVE/C-GET request) as the relay
carries it: its encoded bytes and their transfer syntax, decoded only when a script wants it,
re-encoded only when a script changed it.

So an unscripted identifier crosses the gateway byte for byte (Specific Character Set, every
value in its own encoding, private elements with their VRs). When a script edits one, only the
elements it changed are encoded again, in the identifier's own character set; the others are
written as they came (pydicom writes an undecoded element's bytes as they are). An identifier
is re-encoded into another transfer syntax only when the PACS accepts none of the requester's
(a fallback that decodes everything, logged).

Two table forms for the scripts: DicomProxy's events (``onCFind``, ``onCFindResult``,
``onCMove``, ``onCGet``) see keywords (:func:`dicomproxy.dicom.datasets.dataset_to_table`);
Orthanc's filters (``IncomingFindRequestFilter``, ``IncomingWorklistRequestFilter``,
``OutgoingFindRequestFilter``) see what Orthanc gives them: every tag as ``"gggg,eeee"`` (lower
case), every value a string (multiple values joined with ``\\``, binary ones empty), sequences
as arrays of such tables. Either may be written back with keywords or tags.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomproxy.dicom import datasets

log = logging.getLogger(__name__)


class Identifier:
    def __init__(self, raw: bytes, transfer_syntax: str) -> None:
        self.raw = raw
        self.transfer_syntax = transfer_syntax
        self.edited = False
        self._lazy: Dataset | None = None

    def dataset(self) -> Dataset:
        """The identifier decoded lazily (an element is decoded when first read): edit this one."""
        if self._lazy is None:
            self._lazy = datasets.decode(self.raw, self.transfer_syntax)
        return self._lazy

    def fresh(self) -> Dataset:
        """A decoded copy of its own (reading every element of it leaves :meth:`dataset` undecoded)."""
        return datasets.decode(self.raw, self.transfer_syntax)

    def table(self) -> dict[str, Any]:
        return datasets.dataset_to_table(self.fresh())

    def orthanc_table(self) -> dict[str, Any]:
        return orthanc_table(self.fresh())

    def apply(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
        """Apply a script's edits (the table it was given -> the one it returned, either form);
        True when something changed."""
        ds = self.dataset()
        if not datasets.apply_table(ds, canonical(before), canonical(after)):
            return False
        self.raw = datasets.encode(ds, self.transfer_syntax)
        self._lazy = None
        self.edited = True
        return True

    def encoded(self, transfer_syntax: str) -> bytes:
        """The bytes to send in ``transfer_syntax``: as received (or as edited) when it is ours."""
        if transfer_syntax == self.transfer_syntax:
            return self.raw
        log.info("identifier re-encoded from %s to %s (the peer accepts no other)", self.transfer_syntax,
                 transfer_syntax)
        return datasets.encode(self.fresh(), transfer_syntax)

    def get(self, keyword: str) -> str:
        """One value as text ("" when absent or undecodable), without decoding the rest."""
        try:
            value = self.fresh().get(keyword, "")
        except Exception:
            return ""
        return "" if value is None else str(value)


def orthanc_table(ds: Dataset) -> dict[str, Any]:
    """``ds`` in the form Orthanc's C-FIND filters receive (see the module docstring)."""
    out: dict[str, Any] = {}
    for tag in ds.keys():
        if Tag(tag).element == 0 or Tag(tag).group == 0x0002:
            continue
        try:
            elem = ds[tag]
            out[f"{elem.tag.group:04x},{elem.tag.element:04x}"] = _orthanc_value(elem)
        except Exception:  # one undecodable element must not hide the rest from the script
            continue
    return out


def _orthanc_value(elem: DataElement) -> Any:
    if elem.VR == "SQ":
        return [orthanc_table(item) for item in (elem.value or [])]
    if elem.VR in datasets.BINARY_VRS:
        return ""
    value = datasets.dataset_to_table(_single(elem)).get(datasets.tag_key(elem.tag), "")
    if isinstance(value, list):
        return "\\".join(_text(v) for v in value)
    return _text(value)


def _single(elem: DataElement) -> Dataset:
    ds = Dataset()
    ds.add(elem)
    return ds


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def canonical(table: Mapping[str, Any]) -> dict[str, Any]:
    """A table with every key in :func:`datasets.tag_key` form (keywords for public tags), arrays
    as lists, recursively, so tables of either form compare by tag."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        out[datasets.tag_key(datasets.parse_key(str(key)))] = _canonical_value(value)
    return out


def _canonical_value(value: Any) -> Any:
    if isinstance(value, Mapping):
        keys = list(value.keys())
        if keys and all(isinstance(k, int) for k in keys):
            return [_canonical_value(value[k]) for k in sorted(keys)]
        return canonical(value)
    if isinstance(value, list | tuple):
        return [_canonical_value(v) for v in value]
    return value
