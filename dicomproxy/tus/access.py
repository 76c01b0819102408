"""Who may touch an upload: its owner, or a caller with the ``admin`` role.

The caller is whoever the HTTP authentication put in the ASGI scope: ``scope["user"]`` (the
basic-auth user name) and ``scope["roles"]``; with ``Authentication:Users`` empty there is no
user and every request is the same anonymous caller, which owns the uploads it makes (as before
owners existed). An upload records its creator in ``Storage["Owner"]`` (see :mod:`.store`).

A caller that may not touch an upload is answered exactly as if the upload did not exist
(``404 ERR_UPLOAD_NOT_FOUND``, same body and headers), for HEAD, PATCH, GET, DELETE and as a
partial of a final concatenation. tusd has no per-upload access control to compare with: its
hooks authenticate only the creating POST (a rejecting ``pre-create`` hook answers with the
status the hook chooses, 403 in tusd's example; ``pre-terminate`` answers ``400
ERR_UPLOAD_TERMINATION_REJECTED``), and its documentation says that nothing ensures an upload
is resumed by the user who created it. 404 rather than 403 because a 403 would confirm that an
id exists, and because tus clients already treat a 404 on resume as "start a new upload"
(tus-js-client drops the stored URL on a 4xx and creates a fresh upload), which is what a second
user on a shared ward workstation needs when the browser remembers the first user's upload URL.

The check runs before the upload's lock is requested: asking for the lock interrupts the PATCH
holding it, and a non-owner must not be able to cut someone else's upload short.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ADMIN_ROLE = "admin"


@dataclass(frozen=True)
class Caller:
    """The identity a request acts as."""

    user: str | None  # None: anonymous (authentication is off)
    admin: bool = False

    @classmethod
    def from_scope(cls, scope: Mapping[str, Any]) -> Caller:
        user = scope.get("user")
        roles = scope.get("roles") or ()
        return cls(user if isinstance(user, str) else None, ADMIN_ROLE in roles)

    def may_access(self, owner: str | None) -> bool:
        """The owner (the anonymous caller owns anonymous uploads) or an admin."""
        return self.admin or owner == self.user
