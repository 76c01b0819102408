"""Units of dicomproxy.dicom.spool: the file format, recovery, and the streaming writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomproxy.dicom import spool as spool_module
from dicomproxy.dicom.spool import DatasetTooLarge, Spool, read_file_meta


def _put(spool: Spool, data: bytes, study: str = "1.2.3") -> Any:
    return spool.put(
        data,
        sop_class=CTImageStorage,
        sop_instance="1.2.3.4",
        transfer_syntax=ExplicitVRLittleEndian,
        study=study,
        origin={"CallingAE": "MOD", "RemoteIp": "127.0.0.1"},
    )


def test_spool_files_are_part10_and_recover_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.open() == []
    a = _put(spool, b"\x08\x00\x16\x00" + b"x" * 10)
    b = _put(spool, b"second", study="9.9")
    assert spool.depth == 2 and b.seq == a.seq + 1
    meta, offset = read_file_meta(a.path.read_bytes())
    assert meta[0x0016].rstrip(b" \0") == b"MOD"  # Source AE title, standard meta
    spool.close()

    again = Spool(tmp_path)
    entries = again.open()
    assert [e.seq for e in entries] == [a.seq, b.seq]
    assert entries[1].study == "9.9" and entries[0].origin["CallingAE"] == "MOD"
    assert again.read_dataset(entries[1]) == b"second"
    assert _put(again, b"third").seq == b.seq + 1  # numbering continues after a restart
    again.close()


def test_spool_drops_a_truncated_write_and_keeps_failures(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    good = _put(spool, b"complete")
    torn = _put(spool, b"will be cut short")
    torn.path.write_bytes(torn.path.read_bytes()[:-5])  # as if the process died mid-write
    target = spool.fail(good, "refused", status=0xC000)
    assert target.exists() and target.with_suffix(".json").exists()
    assert spool.failed_count == 1
    spool.close()
    again = Spool(tmp_path)
    assert again.open() == []  # the torn file was never acknowledged: dropped
    assert again.failed_count == 1
    again.close()


def _writer(spool: Spool, uid: str = "1.2.3.5", max_bytes: int = 0) -> Any:
    return spool.begin(sop_class=CTImageStorage, sop_instance=uid, transfer_syntax=ExplicitVRLittleEndian,
                       origin={"CallingAE": "MOD"}, max_bytes=max_bytes)


def test_a_large_data_set_is_written_as_it_arrives_and_committed_in_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    writer = _writer(spool)
    piece = b"\x08\x00" * (256 << 10)  # 512 KiB
    for _ in range(6):  # 3 MiB: past SPILL_BYTES, so the file exists before the end
        writer.write(memoryview(piece))
    assert writer.path.exists() and spool.depth == 0
    placeholder = Spool(tmp_path / "unused")  # a crash now: recovery drops the incomplete file
    with pytest.raises(spool_module.SpoolError, match="truncated"):
        placeholder.load(writer.path)
    entry = writer.commit(study="1.2.9", series="1.2.9.1", patient_id="P1")
    assert spool.depth == 1 and entry.data is not None and len(entry.data) == 6 * len(piece)
    loaded = spool.load(entry.path)
    assert (loaded.study, loaded.patient_id, loaded.length) == ("1.2.9", "P1", 6 * len(piece))
    assert spool.read_dataset(loaded) == piece * 6
    assert pydicom.filereader.read_file_meta_info(entry.path).MediaStorageSOPInstanceUID == "1.2.3.5"
    spool.close()


def test_a_small_data_set_stays_in_memory_until_it_is_committed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    writer = _writer(spool)
    writer.write(memoryview(b"abc"))
    writer.write(memoryview(b"def"))
    assert not writer.path.exists() and writer.dataset() == b"abcdef"
    with writer.open_dataset() as f:
        assert f.read(4) == b"abcd"
    entry = writer.commit(study="1.2")
    assert spool.read_dataset(entry) == b"abcdef" and entry.data == b"abcdef"
    spool.close()


def test_past_the_memory_copy_limit_the_forwarder_reads_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(spool_module, "MEMORY_COPY_MAX", 1 << 20)
    monkeypatch.setattr(spool_module, "SPILL_BYTES", 1 << 19)
    spool = Spool(tmp_path)
    spool.open()
    writer = _writer(spool)
    for _ in range(3):
        writer.write(memoryview(b"x" * (1 << 19)))
    entry = writer.commit(study="1.2")
    assert entry.data is None and entry.length == 3 << 19
    assert spool.read_dataset(entry) == b"x" * (3 << 19)
    spool.close()


def test_max_bytes_and_discard(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.open()
    writer = _writer(spool, max_bytes=2 << 20)
    writer.write(memoryview(b"y" * (3 << 19)))
    with pytest.raises(DatasetTooLarge, match="Dicom:MaxDatasetMB"):
        writer.write(memoryview(b"y" * (3 << 19)))
    assert writer.path.exists()
    writer.discard()
    writer.discard()
    assert not writer.path.exists() and spool.depth == 0
    spool.close()


def test_failed_instances_are_listed_retried_and_discarded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    a, b = _put(spool, b"first"), _put(spool, b"second")
    a.attempts = 3
    a.failed_attempt("status 0xA700", 100.0, 0.0)
    spool.fail(a, "gave up after 3 attempts", status=0xA700)
    spool.fail(b, "refused", status=0xC000)
    total, notes = spool.failed_list()
    assert total == 2 and [n["id"] for n in notes] == [f"{a.seq:012d}-1.2.3.4", f"{b.seq:012d}-1.2.3.4"]
    assert notes[0]["attempts"] == 3 and notes[0]["firstError"] == "status 0xA700"
    assert notes[0]["origin"]["CallingAE"] == "MOD" and notes[0]["status"] == 0xA700
    assert spool.failed_list(offset=1, limit=5)[1][0]["id"] == notes[1]["id"]
    spool.close()
    again = Spool(tmp_path, fsync=False)
    again.open()  # the queue is empty: numbering continues after the failed ones, ids stay unique
    restored = again.restore(notes[0]["id"])
    assert restored is not None and restored.seq == b.seq + 1 and restored.attempts == 0
    assert again.read_dataset(restored) == b"first" and again.depth == 1 and again.failed_count == 1
    assert again.restore(notes[0]["id"]) is None  # gone from failed/
    assert again.restore("../queue/x") is None and again.discard_failed("..") is None
    gone = again.discard_failed(notes[1]["id"])
    assert gone is not None and gone.reason == "refused" and gone.status == 0xC000 and again.failed_count == 0
    assert not list(again.failed_dir.iterdir())
    again.close()


def test_the_forwarding_state_is_kept_beside_the_instance(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    entry = _put(spool, b"data")
    entry.attempts = 2
    entry.failed_attempt("aborted", 10.0, 4_000_000_000.0)
    spool.save_state(entry)
    spool.close()
    again = Spool(tmp_path, fsync=False)
    (loaded,) = again.open()
    assert (loaded.attempts, loaded.next_at, loaded.last_error, loaded.first_error_at) == (2, 4e9, "aborted", 10.0)
    again.remove(loaded)
    again.close()
    assert not list(again.queue_dir.iterdir())  # the instance and its state
