"""A Query/Retrieve identifier (a C-FIND query or match, a C-MOVE/C-GET request) as the relay
carries it: its encoded bytes and their transfer syntax, decoded only when a script wants it,
re-encoded only when a script changed it.

So an unscripted identifier crosses the gateway byte for byte (Specific Character Set, every
value in its own encoding, private elements with their VRs). When a script edits one, only the
elements it changed are encoded again, in the identifier's own character set; the others are
written as they came (pydicom writes an undecoded element's bytes as they are). An identifier
is re-encoded into another transfer syntax only when the PACS accepts none of the requester's
(a fallback that decodes everything, logged).

``ISO_IR 13``: pydicom encodes it as JIS X 0201 only (the standard's letter), while Orthanc and
Japanese modalities put Shift-JIS double-byte characters under it (``Test-\x84D\x83\xa6\xc8``);
so a value a script edits in such an identifier is encoded with Shift-JIS, as they read it, and
reading one does not log pydicom's "Failed to encode" warning (it comes from pydicom re-encoding
the name it has just decoded, not from anything the gateway sends).

Two table forms for the scripts: DicomProxy's events (``onCFind``, ``onCFindResult``,
``onCMove``, ``onCGet``) see keywords (:func:`dicomproxy.dicom.datasets.dataset_to_table`);
Orthanc's filters (``IncomingFindRequestFilter``, ``IncomingWorklistRequestFilter``,
``OutgoingFindRequestFilter``) see what Orthanc gives them: every tag as ``"gggg,eeee"`` (lower
case), every value a string (multiple values joined with ``\\``, binary ones empty), sequences
as arrays of such tables. Either may be written back with keywords or tags.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomproxy.dicom import datasets

log = logging.getLogger(__name__)

WIDER_CODECS = {"ISO_IR 13": "shift_jis"}
"""Character sets whose edited values are encoded with a wider codec than pydicom's (see above)."""
TEXT_VRS = frozenset({"PN", "LO", "LT", "SH", "ST", "UC", "UT"})


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
        with _quiet_pydicom():
            return datasets.dataset_to_table(self.fresh())

    def orthanc_table(self) -> dict[str, Any]:
        with _quiet_pydicom():
            return orthanc_table(self.fresh())

    def apply(self, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
        """Apply a script's edits (the table it was given -> the one it returned, either form);
        True when something changed."""
        ds = self.dataset()
        codec = WIDER_CODECS.get(_charset(ds))
        with _quiet_pydicom() if codec else contextlib.nullcontext():
            if not datasets.apply_table(ds, canonical(before), canonical(after)):
                return False
        if codec:
            _widen(ds, codec)
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


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Decoding a name under ``ISO_IR 13`` makes pydicom warn (and log) that it cannot re-encode
    it (see the module docstring); nothing is re-encoded here. On the loop thread, no await inside."""
    logger = logging.getLogger("pydicom")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.disabled = disabled


def _charset(ds: Dataset) -> str:
    """The (first) Specific Character Set of ``ds``, read without decoding anything else."""
    elem = ds.get_item(0x00080005)
    if elem is None:
        return ""
    value = elem.value
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
    return text.split("\\")[0].strip("\x00 ")


def _widen(ds: Dataset, codec: str) -> None:
    """Encode the edited text values of ``ds`` (decoded ones: the others are still raw) with ``codec``."""
    for tag in list(ds.keys()):
        elem = ds.get_item(tag)
        if elem is None or elem.is_raw or elem.VR not in TEXT_VRS or elem.value in (None, ""):
            continue
        text = "\\".join(map(str, elem.value)) if elem.VM > 1 else str(elem.value)
        try:
            value = text.encode(codec)
        except UnicodeEncodeError:
            log.warning("%s: %r cannot be encoded in %s; replacement characters used", elem.tag, text,
                        _charset(ds))
            continue
        if len(value) % 2:
            value += b" "
        ds[tag] = RawDataElement(Tag(tag), elem.VR, len(value), value, 0, False, True)


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
