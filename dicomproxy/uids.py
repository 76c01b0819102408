"""The seed's ``UID`` type: DICOM Unique Identifiers as PS3.5 §9.1 defines them, checked where a
script's value becomes one (a UI element written in ``onCStore``, a ``ModifyInstance``
replacement), and ``NewUid()``'s fresh ones.

PS3.5 §9.1: at most 64 characters; components of digits separated by dots; no empty component;
no leading zero in a component of more than one digit. pydicom's ``UID.is_valid`` says the same
but gives no reason, and the reason is what the script's author needs in the error.

New UIDs: ``Dicom:UidRoot`` followed by a random integer (``uuid4``), or, with no root, the
UUID-derived form of PS3.5 §B.2: ``2.25.`` and the UUID as one integer. A root leaves room for at
least 30 digits (about 100 random bits): ``Dicom:UidRoot`` is checked for that at start-up.
"""

from __future__ import annotations

import uuid

MAX_LENGTH = 64
UUID_ROOT = "2.25"
MAX_ROOT_LENGTH = MAX_LENGTH - 1 - 30


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a UID (PS3.5 §9.1), or None when it is one."""
    if not value:
        return "it is empty"
    if len(value) > MAX_LENGTH:
        return f"it has {len(value)} characters, at most {MAX_LENGTH} are allowed"
    for i, component in enumerate(value.split("."), 1):
        if not component:
            return f"component {i} is empty"
        if not component.isascii() or not component.isdigit():
            return f"component {i} ({component!r}) is not only digits"
        if len(component) > 1 and component[0] == "0":
            return f"component {i} ({component!r}) has a leading zero"
    return None


def root_problem(root: str) -> str | None:
    """Why ``root`` cannot be ``Dicom:UidRoot``, or None."""
    problem = uid_problem(root)
    if problem is not None:
        return problem
    if len(root) > MAX_ROOT_LENGTH:
        return f"it has {len(root)} characters; at most {MAX_ROOT_LENGTH} leave room for 30 random digits"
    return None


def new_uid(root: str = "") -> str:
    """A fresh UID under ``root`` (``2.25.<UUID>`` without one)."""
    number = uuid.uuid4().int
    if not root or root == UUID_ROOT:
        return f"{UUID_ROOT}.{number}"
    room = MAX_LENGTH - len(root) - 1
    return f"{root}.{number % 10 ** room}"
