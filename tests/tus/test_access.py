"""Who may touch an upload (:mod:`dicomproxy.tus.access`)."""

from __future__ import annotations

from dicomproxy.tus.access import Caller


def test_the_caller_comes_from_the_scope() -> None:
    assert Caller.from_scope({"user": "alice", "roles": ("viewer",)}) == Caller("alice", False)
    assert Caller.from_scope({"user": "root", "roles": ["admin"]}) == Caller("root", True)
    assert Caller.from_scope({}) == Caller(None, False)  # authentication off: anonymous
    assert Caller.from_scope({"user": 42, "roles": None}) == Caller(None, False)


def test_owner_or_admin() -> None:
    alice, bob, admin, anonymous = Caller("alice"), Caller("bob"), Caller("root", True), Caller(None)
    assert alice.may_access("alice") and not bob.may_access("alice")
    assert admin.may_access("alice") and admin.may_access(None)
    assert anonymous.may_access(None) and not anonymous.may_access("alice")
    assert not alice.may_access(None)  # an upload from before owners (or from tusd): admins only
