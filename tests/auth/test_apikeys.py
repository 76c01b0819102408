"""API keys: made, hashed, found by hash; anything else refused."""

from __future__ import annotations

import pytest

from dicomproxy.auth.apikeys import ApiKeyVerifier, check_hash, hash_key, new_key
from dicomproxy.auth.identity import Scheme


def test_new_keys_are_long_random_and_verify_by_their_hash() -> None:
    a, b = new_key(), new_key()
    assert a != b and a.startswith("dpk_") and len(a) == 4 + 43
    v = ApiKeyVerifier({"tool": (hash_key(a), frozenset({"uploader"})), "viewer": (hash_key(b).upper()
                        .replace("SHA256:", "sha256:"), frozenset({"viewer"}))})
    ident = v.verify(a.encode())
    assert ident is not None and (ident.name, ident.scheme, ident.roles) == ("tool", Scheme.API_KEY, {"uploader"})
    assert v.verify(b.encode()) is not None and v.verify(b.encode()).name == "viewer"  # type: ignore[union-attr]
    assert v.verify(b" " + a.encode() + b" ") is ident
    for wrong in (b"", a[:-1].encode(), hash_key(a).encode(), b"dpk_" + b"x" * 43):
        assert v.verify(wrong) is None


@pytest.mark.parametrize("text", ["", "sha256:", "sha256:" + "0" * 63, "md5:" + "0" * 64, "dpk_secret", "0" * 64])
def test_only_sha256_hashes_are_stored_forms(text: str) -> None:
    with pytest.raises(ValueError, match="new-api-key"):
        check_hash(text)
