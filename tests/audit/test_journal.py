"""The durable buffer: order, cursors, collection of delivered segments, the bound, torn tails."""

from __future__ import annotations

from pathlib import Path

from dicomproxy.audit.journal import HEADER, RESERVE_BYTES, Journal


def test_append_read_ack_and_collect(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=1 << 20)
    j.segment_bytes = 1000
    j.open(["a", "b"])
    for i in range(100):
        assert j.append(b"m%03d" % i + b"x" * 50) == i + 1
    j.sync()
    ra, rb = j.reader("a"), j.reader("b")
    got = [seq for seq, _ in ra.read(max_bytes=1 << 20)]
    assert got == list(range(1, 101))
    assert len(list((tmp_path / "segments").glob("*.seg"))) > 3
    j.ack("a", 100)
    assert len(list((tmp_path / "segments").glob("*.seg"))) > 3  # b still needs them
    assert [seq for seq, _ in rb.read(max_bytes=300)][:1] == [1]
    j.ack("b", 100)
    assert len(list((tmp_path / "segments").glob("*.seg"))) == 1
    assert ra.read() == []


def test_reader_rewinds_to_resend(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=1 << 20)
    j.open(["a"])
    for i in range(10):
        j.append(b"%d" % i)
    r = j.reader("a")
    assert len(r.read()) == 10
    j.ack("a", 4)
    r.rewind(j.cursor("a"))
    assert [seq for seq, _ in r.read()] == list(range(5, 11))


def test_restart_keeps_sequence_and_cursors(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=1 << 20)
    j.open(["a"])
    for i in range(5):
        j.append(b"%d" % i)
    j.ack("a", 3)
    j.close()
    again = Journal(tmp_path, max_bytes=1 << 20)
    again.open(["a", "new"])
    assert again.next_seq == 6 and again.cursor("a") == 3
    assert [seq for seq, _ in again.reader("a").read()] == [4, 5]
    assert again.reader("new").read() == []  # a collector added later starts from now
    assert again.append(b"x") == 6


def test_torn_tail_is_cut(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=1 << 20)
    j.open([])
    j.append(b"whole")
    j.close()
    seg = next((tmp_path / "segments").glob("*.seg"))
    with open(seg, "ab") as f:
        f.write(HEADER.pack(100, 2) + b"half")
    again = Journal(tmp_path, max_bytes=1 << 20)
    again.open(["a"])
    assert again.next_seq == 2 and seg.stat().st_size == HEADER.size + 5


def test_bound_drops_newest_and_keeps_headroom_for_alerts(tmp_path: Path) -> None:
    j = Journal(tmp_path, max_bytes=20_000)
    j.open(["a"])
    n = 0
    while j.append(b"x" * 1000):
        n += 1
    assert 15 <= n <= 20 and j.size <= 20_000
    assert j.append(b"alert" * 100, reserve=True) > 0
    assert j.size <= 20_000 + RESERVE_BYTES
    j.ack("a", j.last_seq)
    assert j.append(b"x" * 1000) > 0  # delivered segments were collected: room again
