"""Dicom:Routes matching, name resolution, and the spool's per-destination bookkeeping (unit tests
of single functions; the real stack is in tests/e2e/test_dicom_routing.py)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicomproxy.config.model import DicomRoute, Settings
from dicomproxy.dicom import datasets
from dicomproxy.dicom.destinations import Destinations, UnknownDestination
from dicomproxy.dicom.routing import Router, parse_tag
from dicomproxy.dicom.spool import Spool
from dicomproxy.dicom.ul.errors import AssociationRejected, UpperLayerError
from dicomproxy.upstream.registry import Registry
from dicomproxy.upstream.upstream import Upstream
from tests import dicom_samples

EXPLICIT = "1.2.840.10008.1.2.1"


def route(**kw: object) -> DicomRoute:
    return DicomRoute.model_validate(kw)


def test_first_matching_route_wins_and_none_is_default() -> None:
    router = Router([
        route(CalledAet="RESEARCH", Destinations=["research"]),
        route(CallingAet="CT01", Modality="C?", Destinations=["archive", "ai"]),
        route(Tags={"InstitutionName": "North*", "0008,1010": "ST1"}, Destinations=["north"]),
    ])
    assert router.choose("CT01", "RESEARCH", {}) == ("research",)
    assert router.choose("CT01", "GW", {"0008,0060": "CT"}) == ("archive", "ai")
    assert router.choose("CT01", "GW", {"0008,0060": "MR"}) == ("default",)
    assert router.choose("X", "GW", {"0008,0080": "North Wing", "0008,1010": "ST1"}) == ("north",)
    assert router.choose("X", "GW", {"0008,0080": "South", "0008,1010": "ST1"}) == ("default",)
    assert router.choose("X", "GW", {"0008,0080": "North Wing"}) == ("default",)  # an absent element never matches
    assert router.tags == (0x00080060, 0x00080080, 0x00081010)
    assert router.called_aets == {"RESEARCH"}
    assert Router([]).choose("A", "B", {}) == ("default",)


def test_a_relay_may_serve_only_associations_no_route_sends_elsewhere() -> None:
    router = Router([route(CalledAet="RESEARCH", Destinations=["research"]),
                     route(CallingAet="CT01", Destinations=["default"]),
                     route(Modality="MR", Destinations=["mr"])])
    assert not router.only_default("X", "RESEARCH")
    assert router.only_default("CT01", "GW")  # its first possible route surely matches and goes to default
    assert not router.only_default("US1", "GW")  # an MR could go to "mr"


def test_tags_by_keyword_or_number_and_their_values_from_the_header() -> None:
    assert parse_tag("Modality") == 0x00080060 and parse_tag("0008,1010") == 0x00081010
    with pytest.raises(ValueError, match="keyword"):
        parse_tag("Modalty")
    ds = dicom_samples.build_dataset(patient_id="P1", patient_name="R^T", study_uid=pydicom.uid.generate_uid())
    ds.InstitutionName = "North Wing"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    raw = datasets.encode(ds, EXPLICIT)
    values = datasets.header_uids(raw, EXPLICIT, (0x00080008, 0x00080060, 0x00080080))
    assert values["0008,0060"] == str(ds.Modality) and values["0008,0080"] == "North Wing"
    assert values["0008,0008"] == "ORIGINAL\\PRIMARY" and values["PatientID"] == "P1"


def settings(**server_a: object) -> Settings:
    return Settings.model_validate({
        "Upstreams": {
            "Servers": {"a": {"Url": "http://pacs-a:8042", "Dicom": {"Aet": "A", "Port": 104}, **server_a},
                        "b": {"Url": "http://pacs-b:8042", "Dicom": {"Aet": "B", "Port": 105}, "Weight": 2},
                        "web": {"Url": "http://web:8042"}},
            "Groups": {"fo": {"Members": ["a", "b"]}, "rr": {"Members": ["a", "b"], "Mode": "RoundRobin"}},
        },
        "Dicom": {"Modalities": {"ws": {"Aet": "WS", "Host": "10.0.0.9", "Port": 11112}}},
    })


def test_names_resolve_to_peers_in_the_groups_order() -> None:
    d = Destinations(settings())
    assert d.known == {"default", "a", "b", "fo", "rr", "ws"}  # "web" has no DICOM side
    (a,) = d.peers("a")
    assert (a.ae.aet, a.ae.host, a.ae.port) == ("A", "pacs-a", 104)
    assert [p.name for p in d.peers("fo")] == ["a", "b"] == [p.name for p in d.peers("fo")]
    firsts = [d.peers("rr")[0].name for _ in range(6)]
    assert firsts.count("b") == 4 and firsts.count("a") == 2  # Weight 2
    assert [p.name for p in d.peers("rr")] in (["a", "b"], ["b", "a"])
    assert d.peers("ws")[0].ae.aet == "WS"
    with pytest.raises(UnknownDestination, match="known: a, b, default, fo, rr, ws"):
        d.peers("nope")


def test_with_the_registry_a_group_is_ordered_by_health_and_its_mode() -> None:
    """The real registry (``host.upstreams``): an ejected member goes last, its recovery brings it
    back first (Failover); RoundRobin follows the registry's smooth weighted pick, one per call."""
    config = settings(HealthCheck={"Echo": True})  # actively checked: no half-open retry
    registry = Registry(config, Upstream(config.upstream))
    d = Destinations(config, registry)
    assert [p.name for p in d.peers("fo")] == ["a", "b"]
    a = registry.servers["a"]
    for _ in range(a.check.failures):
        a.checked(False, 1.0, "C-ECHO refused")
    assert [p.name for p in d.peers("fo")] == ["b", "a"]  # ejected: last, still tried if b fails too
    assert [p.name for p in d.peers("rr")] == ["b", "a"] == [p.name for p in d.peers("rr")]
    for _ in range(a.check.successes):
        a.checked(True, 1.0, None)
    assert [p.name for p in d.peers("fo")] == ["a", "b"]
    firsts = [d.peers("rr")[0].name for _ in range(6)]
    assert firsts.count("b") == 4 and firsts.count("a") == 2  # Weight 2, the registry's balancer
    assert [p.name for p in d.peers("a")] == ["a"] and d.peers("ws")[0].ae.aet == "WS"  # no group: as before


def test_failed_associations_eject_a_member_but_a_rejection_of_its_titles_does_not() -> None:
    """:meth:`Destinations.report`: refused connections and transient rejections count as the
    member's failures (passive ejection), an accepted association ends them, a permanent
    rejection of the AE titles (PS3.8 source 1, reason 3) is the PACS answering and does not."""
    config = settings(HealthCheck={"Echo": True, "Failures": 2})
    registry = Registry(config, Upstream(config.upstream))
    d = Destinations(config, registry)
    a = registry.servers["a"]
    titles = AssociationRejected("A@h:1", 1, 1, 3)
    for _ in range(3):
        d.report("a", titles)
    assert a.health.failures_in_a_row == 0 and [p.name for p in d.peers("fo")] == ["a", "b"]
    d.report("a", UpperLayerError("cannot connect to A@h:1: connection refused"))
    d.report("a", None)  # accepted: the failures in a row end
    d.report("a", AssociationRejected("A@h:1", 2, 3, 2))  # transient, local limit exceeded
    assert a.health.state.value == "healthy"
    d.report("a", UpperLayerError("cannot connect to A@h:1: timed out"))
    assert a.health.state.value == "ejected" and a.health.last_error == "DICOM: cannot connect to A@h:1: timed out"
    assert [p.name for p in d.peers("fo")] == ["b", "a"]
    d.report("ws", UpperLayerError("x"))  # a Dicom:Modalities entry: no registry member, nothing
    Destinations(config).report("a", UpperLayerError("x"))  # no registry: nothing


def _put(spool: Spool, destinations: tuple[str, ...]) -> object:
    return spool.put(b"\x08\x00\x16\x00" + b"\0" * 12, sop_class="1.2", sop_instance="1.2.3", transfer_syntax=EXPLICIT,
                     study="9.9", destinations=destinations)


def test_a_routed_instance_stays_until_every_destination_is_served_and_a_restart_skips_the_served(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    entry = _put(spool, ("a", "b", "c"))
    a, b, c = spool.copies_new(entry)  # type: ignore[arg-type]
    assert (a.dest, b.dest, c.dest) == ("a", "b", "c")
    spool.remove(a)
    b.attempts = 1
    b.failed_attempt("refused", 1.0, 2.0)
    spool.save_state(b)
    spool.close()
    assert (tmp_path / "queue" / f"{a.seq:012d}.done-a").exists()
    # a restart (even after kill -9: nothing here depends on memory): "a" is not served again, "b" keeps its state
    again = Spool(tmp_path, fsync=False)
    (loaded,) = again.open()
    copies = again.copies(loaded)
    assert [x.dest for x in copies] == ["b", "c"] and copies[0].attempts == 1 and copies[1].attempts == 0
    failed_at = again.fail(copies[0], "refused for good")  # "c" still wants it: the file is linked, not moved
    assert failed_at.exists() and loaded.path.exists() and again.depth == 1
    again.remove(copies[1])
    again.close()
    assert not list((tmp_path / "queue").iterdir()) and again.depth == 0
    # the failed copy goes back only where it failed
    restored = again.restore(failed_at.stem)
    assert restored is not None and [x.dest for x in again.copies(restored)] == ["b"]


def test_the_single_default_leaves_the_spool_file_as_it_was(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.open()
    entry = _put(spool, ("default",))
    assert spool.copies_new(entry) == [entry] and not entry.destinations  # type: ignore[attr-defined]
    assert b"destinations" not in entry.path.read_bytes()[:2048]  # type: ignore[attr-defined]
