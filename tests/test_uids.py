"""dicomproxy/uids.py: the seed's UID type (PS3.5 9.1) and NewUid's fresh UIDs."""

from __future__ import annotations

import pytest

from dicomproxy.uids import MAX_ROOT_LENGTH, new_uid, root_problem, uid_problem


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "1.0.2", "2.25." + "9" * 39, "1" * 64])
def test_valid(uid: str) -> None:
    assert uid_problem(uid) is None


@pytest.mark.parametrize(("uid", "reason"), [
    ("", "empty"),
    ("1" * 65, "65 characters"),
    ("1..2", "component 2 is empty"),
    (".1", "component 1 is empty"),
    ("1.2.", "component 3 is empty"),
    ("1.02", "leading zero"),
    ("1.2a", "not only digits"),
    ("1.²", "not only digits"),
    ("1. 2", "not only digits"),
])
def test_invalid_says_why(uid: str, reason: str) -> None:
    problem = uid_problem(uid)
    assert problem is not None and reason in problem


def test_new_uids() -> None:
    made = {new_uid() for _ in range(1000)}
    assert len(made) == 1000
    assert all(u.startswith("2.25.") and uid_problem(u) is None for u in made)
    root = "1.2.826.0.1.3680043.10.999"
    for _ in range(200):
        u = new_uid(root)
        assert u.startswith(root + ".") and uid_problem(u) is None and len(u) <= 64
    longest = "1." + "2" * (MAX_ROOT_LENGTH - 2)
    assert root_problem(longest) is None and uid_problem(new_uid(longest)) is None
    assert root_problem(longest + "3") is not None and root_problem("1.02") is not None
