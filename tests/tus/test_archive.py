"""Reading an upload's instances within limits (:mod:`dicomproxy.tus.archive`), on real ZIP files."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import pytest

from dicomproxy.tus import archive
from dicomproxy.tus.archive import ArchiveRefused, ZipLimits, scan

MIB = 1024 * 1024
DICOM_HEAD = b"\0" * 128 + b"DICM"


def bomb_member(zf: zipfile.ZipFile, name: str, size: int, noise: int = 0) -> None:
    """A DICOM-looking member of ``size`` bytes, streamed: zeros (which compress about 1000:1),
    with ``noise`` random bytes at the start of every MiB to bring the ratio down (~1 MiB / noise)."""
    with zf.open(name, "w", force_zip64=size > 2**31) as out:
        out.write(DICOM_HEAD)
        left = size - len(DICOM_HEAD)
        while left > 0:
            block = (os.urandom(noise) + bytes(MIB))[: min(left, MIB)]
            out.write(block)
            left -= len(block)


def read_all(parts: list[archive.Part]) -> dict[str, bytes]:
    out = {}
    for p in parts:
        f = p.open()
        try:
            out[p.name] = f.read(-1)
        finally:
            f.close()
    return out


def test_a_study_zip_lists_its_instances_and_skips_the_rest(dicom_samples: Any, tmp_path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as z:
        z.writestr("hidden.dcm", DICOM_HEAD + b"x" * 100)
    path, uids = dicom_samples.make_zip(tmp_path / "s.zip", n_instances=3, extra_entries={
        "README.txt": b"hello", "DICOMDIR": DICOM_HEAD, "more.zip": inner.getvalue()})
    kind, parts, skipped = scan(path)
    assert kind == "zip" and len(parts) == 3
    assert "README.txt" in skipped and "DICOMDIR" in skipped
    assert "more.zip (a ZIP inside the ZIP: not expanded)" in skipped
    with zipfile.ZipFile(path) as zf:
        assert read_all(parts) == {p.name: zf.read(p.name) for p in parts}


def test_one_zipfile_serves_every_member_of_an_import(
    dicom_samples: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = dicom_samples.make_zip(tmp_path / "s.zip", n_instances=20)
    opened: list[Any] = []

    class Counting(zipfile.ZipFile):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            opened.append(self)

    monkeypatch.setattr(zipfile, "ZipFile", Counting)
    _, parts, _ = scan(path)
    assert len(opened) == 1  # the scan's own
    assert len(read_all(parts)) == 20
    assert len(opened) == 2  # one more for the 20 members, not 20
    assert opened[1].fp is None  # closed with the last member


def test_a_member_that_expands_too_much_refuses_the_whole_zip(dicom_samples: Any, tmp_path: Path) -> None:
    path = tmp_path / "bomb.zip"
    good, _ = dicom_samples.make_instance(patient_id="Z1", patient_name="Zip^Bomb")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("good.dcm", good)
        bomb_member(zf, "bomb.dcm", 20 * MIB)
    assert path.stat().st_size < 100_000
    with pytest.raises(ArchiveRefused) as e:
        scan(path)
    assert "bomb.dcm" in str(e.value) and "Tus:ZipMaxRatio" in str(e.value)
    # The same archive passes with the ratio cap off (and the expanded cap far above 20 MiB).
    _, parts, _ = scan(path, ZipLimits(max_ratio=0))
    assert {p.name for p in parts} == {"good.dcm", "bomb.dcm"}


def test_the_ratio_cap_is_configurable_and_small_members_are_exempt(tmp_path: Path) -> None:
    path = tmp_path / "ratio.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        bomb_member(zf, "fifty.dcm", 4 * MIB, noise=20_000)
        bomb_member(zf, "tiny.dcm", 512 * 1024)  # ~500:1 but under 1 MiB: not held to the ratio
    with zipfile.ZipFile(path) as zf:
        ratio = zf.getinfo("fifty.dcm").file_size / zf.getinfo("fifty.dcm").compress_size
    assert 20 < ratio < 100
    scan(path)  # under the default 100
    with pytest.raises(ArchiveRefused, match="fifty.dcm .*Tus:ZipMaxRatio \\(20\\)"):
        scan(path, ZipLimits(max_ratio=20))


def test_the_expanded_total_is_capped(dicom_samples: Any, tmp_path: Path) -> None:
    path, _ = dicom_samples.make_zip(tmp_path / "s.zip", n_instances=4, size=(256, 256))
    total = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    scan(path, ZipLimits(max_expanded=total))
    with pytest.raises(ArchiveRefused, match="Tus:ZipMaxExpandedGB"):
        scan(path, ZipLimits(max_expanded=total - 1))


def test_too_many_entries_are_refused_before_the_directory_is_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(50):
            zf.writestr(f"{i}.txt", b"")
    monkeypatch.setattr(zipfile, "ZipFile", None)  # the refusal must not need a ZipFile at all
    with pytest.raises(ArchiveRefused, match="50 entries, more than Tus:ZipMaxMembers \\(49\\)"):
        scan(path, ZipLimits(max_members=49))


def overlapping(path: Path, copies: int) -> None:
    """A ZIP whose central directory lists the same member ``copies`` times under other names
    (the overlapping-files bomb shape): each entry points at the one compressed stream."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        bomb_member(zf, "m0000.dcm", 2 * MIB, noise=20_000)
    data = path.read_bytes()
    eocd = data.rindex(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[eocd + 12: eocd + 20])
    entry = data[cd_offset: cd_offset + cd_size]
    entries = b"".join(entry.replace(b"m0000.dcm", f"m{i:04d}.dcm".encode()) for i in range(copies))
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, copies, copies, len(entries), cd_offset, 0)
    path.write_bytes(data[:cd_offset] + entries + end)


def test_overlapping_members_are_caught_by_the_whole_archive_ratio(tmp_path: Path) -> None:
    path = tmp_path / "overlap.zip"
    overlapping(path, 1)
    scan(path)  # one entry: ratio ~50, under the cap
    overlapping(path, 40)
    assert len(zipfile.ZipFile(path).infolist()) == 40
    with pytest.raises(ArchiveRefused, match="times the archive's .*overlapping members"):
        scan(path)


def test_a_member_yielding_more_than_declared_stops_the_import(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("liar.dcm")
    info.file_size = 10
    member = archive._Member(archive._Archive(tmp_path / "x.zip", 0), io.BytesIO(b"y" * 64), info)
    with pytest.raises(ArchiveRefused, match="more bytes than the 10 its header declares"):
        member.read(64)


def test_the_streamed_total_is_capped_whatever_the_headers_say(tmp_path: Path) -> None:
    a = archive._Archive(tmp_path / "x.zip", max_expanded=100)
    a.add("a.dcm", 60)
    with pytest.raises(ArchiveRefused, match="expanded past Tus:ZipMaxExpandedGB"):
        a.add("b.dcm", 41)


def test_a_broken_zip_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(ArchiveRefused, match="not a readable ZIP"):
        scan(path)


def test_a_single_dicom_file_and_something_else(dicom_samples: Any, tmp_path: Path) -> None:
    path, _ = dicom_samples.make_instance(tmp_path / "a.dcm", patient_id="A", patient_name="A^B")
    kind, parts, skipped = scan(path)
    assert kind == "dicom" and [p.size for p in parts] == [path.stat().st_size] and skipped == []
    other = tmp_path / "notes.txt"
    other.write_text("x" * 500)
    assert scan(other) == ("unknown", [], ["notes.txt"])
