"""Units of dicomproxy.dicom.negotiation: what the PACS is asked, how its answer becomes the
modality's, the cache of answers, and the mirror association over TLS (against the gateway's own
TLS acceptor). (The mirror association against a real Orthanc: tests/e2e/test_dicom_relay.py;
over TLS: tests/e2e/test_dicom_tls.py.)"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dicomproxy.dicom import negotiation
from dicomproxy.dicom.negotiation import NegotiationCache
from dicomproxy.dicom.presentation import ABSTRACT_SYNTAX_NOT_SUPPORTED, ACCEPTANCE, TRANSFER_SYNTAXES_NOT_SUPPORTED
from dicomproxy.dicom.ul import pdu as pdus
from dicomproxy.dicom.ul import requestor, tls
from dicomproxy.dicom.ul.errors import UpperLayerError
from dicomproxy.dicom.ul.pdu import ProposedContext
from tests.dicom.stack import dicom_stack
from tests.dicom.ul.test_tls import client, server_settings
from tests.tls_certs import TestCa

CT = "1.2.840.10008.5.1.4.1.1.2"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1426.77.1"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root C-FIND: not the storage side's
VERIFICATION = "1.2.840.10008.1.1"
PRIVATE_SYNTAX = "1.2.826.0.1.3680043.10.1426.99"


def test_the_pacs_is_asked_about_storage_and_verification_with_the_syntaxes_the_gateway_reads() -> None:
    proposed = [
        ProposedContext(1, CT, (JPEGBaseline8Bit, PRIVATE_SYNTAX, ExplicitVRLittleEndian)),
        ProposedContext(3, FIND, (ImplicitVRLittleEndian,)),
        ProposedContext(5, US_RETIRED, (ExplicitVRLittleEndian,)),
        ProposedContext(7, PRIVATE_CLASS, (ImplicitVRLittleEndian,)),
        ProposedContext(9, VERIFICATION, (ImplicitVRLittleEndian,)),
        ProposedContext(11, CT, (PRIVATE_SYNTAX,)),  # nothing left to ask about
    ]
    asked = negotiation.forwardable(proposed)
    assert [(cx.context_id, cx.transfer_syntaxes) for cx in asked] == [
        (1, (JPEGBaseline8Bit, ExplicitVRLittleEndian)),  # order kept, the unknown syntax left out
        (5, (ExplicitVRLittleEndian,)),
        (7, (ImplicitVRLittleEndian,)),
        (9, (ImplicitVRLittleEndian,)),
    ]


def _ac(proposed: list[ProposedContext], answers: list[tuple[int, int, str]]) -> pdus.A_ASSOCIATE_AC:
    rq = pdus.associate_rq("PACS", "CT01", proposed, 16384)
    return pdus.associate_ac(rq, answers, 16384)


def test_the_pacss_results_are_the_modalitys() -> None:
    proposed = [
        ProposedContext(1, CT, (JPEGBaseline8Bit,)),
        ProposedContext(3, CT, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        ProposedContext(5, FIND, (ImplicitVRLittleEndian,)),  # never put to the PACS
        ProposedContext(7, CT, (ExplicitVRLittleEndian,)),
    ]
    asked = negotiation.forwardable(proposed)
    ac = _ac(asked, [(1, TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEGBaseline8Bit),
                     (3, ACCEPTANCE, ImplicitVRLittleEndian),
                     (7, ACCEPTANCE, JPEGBaseline8Bit)])  # a PACS choosing a syntax nobody proposed
    assert negotiation.results_for(proposed, ac) == [
        (1, TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEGBaseline8Bit),
        (3, ACCEPTANCE, ImplicitVRLittleEndian),
        (5, ABSTRACT_SYNTAX_NOT_SUPPORTED, ImplicitVRLittleEndian),
        (7, TRANSFER_SYNTAXES_NOT_SUPPORTED, ExplicitVRLittleEndian),
    ]


def test_with_transcoding_the_pacs_is_asked_about_each_compressed_only_class_uncompressed() -> None:
    j2k = "1.2.840.10008.1.2.4.90"
    mpeg4 = "1.2.840.10008.1.2.4.102"
    proposed = [
        ProposedContext(1, CT, (JPEGBaseline8Bit,)),
        ProposedContext(3, US_RETIRED, (j2k,)),
        ProposedContext(5, PRIVATE_CLASS, (mpeg4,)),  # no codec: nothing to ask
        ProposedContext(7, VERIFICATION, (ImplicitVRLittleEndian,)),
    ]
    assert negotiation.forwardable(proposed) == proposed  # Never: the modality's proposal only
    asked = negotiation.forwardable(proposed, transcoding=True)
    probes = asked[len(proposed):]
    assert [(cx.context_id, cx.abstract_syntax, cx.transfer_syntaxes) for cx in probes] == [
        (9, CT, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
        (11, US_RETIRED, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)),
    ]
    ac = _ac(asked, [(1, TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEGBaseline8Bit), (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, j2k),
                     (5, TRANSFER_SYNTAXES_NOT_SUPPORTED, mpeg4), (7, ACCEPTANCE, ImplicitVRLittleEndian),
                     (9, ACCEPTANCE, ImplicitVRLittleEndian),
                     (11, ABSTRACT_SYNTAX_NOT_SUPPORTED, ExplicitVRLittleEndian)])
    assert negotiation.results_for(proposed, ac) == [  # Never: the PACS's answer as it is
        (1, TRANSFER_SYNTAXES_NOT_SUPPORTED, JPEGBaseline8Bit), (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, j2k),
        (5, TRANSFER_SYNTAXES_NOT_SUPPORTED, mpeg4), (7, ACCEPTANCE, ImplicitVRLittleEndian)]
    assert negotiation.results_for(proposed, ac, True, asked) == [
        (1, ACCEPTANCE, JPEGBaseline8Bit),  # the PACS takes CT uncompressed: transcoded on the way
        (3, TRANSFER_SYNTAXES_NOT_SUPPORTED, j2k),  # the PACS does not take the class at all
        (5, TRANSFER_SYNTAXES_NOT_SUPPORTED, mpeg4),
        (7, ACCEPTANCE, ImplicitVRLittleEndian)]
    assert negotiation.transcoded(proposed, ac, asked) == {1: (9, ImplicitVRLittleEndian)}


def test_the_cache_keys_on_titles_and_proposal_expires_and_forgets(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(negotiation.time, "monotonic", lambda: now[0])
    cache = NegotiationCache(ttl=300)
    contexts = [ProposedContext(1, CT, (ExplicitVRLittleEndian,))]
    key = NegotiationCache.key("CT01", "PACS", contexts)
    results: Any = [(1, ACCEPTANCE, ExplicitVRLittleEndian)]
    cache.put(key, results)
    assert cache.get(key) == results
    assert cache.get(NegotiationCache.key("MR01", "PACS", contexts)) is None  # other titles: asked again
    assert cache.get(NegotiationCache.key("CT01", "PACS", [ProposedContext(1, CT, (JPEGBaseline8Bit,))])) is None
    now[0] += 301
    assert cache.get(key) is None  # expired
    cache.put(key, results)
    cache.clear()  # a forward refused for its context
    assert cache.get(key) is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = NegotiationCache(ttl=300)
    keys = [NegotiationCache.key(f"AE{i}", "PACS", []) for i in range(negotiation.CACHE_ENTRIES + 1)]
    for k in keys[:-1]:
        cache.put(k, [])
    assert cache.get(keys[0]) == []  # now the most recently used
    cache.put(keys[-1], [])
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == [] and cache.get(keys[-1]) == []


# --------------------------------------------------------------------------- the mirror over TLS
@pytest.fixture
def tls_pki(tmp_path: Path) -> dict[str, Any]:
    ca = TestCa.create(tmp_path / "pki")
    return {"ca": ca, "server": ca.issue("server", ["127.0.0.1"]), "client": ca.issue("modality", client=True),
            "stranger": TestCa.create(tmp_path / "other", "Other CA").issue("stranger", client=True)}


def _rq_contexts() -> list[ProposedContext]:
    return [ProposedContext(1, CT, (ExplicitVRLittleEndian,))]


def _rq() -> pdus.A_ASSOCIATE_RQ:
    return pdus.associate_rq("GW", "MOD", _rq_contexts(), 16384)


async def test_the_mirror_over_tls_is_an_ssl_socket_the_relay_can_take(
    tmp_path: Path, tls_pki: dict[str, Any]
) -> None:
    async with dicom_stack(tmp_path, tls=tls.server_context(server_settings(tmp_path, tls_pki).tls)) as stack:
        mirror = await requestor.open_association("127.0.0.1", stack.port, _rq(), timeout=5, tls=client(tls_pki))
        try:
            assert isinstance(mirror.sock, ssl.SSLSocket)
            assert negotiation.results_for(_rq_contexts(), mirror.ac) == [(1, ACCEPTANCE, ExplicitVRLittleEndian)]
        finally:
            await requestor.release(mirror)
        assert mirror.sock.fileno() == -1  # released and closed
        with pytest.raises(UpperLayerError):  # a plain request to the TLS port: no DICOM answer
            await requestor.open_association("127.0.0.1", stack.port, _rq(), timeout=5)


async def test_a_tls_refusal_names_the_reason_and_the_keys(tmp_path: Path, tls_pki: dict[str, Any]) -> None:
    async with dicom_stack(tmp_path, tls=tls.server_context(server_settings(tmp_path, tls_pki).tls)) as stack:
        with pytest.raises(UpperLayerError, match="over TLS.*client certificate"):  # TLS 1.3: judged after
            await requestor.open_association("127.0.0.1", stack.port, _rq(), timeout=5, tls=client(tls_pki, "stranger"))
        tls_pki["ca"] = TestCa.create(tmp_path / "third", "Third CA")  # the server's CA is not trusted
        with pytest.raises(UpperLayerError, match="TLS handshake with GW@127.0.0.1.*failed.*Dicom:Upstream:Tls"):
            await requestor.open_association("127.0.0.1", stack.port, _rq(), timeout=5, tls=client(tls_pki))
