"""The identity model: what every authentication scheme produces, and how the rest sees it.

A basic user, an API key and a bearer token all become one :class:`Identity`: a name, the
scheme that proved it, a set of roles and (for tokens) the claims. Features, the Lua hooks and
the role policy only ever see these plain scope keys, so none of them cares how a caller
authenticated:

* ``scope["user"]`` — the name (``request.User`` in Lua);
* ``scope["roles"]`` — a sorted tuple of role names (``request.Roles``);
* ``scope["claims"]`` — the token's claims, an empty dict otherwise (``request.Claims``);
* ``scope["auth_scheme"]`` — ``basic``, ``api-key`` or ``bearer``.

Roles are plain names. Three have a meaning to the gateway's own routes (see
:mod:`dicomproxy.auth.policy`): ``viewer`` (proxied reads), ``uploader`` (TUS and proxied
writes) and ``admin`` (the gateway's administrative routes, others' uploads and tasks); ``admin``
satisfies every rule. A basic user with no ``Roles`` gets :data:`DEFAULT_USER_ROLES`, so a
configuration written before roles existed keeps every permission it had except ``admin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

ADMIN = "admin"
UPLOADER = "uploader"
VIEWER = "viewer"

#: what a basic user without ``Roles`` may do: everything a user could do before roles existed
DEFAULT_USER_ROLES: tuple[str, ...] = (VIEWER, UPLOADER)

NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


class Scheme(StrEnum):
    BASIC = "basic"
    API_KEY = "api-key"
    BEARER = "bearer"


@dataclass(frozen=True, slots=True)
class Identity:
    """A caller the gateway has authenticated. Immutable: one object may serve many requests
    (a cached password check or token returns the same identity)."""

    name: str
    scheme: Scheme
    roles: frozenset[str]
    claims: Mapping[str, Any] = field(default_factory=lambda: NO_CLAIMS)
    scope_roles: tuple[str, ...] = field(init=False, repr=False, compare=False)
    scope_items: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scope_roles", tuple(sorted(self.roles)))
        # a plain dict (merged into every request's scope: ``{**scope, **items}`` is ~4x slower on a
        # mappingproxy); never mutated
        object.__setattr__(self, "scope_items", {
            "user": self.name, "roles": self.scope_roles, "claims": self.claims, "auth_scheme": self.scheme.value})

    def satisfies(self, required: frozenset[str]) -> bool:
        """True when no role is required, the identity is ``admin``, or holds one of ``required``."""
        return not required or ADMIN in self.roles or not required.isdisjoint(self.roles)

    def into(self, scope: dict[str, Any]) -> None:
        """Write the identity's scope keys (see the module docstring) into ``scope``."""
        scope.update(self.scope_items)


def clean_roles(values: Any) -> frozenset[str]:
    """Role names from config or claims: non-empty printable strings without spaces (others dropped),
    so that every consumer, Lua included, gets plain words."""
    if isinstance(values, str):
        values = values.split()
    if not isinstance(values, list | tuple | set | frozenset):
        return frozenset()
    return frozenset(v for v in values if isinstance(v, str) and v and v.isprintable() and " " not in v)
