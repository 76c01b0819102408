"""dicomproxy.dicom.policy: the address and AE title rules (each with its PS3.8 reason), the
per-operation permissions, and both through the in-process port (real sockets, the
requestor of dicomproxy seeing the A-ASSOCIATE-RJ and the DIMSE status)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian

from dicomproxy.config.errors import ConfigError
from dicomproxy.config.settings import load_settings
from dicomproxy.dicom import datasets
from dicomproxy.dicom.policy import ALL_OPERATIONS, AssociationPolicy, Operation
from dicomproxy.dicom.presentation import IMPLICIT, VERIFICATION
from dicomproxy.dicom.storage_scu import StorageScu
from dicomproxy.dicom.ul.errors import AssociationRejected
from tests import dicom_samples
from tests.dicom.stack import dicom_stack, until

CT = "1.2.840.10008.5.1.4.1.1.2"


def policy(tmp_path: Path, **dicom: Any) -> AssociationPolicy:
    config = tmp_path / "appsettings.json"
    config.write_text("{}")
    return AssociationPolicy.of(load_settings(config, environ={}, overrides={"Dicom": {"Aet": "GW", **dicom}}).dicom)


# --------------------------------------------------------------------------- the rules
def test_defaults_check_only_the_called_ae(tmp_path: Path) -> None:
    p = policy(tmp_path)
    assert p.check("ANY", "GW", "203.0.113.9") is None
    refusal = p.check("ANY", "ANY-SCP", "127.0.0.1")
    assert refusal is not None and refusal.rj == (1, 1, 7) and "Dicom:CheckCalledAet" in refusal.why
    assert policy(tmp_path, CheckCalledAet=False).check("ANY", "ANY-SCP", "127.0.0.1") is None


def test_the_pacss_title_may_be_called_too(tmp_path: Path) -> None:
    """A modality moved over unchanged calls the PACS's title, which the gateway stands in for."""
    for titles in ("Modality", "Gateway"):
        p = policy(tmp_path, Upstream={"Aet": "PACS", "AeTitles": titles})
        assert p.check("CT", "PACS", "127.0.0.1") is None and p.check("CT", "GW", "127.0.0.1") is None
        refusal = p.check("CT", "OTHER", "127.0.0.1")
        assert refusal is not None and refusal.rj == (1, 1, 7) and "nor the PACS's 'PACS'" in refusal.why


def test_addresses_ipv4_ipv6_and_mapped(tmp_path: Path) -> None:
    p = policy(tmp_path, AllowedAddresses=["10.1.0.0/16", "2001:db8::/32", "192.168.7.7"])
    assert p.address_allowed("10.1.200.3") and p.address_allowed("::ffff:10.1.0.9")
    assert p.address_allowed("2001:db8::42") and p.address_allowed("192.168.7.7")
    assert not p.address_allowed("10.2.0.1") and not p.address_allowed("192.168.7.8")
    assert not p.address_allowed("2001:db9::1") and not p.address_allowed("not an address")
    refusal = p.check("CT1", "GW", "127.0.0.1")
    assert refusal is not None and refusal.rj == (1, 1, 1) and "Dicom:AllowedAddresses" in refusal.why


def test_blocked_wins_over_allowed_and_order_of_rules(tmp_path: Path) -> None:
    p = policy(tmp_path, AllowedCallingAets=["CT1", "CT2"], BlockedCallingAets=["CT2"], AllowedAddresses=["10.0.0.0/8"])
    assert p.check("CT1", "GW", "10.0.0.1") is None
    blocked = p.check("CT2", "GW", "10.0.0.1")
    assert blocked is not None and blocked.rj == (1, 1, 3) and "BlockedCallingAets" in blocked.why
    unknown = p.check("MR9", "GW", "10.0.0.1")
    assert unknown is not None and unknown.rj == (1, 1, 3) and "AllowedCallingAets" in unknown.why
    # the address is checked first, then the called AE, then the calling AE
    first = p.check("CT2", "WRONG", "127.0.0.1")
    assert first is not None and first.reason == 1
    second = p.check("CT2", "WRONG", "10.0.0.1")
    assert second is not None and second.reason == 7


def test_permissions_entry_star_and_everything(tmp_path: Path) -> None:
    p = policy(tmp_path, AePermissions={"CT1": ["store"], "VIEWER": ["Find", "MOVE"], "*": []})
    assert p.operations_of("CT1") == {Operation.STORE}
    assert p.operations_of("VIEWER") == {Operation.FIND, Operation.MOVE}
    assert p.operations_of("OTHER") == frozenset()
    assert policy(tmp_path, AePermissions={"CT1": ["store"]}).operations_of("OTHER") == ALL_OPERATIONS
    assert policy(tmp_path).operations_of("ANY") == ALL_OPERATIONS


@pytest.mark.parametrize("dicom, key", [
    ({"AllowedAddresses": ["10.0.0.0/33"]}, "Dicom:AllowedAddresses"),
    ({"AePermissions": {"CT1": ["store", "delete"]}}, "Dicom:AePermissions"),
    ({"BlockedCallingAets": ["A\\B"]}, "Dicom:BlockedCallingAets"),
])
def test_bad_values_name_the_key(tmp_path: Path, dicom: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        policy(tmp_path, **dicom)


# --------------------------------------------------------------------------- through the port
async def test_refusals_on_the_wire(tmp_path: Path, caplog: Any) -> None:
    async with dicom_stack(tmp_path, BlockedCallingAets=["BAD"]) as stack:
        for calling, called, reason in (("BAD", "GW", 3), ("MOD", "OTHER", 7)):
            with pytest.raises(AssociationRejected) as info:
                await StorageScu.connect("127.0.0.1", stack.port, called_aet=called, calling_aet=calling,
                                         contexts=[(VERIFICATION, IMPLICIT)], timeout=5)
            assert (info.value.result, info.value.source, info.value.reason) == (1, 1, reason)
        assert "association from BAD (127.0.0.1:" in caplog.text and "reason 3): calling AE is in Dicom:Blocked" \
            in caplog.text
        assert "called AE 'OTHER' is not this gateway's 'GW'" in caplog.text
    (tmp_path / "b").mkdir()
    async with dicom_stack(tmp_path / "b", AllowedAddresses=["10.0.0.0/8"]) as stack:
        with pytest.raises(AssociationRejected) as info:
            await StorageScu.connect("127.0.0.1", stack.port, called_aet="GW", calling_aet="MOD",
                                     contexts=[(VERIFICATION, IMPLICIT)], timeout=5)
        assert info.value.reason == 1 and "address 127.0.0.1 is not in Dicom:AllowedAddresses" in caplog.text


async def test_store_not_permitted_is_0124_and_nothing_spooled(tmp_path: Path, caplog: Any) -> None:
    ds = dicom_samples.build_dataset(patient_id="PP", patient_name="P^P", size=(16, 16))
    uid, data = ds.SOPInstanceUID, datasets.encode(ds, ExplicitVRLittleEndian)
    async with dicom_stack(tmp_path, AePermissions={"VIEWER": ["find"]}) as stack:
        for calling, expected in (("VIEWER", 0x0124), ("CT1", 0x0000)):
            scu = await StorageScu.connect("127.0.0.1", stack.port, called_aet="GW", calling_aet=calling,
                                           contexts=[(CT, ExplicitVRLittleEndian), (VERIFICATION, IMPLICIT)],
                                           timeout=5)
            try:
                assert (await scu.c_echo()).status == 0x0000  # C-ECHO is always allowed
                status = await scu.c_store(CT, uid, ExplicitVRLittleEndian, data)
                assert status.status == expected, status
            finally:
                await scu.release()
        await until(lambda: len(stack.entries) == 1)
        assert [e.sop_instance for e in stack.entries] == [uid]  # CT1's only
        assert "C-STORE from VIEWER (127.0.0.1:" in caplog.text
        assert "refused with 0x0124 (not authorized): 'VIEWER' may not store (Dicom:AePermissions)" in caplog.text
