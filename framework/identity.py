"""Identity values: the one rule both processes read them by (pure, no IO).

The sidecar builds a principal with these functions and the framework parses the
signed headers with the same ones, so no value can mean one thing to the sidecar
and another to the framework (" admin" is never "admin" on either side).

A value is usable when it is non-empty printable ASCII (it travels in a header and
is signed as text) of at most ``MAX_NAME`` characters, without leading or trailing
whitespace and without a comma (lists are comma-joined). A user id that is not
usable is refused (401); a group or role name that is not usable grants nothing:
it is dropped, and the sidecar's audit line names it.
"""

from __future__ import annotations

from collections.abc import Iterable

SEPARATOR = ","
MAX_NAME = 256
# Joined groups or roles: one header line each towards the framework, whose server
# refuses a field over 8190 bytes with its own error page.
MAX_LIST = 4096


def problem(value: object) -> str | None:
    """Why ``value`` is not a usable identity value, or None when it is."""
    if not isinstance(value, str) or not value:
        return "empty or not a string"
    if len(value) > MAX_NAME:
        return f"longer than {MAX_NAME} characters"
    if not value.isascii():
        return "not ASCII"
    if not value.isprintable():  # for ASCII: the control characters \x00-\x1f, \x7f
        return "a control character"
    if value != value.strip():
        return "leading or trailing whitespace"
    if SEPARATOR in value:
        return "a comma"
    return None


def usable(value: object) -> bool:
    """Whether ``value`` may be a user id, group or role name."""
    return problem(value) is None


def names(values: Iterable[object]) -> tuple[tuple[str, ...], tuple[object, ...]]:
    """(usable names de-duplicated in first order, the values dropped)."""
    kept: dict[str, None] = {}
    dropped: list[object] = []
    for value in values:
        if isinstance(value, str) and problem(value) is None:
            kept[value] = None
        else:
            dropped.append(value)
    return tuple(kept), tuple(dropped)


def join(values: Iterable[str]) -> str:
    """A list as one header value (members are usable names, so no comma inside)."""
    return SEPARATOR.join(values)


def split(header: str) -> tuple[str, ...]:
    """A list header as the framework reads it: exact members, unusable ones dropped.

    No stripping: the sidecar never sends a member with outer whitespace, so such a
    member (or an empty one) can only mean something the sidecar did not grant.
    """
    if not header:
        return ()
    return names(header.split(SEPARATOR))[0]
