"""pydicom ``Dataset`` <-> Lua table conversion for the DICOM events.

A script sees a dataset as a plain table: keys are DICOM keywords (``dataset.PatientName``) or,
for private and unknown tags, ``"gggg,eeee"`` (lower-case hex, Orthanc style); a script may use
either form when it writes. Text values are strings (multiple values joined with ``\\`` as on
the wire, like Orthanc's Lua tables); binary numbers (US, UL, SS, SL, FL, FD) are numbers, or
arrays of numbers when multi-valued; sequences are arrays of tables. Bulk binary data (pixel
data, OB/OW/UN...) is never converted: it would cost a copy per event for nothing a script can
sensibly edit, and it passes through untouched.

Edits are applied back as a *diff* between the table handed to the script and the table it
returned, so elements the script did not touch keep their exact original encoding.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Mapping
from io import BytesIO
from typing import Any, BinaryIO

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pynetdicom import dsutils

from dicomproxy.uids import uid_problem

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW", "US or SS or OW"})
NUMBER_VRS = frozenset({"US", "UL", "SS", "SL", "FL", "FD", "SV", "UV", "US or SS"})
_TAG_KEY = re.compile(r"^\(?([0-9a-fA-F]{4})[,|]?([0-9a-fA-F]{4})\)?$")


class EncodingMismatch(ValueError):
    """The data set's first element does not parse under its negotiated transfer syntax."""


class TableError(ValueError):
    """A script wrote a key or value that cannot become a DICOM element (the message says which)."""


def tag_key(tag: BaseTag) -> str:
    """The table key of ``tag``: its keyword when public and known, else ``"gggg,eeee"``."""
    if not tag.is_private:
        kw = keyword_for_tag(tag)
        if kw:
            return kw
    return f"{tag.group:04x},{tag.element:04x}"


def parse_key(key: str) -> BaseTag:
    """A keyword or ``"gggg,eeee"`` (also ``ggggeeee`` / ``(gggg,eeee)``) -> tag."""
    m = _TAG_KEY.match(key.strip())
    if m:
        return Tag(int(m.group(1), 16), int(m.group(2), 16))
    tag = tag_for_keyword(key)
    if tag is None:
        raise TableError(f'unknown DICOM keyword {key!r} (use a keyword or "gggg,eeee")')
    return Tag(tag)


def _value_to_lua(elem: DataElement) -> Any:
    vr = elem.VR
    value = elem.value
    if vr == "SQ":
        return [dataset_to_table(item) for item in (value or [])]
    if value is None or value == "" or value == []:
        return ""
    if vr in NUMBER_VRS:
        if elem.VM > 1:
            return [v for v in value]
        return value
    if vr == "AT":
        tags = value if elem.VM > 1 else [value]
        return "\\".join(f"{Tag(t).group:04x},{Tag(t).element:04x}" for t in tags)
    if elem.VM > 1:
        return "\\".join(str(v) for v in value)
    return str(value)


def dataset_to_table(ds: Dataset) -> dict[str, Any]:
    """Every non-binary element of ``ds`` as a Lua-friendly dict (see the module docstring)."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.element == 0 or elem.tag.group == 0x0002 or elem.VR in BINARY_VRS:
            continue
        try:
            out[tag_key(elem.tag)] = _value_to_lua(elem)
        except Exception:  # one undecodable element must not hide the rest from the script
            continue
    return out


def _normalize(value: Any) -> Any:
    """Lua tables come back as dicts; a 1..n integer-keyed dict is an array."""
    if isinstance(value, Mapping):
        keys = list(value.keys())
        if keys and all(isinstance(k, int) for k in keys) and sorted(keys) == list(range(1, len(keys) + 1)):
            return [_normalize(value[k]) for k in sorted(keys)]
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    return value


def _guess_vr(tag: BaseTag, value: Any) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = ""
    if vr and " or " not in vr:
        return vr
    if " or " in vr:
        return vr.split(" or ")[0]
    if isinstance(value, list) and (not value or isinstance(value[0], Mapping)):
        return "SQ"
    if isinstance(value, float):
        return "FD"
    if isinstance(value, int) and not isinstance(value, bool):
        return "SL"
    text = str(value)
    return "LO" if len(text) <= 64 else "UT"


def _element_value(tag: BaseTag, vr: str, value: Any, base: Dataset | None) -> Any:
    if vr == "SQ":
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list):
            raise TableError(f"{tag_key(tag)}: a sequence must be an array of tables")
        items = []
        old_items = list(base[tag].value) if base is not None and tag in base and base[tag].VR == "SQ" else []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise TableError(f"{tag_key(tag)}[{i + 1}]: a sequence item must be a table")
            if i < len(old_items):
                ds = Dataset()
                for elem in old_items[i]:
                    ds.add(elem)
                apply_table(ds, dataset_to_table(old_items[i]), item)
            else:
                ds = table_to_dataset(item)
            items.append(ds)
        return Sequence(items)
    if vr in NUMBER_VRS:
        if isinstance(value, list):
            return [float(v) if vr in ("FL", "FD") else int(v) for v in value]
        if isinstance(value, str):
            parts = [p for p in value.split("\\") if p.strip()]
            nums = [float(p) if vr in ("FL", "FD") else int(float(p)) for p in parts]
            return nums[0] if len(nums) == 1 else (nums or None)
        return float(value) if vr in ("FL", "FD") else int(value)
    if vr == "AT":
        return [parse_key(p) for p in str(value).split("\\") if p]
    if isinstance(value, bool):
        raise TableError(f"{tag_key(tag)}: a boolean is not a DICOM value")
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    if isinstance(value, float) and value.is_integer() and vr == "IS":
        value = int(value)
    return str(value)


def set_value(ds: Dataset, key: str, value: Any) -> None:
    """Set (or create) the element named by ``key`` from a Lua value."""
    tag = parse_key(key)
    value = _normalize(value)
    vr = ds[tag].VR if tag in ds else _guess_vr(tag, value)
    if vr in BINARY_VRS:
        raise TableError(f"{key}: binary elements ({vr}) cannot be written from a script")
    if vr == "UI":
        check_uids(key, value)
    try:
        ds[tag] = DataElement(tag, vr, _element_value(tag, vr, value, ds))
    except TableError:
        raise
    except Exception as e:
        raise TableError(f"{key}: cannot store {value!r} as {vr}: {e}") from None


def check_uids(key: str, value: Any) -> None:
    """A value a script writes into a UI element: each of its values a UID (PS3.5 §9.1), or
    empty (an empty type 2 element); TableError naming the tag and the value otherwise."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise TableError(f"{key}: {v!r} is not a UID (a UID is a string such as \"1.2.840.10008.1.2\")")
        for part in str(v).split("\\") if str(v) else ():
            problem = uid_problem(part.rstrip("\0").strip(" "))
            if problem is not None:
                raise TableError(f"{key}: {part!r} is not a valid UID: {problem} (PS3.5 9.1)")


def apply_table(ds: Dataset, before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Apply the script's edits (``before`` -> ``after``) to ``ds``; True if anything changed."""
    after = _normalize(after)
    changed = False
    after_tags: dict[BaseTag, str] = {}
    for key in after:
        tag = parse_key(key)
        other = after_tags.get(tag)
        # A script may write a tag under its "gggg,eeee" key while the keyword key (from the
        # table it was given) still holds the old value: the key that changed wins.
        if other is None or _unchanged(before, other, after[other]):
            after_tags[tag] = key
    for key in before:
        tag = parse_key(key)
        if tag not in after_tags and tag in ds:
            del ds[tag]
            changed = True
    for tag, key in after_tags.items():
        new = after[key]
        old_key = tag_key(tag)
        if old_key in before and _normalize(before[old_key]) == new and old_key == key:
            continue
        if key in before and _normalize(before[key]) == new:
            continue
        set_value(ds, key, new)
        changed = True
    return changed


def _unchanged(before: Mapping[str, Any], key: str, value: Any) -> bool:
    return key in before and _normalize(before[key]) == value


def table_to_dataset(table: Mapping[str, Any]) -> Dataset:
    """A new dataset from a table (C-FIND identifiers built by scripts, new sequence items)."""
    ds = Dataset()
    for key, value in _normalize(table).items():
        set_value(ds, key, value)
    return ds


# --------------------------------------------------------------------------- raw encoding
_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)


def check_encoding(head: bytes | memoryview, transfer_syntax: str, *, instance: bool = True) -> None:
    """Raise :class:`EncodingMismatch` when the data set's first element does not read as
    ``transfer_syntax`` says (explicit VR bytes on an implicit VR context, the other way round,
    the wrong byte order), instead of pydicom's silent switch to what it finds.

    Looks at the first 8 bytes (after inflating, for the deflated syntaxes): in an explicit VR
    syntax bytes 4-5 must be a VR; in the implicit one they must not look like one (a first
    element longer than 16 KB would be needed to look like a VR by chance, pydicom's own rule);
    and the first tag's group must be at most 0x0008, since every instance has SOP Class UID
    (0008,0016), which would come first in the other byte order's reading. The rest is read by
    :func:`header_uids` under the same syntax, up to (0020,000E). Cost, measured: ~3 us per
    instance (header_uids itself: 0.4-0.8 ms).

    ``instance=False`` (a Query/Retrieve identifier, which may start at any group, or be empty):
    only the VR test.
    """
    implicit, little, deflated = syntax_flags(transfer_syntax)
    data = bytes(head[:8]) if not deflated else _inflate_head(bytes(head[:4096]))
    if not instance and len(data) < 8:
        return
    if len(data) < 8:
        raise EncodingMismatch(f"a data set of {len(data)} bytes has no complete first element")
    group = int.from_bytes(data[0:2], "little" if little else "big")
    looks_explicit = data[4:6] in _VRS
    if not instance:
        group = min(group, 0x0008)
    if group <= 0x0008 and looks_explicit != implicit:
        return
    name = UID(transfer_syntax).name
    if group > 0x0008:
        raise EncodingMismatch(
            f"the first element's group is 0x{group:04X} when read as {name}: the data set is not in that "
            "syntax (or lacks the SOP Common module)")
    if implicit and looks_explicit:
        raise EncodingMismatch(f"explicit VR data on a context negotiated as {name}")
    if not implicit and not looks_explicit:
        raise EncodingMismatch(f"the first element has no VR, but the context was negotiated as {name}")


@functools.lru_cache(maxsize=256)
def syntax_flags(transfer_syntax: str) -> tuple[bool, bool, bool]:
    """``(implicit VR, little endian, deflated)`` of a transfer syntax pydicom knows (cached:
    pydicom's ``UID`` properties cost ~5 us each)."""
    ts = UID(transfer_syntax)
    return bool(ts.is_implicit_VR), bool(ts.is_little_endian), bool(ts.is_deflated)


def _inflate_head(data: bytes) -> bytes:
    try:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, 64)
    except zlib.error as e:
        raise EncodingMismatch(f"the data set is not deflated as its transfer syntax says ({e})") from None


def decode(raw: bytes, transfer_syntax: str, *, instance: bool = True) -> Dataset:
    """A dataset from its encoded bytes (no file meta) in ``transfer_syntax`` (checked first,
    :func:`check_encoding`; ``instance=False`` for an identifier)."""
    ts = UID(transfer_syntax)
    check_encoding(raw, transfer_syntax, instance=instance)
    return dsutils.decode(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode ``ds`` (no file meta) in ``transfer_syntax``; encapsulated pixel data is kept as is."""
    ts = UID(transfer_syntax)
    data = dsutils.encode(ds, ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    if data is None:
        raise TableError("the edited dataset cannot be encoded (see the log for the element)")
    return data


_HEADER_TAGS = (0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00100020)
_HEADER_UIDS = (("SOPClassUID", 0x00080016), ("SOPInstanceUID", 0x00080018), ("StudyInstanceUID", 0x0020000D),
                ("SeriesInstanceUID", 0x0020000E))


def _uid_text(elem: Any) -> str:
    """A UI element's text from its raw bytes (ASCII by definition, padded with NUL): pydicom's
    conversion validates each UID with regular expressions, which was 40 % of :func:`header_uids`
    (~50 of ~120 us per 16x16 CT instance, called for every spooled instance)."""
    if elem is None:
        return ""
    value = elem.value
    if isinstance(value, bytes):
        return value.rstrip(b"\x00 ").decode("ascii", "replace")
    return str(value or "")


def header_uids(raw: bytes | BinaryIO, transfer_syntax: str, extra: tuple[int, ...] = ()) -> dict[str, str]:
    """SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID, PatientID from encoded
    bytes or a seekable stream of them, reading only up to group 0x0020 (cheap: the forwarder
    needs the study for ordering, the C-STORE check needs the SOP Instance UID; nothing else is
    decoded). ``extra`` tags (``Dicom:Routes`` conditions: Modality, any top-level tag) are read in
    the same pass and returned under their ``gggg,eeee`` key as text (several values joined by
    ``\\``, as they are encoded; absent: no key)."""
    implicit, little, deflated = syntax_flags(transfer_syntax)
    fp: BinaryIO = BytesIO(raw) if isinstance(raw, bytes) else raw
    start = fp.tell()
    check_encoding(fp.read(4096 if deflated else 8), transfer_syntax)
    fp.seek(start)
    if deflated:
        fp = BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(fp.read(4 << 20), 1 << 20))
    last = max((0x0020000E, *extra))
    ds = read_dataset(
        fp,
        implicit,
        little,
        stop_when=lambda tag, vr, length: tag > last,
        specific_tags=[*_HEADER_TAGS, *extra],
    )
    out = {kw: _uid_text(ds.get_item(tag)) for kw, tag in _HEADER_UIDS}
    try:
        out["PatientID"] = str(ds.get("PatientID", "") or "")
    except Exception:
        out["PatientID"] = ""
    for tag in extra:
        try:
            elem = ds.get(tag)
            if elem is None:
                continue
            value = elem.value
            if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
                text = "\\".join(str(v) for v in value)
            else:
                text = "" if value is None else str(value)
        except Exception:
            text = ""
        out[f"{tag >> 16:04X},{tag & 0xFFFF:04X}"] = text
    return out
